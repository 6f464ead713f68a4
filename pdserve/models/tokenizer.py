"""Hugging Face fast tokenizer without transformers: ``tokenizer.json`` + ``tokenizer_config.json``.

:class:`Tokenizer` encodes, decodes and renders chat templates the way ``AutoTokenizer`` does;
:class:`IncrementalDetokenizer` turns a growing list of output ids into streamed text chunks
that never split a multi-byte character.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerError(ValueError):
    """A tokenizer folder is missing a file or holds malformed data."""


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a plain string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandboxed environment transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class TemplateLimitError(TokenizerError):
    """A request's own chat template ran past its deadline or output cap."""


class _RequestTemplateEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, plus caps on what one operation may build: repetition (``*``),
    powers, format widths (``%``, ``str.format``) and integer arguments of calls and filters at
    ``max_chars``, and no constant folding of those operators at compile time."""

    intercepted_binops = frozenset(["*", "**", "%"])

    def __init__(self, max_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.max_chars = max_chars
        self.filters["tojson"] = _tojson
        self.filters = {name: self._capped(fn) for name, fn in self.filters.items()}
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    def _check_args(self, args: tuple, kwargs: dict) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > self.max_chars:
                raise TemplateLimitError(f"an argument of {value} exceeds the output cap of {self.max_chars} characters")

    def _capped(self, fn: Any) -> Any:
        def capped(*args: Any, **kwargs: Any) -> Any:
            self._check_args(args, kwargs)
            return fn(*args, **kwargs)

        for attr in ("jinja_pass_arg",):  # keep filters that take the context / environment working
            if hasattr(fn, attr):
                setattr(capped, attr, getattr(fn, attr))
        return capped

    def _check_format(self, fmt: Any) -> None:
        """Widths and precisions in a format string (``'{:>9999}'``, ``'%9999d'``) within the cap."""
        if isinstance(fmt, str):
            for number in re.findall(r"\d+", fmt):
                if len(number) > 12 or int(number) > self.max_chars:
                    raise TemplateLimitError(f"a format width of {number} exceeds the output cap of "
                                             f"{self.max_chars} characters")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self._check_args(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            self._check_format(obj)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, str) and argument in ("format", "format_map"):
            self._check_format(obj)
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise TemplateLimitError(f"a power of {right} is too large for a chat template")
        if operator == "%":
            self._check_format(left)
        if operator == "*":
            sized, count = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(sized, (str, list, tuple)) and isinstance(count, int) and len(sized) * count > self.max_chars:
                raise TemplateLimitError(f"repeating {len(sized)} items {count} times exceeds the output cap of "
                                         f"{self.max_chars} characters")
        return super().call_binop(context, operator, left, right)


def is_inline_template(chat_template: Any, known: dict[str, str]) -> bool:
    """Whether ``chat_template`` (as a request names it) is template code rather than the name of
    one of the checkpoint's templates (``known``)."""
    return isinstance(chat_template, str) and chat_template not in known and "{" in chat_template


