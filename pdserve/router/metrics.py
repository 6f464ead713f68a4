"""The router's Prometheus metrics, in a registry of its own (one per app).

With ``--router-processes N`` > 1, ``PROMETHEUS_MULTIPROC_DIR`` is set before any router process
imports prometheus_client (router/processes.py), every value lives in that folder's files, and
``/metrics`` answers the sum over all processes whichever one serves the scrape (gauges: the
in-flight count summed over live processes, a worker healthy only while every live process says so).
"""

from __future__ import annotations

import contextlib
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdserve.http_common import REFUSAL_HOOKS
from pdserve.router.worker import Unit, Worker

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class RouterMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pdserve_router_requests", "Client requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.selections = Counter("pdserve_router_selections", "Times a policy chose a unit (server, DP rank)",
                                  ["side", "worker", "dp_rank"], registry=r)
        self.latency = Histogram("pdserve_router_request_latency_seconds", "Arrival to the last byte sent",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_byte = Histogram("pdserve_router_first_byte_seconds",
                                    "Arrival to the first byte of a streamed reply", ["route"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.retries = Counter("pdserve_router_retries", "Requests tried again on a fresh pair", ["route"], registry=r)
        self.failures = Counter("pdserve_router_upstream_failures", "Upstream calls that failed, by reason",
                                ["side", "worker", "reason"], registry=r)
        self.healthy = Gauge("pdserve_router_worker_healthy", "1 while a worker is admitted", ["side", "worker"],
                             registry=r, multiprocess_mode="livemin")
        self.evictions = Counter("pdserve_router_worker_evictions", "Workers evicted after failed health checks",
                                 ["side", "worker"], registry=r)
        self.inflight = Gauge("pdserve_router_inflight_requests", "Client requests in progress", registry=r,
                              multiprocess_mode="livesum")
        self.refusals = Counter("pdserve_router_refusals", "Connections refused or cut at an HTTP cap", ["reason"],
                                registry=r)
        self._selection_children: dict[tuple[str, str], Counter] = {}
        self._answer_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        REFUSAL_HOOKS.append(self._refused)

    def _refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            REFUSAL_HOOKS.remove(self._refused)

    def selected(self, side: str, unit: Unit) -> None:
        key = (side, unit.label)
        child = self._selection_children.get(key)
        if child is None:
            child = self._selection_children[key] = self.selections.labels(side, unit.worker.url, str(unit.rank))
        child.inc()

    def failed(self, side: str, worker: Worker, reason: str) -> None:
        self.failures.labels(side, worker.url, reason).inc()

    def answered(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        children = self._answer_children.get(key)
        if children is None:  # labels() takes a lock and builds a tuple: once per (route, status)
            if len(self._answer_children) > 4096:
                self._answer_children.clear()
            children = self._answer_children[key] = (self.requests.labels(route, str(status)),
                                                      self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def worker_state(self, worker: Worker) -> None:
        self.healthy.labels(worker.role, worker.url).set(1 if worker.healthy else 0)

    def evicted(self, worker: Worker) -> None:
        self.evictions.labels(worker.role, worker.url).inc()

    def removed(self, worker: Worker) -> None:
        with contextlib.suppress(KeyError):
            self.healthy.remove(worker.role, worker.url)

    def render(self) -> bytes:
        if self._shared_dir is None:
            return generate_latest(self.registry)
        shared = CollectorRegistry()
        multiprocess.MultiProcessCollector(shared, path=self._shared_dir)
        return generate_latest(shared)

