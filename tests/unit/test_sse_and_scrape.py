"""SSE helpers of the relay and the vLLM metrics line parser."""

from __future__ import annotations

import json

from router.upstream.load_scrape import parse_vllm_metrics
from router.upstream.sse import split_usage_event

USAGE = {
    "id": "x",
    "choices": [],
    "usage": {
        "prompt_tokens": 40,
        "completion_tokens": 8,
        "total_tokens": 48,
        "prompt_tokens_details": {"cached_tokens": 32},
    },
}
TOKEN = {"id": "x", "choices": [{"index": 0, "delta": {"content": " hi"}}]}


def _events(*payloads: object) -> bytes:
    return b"".join(b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads)


def test_usage_event_dropped_when_client_did_not_ask() -> None:
    data = _events(TOKEN, USAGE) + b"data: [DONE]\n\n"
    out, usage, done = split_usage_event(data, drop=True)
    assert usage is not None and usage.cached_tokens == 32 and usage.prompt_tokens == 40
    assert done
    assert b'"usage"' not in out and out.endswith(b"data: [DONE]\n\n")
    assert out.startswith(b"data: ")


def test_usage_event_kept_when_client_asked() -> None:
    data = _events(USAGE)
    out, usage, done = split_usage_event(data, drop=False)
    assert out == data and usage is not None and not done


def test_only_the_usage_event_of_a_burst_is_rewritten_and_every_usage_is_read() -> None:
    tokens = _events(*[TOKEN] * 16)
    done = b"data: [DONE]\n\n"
    for drop in (True, False):
        out, usage, saw_done = split_usage_event(tokens + _events(USAGE) + done, drop, 7)
        assert usage is not None and usage.cached_tokens == 7 and saw_done
        assert out.startswith(tokens) and out.endswith(done)
        assert (b'"cached_tokens":7' in out) is not drop  # the override reaches the client
    # Usage in every event (continuous usage stats): each is read, the last one counts.
    first = {**TOKEN, "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    out, usage, _ = split_usage_event(_events(first, USAGE), drop=True)
    assert usage is not None and usage.prompt_tokens == 40
    assert out == _events(first)  # the usage-only event dropped, the token's kept


def test_parse_vllm_metrics() -> None:
    text = "\n".join(
        [
            "# HELP vllm:num_requests_running x",
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
            'vllm:num_requests_running{engine="1",model_name="m"} 2.0',
            'vllm:num_requests_waiting{engine="0",model_name="m"} 4.0',
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25',
            'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="2048"} 1.0',
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 99.0',
        ]
    )
    load = parse_vllm_metrics(text)
    assert (load.running, load.waiting, load.kv_usage) == (5, 4, 0.25)
    assert (load.block_size, load.num_gpu_blocks) == (16, 2048)


def test_parse_vllm_metrics_reads_label_values_as_the_exposition_format_escapes_them() -> None:
    # A label value may hold escaped quotes and commas (a model path, an adapter name); a
    # hand-written `key="value"` scan loses the labels after it.
    text = "\n".join(
        [
            'vllm:cache_config_info{model_name="a\\",b=\\"c",block_size="32",'
            'num_gpu_blocks="4096"} 1.0',
            'vllm:num_requests_running{model_name="x{y} z"} 7 1700000000000',
            'vllm:num_requests_waiting{model_name="m"} not-a-number',
        ]
    )
    rejected: set[str] = set()
    load = parse_vllm_metrics(text, rejected)
    assert (load.block_size, load.num_gpu_blocks) == (32, 4096)
    assert load.running == 7
    assert rejected == {"vllm:num_requests_waiting"}


def test_parse_vllm_metrics_takes_the_newest_lora_series() -> None:
    text = (
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora,chat-lora",'
        'waiting_lora_adapters="fr-lora"} 1.7561e+09\n'
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="",'
        'waiting_lora_adapters=""} 1.7560e+09\n'
        'vllm:num_requests_running{model_name="m",engine="0"} 1.0\n'
    )
    load = parse_vllm_metrics(text)
    assert load.lora_running == {"sql-lora", "chat-lora"}
    assert load.lora_waiting == {"fr-lora"} and load.max_lora == 4
    plain = parse_vllm_metrics('vllm:num_requests_running{model_name="m",engine="0"} 1.0\n')
    assert plain.max_lora is None and not plain.lora_running
