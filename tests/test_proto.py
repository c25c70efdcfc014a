"""The OTLP .proto files in proto/ against the decoders and against the installed opentelemetry-proto wheel.

The C decoder (evaluator/receiver/_fastdecode.c) parses the wire format by hand: every field number and wire type it
relies on is in its OTLP_FIELDS table, which is read here from the C source. The Python reference decoder
(evaluator/receiver/decode.py) reads requests through the generated classes, so its numbers and wire types are the
wheel's; what it states itself is the AnyValue oneof members it tells apart by name (decode.ANY_VALUE_MEMBERS).
Both are checked against the .proto files in proto/, and proto/ is checked against the descriptors the installed
wheel was generated with, so the files are the OTLP version actually in use. An OTLP upgrade that moves or
retypes a field fails here, naming the message, the field and both values.

The .proto files are read by the small parser below rather than by protoc (grpcio-tools): grpcio-tools pins
protobuf to the release its protoc matches (1.84: protobuf>=7.35.1,<8), which would narrow the protobuf range the
test environment can run with, and it is a compiled wheel for one check. The parser covers the proto3 subset the
OTLP files use (messages, nested types, enums, fields, repeated, optional, oneof, map, reserved, options,
services), refuses anything else with the file and line, and cannot drift unnoticed: its reading of every
message, field and enum is compared with protoc's (the wheel's descriptors) on every run.
"""

from __future__ import annotations

import importlib
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from evaluator.receiver import decode, fastdecode

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
C_SOURCE = ROOT / "evaluator" / "receiver" / "_fastdecode.c"
REQUEST = "opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest"
ANY_VALUE = "opentelemetry.proto.common.v1.AnyValue"
WHEEL = f"opentelemetry-proto {version('opentelemetry-proto')}"
REQUIRED_FILES = (
    "opentelemetry/proto/collector/trace/v1/trace_service.proto",
    "opentelemetry/proto/trace/v1/trace.proto",
    "opentelemetry/proto/common/v1/common.proto",
    "opentelemetry/proto/resource/v1/resource.proto",
)

# proto3 scalar types and the wire type each is written with (0 varint, 1 i64, 2 length-delimited, 5 i32)
SCALAR_WIRE = {
    "int32": 0, "int64": 0, "uint32": 0, "uint64": 0, "sint32": 0, "sint64": 0, "bool": 0,
    "fixed64": 1, "sfixed64": 1, "double": 1, "string": 2, "bytes": 2, "fixed32": 5, "sfixed32": 5, "float": 5,
}
WIRE_NAMES = {0: "varint", 1: "i64", 2: "len", 5: "i32"}
MAX_FIELD_NUMBER = 2**29 - 1


# --------------------------------------------------------------------------------------------------------------
# A proto3 parser for the subset OTLP uses
# --------------------------------------------------------------------------------------------------------------
class ProtoError(ValueError):
    """The text is not a .proto file this parser reads (or not a valid one)."""


@dataclass
class Field:
    name: str
    number: int
    type: str  # as written: a scalar, or a message/enum reference (for a map: the value type)
    label: str  # "", "repeated" or "optional"
    oneof: str | None
    line: int
    key_type: str | None = None  # a map<key_type, type> field
    options: dict[str, str] = field(default_factory=dict)
    resolved: str | None = None  # full name of the message or enum `type` refers to (None: a scalar)
    resolved_kind: str | None = None  # "message" or "enum"

    def wire_type(self) -> int:
        """The wire type protobuf writes this field with (proto3: repeated scalars are packed)."""
        if self.key_type is not None or self.resolved_kind == "message":
            return 2
        scalar = 0 if self.resolved_kind == "enum" else SCALAR_WIRE[self.type]
        if self.label == "repeated" and scalar != 2 and self.options.get("packed") != "false":
            return 2
        return scalar

    def type_name(self) -> str:
        """The field's type as compared with the wheel: a scalar, a full name, or map<key, value>."""
        value = self.resolved or self.type
        return f"map<{self.key_type}, {value}>" if self.key_type is not None else value


@dataclass
class Message:
    full_name: str
    file: str
    line: int
    fields: list[Field] = field(default_factory=list)
    oneofs: list[str] = field(default_factory=list)
    reserved_ranges: list[tuple[int, int]] = field(default_factory=list)  # inclusive
    reserved_names: list[str] = field(default_factory=list)

    def get(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


@dataclass
class Enum:
    full_name: str
    file: str
    values: dict[str, int] = field(default_factory=dict)
    reserved_ranges: list[tuple[int, int]] = field(default_factory=list)
    reserved_names: list[str] = field(default_factory=list)


@dataclass
class ProtoFile:
    name: str  # path relative to the proto root, as imports name it
    package: str = ""
    imports: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)  # nested ones too
    enums: list[Enum] = field(default_factory=list)
    services: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)  # service -> rpc -> (in, out)


_TOKEN = re.compile(
    r"""(?P<space>\s+)|(?P<comment>//[^\n]*|/\*.*?\*/)|(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    |(?P<number>-?(?:0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?))
    |(?P<ident>\.?[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)|(?P<symbol>[{}\[\]()<>;=,:])""",
    re.DOTALL | re.VERBOSE,
)