def render_request_template(source: str, variables: dict[str, Any], deadline_s: float, max_chars: int) -> str:
    """Compile and render a chat template a request supplied, within ``deadline_s`` seconds and
    ``max_chars`` characters of output (:class:`TemplateLimitError` otherwise). The deadline is
    checked at every line of Python the compiler and the template run (a trace function on this
    thread only); one C-level operation is bounded by the environment's caps instead."""
    deadline = time.monotonic() + deadline_s

    def past_deadline(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"the template did not render within {deadline_s:g} s")
        return past_deadline

    previous = sys.gettrace()
    sys.settrace(past_deadline)
    try:
        template = _RequestTemplateEnvironment(max_chars).from_string(source)
        pieces: list[str] = []
        size = 0
        for piece in template.generate(**variables):
            size += len(piece)
            if size > max_chars:
                raise TemplateLimitError(f"the rendered prompt exceeds {max_chars} characters")
            pieces.append(piece)
        return "".join(pieces)
    finally:
        sys.settrace(previous)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token and chat-template settings of its folder."""

    def __init__(self, path: str | Path) -> None:
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"tokenizer.json not found in {folder} (only fast tokenizers are supported)")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:
            raise TokenizerError(f"cannot parse {tok_file}: {e}") from e
        cfg = _read_json(folder / "tokenizer_config.json")
        self.path = str(folder)
        self.special_tokens: dict[str, str] = {}
        for key in SPECIAL_TOKEN_KEYS:
            token = _token_str(cfg.get(key))
            if token is not None:
                self.special_tokens[key] = token
        self._add_bos: bool | None = cfg.get("add_bos_token")
        self._add_eos: bool | None = cfg.get("add_eos_token")
        self.chat_templates = _chat_templates(folder, cfg.get("chat_template"))
        added = self._tok.get_added_tokens_decoder()
        named = (self._token_id(t) for t in self.special_tokens.values())
        self._special_ids = sorted({i for i, tok in added.items() if tok.special} | {i for i in named if i is not None})

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id(self.special_tokens.get("bos_token"))

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id(self.special_tokens.get("eos_token"))

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id(self.special_tokens.get("pad_token"))

    @property
    def all_special_ids(self) -> list[int]:
        return list(self._special_ids)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_json(self) -> str:
        """The tokenizer.json content (what grammar libraries build their token tables from)."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` BOS/EOS are added like HF does.

        When tokenizer_config.json sets ``add_bos_token``/``add_eos_token`` those flags decide
        (as in HF's Llama tokenizers); otherwise the tokenizer.json post-processor does.
        """
        if not add_special_tokens:
            return self._tok.encode(text, add_special_tokens=False).ids
        if self._add_bos is None and self._add_eos is None:
            return self._tok.encode(text, add_special_tokens=True).ids
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos, eos = self.bos_token_id, self.eos_token_id
        if self._add_bos and bos is not None:
            ids = [bos, *ids]
        if self._add_eos and eos is not None:
            ids = [*ids, eos]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._tok.id_to_token(i) for i in ids]

    def get_chat_template(self, name: str | None = None, tools: list[dict] | None = None) -> str:
        """The template to render: ``name`` if given, else ``tool_use`` when tools are passed and
        such a template exists, else ``default``."""
        if not self.chat_templates:
            raise TokenizerError(f"tokenizer in {self.path} has no chat_template")
        if name is not None:
            if name in self.chat_templates:
                return self.chat_templates[name]
            if "{" in name:  # an inline template string
                return name
            shown = name if len(name) <= 80 else f"{name[:80]}... ({len(name)} characters)"
            raise TokenizerError(f"no chat template named {shown!r}; available: {', '.join(self.chat_templates)}")
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if len(self.chat_templates) == 1:
            return next(iter(self.chat_templates.values()))
        raise TokenizerError(f"no default chat template; available: {', '.join(self.chat_templates)}")

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        request_limits: tuple[float, int] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the checkpoint's chat template (same variables as HF), or with
        an inline ``chat_template``: then only under ``request_limits`` (deadline in seconds, output
        cap in characters; see :func:`render_request_template`)."""
        variables = self.chat_template_variables(messages, add_generation_prompt, tools, **kwargs)
        if is_inline_template(chat_template, self.chat_templates):
            if request_limits is None:
                raise TokenizerError("an inline chat template needs a deadline and an output cap")
            return render_request_template(chat_template, variables, *request_limits)
        return _compile_template(self.get_chat_template(chat_template, tools)).render(**variables)

    def chat_template_variables(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                                tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> dict[str, Any]:
        """What a chat template sees: the special tokens, the caller's extra variables, the messages."""
        taken = sorted({"messages", "tools", "add_generation_prompt"} & kwargs.keys())
        if taken:
            raise TokenizerError(f"template variables may not redefine {', '.join(taken)}")
        variables: dict[str, Any] = dict(self.special_tokens)
        variables.update(kwargs)
        variables.update(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)
        return variables


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def _chat_templates(folder: Path, raw: Any) -> dict[str, str]:
    """Named chat templates from tokenizer_config.json (string or list form) or ``chat_template.jinja``."""
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list):
        return {item["name"]: item["template"] for item in raw if isinstance(item, dict) and "name" in item}
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return {"default": jinja_file.read_text(encoding="utf-8")}
    return {}


class IncrementalDetokenizer:
    """Streams the text of output ids as they arrive.

    Each step decodes a short window ``ids[prefix_offset:]`` and subtracts the already emitted
    ``ids[prefix_offset:read_offset]``; text ending in an incomplete UTF-8 character (U+FFFD) is
    held back until the character completes. A few prompt tokens seed the window so that
    tokenizers which strip a leading space decode the first output token in context.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-self.CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_context = len(context)
        self.text = ""

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, new_ids: list[int]) -> str:
        """Append ``new_ids``; return the text that became complete (possibly empty)."""
        self._ids.extend(new_ids)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit held-back text at the end of generation (an unfinished character decodes to U+FFFD)."""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        delta = full[len(prefix):] if full.startswith(prefix) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += delta
        return delta
