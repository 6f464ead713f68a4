"""A server the router knows (:class:`Worker`) and one of its DP ranks (:class:`Unit`).

A unit is what policies choose between. Its load is the router's own count of the tokens it has
in flight there (prompt for prefill, prompt plus ``max_new_tokens`` for decode; exact, as every
request that begins also ends), plus the load the router cannot see: the part of the tokens the
rank reported on its last ``GET /get_load`` beyond what the router had in flight at that moment
(other clients, work the router already gave up on).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit


class Unit:
    """One DP rank of one server."""

    __slots__ = ("worker", "rank", "label", "inflight_tokens", "inflight_requests", "external_tokens", "reported",
                 "state")

    def __init__(self, worker: Worker, rank: int) -> None:
        self.worker = worker
        self.rank = rank
        self.label = f"{worker.url}#{rank}"
        self.inflight_tokens = 0
        self.inflight_requests = 0
        self.external_tokens = 0
        self.reported: dict[str, Any] = {}
        self.state = "ready"  # as the server's /health or /get_load last said ("restarting", "down", ...)

    @property
    def up(self) -> bool:
        return self.state == "ready"

    @property
    def load(self) -> int:
        return self.inflight_tokens + self.external_tokens

    def begin(self, tokens: int) -> None:
        self.inflight_tokens += tokens
        self.inflight_requests += 1

    def end(self, tokens: int) -> None:
        self.inflight_tokens -= tokens
        self.inflight_requests -= 1

    def report(self, load: dict[str, Any]) -> None:
        """Take the server's view of this rank (one entry of its ``/get_load`` list)."""
        self.reported = load
        self.external_tokens = max(0, int(load.get("num_tokens", 0)) - self.inflight_tokens)
        state = load.get("state")
        if isinstance(state, str):
            self.state = state

    def __repr__(self) -> str:
        return f"Unit({self.label}, load={self.load})"


class Worker:
    """One server: its URL, role, what ``/server_info`` said, and its health state."""

    def __init__(self, url: str, role: str, bootstrap_port: int | None = None) -> None:
        self.url = url
        self.role = role  # "prefill", "decode" or "mixed"
        self.configured_bootstrap_port = bootstrap_port
        self.host = urlsplit(url).hostname or ""
        self.info: dict[str, Any] = {}
        self.units: list[Unit] = []
        self.healthy = False
        self.ever_admitted = False
        self.failures = 0  # consecutive failed health checks
        self.successes = 0  # consecutive good health checks while not admitted
        self.next_check = 0.0
        self.last_error = ""
        self.rank_states: dict[int, str] = {}  # from the last health answer that named them

    @property
    def dp_size(self) -> int:
        return len(self.units)

    @property
    def bootstrap_port(self) -> int | None:
        """The configured port, else the one the prefill server reports."""
        if self.configured_bootstrap_port is not None:
            return self.configured_bootstrap_port
        port = self.info.get("disaggregation_bootstrap_port")
        return int(port) if isinstance(port, int) else None

    def set_info(self, info: dict[str, Any]) -> None:
        """Adopt a fresh ``/server_info``; units are kept (with their counters) while dp_size stays."""
        dp_size = int(info.get("dp_size") or 1)
        if dp_size != len(self.units):
            self.units = [Unit(self, rank) for rank in range(dp_size)]
        self.info = info

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "type": self.role,
            "healthy": self.healthy,
            "dp_size": self.dp_size,
            "bootstrap_port": self.bootstrap_port if self.role == "prefill" else None,
            "disaggregation_mode": self.info.get("disaggregation_mode"),
            "model": self.info.get("served_model_name"),
            "dp_ranks": {u.rank: u.state for u in self.units},
            "consecutive_failures": self.failures,
            "last_error": self.last_error or None,
        }

    def __repr__(self) -> str:
        return f"Worker({self.role} {self.url}, dp={self.dp_size}, healthy={self.healthy})"
