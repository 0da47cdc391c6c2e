"""`aup-gateway simulate`: replay recorded calls against a candidate policy set, beside the current.

The recorded calls are the gateway's JSON access log (one object per line, as `ops/accesslog.py`
writes it; lines that are not such an object, e.g. other loggers' lines, are passed over). Every
call that reached policy matching (decisions forwarded, allowed, rejected, shadow, exempt) is
decided again, in the order of its recorded time, under each set: the first matching policy,
the identity's override, then the limiter's own reference model (`MemoryLimiter.decide_now`)
at the recorded time, one limiter per set. Calls refused before matching (unknown service, not
provisioned) are counted apart and not replayed.

What a replay cannot know: how clients would have behaved under other answers (a rejected
client may retry), and state from before the log's first line. The recorded decisions are
shown beside the replay of the current set; where the two differ, the log predates the current
set or started while keys were counting. The access log's `time` is when the answer was
logged, a few milliseconds after the decision; the windows of real policies are seconds.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from gateway.config.policy import PolicySet, load_policies
from gateway.config.settings import Settings, load_settings
from gateway.errors import ConfigError
from gateway.limiter.base import limiter_key
from gateway.limiter.memory import MemoryLimiter

Verdict = Literal["allowed", "rejected", "shadow", "exempt", "unlimited"]
VERDICTS: tuple[Verdict, ...] = ("allowed", "rejected", "shadow", "exempt", "unlimited")
Column = Literal["recorded", "current", "candidate"]
COLUMNS: tuple[Column, ...] = ("recorded", "current", "candidate")
# The access log's decisions for calls that reached policy matching, as verdicts.
_RECORDED: dict[str, Verdict] = {
    "forwarded": "unlimited",
    "allowed": "allowed",
    "rejected": "rejected",
    "shadow": "shadow",
    "exempt": "exempt",
}


@dataclass(frozen=True, slots=True)
class Call:
    """One recorded call, as the replay needs it."""

    time: float
    identity: str  # the limiter's identity key under the config's `identity` mode
    cn: str
    application: str
    service: str
    method: str
    recorded: Verdict
    line: int


@dataclass
class Row:
    """The verdicts for one (application, service, identity) under each column."""

    application: str
    service: str
    identity: str
    cn: str
    counts: dict[Column, Counter[Verdict]] = field(
        default_factory=lambda: {column: Counter() for column in COLUMNS}
    )
    policies: dict[Column, set[str]] = field(
        default_factory=lambda: {"current": set(), "candidate": set()}
    )

    @property
    def calls(self) -> int:
        return sum(self.counts["recorded"].values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "application": self.application,
            "service": self.service,
            "identity": self.identity,
            "cn": self.cn,
            "calls": self.calls,
            **{c: {v: self.counts[c][v] for v in VERDICTS} for c in COLUMNS},
            "policies": {c: sorted(names) for c, names in self.policies.items()},
        }


@dataclass(frozen=True)
class Replay:
    """The result: rows sorted by application, service, identity."""

    rows: tuple[Row, ...]
    calls: int
    refused: int  # recorded calls refused before policy matching (not replayed)
    passed_over: int  # lines that are not access-log records
    current: PolicySet
    candidate: PolicySet
    current_dir: Path
    candidate_dir: Path
    identity_mode: str
    first: float | None
    last: float | None

    def totals(self) -> dict[Column, Counter[Verdict]]:
        totals: dict[Column, Counter[Verdict]] = {column: Counter() for column in COLUMNS}
        for row in self.rows:
            for column in COLUMNS:
                totals[column].update(row.counts[column])
        return totals

    def reproduces_recorded(self) -> bool:
        return all(row.counts["recorded"] == row.counts["current"] for row in self.rows)

    def as_dict(self) -> dict[str, Any]:
        totals = self.totals()
        return {
            "calls": self.calls,
            "refused": self.refused,
            "passed_over": self.passed_over,
            "first": self.first,
            "last": self.last,
            "identity": self.identity_mode,
            "current": _set_dict(self.current, self.current_dir),
            "candidate": _set_dict(self.candidate, self.candidate_dir),
            "reproduces_recorded": self.reproduces_recorded(),
            "totals": {c: {v: totals[c][v] for v in VERDICTS} for c in COLUMNS},
            "rows": [row.as_dict() for row in self.rows],
        }


class _Replayer:
    """One policy set and its own limiter: the gateway's decision, at a recorded time."""

    def __init__(self, policies: PolicySet, settings: Settings) -> None:
        self.policies = policies
        self.shadow_everything = settings.mode == "shadow"
        self.limiter = MemoryLimiter(clock=_no_clock)  # every decision gets its recorded time

    def decide(self, call: Call) -> tuple[Verdict, str]:
        policy = self.policies.match(call.application, call.service, call.method)
        if policy is None:
            return "unlimited", ""
        rate = policy.rate_for(call.identity)
        if rate is None:
            return "exempt", policy.name
        key = limiter_key(call.identity, call.application, call.service)
        if self.limiter.decide_now(key, rate, call.time).allowed:
            return "allowed", policy.name
        if policy.mode == "shadow" or self.shadow_everything:
            return "shadow", policy.name
        return "rejected", policy.name


