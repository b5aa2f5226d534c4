from __future__ import annotations

from typing import Any

from router.routing.key import estimate_prompt_tokens, routing_key

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"b": 1, "a": 2}}}]


def chat(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": messages, **extra}


def test_next_turn_extends_previous_key() -> None:
    first = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ]
    key1 = routing_key(chat(first), "chat")
    second: list[dict[str, Any]] = [
        *first,
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
    ]
    key2 = routing_key(chat(second), "chat")
    assert key2.startswith(key1)
    assert len(key2) > len(key1)
    assert "Weather?" in key2 and "Hello." in key2


def test_different_system_prompts_differ_in_first_block() -> None:
    a = routing_key(
        chat([{"role": "system", "content": "A" * 100}, {"role": "user", "content": "x"}]), "chat"
    )
    b = routing_key(
        chat([{"role": "system", "content": "B" * 100}, {"role": "user", "content": "x"}]), "chat"
    )
    assert a[:64] != b[:64]


def test_tools_are_included_first_and_deterministic() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    with_tools = routing_key(chat(msgs, tools=TOOLS), "chat")
    reordered = [
        {"type": "function", "function": {"parameters": {"a": 2, "b": 1}, "name": "get_weather"}}
    ]
    assert with_tools == routing_key(chat(msgs, tools=reordered), "chat")
    assert "get_weather" in with_tools
    assert with_tools.index("get_weather") < with_tools.index("hi")
    assert with_tools != routing_key(chat(msgs), "chat")


def test_tool_calls_and_results_are_included() -> None:
    msgs: list[dict[str, Any]] = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    key = routing_key(chat(msgs), "chat")
    assert "c1" in key and "sunny" in key and '"name":"w"' in key


def test_non_text_parts_get_stable_placeholders() -> None:
    part = {"type": "image_url", "image_url": {"url": "data:" + "x" * 10_000}}
    msgs = [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    key = routing_key(chat(msgs), "chat")
    assert key == routing_key(chat(msgs), "chat")
    assert len(key) < 1000
    other = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "u2"}},
            ],
        }
    ]
    assert key != routing_key(chat(other), "chat")


def test_completions_prompt_forms() -> None:
    assert routing_key({"prompt": "hello"}, "completions") == "hello"
    ids = routing_key({"prompt": [1, 2, 3]}, "completions")
    assert routing_key({"prompt": [1, 2, 3, 4]}, "completions").startswith(ids)
    assert routing_key({"prompt": ["first", "second"]}, "completions") == "first"
    assert routing_key({"prompt": [[5, 6], [7]]}, "completions") == "5 6"


def test_odd_but_valid_input_never_raises() -> None:
    odd: list[dict[str, Any]] = [
        {},
        {"messages": []},
        {"messages": [{}]},
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        {"messages": [{"role": "user", "content": {"weird": True}}]},
        {"messages": [{"role": "user", "content": "\ud800 lone surrogate"}]},
        {"messages": ["not a dict"]},
        {"tools": []},
    ]
    for body in odd:
        assert isinstance(routing_key(body, "chat"), str)
    prompt: object
    for prompt in (None, [], "", [[]], 3):
        assert isinstance(routing_key({"prompt": prompt}, "completions"), str)


def test_estimate_prompt_tokens() -> None:
    assert estimate_prompt_tokens("") == 1
    assert estimate_prompt_tokens("x" * 4000) == 1000
