"""YAML with positions: every value remembers its file and line, so validation can report all errors at once.

Config files and rule files are both validated through `Node` and `Problems`; a loader walks the tree, records
every problem with its position, and the caller decides to fail (exit 2 for config, exit 1 for `check`).
"""

from __future__ import annotations

import json
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

    @classmethod
    def at(cls, source: str, key: str, why: str) -> Problem:
        """A problem at a `file:line` position, as a rule records where it is written (Rule.source)."""
        file, _, line = source.rpartition(":")
        return cls(file, int(line), key, why) if file and line.isdigit() else cls(source, 0, key, why)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        # a reason of several lines (DuckDB's errors point at the query with a caret line) stays readable in a
        # list of problems: its later lines are indented as one block, blank ones dropped
        why = "\n    ".join(line for line in self.why.splitlines() if line.strip()) or self.why
        return f"{where}: {self.key}: {why}" if self.key else f"{where}: {why}"


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


def _plain(value: Any) -> Any:
    if isinstance(value, Node):
        return value.plain()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def as_yaml(value: Any, limit: int = 80) -> str:
    """A value as it would be written in YAML, for error messages: 'soon', 5, 0.01, true, null, 2018-01-01,
    [1, 2], {a: 1}. Never a Python repr (no Node(...), datetime.date(...), True or None); long values are cut."""
    plain = _plain(value)
    if isinstance(plain, str):
        text = "'" + plain.replace("'", "''") + "'" if plain.isprintable() else json.dumps(plain)
    else:
        try:
            text = yaml.safe_dump(plain, default_flow_style=True, width=2**30, allow_unicode=True, sort_keys=False)
        except yaml.YAMLError:
            text = str(plain)
        text = text.strip().removesuffix("...").strip()
    return text if len(text) <= limit else text[:limit - 4] + " ..."


MAP_TAG, SEQ_TAG, MERGE_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:merge"
MAX_VALUES = 1_000_000  # values after expanding aliases: a few nested aliases can otherwise expand to billions


