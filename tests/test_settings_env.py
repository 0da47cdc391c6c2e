"""Secrets from the environment: `store: ${NAME}` and `admin.token: ${NAME}` read the variable
(a Kubernetes Secret exposed with `env:`); an unset one is an error with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.settings import load_settings
from gateway.errors import ConfigError

BASE = """\
tls: {cert: s.pem, key: k.pem, client_ca: ca.pem}
applications:
  OMS: {upstream: "http://127.0.0.1:9080", protocol: soap}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(BASE + text)
    return path


def test_store_url_and_admin_token_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:pa$$word@redis.svc:6379/0")
    monkeypatch.setenv("ADMIN_TOKEN", "t0ken")
    settings = load_settings(
        _write(tmp_path, "store: ${REDIS_URL}\nadmin: {port: 9901, token: '${ADMIN_TOKEN}'}\n")
    )
    assert settings.store.url == "redis://:pa$$word@redis.svc:6379/0"
    assert settings.admin is not None and settings.admin.token == "t0ken"

    settings = load_settings(_write(tmp_path, "store: {url: '${REDIS_URL}', timeout: 20ms}\n"))
    assert settings.store.url == "redis://:pa$$word@redis.svc:6379/0"
    assert settings.store.timeout == pytest.approx(0.02)


def test_only_a_whole_reference_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOST", "redis.svc")
    settings = load_settings(_write(tmp_path, "store: redis://${HOST}:6379/0\n"))
    assert settings.store.url == "redis://${HOST}:6379/0"  # taken as written
    with pytest.raises(ConfigError) as caught:
        load_settings(_write(tmp_path, "store: $HOST\n"))
    assert caught.value.problems[0].startswith(
        f"{tmp_path / 'gateway.yaml'}:4: store: unsupported store URL '$HOST'"
    )


def test_an_unset_or_empty_variable_is_an_error_at_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("ADMIN_TOKEN", "")
    with pytest.raises(ConfigError) as caught:
        load_settings(
            _write(tmp_path, "store:\n  url: ${REDIS_URL}\nadmin:\n  token: ${ADMIN_TOKEN}\n")
        )
    path = tmp_path / "gateway.yaml"
    assert caught.value.problems == [
        f"{path}:5: store.url: environment variable REDIS_URL is not set (or is empty)",
        f"{path}:7: admin.token: environment variable ADMIN_TOKEN is not set (or is empty)",
    ]
