"""Prompt tokenizers: the simulator's word pair and a real `tokenizers` + Jinja2 chat template pair.

The real tokenizer is trained here, on seeded text, and written to tmp_path: nothing is
downloaded. The precise key is checked against the fact sheet's block-hash vectors (§2.8).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from router.config import ConfigError, PreciseConfig, parse_config
from router.routing.precise_key import PreciseKeyer
from router.vllm_wire.prompt_tokens import (
    HFPromptTokenizer,
    WordPromptTokenizer,
    build_prompt_tokenizer,
    read_chat_template,
)
from router.vllm_wire.word_tokenizer import PromptError, WordTokenizer, render_chat

CHATML = (
    "{% if tools %}{{ bos_token }}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n"
    "{% else %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def _corpus(seed: int, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 8))) for _ in range(300)
    ]
    return [" ".join(rng.choices(vocab, k=rng.randint(5, 30))) for _ in range(lines)]


def train_tokenizer(path: Path, seed: int = 7) -> Path:
    """A small byte-level BPE tokenizer with chat specials and a BOS post-processor."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    target = path / "tokenizer.json"
    tok.save(str(target))
    return target


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> Path:
    return train_tokenizer(tmp_path)


MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "you are terse"},
    {"role": "user", "content": "hello there, what is up"},
]


def test_word_prompt_tokenizer_is_the_simulators() -> None:
    tok = WordPromptTokenizer()
    words = WordTokenizer()
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert tok.encode_chat(MESSAGES, tools) == words.encode(render_chat(MESSAGES, tools))
    assert tok.encode_text("a b  c") == words.encode("a b c")
    assert tok.completion_ids([[5, 6, 7]]) == [5, 6, 7]
    assert tok.completion_ids(["x y"]) == words.encode("x y")
    body = {"messages": MESSAGES, "add_generation_prompt": False}
    assert tok.request_ids(body, chat=True) == words.encode(render_chat(MESSAGES, None, False))
    with pytest.raises(PromptError):
        tok.completion_ids([1, "a"])
    with pytest.raises(PromptError):
        tok.request_ids({"messages": []}, chat=True)


def test_hf_tokenizer_renders_like_apply_chat_template(tokenizer_file: Path) -> None:
    tok = HFPromptTokenizer(tokenizer_file, CHATML, bos_token="<s>")
    raw = Tokenizer.from_file(str(tokenizer_file))
    text = (
        "<s><|im_start|>system\nyou are terse<|im_end|>\n"
        "<|im_start|>user\nhello there, what is up<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode_chat(MESSAGES)
    # The template writes the BOS itself, so chat prompts add no special tokens (vLLM does so).
    assert ids == raw.encode(text, add_special_tokens=False).ids
    bos = raw.token_to_id("<s>")
    assert bos is not None and ids[0] == bos and ids.count(bos) == 1
    assert raw.token_to_id("<|im_start|>") in ids  # specials are single tokens
    # A completions prompt string gets the tokenizer's special tokens (the BOS).
    assert tok.encode_text("hello there") == raw.encode("hello there").ids
    assert tok.encode_text("hello there")[0] == raw.token_to_id("<s>")
    assert tok.completion_ids([3, 4]) == [3, 4]
    tools = [{"type": "function", "function": {"name": "héllo"}}]
    assert "héllo" in raw.decode(tok.encode_chat(MESSAGES, tools))  # tojson keeps non-ASCII


def test_hf_multi_turn_prompt_extends_the_previous_one(tokenizer_file: Path) -> None:
    tok = HFPromptTokenizer(tokenizer_file, CHATML, bos_token="<s>")
    first = tok.encode_chat(MESSAGES)
    later = [*MESSAGES, {"role": "assistant", "content": "fine"}, {"role": "user", "content": "ok"}]
    assert tok.encode_chat(later)[: len(first) - 3] == first[:-3]  # all but "assistant\n"


def test_template_errors_are_prompt_errors(tokenizer_file: Path) -> None:
    tok = HFPromptTokenizer(tokenizer_file, CHATML)
    with pytest.raises(PromptError, match="unknown role"):
        tok.encode_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(PromptError):
        tok.encode_chat("not a list")


def test_chat_template_sources(tmp_path: Path, tokenizer_file: Path) -> None:
    assert read_chat_template(CHATML) == CHATML
    jinja = tmp_path / "chat.jinja"
    jinja.write_text(CHATML)
    assert read_chat_template(str(jinja)) == CHATML
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": CHATML, "bos_token": "<s>"}))
    assert read_chat_template(str(config)) == CHATML
    with pytest.raises(ValueError, match="not found"):
        read_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="does not parse"):
        build_prompt_tokenizer(str(tokenizer_file), "{% for x in %}")
    with pytest.raises(ValueError, match="needs a chat_template"):
        build_prompt_tokenizer(str(tokenizer_file))
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        build_prompt_tokenizer(str(jinja), CHATML)


