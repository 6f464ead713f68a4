"""Options of ``pdserve serve``: the server's own flags next to the engine's (names as SGLang's)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

from pdserve.disagg.config import DisaggConfig, add_disagg_arguments, disagg_config_from_args
from pdserve.engine.config import EngineConfig, add_engine_arguments, engine_config_from_args
from pdserve.server.kv_events_config import KVEventsConfig, parse_kv_events_config
from pdserve.server.tool_parsers import PARSERS
from pdserve.vllm_kv_events import HASH_ALGOS

LOAD_BALANCE_METHODS = ("round_robin", "shortest_queue", "minimum_tokens", "follow_bootstrap_room")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass
class ServerConfig:
    """One HTTP server: a front process plus ``dp_size`` worker processes sharing one engine config."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 30000
    dp_size: int = 1
    load_balance_method: str = "round_robin"
    served_model_name: str | None = None  # None: --model-path as given, else the embedded model's name
    api_key: str | None = None
    max_request_bytes: int = 32 << 20
    log_level: str = "info"
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    graceful_shutdown_s: float = 5.0
    worker_max_restarts: int = 5  # a rank whose worker died more often in a row stays down
    worker_restart_backoff_s: float = 0.5  # first restart delay, doubled per death in a row
    worker_restart_backoff_max_s: float = 30.0
    max_n: int = 16  # most parallel samples (n) one request may ask for
    tool_call_parser: str | None = None  # server/tool_parsers: the model family's tool-call format
    trust_request_chat_template: bool = False  # render chat templates a request supplies (deadline and cap apply)
    kv_events: KVEventsConfig | None = None  # --kv-events-config: vLLM-format KV events over ZMQ
    prefix_caching_hash_algo: str = "sha256"  # vLLM's block hash of those events (vLLM's default)

    @property
    def disaggregation_mode(self) -> str:
        return self.disagg.mode

    def validate(self) -> None:
        self.engine.validate()
        self.disagg.validate()
        if self.dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {self.dp_size}")
        if self.load_balance_method not in LOAD_BALANCE_METHODS:
            raise ValueError(
                f"load_balance_method must be one of {', '.join(LOAD_BALANCE_METHODS)}, "
                f"got {self.load_balance_method!r}"
            )
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if self.worker_max_restarts < 0:
            raise ValueError(f"worker_max_restarts must be >= 0, got {self.worker_max_restarts}")
        if not 0 <= self.worker_restart_backoff_s <= self.worker_restart_backoff_max_s:
            raise ValueError("worker restart backoff must satisfy 0 <= initial <= max, got "
                             f"{self.worker_restart_backoff_s} and {self.worker_restart_backoff_max_s}")
        if self.prefix_caching_hash_algo not in HASH_ALGOS:
            raise ValueError(f"prefix_caching_hash_algo must be one of {', '.join(HASH_ALGOS)}, "
                             f"got {self.prefix_caching_hash_algo!r}")
        if self.kv_events is not None:
            self.kv_events.validate()
            if self.kv_events.enabled and self.engine.disable_radix_cache:
                raise ValueError("--kv-events-config publishes prefix-cache events: it needs the prefix cache "
                                 "(drop --disable-radix-cache)")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        from pdserve.disagg.auth import is_loopback

        insecure = self.disagg.mode != "null" and not self.disagg.secret and not self.disagg.allow_insecure
        if insecure and not is_loopback(self.host):
            raise ValueError(
                f"a {self.disagg.mode} server on {self.host} (not loopback) needs a secret shared with its P/D "
                "peers: set --disaggregation-secret, $PDSERVE_DISAGG_SECRET or --api-key (or pass "
                "--disaggregation-allow-insecure on a network you trust)"
            )
        if self.disagg.mode != "null" and bool(self.engine.simulate) != (self.disagg.transfer_backend == "sim"):
            raise ValueError("the sim transfer backend goes with --simulate and only with it (sim servers move no "
                             f"KV bytes); got --disaggregation-transfer-backend {self.disagg.transfer_backend}")
        self.disagg.check_device(self.engine.device)
        self.disagg.check_library()
        if self.engine.simulate:
            from pdserve.sim.validate import check_config

            check_config(self.engine)  # a bad --simulate/--model-path fails here, before any worker starts


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    parser.add_argument("--host", default=defaults.host, help="address to bind")
    parser.add_argument("--port", type=int, default=defaults.port, help="port to listen on")
    parser.add_argument("--dp-size", type=int, default=defaults.dp_size, help="data-parallel ranks (processes)")
    parser.add_argument(
        "--load-balance-method", default=None, choices=LOAD_BALANCE_METHODS,
        help="how a request without a pinned rank picks its DP rank "
        "(default: follow_bootstrap_room in prefill mode, else round_robin)",
    )
    parser.add_argument("--served-model-name", default=None, help="model name reported and accepted on /v1/*")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (not on /health, /metrics)")
    parser.add_argument(
        "--max-request-bytes", type=int, default=defaults.max_request_bytes,
        help="largest request body accepted (413 beyond)",
    )
    parser.add_argument(
        "--worker-max-restarts", type=int, default=defaults.worker_max_restarts,
        help="restart a DP rank whose worker died at most this many times in a row (0: never); "
        "a rank that served 60 s starts a fresh count",
    )
    parser.add_argument(
        "--worker-restart-backoff", type=float, default=defaults.worker_restart_backoff_s,
        help="seconds before the first restart of a dead worker, doubled for each death in a row",
    )
    parser.add_argument(
        "--worker-restart-backoff-max", type=float, default=defaults.worker_restart_backoff_max_s,
        help="longest delay between restarts of a rank (seconds)",
    )
    parser.add_argument("--log-level", default=defaults.log_level, choices=LOG_LEVELS, help="default: %(default)s")
    parser.add_argument("--max-n", type=int, default=defaults.max_n,
                        help="largest n (parallel samples per prompt) a request may ask for (default: %(default)s)")
    parser.add_argument(
        "--tool-call-parser", default=None, choices=sorted(PARSERS),
        help="how tool calls are written by the model, for tool_choice 'auto' (default: none; 'required' "
        "and named functions work without one)",
    )
    parser.add_argument(
        "--trust-request-chat-template", action="store_true",
        help="render a chat template a request supplies (chat_template_kwargs.chat_template) instead of refusing it "
        "with 400; it runs on its own thread within a deadline and an output cap (default: off, as vLLM's flag)",
    )
    parser.add_argument(
        "--kv-events-config", default=None, metavar="JSON",
        help="publish prefix-cache events over ZMQ in vLLM's wire format, as vLLM's flag: e.g. "
        "'{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\", \"endpoint\": \"tcp://*:5557\", "
        "\"replay_endpoint\": \"tcp://*:5558\", \"topic\": \"kv@IP@MODEL\"}' (vLLM's keys: buffer_steps, hwm, "
        "max_queue_size too; pdserve's: encoding 'map'|'array', bind true|false); the port of each DP rank "
        "is the given one plus the rank; see docs/kv_events.md",
    )
    parser.add_argument(
        "--prefix-caching-hash-algo", default=defaults.prefix_caching_hash_algo, choices=HASH_ALGOS,
        help="block hash of the ZMQ KV events, as vLLM's flag (seed: $PYTHONHASHSEED, else vLLM's fixed "
        "default) (default: %(default)s)",
    )


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    from pdserve.plane_secret import resolve_secret

    disagg = disagg_config_from_args(args)
    disagg.secret = resolve_secret(disagg.secret, args.api_key)
    if getattr(args, "simulate", None) and disagg.transfer_backend == DisaggConfig.transfer_backend:
        disagg = replace(disagg, transfer_backend="sim")
    method = args.load_balance_method
    if method is None:
        method = "follow_bootstrap_room" if disagg.mode == "prefill" else ServerConfig.load_balance_method
    return ServerConfig(
        engine=engine_config_from_args(args),
        host=args.host,
        port=args.port,
        dp_size=args.dp_size,
        load_balance_method=method,
        disagg=disagg,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_request_bytes=args.max_request_bytes,
        log_level=args.log_level,
        worker_max_restarts=args.worker_max_restarts,
        worker_restart_backoff_s=args.worker_restart_backoff,
        worker_restart_backoff_max_s=args.worker_restart_backoff_max,
        tool_call_parser=args.tool_call_parser,
        max_n=args.max_n,
        trust_request_chat_template=args.trust_request_chat_template,
        kv_events=parse_kv_events_config(args.kv_events_config),
        prefix_caching_hash_algo=args.prefix_caching_hash_algo,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """All flags of ``pdserve serve``: the engine's, the server's and P/D's."""
    add_engine_arguments(parser)
    add_server_arguments(parser)
    add_disagg_arguments(parser)
