"""Structured output: grammars compiled by llguidance, and the per-step token mask.

A request constrains its output with one of SGLang's sampling parameters ``json_schema`` (JSON
text), ``regex`` or ``ebnf`` (GBNF, as SGLang/xgrammar read it). :class:`GrammarCompiler` turns
one into an llguidance grammar, checks it against the tokenizer (a :class:`GrammarError` names the
field) and keeps compiled matchers in an LRU cache; each request gets its own copy
(``Req.grammar``). Every sampling step, :func:`apply_grammar_masks` computes the masks of all
constrained rows in one call to llguidance's :class:`LLExecutor` (its thread pool, without the GIL)
and sets the logits of tokens the grammars forbid to ``-inf`` in one vectorized operation;
:func:`advance_grammar` feeds the chosen token to the matcher.

llguidance rather than xgrammar: llguidance is MIT, has no Python dependencies (xgrammar pulls an
unpinned torch, triton and transformers) and computes masks on the CPU in tens of microseconds.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np
from llguidance.gbnf_to_lark import gbnf_to_lark

from pdserve.engine.request import Req, RequestError, SamplingParams

if TYPE_CHECKING:  # the front compiles grammars and never masks logits: it imports no torch
    import torch

GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf")
CACHE_SIZE = 128
MAX_GRAMMAR_CHARS = 1 << 20  # a grammar field's text (a JSON schema of ~10^4 properties, a 10^5-word regex)
MAX_GRAMMAR_SOURCE_CHARS = 8 << 20  # the llguidance grammar it becomes
# llguidance compiles recursively: a grammar ~3000 rules deep overflows an 8 MiB stack (SIGSEGV, the
# whole process). The front checks each grammar on a thread with CHECK_STACK_BYTES in a child process;
# a worker compiles on a thread with four times that, so what passed the check cannot overflow there.
CHECK_STACK_BYTES = 16 << 20
COMPILE_STACK_BYTES = 64 << 20
JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: no runs of whitespace from a weak model
_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()
logger = logging.getLogger("pdserve.grammar")
batch_fallbacks = 0  # batched mask calls that failed and were redone row by row (a test asserts none)


def executor() -> llguidance.LLExecutor:
    """This process's llguidance thread pool for batched masks: as many threads as torch may use
    (a worker's CPU share), set by ``PDSERVE_GRAMMAR_THREADS`` when given."""
    global _executor
    with _executor_lock:
        if _executor is None:
            import torch  # only a worker masks logits; the front never gets here

            threads = int(os.environ.get("PDSERVE_GRAMMAR_THREADS", "0")) or torch.get_num_threads()
            _executor = llguidance.LLExecutor(num_threads=max(1, threads))
        return _executor


class GrammarError(RequestError):
    """A grammar that does not compile; ``field`` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


def grammar_field(params: SamplingParams) -> tuple[str, str] | None:
    """The one grammar field set in ``params`` and its text; GrammarError when several are."""
    given = [(name, getattr(params, name)) for name in GRAMMAR_FIELDS if getattr(params, name) is not None]
    if len(given) > 1:
        names = ", ".join(name for name, _ in given)
        raise GrammarError(given[1][0], f"give at most one of json_schema, regex and ebnf (got {names})")
    return given[0] if given else None


def _grammar_text(field: str, text: str) -> str:
    """The llguidance grammar for one field's text (GrammarError when it cannot be read or is too
    large: the text over MAX_GRAMMAR_CHARS, the grammar over MAX_GRAMMAR_SOURCE_CHARS)."""
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(field, f"the {field} has {len(text)} characters; at most {MAX_GRAMMAR_CHARS} are accepted")
    grammar = _convert(field, text)
    if len(grammar) > MAX_GRAMMAR_SOURCE_CHARS:
        raise GrammarError(field, f"the {field} expands to a grammar of {len(grammar)} characters; at most "
                                  f"{MAX_GRAMMAR_SOURCE_CHARS} are accepted")
    return grammar


def _convert(field: str, text: str) -> str:
    try:
        if field == "json_schema":
            schema = json.loads(text)
            if not isinstance(schema, (dict, bool)):
                raise GrammarError(field, "a JSON schema must be a JSON object")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if field == "regex":
            return llguidance.LLMatcher.grammar_from_regex(text)
        return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(text))
    except GrammarError:
        raise
    except Exception as e:  # json, llguidance and the GBNF converter raise their own kinds
        raise GrammarError(field, f"invalid {field}: {e}") from None


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer; thread-safe (the front compiles off its loop)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.vocab_size = vocab_size
        eos = list(eos_token_ids) or None
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, field: str, text: str) -> llguidance.LLMatcher:
        """The cached matcher of one grammar field's text (GrammarError naming the field)."""
        return self._template(field, text)

    def _template(self, field: str, text: str) -> llguidance.LLMatcher:
        key = (field, text)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        grammar = _grammar_text(field, text)
        error = _validate(grammar, self.tokenizer)
        if error:
            raise GrammarError(field, f"invalid {field}: {error}")
        matcher = llguidance.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise GrammarError(field, f"invalid {field}: {matcher.get_error()}")
        if not _allows_any(matcher, self.vocab_size):
            raise GrammarError(field, f"the {field} matches no text: no token can start the output")
        with self._lock:
            self._cache[key] = matcher
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def check(self, params: SamplingParams) -> None:
        """Raise GrammarError naming the field unless ``params``' grammar compiles."""
        found = grammar_field(params)
        if found is not None:
            self._template(*found)

    def matcher(self, params: SamplingParams) -> llguidance.LLMatcher | None:
        """A fresh matcher for ``params``' grammar, or None when it has none."""
        found = grammar_field(params)
        if found is None:
            return None
        template = self._template(*found)
        with self._lock:
            return template.deep_copy()


