"""The access list: which certificate identities may call which applications.

Entries live under `access:` in the policy files, so they are validated, versioned and reloaded
with the policies. Each entry names applications (or "*") and the identities it admits: exact
subject DNs, subject patterns (globs on the normalised DN) and organisations (the certificate's
`O=`). An identity may call an application when any entry names both.

No entry in any file means no access list: every identity with a verified certificate may call
every application (the TLS layer already refused everyone else). Once one entry exists, whatever
no entry grants is refused.

DN comparison ignores case (X.500 matches CN, OU, O and C case-insensitively). In a pattern `*`
matches any run of characters inside one attribute value and `?` one character; neither crosses an
unescaped comma, so `CN=*,OU=people,O=CAISO,C=US` cannot be satisfied by a DN with extra RDNs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gateway.config.settings import Settings
from gateway.config.yamlread import Fields
from gateway.edge.identity import ClientIdentity, normalise_dn

ANY_APPLICATION = "*"
_MEMO_LIMIT = 50_000
# One character of a DN value: anything but an unescaped comma (an escape pair counts as one).
_VALUE_CHAR = r"(?:\\.|[^,\\])"


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One `access:` entry: these identities may call these applications."""

    applications: frozenset[str] | None  # None: every application
    subjects: frozenset[str]  # normalised DNs, casefolded
    patterns: tuple[re.Pattern[str], ...]
    organisations: frozenset[str]  # casefolded
    source: str = ""  # file:line, for `check` and logs
    name: str = ""

    def admits(self, identity: ClientIdentity) -> bool:
        subject = identity.subject.casefold()
        return (
            subject in self.subjects
            or identity.organisation.casefold() in self.organisations
            or any(p.fullmatch(identity.subject) for p in self.patterns)
        )

    def grants(self, identity: ClientIdentity, application: str) -> bool:
        return (self.applications is None or application in self.applications) and self.admits(
            identity
        )


@dataclass(frozen=True)
class AccessList:
    """The rules from every policy file, in order; `allows` is memoised per identity and app."""

    rules: tuple[AccessRule, ...]
    _memo: dict[tuple[str, str, str], bool] = field(default_factory=dict, compare=False, repr=False)

    def allows(self, identity: ClientIdentity, application: str) -> bool:
        if not self.rules:
            return True
        key = (identity.subject, identity.organisation, application)
        known = self._memo.get(key)
        if known is not None:
            return known
        allowed = any(rule.grants(identity, application) for rule in self.rules)
        if len(self._memo) < _MEMO_LIMIT:  # identities are bounded by the CA; be safe anyway
            self._memo[key] = allowed
        return allowed


def subject_pattern(text: str) -> re.Pattern[str]:
    """A DN glob -> a case-insensitive regex; ValueError when it is not a DN (or `*`)."""
    if text.strip() == "*":
        return re.compile(r".*", re.IGNORECASE | re.DOTALL)
    normalised = normalise_dn(text)
    out = []
    for char in normalised:
        if char == "*":
            out.append(f"{_VALUE_CHAR}*")
        elif char == "?":
            out.append(_VALUE_CHAR)
        else:
            out.append(re.escape(char))
    return re.compile("".join(out), re.IGNORECASE | re.DOTALL)


def read_access_rule(f: Fields, settings: Settings) -> AccessRule | None:
    """One `access:` entry; problems are recorded on `f` (file:line:key) and None returned."""
    if not f.ok:
        return None
    name = f.value("name", str, "")
    if name:
        f.context = f"access[{name}]"
    applications: set[str] = set()
    every = False
    names = f.strings("applications")
    if not f.has("applications"):
        f.error("applications", "is required: the application names this entry grants, or '*'")
    elif not names:
        f.error("applications", "must name at least one application, or '*'")
    for app_name in names:
        if app_name == ANY_APPLICATION:
            every = True
            continue
        app = settings.application(app_name)
        if app is None:
            f.error(
                "applications",
                f"{app_name!r} is not configured in {settings.source.name} "
                f"(known: {', '.join(settings.applications) or 'none'})",
            )
        else:
            applications.add(app.name)

    subjects: set[str] = set()
    for text in f.strings("subjects"):
        try:
            subjects.add(normalise_dn(text).casefold())
        except ValueError as exc:
            f.error("subjects", str(exc))
    patterns: list[re.Pattern[str]] = []
    for text in f.strings("subject_patterns"):
        try:
            patterns.append(subject_pattern(text))
        except ValueError:
            f.error(
                "subject_patterns",
                f"{text!r} is not a DN pattern (e.g. "
                "'CN=*,OU=people,O=CAISO,C=US'; '*' alone admits everyone)",
            )
    organisations: set[str] = set()
    for text in f.strings("organisations"):
        if not text.strip():
            f.error("organisations", "an organisation name cannot be empty")
        organisations.add(text.strip().casefold())
    if not (f.has("subjects") or f.has("subject_patterns") or f.has("organisations")):
        f.error(
            "subjects",
            "an entry needs subjects, subject_patterns or organisations to say whom it admits",
        )
    rule = AccessRule(
        applications=None if every else frozenset(applications),
        subjects=frozenset(subjects),
        patterns=tuple(patterns),
        organisations=frozenset(organisations),
        source=f"{f.file}:{f.line()}",
        name=name,
    )
    f.done()
    return rule
