"""``pdserve bench serving``: an online load generator for pdserve, SGLang and OpenAI-compatible servers.

Requests from a dataset arrive as a Poisson process (``--request-rate``, ``inf`` sends them all at
once), optionally capped at ``--max-concurrency`` in flight, each streamed and timed per token.
With ``--dataset multi-turn`` the arrivals are conversation starts: a conversation's turns follow
one another (each sent when the previous one has answered), the conversations run concurrently.
Prints a result table and optionally writes every metric, the arguments and per-request records
as JSON. :func:`run_benchmark` is the same benchmark as a Python function.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BACKENDS = ("pdserve", "sglang", "openai-completions", "openai-chat")
DATASETS = ("random", "sharegpt", "generated-shared-prefix", "multi-turn")
INFO_TIMEOUT_S = 10.0


class BenchmarkError(RuntimeError):
    """The benchmark cannot run as configured (unreachable server, no model name, bad dataset...)."""


@dataclass
class ServingConfig:
    """Everything one serving benchmark run needs; the CLI flags map onto these fields."""

    base_url: str
    backend: str = "pdserve"
    dataset: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 100
    request_rate: float = math.inf
    max_concurrency: int | None = None
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    sharegpt_output_len: int | None = None
    gsp_num_groups: int = 8
    gsp_prompts_per_group: int = 16
    gsp_system_prompt_len: int = 1024
    gsp_question_len: int = 64
    gsp_output_len: int = 32
    mt_num_conversations: int = 16
    mt_turns_min: int = 4
    mt_turns_max: int = 8
    mt_system_prompt_len: int = 256
    mt_question_len: int = 32
    mt_output_len: int = 32
    goodput: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    model: str | None = None
    tokenizer_path: str | None = None
    extra_body: dict[str, Any] | None = None
    request_timeout_s: float = 600.0
    warmup_requests: int = 1
    api_key: str | None = None
    disable_tqdm: bool = False
    output_file: str | None = None

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise BenchmarkError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.dataset not in DATASETS:
            raise BenchmarkError(f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        if self.num_prompts < 1:
            raise BenchmarkError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if not self.request_rate > 0:
            raise BenchmarkError(f"--request-rate must be > 0 or inf, got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise BenchmarkError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if not self.request_timeout_s > 0:
            raise BenchmarkError(f"--request-timeout must be > 0 s, got {self.request_timeout_s}")
        if self.warmup_requests < 0:
            raise BenchmarkError(f"--warmup-requests must be >= 0, got {self.warmup_requests}")

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON-safe values (an infinite rate as the string ``"inf"``, no API key)."""
        out = dataclasses.asdict(self)
        out["api_key"] = "***" if self.api_key else None
        out["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        return out


@dataclass
class ServingResult:
    """A finished run: the metrics, the records behind them, and what was run."""

    metrics: dict[str, Any]
    records: list[Any]
    config: ServingConfig
    model: str | None
    tokenizer: str

    def to_json(self) -> dict[str, Any]:
        return {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backend": self.config.backend,
            "model": self.model,
            "tokenizer": self.tokenizer,
            "args": self.config.to_json(),
            "metrics": self.metrics,
            "requests": [r.to_json() for r in self.records],
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServingConfig(base_url="")
    parser.add_argument("--base-url", required=True, help="server address, e.g. http://127.0.0.1:30000")
    parser.add_argument("--backend", choices=BACKENDS, default=d.backend,
                        help="pdserve/sglang: POST /generate; openai-*: /v1/completions or /v1/chat/completions")
    parser.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                        help="prompt source: random token ids, a ShareGPT file or generated shared prefixes")
    parser.add_argument("--dataset-path", default=None, help="local ShareGPT JSON file (never downloaded)")
    parser.add_argument("--num-prompts", type=int, default=d.num_prompts, help="requests to send")
    parser.add_argument("--request-rate", type=float, default=d.request_rate,
                        help="mean requests per second, Poisson arrivals; inf sends all at once (default)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--random-input-len", type=int, default=d.random_input_len,
                        help="random dataset: prompt tokens")
    parser.add_argument("--random-output-len", type=int, default=d.random_output_len,
                        help="random dataset: output tokens")
    parser.add_argument("--random-range-ratio", type=float, default=d.random_range_ratio,
                        help="lengths uniform in [L*(1-ratio), L*(1+ratio)], per request")
    parser.add_argument("--sharegpt-output-len", type=int, default=None,
                        help="output tokens per ShareGPT request (default: the length of the reply)")
    parser.add_argument("--gsp-num-groups", type=int, default=d.gsp_num_groups,
                        help="generated-shared-prefix: distinct system prompts (num-prompts is groups x per group)")
    parser.add_argument("--gsp-prompts-per-group", type=int, default=d.gsp_prompts_per_group,
                        help="generated-shared-prefix: prompts per system prompt")
    parser.add_argument("--gsp-system-prompt-len", type=int, default=d.gsp_system_prompt_len,
                        help="generated-shared-prefix: system prompt tokens")
    parser.add_argument("--gsp-question-len", type=int, default=d.gsp_question_len,
                        help="generated-shared-prefix: question tokens after the system prompt")
    parser.add_argument("--gsp-output-len", type=int, default=d.gsp_output_len,
                        help="generated-shared-prefix: output tokens")
    parser.add_argument("--mt-num-conversations", type=int, default=d.mt_num_conversations,
                        help="multi-turn: conversations, started at --request-rate and run concurrently "
                        "(default: %(default)s)")
    parser.add_argument("--mt-turns-min", type=int, default=d.mt_turns_min,
                        help="multi-turn: fewest turns of a conversation (default: %(default)s)")
    parser.add_argument("--mt-turns-max", type=int, default=d.mt_turns_max,
                        help="multi-turn: most turns of a conversation (default: %(default)s)")
    parser.add_argument("--mt-system-prompt-len", type=int, default=d.mt_system_prompt_len,
                        help="multi-turn: tokens of each conversation's system prompt (default: %(default)s)")
    parser.add_argument("--mt-question-len", type=int, default=d.mt_question_len,
                        help="multi-turn: tokens of each turn's new question (default: %(default)s)")
    parser.add_argument("--mt-output-len", type=int, default=d.mt_output_len,
                        help="multi-turn: tokens generated per turn, and of each answer in the history "
                        "(default: %(default)s)")
    parser.add_argument("--goodput", nargs="+", metavar="KEY:MS", default=[],
                        help="SLO limits in ms for SLO attainment and goodput: ttft:MS tpot:MS e2el:MS")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the dataset and the arrival times")
    parser.add_argument("--model", default=None, help="model name to send (default: first id of GET /v1/models)")
    parser.add_argument("--tokenizer-path", default=None,
                        help="tokenizer folder (default: the server's model_path if local, else the tiny model)")
    parser.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    parser.add_argument("--request-timeout", type=float, default=d.request_timeout_s, dest="request_timeout_s",
                        help="total seconds allowed per request, streaming included")
    parser.add_argument("--warmup-requests", type=int, default=d.warmup_requests,
                        help="untimed requests sent one by one first; a failing one stops the benchmark")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    parser.add_argument("--output-file", default=None, help="write metrics, args and per-request records as JSON")


def config_from_args(args: argparse.Namespace) -> ServingConfig:
    """A :class:`ServingConfig` from parsed flags (raises :class:`BenchmarkError` on bad values)."""
    from pdserve.bench.metrics import parse_slo

    try:
        slo = parse_slo(args.goodput)
    except ValueError as e:
        raise BenchmarkError(f"--goodput: {e}") from None
    extra = None
    if args.extra_body is not None:
        try:
            extra = json.loads(args.extra_body)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"--extra-body is not valid JSON: {e}") from None
        if not isinstance(extra, dict):
            raise BenchmarkError("--extra-body must be a JSON object")
    names = {f.name for f in dataclasses.fields(ServingConfig)} - {"goodput", "extra_body"}
    return ServingConfig(goodput=slo, extra_body=extra, **{k: getattr(args, k) for k in names})