@dataclass
class Token:
    kind: str
    text: str
    line: int


def tokenize(text: str, file: str) -> list[Token]:
    tokens, pos, line = [], 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ProtoError(f"{file}:{line}: unexpected character {text[pos]!r}")
        kind = m.lastgroup or ""
        if kind not in ("space", "comment"):
            tokens.append(Token(kind, m.group(), line))
        line += m.group().count("\n")
        pos = m.end()
    return tokens


class _Parser:
    """Recursive descent over the tokens of one file; every construct it does not know is an error."""

    def __init__(self, text: str, name: str) -> None:
        self.toks = tokenize(text, name)
        self.i = 0
        self.file = ProtoFile(name)

    # -- tokens --
    def peek(self, ahead: int = 0) -> Token:
        j = self.i + ahead
        if j < len(self.toks):
            return self.toks[j]
        return Token("eof", "<end of file>", self.toks[-1].line if self.toks else 1)

    def next(self) -> Token:
        tok = self.peek()
        if tok.kind == "eof":
            raise self.error("unexpected end of file")
        self.i += 1
        return tok

    def error(self, what: str) -> ProtoError:
        return ProtoError(f"{self.file.name}:{self.peek().line}: {what}")

    def expect(self, text: str) -> Token:
        tok = self.next()
        if tok.text != text:
            self.i -= 1
            raise self.error(f"expected {text!r}, found {tok.text!r}")
        return tok

    def ident(self) -> str:
        tok = self.next()
        if tok.kind != "ident":
            self.i -= 1
            raise self.error(f"expected a name, found {tok.text!r}")
        return tok.text

    def integer(self) -> int:
        tok = self.next()
        if tok.kind != "number" or not re.fullmatch(r"-?(0[xX][0-9a-fA-F]+|[0-9]+)", tok.text):
            self.i -= 1
            raise self.error(f"expected an integer, found {tok.text!r}")
        return int(tok.text, 0) if not re.fullmatch(r"-?0[0-7]+", tok.text) else int(tok.text, 8)

    def string(self) -> str:
        tok = self.next()
        if tok.kind != "string":
            self.i -= 1
            raise self.error(f"expected a string, found {tok.text!r}")
        value = tok.text[1:-1]
        while self.peek().kind == "string":  # adjacent literals concatenate
            value += self.next().text[1:-1]
        return value

    def constant(self) -> str:
        tok = self.peek()
        if tok.kind == "string":
            return self.string()
        if tok.kind in ("ident", "number"):
            return self.next().text
        raise self.error(f"option value {tok.text!r} is not supported (only scalar constants)")

    # -- statements --
    def option_name(self) -> str:
        parts = []
        while self.peek().text != "=":
            parts.append(self.next().text)
        return "".join(parts)

    def option(self) -> tuple[str, str]:
        self.expect("option")
        name = self.option_name()
        self.expect("=")
        value = self.constant()
        self.expect(";")
        return name, value

    def parse(self) -> ProtoFile:
        f = self.file
        while self.peek().kind != "eof":
            word = self.peek().text
            if word == "syntax":
                self.next()
                self.expect("=")
                if (syntax := self.string()) != "proto3":
                    raise self.error(f'syntax "{syntax}" is not supported (proto3 only)')
                self.expect(";")
            elif word == "package":
                self.next()
                f.package = self.ident()
                self.expect(";")
            elif word == "import":
                self.next()
                if self.peek().text in ("public", "weak"):
                    self.next()
                f.imports.append(self.string())
                self.expect(";")
            elif word == "option":
                name, value = self.option()
                f.options[name] = value
            elif word == "message":
                self.message(f.package)
            elif word == "enum":
                self.enum(f.package)
            elif word == "service":
                self.service()
            elif word == ";":
                self.next()
            else:
                raise self.error(f"{word!r} is not supported at file level")
        return f

    def message(self, scope: str) -> None:
        line = self.expect("message").line
        name = self.ident()
        msg = Message(f"{scope}.{name}" if scope else name, self.file.name, line)
        self.file.messages.append(msg)
        self.expect("{")
        while self.peek().text != "}":
            word = self.peek().text
            if word == "message":
                self.message(msg.full_name)
            elif word == "enum":
                self.enum(msg.full_name)
            elif word == "oneof":
                self.next()
                oneof = self.ident()
                msg.oneofs.append(oneof)
                self.expect("{")
                while self.peek().text != "}":
                    if self.peek().text == "option":
                        self.option()
                    elif self.peek().text == ";":
                        self.next()
                    else:
                        msg.fields.append(self.field(oneof))
                self.expect("}")
            elif word == "reserved":
                self.reserved(msg.reserved_ranges, msg.reserved_names, MAX_FIELD_NUMBER)
            elif word == "option":
                self.option()
            elif word == ";":
                self.next()
            elif word in ("extensions", "extend", "group", "required"):
                raise self.error(f"{word!r} is not supported (proto3 subset)")
            else:
                msg.fields.append(self.field(None))
        self.expect("}")
        self.check_unique(msg)

    def field(self, oneof: str | None) -> Field:
        line = self.peek().line
        label = ""
        key_type = None
        if self.peek().text == "map" and self.peek(1).text == "<":
            self.next()
            self.expect("<")
            key_type = self.ident()
            self.expect(",")
            type_ = self.ident()
            self.expect(">")
        else:
            if self.peek().text in ("repeated", "optional") and self.peek(1).kind == "ident" \
                    and self.peek(2).kind == "ident":
                label = self.next().text
            type_ = self.ident()
        name = self.ident()
        self.expect("=")
        number = self.integer()
        options: dict[str, str] = {}
        if self.peek().text == "[":
            self.next()
            while True:
                opt = self.option_name()
                self.expect("=")
                options[opt] = self.constant()
                if self.peek().text != ",":
                    break
                self.next()
            self.expect("]")
        self.expect(";")
        if not 1 <= number <= MAX_FIELD_NUMBER or 19000 <= number <= 19999:
            raise ProtoError(f"{self.file.name}:{line}: field {name} has the invalid number {number}")
        return Field(name, number, type_, label, oneof, line, key_type, options)

    def enum(self, scope: str) -> None:
        self.expect("enum")
        name = self.ident()
        enum = Enum(f"{scope}.{name}" if scope else name, self.file.name)
        self.file.enums.append(enum)
        self.expect("{")
        while self.peek().text != "}":
            word = self.peek().text
            if word == "option":
                self.option()
            elif word == "reserved":
                self.reserved(enum.reserved_ranges, enum.reserved_names, 2**31 - 1)
            elif word == ";":
                self.next()
            else:
                value = self.ident()
                self.expect("=")
                enum.values[value] = self.integer()
                if self.peek().text == "[":
                    while self.next().text != "]":
                        pass
                self.expect(";")
        self.expect("}")

    def reserved(self, ranges: list[tuple[int, int]], names: list[str], largest: int) -> None:
        self.expect("reserved")
        while True:
            if self.peek().kind == "string":
                names.append(self.string())
            else:
                first = last = self.integer()
                if self.peek().text == "to":
                    self.next()
                    if self.peek().text == "max":
                        self.next()
                        last = largest
                    else:
                        last = self.integer()
                ranges.append((first, last))
            if self.peek().text != ",":
                break
            self.next()
        self.expect(";")

    def service(self) -> None:
        self.expect("service")
        rpcs = self.file.services.setdefault(self.ident(), {})
        self.expect("{")
        while self.peek().text != "}":
            if self.peek().text == "option":
                self.option()
            elif self.peek().text == ";":
                self.next()
            else:
                self.expect("rpc")
                name = self.ident()
                types = []
                for keyword in ("", "returns"):
                    if keyword:
                        self.expect(keyword)
                    self.expect("(")
                    stream = "stream " if self.peek().text == "stream" and self.peek(1).kind == "ident" else ""
                    if stream:
                        self.next()
                    types.append(stream + self.ident())
                    self.expect(")")
                rpcs[name] = (types[0], types[1])
                if self.peek().text == "{":
                    self.next()
                    while self.peek().text != "}":
                        if self.peek().text == ";":
                            self.next()
                        else:
                            self.option()
                    self.next()
                else:
                    self.expect(";")
        self.expect("}")

    def check_unique(self, msg: Message) -> None:
        for attr in ("name", "number"):
            seen: dict[object, Field] = {}
            for f in msg.fields:
                key = getattr(f, attr)
                if key in seen:
                    raise ProtoError(f"{self.file.name}:{f.line}: {msg.full_name} has two fields with {attr} {key}")
                seen[key] = f


