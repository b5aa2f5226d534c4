"""The simulator's word tokenizer and chat template, above all the multi-turn prefix property."""

from __future__ import annotations

import random
import zlib

import pytest

from router.vllm_wire.block_hash import block_hashes
from workers.sim.protocol import WORD_IDS, WORD_TEXT
from workers.sim.tokenizer import OUTPUT_WORDS, PromptError, WordTokenizer, render_chat

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def test_words_map_to_stable_ids() -> None:
    tok = WordTokenizer()
    assert tok.encode("hello  world\n hello") == [
        zlib.crc32(b"hello"),
        zlib.crc32(b"world"),
        zlib.crc32(b"hello"),
    ]
    assert WordTokenizer().encode("hello") == tok.encode("hello")
    assert tok.encode("   ") == []


def test_generated_words_retokenize_to_their_ids() -> None:
    tok = WordTokenizer()
    rng = random.Random(7)
    picks = rng.choices(range(len(OUTPUT_WORDS)), k=50)
    text = "".join(WORD_TEXT[i] for i in picks)
    assert tok.encode(text) == [WORD_IDS[i] for i in picks]
    assert len(set(OUTPUT_WORDS)) == len(OUTPUT_WORDS)


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_next_turn_prompt_extends_previous_prompt(tools: list[object] | None) -> None:
    tok = WordTokenizer()
    rng = random.Random(3)
    messages: list[dict[str, object]] = [
        {"role": "system", "content": "You are a helpful assistant. " * 5},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"}]},
    ]
    previous = tok.encode(render_chat(messages, tools))
    for turn in range(4):
        picks = rng.choices(range(len(OUTPUT_WORDS)), k=20)
        answer = "".join(WORD_TEXT[i] for i in picks)
        assistant: dict[str, object] = {"role": "assistant", "content": answer}
        if turn == 1:
            assistant["tool_calls"] = [{"id": "c1", "function": {"name": "get_weather"}}]
            messages += [assistant, {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
        else:
            messages += [assistant, {"role": "user", "content": f"follow-up question {turn}"}]
        current = tok.encode(render_chat(messages, tools))
        # The new prompt starts with the old prompt, then the generated answer's own tokens,
        # so a worker that cached prompt + output serves the whole history from cache.
        assert current[: len(previous)] == previous
        n = len(previous)
        assert current[n : n + len(picks)] == [WORD_IDS[i] for i in picks]
        old_hashes = block_hashes(previous)
        assert block_hashes(current)[: len(old_hashes)] == old_hashes
        previous = current


def test_rendering_is_deterministic_and_role_aware() -> None:
    messages: list[dict[str, object]] = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"b": 1, "a": 2}]},
    ]
    text = render_chat(messages, TOOLS)
    assert text == render_chat([dict(m) for m in messages], TOOLS)
    assert text.startswith("<|tools|>\n")
    assert "<|user|>\nhi\n" in text and "<|tool_calls|>\n" in text
    assert text.endswith("<|assistant|>\n")
    assert not render_chat(messages, add_generation_prompt=False).endswith("<|assistant|>\n")
    parts = [{"type": "text", "text": "a b"}, {"type": "text", "text": "c"}]
    assert render_chat([{"role": "user", "content": parts}]) == "<|user|>\na b\nc\n<|assistant|>\n"


@pytest.mark.parametrize(
    "messages",
    [[], "hello", [{"content": "x"}], [{"role": "user", "content": 5}], [3]],
)
def test_bad_messages_are_rejected(messages: object) -> None:
    with pytest.raises(PromptError):
        render_chat(messages)


def test_word_cache_is_bounded() -> None:
    tok = WordTokenizer()
    tok.encode(" ".join(f"w{i}" for i in range(200_500)))
    assert len(tok._ids) <= 200_000
