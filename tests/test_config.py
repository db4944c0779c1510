"""The config schema: one declaration per key drives parsing, checks and the reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import config as config_mod
from gateway.config.reference import render
from gateway.errors import ConfigError

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def problems(doc: dict[str, object], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_mod.build(doc, path=None, base_dir=tmp_path)
    return info.value.problems


def test_the_configuration_reference_is_current() -> None:
    # Regenerate with: python -m gateway.config.reference > docs/configuration.md
    assert REFERENCE.read_text(encoding="utf-8") == render()


def test_every_default_serves_and_paths_derive_from_data_dir(tmp_path: Path) -> None:
    cfg = config_mod.build({"gateway": {"data_dir": "d"}}, path=None, base_dir=tmp_path)
    assert cfg.keys.file == tmp_path / "d" / "keys.json"
    assert cfg.audit.dir == tmp_path / "d" / "audit"
    assert cfg.upstream_email.url == f"outbox:{tmp_path / 'd' / 'outbox'}"
    assert cfg.tls.cert == tmp_path / "certs" / "server.pem"
    assert cfg.smtp.max_auth_failures == 5
    assert str(cfg.smtp.listen) == "127.0.0.1:2587"


def test_a_typo_in_a_key_or_table_names_the_nearest_one(tmp_path: Path) -> None:
    found = problems({"smtp": {"max_recipents": 5}, "audti": {}}, tmp_path)
    assert any(
        "[smtp] unknown key 'max_recipents' (did you mean 'max_recipients'?)" in p for p in found
    )
    assert any("unknown table 'audti' (did you mean 'audit'?)" in p for p in found)


def test_a_wrong_choice_names_the_allowed_ones(tmp_path: Path) -> None:
    (found,) = problems({"smtp": {"suppressed_reply": "rejct"}}, tmp_path)
    assert "must be 'accept' or 'reject' (did you mean 'reject'?)" in found


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"smtp": {"max_recipients": 0}}, "[smtp] max_recipients must be at least 1"),
        ({"smtp": {"max_recipients": True}}, "[smtp] max_recipients must be of type integer"),
        ({"redis": {"timeout_ms": 70_000}}, "[redis] timeout_ms must be at most 60000"),
        ({"http": {"listen": "nowhere"}}, "[http] listen: expected HOST:PORT"),
        ({"redis": {"allow_plaintext": "yes"}}, "allow_plaintext must be of type boolean"),
    ],
    ids=["below-minimum", "bool-for-int", "above-maximum", "bad-listen", "string-for-bool"],
)
def test_bad_values_are_named(doc: dict[str, object], needle: str, tmp_path: Path) -> None:
    assert any(needle in p for p in problems(doc, tmp_path))


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("redis://10.0.0.5:6379", False),
        ("redis+cluster://db.internal:7000", False),
        ("redis://127.0.0.1:6379", True),
        ("redis://localhost:6379", True),
        ("redis://[::1]:6379", True),
        ("rediss://db.internal:6379", True),
    ],
)
def test_plaintext_redis_to_a_remote_host_is_a_config_error(
    url: str, ok: bool, tmp_path: Path
) -> None:
    doc = {"redis": {"url": url}}
    if ok:
        assert config_mod.build(doc, path=None, base_dir=tmp_path).redis.url == url
        return
    assert any("plaintext redis://" in p for p in problems(doc, tmp_path))
    allowed = {"redis": {"url": url, "allow_plaintext": True}}
    assert config_mod.build(allowed, path=None, base_dir=tmp_path).redis.allow_plaintext
