"""``--kv-events-config``: vLLM's ``KVEventsConfig`` JSON (its keys and defaults) plus pdserve's own
``encoding`` and ``bind`` (light: no ZMQ; :mod:`pdserve.server.kv_event_publisher` publishes)."""

from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import dataclass, fields

from pdserve.vllm_kv_events import ENCODINGS


@dataclass
class KVEventsConfig:
    """vLLM's ``KVEventsConfig`` fields (same names and defaults), plus pdserve's ``encoding`` and
    ``bind``. ``topic`` None means vLLM-fleet style ``kv@<host>@<model>``."""

    enable_kv_cache_events: bool = False
    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str | None = None
    encoding: str = "map"  # pdserve: "map" (vLLM since vllm#42892) or "array" (before)
    bind: bool | None = None  # pdserve: None as vLLM (bind if '*', '::', ipc:// or inproc://, else connect)

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"

    def validate(self) -> None:
        if self.publisher not in ("null", "zmq"):
            raise ValueError(f"kv-events-config publisher must be 'zmq' or 'null', got {self.publisher!r}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"kv-events-config encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        for name in ("buffer_steps", "hwm", "max_queue_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000_000:
                raise ValueError(f"kv-events-config {name} must be an integer in [1, 10000000], got {value!r}")
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(self, name)
            if value is None and name == "replay_endpoint":
                continue
            if not isinstance(value, str) or not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"kv-events-config {name} must be a tcp://, ipc:// or inproc:// address, got {value!r}")
            if value.startswith("tcp://"):
                port = value.rsplit(":", 1)[-1]
                if not port.isdigit() or not 0 < int(port) < 65536:
                    raise ValueError(f"kv-events-config {name} needs a port in [1, 65535], got {value!r}")
        if self.topic is not None and not isinstance(self.topic, str):
            raise ValueError(f"kv-events-config topic must be a string, got {self.topic!r}")
        if self.bind is not None and not isinstance(self.bind, bool):
            raise ValueError(f"kv-events-config bind must be true, false or null, got {self.bind!r}")


def parse_kv_events_config(text: str | None) -> KVEventsConfig | None:
    """``--kv-events-config`` JSON (vLLM's spelling); unknown keys are refused by name."""
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--kv-events-config is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("--kv-events-config must be a JSON object")
    known = {f.name for f in fields(KVEventsConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--kv-events-config: unsupported field(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    if "enable_kv_cache_events" in data and not isinstance(data["enable_kv_cache_events"], bool):
        raise ValueError("--kv-events-config enable_kv_cache_events must be true or false")
    config = KVEventsConfig(**data)
    if "publisher" not in data and config.enable_kv_cache_events:
        config.publisher = "zmq"  # vLLM: enabling events without a publisher means the ZMQ one
    config.validate()
    return config


def offset_endpoint(endpoint: str, dp_rank: int) -> str:
    """vLLM's per-rank address: the tcp port plus the rank; ipc/inproc names get ``_dp<rank>``."""
    if dp_rank == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        base, port = endpoint.rsplit(":", 1)
        return f"{base}:{int(port) + dp_rank}"
    return f"{endpoint}_dp{dp_rank}"


def should_bind(endpoint: str, bind: bool | None) -> bool:
    if bind is not None:
        return bind
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def default_topic(host: str, model: str) -> str:
    """``kv@<ip>@<model>`` as llm-d and vllm-router fleets configure vLLM."""
    ip = host
    if host in ("", "0.0.0.0", "::"):
        with contextlib.suppress(OSError):
            ip = socket.gethostbyname(socket.gethostname())
    return f"kv@{ip}@{model}"


def bound_tcp_ports(config: KVEventsConfig, dp_size: int) -> list[tuple[str, int]]:
    """(host, port) of every tcp socket the publisher will bind, ``*`` as all interfaces."""
    out = []
    for endpoint, bind in ((config.endpoint, config.bind), (config.replay_endpoint, True)):
        if endpoint is None:
            continue
        for rank in range(dp_size):
            address = offset_endpoint(endpoint, rank)
            if address.startswith("tcp://") and should_bind(address, bind):
                host, port = address[len("tcp://"):].rsplit(":", 1)
                host = host.strip("[]")
                out.append(("0.0.0.0" if host in ("*", "") else "::" if host == "::" else host, int(port)))
    return out
