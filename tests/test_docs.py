"""The documents stay true to the code: the README's result codes are exactly `ErrorCode`, every
metric is in the operations table with real alert names, every relative link resolves, and the
lock files cover what pyproject.toml asks for."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gateway.errors import ErrorCode

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
OPERATIONS = ROOT / "docs" / "operations.md"
METRICS = ROOT / "gateway" / "ops" / "metrics.py"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

CODE = re.compile(r"\bAUP-[A-Z]+(?:-[A-Z]+)*\b")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def section(text: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n") + len(heading) + 1
    following = re.compile(rf"^#{{1,{len(level)}}} ", re.MULTILINE)
    end = following.search(text, start)
    return text[start : end.start() if end else len(text)]


def table_first_column(text: str) -> list[str]:
    """The first cell of every table row under a header row, backticks removed."""
    cells = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells.append(line.split("|")[1].strip().strip("`"))
    return cells[1:]  # the header row


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    found = set()
    for match in re.finditer(r"^#{1,6} (.+?)\s*$", text, re.MULTILINE):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_the_readme_lists_exactly_the_result_codes() -> None:
    rows = table_first_column(section(README.read_text(), "### Result codes"))
    assert len(rows) == len(set(rows)), "a code is listed twice"
    assert set(rows) == {code.value for code in ErrorCode}
    for line in section(README.read_text(), "### Result codes").splitlines():
        if line.startswith("| `AUP-"):
            status, meaning = (cell.strip() for cell in line.split("|")[2:4])
            assert re.fullmatch(r"[1-5]\d\d", status) and meaning, line


def test_no_document_names_a_code_that_does_not_exist() -> None:
    known = {code.value for code in ErrorCode}
    for path in [README, *DOCS]:
        unknown = set(CODE.findall(path.read_text())) - known
        assert not unknown, f"{path.name} names {sorted(unknown)}"


def test_every_relative_link_points_at_a_file_and_anchor_that_exist() -> None:
    checked = 0
    for path in [README, *DOCS]:
        for target in LINK.findall(FENCE.sub("", path.read_text())):
            if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            assert linked.exists(), f"{path.name}: {target} (no {linked})"
            if anchor:
                assert anchor in anchors(linked), f"{path.name}: {target} (no such heading)"
            checked += 1
    assert checked > 20  # the parser found the links


def test_the_operations_table_lists_every_metric_with_real_alert_names() -> None:
    defined = set(re.findall(r'"(aup_[a-z_]+)"', METRICS.read_text()))
    assert len(defined) > 20
    table = section(OPERATIONS.read_text(), "## Metrics and the alerts they deserve")
    listed = [name.removesuffix("_total") for name in table_first_column(table)]
    assert len(listed) == len(set(listed)), "a metric is listed twice"
    assert set(listed) == defined
    rules = {
        rule["alert"]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }
    named = set(re.findall(r"\bAup[A-Z]\w+", table))
    assert named <= rules, f"not in alerts.yml: {sorted(named - rules)}"
    assert rules <= named, f"rules without a metric row: {sorted(rules - named)}"


def pins(lock: Path) -> dict[str, str]:
    """name -> version for every `name==version` line; each must carry hashes."""
    text = lock.read_text()
    found = {}
    for match in re.finditer(
        r"^([A-Za-z0-9][\w.-]*)==([^\s;\\]+)[^\n]*\\\n\s+--hash=sha256:", text, re.M
    ):
        found[canonicalize_name(match.group(1))] = match.group(2)
    pinned_lines = re.findall(r"^[A-Za-z0-9][\w.-]*==", text, re.M)
    assert len(found) == len(pinned_lines), f"{lock.name}: a pin without --hash"
    return found


def test_the_lock_files_pin_every_dependency_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [Requirement(spec) for spec in project["dependencies"]]
    test = [Requirement(spec) for spec in project["optional-dependencies"]["test"]]
    full, runtime_only = pins(ROOT / "requirements.lock"), pins(ROOT / "requirements-runtime.lock")
    for lock, name, requirements in (
        (full, "requirements.lock", runtime + test),
        (runtime_only, "requirements-runtime.lock", runtime),
    ):
        for requirement in requirements:
            if requirement.marker and not requirement.marker.evaluate():
                continue
            version = lock.get(canonicalize_name(requirement.name))
            assert version, f"{name} lacks {requirement.name}: run `make lock`"
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{name} pins {requirement.name}=={version} outside {requirement.specifier}"
            )
    # The image runs what the tests ran: the same version of every runtime package.
    assert {name: full[name] for name in runtime_only} == runtime_only
