"""YAML with line numbers, and a cursor that names file, line and field in errors.

Only `inventory.py` uses this; everything past it sees the typed model.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .log import die


class Mapping(dict[Any, Any]):
    """A YAML mapping that remembers the line of itself and of each key."""

    line: int
    key_lines: dict[Any, int]


class Sequence(list[Any]):
    """A YAML sequence that remembers the line of itself and of each item."""

    line: int
    item_lines: list[int]


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Mapping:
    loader.flatten_mapping(node)
    result = Mapping()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                None, None, f"keys must be strings, got {key!r}", key_node.start_mark
            )
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {result.key_lines[key]})",
                key_node.start_mark,
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> Sequence:
    result = Sequence(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        die(f"{path}: no such file", hint="pass --inventory PATH to an inventory YAML file")
    except OSError as exc:
        die(f"{path}: cannot read: {exc.strerror}")
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        die(f"{path}:{line}: YAML syntax error: {problem}")
    except yaml.YAMLError as exc:
        die(f"{path}: YAML error: {exc}")


TYPE_NAMES = {
    str: "a string", bool: "true or false", int: "a number", Mapping: "a mapping",
    Sequence: "a list",
}


@dataclass(frozen=True)
class Field:
    """Where a value sits: the file, its line and its dotted path, for error messages."""

    file: Path
    line: int
    path: str

    def fail(self, message: str, hint: str | None = None) -> NoReturn:
        where = f"{self.file}:{self.line}: {self.path}" if self.path else f"{self.file}:{self.line}"
        die(f"{where}: {message}", hint=hint)

    def child(self, key: str | int, line: int) -> Field:
        path = f"{self.path}[{key}]" if isinstance(key, int) else (
            f"{self.path}.{key}" if self.path else key
        )
        return Field(self.file, line, path)


@dataclass(frozen=True)
class Value:
    """A raw value with the place it came from."""

    raw: Any
    at: Field

    def expect(self, kind: type) -> Any:
        # bool is an int subclass in Python; YAML `yes`/`no` are booleans, not numbers.
        ok = isinstance(self.raw, kind) and not (kind is int and isinstance(self.raw, bool))
        if not ok:
            self.at.fail(f"expected {TYPE_NAMES.get(kind, kind.__name__)}, got {_describe(self.raw)}")
        return self.raw

    def items(self) -> Iterator[Value]:
        seq = self.expect(Sequence)
        for i, (raw, line) in enumerate(zip(seq, seq.item_lines, strict=True)):
            yield Value(raw, self.at.child(i, line))


def _describe(raw: Any) -> str:
    if raw is None:
        return "nothing (null)"
    for kind, name in TYPE_NAMES.items():
        if isinstance(raw, kind):
            return f"{name} ({raw!r})" if not isinstance(raw, (Mapping, Sequence)) else name
    return f"{type(raw).__name__} ({raw!r})"


class Section:
    """A mapping whose keys are read one by one; unknown or missing keys are errors."""

    def __init__(self, value: Value, known: tuple[str, ...]):
        self.at = value.at
        self.data: Mapping = value.expect(Mapping)
        for key in self.data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=2)
                hint = ("did you mean " + " or ".join(f"'{c}'" for c in close) + "?" if close
                        else "known keys: " + ", ".join(known))
                self.at.child(key, self.data.key_lines[key]).fail(f"unknown key '{key}'", hint=hint)

    def has(self, key: str) -> bool:
        return key in self.data

    def field(self, key: str) -> Field:
        return self.at.child(key, self.data.key_lines.get(key, self.at.line))

    def get(self, key: str, default: Any = None) -> Value:
        return Value(self.data.get(key, default), self.field(key))

    def require(self, key: str) -> Value:
        if key not in self.data or self.data[key] is None:
            self.at.fail(f"missing required key '{key}'")
        return self.get(key)

    def section(self, key: str, known: tuple[str, ...]) -> Section:
        """The nested mapping at key; an empty one when the key is absent."""
        if key in self.data:
            return Section(self.get(key), known)
        empty = Mapping()
        empty.line, empty.key_lines = self.at.line, {}
        return Section(Value(empty, self.field(key)), known)

    def items(self, key: str) -> Iterator[Value]:
        """The items of the list at key; none when the key is absent."""
        if key in self.data:
            yield from self.get(key).items()