def simulate(config: Path, candidate_dir: Path, calls_file: Path) -> Replay:
    """Replay `calls_file` under the config's policies and under `candidate_dir`'s."""
    settings = load_settings(config)
    current = load_policies(settings)
    candidate = load_policies(dataclasses.replace(settings, policies=candidate_dir))
    calls, refused, passed_over = read_calls(calls_file, settings)
    calls.sort(key=lambda call: call.time)  # stable: equal times keep their log order
    replayers: dict[Column, _Replayer] = {
        "current": _Replayer(current, settings),
        "candidate": _Replayer(candidate, settings),
    }
    rows: dict[tuple[str, str, str], Row] = {}
    for call in calls:
        row = rows.get((call.application, call.service, call.identity))
        if row is None:
            row = rows[(call.application, call.service, call.identity)] = Row(
                call.application, call.service, call.identity, call.cn
            )
        row.counts["recorded"][call.recorded] += 1
        for column, replayer in replayers.items():
            verdict, policy = replayer.decide(call)
            row.counts[column][verdict] += 1
            if policy:
                row.policies[column].add(policy)
    return Replay(
        rows=tuple(rows[key] for key in sorted(rows)),
        calls=len(calls),
        refused=refused,
        passed_over=passed_over,
        current=current,
        candidate=candidate,
        current_dir=settings.policies,
        candidate_dir=candidate_dir,
        identity_mode=settings.identity,
        first=calls[0].time if calls else None,
        last=calls[-1].time if calls else None,
    )


