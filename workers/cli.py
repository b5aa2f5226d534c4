"""Command line of ``prefix-worker``: what runs beside or instead of vLLM.

Thin by design: argparse turns flags into the component's pydantic config and hands over. ``sim``
runs the simulated vLLM worker, ``agent`` the sidecar beside a real vLLM, and ``vllm`` starts
``vllm serve`` with the router's flags plus the agent (``workers.launch``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from workers.agent.cli import add_agent_parser, run_agent_command
from workers.launch import add_vllm_parser, run_vllm_command, split_passthrough
from workers.sim.config import SimConfig
from workers.sim.fault_spec import FaultSpec, parse_fault_spec

# flag -> SimConfig field, for the optional sim flags (None means "keep the default").
_SIM_FLAGS: dict[str, tuple[str, type]] = {
    "--num-gpu-blocks": ("num_gpu_blocks", int),
    "--block-size": ("block_size", int),
    "--max-num-seqs": ("max_num_seqs", int),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int),
    "--max-model-len": ("max_model_len", int),
    "--default-max-tokens": ("default_max_tokens", int),
    "--time-scale": ("time_scale", float),
    "--prefill-s-per-token": ("prefill_s_per_token", float),
    "--step-overhead-s": ("step_overhead_s", float),
    "--decode-s-per-seq": ("decode_s_per_seq", float),
    "--hash-algo": ("hash_algo", str),
    "--hash-seed": ("hash_seed", str),
    "--seed": ("seed", int),
    "--fault-seed": ("fault_seed", int),
    "--kv-events-endpoint": ("kv_events_endpoint", str),
    "--kv-events-replay-endpoint": ("kv_events_replay_endpoint", str),
    "--kv-events-format": ("kv_events_format", str),
    "--kv-events-topic": ("kv_events_topic", str),
    "--kv-events-buffer-steps": ("kv_events_buffer_steps", int),
    "--tokenizer": ("tokenizer", str),
    "--chat-template": ("chat_template", str),
    "--ssl-certfile": ("ssl_certfile", str),
    "--ssl-keyfile": ("ssl_keyfile", str),
    "--max-loras": ("max_loras", int),
    "--lora-load-s": ("lora_load_s", float),
    "--role": ("role", str),
    "--kv-lease-s": ("kv_lease_s", float),
    "--kv-transfer-s-per-token": ("kv_transfer_s_per_token", float),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefix-worker", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("sim", help="run a simulated vLLM worker (no GPU)")
    sim.add_argument("--model", required=True, help="served model name")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    sim.add_argument(
        "--workers", type=int, default=1, help="simulated workers in this process (one loop)"
    )
    sim.add_argument(
        "--base-port", type=int, default=None, help="with --workers: ports from here on"
    )
    for flag, (dest, kind) in _SIM_FLAGS.items():
        aliases = [flag]
        if dest == "step_overhead_s":
            aliases.append("--decode-s-per-step")  # the fixed cost of one forward pass
        sim.add_argument(*aliases, dest=dest, type=kind, default=None)
    sim.add_argument(
        "--no-cache-output-blocks",
        dest="cache_output_blocks",
        action="store_false",
        default=None,
        help="do not cache generated tokens' blocks",
    )
    sim.add_argument(
        "--hide-kv-capacity",
        dest="export_kv_capacity",
        action="store_false",
        default=None,
        help="leave vllm:cache_config_info out of /metrics (capacity must then be learned)",
    )
    sim.add_argument(
        "--fault",
        dest="faults",
        action="append",
        type=_fault_arg,
        default=None,
        metavar="SPEC",
        help="inject a fault, e.g. 'status:status=503,count=2' (repeatable; see /sim/faults)",
    )
    sim.add_argument(
        "--lora-modules",
        dest="lora_modules",
        nargs="+",
        type=_lora_arg,
        default=None,
        metavar="NAME=PATH",
        help="serve LoRA adapters, as vLLM's flag (the simulator never reads PATH)",
    )
    sim.add_argument(
        "--allow-runtime-lora-updating",
        dest="runtime_lora_updating",
        action="store_true",
        default=None,
        help="serve /v1/load_lora_adapter (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)",
    )
    add_agent_parser(commands)
    add_vllm_parser(commands)
    return parser


def _fault_arg(text: str) -> FaultSpec:
    try:
        return parse_fault_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _lora_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def main(argv: Sequence[str] | None = None) -> int:
    # Everything after "--" belongs to `vllm serve`; argparse would mistake it for our flags.
    own, passthrough = split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    args = parser.parse_args(own)
    if passthrough and args.command != "vllm":
        parser.error("arguments after -- are only for the vllm subcommand")
    if args.command == "vllm":
        return run_vllm_command(args, passthrough)
    if args.command == "sim":
        if args.workers < 1:
            parser.error("--workers must be at least 1")
        port = args.base_port if args.base_port is not None else args.port
        fields = {"model": args.model, "host": args.host, "port": port}
        for dest, _ in [
            *_SIM_FLAGS.values(),
            ("cache_output_blocks", bool),
            ("export_kv_capacity", bool),
            ("faults", list),
            ("runtime_lora_updating", bool),
        ]:
            value = getattr(args, dest)
            if value is not None:
                fields[dest] = value
        if args.lora_modules is not None:
            fields["lora_modules"] = dict(args.lora_modules)
        try:
            config = SimConfig(**fields)
        except ValidationError as exc:
            print(f"prefix-worker sim: invalid configuration:\n{exc}", file=sys.stderr)
            return 2
        from workers.sim.runner import run_sim  # aiohttp import only when serving

        with contextlib.suppress(KeyboardInterrupt):
            run_sim(config, args.workers)
        return 0
    if args.command == "agent":
        return run_agent_command(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    raise SystemExit(main())
