"""YAML with line numbers, and a cursor that names file, line and field in errors.

Only `inventory.py` uses this; everything past it sees the typed model. Whatever the
file holds (another encoding, a nesting bomb, aliases that expand to gigabytes, tags),
the result is a value or a message: never a traceback, and a message never prints more
than a few dozen characters of the user's input.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .log import die, shorten

MAX_BYTES = 4 * 1024**2  # a 1,000-node inventory is about 100 KiB
MAX_DEPTH = 32  # inventories nest four levels deep; PyYAML's parser recurses per level
MAX_MERGED = 1000  # entries of one mapping after its merge keys (<<) are applied
MAX_PROBLEM = 160  # characters of PyYAML's description of a syntax error
MAX_NUMBER = 64  # characters of a number: MACs YAML reads as base-60 numbers are 17


class Mapping(dict[Any, Any]):
    """A YAML mapping that remembers the line of itself and of each key."""

    line: int
    key_lines: dict[Any, int]


class Sequence(list[Any]):
    """A YAML sequence that remembers the line of itself and of each item."""

    line: int
    item_lines: list[int]


_MERGE = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    def __init__(self, stream: str):
        super().__init__(stream)
        # id(mapping node) -> ids of the key nodes written in it (not merged in with `<<`).
        self.own_keys: dict[int, set[int]] = {}

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Called for every mapping merged in too (recursively), so each node's own keys are
        # noted before a merge adds others to it.
        if id(node) not in self.own_keys:
            self.own_keys[id(node)] = {id(k) for k, _ in node.value if k.tag != _MERGE}
        merges = any(k.tag == _MERGE for k, _ in node.value)
        super().flatten_mapping(node)
        # Merges copy pairs: a few hundred bytes of `<<: [*a, *a, ...]` nested would
        # otherwise grow to millions of pairs (a merge bomb).
        if merges and len(node.value) > MAX_MERGED:
            raise yaml.constructor.ConstructorError(
                None, None, f"merge keys (<<) expand this mapping to more than {MAX_MERGED} entries",
                node.start_mark)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Mapping:
    # Keys merged in with `<<: *anchor` may be overridden by the mapping's own keys, as
    # YAML's merge rules say; a key written twice in the mapping itself is an error.
    loader.flatten_mapping(node)
    own_nodes = loader.own_keys[id(node)]
    result = Mapping()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    own: set[Any] = set()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                None, None, f"keys must be strings, got {describe(key)}", key_node.start_mark)
        if id(key_node) in own_nodes:
            if key in own:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shorten(key)} (first at line {result.key_lines[key]})",
                    key_node.start_mark)
            own.add(key)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> Sequence:
    result = Sequence(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


def _refuse_tag(loader: _Loader, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, f"the tag {shorten(node.tag)} is not allowed in an inventory", node.start_mark)


def _number(construct: Any) -> Any:
    """YAML's int and float, for scalars of a sane length: int() of thousands of digits is
    refused by Python, and a sexagesimal 1:2:3:... of millions is quadratic to build."""

    def construct_number(loader: _Loader, node: yaml.ScalarNode) -> Any:
        if len(node.value) > MAX_NUMBER:
            raise yaml.constructor.ConstructorError(
                None, None, f"a number of {len(node.value)} characters is too long", node.start_mark)
        return construct(loader, node)

    return construct_number


_Loader.add_constructor("tag:yaml.org,2002:int", _number(yaml.constructor.SafeConstructor.construct_yaml_int))
_Loader.add_constructor("tag:yaml.org,2002:float", _number(yaml.constructor.SafeConstructor.construct_yaml_float))
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
# Plain data only: ordered maps, sets, pairs, binary and timestamps have no place here.
for _tag in ("omap", "pairs", "set", "binary", "timestamp"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_tag)
_Loader.add_constructor(None, _refuse_tag)  # type: ignore[arg-type]


def _depth(text: str) -> int:
    """The deepest bracket nesting of flow collections, counted without parsing (PyYAML's
    parser recurses once per level and would overflow the stack on a nesting bomb)."""
    depth = deepest = 0
    for char in re.sub(r"#[^\n]*|\"(?:[^\"\\\n]|\\.)*\"|'[^'\n]*'", "", text):
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest


def load(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        die(f"{path}: no such file", hint="pass --inventory PATH to an inventory YAML file")
    except IsADirectoryError:
        die(f"{path}: is a directory, not an inventory file")
    except OSError as exc:
        die(f"{path}: cannot read: {exc.strerror}")
    if len(data) > MAX_BYTES:
        die(f"{path}: {len(data)} bytes is too large for an inventory (at most {MAX_BYTES})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        die(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})",
            hint="save the inventory as UTF-8")
    if _depth(text) > MAX_DEPTH:
        die(f"{path}: collections nested more than {MAX_DEPTH} levels deep")
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        if len(problem) > MAX_PROBLEM:  # it may quote the input (an alias's name, a tag)
            problem = problem[:MAX_PROBLEM] + "..."
        kind = "" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error: "
        die(f"{path}:{line}: {kind}{problem}")
    except yaml.reader.ReaderError as exc:
        line = text[:exc.position].count("\n") + 1
        character = chr(exc.character) if isinstance(exc.character, int) else str(exc.character)
        die(f"{path}:{line}: the character {character!r} is not allowed in YAML",
            hint="remove it; YAML takes printable characters, tabs and line breaks only")
    except yaml.YAMLError as exc:
        die(f"{path}: YAML error: {shorten(str(exc), 200)}")
    except RecursionError:
        die(f"{path}: nested too deeply to be an inventory")
    except (ValueError, OverflowError) as exc:  # a value PyYAML's constructors choke on
        die(f"{path}: not an inventory YAML can read ({type(exc).__name__}: {shorten(str(exc), 80)})")


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_<-]{1,40}")

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
        if isinstance(key, int):
            return Field(self.file, line, f"{self.path}[{key}]")
        # A key is the user's text too: one that is no plain word is quoted, escaped and cut.
        name = key if _PLAIN_KEY.fullmatch(key) else shorten(key)
        return Field(self.file, line, f"{self.path}.{name}" if self.path else name)


@dataclass(frozen=True)
class Value:
    """A raw value with the place it came from."""

    raw: Any
    at: Field

    def expect(self, kind: type) -> Any:
        # bool is an int subclass in Python; YAML `yes`/`no` are booleans, not numbers.
        ok = isinstance(self.raw, kind) and not (kind is int and isinstance(self.raw, bool))
        if not ok:
            self.at.fail(f"expected {TYPE_NAMES.get(kind, kind.__name__)}, got {describe(self.raw)}",
                         hint=_quote_hint(self.raw) if kind is str else None)
        return self.raw

    def text(self) -> str:
        """A string of printable characters on one line: what every text field takes."""
        text: str = self.expect(str)
        bad = next((c for c in text if not c.isprintable()), None)
        if bad is not None:
            self.at.fail(f"{shorten(text)} holds the character {bad!r}, which has no place in this field")
        return text

    def items(self) -> Iterator[Value]:
        seq = self.expect(Sequence)
        for i, (raw, line) in enumerate(zip(seq, seq.item_lines, strict=True)):
            yield Value(raw, self.at.child(i, line))


def _quote_hint(raw: Any) -> str | None:
    # YAML 1.1 reads 52:54:00:00:00:11 as a base-60 number and 1e3 or 010 as numbers too.
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return "put the value in quotes, e.g. \"52:54:00:00:00:11\": YAML reads some unquoted values as numbers"
    return None


def describe(raw: Any) -> str:
    """What a value is, in a few words: never its full text (an alias bomb's repr is gigabytes)."""
    if raw is None:
        return "nothing (null)"
    if isinstance(raw, bool):
        return f"true or false ({'true' if raw else 'false'})"
    if isinstance(raw, (int, float)):
        return f"a number ({shorten(str(raw))})"
    if isinstance(raw, str):
        return f"a string ({shorten(raw)})"
    if isinstance(raw, dict):
        return "a mapping"
    if isinstance(raw, (list, tuple)):
        return "a list"
    return f"a {type(raw).__name__}"


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
                self.at.child(key, self.data.key_lines[key]).fail(f"unknown key {shorten(key)}", hint=hint)

    def has(self, key: str) -> bool:
        return key in self.data

    def field(self, key: str) -> Field:
        return self.at.child(key, self.data.key_lines.get(key, self.at.line))

    def get(self, key: str, default: Any = None) -> Value:
        return Value(self.data.get(key, default), self.field(key))

    def require(self, key: str) -> Value:
        if key not in self.data:
            if self.at.path:
                self.at.fail(f"missing required key '{key}'")
            die(f"{self.at.file}: {key}: the inventory has no '{key}' section",
                hint="see examples/cluster.yaml for every section")
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


def did_you_mean(word: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
