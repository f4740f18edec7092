"""The published schema and its examples: every valid example loads; every invalid one fails
with exactly the line, path and message its header names."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from kubespan.config import parse_config
from kubespan.config.schema import machineconfig_schema
from kubespan.errors import ConfigError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "machineconfig-schema"
VALID = sorted((SCHEMA_DIR / "examples" / "valid").glob("*.yaml"))
INVALID = sorted((SCHEMA_DIR / "examples" / "invalid").glob("*.yaml"))


def test_schema_is_valid_2020_12_with_an_id() -> None:
    schema = json.loads((SCHEMA_DIR / "machineconfig.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"]
    assert machineconfig_schema() == schema


def test_there_are_enough_examples() -> None:
    assert len(VALID) >= 5
    assert len(INVALID) >= 40


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_example(path: Path) -> None:
    parse_config(path.read_bytes(), str(path))


def expectation(raw: bytes) -> tuple[int | None, str, str]:
    header = raw.split(b"\n", 1)[0].decode()
    assert header.startswith("# expect: "), "an invalid example starts with its expectation"
    where, fragment = header.removeprefix("# expect: ").split(" | ", 1)
    line, path = where.split(" ")
    return (None if line == "-" else int(line)), ("" if path == "-" else path), fragment


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_example(path: Path) -> None:
    raw = path.read_bytes()
    line, field, fragment = expectation(raw)
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, str(path))
    problems = caught.value.problems
    assert len(problems) == 1, [str(p) for p in problems]
    (problem,) = problems
    assert (problem.line, problem.path) == (line, field), str(problem)
    assert fragment in problem.message, str(problem)
    assert problem.file == str(path)


def test_invalid_examples_are_distinct_mistakes() -> None:
    bodies = {p.read_bytes().split(b"\n", 1)[1] for p in INVALID}
    assert len(bodies) == len(INVALID)


def test_field_reference_is_up_to_date() -> None:
    from kubespan.config.docs import render

    committed = (SCHEMA_DIR / "README.md").read_text()
    assert committed == render(SCHEMA_DIR), "run `make schema-docs` and commit the result"


def test_every_field_is_documented() -> None:
    from kubespan.config.docs import fields

    schema = machineconfig_schema()
    for path, node in fields(schema, schema):
        assert node.get("title"), f"{path} has no title"
        if node.get("type") != "object":
            assert node.get("description"), f"{path} has no description"
            assert node.get("examples"), f"{path} has no example"
