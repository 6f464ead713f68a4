"""Grammars and tool schemas a request supplies are checked here, in the front's grammar child.

Compiling a grammar is running the request's code: llguidance's compile time grows with the
grammar (a 50,000-word GBNF takes seconds in its Python converter, holding the GIL), and a grammar
about 3,000 rules deep overflows an 8 MiB stack (SIGSEGV: the whole process). So the front never
compiles on its own threads: :class:`~pdserve.server.request_code.RequestCodeRunner` runs
:func:`check_grammar` in a child process (started with :func:`start`, which builds the tokenizer
once), on a thread with :data:`~pdserve.engine.grammar.CHECK_STACK_BYTES`, killed at its deadline;
a crash is that request's 400. The front remembers each grammar's verdict (LRU), so a grammar
clients repeat costs one check, and a hostile one repeated is refused at once.

A worker compiles again (its matcher cannot cross processes), on its grammar thread with four times
the stack, off its engine loop (``server/worker.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pdserve.engine.grammar import (
    CHECK_STACK_BYTES,
    GrammarCompiler,
    GrammarError,
    check_json_schema,
    on_thread_with_stack,
)

_compiler: GrammarCompiler | None = None


def start(tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
    """The child's initializer: one compiler (its tokenizer) for every job."""
    global _compiler
    _compiler = GrammarCompiler(tokenizer_json, vocab_size, eos_token_ids)


def _on_check_thread(fn: Any, *args: Any) -> Any:
    result: list[Any] = []

    def run() -> None:
        try:
            result.append((fn(*args), None))
        except Exception as e:
            result.append((None, e))

    on_thread_with_stack(CHECK_STACK_BYTES, run, name="pdserve-grammar-check").join()
    value, error = result[0]
    if error is not None:
        raise error
    return value


def check_grammar(field: str, text: str) -> str:
    """Why ``text`` (the grammar field ``field``) cannot be served, or "" when it compiles against
    the tokenizer and some token can start the output."""
    assert _compiler is not None, "the grammar child was started without start()"
    try:
        _on_check_thread(_compiler.compile, field, text)
    except GrammarError as e:
        return e.detail
    return ""


def check_schemas(schemas: Sequence[Any]) -> tuple[int, str] | None:
    """The first of ``schemas`` (tools' ``function.parameters``) that is no usable JSON Schema:
    ``(index, reason)``; None when all are."""
    def check_all() -> tuple[int, str] | None:
        for i, schema in enumerate(schemas):
            error = check_json_schema(schema)
            if error:
                return i, error
        return None

    return _on_check_thread(check_all)
