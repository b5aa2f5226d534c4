"""``prefix-worker vllm``: run ``vllm serve`` with the flags the router needs, plus the agent.

Routing by prefix only works when the worker caches prefixes, reports cached tokens, publishes
its KV events and hashes blocks the way the gateway does, so this module renders those flags
(``render_vllm_command``) instead of leaving every operator to remember them: prefix caching on,
``--enable-prompt-tokens-details``, ``--kv-events-config`` (ZMQ PUB and replay ports),
``--prefix-caching-hash-algo sha256_cbor``, and ``PYTHONHASHSEED`` fixed in the child's
environment (``reference/vllm-interface.md`` §2.2: vLLM before 0.29 draws a random root hash per
process otherwise). For a P/D pool's worker (``--pd``) it adds NixlConnector's
``--kv-transfer-config`` and side-channel environment, and for LoRA ``--enable-lora``,
``--lora-modules``, ``--max-loras`` and, with ``--dynamic-lora``, the environment variable that
opens vLLM's runtime adapter loading. Anything the user passes after ``--`` is kept and wins
over a rendered flag of the same name, with a warning. ``render_agent_command`` builds the
agent's command line from the same options (and from the user's overrides, so the agent talks to
the port vLLM really uses). ``supervise`` (``workers.supervise``) runs both. Both renderers are
pure, so tests check the command lines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import socket
import sys
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from workers.supervise import supervise

log = logging.getLogger(__name__)

# What vLLM assumes for the keys a user's --kv-events-config leaves out (reference §1.1).
_VLLM_KV_EVENTS_DEFAULTS: dict[str, object] = {
    "endpoint": "tcp://*:5557",
    "replay_endpoint": None,
    "topic": "",
}
HASH_ALGO = "sha256_cbor"  # portable across languages, and what the gateway's precise mode uses
KV_EVENTS_TOPIC = "kv-events"


class LaunchOptions(BaseModel):
    """What ``prefix-worker vllm`` was told, before the user's own vLLM arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = Field(default=8000, ge=1, le=65535)
    model: str | None = Field(default=None, description="vllm serve's positional model")
    agent_redis: str | None = Field(default=None, description="start the agent, publishing here")
    agent_redis_cluster: bool = Field(default=False, description="agent_redis is a Redis Cluster")
    agent_worker_id: str | None = Field(default=None, description="default: <hostname>-<port>")
    kv_events_port: int = Field(default=5557, ge=1, le=65535)
    replay_port: int = Field(default=5558, ge=1, le=65535)
    # Python itself accepts only these values for PYTHONHASHSEED (besides "random").
    hash_seed: int = Field(default=0, ge=0, le=4294967295)
    vllm_executable: str = Field(default="vllm", description="command prefix, split like a shell")
    agent_executable: str | None = Field(
        default=None, description="command prefix of prefix-worker; default: this interpreter"
    )
    stop_timeout_s: float = Field(default=30.0, gt=0, description="grace before SIGKILL")
    # P/D disaggregation: NixlConnector on every worker (the gateway decides who prefills).
    pd: bool = Field(default=False, description="render --kv-transfer-config for NixlConnector")
    nixl_host: str | None = Field(default=None, description="VLLM_NIXL_SIDE_CHANNEL_HOST")
    nixl_port: int = Field(default=5600, ge=1, le=65535, description="its side-channel port")
    # LoRA: adapters served from the start, GPU slots, and loading at run time.
    lora_modules: tuple[str, ...] = Field(default=(), description="NAME=PATH, as vLLM's flag")
    max_loras: int | None = Field(default=None, ge=1)
    dynamic_lora: bool = Field(
        default=False, description="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (the gateway loads)"
    )

    @model_validator(mode="after")
    def _distinct_ports(self) -> LaunchOptions:
        if len({self.port, self.kv_events_port, self.replay_port}) < 3:
            raise ValueError("--port, --kv-events-port and --replay-port must differ")
        return self


# -- the user's arguments ------------------------------------------------------------------------


def _flag_name(token: str) -> str | None:
    """``--Foo_bar.x=1`` -> ``foo-bar``: vLLM accepts underscores and dotted sub-keys."""
    if not token.startswith("--") or token == "--":
        return None
    return token[2:].split("=", 1)[0].split(".", 1)[0].replace("_", "-")


