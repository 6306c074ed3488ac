"""Service commands of the CLI that need only Redis: ``cdm ls`` over the registry named by the config."""

from __future__ import annotations

import json
from pathlib import Path

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