@dataclass
class Schema:
    """Every message and enum of a set of .proto files, with type references resolved."""

    files: dict[str, ProtoFile]
    messages: dict[str, Message]
    enums: dict[str, Enum]


def parse_proto(text: str, name: str) -> ProtoFile:
    return _Parser(text, name).parse()


def load_schema(root: Path) -> Schema:
    """Parse every .proto file under root and resolve the type references (as protoc does: a name's first
    component is looked up from the innermost scope outwards, among the file's own and its imports' symbols)."""
    files = {}
    for path in sorted(root.rglob("*.proto")):
        name = path.relative_to(root).as_posix()
        files[name] = parse_proto(path.read_text(encoding="utf-8"), name)
    messages = {m.full_name: m for f in files.values() for m in f.messages}
    enums = {e.full_name: e for f in files.values() for e in f.enums}
    for f in files.values():
        missing = [i for i in f.imports if i not in files]
        if missing:
            raise ProtoError(f"{f.name}: imports {', '.join(missing)}, which is not under {root}")
        visible = [f, *(files[i] for i in f.imports)]
        kinds = {m.full_name: "message" for v in visible for m in v.messages}
        kinds |= {e.full_name: "enum" for v in visible for e in v.enums}
        symbols = set(kinds) | {".".join(v.package.split(".")[:n + 1]) for v in visible
                                for n in range(len(v.package.split(".")))}
        for msg in f.messages:
            for fld in msg.fields:
                if fld.type in SCALAR_WIRE:
                    continue
                fld.resolved = resolve(fld.type, msg.full_name, symbols)
                if fld.resolved is None or fld.resolved not in kinds:
                    raise ProtoError(f"{f.name}:{fld.line}: unknown type {fld.type} of {msg.full_name}.{fld.name}")
                fld.resolved_kind = kinds[fld.resolved]
    return Schema(files, messages, enums)