def _user_value(user_args: Sequence[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in the user's arguments (last wins)."""
    value: str | None = None
    for i, token in enumerate(user_args):
        if _flag_name(token) != name or "." in token.split("=", 1)[0]:
            continue
        if "=" in token:
            value = token.split("=", 1)[1]
        elif i + 1 < len(user_args):
            value = user_args[i + 1]
    return value


def _user_flags(user_args: Sequence[str]) -> set[str]:
    names = {_flag_name(t) for t in user_args}
    names.discard(None)
    return {n for n in names if n is not None}


def _user_model(user_args: Sequence[str]) -> str | None:
    if user_args and not user_args[0].startswith("-"):
        return user_args[0]  # vllm serve MODEL ...
    return _user_value(user_args, "model")


# -- rendering -------------------------------------------------------------------------------


def kv_events_config(options: LaunchOptions) -> dict[str, object]:
    return {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{options.kv_events_port}",
        "replay_endpoint": f"tcp://*:{options.replay_port}",
        "topic": KV_EVENTS_TOPIC,
    }


def render_vllm_command(
    options: LaunchOptions, user_args: Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    """``vllm serve`` argv and the environment variables to add for it.

    Raises ``ValueError`` when no model is named anywhere.
    """
    user_args = list(user_args)
    given = _user_flags(user_args)
    argv = [*shlex.split(options.vllm_executable), "serve"]
    user_model = _user_model(user_args)
    if user_args and not user_args[0].startswith("-"):
        argv.append(user_args.pop(0))  # keep the positional model right after "serve"
    if options.model is not None:
        if user_model is None:
            argv.append(options.model)
        elif user_model != options.model:
            log.warning("model %r after -- overrides --model %r", user_model, options.model)
    elif user_model is None and "config" not in given:
        raise ValueError("no model: pass --model NAME, or put the model first after --")

    rendered: list[tuple[str, list[str]]] = [
        ("port", ["--port", str(options.port)]),
        ("enable-prefix-caching", ["--enable-prefix-caching"]),
        ("enable-prompt-tokens-details", ["--enable-prompt-tokens-details"]),
        (
            "kv-events-config",
            ["--kv-events-config", json.dumps(kv_events_config(options), separators=(",", ":"))],
        ),
        ("prefix-caching-hash-algo", ["--prefix-caching-hash-algo", HASH_ALGO]),
        *_pd_and_lora_flags(options),
    ]
    for name, args in rendered:
        if name in given and len(args) == 1:
            pass  # the user asked for the same switch: nothing to warn about
        elif name in given:
            log.warning("--%s after -- overrides the launcher's %s", name, " ".join(args))
        elif f"no-{name}" in given:
            log.warning("--no-%s after -- wins: the router cannot see this worker's cache", name)
        else:
            argv.extend(args)
    argv.extend(user_args)
    _warn_dp_port_clash(options, user_args)
    env = {"PYTHONHASHSEED": str(options.hash_seed)}
    if options.pd:
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(options.nixl_port)
        if options.nixl_host is not None:
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = options.nixl_host
    if options.dynamic_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return argv, env


# The connector every P/D worker runs (reference: vllm-pd-lora-continuation §1.1). The failure
# policy is pinned: its default changed between releases, and the gateway restarts a request
# whose decode could not read the KV rather than letting a decode worker recompute it silently.
NIXL_TRANSFER_CONFIG = {
    "kv_connector": "NixlConnector",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "fail",
}


def _pd_and_lora_flags(options: LaunchOptions) -> list[tuple[str, list[str]]]:
    flags: list[tuple[str, list[str]]] = []
    if options.pd:
        config = json.dumps(NIXL_TRANSFER_CONFIG, separators=(",", ":"))
        flags.append(("kv-transfer-config", ["--kv-transfer-config", config]))
    if options.lora_modules or options.dynamic_lora or options.max_loras is not None:
        flags.append(("enable-lora", ["--enable-lora"]))
    if options.lora_modules:
        flags.append(("lora-modules", ["--lora-modules", *options.lora_modules]))
    if options.max_loras is not None:
        flags.append(("max-loras", ["--max-loras", str(options.max_loras)]))
    return flags


def _warn_dp_port_clash(options: LaunchOptions, user_args: Sequence[str]) -> None:
    # vLLM offsets every DP rank's event ports by its rank (reference §1.2), so rank r publishes on
    # kv_events_port + r: with adjacent ports rank 1's PUB socket lands on rank 0's replay port.
    raw = _user_value(user_args, "data-parallel-size")
    if raw is None and "-dp" in user_args[:-1]:
        raw = user_args[user_args.index("-dp") + 1]
    try:
        ranks = int(raw) if raw is not None else 1
    except ValueError:
        return
    if options.kv_events_port < options.replay_port < options.kv_events_port + ranks:
        log.warning(
            "with %d data-parallel ranks the KV event ports %d.. collide with --replay-port %d",
            ranks,
            options.kv_events_port,
            options.replay_port,
        )


def _local_endpoint(endpoint: str) -> str:
    """A bind address as vLLM takes it (``tcp://*:5557``) -> where a local agent connects."""
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint[len("tcp://") :].rpartition(":")
        if sep and host in ("*", "0.0.0.0", "[::]", "::"):
            return f"tcp://127.0.0.1:{port}"
    return endpoint


def _user_kv_events(user_args: Sequence[str]) -> dict[str, object] | None:
    """The KV events config vLLM ends up with when the user set it; None if they did not."""
    if "kv-events-config" not in _user_flags(user_args):
        return None
    events: dict[str, object] = dict(_VLLM_KV_EVENTS_DEFAULTS)  # the user's replaces ours whole
    raw = _user_value(user_args, "kv-events-config")
    if raw is not None:
        try:
            events.update(json.loads(raw))
        except (ValueError, TypeError):
            log.warning("cannot read --kv-events-config after --; the agent assumes defaults")
    for i, token in enumerate(user_args):  # dotted form: --kv-events-config.endpoint X
        key, _, value = token.partition("=")
        if key.startswith("--kv-events-config.") and key.count(".") == 1:
            if not value and i + 1 < len(user_args):
                value = user_args[i + 1]
            events[key.split(".", 1)[1].replace("-", "_")] = value
    return events


def render_agent_command(options: LaunchOptions, user_args: Sequence[str]) -> list[str]:
    """The agent's argv, following the user's overrides of vLLM's port and event endpoints."""
    if options.agent_redis is None:
        raise ValueError("the agent needs --agent-redis")
    port = _user_value(user_args, "port") or str(options.port)
    events = _user_kv_events(user_args) or kv_events_config(options)
    prefix = (
        shlex.split(options.agent_executable)
        if options.agent_executable is not None
        else [sys.executable, "-m", "workers"]  # the same install as this launcher
    )
    argv = [
        *prefix,
        "agent",
        "--vllm-url",
        f"http://127.0.0.1:{port}",
        "--kv-events",
        _local_endpoint(str(events.get("endpoint", f"tcp://*:{options.kv_events_port}"))),
        "--redis",
        options.agent_redis,
        "--worker-id",
        options.agent_worker_id or f"{socket.gethostname()}-{port}",
    ]
    if options.agent_redis_cluster:
        argv.append("--redis-cluster")
    if events.get("replay_endpoint"):
        argv += ["--replay", _local_endpoint(str(events["replay_endpoint"]))]
    if events.get("topic"):
        argv += ["--topic", str(events["topic"])]
    model = options.model or _user_model(user_args)
    if model is not None:
        argv += ["--model", model]
    return argv


# -- command line ------------------------------------------------------------------------------


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``[own flags] -- [vllm serve flags]`` at the first ``--``."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def add_vllm_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = commands.add_parser(
        "vllm",
        help="run vllm serve with the router's flags (and the agent): vllm ... -- <serve args>",
    )
    cmd.add_argument("--port", type=int, default=8000)
    cmd.add_argument("--model", default=None, help="model to serve (or first after --)")
    cmd.add_argument("--agent-redis", default=None, help="start the agent, publishing here")
    cmd.add_argument(
        "--agent-redis-cluster", action="store_true", help="--agent-redis is a Redis Cluster node"
    )
    cmd.add_argument("--agent-worker-id", default=None)
    cmd.add_argument("--kv-events-port", type=int, default=5557)
    cmd.add_argument("--replay-port", type=int, default=5558)
    cmd.add_argument("--hash-seed", type=int, default=0, help="PYTHONHASHSEED of vllm")
    cmd.add_argument("--vllm-executable", default="vllm", help="command to run vllm")
    cmd.add_argument("--agent-executable", default=None, help="command to run prefix-worker")
    cmd.add_argument("--stop-timeout-s", type=float, default=30.0)
    cmd.add_argument("--pd", action="store_true", help="NixlConnector for a P/D pool's worker")
    cmd.add_argument("--nixl-host", default=None, help="address decode workers reach it at")
    cmd.add_argument("--nixl-port", type=int, default=5600)
    cmd.add_argument("--lora-modules", nargs="+", default=(), metavar="NAME=PATH")
    cmd.add_argument("--max-loras", type=int, default=None)
    cmd.add_argument(
        "--dynamic-lora", action="store_true", help="let the gateway load adapters at run time"
    )
    cmd.add_argument("--dry-run", action="store_true", help="print the command lines and exit")


def run_vllm_command(args: argparse.Namespace, user_args: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="prefix-worker vllm: %(message)s")
    try:
        options = LaunchOptions(
            port=args.port,
            model=args.model,
            agent_redis=args.agent_redis,
            agent_redis_cluster=args.agent_redis_cluster,
            agent_worker_id=args.agent_worker_id,
            kv_events_port=args.kv_events_port,
            replay_port=args.replay_port,
            hash_seed=args.hash_seed,
            vllm_executable=args.vllm_executable,
            agent_executable=args.agent_executable,
            stop_timeout_s=args.stop_timeout_s,
            pd=args.pd,
            nixl_host=args.nixl_host,
            nixl_port=args.nixl_port,
            lora_modules=tuple(args.lora_modules),
            max_loras=args.max_loras,
            dynamic_lora=args.dynamic_lora,
        )
        vllm_argv, env = render_vllm_command(options, user_args)
        agent_argv = (
            render_agent_command(options, user_args) if options.agent_redis is not None else None
        )
    except (ValidationError, ValueError) as exc:
        print(f"prefix-worker vllm: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        env_prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        print(f"{env_prefix} {shlex.join(vllm_argv)}")
        if agent_argv is not None:
            print(shlex.join(agent_argv))
        return 0
    return supervise(vllm_argv, env, agent_argv, options.stop_timeout_s)
