"""Configuration of the simulated vLLM worker.

One pydantic model holds every knob of the simulator: what it serves and where, the KV cache
geometry and hashing that decide prefix hits, the scheduler limits of continuous batching, and
the timing constants of the step model. The defaults model Llama-3-8B on one H100
(``reference/vllm-interface.md`` §6): a forward pass costs about 6.5 ms, each uncached prompt
token about 33 us, and each running sequence adds a little memory traffic per step. ``time_scale``
multiplies every duration, so tests and overhead benchmarks can run the same model at 0 (as fast
as the event loop allows) while the policy benchmark runs it at 1.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from router.vllm_wire.block_hash import DEFAULT_NONE_HASH_SEED, HashAlgo
from router.vllm_wire.kv_events import EventFormat
from workers.sim.fault_spec import FaultSpec


class SimConfig(BaseModel):
    """Everything one simulated worker needs; immutable once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="served model name (vLLM --served-model-name)")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="0 picks an ephemeral port")
    ssl_certfile: str | None = Field(default=None, description="serve https (vLLM --ssl-certfile)")
    ssl_keyfile: str | None = Field(default=None, description="its key (vLLM --ssl-keyfile)")

    # KV cache and prefix caching.
    block_size: int = Field(default=16, ge=1)
    num_gpu_blocks: int = Field(default=2048, ge=1, description="KV capacity in blocks")
    hash_algo: HashAlgo = "sha256"
    hash_seed: str = DEFAULT_NONE_HASH_SEED
    export_kv_capacity: bool = Field(
        default=True, description="export vllm:cache_config_info (off: --hide-kv-capacity)"
    )
    cache_output_blocks: bool = Field(
        default=True, description="cache generated tokens' blocks once full, as vLLM does"
    )

    # Scheduler.
    max_num_seqs: int = Field(default=256, ge=1)
    max_num_batched_tokens: int = Field(default=8192, ge=1, description="token budget per step")
    max_model_len: int = Field(default=32768, ge=2)
    default_max_tokens: int = Field(default=16, ge=1)

    # Step timing model: duration = step_overhead_s + prefill_tokens * prefill_s_per_token
    #                               + running_decodes * decode_s_per_seq, all times time_scale.
    step_overhead_s: float = Field(default=0.0065, ge=0.0)
    prefill_s_per_token: float = Field(default=33e-6, ge=0.0)
    decode_s_per_seq: float = Field(default=1e-4, ge=0.0)
    time_scale: float = Field(default=1.0, ge=0.0)

    # LoRA (vLLM --enable-lora): adapters served from the start, GPU slots, and the cost of
    # loading one into a slot; runtime updates as with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True.
    lora_modules: dict[str, str] = Field(
        default_factory=dict, description="adapter name -> path (the path is never read)"
    )
    max_loras: int = Field(default=1, ge=1, description="distinct adapters per batch")
    lora_load_s: float = Field(default=0.05, ge=0.0, description="loading an adapter into a slot")
    runtime_lora_updating: bool = Field(
        default=False, description="serve /v1/load_lora_adapter and /v1/unload_lora_adapter"
    )

    # P/D disaggregation (vLLM's NixlConnector): which side of a transfer this worker plays.
    role: Literal["prefill", "decode", "both"] = Field(
        default="both", description="honour remote-decode params, remote-prefill ones, or both"
    )
    kv_lease_s: float = Field(
        default=30.0, gt=0, description="a prefill worker holds its blocks this long for decode"
    )
    kv_transfer_s_per_token: float = Field(
        default=4e-6, ge=0.0, description="a decode worker's cost per token of KV pulled"
    )

    seed: int = Field(default=0, description="seed of the generated words")

    # Tokenization: the word tokenizer unless a real model's tokenizer.json is named.
    tokenizer: str | None = Field(
        default=None, description="tokenizer.json path (None: the deterministic word tokenizer)"
    )
    chat_template: str | None = Field(
        default=None, description="Jinja2 chat template, path or text (needed with tokenizer)"
    )

    # Fault injection at start (``--fault``); /sim/faults changes the script at run time.
    faults: tuple[FaultSpec, ...] = ()
    fault_seed: int = Field(default=0, description="seed of probabilistic faults' draws")

    # KV events on ZMQ, as vLLM's --kv-events-config (off when kv_events_endpoint is None).
    kv_events_endpoint: str | None = Field(
        default=None, description="PUB endpoint; bound if it has '*' or '::' or is ipc/inproc"
    )
    kv_events_replay_endpoint: str | None = Field(default=None, description="ROUTER, bound")
    kv_events_format: EventFormat = Field(default="map", description="map: >= 0.24, array: old")
    kv_events_topic: str = ""
    kv_events_buffer_steps: int = Field(default=10000, ge=1, description="batches kept for replay")

    @property
    def enable_lora(self) -> bool:
        return bool(self.lora_modules) or self.runtime_lora_updating

    @model_validator(mode="after")
    def _check_geometry(self) -> SimConfig:
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Every running sequence needs one token of budget per step to decode.
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        if self.tokenizer is not None and self.chat_template is None:
            raise ValueError("a tokenizer.json needs a chat_template")
        return self
