"""``cdm token`` and ``cdm acl`` against the real test Redis: tokens shown once and stored hashed, grants by name
and tag, source tags, and what `cdm serve` then allows (read through the same registry module)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import redis

from cli import main
from registry.acl import AccessRegistry, Grant, allowed_sources, hash_token
from registry.keys import Keys


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_db_url: str, redis_namespace: str) -> list[str]:
    monkeypatch.chdir(tmp_path)  # no ./config.toml, no .services: only --config counts
    path = tmp_path / "c.toml"
    path.write_text(f'[redis]\nurl = "{redis_db_url}"\nnamespace = "{redis_namespace}"\n')
    return ["--config", str(path)]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_tokens_are_shown_once_stored_hashed_and_revocable(
    cfg: list[str], capsys: pytest.CaptureFixture[str], redis_client: redis.Redis, redis_namespace: str
) -> None:
    created = run(capsys, *cfg, "token", "create", "alice", "--label", "laptop")
    token = created["token"]
    assert token.startswith("cdm_") and len(token) == 47 and created["principal"] == "alice"
    access = AccessRegistry(redis_client, Keys(redis_namespace))
    record = access.resolve_token(token)
    assert record is not None and record.principal == "alice" and record.label == "laptop"
    # only the sha256 is in Redis: the token text appears in no key and no value
    dump = b"".join(
        k + b"".join(redis_client.hgetall(k).values()) if redis_client.type(k) == b"hash" else k
        for k in redis_client.keys("*")
    )
    assert token.encode() not in dump and hashlib.sha256(token.encode()).hexdigest().encode() in dump
    assert hash_token(token) == record.sha256
    listed = run(capsys, *cfg, "token", "ls")
    assert [t["token_id"] for t in listed["tokens"]] == [created["token_id"]] and token not in json.dumps(listed)
    # the plain output prints the token on its own first line, with how to use and revoke it
    assert main([*cfg, "token", "create", "bob"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cdm_") and "shown only now" in lines[1] and "cdm token revoke" in lines[2]
    run(capsys, *cfg, "token", "revoke", created["token_id"])
    assert access.resolve_token(token) is None
    assert main([*cfg, "token", "revoke", created["token_id"]]) == 2
    assert "no token with id" in capsys.readouterr().err
    # look-alikes never resolve
    assert access.resolve_token("cdm_" + "A" * 43) is None and access.resolve_token(token[:-1]) is None


def test_grants_by_name_and_tag_and_source_tags(
    cfg: list[str], capsys: pytest.CaptureFixture[str], redis_client: redis.Redis, redis_namespace: str
) -> None:
    run(capsys, *cfg, "acl", "tag", "shoes", "license=cc-by", "tenant=acme")
    run(capsys, *cfg, "acl", "tag", "bags", "license=proprietary")
    doc = run(capsys, *cfg, "acl", "grant", "alice", "--tag", "license=cc-by", "--source", "hats")
    assert doc["grants"] == ["source:hats", "tag:license=cc-by"]
    run(capsys, *cfg, "acl", "grant", "root", "--all")
    run(capsys, *cfg, "token", "create", "alice")
    listing = run(capsys, *cfg, "acl", "ls")
    by_name = {p["principal"]: p for p in listing["principals"]}
    assert by_name["alice"]["grants"] == ["source:hats", "tag:license=cc-by"] and len(by_name["alice"]["tokens"]) == 1
    assert by_name["root"]["grants"] == ["all"]
    assert {s["source"]: s["tags"] for s in listing["sources"]} == {
        "bags": {"license": "proprietary"},
        "shoes": {"license": "cc-by", "tenant": "acme"},
    }
    access = AccessRegistry(redis_client, Keys(redis_namespace))
    candidates = ["bags", "hats", "shoes", "socks"]
    tags = access.tags_of_many(candidates)
    assert allowed_sources(access.grants_of("alice"), candidates, tags) == ["hats", "shoes"]
    assert allowed_sources(access.grants_of("root"), candidates, tags) == candidates
    assert allowed_sources(access.grants_of("nobody"), candidates, tags) == []
    # a source tagged later joins the tag grant
    run(capsys, *cfg, "acl", "tag", "socks", "license=cc-by")
    assert allowed_sources(access.grants_of("alice"), candidates, access.tags_of_many(candidates)) == [
        "hats",
        "shoes",
        "socks",
    ]
    run(capsys, *cfg, "acl", "untag", "shoes", "license")
    run(capsys, *cfg, "acl", "revoke", "alice", "--source", "hats")
    assert allowed_sources(access.grants_of("alice"), candidates, access.tags_of_many(candidates)) == ["socks"]
    # every change is in the registry's audit list
    kinds = [json.loads(e)["kind"] for e in redis_client.lrange(Keys(redis_namespace).audit, 0, -1)]
    assert {"acl-tag", "acl-untag", "acl-grant", "acl-revoke", "acl-token-create"} <= set(kinds)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["acl", "grant", "alice"], "name at least one grant"),
        (["acl", "grant", "alice", "--tag", "license"], "must be KEY=VALUE"),
        (["acl", "grant", "bad name", "--all"], "principal 'bad name' is not allowed"),
        (["acl", "grant", "alice", "--source", "no/slash"], "source name 'no/slash' is not allowed"),
        (["acl", "tag", "shoes", "license"], "must be KEY=VALUE"),
        (["token", "create", "x y"], "principal 'x y' is not allowed"),
    ],
)
def test_bad_input_is_a_clear_error(
    cfg: list[str], capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main([*cfg, *argv]) == 2
    assert message in capsys.readouterr().err


def test_grant_parsing() -> None:
    assert Grant.parse("all") == Grant("all") and str(Grant.parse("tag:a=b")) == "tag:a=b"
    assert Grant.parse("source:x").matches("x", {}) and not Grant.parse("source:x").matches("y", {})
    assert Grant.parse("tag:a=b").matches("y", {"a": "b"}) and not Grant.parse("tag:a=b").matches("y", {"a": "c"})
    for bad in ("everything", "source:", "tag:a", "tag:=b", "role:x"):
        with pytest.raises(ValueError, match=r"grant|source name|tag"):
            Grant.parse(bad)


def test_serve_acl_token_and_attribute_have_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["serve"], ["attribute"], ["acl"], ["acl", "grant"], ["token"], ["token", "create"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: cdm {' '.join(argv)}" in capsys.readouterr().out
