"""Write the .proto files in this folder from the descriptors of the installed `opentelemetry-proto` wheel.

    .venv/bin/python proto/from_descriptors.py [--check]

The wheel carries, in each `*_pb2.py`, the FileDescriptorProto that protoc compiled from the upstream .proto file
(opentelemetry-python generates them from a tagged opentelemetry-proto release). This script prints each of the
FILES below back as .proto text: the same package, imports, options, messages, fields (name, number, type, label,
oneof), enums, reserved numbers and services. Upstream's comments are not in a descriptor, so they are not here;
declaration order inside a message is kept for fields, nested types come first. Anything this printer does not
know how to print (groups, extensions, options other than the ones below) stops it with an error instead of being
left out.

--check writes nothing and exits 1 if a file here differs from what would be written.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

HERE = Path(__file__).resolve().parent

# The generated modules whose files are written, in dependency order (a module registers its file's descriptor).
FILES = (
    "opentelemetry.proto.common.v1.common_pb2",
    "opentelemetry.proto.resource.v1.resource_pb2",
    "opentelemetry.proto.trace.v1.trace_pb2",
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
)

F = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    F.TYPE_DOUBLE: "double", F.TYPE_FLOAT: "float", F.TYPE_INT64: "int64", F.TYPE_UINT64: "uint64",
    F.TYPE_INT32: "int32", F.TYPE_FIXED64: "fixed64", F.TYPE_FIXED32: "fixed32", F.TYPE_BOOL: "bool",
    F.TYPE_STRING: "string", F.TYPE_BYTES: "bytes", F.TYPE_UINT32: "uint32", F.TYPE_SFIXED32: "sfixed32",
    F.TYPE_SFIXED64: "sfixed64", F.TYPE_SINT32: "sint32", F.TYPE_SINT64: "sint64",
}
INDENT = "  "


class Unprintable(ValueError):
    """The descriptor uses something this printer does not print (it would otherwise be silently dropped)."""


def header(fdp: descriptor_pb2.FileDescriptorProto, distribution: str, version: str) -> list[str]:
    return [
        f"// {fdp.name}",
        "//",
        f"// Printed by proto/from_descriptors.py from the FileDescriptorProto in the {distribution} {version}",
        "// wheel, which protoc compiled from the upstream file of the same name in",
        "// https://github.com/open-telemetry/opentelemetry-proto (see README.md here for the tag).",
        "// Upstream's comments are not part of a descriptor and are not reproduced.",
        "//",
        "// Copyright The OpenTelemetry Authors",
        "// SPDX-License-Identifier: Apache-2.0",
        "",
    ]


def literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if any(c in value for c in '"\\\n') or not value.isascii():
            raise Unprintable(f"option value {value!r} needs escaping")
        return f'"{value}"'
    raise Unprintable(f"option value of type {type(value).__name__}")


def type_ref(type_name: str, scope: str, package: str) -> str:
    """A message or enum reference as written inside `scope` (the package or a message in it): relative to the
    innermost enclosing scope within the package that holds it, else fully qualified. Either resolves to the same
    type by protobuf's rules (the first component is looked up from the innermost scope outwards)."""
    name = type_name.lstrip(".")
    while True:
        if name.startswith(scope + "."):
            return name[len(scope) + 1:]
        if scope == package:
            return name
        scope = scope.rpartition(".")[0]


def field_options(field: descriptor_pb2.FieldDescriptorProto) -> str:
    opts = [f"{fd.name} = {literal(v)}" for fd, v in field.options.ListFields()]
    if field.HasField("json_name") and field.json_name != camel(field.name):
        opts.append(f"json_name = {literal(field.json_name)}")
    return f" [{', '.join(opts)}]" if opts else ""


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def field_line(field: descriptor_pb2.FieldDescriptorProto, scope: str, package: str,
               maps: dict[str, descriptor_pb2.DescriptorProto]) -> str:
    if field.type == F.TYPE_GROUP:
        raise Unprintable(f"group field {field.name}")
    if field.HasField("default_value") or field.HasField("extendee"):
        raise Unprintable(f"proto2 default or extension on {field.name}")
    entry = maps.get(field.type_name.lstrip(".")) if field.type == F.TYPE_MESSAGE else None
    if entry is not None:
        key, value = entry.field
        kind = f"map<{type_name(key, scope, package)}, {type_name(value, scope, package)}>"
    else:
        kind = type_name(field, scope, package)
        if field.label == F.LABEL_REPEATED:
            kind = "repeated " + kind
        elif field.proto3_optional:
            kind = "optional " + kind
        elif field.label == F.LABEL_REQUIRED:
            raise Unprintable(f"required field {field.name}")
    return f"{kind} {field.name} = {field.number}{field_options(field)};"