def check_json_schema(schema: Any) -> str:
    """The reason ``schema`` is not a usable JSON Schema, or "" when it is."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        return llguidance.LLMatcher.validate_grammar(grammar, None)
    except Exception as e:
        return str(e) or "invalid JSON Schema"


def _validate(grammar: str, tokenizer: llguidance.LLTokenizer) -> str:
    """llguidance's grammar check: the error, or "" when the grammar compiles."""
    try:
        return llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    except Exception as e:
        return str(e) or "the grammar does not compile"


def _allows_any(matcher: llguidance.LLMatcher, vocab: int) -> bool:
    words = (vocab + 31) // 32
    bits = np.zeros(words, dtype=np.int32)
    matcher.unsafe_compute_mask_ptr(bits.ctypes.data, words * 4)
    return bool(bits.any()) and not matcher.is_error()


def fill_masks(matchers: Sequence[llguidance.LLMatcher], words: int) -> np.ndarray:
    """The next-token bitmasks [len(matchers), words] (int32, bit ``t % 32`` of word ``t // 32``:
    token ``t`` allowed), all in one batched llguidance call (one matcher: its own call, no pool
    hand-off); a matcher that fails gets an empty mask. A failed batched call is logged and
    counted (``batch_fallbacks``) before the rows are redone one by one: never a silent fallback."""
    global batch_fallbacks
    bits = np.zeros((len(matchers), words), dtype=np.int32)
    try:
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(bits.ctypes.data, words * 4)
        else:
            executor().unsafe_compute_mask_ptr([(m, k) for k, m in enumerate(matchers)], bits.ctypes.data,
                                               words * 4, len(matchers))
    except Exception as e:  # find the failing matcher(s): row by row, each failure an empty mask
        if len(matchers) > 1:
            batch_fallbacks += 1
            logger.warning("batched grammar mask of %d rows failed (%s: %s); computing them row by row",
                           len(matchers), type(e).__name__, e)
        bits[:] = 0
        for k, matcher in enumerate(matchers):
            try:
                matcher.unsafe_compute_mask_ptr(bits[k].ctypes.data, words * 4)
            except Exception:
                bits[k] = 0
    return bits