def _pool_config(precise: dict[str, Any], policy: str = "hybrid") -> dict[str, Any]:
    return {
        "auth": {"enabled": False},
        "pools": {"m": {"workers": [], "policy": {"name": policy}, "precise": precise}},
    }


def test_precise_config_is_validated_at_load(tmp_path: Path, tokenizer_file: Path) -> None:
    ok = parse_config(_pool_config({"tokenizer": str(tokenizer_file), "chat_template": CHATML}))
    precise = ok.pools["m"].precise
    assert precise is not None and precise.block_size == 16 and precise.hash_algo == "sha256"
    assert precise.hash_seed == "vllm-none-hash"
    problems = {
        "not found": {"tokenizer": str(tmp_path / "nope.json"), "chat_template": CHATML},
        "does not parse": {"tokenizer": "word", "chat_template": "{{ oops"},
        "needs the hybrid policy": {"tokenizer": "word"},
    }
    for message, precise_cfg in problems.items():
        policy = "prefix" if "hybrid" in message else "hybrid"
        with pytest.raises(ConfigError, match=message):
            parse_config(_pool_config(precise_cfg, policy))


# Fact sheet §2.8: tokens 1..32, block size 16, no extras; event ints of blocks 1 and 2.
VECTORS = [
    ("sha256", "vllm-none-hash", [1403909460543360175, 1643945449041937783]),
    ("sha256", "0", [7536218907325174565, 9048537298590080561]),
    ("sha256_cbor", "vllm-none-hash", [8866452693264111234, 807986237951177663]),
    ("sha256_cbor", "0", [3236607068019569386, 2758186210834249151]),
]
SALTED = {
    ("sha256", "vllm-none-hash"): 3916535347477951230,
    ("sha256_cbor", "0"): 9427217785448712521,
}


@pytest.mark.parametrize(("algo", "seed", "expected"), VECTORS)
def test_precise_key_reproduces_the_fact_sheet_vectors(
    algo: str, seed: str, expected: list[int]
) -> None:
    config = PreciseConfig(tokenizer="word", hash_algo=algo, hash_seed=seed)
    keyer = PreciseKeyer(config)
    key = keyer.key({"prompt": [*range(1, 33), 99]}, chat=False)
    assert key is not None and key.prompt_tokens == 33
    assert key.block_hashes == expected  # the partial third block is not hashed
    salted = SALTED.get((algo, seed))
    if salted is not None:
        key = keyer.key({"prompt": list(range(1, 17)), "cache_salt": "abc"}, chat=False)
        assert key is not None and key.block_hashes == [salted]


def test_precise_key_of_an_unrenderable_body_is_none() -> None:
    keyer = PreciseKeyer(PreciseConfig(tokenizer="word"))
    assert keyer.key({"messages": "nope"}, chat=True) is None
    assert keyer.key({"prompt": {"a": 1}}, chat=False) is None


async def test_long_prompts_are_keyed_in_the_helper_process_as_inline() -> None:
    from router.routing.offloaded_key import OffloadedKeyer

    config = PreciseConfig(tokenizer="word")
    keyer = OffloadedKeyer(config, inline_chars=100)
    try:
        long_body = {"messages": [{"role": "user", "content": "alpha beta " * 400}]}
        short_body = {"messages": [{"role": "user", "content": "alpha beta"}]}
        expected = PreciseKeyer(config).key(long_body, True, ("sql", "/a/sql"))
        assert await keyer.key_async(short_body, True, 10) == PreciseKeyer(config).key(
            short_body, True
        )
        assert keyer._pool is None  # a short prompt never starts the helper
        got = await keyer.key_async(long_body, True, 4000, ("sql", "/a/sql"))
        assert got == expected and got is not None and len(got.block_hashes) == 50
        assert keyer._pool is not None  # computed by the helper process
    finally:
        keyer.close()
