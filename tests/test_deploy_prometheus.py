"""deploy/prometheus: the alert rules are valid (promtool check rules), behave as meant on
series shaped like the gateway's (promtool test rules), and every series selector in them
matches a series a running gateway really exports after real traffic."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.support.ops import admin, samples, wait_for
from tests.support.ports import free_port
from tests.support.stack import DRRS, StackFactory
from tests.support.tools import require

DEPLOY = Path(__file__).parents[1] / "deploy" / "prometheus"
ALERTS = DEPLOY / "alerts.yml"
ALERT_TESTS = DEPLOY / "alerts_test.yml"
# Labels Prometheus adds to every scraped series; the gateway does not export them itself.
TARGET_LABELS = frozenset({"instance", "job"})
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "bool", "inf", "nan"}
)
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGE = re.compile(r"\[[^\]]*\]|\boffset\s+\w+")
_SELECTOR = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?(\s*\()?")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')

Matcher = tuple[str, str, str]
Selector = tuple[str, tuple[Matcher, ...]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def selectors(expr: str) -> list[Selector]:
    """The series selectors (metric name and label matchers) of a PromQL expression."""
    bare = _RANGE.sub(" ", _GROUPING.sub(" ", expr))
    found: list[Selector] = []
    for name, braces, call in _SELECTOR.findall(bare):
        if call or name in _KEYWORDS:  # a function call or an operator, not a metric
            continue
        found.append((name, tuple(_MATCHER.findall(braces))))
    return found


def matches(selector: Selector, labels: frozenset[tuple[str, str]]) -> bool:
    """Whether a series' labels satisfy the matchers (regexes are anchored, as in PromQL)."""
    have = dict(labels)
    for label, op, wanted in selector[1]:
        value = have.get(label, "")
        if op == "=" and value != wanted:
            return False
        if op == "!=" and value == wanted:
            return False
        if op == "=~" and not re.fullmatch(wanted, value):
            return False
        if op == "!~" and re.fullmatch(wanted, value):
            return False
    return True


def rules() -> list[dict[str, str]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_selectors_are_read_from_promql() -> None:
    expr = (
        'sum by (application) (rate(aup_upstream_responses_total{status=~"error|5.."}[5m]))'
        " / on (application) group_left sum without (status) "
        "(rate(aup_upstream_responses_total[1h] offset 5m)) > 0.05 and aup_draining == bool 0"
    )
    assert selectors(expr) == [
        ("aup_upstream_responses_total", (("status", "=~", "error|5.."),)),
        ("aup_upstream_responses_total", ()),
        ("aup_draining", ()),
    ]
    selector = selectors('x{status=~"error|5..", reason!="CLIENT_CLOSED"}')[0]
    assert matches(selector, frozenset({("status", "502"), ("reason", "BAD_CERT")}))
    assert not matches(selector, frozenset({("status", "1502"), ("reason", "BAD_CERT")}))
    assert not matches(selector, frozenset({("status", "error"), ("reason", "CLIENT_CLOSED")}))


def test_promtool_check_rules_accepts_the_alerts() -> None:
    promtool = require("promtool", package="prometheus")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout
    names = {rule["alert"] for rule in rules()}
    assert {
        "AupStoreInFallback",
        "AupPolicyReloadRefused",
        "AupViolationRateJump",
        "AupTlsHandshakesRefused",
        "AupUpstreamErrors",
        "AupLedgerDropping",
    } <= names


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    promtool = require("promtool", package="prometheus")
    result = subprocess.run(
        [promtool, "test", "rules", ALERT_TESTS.name],
        cwd=DEPLOY,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


async def test_every_rule_selects_series_a_running_gateway_exports(
    stack_factory: StackFactory,
) -> None:
    # OMS points at a port nobody listens on (upstream errors); DRRS at the mock (allowed,
    # then rejected); an anonymous client is answered 403-in-a-fault and counted as a refusal.
    stack = await stack_factory(
        {"drrs.yaml": DRRS.format(per="30s")}, oms_port=free_port(), extra=""
    )
    client = stack.client()
    assert (await stack.soap(client, "drrs", "RetrieveDRLocations_DRRSv2_AP")).status == 200
    assert (await stack.soap(client, "drrs", "RetrieveDRLocations_DRRSv2_AP")).status == 500
    down = await stack.soap(client, "oms", "RetrieveCurrentOutages_OMSv1_AP")
    assert down.status == 500 and b"AUP-UPSTREAM-UNAVAILABLE" in await down.read()
    anonymous = await stack.soap(stack.client(None), "oms", "RetrieveCurrentOutages_OMSv1_AP")
    assert b"AUP-NO-CERTIFICATE" in await anonymous.read()

    scraped: Samples = {}

    async def refusal_counted() -> bool:
        scraped.clear()
        scraped.update(samples((await admin(stack, "GET", "/metrics"))[1]))
        return any(name == "aup_tls_handshakes_refused_total" for name, _ in scraped)

    await wait_for(refusal_counted, what="the refused handshake in the metrics")

    checked = 0
    for rule in rules():
        for selector in selectors(rule["expr"]):
            hits = [
                labels
                for name, labels in scraped
                if name == selector[0] and matches(selector, labels)
            ]
            assert hits, f"{rule['alert']}: no exported series matches {selector}"
            checked += 1
    assert checked >= len(rules())

    # The unit tests' series carry the gateway's names and label names (plus target labels).
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    for case in tests:
        for series in case["input_series"]:
            ((name, matchers),) = selectors(series["series"])
            exported = [labels for sample, labels in scraped if sample == name]
            assert exported, f"{name} (alerts_test.yml) is not exported"
            names = {label for label, _, _ in matchers} - TARGET_LABELS
            assert any(names == {label for label, _ in labels} for labels in exported), (
                f"{series['series']}: the gateway exports {name} with labels "
                f"{sorted({label for labels in exported for label, _ in labels})}"
            )