def apply_grammar_masks(logits: torch.Tensor, reqs: Sequence[Req]) -> None:
    """In place: ``-inf`` for every token the grammar of row ``i``'s request forbids next, for all
    constrained rows at once.

    Run after penalties: if they banned every token the grammar allows (``min_new_tokens`` on a
    complete grammar), the grammar wins and its tokens are made equally likely. A grammar that
    allows nothing is left unmasked; :func:`advance_grammar` then finishes the request."""
    rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
    if not rows:
        return
    import torch

    vocab = logits.shape[-1]
    bits = fill_masks([reqs[i].grammar for i in rows], (vocab + 31) // 32)
    unpacked = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    allowed = torch.from_numpy(unpacked.view(np.bool_)).to(logits.device)
    every_row = len(rows) == logits.shape[0]
    index = None if every_row else torch.tensor(rows, device=logits.device)
    current = logits if index is None else logits.index_select(0, index)
    masked = current.masked_fill(~allowed, float("-inf"))
    banned = torch.isinf(masked).all(dim=1, keepdim=True)
    if bool(banned.any()):
        masked = torch.where(banned, torch.zeros_like(current).masked_fill(~allowed, float("-inf")), masked)
    empty = ~allowed.any(dim=1, keepdim=True)
    if bool(empty.any()):
        masked = torch.where(empty, current, masked)
    if index is None:
        logits.copy_(masked)
    else:
        logits.index_copy_(0, index, masked)


def advance_grammar(req: Req, token: int) -> dict[str, Any] | None:
    """Feed ``token`` to ``req``'s grammar; a finish reason when the grammar is complete (stop)
    or dead-ended (abort, naming the grammar's error), else None."""
    grammar = req.grammar
    if grammar is None:
        return None
    if grammar.is_stopped():  # complete: the token is the EOS the mask allowed
        return {"type": "stop", "matched": token}
    try:
        ok = grammar.consume_token(token) and not grammar.is_error()
    except Exception as e:  # a matcher error must end this request, never the worker
        return {"type": "abort", "message": f"grammar error: {e}"}
    if not ok:
        return {"type": "abort", "message": f"grammar dead end: {grammar.get_error() or 'no token can follow'}"}
    if grammar.is_stopped():
        return {"type": "stop", "matched": None}
    return None


def on_thread_with_stack(stack_bytes: int, fn: Any, *args: Any, name: str = "pdserve-grammar") -> threading.Thread:
    """Start ``fn(*args)`` on a daemon thread with a ``stack_bytes`` stack (the size applies to that
    thread only: the process default is put back at once)."""
    previous = threading.stack_size(stack_bytes)
    try:
        thread = threading.Thread(target=fn, args=args, name=name, daemon=True)
        thread.start()
    finally:
        threading.stack_size(previous)
    return thread


class CompileThread:
    """Compiles requests' grammars off a worker's engine loop, one at a time, on a thread with a
    COMPILE_STACK_BYTES stack.

    ``submit(key, params)`` queues a job; when it is done, ``fileno()`` turns readable (the loop
    polls it with its sockets) and :meth:`done` returns ``(key, matcher, error)``. llguidance drops
    the GIL while it builds a matcher, so the loop keeps stepping other requests meanwhile."""

    def __init__(self, compile_fn: Any) -> None:
        import queue

        self._compile = compile_fn
        self._jobs: queue.SimpleQueue[tuple[Any, SamplingParams]] = queue.SimpleQueue()
        self._done: list[tuple[Any, Any, Exception | None]] = []
        self._lock = threading.Lock()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self.pending = 0  # submitted, not yet returned by done()
        on_thread_with_stack(COMPILE_STACK_BYTES, self._run)

    def fileno(self) -> int:
        return self._read_fd

    def submit(self, key: Any, params: SamplingParams) -> None:
        self.pending += 1
        self._jobs.put((key, params))

    def done(self) -> list[tuple[Any, Any, Exception | None]]:
        """The finished jobs, in the order they finished: ``(key, matcher, None)`` or ``(key, None, error)``."""
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            done, self._done = self._done, []
        self.pending -= len(done)
        return done

    def _run(self) -> None:
        while True:
            key, params = self._jobs.get()
            try:
                result = (key, self._compile(params), None)
            except Exception as e:  # a GrammarError names the field; anything else fails that request only
                result = (key, None, e)
            with self._lock:
                self._done.append(result)
            os.write(self._write_fd, b"x")
