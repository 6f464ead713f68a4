"""Options of ``pdserve router``: flag names follow sglang-router's where it has one.

Importing this module stays light (argparse and dataclasses only).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from urllib.parse import urlsplit

POLICIES = ("random", "round_robin", "least_load", "power_of_two", "cache_aware", "prefix")
LOG_LEVELS = ("debug", "info", "warn", "warning", "error")


MAX_ROUTER_PROCESSES = 64

@dataclass(frozen=True)
class WorkerSpec:
    """One server the router is told about: its URL, role and (prefill only) bootstrap port."""

    url: str
    role: str  # "prefill", "decode" or "mixed"
    bootstrap_port: int | None = None


@dataclass
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    pd_disaggregation: bool = False
    workers: list[WorkerSpec] = field(default_factory=list)
    prefill_policy: str = "least_load"
    decode_policy: str = "least_load"
    dp_coupled: bool = False
    honor_client_ranks: bool = False  # keep a client's data_parallel_rank / disagg_prefill_dp_rank
    # cache_aware and prefix
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 4096  # tokens (sglang-router counts requests: 64)
    balance_rel_threshold: float = 1.5
    max_tree_size: int = 1 << 20
    cache_block_chars: int = 16
    kv_events: bool = True  # follow the servers' /kv_events feeds (cache-based policies only)
    tokenize_prompts: bool = True  # tokenize text prompts with the servers' tokenizer (cache-based policies)
    # fleet
    health_check_interval_secs: float = 10.0
    health_check_timeout_secs: float = 5.0
    health_failure_threshold: int = 3
    health_success_threshold: int = 2
    health_check_endpoint: str = "/health"
    worker_startup_check_interval: float = 1.0
    load_poll_interval_secs: float = 2.0
    # requests
    request_timeout_secs: float = 1800.0
    connect_timeout_secs: float = 5.0
    retry_max_retries: int = 5
    retry_initial_backoff_ms: float = 50.0
    retry_max_backoff_ms: float = 30000.0
    retry_backoff_multiplier: float = 1.5
    retry_jitter_factor: float = 0.2
    max_payload_size: int = 32 << 20
    api_key: str | None = None
    log_level: str = "info"
    router_processes: int = 1  # processes serving the one listening port (router/processes.py)

    def validate(self) -> None:
        if not 1 <= self.router_processes <= MAX_ROUTER_PROCESSES:
            raise ValueError(f"--router-processes must be in [1, {MAX_ROUTER_PROCESSES}], got {self.router_processes}")
        if self.pd_disaggregation:
            roles = {w.role for w in self.workers}
            if "mixed" in roles:
                raise ValueError("--worker-urls cannot be combined with --pd-disaggregation")
        elif any(w.role != "mixed" for w in self.workers):
            raise ValueError("--prefill/--decode need --pd-disaggregation")
        for name in (self.prefill_policy, self.decode_policy):
            if name not in POLICIES:
                raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
        urls = [w.url for w in self.workers]
        if len(urls) != len(set(urls)):
            raise ValueError("a worker URL is given twice")
        for w in self.workers:
            check_url(w.url)
            if w.bootstrap_port is not None and not 0 < w.bootstrap_port < 65536:
                raise ValueError(f"bootstrap port of {w.url} must be in [1, 65535], got {w.bootstrap_port}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if self.retry_max_retries < 1:
            raise ValueError(f"retry_max_retries must be >= 1, got {self.retry_max_retries}")
        if self.health_failure_threshold < 1 or self.health_success_threshold < 1:
            raise ValueError("health thresholds must be >= 1")
        if self.max_payload_size < 1:
            raise ValueError(f"max_payload_size must be >= 1, got {self.max_payload_size}")
        if not (self.balance_abs_threshold >= 0 and isinstance(self.balance_abs_threshold, int)):
            raise ValueError(f"balance_abs_threshold must be an integer >= 0, got {self.balance_abs_threshold}")
        if not 1.0 <= self.balance_rel_threshold < float("inf"):
            raise ValueError(f"balance_rel_threshold must be a finite number >= 1, got {self.balance_rel_threshold}")
        if self.max_tree_size < 1:
            raise ValueError(f"max_tree_size must be >= 1, got {self.max_tree_size}")
        if self.cache_block_chars < 1:
            raise ValueError(f"cache_block_chars must be >= 1, got {self.cache_block_chars}")


def check_url(url: str) -> str:
    """``url`` without a trailing slash; ValueError unless it is ``http://host:port``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ValueError(f"worker URL must look like http://HOST:PORT, got {url!r}")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"worker URL must have no path or query, got {url!r}")
    return url.rstrip("/")