def resolve(ref: str, scope: str, symbols: set[str]) -> str | None:
    if ref.startswith("."):
        return ref[1:]
    first = ref.split(".")[0]
    while True:
        candidate = f"{scope}.{first}" if scope else first
        if candidate in symbols:
            full = f"{scope}.{ref}" if scope else ref
            return full if full in symbols else None
        if not scope:
            return None
        scope = scope.rpartition(".")[0]


# --------------------------------------------------------------------------------------------------------------
# proto/ against the installed wheel
# --------------------------------------------------------------------------------------------------------------
F = descriptor_pb2.FieldDescriptorProto
_WHEEL_SCALARS = {
    F.TYPE_DOUBLE: "double", F.TYPE_FLOAT: "float", F.TYPE_INT64: "int64", F.TYPE_UINT64: "uint64",
    F.TYPE_INT32: "int32", F.TYPE_FIXED64: "fixed64", F.TYPE_FIXED32: "fixed32", F.TYPE_BOOL: "bool",
    F.TYPE_STRING: "string", F.TYPE_BYTES: "bytes", F.TYPE_UINT32: "uint32", F.TYPE_SFIXED32: "sfixed32",
    F.TYPE_SFIXED64: "sfixed64", F.TYPE_SINT32: "sint32", F.TYPE_SINT64: "sint64",
}


def wheel_file(name: str) -> descriptor_pb2.FileDescriptorProto | None:
    """The FileDescriptorProto the wheel's generated module for `name` registers (None: the wheel has none)."""
    module = name.removesuffix(".proto").replace("/", ".") + "_pb2"
    try:
        desc = importlib.import_module(module).DESCRIPTOR
    except ImportError:
        return None
    fdp = descriptor_pb2.FileDescriptorProto()
    desc.CopyToProto(fdp)
    return fdp


def _walk(scope: str, messages: list[descriptor_pb2.DescriptorProto]
          ) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    for m in messages:
        full = f"{scope}.{m.name}"
        yield full, m
        yield from _walk(full, list(m.nested_type))


def wheel_signatures(fdp: descriptor_pb2.FileDescriptorProto) -> tuple[dict[str, dict[str, tuple[object, ...]]],
                                                                       dict[str, dict[str, int]]]:
    """message -> field -> (number, label, type, oneof), and enum -> value -> number, of one wheel file."""
    msgs = dict(_walk(fdp.package, list(fdp.message_type)))
    entries = {name: m for name, m in msgs.items() if m.options.map_entry}
    out: dict[str, dict[str, tuple[object, ...]]] = {}
    enums = {f"{fdp.package}.{e.name}": {v.name: v.number for v in e.value} for e in fdp.enum_type}
    for full, m in msgs.items():
        enums |= {f"{full}.{e.name}": {v.name: v.number for v in e.value} for e in m.enum_type}
        if m.options.map_entry:
            continue

        def type_of(f: descriptor_pb2.FieldDescriptorProto) -> str:
            return f.type_name.lstrip(".") if f.type in (F.TYPE_MESSAGE, F.TYPE_ENUM) else _WHEEL_SCALARS[f.type]

        sig: dict[str, tuple[object, ...]] = {}
        for f in m.field:
            entry = entries.get(f.type_name.lstrip("."))
            real_oneof = f.HasField("oneof_index") and not f.proto3_optional
            oneof = m.oneof_decl[f.oneof_index].name if real_oneof else None
            if entry is not None:
                key, value = entry.field
                sig[f.name] = (f.number, "", f"map<{type_of(key)}, {type_of(value)}>", oneof)
            else:
                label = "repeated" if f.label == F.LABEL_REPEATED else "optional" if f.proto3_optional else ""
                sig[f.name] = (f.number, label, type_of(f), oneof)
        out[full] = sig
    return out, enums