def _sizes(root: yaml.Node) -> dict[int, int]:
    """id of each composed node -> how many values it expands to with its aliases followed (each node counted
    once, so this is quick however large the expansion)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:  # a cycle: reported while converting
            return 1
        active.add(key)
        n = 1
        if isinstance(node, yaml.MappingNode):
            n += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n += sum(size(v) for v in node.value)
        active.discard(key)
        sizes[key] = n
        return n

    size(root)
    return sizes


def _too_large(root: yaml.Node) -> int | None:
    """The line of the innermost value that expands to more than MAX_VALUES values, or None when all is well."""
    sizes = _sizes(root)
    if sizes[id(root)] <= MAX_VALUES:
        return None
    node = root
    while True:
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        big = next((c for c in children if sizes.get(id(c), 0) > MAX_VALUES), None)
        if big is None:
            return int(node.start_mark.line) + 1
        node = big


def _tag_name(tag: str) -> str:
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag


class _Converter:
    """PyYAML's composed node graph -> positioned Nodes.

    Aliases are followed (an alias's value keeps the positions of the anchored value, where it is written);
    merge keys (`<<: *defaults`, `<<: [*a, *b]`) are expanded as YAML 1.1 defines them: the keys of the merged
    map(s) are added unless the map gives them itself, explicit keys win wherever they are written, and of
    several merged maps the earlier one wins. A merged key keeps the position of its anchor.
    """

    def __init__(self, file: str, problems: Problems) -> None:
        self.file = file
        self.problems = problems
        self.ctor = yaml.SafeLoader("")
        self.active: set[int] = set()  # ids of the nodes being converted: an alias to one of them is a cycle

    def close(self) -> None:
        self.ctor.dispose()

    def convert(self, node: yaml.Node) -> Node:
        line = node.start_mark.line + 1
        if id(node) in self.active:
            self._add(line, "", "an alias refers to a value that contains it (a cycle)")
            return Node(None, self.file, line)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return Node(self._mapping(node), self.file, line)
            if isinstance(node, yaml.SequenceNode):
                self._collection_tag(node, SEQ_TAG, line)
                return Node([self.convert(v) for v in node.value], self.file, line)
            assert isinstance(node, yaml.ScalarNode)
            return Node(self._scalar(node, line), self.file, line)
        finally:
            self.active.discard(id(node))

    def _add(self, line: int, key: str, why: str) -> None:
        self.problems.items.append(Problem(self.file, line, key, why))

    def _collection_tag(self, node: yaml.Node, expected: str, line: int) -> None:
        if node.tag != expected:
            self._add(line, "", f"the tag {_tag_name(node.tag)} is not supported")

    def _scalar(self, node: yaml.ScalarNode, line: int) -> Any:
        if node.tag == MERGE_TAG:  # `<<` outside a key is just text
            return node.value
        try:
            return self.ctor.construct_object(node, deep=True)
        except Exception:  # PyYAML raises ValueError, KeyError, AttributeError... for a bad explicit tag's value
            self.ctor.recursive_objects.clear()
            if node.tag not in type(self.ctor).yaml_constructors:
                self._add(line, "", f"the tag {_tag_name(node.tag)} is not supported")
            else:
                self._add(line, "", f"cannot read {as_yaml(node.value)} as {_tag_name(node.tag)}")
            return None

    def _mapping(self, node: yaml.MappingNode) -> dict[str, Node]:
        self._collection_tag(node, MAP_TAG, node.start_mark.line + 1)
        out: dict[str, Node] = {}
        explicit: set[str] = set()
        merged = False
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.tag == MERGE_TAG:
                if merged:
                    self._add(k.start_mark.line + 1, "<<", "duplicate key (merge several maps with one <<: [*a, *b])")
                merged = True
                for skey, child in self._merged(v):
                    out.setdefault(skey, child)  # an explicit key, or an earlier merged map, wins
                continue
            key = self.convert(k)
            if not isinstance(key.value, str | int | float | bool):
                self.problems.add(key, "", f"mapping keys must be strings or numbers, got {as_yaml(key)}")
                continue
            skey = str(key.value)
            if skey in explicit:
                self.problems.add(key, skey, "duplicate key")
            explicit.add(skey)
            out[skey] = self.convert(v)
        return out

    def _merged(self, value: yaml.Node) -> list[tuple[str, Node]]:
        """The (key, value) pairs a merge brings, earlier maps first."""
        sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
        pairs: list[tuple[str, Node]] = []
        for source in sources:
            converted = self.convert(source)
            if not converted.is_map():
                self.problems.add(converted, "<<", "a merge key takes a mapping (<<: *defaults) or a list of "
                                  f"mappings (<<: [*a, *b]), got {as_yaml(converted)}")
                continue
            pairs.extend(converted.value.items())
        return pairs


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
    except RecursionError:
        raise InvalidConfig([Problem(file, 0, "", "the YAML document is nested too deeply")]) from None
    if root is None:
        return Node({}, file, 1)
    try:
        too_large = _too_large(root)
    except RecursionError:
        raise InvalidConfig([Problem(file, 0, "", "the YAML document is nested too deeply")]) from None
    if too_large is not None:
        raise InvalidConfig([Problem(file, too_large, "", f"this value expands to more than {MAX_VALUES:,} values "
                                     "through its aliases")])
    converter = _Converter(file, problems)
    try:
        out = converter.convert(root)
    except RecursionError:
        raise InvalidConfig([Problem(file, 0, "", "the YAML document is nested too deeply")]) from None
    finally:
        converter.close()
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
        raise ValueError(f"bad duration {as_yaml(text)}: use a number and a unit (ms, s, m, h, d, w), e.g. 5m or 1h30m")
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
        problems.add(node, key, f"must be a mapping, got {as_yaml(node)}")
        return None
    return node


def read_str(node: Node | None, key: str, problems: Problems) -> str | None:
    if node is None:
        return None
    if not isinstance(node.value, str):
        problems.add(node, key, f"must be a string, got {as_yaml(node)}")
        return None
    return node.value


def read_bool(node: Node | None, key: str, problems: Problems) -> bool | None:
    if node is None:
        return None
    if not isinstance(node.value, bool):
        problems.add(node, key, f"must be true or false, got {as_yaml(node)}")
        return None
    return node.value


def read_int(node: Node | None, key: str, problems: Problems, minimum: int | None = None) -> int | None:
    if node is None:
        return None
    if isinstance(node.value, bool) or not isinstance(node.value, int):
        problems.add(node, key, f"must be an integer, got {as_yaml(node)}")
        return None
    if minimum is not None and node.value < minimum:
        problems.add(node, key, f"must be >= {minimum}, got {node.value}")
        return None
    return node.value


def read_float(node: Node | None, key: str, problems: Problems) -> float | None:
    if node is None:
        return None
    if isinstance(node.value, bool) or not isinstance(node.value, int | float):
        problems.add(node, key, f"must be a number, got {as_yaml(node)}")
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
            problems.add(item, key, f"must be a string, got {as_yaml(item)}")
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