def read_calls(path: Path, settings: Settings) -> tuple[list[Call], int, int]:
    """(the replayable calls, the count refused before matching, the lines passed over).
    A record with a missing or wrong field is an error naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read the recorded calls: {exc}"]) from exc
    calls: list[Call] = []
    problems: list[str] = []
    refused = passed_over = 0
    for number, line in enumerate(text.splitlines(), start=1):
        record = _record(line)
        if record is None:
            passed_over += 1
            continue
        verdict = _RECORDED.get(str(record.get("decision")))
        if verdict is None:  # refused before matching: no policy was asked
            refused += 1
            continue
        call = _call(record, verdict, number, settings)
        if isinstance(call, str):
            problems.append(f"{path}:{number}: {call}")
        else:
            calls.append(call)
    if problems:
        raise ConfigError(problems)
    if not calls:
        raise ConfigError([f"{path}: no access-log records of calls to replay"])
    return calls, refused, passed_over


def _record(line: str) -> dict[str, Any] | None:
    """The JSON object on an access-log line (after any logging prefix), else None."""
    start = line.find("{")
    if start < 0:
        return None
    try:
        record = json.loads(line[start:])
    except ValueError:
        return None
    if not isinstance(record, dict) or "decision" not in record or "request_id" not in record:
        return None
    return record


def _call(record: dict[str, Any], verdict: Verdict, line: int, settings: Settings) -> Call | str:
    """A Call, or what is wrong with the record."""
    when = record.get("time")
    if not isinstance(when, int | float) or isinstance(when, bool):
        return f"time: must be a number (epoch seconds), got {when!r}"
    texts: dict[str, str] = {}
    for name in ("identity", "application", "service"):
        value = record.get(name)
        if not isinstance(value, str) or not value:
            return f"{name}: must be a non-empty string, got {value!r}"
        texts[name] = value
    cn = record.get("cn") if isinstance(record.get("cn"), str) else ""
    identity = texts["identity"]
    if settings.identity == "cn":
        if not cn:
            return "cn: the config keys limits by CN and the record has none"
        identity = str(cn)
    # identity: fingerprint is keyed by the subject DN here: the log does not carry fingerprints,
    # and a subject has one certificate at a time.
    method = record.get("method")
    if not isinstance(method, str) or not method:
        app = settings.application(texts["application"])
        if app is None or app.protocol != "soap":
            return "method: not recorded (replaying a REST call needs the request's method)"
        method = "POST"  # SOAP calls are POSTs; older access logs did not record the method
    return Call(
        float(when),
        identity,
        str(cn),
        texts["application"],
        texts["service"],
        method,
        verdict,
        line,
    )


def print_replay(replay: Replay, as_json: bool = False, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if as_json:
        json.dump(replay.as_dict(), out, indent=2)
        out.write("\n")
        return
    print(
        f"replayed {replay.calls} calls ({replay.refused} refused before any policy, "
        f"{replay.passed_over} other log line(s) passed over), identity by {replay.identity_mode}",
        file=out,
    )
    for label, policies, folder in (
        ("current", replay.current, replay.current_dir),
        ("candidate", replay.candidate, replay.candidate_dir),
    ):
        print(
            f"{label:>9}: {folder} (version {policies.version}, {len(policies.policies)} policies)",
            file=out,
        )
    print("allowed/rejected/shadow (allowed counts exempt and unlimited calls too)\n", file=out)
    header = ("application", "service", "identity", "calls", *COLUMNS)
    lines = [header]
    for row in replay.rows:
        lines.append(
            (
                row.application,
                row.service,
                row.cn or row.identity,
                str(row.calls),
                *(_ars(row.counts[column]) for column in COLUMNS),
            )
        )
    totals = replay.totals()
    lines.append(("total", "", "", str(replay.calls), *(_ars(totals[c]) for c in COLUMNS)))
    _table(lines, out)
    if not replay.reproduces_recorded():
        print(
            "\nnote: the current set does not reproduce every recorded decision (the log may "
            "predate it, or start while keys were already counting)",
            file=out,
        )


def _ars(counts: Counter[Verdict]) -> str:
    allowed = counts["allowed"] + counts["exempt"] + counts["unlimited"]
    return f"{allowed}/{counts['rejected']}/{counts['shadow']}"


def _table(lines: Iterable[tuple[str, ...]], out: TextIO) -> None:
    rows = list(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(width) if i >= 3 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)


def _set_dict(policies: PolicySet, folder: Path) -> dict[str, Any]:
    return {
        "policies": str(folder),
        "version": policies.version,
        "names": [policy.name for policy in policies.policies],
    }


def _no_clock() -> float:
    raise AssertionError("a replay decides at recorded times only")


def run_simulate(config: Path, candidate_dir: Path, calls_file: Path, as_json: bool) -> int:
    """The CLI's entry: print the replay; ConfigError (file:line) propagates to exit 1."""
    print_replay(simulate(config, candidate_dir, calls_file), as_json)
    return 0