def check_against_wheel(schema: Schema) -> list[str]:
    """Every difference between the .proto files and the wheel's descriptors of the same files."""
    problems = []
    for name, pf in schema.files.items():
        fdp = wheel_file(name)
        if fdp is None:
            problems.append(f"proto/{name}: the installed {WHEEL} has no generated module for it")
            continue
        if fdp.package != pf.package:
            problems.append(f"proto/{name}: package {pf.package} in proto/, {fdp.package} in the {WHEEL} wheel")
        if sorted(fdp.dependency) != sorted(pf.imports):
            problems.append(f"proto/{name}: imports {sorted(pf.imports)} in proto/, {sorted(fdp.dependency)} in "
                            f"the {WHEEL} wheel")
        wheel_msgs, wheel_enums = wheel_signatures(fdp)
        ours = {m.full_name: m for m in pf.messages}
        for missing in sorted(set(wheel_msgs) - set(ours)):
            problems.append(f"message {missing}: in the {WHEEL} wheel, not in proto/{name}")
        for extra in sorted(set(ours) - set(wheel_msgs)):
            problems.append(f"message {extra}: in proto/{name}, not in the {WHEEL} wheel")
        for full in sorted(set(ours) & set(wheel_msgs)):
            problems += _compare_message(ours[full], wheel_msgs[full])
        problems += _compare_reserved(pf, fdp)
        our_enums = {e.full_name: e.values for e in pf.enums}
        for full in sorted(set(our_enums) | set(wheel_enums)):
            if our_enums.get(full) != wheel_enums.get(full):
                problems.append(f"enum {full}: {our_enums.get(full)} in proto/, {wheel_enums.get(full)} in the "
                                f"{WHEEL} wheel")
        wheel_rpcs = {s.name: {m.name: (m.input_type.lstrip("."), m.output_type.lstrip(".")) for m in s.method}
                      for s in fdp.service}
        our_rpcs = {s: {r: tuple(resolve(t, pf.package, set(schema.messages)) or t for t in io)
                        for r, io in rpcs.items()} for s, rpcs in pf.services.items()}
        if our_rpcs != wheel_rpcs:
            problems.append(f"proto/{name}: services {our_rpcs} in proto/, {wheel_rpcs} in the {WHEEL} wheel")
        wheel_options = {fd.name: str(v).lower() if isinstance(v, bool) else str(v)
                         for fd, v in fdp.options.ListFields()}
        if pf.options != wheel_options:
            problems.append(f"proto/{name}: options {pf.options} in proto/, {wheel_options} in the {WHEEL} wheel")
    return problems


def _compare_message(msg: Message, wheel: dict[str, tuple[object, ...]]) -> list[str]:
    problems = []
    what = ("number", "label", "type", "oneof")
    for name in sorted(set(wheel) | {f.name for f in msg.fields}):
        f = msg.get(name)
        ours = (f.number, f.label, f.type_name(), f.oneof) if f else None
        theirs = wheel.get(name)
        if ours is None or theirs is None:
            where = "the wheel" if ours is None else "proto/"
            problems.append(f"{msg.full_name}.{name}: only in {where} (proto/ {ours}, {WHEEL} wheel {theirs})")
            continue
        for label, a, b in zip(what, ours, theirs, strict=True):
            if a != b:
                problems.append(f"{msg.full_name}.{name}: {label} {a!r} in proto/, {b!r} in the {WHEEL} wheel")
    return problems


def _compare_reserved(pf: ProtoFile, fdp: descriptor_pb2.FileDescriptorProto) -> list[str]:
    wheel = {full: ([(r.start, r.end - 1) for r in m.reserved_range], list(m.reserved_name))
             for full, m in _walk(fdp.package, list(fdp.message_type))}
    return [f"{m.full_name}: reserved {(m.reserved_ranges, m.reserved_names)} in proto/, {wheel[m.full_name]} in "
            f"the {WHEEL} wheel"
            for m in pf.messages
            if m.full_name in wheel and (m.reserved_ranges, m.reserved_names) != wheel[m.full_name]]


# --------------------------------------------------------------------------------------------------------------
# The decoders' assumptions, read from their source
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CField:
    """One line of _fastdecode.c's OTLP_FIELDS: X(message, field, number, kind, sub-message)."""

    message: str  # full name
    name: str
    number: int
    kind: str  # K_VARINT, K_I64, K_I32, K_STR, K_BYTES, K_MSG
    sub: str | None  # full name of the sub-message (K_MSG)


# The wire type each K_ kind is read with, and the .proto types it stands for. K_VARINT is a plain varint read as
# a two's-complement integer (int32/int64/uint*/bool/enum): a zigzag sint would be misread, so it does not match.
C_KIND_WIRE = {"K_VARINT": 0, "K_I64": 1, "K_I32": 5, "K_STR": 2, "K_BYTES": 2, "K_MSG": 2}
C_KIND_TYPES = {
    "K_VARINT": {"int32", "int64", "uint32", "uint64", "bool", "enum"},
    "K_I64": {"fixed64", "sfixed64", "double"}, "K_I32": {"fixed32", "sfixed32", "float"},
    "K_STR": {"string"}, "K_BYTES": {"bytes"}, "K_MSG": {"message"},
}
_C_ROW = re.compile(r"X\((\w+), (\w+), (\d+), (K_\w+), (\w+)\)")


def c_fields(source: str) -> list[CField]:
    """The OTLP_FIELDS table of the C source, with message names from its MSG_NAMES."""
    names_block = re.search(r"MSG_NAMES\[M_COUNT\] = \{(.*?)\};", source, re.DOTALL)
    assert names_block, "_fastdecode.c: MSG_NAMES not found"
    names = dict(re.findall(r'\[M_(\w+)\] = "([\w.]+)"', names_block.group(1)))
    lines = source.split("\n")
    start = lines.index("#define OTLP_FIELDS(X) \\")  # ValueError: the table is gone or was renamed
    rows = []
    for line in lines[start + 1:]:
        m = _C_ROW.fullmatch(line.strip().removesuffix("\\").strip())
        assert m, f"_fastdecode.c: an OTLP_FIELDS line this test does not read: {line!r}"
        msg, name, number, kind, sub = m.groups()
        assert msg in names and (sub == "NONE" or sub in names), f"_fastdecode.c: unknown message in {line!r}"
        assert kind in C_KIND_WIRE and (sub == "NONE") == (kind != "K_MSG"), f"_fastdecode.c: bad row {line!r}"
        rows.append(CField(names[msg], name, int(number), kind, None if sub == "NONE" else names[sub]))
        if not line.endswith("\\"):
            break
    return rows


