"""What a request asks its output to follow -> llguidance's grammar for the engine (engine/guided.py), checked.

    /generate            guided: {"json_schema": {...}} | {"regex": "..."} | {"choice": ["a", "b"]}
    /v1/* routes         response_format: {"type": "json_schema", "json_schema": {"schema": {...}, ...}}
                                        | {"type": "json_object"} (any JSON object) | {"type": "text"} (none)
A schema or regex that does not compile for this model's tokenizer is a 422 naming the field.
"""

from __future__ import annotations

from typing import Any

import llguidance
from fastapi.concurrency import run_in_threadpool

from .engine.guided import JSON_OPTIONS, GuideError, check_grammar
from .routes.validation import invalid

REGEX_META = set("\\.+*?()|[]{}^$")


def _free_text(spec: Any) -> bool:
    """No grammar asked for: /generate's `guided` absent, or the OpenAI routes' response_format absent or text."""
    return spec is None or spec == {"type": "text"}


async def off_the_loop(grammar_of, spec: Any, engine) -> str | None:
    """grammar_of(spec, engine) in a worker thread (compiling may take a while); None at once where the request asks
    for free text (a thread hop for every request took a sixth of the event loop's time under 32 clients)."""
    if _free_text(spec):
        return None
    return await run_in_threadpool(grammar_of, spec, engine)


def generate_grammar(guided, engine) -> str | None:
    """/generate's `guided` (a GuidedSpec or None) -> a checked grammar."""
    if guided is None:
        return None
    if guided.json_schema is not None:
        return _compiled("json_schema", guided.json_schema, engine, "guided.json_schema")
    if guided.regex is not None:
        return _compiled("regex", guided.regex, engine, "guided.regex")
    return _compiled("regex", _choice_regex(guided.choice), engine, "guided.choice")


def response_format_grammar(response_format: Any, engine) -> str | None:
    """The OpenAI routes' `response_format` -> a checked grammar (None: free text)."""
    if _free_text(response_format):
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return _compiled("json_schema", {"type": "object"}, engine, "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise invalid("response_format.json_schema", "needs {\"name\": ..., \"schema\": {a JSON schema}}")
        return _compiled("json_schema", schema, engine, "response_format.json_schema")
    raise invalid("response_format", "type must be \"text\", \"json_object\" or \"json_schema\"")


def _compiled(kind: str, value: Any, engine, field: str) -> str:
    try:
        if kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_OPTIONS)
        else:
            grammar = llguidance.LLMatcher.grammar_from_regex(value)
        check_grammar(grammar, engine.tokenizer, engine.eos_ids, engine.model.config.get_text_config().vocab_size)
    except (GuideError, ValueError) as exc:
        raise invalid(field, f"cannot be compiled: {exc}") from None
    return grammar


def _choice_regex(choices: list[str]) -> str:
    """One of the strings exactly."""
    return "(" + "|".join("".join("\\" + c if c in REGEX_META else c for c in choice) for choice in choices) + ")"
