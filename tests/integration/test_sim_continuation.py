"""The simulated worker continues an answer exactly: its next token is a function of the token
sequence so far, so another worker given the answer's start writes the same rest."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import MODEL, SimFactory

MESSAGES = [{"role": "user", "content": "tell me about rivers"}]


async def _chat(http: aiohttp.ClientSession, url: str, **body: object) -> tuple[int, Any]:
    payload = {"model": MODEL, "messages": MESSAGES, **body}
    async with http.post(url + "/v1/chat/completions", json=payload) as resp:
        return resp.status, await resp.json()


async def test_a_second_worker_continues_the_first_ones_answer_word_for_word(
    sims: SimFactory, http: aiohttp.ClientSession
) -> None:
    first, second = await sims(2)
    status, whole = await _chat(http, first.url, max_tokens=12)
    assert status == 200
    text = whole["choices"][0]["message"]["content"]
    words = text.split(" ")[1:]  # generated words come with a leading space
    assert len(words) == 12
    start = "".join(" " + w for w in words[:5])
    status, rest = await _chat(
        http,
        second.url,
        messages=[*MESSAGES, {"role": "assistant", "content": start}],
        continue_final_message=True,
        add_generation_prompt=False,
        max_tokens=7,
    )
    assert status == 200, rest
    assert start + rest["choices"][0]["message"]["content"] == text
    assert rest["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"] + 5


async def test_completions_continue_too(sims: SimFactory, http: aiohttp.ClientSession) -> None:
    first, second = await sims(2)
    body = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 10}
    async with http.post(first.url + "/v1/completions", json=body) as resp:
        text = (await resp.json())["choices"][0]["text"]
    start = "".join(" " + w for w in text.split(" ")[1:4])
    body = {**body, "prompt": "once upon a time" + start, "max_tokens": 7}
    async with http.post(second.url + "/v1/completions", json=body) as resp:
        assert start + (await resp.json())["choices"][0]["text"] == text


async def test_continue_final_message_is_validated_as_vllm_does(
    sims: SimFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1)
    assistant = [*MESSAGES, {"role": "assistant", "content": " the"}]
    status, error = await _chat(http, sim.url, messages=assistant, continue_final_message=True)
    assert status == 400 and "Cannot set both" in error["error"]["message"]
    status, error = await _chat(
        http, sim.url, continue_final_message=True, add_generation_prompt=False
    )
    assert status == 400  # the final message is the user's: there is nothing to continue