def parse_prefill(values: list[str]) -> WorkerSpec:
    """``--prefill URL [BOOTSTRAP_PORT|none]``."""
    if not 1 <= len(values) <= 2:
        raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(values)!r}")
    port: int | None = None
    if len(values) == 2 and values[1].lower() != "none":
        try:
            port = int(values[1])
        except ValueError:
            raise ValueError(f"--prefill bootstrap port must be an integer or 'none', got {values[1]!r}") from None
    return WorkerSpec(check_url(values[0]), "prefill", port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = RouterConfig()
    parser.add_argument("--host", default=d.host, help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=d.port, help="port to listen on")
    parser.add_argument("--worker-urls", nargs="*", default=[], metavar="URL", help="mixed-mode servers")
    parser.add_argument("--pd-disaggregation", action="store_true", help="route to prefill and decode servers")
    parser.add_argument(
        "--prefill", nargs="+", action="append", default=[], metavar="URL [BOOTSTRAP_PORT]",
        help="prefill server URL and optional bootstrap port (else its /server_info's); repeatable",
    )
    parser.add_argument("--decode", action="append", default=[], metavar="URL", help="decode server URL; repeatable")
    parser.add_argument("--policy", choices=POLICIES, default=None, help="policy of both sides (default: least_load)")
    parser.add_argument("--prefill-policy", choices=POLICIES, default=None,
                        help="policy choosing the prefill unit (default: --policy's)")
    parser.add_argument("--decode-policy", choices=POLICIES, default=None,
                        help="policy choosing the decode unit (default: --policy's)")
    parser.add_argument(
        "--dp-coupled", action="store_true",
        help="old behaviour for comparison: pick a decode rank r, then a prefill unit with rank r %% its dp_size",
    )
    parser.add_argument(
        "--honor-client-ranks", action="store_true",
        help="serve a request on the DP ranks it names (decode: the X-Data-Parallel-Rank header, else the body's "
        "data_parallel_rank or routed_dp_rank; prefill: disagg_prefill_dp_rank or prefill_data_parallel_rank), "
        "400 when no healthy unit has that rank. Default: the router picks the ranks, and a request that names "
        "one is refused with 400 naming the field and this flag",
    )
    parser.add_argument("--cache-threshold", type=float, default=d.cache_threshold,
                        help="cache_aware: least share of the prompt a unit's cached prefix must cover to win "
                        "over load, in [0, 1] (default: %(default)s)")
    parser.add_argument("--balance-abs-threshold", type=int, default=d.balance_abs_threshold,
                        help="cache_aware and prefix: load gap in tokens beyond which (with "
                        "--balance-rel-threshold) they balance load instead of following the cache "
                        "(default: %(default)s)")
    parser.add_argument("--balance-rel-threshold", type=float, default=d.balance_rel_threshold,
                        help="cache_aware and prefix: load ratio (>= 1) beyond which (with "
                        "--balance-abs-threshold) they balance load instead (default: %(default)s)")
    parser.add_argument("--max-tree-size", type=int, default=d.max_tree_size,
                        help="cache_aware and prefix: page hashes remembered per unit (default: %(default)s)")
    parser.add_argument("--disable-kv-events", action="store_true",
                        help="cache_aware and prefix: do not follow the servers' GET /kv_events feeds; the "
                        "router's own predictions are then its only view of their caches (default: follow them)")
    parser.add_argument("--disable-prompt-tokenization", action="store_true",
                        help="cache_aware and prefix: do not tokenize text prompts with the tokenizer at the "
                        "servers' model_path; match text by character blocks instead (default: tokenize)")
    parser.add_argument("--health-check-interval-secs", type=float, default=d.health_check_interval_secs,
                        help="seconds between health checks of an admitted worker")
    parser.add_argument("--health-check-timeout-secs", type=float, default=d.health_check_timeout_secs,
                        help="seconds one health check may take")
    parser.add_argument("--health-failure-threshold", type=int, default=d.health_failure_threshold,
                        help="failed checks in a row that take a worker out")
    parser.add_argument("--health-success-threshold", type=int, default=d.health_success_threshold,
                        help="passed checks in a row that admit a worker (again)")
    parser.add_argument("--health-check-endpoint", default=d.health_check_endpoint,
                        help="path of the health check")
    parser.add_argument("--worker-startup-check-interval", type=float, default=d.worker_startup_check_interval,
                        help="seconds between checks of a worker not (or no longer) admitted")
    parser.add_argument("--load-poll-interval-secs", type=float, default=d.load_poll_interval_secs,
                        help="seconds between GET /get_load polls (load-based policies)")
    parser.add_argument("--request-timeout-secs", type=float, default=d.request_timeout_secs,
                        help="seconds one upstream request may take, streaming included")
    parser.add_argument("--retry-max-retries", type=int, default=d.retry_max_retries, help="tries per request")
    parser.add_argument("--retry-initial-backoff-ms", type=float, default=d.retry_initial_backoff_ms,
                        help="wait before the first retry")
    parser.add_argument("--retry-max-backoff-ms", type=float, default=d.retry_max_backoff_ms,
                        help="longest wait between retries")
    parser.add_argument("--retry-backoff-multiplier", type=float, default=d.retry_backoff_multiplier,
                        help="each retry waits this many times longer")
    parser.add_argument("--retry-jitter-factor", type=float, default=d.retry_jitter_factor,
                        help="random +- share of each wait")
    parser.add_argument("--disable-retries", action="store_true",
                        help="one try per request (same as --retry-max-retries 1)")
    parser.add_argument("--max-payload-size", type=int, default=d.max_payload_size, help="largest request body (bytes)")
    parser.add_argument("--api-key", default=None,
                        help="clients must send 'Authorization: Bearer KEY'; the router sends it to the workers")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=d.log_level, help="router log level")
    parser.add_argument("--router-processes", type=int, default=d.router_processes,
                        help="router processes sharing the listening port, for more than one core; each has its "
                             "own view of in-flight requests (the servers' reported load is common), /metrics "
                             "sums them all, and /add_worker and /remove_worker are refused (docs/router.md)")


