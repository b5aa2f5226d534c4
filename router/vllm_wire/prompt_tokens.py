"""An OpenAI request body turned into the token ids vLLM would compute for it.

vLLM renders a chat request with the model's chat template (``messages``, ``tools``,
``add_generation_prompt``, ``bos_token``/``eos_token``) and tokenizes the result *without* adding
special tokens (the template writes them); a completions prompt string is tokenized *with* them,
and a prompt of token ids is taken as is. ``PromptTokenizer`` does exactly that from two parts: a
chat renderer (the simulated worker's word template, or a Jinja2 template rendered the way
Hugging Face ``apply_chat_template`` renders it) and a text encoder (the simulated worker's word
tokenizer, or a ``tokenizers`` ``tokenizer.json``). ``WordPromptTokenizer`` is the simulated
worker's pair; ``HFPromptTokenizer`` a real model's. The simulator and the gateway's precise
prefix mode both tokenize through here, so they agree token for token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from router.vllm_wire.word_tokenizer import PromptError, WordTokenizer, render_chat

WORD = "word"
"""The tokenizer name that selects the simulated worker's word tokenizer."""


class TextEncoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...


class ChatRenderer(Protocol):
    def render(
        self, messages: Any, tools: Any, add_generation_prompt: bool, continue_final: bool
    ) -> str: ...


class _WordEncoder:
    """The word tokenizer has no special tokens, so both encodings are the same."""

    def __init__(self) -> None:
        self._words = WordTokenizer()

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._words.encode(text)


class _WordTemplate:
    def render(
        self, messages: Any, tools: Any, add_generation_prompt: bool, continue_final: bool
    ) -> str:
        # The word template ends every message in whitespace, which tokenizes to nothing:
        # continuing the final message renders the same tokens as closing it.
        return render_chat(messages, tools, add_generation_prompt)


class _HFEncoder:
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer  # the `precise` extra; imported only when configured

        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception subclasses
            raise ValueError(f"cannot load tokenizer {str(path)!r}: {exc}") from None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Hugging Face's `tojson` (unlike Jinja2's) keeps non-ASCII text and does not escape HTML.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise PromptError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class JinjaChatTemplate:
    """A chat template rendered as ``transformers``' ``apply_chat_template`` renders it."""

    def __init__(
        self, source: str, bos_token: str | None = None, eos_token: str | None = None
    ) -> None:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # The same environment options as transformers, so whitespace renders identically.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ValueError(f"the chat template does not parse: {exc}") from None
        self._specials = {
            k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None
        }
        self._template_error: type[Exception] = TemplateError

    def render(
        self, messages: Any, tools: Any, add_generation_prompt: bool, continue_final: bool
    ) -> str:
        if not isinstance(messages, list) or not messages:
            raise PromptError("'messages' must be a non-empty list")
        text = self._render(messages, tools, add_generation_prompt)
        final = messages[-1].get("content") if isinstance(messages[-1], dict) else None
        if continue_final and isinstance(final, str) and final:
            # As vLLM continues a final message: cut what the template wrote after its text.
            end = text.rfind(final)
            if end >= 0:
                text = text[: end + len(final)]
        return text

    def _render(self, messages: Any, tools: Any, add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                **self._specials,
            )
        except (self._template_error, TypeError, ValueError, LookupError) as exc:
            raise PromptError(f"the chat template cannot render these messages: {exc}") from None


def read_chat_template(value: str) -> str:
    """A chat template given as a file path or as the template text itself."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"chat template file {value!r} not found (nor is it a Jinja2 template)")
    text = path.read_text()
    if text.lstrip().startswith("{") and path.suffix == ".json":
        # A tokenizer_config.json: the template is its `chat_template` field.
        data = json.loads(text)
        found = data.get("chat_template") if isinstance(data, dict) else None
        if not isinstance(found, str):
            raise ValueError(f"{value!r} has no string `chat_template` field")
        return found
    return text


class PromptTokenizer:
    """Token ids of a chat or completions request, as the worker computes them."""

    def __init__(self, encoder: TextEncoder, renderer: ChatRenderer) -> None:
        self._encoder = encoder
        self._renderer = renderer

    def encode_chat(
        self,
        messages: Any,
        tools: Any = None,
        add_generation_prompt: bool = True,
        continue_final: bool = False,
    ) -> list[int]:
        text = self._renderer.render(messages, tools, add_generation_prompt, continue_final)
        return self._encoder.encode(text, False)

    def encode_text(self, text: str) -> list[int]:
        return self._encoder.encode(text, True)

    def word_token_id(self, word: str) -> int:
        """The id of ``word`` as generated output (leading space, as the simulator streams it)."""
        ids = self._encoder.encode(" " + word, False)
        return ids[0] if ids else 0

    def completion_ids(self, prompt: Any) -> list[int]:
        """A completions ``prompt``: a string, token ids, or a batch of one of those."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one is the only batch that has one prefix
        if isinstance(prompt, str):
            return self.encode_text(prompt)
        if isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return list(prompt)
        raise PromptError(
            "'prompt' must be a string, a list of token ids, or a list of one of those"
        )

    def request_ids(self, body: Mapping[str, Any], chat: bool) -> list[int]:
        """The prompt token ids of an OpenAI body; raises ``PromptError`` if it has none."""
        if chat:
            add_generation_prompt = bool(body.get("add_generation_prompt", True))
            continue_final = bool(body.get("continue_final_message", False))
            if add_generation_prompt and continue_final:
                # vLLM's own validation: the two ask for contradictory endings.
                raise PromptError(
                    "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
                )
            messages = body.get("messages")
            if continue_final and not (
                isinstance(messages, list)
                and messages
                and isinstance(messages[-1], Mapping)
                and messages[-1].get("role") == "assistant"
            ):
                raise PromptError("`continue_final_message` needs a final assistant message")
            return self.encode_chat(
                messages, body.get("tools"), add_generation_prompt, continue_final
            )
        return self.completion_ids(body.get("prompt"))


class WordPromptTokenizer(PromptTokenizer):
    """The simulated worker's word tokenizer, with its own template unless one is given."""

    def __init__(self, chat_template: str | None = None) -> None:
        renderer: ChatRenderer = (
            _WordTemplate() if chat_template is None else JinjaChatTemplate(chat_template)
        )
        super().__init__(_WordEncoder(), renderer)


class HFPromptTokenizer(PromptTokenizer):
    """A model's ``tokenizer.json`` and Jinja2 chat template (text, not a path)."""

    def __init__(
        self,
        tokenizer_path: str | Path,
        chat_template: str,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        super().__init__(
            _HFEncoder(tokenizer_path), JinjaChatTemplate(chat_template, bos_token, eos_token)
        )


def build_prompt_tokenizer(
    tokenizer: str,
    chat_template: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> PromptTokenizer:
    """``tokenizer`` is ``"word"`` or a ``tokenizer.json`` path; ``chat_template`` a path or text.

    Raises ``ValueError`` with a message fit for a configuration error.
    """
    template = read_chat_template(chat_template) if chat_template is not None else None
    if tokenizer == WORD:
        return WordPromptTokenizer(template)
    if not Path(tokenizer).is_file():
        raise ValueError(f'tokenizer file {tokenizer!r} not found (or give "{WORD}")')
    if template is None:
        raise ValueError("a tokenizer.json needs a chat_template (a file path or the template)")
    return HFPromptTokenizer(tokenizer, template, bos_token, eos_token)
