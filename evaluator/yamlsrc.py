"""YAML with positions: every value remembers its file and line, so validation can report all errors at once.

Config files and rule files are both validated through `Node` and `Problems`; a loader walks the tree, records
every problem with its position, and the caller decides to fail (exit 2 for config, exit 1 for `check`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    key: str
    why: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.why}" if self.key else f"{where}: {self.why}"


@dataclass
class Problems:
    items: list[Problem] = field(default_factory=list)

    def add(self, node: Node | None, key: str, why: str, file: str = "") -> None:
        if node is not None:
            self.items.append(Problem(node.file, node.line, key, why))
        else:
            self.items.append(Problem(file, 0, key, why))

    def __bool__(self) -> bool:
        return bool(self.items)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class InvalidConfig(Exception):
    """Raised with every problem found, so the user fixes them all in one go."""

    def __init__(self, problems: Problems | list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass
class Node:
    """A YAML value with its position. `value` is a dict[str, Node], a list[Node] or a plain scalar."""

    value: Any
    file: str
    line: int

    # -- shape helpers -------------------------------------------------------------------------------------
    def is_map(self) -> bool:
        return isinstance(self.value, dict)

    def is_list(self) -> bool:
        return isinstance(self.value, list)

    def get(self, key: str) -> Node | None:
        return self.value.get(key) if isinstance(self.value, dict) else None

    def plain(self) -> Any:
        """The value without positions (dicts, lists, scalars)."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value


def _convert(node: yaml.Node, file: str, problems: Problems, ctor: yaml.SafeLoader) -> Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Node] = {}
        for k, v in node.value:
            key = _convert(k, file, problems, ctor)
            if not isinstance(key.value, str | int | float | bool):
                problems.add(key, "", "mapping keys must be scalars")
                continue
            skey = str(key.value)
            if skey in out:
                problems.add(key, skey, "duplicate key")
            out[skey] = _convert(v, file, problems, ctor)
        return Node(out, file, line)
    if isinstance(node, yaml.SequenceNode):
        return Node([_convert(v, file, problems, ctor) for v in node.value], file, line)
    assert isinstance(node, yaml.ScalarNode)
    return Node(ctor.construct_object(node, deep=True), file, line)


def parse_yaml(text: str, file: str) -> Node:
    """Parse one YAML document into positioned nodes; raises InvalidConfig on syntax errors."""
    problems = Problems()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        why = getattr(exc, "problem", None) or str(exc)
        raise InvalidConfig([Problem(file, line, "", f"YAML syntax error: {why}")]) from None
    if root is None:
        return Node({}, file, 1)
    ctor = yaml.SafeLoader("")
    try:
        out = _convert(root, file, problems, ctor)
    finally:
        ctor.dispose()
    if problems:
        raise InvalidConfig(problems)
    return out


def load_yaml_file(path: str) -> Node:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise InvalidConfig([Problem(path, 0, "", f"cannot read file: {exc.strerror or exc}")]) from None
    return parse_yaml(text, path)


# -- typed readers: each returns the value or None, and records a problem when the value is wrong ----------

_DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)(ms|s|m|h|d|w))+\s*$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """'90s', '5m', '1h30m', '7d', '250ms' -> seconds. Raises ValueError on anything else."""
    if not isinstance(text, str) or not _DURATION_RE.match(text):
        raise ValueError(f"bad duration {text!r}: use a number and a unit (ms, s, m, h, d, w), e.g. 5m or 1h30m")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


def check_keys(node: Node, allowed: set[str], problems: Problems, where: str) -> None:
    for key, child in node.value.items():
        if key not in allowed:
            hint = ", ".join(sorted(allowed))
            problems.add(child, f"{where}.{key}" if where else key, f"unknown key (allowed: {hint})")


def read_map(node: Node | None, key: str, problems: Problems) -> Node | None:
    if node is None:
        return None
    if not node.is_map():
        problems.add(node, key, f"must be a mapping, got {type(node.value).__name__}")
        return None
    return node


def read_str(node: Node | None, key: str, problems: Problems) -> str | None:
    if node is None:
        return None
    if not isinstance(node.value, str):
        problems.add(node, key, f"must be a string, got {node.value!r}")
        return None
    return node.value


def read_bool(node: Node | None, key: str, problems: Problems) -> bool | None:
    if node is None:
        return None
    if not isinstance(node.value, bool):
        problems.add(node, key, f"must be true or false, got {node.value!r}")
        return None
    return node.value


def read_int(node: Node | None, key: str, problems: Problems, minimum: int | None = None) -> int | None:
    if node is None:
        return None
    if isinstance(node.value, bool) or not isinstance(node.value, int):
        problems.add(node, key, f"must be an integer, got {node.value!r}")
        return None
    if minimum is not None and node.value < minimum:
        problems.add(node, key, f"must be >= {minimum}, got {node.value}")
        return None
    return node.value


def read_float(node: Node | None, key: str, problems: Problems) -> float | None:
    if node is None:
        return None
    if isinstance(node.value, bool) or not isinstance(node.value, int | float):
        problems.add(node, key, f"must be a number, got {node.value!r}")
        return None
    value = float(node.value)
    if not math.isfinite(value):
        problems.add(node, key, "must be finite")
        return None
    return value


def read_duration(node: Node | None, key: str, problems: Problems) -> float | None:
    if node is None:
        return None
    try:
        return parse_duration(node.value)
    except ValueError as exc:
        problems.add(node, key, str(exc))
        return None


def read_str_list(node: Node | None, key: str, problems: Problems) -> list[str] | None:
    if node is None:
        return None
    if not node.is_list():
        problems.add(node, key, "must be a list of strings")
        return None
    out: list[str] = []
    for item in node.value:
        if not isinstance(item.value, str):
            problems.add(item, key, f"must be a string, got {item.value!r}")
        else:
            out.append(item.value)
    return out


def read_str_map(node: Node | None, key: str, problems: Problems) -> dict[str, str] | None:
    """A mapping of strings to scalars, values rendered as strings (labels, annotations, matchers)."""
    if node is None:
        return None
    if not node.is_map():
        problems.add(node, key, "must be a mapping of names to values")
        return None
    out: dict[str, str] = {}
    for k, v in node.value.items():
        if isinstance(v.value, dict | list) or v.value is None:
            problems.add(v, f"{key}.{k}", "must be a string, number or boolean")
        elif isinstance(v.value, bool):
            out[k] = "true" if v.value else "false"
        else:
            out[k] = str(v.value)
    return out