def router_config_from_args(args: argparse.Namespace) -> RouterConfig:
    """The config the flags describe; ValueError names a bad flag."""
    workers = [parse_prefill(values) for values in args.prefill]
    workers += [WorkerSpec(check_url(url), "decode") for url in args.decode]
    workers += [WorkerSpec(check_url(url), "mixed") for url in args.worker_urls]
    default_policy = args.policy or "least_load"
    return RouterConfig(
        host=args.host,
        port=args.port,
        pd_disaggregation=args.pd_disaggregation,
        workers=workers,
        prefill_policy=args.prefill_policy or default_policy,
        decode_policy=args.decode_policy or default_policy,
        dp_coupled=args.dp_coupled,
        honor_client_ranks=args.honor_client_ranks,
        cache_threshold=args.cache_threshold,
        balance_abs_threshold=args.balance_abs_threshold,
        balance_rel_threshold=args.balance_rel_threshold,
        max_tree_size=args.max_tree_size,
        kv_events=not args.disable_kv_events,
        tokenize_prompts=not args.disable_prompt_tokenization,
        health_check_interval_secs=args.health_check_interval_secs,
        health_check_timeout_secs=args.health_check_timeout_secs,
        health_failure_threshold=args.health_failure_threshold,
        health_success_threshold=args.health_success_threshold,
        health_check_endpoint=args.health_check_endpoint,
        worker_startup_check_interval=args.worker_startup_check_interval,
        load_poll_interval_secs=args.load_poll_interval_secs,
        request_timeout_secs=args.request_timeout_secs,
        retry_max_retries=1 if args.disable_retries else args.retry_max_retries,
        retry_initial_backoff_ms=args.retry_initial_backoff_ms,
        retry_max_backoff_ms=args.retry_max_backoff_ms,
        retry_backoff_multiplier=args.retry_backoff_multiplier,
        retry_jitter_factor=args.retry_jitter_factor,
        max_payload_size=args.max_payload_size,
        api_key=args.api_key,
        log_level="warning" if args.log_level == "warn" else args.log_level,
        router_processes=args.router_processes,
    )