def run(args: argparse.Namespace) -> int:
    from pdserve.bench.report import format_table, write_json

    try:
        config = config_from_args(args)
        result = benchmark(config)
    except BenchmarkError as e:
        print(f"pdserve bench serving: {e}", file=sys.stderr)
        return 2
    print(format_table(result.metrics, max_concurrency=config.max_concurrency,
                       request_rate=config.request_rate))
    print(f"backend {config.backend}, model {result.model}, tokenizer {result.tokenizer}")
    if config.output_file:
        write_json(config.output_file, result.to_json())
        print(f"wrote {config.output_file}")
    return 0 if result.metrics["completed"] > 0 else 1


def run_benchmark(base_url: str, requests: list[Any] | None = None, **options: Any) -> dict[str, Any]:
    """Run a serving benchmark (``options`` are :class:`ServingConfig` fields) and return its metrics.
    ``requests`` (a list of :class:`~pdserve.bench.datasets.BenchRequest`) replaces the dataset."""
    return benchmark(ServingConfig(base_url=base_url, **options), requests).metrics


def benchmark(config: ServingConfig, requests: list[Any] | None = None) -> ServingResult:
    """Run the benchmark described by ``config`` (on ``requests`` instead of its dataset when
    given); writes nothing, prints only the progress bar."""
    return asyncio.run(benchmark_async(config, requests))


