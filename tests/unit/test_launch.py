"""``prefix-worker vllm``: the rendered command lines, and the supervision of its children.

vLLM cannot run here (no GPU, and the ``vllm`` extra is never installed), so the rendering is
checked as pure functions and through ``--dry-run``, and the supervision runs the real launcher
against ``fake_vllm.py``, a stand-in that records its argv and waits for a signal.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from workers.cli import main
from workers.launch import LaunchOptions, render_agent_command, render_vllm_command

STAND_IN = Path(__file__).with_name("fake_vllm.py")
EXPECTED_EVENTS = {
    "enable_kv_cache_events": True,
    "publisher": "zmq",
    "endpoint": "tcp://*:5557",
    "replay_endpoint": "tcp://*:5558",
    "topic": "kv-events",
}


def flag_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, (flag, argv)
    return argv[argv.index(flag) + 1]


def test_renders_the_router_flags() -> None:
    argv, env = render_vllm_command(LaunchOptions(model="m"), [])
    assert argv[:3] == ["vllm", "serve", "m"]
    assert flag_value(argv, "--port") == "8000"
    assert argv.count("--enable-prefix-caching") == 1
    assert argv.count("--enable-prompt-tokens-details") == 1
    assert json.loads(flag_value(argv, "--kv-events-config")) == EXPECTED_EVENTS
    assert flag_value(argv, "--prefix-caching-hash-algo") == "sha256_cbor"
    assert env == {"PYTHONHASHSEED": "0"}


def test_options_set_ports_and_seed() -> None:
    options = LaunchOptions(
        model="m", port=9001, kv_events_port=6000, replay_port=6010, hash_seed=42
    )
    argv, env = render_vllm_command(options, ["--max-model-len", "4096"])
    assert flag_value(argv, "--port") == "9001"
    events = json.loads(flag_value(argv, "--kv-events-config"))
    assert events["endpoint"] == "tcp://*:6000" and events["replay_endpoint"] == "tcp://*:6010"
    assert argv[-2:] == ["--max-model-len", "4096"]  # the user's arguments are kept, in order
    assert env == {"PYTHONHASHSEED": "42"}


def test_user_flags_win_without_duplicates(caplog: pytest.LogCaptureFixture) -> None:
    user_events = {"enable_kv_cache_events": True, "endpoint": "tcp://*:7000", "topic": "t"}
    user = [
        "--port",
        "9000",
        "--prefix-caching-hash-algo=sha256",
        "--kv-events-config",
        json.dumps(user_events),
        "--no-enable-prefix-caching",
        "--enable_prompt_tokens_details",  # vLLM takes underscores too
    ]
    with caplog.at_level(logging.WARNING, logger="workers.launch"):
        argv, _ = render_vllm_command(LaunchOptions(model="m"), user)
    assert argv == ["vllm", "serve", "m", *user]  # nothing of ours left to add
    warned = caplog.text
    for flag in ("--port", "--prefix-caching-hash-algo", "--kv-events-config"):
        assert f"{flag} after -- overrides" in warned
    assert "--no-enable-prefix-caching after -- wins" in warned

    agent = render_agent_command(
        LaunchOptions(model="m", agent_redis="redis://r:6379", agent_worker_id="w"), user
    )
    # The agent follows vLLM's real port and event endpoint, not the launcher's defaults.
    assert flag_value(agent, "--vllm-url") == "http://127.0.0.1:9000"
    assert flag_value(agent, "--kv-events") == "tcp://127.0.0.1:7000"
    assert flag_value(agent, "--topic") == "t"
    assert "--replay" not in agent


def test_dotted_kv_events_flag_counts_as_given() -> None:
    user = [
        "--kv-events-config.enable_kv_cache_events=true",
        "--kv-events-config.endpoint",
        "ipc:///e",
    ]
    argv, _ = render_vllm_command(LaunchOptions(model="m"), user)
    assert "--kv-events-config" not in argv
    agent = render_agent_command(LaunchOptions(model="m", agent_redis="redis://r"), user)
    assert flag_value(agent, "--kv-events") == "ipc:///e"


def test_model_from_the_user_arguments() -> None:
    argv, _ = render_vllm_command(LaunchOptions(), ["org/model", "--tensor-parallel-size", "2"])
    assert argv[:3] == ["vllm", "serve", "org/model"]
    assert argv[-2:] == ["--tensor-parallel-size", "2"] and argv.count("org/model") == 1
    with pytest.raises(ValueError, match="no model"):
        render_vllm_command(LaunchOptions(), ["--tensor-parallel-size", "2"])


def test_agent_command() -> None:
    options = LaunchOptions(model="m", port=8100, agent_redis="redis://h:6379/0")
    agent = render_agent_command(options, [])
    assert agent[:4] == [sys.executable, "-m", "workers", "agent"]
    assert flag_value(agent, "--vllm-url") == "http://127.0.0.1:8100"
    assert flag_value(agent, "--kv-events") == "tcp://127.0.0.1:5557"
    assert flag_value(agent, "--replay") == "tcp://127.0.0.1:5558"
    assert flag_value(agent, "--redis") == "redis://h:6379/0"
    assert flag_value(agent, "--worker-id").endswith("-8100")
    assert flag_value(agent, "--model") == "m"
    assert "--redis-cluster" not in agent
    cluster = LaunchOptions(model="m", agent_redis="redis://node:7000/0", agent_redis_cluster=True)
    assert "--redis-cluster" in render_agent_command(cluster, [])
    with pytest.raises(ValueError):
        render_agent_command(LaunchOptions(model="m"), [])


def test_dry_run_prints_both_command_lines(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "vllm",
            "--model",
            "m",
            "--hash-seed",
            "7",
            "--agent-redis",
            "redis://h:6379",
            "--agent-worker-id",
            "w1",
            "--dry-run",
            "--",
            "--max-model-len",
            "4096",
        ]
    )
    assert code == 0
    vllm_line, agent_line = capsys.readouterr().out.strip().splitlines()
    vllm_argv = shlex.split(vllm_line)
    assert vllm_argv[:4] == ["PYTHONHASHSEED=7", "vllm", "serve", "m"]
    assert json.loads(flag_value(vllm_argv, "--kv-events-config")) == EXPECTED_EVENTS
    assert vllm_argv[-2:] == ["--max-model-len", "4096"]
    agent_argv = shlex.split(agent_line)
    assert agent_argv[3] == "agent" and flag_value(agent_argv, "--worker-id") == "w1"


def test_dry_run_without_agent_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vllm", "--model", "m", "--dry-run"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert main(["vllm", "--model", "m", "--replay-port", "8000", "--dry-run"]) == 2
    assert main(["vllm", "--dry-run"]) == 2  # no model anywhere
    with pytest.raises(SystemExit):
        main(["sim", "--model", "m", "--", "--port", "1"])  # "--" belongs to vllm only


# -- supervision, with a stand-in for vllm ---------------------------------------------------


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], deadline_s: float = 30.0) -> Any:
    end = time.monotonic() + deadline_s
    while not path.exists():
        assert proc.poll() is None, f"launcher exited early with {proc.returncode}"
        assert time.monotonic() < end, f"{path.name} did not appear before the deadline"
        time.sleep(0.02)
    return json.loads(path.read_text())


def start_launcher(tmp_path: Path, serve_exit: int) -> subprocess.Popen[bytes]:
    stand_in = f"{shlex.quote(sys.executable)} {shlex.quote(str(STAND_IN))}"
    argv = [
        *(sys.executable, "-m", "workers", "vllm", "--model", "m", "--hash-seed", "5"),
        *("--vllm-executable", stand_in, "--agent-executable", stand_in),
        *("--agent-redis", "redis://127.0.0.1:1", "--agent-worker-id", "w1"),
        *("--stop-timeout-s", "60", "--", "--max-model-len", "128"),
    ]
    env = {**os.environ, "STAND_IN_DIR": str(tmp_path), "STAND_IN_EXIT_SERVE": str(serve_exit)}
    return subprocess.Popen(argv, env=env)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_reach_both_children_and_vllm_exit_code_propagates(
    tmp_path: Path, sig: signal.Signals
) -> None:
    launcher = start_launcher(tmp_path, serve_exit=3)
    try:
        serve = wait_for_file(tmp_path / "serve.json", launcher)
        agent = wait_for_file(tmp_path / "agent.json", launcher)
        assert serve["hashseed"] == "5"
        assert "--enable-prefix-caching" in serve["argv"] and serve["argv"][-1] == "128"
        assert agent["argv"][0] == "agent" and "--worker-id" in agent["argv"]
        launcher.send_signal(sig)
        assert launcher.wait(timeout=60) == 3  # vLLM's exit code, not the launcher's own
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert json.loads((tmp_path / "serve.exit.json").read_text())["signal"] == sig.name
    assert json.loads((tmp_path / "agent.exit.json").read_text())["signal"] == sig.name


def test_launcher_exits_when_vllm_exits_and_stops_the_agent(tmp_path: Path) -> None:
    launcher = start_launcher(tmp_path, serve_exit=7)
    try:
        serve = wait_for_file(tmp_path / "serve.json", launcher)
        wait_for_file(tmp_path / "agent.json", launcher)
        os.kill(serve["pid"], signal.SIGTERM)  # vLLM goes away on its own
        assert launcher.wait(timeout=60) == 7
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert json.loads((tmp_path / "agent.exit.json").read_text())["signal"] == "SIGTERM"


def test_pd_and_lora_flags_are_rendered() -> None:
    options = LaunchOptions(
        model="m",
        pd=True,
        nixl_host="10.0.0.7",
        lora_modules=("sql=/adapters/sql", "chat=/adapters/chat"),
        max_loras=4,
        dynamic_lora=True,
    )
    argv, env = render_vllm_command(options, [])
    assert json.loads(flag_value(argv, "--kv-transfer-config")) == {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "fail",
    }
    assert argv.count("--enable-lora") == 1 and flag_value(argv, "--max-loras") == "4"
    start = argv.index("--lora-modules")
    assert argv[start + 1 : start + 3] == ["sql=/adapters/sql", "chat=/adapters/chat"]
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.7"
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5600"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    plain_argv, plain_env = render_vllm_command(LaunchOptions(model="m"), [])
    assert "--kv-transfer-config" not in plain_argv and "--enable-lora" not in plain_argv
    assert set(plain_env) == {"PYTHONHASHSEED"}