def proto_type_class(f: Field) -> str:
    return f.resolved_kind or f.type


def reachable(schema: Schema, root: str) -> set[str]:
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in schema.messages:
            continue
        seen.add(name)
        todo += [f.resolved for f in schema.messages[name].fields if f.resolved_kind == "message" and f.resolved]
    return seen


def check_c_decoder(schema: Schema, rows: list[CField]) -> list[str]:
    """Differences between _fastdecode.c's field table and proto/, one line each."""
    problems = []
    for r in rows:
        msg = schema.messages.get(r.message)
        f = msg.get(r.name) if msg else None
        where = f"{r.message}.{r.name}"
        if msg is None:
            problems.append(f"{where}: _fastdecode.c reads message {r.message}, which is not in proto/")
        elif f is None:
            problems.append(f"{where}: _fastdecode.c reads it as field {r.number}, proto/ has no such field")
        else:
            if f.number != r.number:
                problems.append(f"{where}: field number {f.number} in proto/, {r.number} in _fastdecode.c")
            wire = C_KIND_WIRE[r.kind]
            if f.wire_type() != wire:
                problems.append(f"{where}: wire type {f.wire_type()} ({WIRE_NAMES[f.wire_type()]}, {f.type}) in "
                                f"proto/, {wire} ({WIRE_NAMES[wire]}, {r.kind}) in _fastdecode.c")
            elif proto_type_class(f) not in C_KIND_TYPES[r.kind]:
                problems.append(f"{where}: type {f.type} in proto/, read as {r.kind} in _fastdecode.c")
            elif r.sub is not None and f.resolved != r.sub:
                problems.append(f"{where}: message type {f.resolved} in proto/, {r.sub} in _fastdecode.c")
    # Completeness: validate() must know every field of the messages it walks (strings are UTF-8 checked, messages
    # walked), and every message reachable from the request must be walked.
    walked = {r.message for r in rows}
    known = {(r.message, r.name) for r in rows}
    for name in sorted(walked & set(schema.messages)):
        for f in schema.messages[name].fields:
            if (name, f.name) not in known:
                problems.append(f"{name}.{f.name}: field {f.number} ({f.type}) in proto/, not in _fastdecode.c's "
                                "OTLP_FIELDS")
    for name in sorted(reachable(schema, REQUEST) - walked):
        problems.append(f"message {name}: reachable from the request in proto/, not in _fastdecode.c's OTLP_FIELDS")
    return problems


def check_python_decoder(schema: Schema, members: Mapping[str, str], oneof: str) -> list[str]:
    """decode.py's AnyValue member names and types against proto/."""
    msg = schema.messages.get(ANY_VALUE)
    if msg is None:
        return [f"message {ANY_VALUE}: read by decode.py, not in proto/"]
    problems = []
    if oneof not in msg.oneofs:
        problems.append(f"{ANY_VALUE}: decode.py reads the oneof {oneof!r}, proto/ has {msg.oneofs}")
    for name, expected in members.items():
        f = msg.get(name)
        where = f"{ANY_VALUE}.{name}"
        if f is None:
            problems.append(f"{where}: decode.py tells this member apart by name, proto/ has no such field")
            continue
        if f.oneof != oneof:
            problems.append(f"{where}: in oneof {f.oneof} in proto/, decode.py expects oneof {oneof}")
        if (f.resolved or f.type) != expected:
            problems.append(f"{where}: type {f.resolved or f.type} in proto/, decode.py reads it as {expected}")
    return problems


# --------------------------------------------------------------------------------------------------------------
# The checks on the real files
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def schema() -> Schema:
    return load_schema(PROTO_DIR)


def report(problems: list[str]) -> str:
    return f"{len(problems)} difference(s):\n" + "\n".join(problems)


def test_proto_dir_holds_the_request_and_what_it_imports(schema: Schema) -> None:
    for name in REQUIRED_FILES:
        assert name in schema.files, f"proto/{name} is missing"
    assert REQUEST in schema.messages
    assert {"opentelemetry.proto.trace.v1.Span", ANY_VALUE, "opentelemetry.proto.resource.v1.Resource"} \
        <= reachable(schema, REQUEST)


def test_proto_dir_is_the_version_in_the_installed_wheel(schema: Schema) -> None:
    problems = check_against_wheel(schema)
    assert not problems, report(problems)


def test_c_decoder_field_table_matches_proto(schema: Schema) -> None:
    rows = c_fields(C_SOURCE.read_text(encoding="utf-8"))
    assert len(rows) >= 50  # the table was found and read whole
    problems = check_c_decoder(schema, rows)
    assert not problems, report(problems)