async def benchmark_async(config: ServingConfig, requests: list[Any] | None = None) -> ServingResult:
    """:func:`benchmark` inside a running event loop."""
    import aiohttp

    from pdserve.bench.metrics import compute_metrics

    config.validate()
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
    info_timeout = aiohttp.ClientTimeout(total=INFO_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=info_timeout, headers=headers) as session:
        model = config.model or await _first_model(session, config.base_url)
        server_info = await _get_json(session, config.base_url, "/server_info")
    if model is None and config.backend not in ("pdserve", "sglang"):
        raise BenchmarkError(f"no model name: give --model or make GET {config.base_url}/v1/models answer")
    tokenizer, tokenizer_source = _load_tokenizer(config.tokenizer_path, server_info)
    if requests is None:
        requests = _build_requests(config, tokenizer)
    elif not requests:
        raise BenchmarkError("no requests to send")
    records, duration = await _run_requests(config, requests, model, tokenizer, headers)
    metrics = compute_metrics(records, duration, config.goodput or None)
    return ServingResult(metrics=metrics, records=records, config=config, model=model, tokenizer=tokenizer_source)


async def _get_json(session: Any, base_url: str, path: str) -> Any:
    """The JSON answer of ``GET base_url + path``, or None when it fails."""
    import aiohttp

    try:
        async with session.get(base_url.rstrip("/") + path) as response:
            if response.status != 200:
                return None
            return await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def _first_model(session: Any, base_url: str) -> str | None:
    data = await _get_json(session, base_url, "/v1/models")
    try:
        return str(data["data"][0]["id"])
    except (TypeError, KeyError, IndexError):
        return None


def _load_tokenizer(path: str | None, server_info: Any) -> tuple[Any, str]:
    """The tokenizer to build and count tokens with, and where it came from: ``path``, else the
    server's local ``tokenizer_path``/``model_path``, else the embedded tiny model."""
    from pdserve.models.tokenizer import Tokenizer, TokenizerError

    if path is not None:
        try:
            return Tokenizer(path), path
        except TokenizerError as e:
            raise BenchmarkError(f"--tokenizer-path: {e}") from None
    if isinstance(server_info, dict):
        for key in ("tokenizer_path", "model_path"):
            candidate = server_info.get(key)
            if isinstance(candidate, str) and (Path(candidate) / "tokenizer.json").is_file():
                return Tokenizer(candidate), candidate
    from pdserve.models.tiny import default_model_path

    default = default_model_path()
    return Tokenizer(default), default


