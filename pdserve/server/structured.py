"""The OpenAI-side spellings of structured output, mapped onto SGLang's sampling parameters.

``response_format`` (``json_object`` / ``json_schema``), SGLang's ``json_schema`` / ``regex`` /
``ebnf``, vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` and
``structured_outputs`` all become one of ``SamplingParams.json_schema|regex|ebnf`` (the engine's
names, see ``engine/grammar.py``). At most one may be given; errors name the field the client used.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pdserve.server.errors import bad_request

ANY_JSON_OBJECT = '{"type": "object"}'


class Constraint:
    """One grammar request: the client's field name, the engine field and its text."""

    __slots__ = ("field", "kind", "text")

    def __init__(self, field: str, kind: str, text: str) -> None:
        self.field = field
        self.kind = kind
        self.text = text


def _schema_text(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, bool)):
        return json.dumps(value)
    raise bad_request(f"{field} must be a JSON schema (an object or its JSON text)", field)


def _choice_regex(choices: Any, field: str) -> str:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise bad_request(f"{field} must be a non-empty list of strings", field)
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def _response_format(value: Any) -> Constraint | None:
    field = "response_format"
    if not isinstance(value, dict):
        raise bad_request("response_format must be an object", field)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(field, "json_schema", ANY_JSON_OBJECT)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema must be an object with a schema", field)
        schema = spec.get("schema", spec.get("schema_"))
        if schema is None:
            return Constraint(field, "json_schema", ANY_JSON_OBJECT)
        return Constraint(field, "json_schema", _schema_text(schema, "response_format.json_schema.schema"))
    raise bad_request(
        f"response_format.type must be text, json_object or json_schema, got {kind!r}", "response_format"
    )


def _structured_outputs(value: Any) -> Constraint | None:
    field = "structured_outputs"
    if not isinstance(value, dict):
        raise bad_request("structured_outputs must be an object", field)
    found = []
    for key, kind in (("json", "json_schema"), ("regex", "regex"), ("choice", "regex"), ("grammar", "ebnf")):
        item = value.get(key)
        if item is None:
            continue
        name = f"{field}.{key}"
        if key == "json":
            found.append(Constraint(name, kind, _schema_text(item, name)))
        elif key == "choice":
            found.append(Constraint(name, kind, _choice_regex(item, name)))
        elif isinstance(item, str):
            found.append(Constraint(name, kind, item))
        else:
            raise bad_request(f"{name} must be a string", name)
    unknown = set(value) - {"json", "regex", "choice", "grammar"}
    if unknown:
        raise bad_request(f"unsupported field: {field}.{sorted(unknown)[0]}", field)
    if len(found) > 1:
        raise bad_request(f"{field}: give one of json, regex, choice and grammar", field)
    return found[0] if found else None


def openai_constraint(body: Any) -> Constraint | None:
    """The one structured-output constraint an OpenAI body asks for, or None."""
    found: list[Constraint] = []

    def add(c: Constraint | None) -> None:
        if c is not None:
            found.append(c)

    if body.response_format is not None:
        add(_response_format(body.response_format))
    if body.json_schema is not None:
        add(Constraint("json_schema", "json_schema", _schema_text(body.json_schema, "json_schema")))
    if body.guided_json is not None:
        add(Constraint("guided_json", "json_schema", _schema_text(body.guided_json, "guided_json")))
    for field, kind in (("regex", "regex"), ("guided_regex", "regex"), ("ebnf", "ebnf"), ("guided_grammar", "ebnf")):
        value = getattr(body, field)
        if value is not None:
            add(Constraint(field, kind, value))
    if body.guided_choice is not None:
        add(Constraint("guided_choice", "regex", _choice_regex(body.guided_choice, "guided_choice")))
    if body.structured_outputs is not None:
        add(_structured_outputs(body.structured_outputs))
    if len(found) > 1:
        names = ", ".join(c.field for c in found)
        raise bad_request(f"give at most one structured-output field (got {names})", found[1].field)
    return found[0] if found else None
