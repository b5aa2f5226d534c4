"""The simulated worker's tokenization: the word tokenizer, its chat template, and real ones.

The word tokenizer and template live in ``router.vllm_wire.word_tokenizer`` because the gateway's
precise prefix mode must tokenize exactly as the simulator does; ``build_sim_tokenizer`` picks the
word pair or, when the config names a ``tokenizer.json`` and a chat template, a real model's
(``router.vllm_wire.prompt_tokens``). The names below are re-exported for the simulator's modules.
"""

from __future__ import annotations

from router.vllm_wire.prompt_tokens import WORD, PromptTokenizer, build_prompt_tokenizer
from router.vllm_wire.word_tokenizer import (
    GENERATION_PROMPT,
    OUTPUT_WORDS,
    PromptError,
    WordTokenizer,
    render_chat,
)
from workers.sim.config import SimConfig

__all__ = [
    "GENERATION_PROMPT",
    "OUTPUT_WORDS",
    "PromptError",
    "PromptTokenizer",
    "WordTokenizer",
    "build_sim_tokenizer",
    "render_chat",
]


def build_sim_tokenizer(config: SimConfig) -> PromptTokenizer:
    """The configured tokenizer: the word one unless ``config.tokenizer`` names a file."""
    return build_prompt_tokenizer(config.tokenizer or WORD, config.chat_template)
