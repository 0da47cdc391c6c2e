"""Reading YAML with its line numbers, so every configuration error names file, line and key.

Files are composed to node trees (not plain dicts) and read through `Fields`, which converts and
checks values, collects every problem instead of stopping at the first, and reports unknown and
duplicate keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from gateway.errors import ConfigError

T = TypeVar("T")
_MISSING: Any = object()
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 10**6,
    "MiB": 2**20,
    "GB": 10**9,
    "GiB": 2**30,
}
_constructor = yaml.constructor.SafeConstructor()


class Problems:
    """Every problem found in one load, each `file:line: key: message`."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, file: str, node: yaml.Node | None, key: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        where = f"{file}:{line}"
        self.items.append(f"{where}: {key}: {message}" if key else f"{where}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


def compose(path: Path, problems: Problems) -> yaml.Node | None:
    """Parse one file to a node tree; a syntax error becomes a problem with its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problems.items.append(f"{path}:1: cannot read: {exc.strerror or exc}")
        return None
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problems.items.append(f"{path}:{line}: invalid YAML: {exc.problem or exc}")
        return None


def parse_duration(text: str) -> float:
    """`500ms`, `5s`, `1m`, `1h`, `400d` -> seconds; ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (use 500ms, 5s, 1m, 1h)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return seconds


def parse_size(text: str) -> int:
    """`15MB`, `64KiB`, `1048576` -> bytes; ValueError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (use 64KiB, 15MB, 1GiB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


class Fields:
    """The keys of one YAML mapping, read one by one; `done()` reports the keys nobody read."""

    def __init__(self, node: yaml.Node, file: str, problems: Problems, context: str = "") -> None:
        self.node = node
        self.file = file
        self.problems = problems
        self.context = context
        self._values: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        self._read: set[str] = set()
        self.ok = isinstance(node, yaml.MappingNode)
        if not self.ok:
            self.problems.add(file, node, context, "must be a mapping")
            return
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in self._values:
                self.problems.add(file, key_node, self._name(key), "duplicate key")
            self._values[key] = (key_node, value_node)

    def _name(self, key: str) -> str:
        return f"{self.context}.{key}" if self.context else key

    def names(self) -> list[str]:
        return list(self._values)

    def has(self, key: str) -> bool:
        return key in self._values

    def line(self, key: str | None = None) -> int:
        node = self._values[key][0] if key in self._values and key else self.node
        return node.start_mark.line + 1

    def error(self, key: str, message: str) -> None:
        node = self._values[key][1] if key in self._values else self.node
        self.problems.add(self.file, node, self._name(key), message)

    def raw(self, key: str) -> yaml.Node | None:
        self._read.add(key)
        entry = self._values.get(key)
        return entry[1] if entry else None

    def sub(self, key: str) -> Fields | None:
        """A nested mapping, or None when absent (errors already recorded when malformed)."""
        node = self.raw(key)
        if node is None or _is_null(node):
            return None
        fields = Fields(node, self.file, self.problems, self._name(key))
        return fields if fields.ok else None

    def items(self, key: str) -> Iterator[tuple[int, yaml.Node]]:
        """The elements of a list value."""
        node = self.raw(key)
        if node is None or _is_null(node):
            return
        if not isinstance(node, yaml.SequenceNode):
            self.problems.add(self.file, node, self._name(key), "must be a list")
            return
        yield from enumerate(node.value)

    def value(
        self,
        key: str,
        kind: type[T],
        default: T = _MISSING,
        check: Callable[[Any], str | None] | None = None,
    ) -> T:
        """A scalar of type `kind` (bool is not int, int is a float); errors fall back to default.

        Without a default the key is required; when it is missing or wrong, the problem is
        recorded and an empty `kind()` is returned so that reading can go on.
        """
        if default is _MISSING:
            default = kind()
            if key not in self._values:
                self.problems.add(self.file, self.node, self._name(key), "is required")
                self._read.add(key)
                return default
        node = self.raw(key)
        if node is None:
            return default
        value = scalar(node)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problems.add(
                self.file,
                node,
                self._name(key),
                f"must be {_KIND_NAMES.get(kind, kind.__name__)}, got {_show(value)}",
            )
            return default
        if check is not None and (message := check(value)):
            self.problems.add(self.file, node, self._name(key), message)
            return default
        return value

    def choice(self, key: str, options: tuple[T, ...], default: T = _MISSING) -> T:
        """One of `options`, typed by them: pass `typing.get_args` of the set's `Literal`."""
        listed = ", ".join(map(str, options))
        text = self.value(
            key,
            str,
            cast(Any, default),
            lambda v: None if v in options else f"must be one of {listed}, got {v!r}",
        )
        return cast(T, text)

    def converted(self, key: str, convert: Callable[[str], T], default: T = _MISSING) -> T:
        """A string converted by `convert` (durations, sizes); its ValueError is the message."""
        node = self.raw(key)
        if node is None:
            if default is _MISSING:
                self.problems.add(self.file, self.node, self._name(key), "is required")
            return default
        try:
            return convert(str(scalar(node)))
        except ValueError as exc:
            self.problems.add(self.file, node, self._name(key), str(exc))
            return default

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """A list of strings (a single string is accepted as a list of one)."""
        node = self.raw(key)
        if node is None:
            return default
        if isinstance(node, yaml.ScalarNode) and isinstance(scalar(node), str):
            return (str(scalar(node)),)
        out: list[str] = []
        for _, item in self.items(key):
            value = scalar(item) if isinstance(item, yaml.ScalarNode) else None
            if not isinstance(value, str):
                self.problems.add(self.file, item, self._name(key), "must be a list of strings")
                continue
            out.append(value)
        return tuple(out)

    def done(self) -> None:
        for key, (key_node, _) in self._values.items():
            if key not in self._read:
                self.problems.add(self.file, key_node, self._name(key), "unknown key")


def scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return node  # reported by the caller as the wrong type
    return _constructor.construct_object(node)


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _show(value: Any) -> str:
    if isinstance(value, yaml.MappingNode):
        return "a mapping"
    if isinstance(value, yaml.SequenceNode):
        return "a list"
    return repr(value)


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