def _build_requests(config: ServingConfig, tokenizer: Any) -> list[Any]:
    from pdserve.bench.datasets import (
        DatasetError,
        load_sharegpt,
        sample_multi_turn,
        sample_random,
        sample_shared_prefix,
    )

    try:
        if config.dataset == "multi-turn":
            return sample_multi_turn(tokenizer, config.mt_num_conversations, config.mt_turns_min,
                                     config.mt_turns_max, config.mt_system_prompt_len, config.mt_question_len,
                                     config.mt_output_len, config.seed)
        if config.dataset == "generated-shared-prefix":
            return sample_shared_prefix(tokenizer, config.gsp_num_groups, config.gsp_prompts_per_group,
                                        config.gsp_system_prompt_len, config.gsp_question_len, config.gsp_output_len,
                                        config.seed)
        if config.dataset == "sharegpt":
            return load_sharegpt(config.dataset_path, tokenizer, config.num_prompts, config.seed,
                                 config.sharegpt_output_len)
        return sample_random(tokenizer, config.num_prompts, config.random_input_len, config.random_output_len,
                             config.random_range_ratio, config.seed)
    except DatasetError as e:
        raise BenchmarkError(str(e)) from None


def _progress_disabled(config: ServingConfig) -> bool:
    return config.disable_tqdm or not sys.stderr.isatty() or os.environ.get("CI", "").lower() == "true"


async def _run_requests(config: ServingConfig, requests: list[Any], model: str | None, tokenizer: Any,
                        headers: dict[str, str] | None) -> tuple[list[Any], float]:
    """Send every request on its Poisson schedule; the records and the run's duration in seconds."""
    import aiohttp
    from tqdm import tqdm

    from pdserve.bench.arrivals import arrival_offsets
    from pdserve.bench.backends import build_payload, send_request
    from pdserve.bench.metrics import RequestRecord

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0

    payloads = [build_payload(config.backend, r, model, config.extra_body) for r in requests]
    limit = config.max_concurrency or len(requests)
    gate = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    connector = aiohttp.TCPConnector(limit=limit)
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        def new_record(i: int) -> RequestRecord:
            return RequestRecord(index=i, prompt_len=requests[i].prompt_len,
                                 expected_output_len=requests[i].output_len)

        for k in range(config.warmup_requests):
            i = k % len(requests)
            warm = await send_request(session, config.base_url, config.backend, payloads[i], new_record(i),
                                      count_tokens, headers)
            if not warm.success:
                raise BenchmarkError(f"warm-up request failed: {warm.error}")

        bar = tqdm(total=len(requests), disable=_progress_disabled(config), desc="requests")
        start = time.perf_counter()

        async def one(i: int) -> RequestRecord:
            record = new_record(i)
            if gate is None:
                await send_request(session, config.base_url, config.backend, payloads[i], record, count_tokens,
                                   headers, start)
            else:
                async with gate:
                    await send_request(session, config.base_url, config.backend, payloads[i], record,
                                       count_tokens, headers, start)
            bar.update(1)
            return record

        async def in_turn(indices: list[int]) -> list[RequestRecord]:
            return [await one(i) for i in indices]

        chains = _chains(requests)
        offsets = arrival_offsets(len(chains), config.request_rate, config.seed)
        tasks = []
        for chain, offset in zip(chains, offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(in_turn(chain)))
        done = [r for chain_records in await asyncio.gather(*tasks) for r in chain_records]
        records = sorted(done, key=lambda r: r.index)
        duration = time.perf_counter() - start
        bar.close()
    return list(records), duration


def _chains(requests: list[Any]) -> list[list[int]]:
    """Indices of the requests to send one after the other: a conversation's turns in order, every
    other request alone; chains ordered by their first request."""
    chains: dict[Any, list[int]] = {}
    for i, r in enumerate(requests):
        conversation = getattr(r, "conversation", None)
        chains.setdefault(("c", conversation) if conversation is not None else ("r", i), []).append(i)
    ordered = sorted(chains.values(), key=lambda c: c[0])
    for chain in ordered:
        chain.sort(key=lambda i: getattr(requests[i], "turn", 0))
    return ordered
