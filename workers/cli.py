"""Command line of ``prefix-worker``: what runs beside or instead of vLLM.

Thin by design: argparse turns flags into the component's pydantic config and hands over. ``sim``
runs the simulated vLLM worker; ``agent`` and ``vllm`` will join as further subcommands.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from workers.sim.config import SimConfig

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
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefix-worker", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("sim", help="run a simulated vLLM worker (no GPU)")
    sim.add_argument("--model", required=True, help="served model name")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8000, help="0 picks a free port")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "sim":
        fields = {"model": args.model, "host": args.host, "port": args.port}
        for dest, _ in [*_SIM_FLAGS.values(), ("cache_output_blocks", bool)]:
            value = getattr(args, dest)
            if value is not None:
                fields[dest] = value
        try:
            config = SimConfig(**fields)
        except ValidationError as exc:
            print(f"prefix-worker sim: invalid configuration:\n{exc}", file=sys.stderr)
            return 2
        from workers.sim.runner import run_sim  # aiohttp import only when serving

        with contextlib.suppress(KeyboardInterrupt):
            run_sim(config)
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    raise SystemExit(main())
