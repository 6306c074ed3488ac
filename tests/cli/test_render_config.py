"""cli.config.render_config: the one way a program writes a config.toml (the demo, the daemon test harness)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdm.errors import ConfigError
from cli.config import render_config
from daemon.config import load_config
from tests.daemon.daemon_harness import DaemonEnv

ODD = 'a "quoted" name\\ with\ttab, DEL \x7f and é'  # every character a TOML basic string must escape or carry


def test_rendered_config_loads_back_to_the_values_given(tmp_path: Path) -> None:
    text = render_config(
        {
            "model": {"sample_size": 8, "block_out_channels": (16, 32)},
            "train": {"lr": 2e-3, "steps": 7},
            "redis": {"namespace": "ns-1"},
            "daemon": {"artifact_dir": tmp_path / ODD, "http_port": 0},
        },
        comment="line one\nline two",
    )
    assert text.startswith("# line one\n# line two\n[model]\n")
    path = tmp_path / "config.toml"
    path.write_text(text)
    cfg = load_config(path, environ={})
    assert cfg.library.model.sample_size == 8 and tuple(cfg.library.model.block_out_channels) == (16, 32)
    assert cfg.library.train.lr == 2e-3 and cfg.library.train.steps == 7
    assert cfg.redis.namespace == "ns-1"
    assert Path(cfg.daemon.artifact_dir) == tmp_path / ODD and cfg.daemon.http_port == 0


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"trian": {"steps": 1}}, "unknown section"),
        ({"train": {"stpes": 1}}, "stpes"),
        ({"train": {"steps": -1}}, "train.steps"),
        ({"train": {"lr": float("nan")}}, "train.lr = nan: config values must be finite"),
        ({"train": {"steps": None}}, "train.steps = None: a config value is"),
    ],
)
def test_a_wrong_config_fails_when_rendered(doc: dict[str, dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        render_config(doc)


def test_the_daemon_harness_writes_a_config_the_daemon_accepts(tmp_path: Path) -> None:
    env = DaemonEnv(tmp_path, "redis://127.0.0.1:1/0", "127.0.0.1:2", prefix="t1", namespace="ns1", lock_ttl_s=3.0)
    cfg = load_config(env.write_config(daemon_id="r1"), environ={})
    assert cfg.kafka.sources_topic == "t1.sources" and cfg.kafka.group_id == "t1.group"
    assert cfg.daemon.daemon_id == "r1" and cfg.daemon.lock_ttl_s == 3.0
    assert Path(cfg.daemon.spool_dir) == tmp_path / "spool-0" and cfg.redis.namespace == "ns1"
