"""Benchmark prompts: random token prompts and local ShareGPT files; nothing is downloaded.

``random`` (the SGLang/vLLM "random" dataset): each request's input and output lengths are drawn
uniformly from ``[L * (1 - ratio), L * (1 + ratio)]``; prompts are words of the tokenizer's own
vocabulary chosen so that the text re-encodes to exactly the same ids.

``generated-shared-prefix`` (SGLang's name and ``--gsp-*`` flags): ``num_groups`` random system
prompts of ``system_prompt_len`` tokens, each followed by ``prompts_per_group`` random questions
of ``question_len`` tokens; requests of all groups are interleaved (seeded shuffle), so a prefix
cache must keep every group's system prompt to win.

``multi-turn``: ``num_conversations`` chats of ``turns_min``-``turns_max`` turns (seeded). Each starts
with a random system prompt of ``system_prompt_len`` tokens; turn ``k``'s prompt is turn ``k - 1``'s
prompt, an answer of ``output_len`` tokens and a new question of ``question_len`` tokens, so every
turn extends the previous one (token ids by concatenation). The answers in the history are
random words, not what the server generated (prompts are fixed before the run, so every backend
and setup sees the same ones): a cache can reuse the previous turns' prompt, not the previous
answer's KV. The driver sends the turns of one conversation one after the other and the
conversations concurrently (``conversation`` / ``turn`` of each request).

``sharegpt``: a JSON list of ``{"conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}``; the first human turn is the prompt and the reply after it
sets the output length (unless overridden), filtered like SGLang (too short: under 2 tokens; too
long: prompt over 1024 or prompt + output over 2048 tokens).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

HUMAN_ROLES = ("human", "user")
MIN_SEQ_LEN = 2
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048
WORD_TOKEN = re.compile(r" ?[A-Za-z]+")
VOCAB_SCAN_LIMIT = 20000
MIN_WORD_POOL = 16
FIX_ROUNDS = 10


class DatasetError(ValueError):
    """The requested prompts cannot be built (missing or malformed file, too few usable entries)."""


class TextTokenizer(Protocol):
    """What the datasets need from a tokenizer (:class:`pdserve.models.tokenizer.Tokenizer` fits)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def all_special_ids(self) -> list[int]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class BenchRequest:
    """One prompt to send: its text, the same text's token ids, and how many tokens to generate."""

    prompt: str
    prompt_ids: list[int]
    output_len: int
    conversation: int | None = None  # multi-turn: turns of one conversation are sent in order
    turn: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def length_range(mean: int, ratio: float) -> tuple[int, int]:
    """Inclusive ``[L * (1 - ratio), L * (1 + ratio)]``, at least 1."""
    if mean < 1:
        raise DatasetError(f"length must be >= 1, got {mean}")
    if not 0.0 <= ratio <= 1.0:
        raise DatasetError(f"--random-range-ratio must be in [0, 1], got {ratio}")
    low = max(1, int(mean * (1.0 - ratio)))
    return low, max(low, int(mean * (1.0 + ratio)))


def random_lengths(n: int, mean: int, ratio: float, rng: np.random.Generator) -> list[int]:
    """``n`` lengths uniform over :func:`length_range`."""
    low, high = length_range(mean, ratio)
    return [int(x) for x in rng.integers(low, high + 1, size=n)]


