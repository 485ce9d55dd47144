"""Reference tables generated from the code that defines them, for the docs site.

MkDocs loads this file as a hook (`hooks:` in mkdocs.yml): a page line that is
exactly `<!-- reference: NAME -->` is replaced by the table NAME makes, so a new
flag, metric or proto field is documented by the build that ships it.

- `server-flags`: `entity-llm-server`'s argument parser, each flag with its
  `ENTITY_LLM_*` variable, default and help text.
- `client-flags`: the `entity-llm` command's global flags and its `generate` flags.
- `metrics`: the families a server's Prometheus registry holds.
- `protocol`: every service, message, field and enum of `proto/`, with the
  comments written above them in the .proto files.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
MARKER = re.compile(r"^<!-- reference: ([a-z-]+) -->$", re.MULTILINE)


def _cell(text: str) -> str:
    """Prose for a table cell: one line, HTML's specials escaped (help texts say `<key>`)."""
    text = " ".join(text.split()).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    """Code in a table cell: a pipe inside a code span does not split the cell."""
    return f"`{text}`"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of cells already escaped (`_cell`, `_code`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- Flags ----------------------------------------------------------------------


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:  # argparse has no public list of its actions
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            yield action


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    text = text.replace(" (default: %(default)s)", "").replace("%(default)s", str(action.default))
    return text.replace("%%", "%")  # argparse's escape


def _flag(action: argparse.Action) -> str:
    flag = action.option_strings[-1]
    if action.choices is not None:
        return f"{flag} {'|'.join(map(str, action.choices))}"
    if action.nargs == 0:
        return flag
    return f"{flag} {action.dest.upper()}"


def server_flags() -> list[tuple[str, str, str, str]]:
    """(flag, variable, default, help) for every option of `entity-llm-server`."""
    from entity_llm_server.config import ENV_PREFIX, build_parser

    rows = []
    for action in _options(build_parser(env={})):
        variable = ENV_PREFIX + action.dest.upper()
        default = "unset" if action.default is None else str(action.default)
        rows.append((_flag(action), variable, default, _help(action)))
    return rows


def server_flags_table() -> str:
    rows = [
        (_code(flag), _code(variable), _code(default), _cell(text)) for flag, variable, default, text in server_flags()
    ]
    return _table(("flag", "variable", "default", "what it does"), rows)


def client_flags() -> list[tuple[str, str, str]]:
    """(command, flag, help) for the `entity-llm` command's global and `generate` options."""
    from entity_llm_client.cli import build_parser

    parser = build_parser()
    rows = [("", _flag(action), _help(action)) for action in _options(parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                rows.extend((name, _flag(option), _help(option)) for option in _options(sub))
    return rows


def client_flags_table() -> str:
    rows = [(command or "all", _code(flag), _cell(text)) for command, flag, text in client_flags()]
    return _table(("command", "flag", "what it does"), rows)


# --- Metrics --------------------------------------------------------------------


def metrics() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(name, type, help, labels) for each entity_llm_* family a server exports."""
    from entity_llm_server.metrics import PREFIX, Metrics

    families = Metrics(engine_load=lambda: (0, 0), engine_cores=lambda: [(0, True)])
    rows = []
    for family in families.registry.collect():
        if not family.name.startswith(PREFIX):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = families.labels.get(family.name)
        if labels is None:  # a custom collector's family: its samples carry the labels
            labels = tuple(sorted({key for sample in family.samples for key in sample.labels}))
        rows.append((name, family.type, family.documentation, labels))
    return rows


def metrics_table() -> str:
    rows = [(_code(name), kind, _cell(text), ", ".join(map(_code, labels))) for name, kind, text, labels in metrics()]
    return _table(("metric", "type", "what it counts", "labels"), rows)


# --- Protocol -------------------------------------------------------------------


def _descriptors() -> Any:
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    files = sorted(str(path.relative_to(PROTO_ROOT)) for path in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "set.binpb"
        status = protoc.main(
            ["protoc", f"-I{PROTO_ROOT}", "--include_source_info", f"--descriptor_set_out={out}", *files]
        )
        if status != 0:
            raise RuntimeError(f"protoc could not read {files}")
        descriptors = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return descriptors


_TYPES = {
    1: "double",
    2: "float",
    3: "int64",
    4: "uint64",
    5: "int32",
    8: "bool",
    9: "string",
    12: "bytes",
    13: "uint32",
}


class _Comments:
    def __init__(self, file: Any) -> None:
        self.by_path = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}

    def __call__(self, *path: int) -> str:
        return " ".join(self.by_path.get(path, "").split())


def _field_type(field: Any, maps: dict[str, tuple[str, str]]) -> str:
    if field.type_name:
        name = str(field.type_name).rsplit(".", 1)[-1]
        if field.type_name in maps:
            key, value = maps[field.type_name]
            return f"map<{key}, {value}>"
        kind: str = name
    else:
        kind = _TYPES.get(field.type, str(field.type))
    if field.label == 3 and field.type_name not in maps:
        return f"repeated {kind}"
    if field.proto3_optional:
        return f"optional {kind}"
    return kind


def _messages(
    messages: Any, path: tuple[int, ...], prefix: str, comments: _Comments, package: str
) -> Iterator[tuple[str, str, list[str]]]:
    """(title, description, table lines) per message, nested ones after their parent."""
    for index, message in enumerate(messages):
        here = (*path, index)
        full = f"{prefix}{message.name}"
        if message.options.map_entry:
            continue
        maps = {}
        for nested in message.nested_type:
            if nested.options.map_entry:
                key, value = nested.field
                value_type = value.type_name.rsplit(".", 1)[-1] if value.type_name else _TYPES[value.type]
                maps[f".{package}.{full}.{nested.name}"] = (_TYPES[key.type], value_type)
        lines = []
        if message.field:
            lines += ["| field | number | type | meaning |", "| --- | --- | --- | --- |"]
            for number, field in enumerate(message.field):
                oneof = ""
                if field.HasField("oneof_index") and not field.proto3_optional:
                    oneof = f" (oneof `{message.oneof_decl[field.oneof_index].name}`)"
                meaning = comments(*here, 2, number)
                lines.append(
                    f"| `{field.name}` | {field.number} | `{_field_type(field, maps)}`{oneof} | {_cell(meaning)} |"
                )
        yield full, comments(*here), lines
        yield from _messages(message.nested_type, (*here, 3), f"{full}.", comments, package)


def protocol() -> str:
    """The Markdown reference of every .proto file under proto/."""
    out = []
    for file in _descriptors().file:
        comments = _Comments(file)
        out.append(f"### `{file.name}`\n\npackage `{file.package}`\n")
        for s_index, service in enumerate(file.service):
            out.append(f"#### service `{service.name}`\n\n{comments(6, s_index)}\n")
            out += ["| RPC | request | response | what it does |", "| --- | --- | --- | --- |"]
            for m_index, method in enumerate(service.method):
                response = method.output_type.rsplit(".", 1)[-1]
                if method.server_streaming:
                    response = f"stream {response}"
                text = _cell(comments(6, s_index, 2, m_index))
                out.append(f"| `{method.name}` | `{method.input_type.rsplit('.', 1)[-1]}` | `{response}` | {text} |")
            out.append("")
        for title, description, lines in _messages(file.message_type, (4,), "", comments, file.package):
            out.append(f"#### message `{title}`\n\n{description or 'No fields.' if not lines else description}\n")
            out += [*lines, ""]
        for e_index, enum in enumerate(file.enum_type):
            out.append(f"#### enum `{enum.name}`\n\n{comments(5, e_index)}\n")
            out += ["| value | number | meaning |", "| --- | --- | --- |"]
            for v_index, value in enumerate(enum.value):
                out.append(f"| `{value.name}` | {value.number} | {_cell(comments(5, e_index, 2, v_index))} |")
            out.append("")
    return "\n".join(out)


TABLES: dict[str, Callable[[], str]] = {
    "server-flags": server_flags_table,
    "client-flags": client_flags_table,
    "metrics": metrics_table,
    "protocol": protocol,
}


def expand(markdown: str) -> str:
    """Replace each `<!-- reference: NAME -->` line with its table."""

    def table(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise KeyError(f"no reference table named {name!r}; there are {sorted(TABLES)}")
        return TABLES[name]()

    return MARKER.sub(table, markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """MkDocs hook: expand the reference markers of each page."""
    return expand(markdown)
