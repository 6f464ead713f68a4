"""The servers behind the router: admission, health checks, eviction, load polling, run-time changes.

A worker is admitted once ``GET /health`` answers 2xx and ``GET /server_info`` names the mode its
role needs (``prefill``, ``decode``, or ``null`` for mixed); its ``dp_size`` gives its units.
An admitted worker is evicted after ``health_failure_threshold`` failed checks in a row (a refused
connection on a request counts as one) and re-admitted, with a fresh ``/server_info``, after
``health_success_threshold`` good ones.

Units are evicted one by one: a server whose ``/health`` (or ``/get_load``) names the state of each
DP rank keeps its ready ranks in rotation while others restart; a server with a rank not ready is
checked every ``worker_startup_check_interval`` so the rank rejoins soon after it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from pdserve.router.config import RouterConfig, WorkerSpec
from pdserve.router.metrics import RouterMetrics
from pdserve.router.worker import Unit, Worker

logger = logging.getLogger("pdserve.router")

EXPECTED_MODE = {"prefill": "prefill", "decode": "decode", "mixed": "null"}
TICK_S = 0.2


class ModeMismatch(Exception):
    """The server runs in another disaggregation mode than its role needs."""


class Fleet:
    """All workers by URL, and the healthy units of each role for the policies."""

    def __init__(self, config: RouterConfig, metrics: RouterMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.workers: dict[str, Worker] = {}
        self.on_units_dropped: list[Callable[[Unit], None]] = []
        self.session: aiohttp.ClientSession | None = None
        self._units: dict[str, list[Unit]] = {"prefill": [], "decode": [], "mixed": []}
        self._tasks: list[asyncio.Task] = []
        self._auth = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=config.health_check_timeout_secs)
        self.poll_load = False
        for spec in config.workers:
            self.add(spec)

    # ------------------------------------------------------------------ views
    def units(self, role: str) -> list[Unit]:
        """Healthy units of ``role``, in a stable order (registration, then rank)."""
        return self._units[role]

    def describe(self) -> list[dict[str, Any]]:
        return [w.describe() for w in self.workers.values()]

    def ready(self) -> str | None:
        """None when every needed side has a healthy unit, else what is missing."""
        roles = ("prefill", "decode") if self.config.pd_disaggregation else ("mixed",)
        missing = [r for r in roles if not self._units[r]]
        if not missing:
            return None
        return "no healthy " + " or ".join("worker" if r == "mixed" else f"{r} worker" for r in missing)

    # ------------------------------------------------------------------ membership
    def add(self, spec: WorkerSpec) -> Worker:
        if spec.url in self.workers:
            raise ValueError(f"worker {spec.url} is already registered")
        worker = Worker(spec.url, spec.role, spec.bootstrap_port)
        self.workers[spec.url] = worker
        self.metrics.worker_state(worker)
        return worker

    def remove(self, url: str) -> Worker | None:
        worker = self.workers.pop(url, None)
        if worker is not None:
            was_healthy = worker.healthy
            worker.healthy = False
            self.metrics.removed(worker)
            self._drop_units(worker.units)
            if was_healthy:
                self._rebuild()
            logger.info("removed %s worker %s", worker.role, url)
        return worker

    def _rebuild(self) -> None:
        units: dict[str, list[Unit]] = {"prefill": [], "decode": [], "mixed": []}
        for w in self.workers.values():
            if w.healthy:
                units[w.role].extend(u for u in w.units if u.up)
        self._units = units

    def _drop_units(self, units: list[Unit]) -> None:
        for unit in units:
            for callback in self.on_units_dropped:
                callback(unit)

    # ------------------------------------------------------------------ health
    async def admit(self, worker: Worker) -> None:
        """Fetch ``/server_info`` and admit ``worker``; ModeMismatch or an HTTP error otherwise."""
        info = await self._get_json(worker, "/server_info")
        if not isinstance(info, dict):
            raise ValueError("/server_info did not answer a JSON object")
        mode = str(info.get("disaggregation_mode") or "null")
        if mode != EXPECTED_MODE[worker.role]:
            raise ModeMismatch(
                f"{worker.url} runs with disaggregation_mode={mode!r} but was added as a {worker.role} worker"
            )
        old_units = worker.units
        worker.set_info(info)
        if worker.units is not old_units:
            self._drop_units(old_units)
        worker.healthy = True
        worker.ever_admitted = True
        worker.failures = worker.successes = 0
        worker.last_error = ""
        self._rebuild()
        self.metrics.worker_state(worker)
        logger.info("admitted %s worker %s (dp_size %d)", worker.role, worker.url, worker.dp_size)

    async def check(self, worker: Worker) -> None:
        """One health check of ``worker``, with admission or eviction as its counters say."""
        error = await self.probe(worker)
        if worker.url not in self.workers:
            return
        if worker.healthy:
            if error is None:
                worker.failures = 0
                self._apply_rank_states(worker)
            else:
                self.note_failure(worker, error)
            return
        if error is not None:
            worker.successes = 0
            worker.last_error = error
            return
        worker.successes += 1
        if worker.successes >= (self.config.health_success_threshold if worker.ever_admitted else 1):
            try:
                await self.admit(worker)
            except ModeMismatch as e:
                if worker.last_error != str(e):
                    logger.error("%s", e)
                worker.last_error = str(e)
                worker.successes = 0
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                worker.last_error = f"/server_info: {e!r}"
                worker.successes = 0

    def note_failure(self, worker: Worker, error: str) -> None:
        """A failed check (or refused connection) of an admitted worker; evict at the threshold."""
        worker.last_error = error
        if not worker.healthy:
            return
        worker.failures += 1
        if worker.failures >= self.config.health_failure_threshold:
            worker.healthy = False
            worker.successes = 0
            worker.next_check = time.monotonic() + self.config.worker_startup_check_interval
            self._rebuild()
            self.metrics.worker_state(worker)
            self.metrics.evicted(worker)
            logger.warning("evicted %s worker %s after %d failures: %s", worker.role, worker.url,
                           worker.failures, error)

    async def probe(self, worker: Worker) -> str | None:
        """None if the health endpoint answers 2xx, else what went wrong. A pdserve server's answer
        names each DP rank's state (``dp_ranks``): kept for :meth:`_apply_rank_states`."""
        assert self.session is not None
        try:
            async with self.session.get(worker.url + self.config.health_check_endpoint, headers=self._auth,
                                        timeout=self._timeout) as resp:
                body = await resp.read()
                if not 200 <= resp.status < 300:
                    return f"health check answered {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return f"health check failed: {e!r}"
        worker.rank_states = _rank_states(body)
        return None

    def _apply_rank_states(self, worker: Worker) -> None:
        """Take each unit in or out of rotation as the worker's last health answer said."""
        changed = False
        for rank, state in worker.rank_states.items():
            if 0 <= rank < len(worker.units) and worker.units[rank].state != state:
                unit = worker.units[rank]
                logger.warning("%s unit %s is now %s", worker.role, unit.label, state)
                unit.state = state
                changed = True
        if changed:
            self._rebuild()
        if any(not u.up for u in worker.units):
            worker.next_check = min(worker.next_check, time.monotonic() + self.config.worker_startup_check_interval)

    def recheck(self, worker: Worker) -> None:
        """A request saw a rank of ``worker`` fail: check its health (and rank states) now."""
        worker.next_check = 0.0

    async def _get_json(self, worker: Worker, path: str) -> Any:
        assert self.session is not None
        async with self.session.get(worker.url + path, headers=self._auth, timeout=self._timeout) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    # ------------------------------------------------------------------ loops
    def start(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self._tasks.append(asyncio.create_task(self._health_loop(), name="router-health"))
        if self.poll_load:
            self._tasks.append(asyncio.create_task(self._load_loop(), name="router-load"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _health_loop(self) -> None:
        cfg = self.config
        while True:
            now = time.monotonic()
            due = [w for w in self.workers.values() if w.next_check <= now]
            for w in due:
                interval = cfg.health_check_interval_secs if w.healthy else cfg.worker_startup_check_interval
                w.next_check = now + interval
            if due:
                await asyncio.gather(*(self._check_safely(w) for w in due))
            await asyncio.sleep(TICK_S)

    async def _check_safely(self, worker: Worker) -> None:
        try:
            await self.check(worker)
        except Exception:
            logger.exception("health check of %s failed unexpectedly", worker.url)

    async def _load_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.load_poll_interval_secs)
            healthy = [w for w in self.workers.values() if w.healthy]
            await asyncio.gather(*(self._poll_load(w) for w in healthy))

    async def _poll_load(self, worker: Worker) -> None:
        try:
            loads = await self._get_json(worker, "/get_load")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            logger.debug("GET /get_load of %s failed: %r", worker.url, e)
            return
        if not isinstance(loads, list):
            return
        was_up = [u.up for u in worker.units]
        for entry in loads:
            if isinstance(entry, dict):
                rank = entry.get("dp_rank", 0)
                if isinstance(rank, int) and 0 <= rank < len(worker.units):
                    worker.units[rank].report(entry)
        if was_up != [u.up for u in worker.units]:
            self._rebuild()


def _rank_states(body: bytes) -> dict[int, str]:
    """``{dp_rank: state}`` from a pdserve ``/health`` body (empty for other servers' answers)."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return {}
    ranks = data.get("dp_ranks") if isinstance(data, dict) else None
    if not isinstance(ranks, list):
        return {}
    return {r["dp_rank"]: r["state"] for r in ranks
            if isinstance(r, dict) and isinstance(r.get("dp_rank"), int) and isinstance(r.get("state"), str)}
