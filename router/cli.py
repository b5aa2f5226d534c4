"""`prefix-router serve|demo|check|bench`: thin argparse over the modules that do the work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from router.bench import BENCHMARKS
from router.config import POLICY_NAMES, ConfigError, GatewayConfig, load_config, quick_config
from router.logs import setup_logging


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", help="routing YAML")
    p.add_argument("--model", help="served model name (quick start without a file)")
    p.add_argument("--worker", action="append", default=[], help="worker base URL (repeat)")
    p.add_argument("--policy", choices=POLICY_NAMES, default="hybrid")
    p.add_argument("--host", default=None, help="listen host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port (default 8080)")
    p.add_argument("--redis", default=None, help="Redis URL to share state between replicas")
    p.add_argument(
        "--redis-cluster",
        action="store_true",
        help="--redis names one node of a Redis Cluster (state.cluster: true)",
    )
    p.add_argument("--api-key-hash", default=None, help="SHA-256 hex of the one accepted key")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefix-router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    demo = sub.add_parser("demo", help="gateway + 4 simulated workers, no GPU, no Redis")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--workers", type=int, default=4)
    check = sub.add_parser("check", help="validate a routing YAML")
    check.add_argument("file")
    keys = sub.add_parser("keys", help="API keys: `new` prints a key and its hash")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_sub.add_parser("new", help="print a new key and the SHA-256 the YAML stores")
    key_hash = keys_sub.add_parser("hash", help="print the SHA-256 of KEY (- reads stdin)")
    key_hash.add_argument("key")
    bench = sub.add_parser(
        "bench",
        help="benchmarks: " + ", ".join(BENCHMARKS),
    )
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options of that benchmark")
    return parser


def _config_from_serve_args(args: argparse.Namespace) -> GatewayConfig:
    if args.config:
        if args.model or args.worker:
            raise SystemExit("give either --config or --model/--worker, not both")
        config = load_config(args.config)
        listen = config.listen.model_copy(
            update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        )
        return config.model_copy(update={"listen": listen})
    if not args.model or not args.worker:
        raise SystemExit("serve needs --config FILE, or --model NAME and at least one --worker URL")
    if args.redis_cluster and not args.redis:
        raise SystemExit("--redis-cluster names the kind of the --redis URL: give both")
    return quick_config(
        args.model,
        args.worker,
        policy=args.policy,
        host=args.host or "127.0.0.1",
        port=args.port if args.port is not None else 8080,
        redis_url=args.redis,
        redis_cluster=args.redis_cluster,
        api_key_hash=args.api_key_hash,
    )


def _print_problems(source: str, exc: ConfigError) -> None:
    for path, message in exc.problems:
        print(f"{source}: {path}: {message}", file=sys.stderr)


def _keys(args: argparse.Namespace) -> int:
    from router.auth import hash_key, new_key

    if args.keys_command == "new":
        key = new_key()
        print(f"key:    {key}")
        print(f"sha256: {hash_key(key)}")
        return 0
    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    if not key:
        print("no key given", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        try:
            config = load_config(args.file)
        except ConfigError as exc:
            _print_problems(args.file, exc)
            return 1
        workers = sum(len(p.workers) for p in config.pools.values())
        print(f"{args.file}: ok ({len(config.pools)} pools, {workers} static workers)")
        return 0
    if args.command == "serve":
        try:
            config = _config_from_serve_args(args)
        except ConfigError as exc:
            _print_problems(args.config or "arguments", exc)
            return 1
        setup_logging(config.log_level)
        from router.serve import run

        run(config, args.config)
        return 0
    if args.command == "demo":
        setup_logging("info")
        from router.demo import run_demo

        return run_demo(port=args.port, workers=args.workers)
    if args.command == "keys":
        return _keys(args)
    if args.command == "bench":
        from router.bench import run_bench

        return run_bench(args.name, args.args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
