"""The routing YAML: validation with field paths, quick config, example files."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.cli import main
from router.config import ConfigError, load_config, parse_config, quick_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_minimal_config_defaults() -> None:
    config = parse_config(
        {"auth": {"enabled": False}, "pools": {"m": {"workers": [{"url": "http://h:1"}]}}}
    )
    assert config.listen.host == "127.0.0.1" and config.listen.port == 8080
    assert config.pools["m"].policy.name == "hybrid"
    assert config.state.backend == "memory"


def test_auth_must_be_explicit() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"pools": {"m": {"workers": []}}})
    assert ("auth", "Field required") in err.value.problems


def test_errors_name_the_field_path() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "auth": {"enabled": False},
                "pools": {"m": {"workers": [{"url": "ftp://x"}], "polcy": {}}},
            }
        )
    paths = {path for path, _ in err.value.problems}
    assert "pools.m.workers.0.url" in paths
    assert "pools.m.polcy" in paths


def test_unknown_policy_and_duplicate_alias_rejected() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"auth": {"enabled": False}, "pools": {"m": {"policy": {"name": "magic"}}}})
    assert any(path.startswith("pools.m.policy") for path, _ in err.value.problems)
    with pytest.raises(ConfigError):
        parse_config({"auth": {"enabled": False}, "pools": {"a": {"aliases": ["b"]}, "b": {}}})


def test_worker_url_must_be_base_url() -> None:
    with pytest.raises(ConfigError):
        parse_config(
            {"auth": {"enabled": False}, "pools": {"m": {"workers": [{"url": "http://h:1/v1"}]}}}
        )


def test_quick_config_matches_design() -> None:
    config = quick_config("m", ["http://a:1", "http://b:2/"], policy="round_robin")
    assert config.auth.enabled is False
    assert [w.url for w in config.pools["m"].workers] == ["http://a:1", "http://b:2"]
    assert config.pools["m"].policy.name == "round_robin"
    redis = quick_config("m", ["http://a:1"], redis_url="redis://r:6379/0")
    assert redis.state.backend == "redis" and redis.state.cluster is False


def test_serve_redis_cluster_flag_names_the_kind_of_redis() -> None:
    from router.cli import _config_from_serve_args, build_parser

    parser = build_parser()
    quick = ["serve", "--model", "m", "--worker", "http://a:1"]
    args = parser.parse_args([*quick, "--redis", "redis://node:7000/0", "--redis-cluster"])
    config = _config_from_serve_args(args)
    assert config.state.backend == "redis" and config.state.cluster is True
    with pytest.raises(SystemExit, match="--redis-cluster"):
        _config_from_serve_args(parser.parse_args([*quick, "--redis-cluster"]))


ROUTING_YAMLS = sorted(
    p for p in DEPLOY.rglob("*.yaml") if "pools:" in p.read_text() and "kind:" not in p.read_text()
)


@pytest.mark.parametrize("path", ROUTING_YAMLS, ids=lambda p: p.name)
def test_example_configs_are_valid(path: Path) -> None:
    load_config(path)


def test_there_are_example_configs() -> None:
    assert len(ROUTING_YAMLS) >= 2


def test_check_command_prints_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("auth: {enabled: false}\npools:\n  m:\n    workers: [{url: nope}]\n")
    assert main(["check", str(bad)]) == 1
    assert "pools.m.workers.0.url" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("auth: {enabled: false}\npools:\n  m:\n    workers: [{url: 'http://h:1'}]\n")
    assert main(["check", str(good)]) == 0
    not_yaml = tmp_path / "x.yaml"
    not_yaml.write_text("pools: [unclosed")
    assert main(["check", str(not_yaml)]) == 1
