"""Read a YAML document into plain data, remembering the line of every key and item.

Only what a machine config needs is accepted: one document, a mapping at the top, no
duplicate keys, no anchors or aliases (which also rules out alias bombs), UTF-8 text of a
bounded size. Every refusal is a Problem naming the file and line, never a traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from kubespan.errors import Problem

MAX_CONFIG_BYTES = 1024 * 1024
MAX_NESTING = 64

PathKey = tuple[str | int, ...]


@dataclass
class LoadedDocument:
    """Plain data plus the line (1-based) where each path starts."""

    data: dict[str, Any]
    lines: dict[PathKey, int] = field(default_factory=dict)

    def line_of(self, path: PathKey) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        probe = tuple(path)
        while probe:
            if probe in self.lines:
                return self.lines[probe]
            probe = probe[:-1]
        return self.lines.get((), None)


class _Refused(Exception):
    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _StrictLoader(yaml.SafeLoader):
    """Refuses aliases while composing, before any expansion could happen; booleans are only
    true/false, as in YAML 1.2 (PyYAML's YAML 1.1 would read `yes`, `no`, `on` and `off` as
    booleans, so `enabled: off` would silently mean false where other tools see a string)."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise _Refused(
                event.start_mark.line + 1, "YAML aliases are not supported (found *alias)"
            )
        # Composing recurses once per level: bound it before Python's own limit ends it in
        # a RecursionError (a machine config is a few levels deep).
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise _Refused(
                    event.start_mark.line + 1, f"nested deeper than {MAX_NESTING} levels"
                )
            node: yaml.Node | None = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        return node


_BOOL_TAG = "tag:yaml.org,2002:bool"
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def format_path(path: PathKey) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_document(raw: bytes, file: str) -> LoadedDocument:
    """Parse `raw` as one YAML mapping; raises ConfigError-ready problems via `YamlProblems`."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise YamlProblem(Problem(file, None, "", f"file is larger than {MAX_CONFIG_BYTES} bytes"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise YamlProblem(Problem(file, line, "", "file is not valid UTF-8 text")) from None
    if not text.strip():
        raise YamlProblem(Problem(file, None, "", "file is empty"))
    loader = _StrictLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.composer.ComposerError as error:
            where = _line(error.problem_mark, text)
            message = error.problem or "bad YAML"
            if "expected a single document" in (error.context or ""):
                message = "file holds more than one YAML document; give exactly one"
            raise YamlProblem(Problem(file, where, "", message)) from None
        except yaml.MarkedYAMLError as error:
            mark = _line(error.problem_mark, text)
            raise YamlProblem(Problem(file, mark, "", f"invalid YAML: {error.problem}")) from None
        except yaml.YAMLError as error:
            raise YamlProblem(Problem(file, None, "", f"invalid YAML: {error}")) from None
        except _Refused as refused:
            raise YamlProblem(Problem(file, refused.line, "", refused.message)) from None
        if node is None:
            raise YamlProblem(Problem(file, None, "", "file is empty"))
        document = LoadedDocument(data={})
        try:
            data = _convert(loader, node, (), document)
        except _Refused as refused:
            raise YamlProblem(Problem(file, refused.line, "", refused.message)) from None
        if not isinstance(data, dict):
            raise YamlProblem(
                Problem(file, node.start_mark.line + 1, "", "the document must be a mapping")
            )
        document.data = data
        document.lines[()] = node.start_mark.line + 1
        return document
    finally:
        loader.dispose()


def _line(mark: yaml.Mark | None, text: str) -> int | None:
    """1-based line of a parser mark; a problem found at the end of the file is reported on
    its last line, not on a line that does not exist."""
    if mark is None:
        return None
    last = text.count("\n") + (0 if text.endswith("\n") else 1)
    return min(mark.line + 1, max(last, 1))


class YamlProblem(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def _convert(
    loader: yaml.SafeLoader, node: yaml.Node, path: PathKey, document: LoadedDocument
) -> Any:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        if node.tag != "tag:yaml.org,2002:map":
            raise _Refused(line, f"{format_path(path) or 'document'}: unsupported tag {node.tag}")
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Refused(key_line, "mapping keys must be plain strings")
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Refused(key_line, "YAML merge keys (<<) are not supported")
            key = str(loader.construct_object(key_node))
            child = (*path, key)
            if key in out:
                raise _Refused(key_line, f"{format_path(child)}: duplicate key")
            document.lines[child] = key_line
            out[key] = _convert(loader, value_node, child, document)
        return out
    if isinstance(node, yaml.SequenceNode):
        items: list[Any] = []
        for index, item_node in enumerate(node.value):
            child = (*path, index)
            document.lines[child] = item_node.start_mark.line + 1
            items.append(_convert(loader, item_node, child, document))
        return items
    try:
        return loader.construct_object(node)
    except yaml.YAMLError as error:
        raise _Refused(line, f"{format_path(path)}: {error}") from None