def word_pool(tokenizer: TextTokenizer, seed: int = 0) -> list[int]:
    """Ids of whole-word tokens that decode and re-encode to themselves, from up to
    :data:`VOCAB_SCAN_LIMIT` ids: space-prefixed words (byte-level BPE) if there are enough, else
    bare words (SentencePiece decodes its word tokens without the space), else any id."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(tokenizer.vocab_size) if i not in special]
    if len(ids) > VOCAB_SCAN_LIMIT:
        ids = sorted(random.Random(seed).sample(ids, VOCAB_SCAN_LIMIT))
    spaced, bare = [], []
    for i in ids:
        text = tokenizer.decode([i])
        if WORD_TOKEN.fullmatch(text) and tokenizer.encode(text, add_special_tokens=False) == [i]:
            (spaced if text.startswith(" ") else bare).append(i)
    for pool in (spaced, bare):
        if len(pool) >= MIN_WORD_POOL:
            return pool
    return ids


def _round_trip(tokenizer: TextTokenizer, ids: list[int], length: int, pool: list[int],
                rng: np.random.Generator) -> tuple[str, list[int]]:
    """Text whose encoding has ``length`` ids where possible, starting from ``ids``."""
    text = tokenizer.decode(ids)
    for _ in range(FIX_ROUNDS):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == length:
            return text, encoded
        encoded = encoded[:length]
        encoded += [pool[int(k)] for k in rng.integers(0, len(pool), size=length - len(encoded))]
        text = tokenizer.decode(encoded)
    return text, tokenizer.encode(text, add_special_tokens=False)


def sample_random(tokenizer: TextTokenizer, num_prompts: int, input_len: int, output_len: int,
                  range_ratio: float, seed: int) -> list[BenchRequest]:
    """``num_prompts`` random prompts with per-request input and output lengths (see module doc)."""
    rng = np.random.default_rng(seed)
    in_lens = random_lengths(num_prompts, input_len, range_ratio, rng)
    out_lens = random_lengths(num_prompts, output_len, range_ratio, rng)
    pool = word_pool(tokenizer, seed)
    requests = []
    for n_in, n_out in zip(in_lens, out_lens):
        ids = [pool[int(k)] for k in rng.integers(0, len(pool), size=n_in)]
        text, ids = _round_trip(tokenizer, ids, n_in, pool, rng)
        requests.append(BenchRequest(prompt=text, prompt_ids=ids, output_len=n_out))
    return requests


def sample_mixed(tokenizer: TextTokenizer, num_prompts: int, long_share: float, long_input: tuple[int, int],
                 short_input: tuple[int, int], output: tuple[int, int], seed: int) -> list[BenchRequest]:
    """A skewed random workload: about ``long_share`` of the requests have a prompt length uniform in
    ``long_input`` (inclusive), the rest in ``short_input``; output lengths uniform in ``output``.
    Long and short requests are interleaved in a seeded random order."""
    if not 0.0 <= long_share <= 1.0:
        raise DatasetError(f"long share must be in [0, 1], got {long_share}")
    rng = np.random.default_rng(seed)
    n_long = int(round(num_prompts * long_share))
    is_long = np.zeros(num_prompts, dtype=bool)
    is_long[rng.choice(num_prompts, size=n_long, replace=False)] = True
    pool = word_pool(tokenizer, seed)
    requests = []
    for long in is_long:
        low, high = long_input if long else short_input
        n_in = int(rng.integers(low, high + 1))
        n_out = int(rng.integers(output[0], output[1] + 1))
        ids = [pool[int(k)] for k in rng.integers(0, len(pool), size=n_in)]
        text, ids = _round_trip(tokenizer, ids, n_in, pool, rng)
        requests.append(BenchRequest(prompt=text, prompt_ids=ids, output_len=n_out))
    return requests


def sample_shared_prefix(tokenizer: TextTokenizer, num_groups: int, prompts_per_group: int, system_prompt_len: int,
                         question_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    """The ``generated-shared-prefix`` workload (see module doc)."""
    for name, value in (("--gsp-num-groups", num_groups), ("--gsp-prompts-per-group", prompts_per_group),
                        ("--gsp-system-prompt-len", system_prompt_len), ("--gsp-question-len", question_len),
                        ("--gsp-output-len", output_len)):
        if value < 1:
            raise DatasetError(f"{name} must be >= 1, got {value}")
    rng = np.random.default_rng(seed)
    pool = word_pool(tokenizer, seed)

    def words(n: int) -> str:
        return _round_trip(tokenizer, [pool[int(k)] for k in rng.integers(0, len(pool), size=n)], n, pool, rng)[0]

    requests = []
    for _ in range(num_groups):
        system = words(system_prompt_len)
        for _ in range(prompts_per_group):
            text = system + words(question_len)
            requests.append(BenchRequest(text, tokenizer.encode(text, add_special_tokens=False), output_len))
    order = rng.permutation(len(requests))
    return [requests[int(i)] for i in order]


def sample_multi_turn(tokenizer: TextTokenizer, num_conversations: int, turns_min: int, turns_max: int,
                      system_prompt_len: int, question_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    """The ``multi-turn`` workload (see module doc): every turn of every conversation, in order."""
    for name, value in (("--mt-num-conversations", num_conversations), ("--mt-turns-min", turns_min),
                        ("--mt-system-prompt-len", system_prompt_len), ("--mt-question-len", question_len),
                        ("--mt-output-len", output_len)):
        if value < 1:
            raise DatasetError(f"{name} must be >= 1, got {value}")
    if turns_max < turns_min:
        raise DatasetError(f"--mt-turns-max must be >= --mt-turns-min ({turns_min}), got {turns_max}")
    rng = np.random.default_rng(seed)
    pool = word_pool(tokenizer, seed)

    def words(n: int) -> tuple[str, list[int]]:
        return _round_trip(tokenizer, [pool[int(k)] for k in rng.integers(0, len(pool), size=n)], n, pool, rng)

    requests = []
    for c in range(num_conversations):
        text, ids = words(system_prompt_len)
        for turn in range(int(rng.integers(turns_min, turns_max + 1))):
            if turn:
                answer_text, answer_ids = words(output_len)
                text, ids = text + answer_text, ids + answer_ids
            question_text, question_ids = words(question_len)
            text, ids = text + question_text, ids + question_ids
            requests.append(BenchRequest(text, list(ids), output_len, conversation=c, turn=turn))
    return requests


def _first_exchange(entry: Any) -> tuple[str, str] | None:
    """The first human turn and the reply after it, or None."""
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        return None
    for k, turn in enumerate(turns[:-1]):
        if isinstance(turn, dict) and turn.get("from") in HUMAN_ROLES:
            reply = turns[k + 1]
            if isinstance(reply, dict) and reply.get("from") not in HUMAN_ROLES:
                prompt, answer = turn.get("value"), reply.get("value")
                if isinstance(prompt, str) and isinstance(answer, str):
                    return prompt, answer
            return None
    return None


def load_sharegpt(path: str | Path | None, tokenizer: TextTokenizer, num_prompts: int, seed: int,
                  output_len: int | None = None) -> list[BenchRequest]:
    """``num_prompts`` prompts from a local ShareGPT JSON file, shuffled with ``seed`` and filtered
    like SGLang; ``output_len`` overrides the reply's token count."""
    if path is None:
        raise DatasetError("--dataset sharegpt needs --dataset-path FILE (a local ShareGPT JSON file; "
                           "nothing is downloaded)")
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"ShareGPT file not found: {file} (nothing is downloaded; give a local file)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read ShareGPT file {file}: {e}") from e
    if not isinstance(data, list):
        raise DatasetError(f"ShareGPT file {file} must hold a JSON list of conversations")
    exchanges = [x for x in map(_first_exchange, data) if x is not None]
    random.Random(seed).shuffle(exchanges)
    requests: list[BenchRequest] = []
    for prompt, answer in exchanges:
        if len(requests) == num_prompts:
            break
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        n_out = output_len if output_len is not None else len(tokenizer.encode(answer, add_special_tokens=False))
        if len(ids) < MIN_SEQ_LEN or (output_len is None and n_out < MIN_SEQ_LEN):
            continue
        if len(ids) > MAX_PROMPT_LEN or len(ids) + n_out > MAX_TOTAL_LEN:
            continue
        requests.append(BenchRequest(prompt=prompt, prompt_ids=ids, output_len=n_out))
    if len(requests) < num_prompts:
        raise DatasetError(
            f"ShareGPT file {file}: only {len(requests)} usable conversations of {len(data)} entries "
            f"(need {num_prompts}); lower --num-prompts"
        )
    return requests
