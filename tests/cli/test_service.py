"""Service commands of the CLI that need only Redis: ``cdm ls`` over the registry named by the config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import redis

from cli import main
from registry.keys import Keys
from registry.writer import Registry


def test_ls_reads_the_registry_of_its_config(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    redis_client: redis.Redis,
    redis_db_url: str,
    redis_namespace: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./config.toml, no .services/services.json: only --config counts
    reg = Registry(redis_client, Keys(redis_namespace))
    rec = reg.begin_training("shoes", "fp", {})
    reg.activate(
        rec.compartment_id, artifact_uri="/a", sha256={}, prior=1.0, class_counts=[1], n_samples=1, train_metrics={}
    )
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[redis]\nurl = "{redis_db_url}"\nnamespace = "{redis_namespace}"\n')
    assert main(["--config", str(cfg), "ls", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["epoch"] == 1 and [c["compartment_id"] for c in doc["compartments"]] == ["shoes@v1"]
    assert doc["compartments"][0]["status"] == "active"
    other = tmp_path / "other.toml"
    other.write_text(f'[redis]\nurl = "{redis_db_url}"\nnamespace = "{redis_namespace}-other"\n')
    assert main(["--config", str(other), "ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compartments"] == []


def test_every_listed_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("split", "train", "sample", "forget", "evaluate", "ls", "daemon", "push", "control", "services"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: cdm {command}" in capsys.readouterr().out


def test_config_is_accepted_after_the_command_too(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    redis_client: redis.Redis,
    redis_db_url: str,
    redis_namespace: str,
) -> None:
    """`cdm ls --config f.toml` (how deploy/ runs `cdm daemon --config ...`); after the command wins over before it;
    CDM_<SECTION>__<KEY> overrides the file."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("CDM_") and "__" in n]:
        monkeypatch.delenv(name)
    reg = Registry(redis_client, Keys(redis_namespace))
    rec = reg.begin_training("shoes", "fp", {})
    reg.activate(
        rec.compartment_id, artifact_uri="/a", sha256={}, prior=1.0, class_counts=[1], n_samples=1, train_metrics={}
    )
    right = tmp_path / "right.toml"
    right.write_text(f'[redis]\nurl = "{redis_db_url}"\nnamespace = "{redis_namespace}"\n')
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(f'[redis]\nurl = "{redis_db_url}"\nnamespace = "{redis_namespace}-wrong"\n')

    def epoch(argv: list[str]) -> int:
        assert main(argv) == 0
        return int(json.loads(capsys.readouterr().out)["epoch"])

    assert epoch(["ls", "--config", str(right), "--json"]) == 1
    assert epoch(["--config", str(wrong), "ls", "--config", str(right), "--json"]) == 1
    assert epoch(["--config", str(right), "ls", "--json"]) == 1
    assert epoch(["ls", "--config", str(wrong), "--json"]) == 0
    monkeypatch.setenv("CDM_REDIS__NAMESPACE", redis_namespace)
    assert epoch(["ls", "--config", str(wrong), "--json"]) == 1  # the environment overrides the file


def test_daemon_accepts_config_after_the_command_and_reports_a_bad_file_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = -5\n")
    assert main(["daemon", "--config", str(bad)]) == 2
    assert "train.steps = -5 (from bad.toml) must be >= 1" in capsys.readouterr().err


def test_a_redis_password_never_reaches_the_output_of_a_failing_daemon(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The registry cannot be reached: the error names the URL without its password, in stderr and in the logs."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[redis]\nurl = "redis://cdm:url-hunter2@127.0.0.1:{port}/0"\nsocket_connect_timeout_s = 1\n'
        f'[daemon]\nhttp_port = 0\nspool_dir = "{tmp_path}/spool"\nartifact_dir = "{tmp_path}/artifacts"\n'
    )
    monkeypatch.setenv("CDM_REDIS__PASSWORD", "env-hunter2")
    caplog.set_level("DEBUG")
    assert main(["daemon", "--config", str(cfg), "--log-level", "DEBUG"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the registry's Redis at redis://cdm:***@127.0.0.1:{port}/0" in err
    assert "hunter2" not in err and "hunter2" not in caplog.text


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_missing_service_is_one_line_with_the_address_and_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    redis_port, kafka_port = _closed_port(), _closed_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[redis]\nurl = "redis://127.0.0.1:{redis_port}/0"\n[kafka]\nbootstrap_servers = "127.0.0.1:{kafka_port}"\n'
    )
    assert main(["--config", str(cfg), "ls"]) == 2
    err = capsys.readouterr().err
    assert f"cdm ls: error: cannot reach Redis (Error 111 connecting to 127.0.0.1:{redis_port}" in err
    assert "cdm services start" in err and "CDM_REDIS__URL" in err and "Traceback" not in err
    assert err.count("\n") == 1
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, np.int64))
    assert main(["--config", str(cfg), "push", "--source", "d", str(tmp_path / "d.npz")]) == 2
    err = capsys.readouterr().err
    assert f"cdm push: error: cannot reach the Kafka broker at 127.0.0.1:{kafka_port}" in err
    assert "bootstrap_servers" in err and "Traceback" not in err and err.count("\n") == 1
