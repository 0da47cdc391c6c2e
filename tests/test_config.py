"""Configuration validation: one bad fixture per rule, each with the message it must produce.

Each fixture's first line is `# expect: <line>: <key>: <message start>`; the loader must report
exactly that file and line, and `aup-gateway check` must print it and exit 1.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config.check import check
from gateway.config.policy import load_policies
from gateway.config.settings import load_settings
from gateway.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent
GOOD = """\
tls: {cert: s.pem, key: k.pem, client_ca: ca.pem}
applications:
  OMS: {upstream: "http://127.0.0.1:9080", protocol: soap}
  DRRS: {upstream: "http://127.0.0.1:9080", protocol: soap}
"""


def _expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), path
    return f"{path}:{first.removeprefix('# expect: ')}"


def _assert_reported(problems: list[str], expected: str) -> None:
    assert any(p.startswith(expected) for p in problems), (expected, problems)


@pytest.mark.parametrize(
    "path", sorted((FIXTURES / "bad_settings").glob("*.yaml")), ids=lambda p: p.stem
)
def test_bad_settings_fixture_names_file_line_and_key(path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    _assert_reported(caught.value.problems, _expected(path))


@pytest.mark.parametrize(
    "path", sorted((FIXTURES / "bad_policies").glob("*.yaml")), ids=lambda p: p.stem
)
def test_bad_policy_fixture_names_file_line_and_key(path: Path, tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    shutil.copy(path, tmp_path / "policies" / path.name)
    (tmp_path / "gateway.yaml").write_text(GOOD)
    settings = load_settings(tmp_path / "gateway.yaml")
    with pytest.raises(ConfigError) as caught:
        load_policies(settings)
    expected = _expected(path).replace(str(path), str(tmp_path / "policies" / path.name))
    _assert_reported(caught.value.problems, expected)


def test_duplicate_names_across_files_are_reported(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    policy = "policies:\n  - {name: same, application: OMS, limit: 1, per: 5s}\n"
    (tmp_path / "policies" / "a.yaml").write_text(policy)
    (tmp_path / "policies" / "b.yaml").write_text(policy)
    (tmp_path / "gateway.yaml").write_text(GOOD)
    with pytest.raises(ConfigError) as caught:
        load_policies(load_settings(tmp_path / "gateway.yaml"))
    first, second = tmp_path / "policies" / "a.yaml", tmp_path / "policies" / "b.yaml"
    _assert_reported(
        caught.value.problems,
        f"{second}:2: name: duplicate policy name 'same' (first in {first}:2)",
    )


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("listen: {port: -1}\nidentity: email\nstore: nope://\n" + GOOD)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert len(caught.value.problems) == 3, caught.value.problems


def test_shipped_configuration_and_policies_check_clean(capsys: pytest.CaptureFixture[str]) -> None:
    assert check(ROOT / "gateway.yaml") == 0
    out = capsys.readouterr().out
    assert "oms-retrieve: OMS Retrieve* 1 per 5s" in out
    assert "drrs-per-service: DRRS * 1 per 30s, resets on early retry" in out
    assert "server name: AUP-Gateway" in out
    assert (
        "application OMS: soap -> http://127.0.0.1:9080; faults auto, fault statuses binding" in out
    )
    policies = load_policies(load_settings(ROOT / "gateway.yaml"))
    drrs = policies.match("DRRS", "RetrieveDRLocations_DRRSv2_AP", "POST")
    assert drrs is not None and drrs.message == (
        "CAISO DRRS Acceptable Use Policy Violation. Please retry your request again in {per} "
        "seconds from now. Note: Time resets each time you request before expiration."
    )
    assert policies.match("OMS", "SubmitOutage_OMSv1_AP", "POST") is None


def test_check_command_prints_errors_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = FIXTURES / "bad_settings" / "bad_port.yaml"
    assert main(["check", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: listen.port: must be a port number" in err
    assert "1 error(s)" in err


def test_policy_match_order_and_methods(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "a.yaml").write_text(
        "policies:\n"
        "  - {name: first, application: oms, services: [RetrieveA*], limit: 1, per: 5s}\n"
        "  - {name: second, application: OMS, services: ['*'], methods: [GET],\n"
        "     limit: 2, per: 1m}\n"
    )
    (tmp_path / "gateway.yaml").write_text(GOOD)
    policies = load_policies(load_settings(tmp_path / "gateway.yaml"))
    first = policies.match("OMS", "RetrieveAll", "POST")
    assert first is not None and first.name == "first" and first.application == "OMS"
    second = policies.match("OMS", "RetrieveB", "GET")
    assert second is not None and second.name == "second" and second.rate.per == 60
    assert policies.match("OMS", "RetrieveB", "POST") is None