@pytest.mark.skipif(not fastdecode.ACCELERATED, reason="the C extension did not build; the source is checked above")
def test_compiled_c_decoder_uses_its_source_table() -> None:
    """The built module's tags (what the extraction compares fields with) are the source table's numbers and the
    wire types of their kinds: the module is not stale and TAG/WT_OF are right."""
    assert fastdecode._c is not None
    compiled = list(fastdecode._c._fields())
    source = [(r.message, r.name, r.number, C_KIND_WIRE[r.kind])
              for r in c_fields(C_SOURCE.read_text(encoding="utf-8"))]
    assert compiled == source


def test_python_decoder_members_match_proto(schema: Schema) -> None:
    problems = check_python_decoder(schema, decode.ANY_VALUE_MEMBERS, decode._ANY_ONEOF)
    assert not problems, report(problems)


# --------------------------------------------------------------------------------------------------------------
# The checks fail, and say what differs
# --------------------------------------------------------------------------------------------------------------
def mutated(tmp_path: Path, file: str, old: str, new: str) -> Schema:
    """proto/ copied with `old` replaced by `new` (once) in `file`, parsed."""
    root = tmp_path / "proto"
    shutil.copytree(PROTO_DIR, root, ignore=shutil.ignore_patterns("*.py", "*.md", "__pycache__"))
    path = root / file
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} is not in proto/{file} exactly once"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return load_schema(root)


TRACE = "opentelemetry/proto/trace/v1/trace.proto"
COMMON = "opentelemetry/proto/common/v1/common.proto"
START = "fixed64 start_time_unix_nano = 7;"


def test_a_moved_field_is_reported_with_both_numbers(tmp_path: Path) -> None:
    schema = mutated(tmp_path, TRACE, START, "fixed64 start_time_unix_nano = 17;")
    rows = c_fields(C_SOURCE.read_text(encoding="utf-8"))
    assert check_c_decoder(schema, rows) == [
        "opentelemetry.proto.trace.v1.Span.start_time_unix_nano: field number 17 in proto/, 7 in _fastdecode.c"]
    assert (f"opentelemetry.proto.trace.v1.Span.start_time_unix_nano: number 17 in proto/, 7 in the {WHEEL} wheel"
            in check_against_wheel(schema))


def test_a_retyped_field_is_reported_with_both_wire_types(tmp_path: Path) -> None:
    schema = mutated(tmp_path, TRACE, START, "uint64 start_time_unix_nano = 7;")
    assert check_c_decoder(schema, c_fields(C_SOURCE.read_text(encoding="utf-8"))) == [
        "opentelemetry.proto.trace.v1.Span.start_time_unix_nano: wire type 0 (varint, uint64) in proto/, "
        "1 (i64, K_I64) in _fastdecode.c"]
    assert (f"opentelemetry.proto.trace.v1.Span.start_time_unix_nano: type 'uint64' in proto/, 'fixed64' in the "
            f"{WHEEL} wheel" in check_against_wheel(schema))


def test_a_string_turned_bytes_is_reported(tmp_path: Path) -> None:
    """Same wire type, but the C validator UTF-8 checks strings only."""
    schema = mutated(tmp_path, COMMON, "string key = 1;", "bytes key = 1;")
    assert check_c_decoder(schema, c_fields(C_SOURCE.read_text(encoding="utf-8"))) == [
        "opentelemetry.proto.common.v1.KeyValue.key: type bytes in proto/, read as K_STR in _fastdecode.c"]


def test_a_new_field_the_c_decoder_does_not_know_is_reported(tmp_path: Path) -> None:
    schema = mutated(tmp_path, TRACE, START, START + "\n  string note = 17;")
    assert check_c_decoder(schema, c_fields(C_SOURCE.read_text(encoding="utf-8"))) == [
        "opentelemetry.proto.trace.v1.Span.note: field 17 (string) in proto/, not in _fastdecode.c's OTLP_FIELDS"]


def test_a_changed_c_table_is_reported(schema: Schema) -> None:
    source = C_SOURCE.read_text(encoding="utf-8")
    row = "X(SPAN, start_time_unix_nano, 7, K_I64, NONE)"
    assert source.count(row) == 1
    rows = c_fields(source.replace(row, "X(SPAN, start_time_unix_nano, 9, K_I32, NONE)"))
    assert check_c_decoder(schema, rows) == [
        "opentelemetry.proto.trace.v1.Span.start_time_unix_nano: field number 7 in proto/, 9 in _fastdecode.c",
        "opentelemetry.proto.trace.v1.Span.start_time_unix_nano: wire type 1 (i64, fixed64) in proto/, "
        "5 (i32, K_I32) in _fastdecode.c"]


def test_a_renamed_any_value_member_is_reported(tmp_path: Path) -> None:
    schema = mutated(tmp_path, COMMON, "string string_value = 1;", "string str_value = 1;")
    problems = check_python_decoder(schema, decode.ANY_VALUE_MEMBERS, decode._ANY_ONEOF)
    assert problems == [f"{ANY_VALUE}.string_value: decode.py tells this member apart by name, proto/ has no such "
                        "field"]
    assert f"{ANY_VALUE}.string_value: _fastdecode.c reads it as field 1, proto/ has no such field" in \
        check_c_decoder(schema, c_fields(C_SOURCE.read_text(encoding="utf-8")))
    assert check_python_decoder(schema, {"int_value": "double"}, "value") == [
        f"{ANY_VALUE}.int_value: type int64 in proto/, decode.py reads it as double"]