def type_name(field: descriptor_pb2.FieldDescriptorProto, scope: str, package: str) -> str:
    if field.type in (F.TYPE_MESSAGE, F.TYPE_ENUM):
        return type_ref(field.type_name, scope, package)
    return SCALARS[field.type]


def reserved(ranges: list[tuple[int, int]], names: list[str], largest: int) -> list[str]:
    """`reserved` statements; ranges are inclusive [first, last]; `largest` is written as `max`."""
    parts = [str(a) if a == b else f"{a} to {'max' if b == largest else b}" for a, b in ranges]
    out = [f"reserved {', '.join(parts)};"] if parts else []
    if names:
        out.append("reserved " + ", ".join(literal(n) for n in names) + ";")
    return out


def enum_lines(enum: descriptor_pb2.EnumDescriptorProto) -> list[str]:
    if enum.options.ListFields():
        raise Unprintable(f"options on enum {enum.name}")
    body = reserved([(r.start, r.end) for r in enum.reserved_range], list(enum.reserved_name), 2**31 - 1)
    for v in enum.value:
        opts = [f"{fd.name} = {literal(x)}" for fd, x in v.options.ListFields()]
        body.append(f"{v.name} = {v.number}{' [' + ', '.join(opts) + ']' if opts else ''};")
    return [f"enum {enum.name} {{", *(INDENT + line for line in body), "}"]


def message_lines(msg: descriptor_pb2.DescriptorProto, scope: str, package: str) -> list[str]:
    full = f"{scope}.{msg.name}"
    if [fd.name for fd, _ in msg.options.ListFields()] not in ([], ["deprecated"]):
        raise Unprintable(f"options on message {full}")
    if msg.extension or msg.extension_range:
        raise Unprintable(f"extensions in message {full}")
    maps = {f"{full}.{n.name}": n for n in msg.nested_type if n.options.map_entry}
    body = reserved([(r.start, r.end - 1) for r in msg.reserved_range], list(msg.reserved_name), 2**29 - 1)
    if msg.options.deprecated:
        body.append("option deprecated = true;")
    for enum in msg.enum_type:
        body += enum_lines(enum)
    for nested in msg.nested_type:
        if not nested.options.map_entry:
            body += message_lines(nested, full, package)
    done: set[int] = set()
    for field in msg.field:
        real_oneof = field.HasField("oneof_index") and not field.proto3_optional
        if not real_oneof:
            body.append(field_line(field, full, package, maps))
            continue
        index = field.oneof_index
        if index in done:
            continue
        done.add(index)
        members = [f for f in msg.field if f.HasField("oneof_index") and f.oneof_index == index]
        body.append(f"oneof {msg.oneof_decl[index].name} {{")
        body += [INDENT + field_line(f, full, package, maps) for f in members]
        body.append("}")
    return [f"message {msg.name} {{", *(INDENT + line for line in body), "}"]


def service_lines(svc: descriptor_pb2.ServiceDescriptorProto, package: str) -> list[str]:
    body = []
    for m in svc.method:
        if m.options.ListFields():
            raise Unprintable(f"options on rpc {svc.name}.{m.name}")
        arg = ("stream " if m.client_streaming else "") + type_ref(m.input_type, package, package)
        ret = ("stream " if m.server_streaming else "") + type_ref(m.output_type, package, package)
        body.append(f"rpc {m.name}({arg}) returns ({ret}) {{}}")
    return [f"service {svc.name} {{", *(INDENT + line for line in body), "}"]


def render(fdp: descriptor_pb2.FileDescriptorProto, distribution: str, version: str) -> str:
    if fdp.syntax != "proto3" or fdp.extension:
        raise Unprintable(f"{fdp.name}: only proto3 files without extensions are printed")
    lines = header(fdp, distribution, version)
    lines += [f'syntax = "{fdp.syntax}";', "", f"package {fdp.package};", ""]
    if fdp.dependency:
        lines += [f'import "{d}";' for d in fdp.dependency] + [""]
    lines += [f"option {fd.name} = {literal(v)};" for fd, v in fdp.options.ListFields()]
    for svc in fdp.service:
        lines += ["", *service_lines(svc, fdp.package)]
    for msg in fdp.message_type:
        lines += ["", *message_lines(msg, fdp.package, fdp.package)]
    for enum in fdp.enum_type:
        lines += ["", *enum_lines(enum)]
    return "\n".join(lines) + "\n"


def rendered() -> dict[Path, str]:
    """Path under proto/ -> the text printed from the installed wheel."""
    from importlib.metadata import version

    out = {}
    for module in FILES:
        fdp = descriptor_pb2.FileDescriptorProto()
        importlib.import_module(module).DESCRIPTOR.CopyToProto(fdp)
        out[HERE / fdp.name] = render(fdp, "opentelemetry-proto", version("opentelemetry-proto"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path.relative_to(HERE))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for p in stale:
        print(f"{'differs' if args.check else 'wrote'}: proto/{p}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
