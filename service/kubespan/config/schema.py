"""Validate plain config data against the published JSON Schema, as Problems with lines."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError

from kubespan.config.yamlsource import LoadedDocument, PathKey, format_path
from kubespan.errors import Problem


@cache
def machineconfig_schema() -> dict[str, Any]:
    text = resources.files("kubespan").joinpath("schema/machineconfig.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = machineconfig_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_problems(document: LoadedDocument, file: str) -> list[Problem]:
    problems: list[Problem] = []
    for error in _validator().iter_errors(document.data):
        problems.extend(_explain(error, document, file))
    return problems


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if value is None:
        return "empty (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{kinds.get(type(value), type(value).__name__)} ({json.dumps(value, default=str)})"


_TYPE_NAMES = {
    "boolean": "true or false",
    "integer": "an integer",
    "string": "a string",
    "object": "a mapping",
    "array": "a list",
    "number": "a number",
}


def _explain(error: ValidationError, document: LoadedDocument, file: str) -> list[Problem]:
    path: PathKey = tuple(error.absolute_path)
    value = error.instance
    schema = error.schema if isinstance(error.schema, dict) else {}
    expected: Any = error.validator_value
    if error.validator == "additionalProperties" and isinstance(value, dict):
        allowed = set(schema.get("properties", {}))
        out = []
        for key in sorted(k for k in value if k not in allowed):
            child = (*path, key)
            hint = ", ".join(sorted(allowed))
            out.append(
                Problem(
                    file,
                    document.line_of(child),
                    format_path(child),
                    f"unknown key (allowed here: {hint})",
                )
            )
        return out
    if error.validator == "type":
        names = [expected] if isinstance(expected, str) else list(expected)
        wanted = " or ".join(_TYPE_NAMES.get(n, n) for n in names)
        message = f"must be {wanted}, not {_describe(value)}"
    elif error.validator == "minimum":
        message = f"must be at least {expected}, not {value}"
    elif error.validator == "maximum":
        message = f"must be at most {expected}, not {value}"
    elif error.validator == "enum":
        choices = ", ".join(json.dumps(c) for c in expected)
        message = f"must be one of {choices}, not {json.dumps(value, default=str)}"
    elif error.validator == "minLength":
        message = "must not be empty"
    else:
        message = error.message
    return [Problem(file, document.line_of(path), format_path(path), message)]