def test_the_printer_reproduces_the_wheel(tmp_path: Path) -> None:
    """proto/from_descriptors.py (how the files here were made, see proto/README.md) prints what the wheel holds."""
    sys.path.insert(0, str(PROTO_DIR))
    try:
        printer = importlib.import_module("from_descriptors")
    finally:
        sys.path.remove(str(PROTO_DIR))
    for path, text in printer.rendered().items():
        out = tmp_path / path.relative_to(PROTO_DIR)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    printed = load_schema(tmp_path)
    assert set(printed.files) == set(REQUIRED_FILES)
    assert check_against_wheel(printed) == []


# --------------------------------------------------------------------------------------------------------------
# The parser on the constructs upstream's files use
# --------------------------------------------------------------------------------------------------------------
SAMPLE = """
// A line comment, and a block one:
/* message NotAMessage { string x = 1; } */
syntax = "proto3";
package a.b;
import "other.proto";
option go_package = "example.com/a" "/b";
option java_multiple_files = true;
message M {
  reserved 1000;
  reserved 20 to 22, 30 to max;
  reserved "old_name";
  enum Kind {
    KIND_UNSPECIFIED = 0;
    KIND_MASK = 0x000000FF [deprecated = true];
  };
  message Inner { fixed64 t = 1; }
  oneof value {
    string s = 1;
    Inner inner = 2;
  }
  repeated Inner list = 3;
  map<string, o.Other> by_name = 4;
  optional int32 maybe = 5;
  repeated int64 nums = 6;
  repeated int64 loose = 7 [packed = false];
  Kind kind = 8 [deprecated = true];
  string message = 9;
  o.Other other = 10;
}
service S {
  rpc Do(M) returns (stream M) {}
}
"""
OTHER = 'syntax = "proto3";\npackage o;\nmessage Other { bytes id = 1; }\n'


def sample_schema(tmp_path: Path, text: str = SAMPLE) -> Schema:
    (tmp_path / "sample.proto").write_text(text, encoding="utf-8")
    (tmp_path / "other.proto").write_text(OTHER, encoding="utf-8")
    return load_schema(tmp_path)


def test_parser_reads_fields_types_and_wire_types(tmp_path: Path) -> None:
    s = sample_schema(tmp_path)
    m = s.messages["a.b.M"]
    got = {f.name: (f.number, f.label, f.type_name(), f.oneof, f.wire_type()) for f in m.fields}
    assert got == {
        "s": (1, "", "string", "value", 2),
        "inner": (2, "", "a.b.M.Inner", "value", 2),
        "list": (3, "repeated", "a.b.M.Inner", None, 2),
        "by_name": (4, "", "map<string, o.Other>", None, 2),
        "maybe": (5, "optional", "int32", None, 0),
        "nums": (6, "repeated", "int64", None, 2),  # packed
        "loose": (7, "repeated", "int64", None, 0),
        "kind": (8, "", "a.b.M.Kind", None, 0),
        "message": (9, "", "string", None, 2),
        "other": (10, "", "o.Other", None, 2),
    }
    assert (m.reserved_ranges, m.reserved_names) == ([(1000, 1000), (20, 22), (30, MAX_FIELD_NUMBER)], ["old_name"])
    assert s.enums["a.b.M.Kind"].values == {"KIND_UNSPECIFIED": 0, "KIND_MASK": 255}
    assert s.messages["a.b.M.Inner"].fields[0].wire_type() == 1
    assert "a.b.NotAMessage" not in s.messages
    f = s.files["sample.proto"]
    assert f.options == {"go_package": "example.com/a/b", "java_multiple_files": "true"}
    assert f.services == {"S": {"Do": ("M", "stream M")}}


@pytest.mark.parametrize(("text", "error"), [
    ('syntax = "proto2";', r'sample.proto:1: syntax "proto2" is not supported'),
    ("message M {\n  extensions 100 to 200;\n}", r"sample.proto:2: 'extensions' is not supported"),
    ("message M {\n  required int32 x = 1;\n}", r"sample.proto:2: 'required' is not supported"),
    ("message M {\n  Missing x = 1;\n}", r"sample.proto:2: unknown type Missing of M.x"),
    ("message M {\n  int32 x = 1;\n  int32 y = 1;\n}", r"sample.proto:3: M has two fields with number 1"),
    ("message M {\n  int32 x = 0;\n}", r"sample.proto:2: field x has the invalid number 0"),
    ("message M {\n  int32 x = 1;\n", r"sample.proto:2: unexpected end of file"),
    ("message M { int32 x = 1 }", r"sample.proto:1: expected ';', found '}'"),
    ("extend Foo { int32 x = 1; }", r"sample.proto:1: 'extend' is not supported at file level"),
    ('import "nowhere.proto";', r"sample.proto: imports nowhere.proto, which is not under"),
])
def test_parser_refuses_what_it_does_not_read(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ProtoError, match=error):
        sample_schema(tmp_path, text)
