"""Generate machineconfig-schema/README.md from the schema and its examples.

    python -m kubespan.config.docs machineconfig-schema > machineconfig-schema/README.md

`make schema-docs` does this; a test fails when the committed file is out of date.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEADER = """\
<!-- Generated from machineconfig.schema.json by `make schema-docs`. Do not edit. -->
# Machine config reference

kubespan reads two parts of a node's machine config: `machine.network.kubespan` and
`cluster` (its identity and discovery). Other sections of the OS manifest may be present and
are ignored. The kubespan and discovery sections reject unknown keys, so a typo cannot
silently turn encryption off. Check a file with `kubespan config validate FILE`: every problem
is reported at once as `FILE:LINE: path.to.field: message`. Booleans are `true` or `false`
only (YAML 1.2): `yes`, `no`, `on` and `off` are strings here, and are refused.

The schema is [`machineconfig.schema.json`](machineconfig.schema.json) (JSON Schema 2020-12).
Examples that must validate are in [`examples/valid/`](examples/valid/); examples of
mistakes, each with the line and field it must be reported at, in
[`examples/invalid/`](examples/invalid/).

Where a node's config comes from (kernel command line URL, QEMU fw_cfg, the cloud's user
data, config drives, local file) and how a bad one is handled: see "Machine config sources"
in the top-level README.
"""


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        target: dict[str, Any] = schema["$defs"][ref.removeprefix("#/$defs/")]
        return target
    return node


def _type(node: dict[str, Any]) -> str:
    kind = node.get("type", "")
    if kind == "array":
        items = node.get("items", {})
        return f"list of {items.get('type', 'values')}s"
    if kind == "object":
        return "mapping"
    text = str(kind)
    if "minimum" in node or "maximum" in node:
        text += f", {node.get('minimum', '')}..{node.get('maximum', '')}"
    if "enum" in node:
        text += ", one of " + ", ".join(f"`{v}`" for v in node["enum"])
    return text


def _default(node: dict[str, Any]) -> str:
    if "default" not in node:
        return ""
    return f"`{json.dumps(node['default'])}`"


def _description(node: dict[str, Any]) -> str:
    parts = []
    if node.get("title"):
        parts.append(f"**{node['title']}.**")
    if node.get("description"):
        parts.append(str(node["description"]))
    if node.get("additionalProperties") is False:
        parts.append("Unknown keys are refused.")
    for example in node.get("examples", []):
        parts.append(f"Example: `{json.dumps(example)}`.")
    return " ".join(parts).replace("|", "\\|")


def fields(
    schema: dict[str, Any], node: dict[str, Any], path: str = ""
) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, child in node.get("properties", {}).items():
        resolved = _resolve(schema, child)
        here = f"{path}.{name}" if path else name
        yield here, resolved
        yield from fields(schema, resolved, here)


def render(schema_dir: Path) -> str:
    schema = json.loads((schema_dir / "machineconfig.schema.json").read_text())
    out = [HEADER]
    for title, name in (("Minimal example", "minimal.yaml"), ("Full example", "full.yaml")):
        text = (schema_dir / "examples" / "valid" / name).read_text()
        out.append(f"## {title}\n\n```yaml\n{text.rstrip()}\n```\n")
    out.append("## Fields\n")
    out.append("| Field | Type | Default | Description |")
    out.append("| --- | --- | --- | --- |")
    for path, node in fields(schema, schema):
        out.append(f"| `{path}` | {_type(node)} | {_default(node)} | {_description(node)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    schema_dir = Path(argv[1]) if len(argv) > 1 else Path("machineconfig-schema")
    sys.stdout.write(render(schema_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
