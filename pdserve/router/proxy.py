"""The hot path: send one client request to its unit(s) and relay the answer.

P/D: the prefill and decode halves go out at once with the same ``rid`` and bootstrap room. The
first failing half ends the attempt at once: the other half's HTTP request is cancelled and, when
the failure was the server's, the other server told ``POST /abort_request`` (a refused request,
e.g. a duplicate ``rid``, sends no abort by rid: that rid may belong to another request). Connect
errors, 408/429 and 5xx are retried with a fresh pair and a fresh room, until a byte has reached
the client, unless the server marked the failure as the request's own (``X-Pdserve-Retryable:
false``); a server that did not answer is left out of the retries, an answering server only loses
the failed unit. A client ``rid`` already in flight through this router is refused with 400.
A streamed reply is decode's stream relayed chunk by chunk once its first chunk is in; the client
going away cancels both halves. Mixed mode is the same with one unit and no pairing. Every answer
that a server produced carries the rank headers (``X-Prefill-DP-Rank`` / ``X-Decode-DP-Rank``): the
server's, or else the ranks this router picked.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pdserve.http_common import DECODE_RANK_HEADER, PREFILL_RANK_HEADER
from pdserve.router.config import RouterConfig
from pdserve.router.errors import RouterError, error_body, error_response
from pdserve.router.fleet import Fleet
from pdserve.router.http_client import UpstreamError
from pdserve.router.metrics import RouterMetrics
from pdserve.router.pairing import NO_PINS, BadClientRank, ClientPins, Pairing, client_rank
from pdserve.router.request_info import RequestInfo
from pdserve.router.upstream import ABORT_TIMEOUT_S, Reply, Stream, Upstream, rank_headers
from pdserve.router.worker import Unit, Worker

logger = logging.getLogger("pdserve.router")

SSE_DONE = b"data: [DONE]\n\n"
SETTLE_S = 10.0  # how long a finished stream waits for its prefill half's answer
_rng = random.Random()

# what one failed attempt returns: the side, its unit and the reply
Failure = tuple[str, Unit, Reply]
# what the client is answered with (an ASGI app)
Answer = Response | ASGIApp


class BytesResponse:
    """A whole answer relayed as it came (status, body, content type, headers): two ASGI messages,
    none of a framework response's header building per request."""

    __slots__ = ("status_code", "body", "headers")

    def __init__(self, body: bytes, status_code: int, media_type: str, headers: dict[str, str]) -> None:
        self.status_code = status_code
        self.body = body
        self.headers = [(b"content-type", media_type.encode("latin-1")),
                        (b"content-length", str(len(body)).encode())]
        self.headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


class RelayResponse(StreamingResponse):
    """A streamed reply that runs ``on_close`` however it ends (done, client gone, never sent)."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None], media_type: str,
                 headers: dict[str, str]) -> None:
        super().__init__(chunks, media_type=media_type, headers={"Cache-Control": "no-cache", **headers})
        self.on_close = [on_close]

    def also_on_close(self, callback: Callable[[], None]) -> None:
        self.on_close.append(callback)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for callback in self.on_close:
                callback()


def _rids(rid: Any) -> list[str]:
    return [r for r in rid if isinstance(r, str)] if isinstance(rid, list) else [rid]


def served_headers(server: dict[str, str], prefill_rank: int | None, decode_rank: int) -> dict[str, str]:
    """The rank headers of an answer: the server's, completed with the ranks this router picked."""
    headers = {DECODE_RANK_HEADER: str(decode_rank)}
    if prefill_rank is not None:
        headers[PREFILL_RANK_HEADER] = str(prefill_rank)
    return {**headers, **server}


# where the client names DP ranks: body fields, and the header (app.py puts its value under RANK_HEADER_FIELD)
RANK_HEADER_FIELD = "X-Data-Parallel-Rank"
CLIENT_RANK_FIELDS = (RANK_HEADER_FIELD, "data_parallel_rank", "routed_dp_rank", "disagg_prefill_dp_rank",
                      "prefill_data_parallel_rank")
# body fields the router sets itself: by _pd_bodies in P/D, by _mixed otherwise (a client's ranks are pins)
PD_SET_FIELDS = frozenset({"bootstrap_host", "bootstrap_port", "bootstrap_room", "data_parallel_rank",
                           "prefill_data_parallel_rank", "disagg_prefill_dp_rank"})
MIXED_SET_FIELDS = frozenset({"data_parallel_rank"})


class Proxy:
    def __init__(self, config: RouterConfig, fleet: Fleet, pairing: Pairing, upstream: Upstream,
                 metrics: RouterMetrics) -> None:
        self.config = config
        self.fleet = fleet
        self.pairing = pairing
        self.upstream = upstream
        self.metrics = metrics
        self.background: set[asyncio.Task] = set()
        self.client_rids: set[str] = set()  # client-given rids in flight through this router

    async def handle(self, route: str, body: dict[str, Any], info: RequestInfo, headers: dict[str, str],
                     started: float) -> Answer:
        rids = [r for r in _rids(body.get("rid")) if isinstance(r, str)] if body.get("rid") is not None else []
        taken = [r for r in rids if r in self.client_rids]
        if taken or len(set(rids)) != len(rids):
            self.metrics.answered(route, 400, time.perf_counter() - started)
            which = taken[0] if taken else next(r for r in rids if rids.count(r) > 1)
            return error_response(route, 400, f"rid {which!r} is already in use by a request in flight", "rid")
        self.client_rids.update(rids)
        response: Answer | None = None
        try:
            if self.config.pd_disaggregation:
                response = await self._pd(route, body, info, headers, started)
            else:
                response = await self._mixed(route, body, info, headers, started)
            return response
        finally:
            if isinstance(response, RelayResponse):
                response.also_on_close(lambda: self.client_rids.difference_update(rids))
            else:
                self.client_rids.difference_update(rids)

    async def close(self) -> None:
        """Cancel the background aborts still running."""
        tasks = list(self.background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ P/D
    async def _pd(self, route: str, body: dict[str, Any], info: RequestInfo, headers: dict[str, str],
                  started: float) -> Answer:
        stream = body.get("stream") is True
        client_rid = body.get("rid")
        exclude: set[Worker] = set()
        failure: Failure | None = None
        aborts: list[asyncio.Task] = []
        pins = self._client_pins(body)
        for attempt in range(self.config.retry_max_retries):
            if attempt:
                self.metrics.retries.labels(route).inc()
                if client_rid is not None and aborts:  # the old halves must be gone before the rid is reused
                    await asyncio.wait(aborts, timeout=ABORT_TIMEOUT_S)
                    aborts.clear()
                await asyncio.sleep(self._backoff(attempt))
            try:
                prefill, decode = self.pairing.pick_pair(info, exclude, pins)
            except BadClientRank as e:
                raise RouterError(400, str(e), "invalid_rank") from None
            self.metrics.selected("prefill", prefill)
            self.metrics.selected("decode", decode)
            rid = client_rid if client_rid is not None else f"{_rng.getrandbits(128):032x}"
            p_body, d_body = self._pd_bodies(body, prefill, decode, rid, info)
            result = await self._pair(route, prefill, decode, p_body, d_body, rid, headers, stream, info,
                                      started, aborts)
            if not isinstance(result, tuple):
                return result
            failure = result
            if not failure[2].retryable:
                break
            exclude.add(_culprit(failure))
        assert failure is not None
        return self._failed(route, failure, started)

    def _client_pins(self, body: dict[str, Any]) -> ClientPins:
        """The ranks the client pinned. Without ``--honor-client-ranks`` a request
        that names a rank is refused (400 naming the field and the flag): the router would otherwise
        replace it, silently serving on ranks the client did not ask for."""
        if not self.config.honor_client_ranks:
            named = next((f for f in CLIENT_RANK_FIELDS if body.get(f) is not None), None)
            if named is not None:
                what = "the X-Data-Parallel-Rank header" if named == RANK_HEADER_FIELD else named
                raise RouterError(400, f"{what} names a DP rank, but this router picks the ranks itself: start it "
                                       "with --honor-client-ranks to serve requests on the ranks they name",
                                  "invalid_rank")
            return NO_PINS
        try:
            prefill_field, prefill = client_rank(body, "disagg_prefill_dp_rank", "prefill_data_parallel_rank")
            decode_field, decode = client_rank(body, RANK_HEADER_FIELD, "data_parallel_rank", "routed_dp_rank")
        except BadClientRank as e:
            raise RouterError(400, str(e), "invalid_rank") from None
        return ClientPins(prefill, decode, prefill_field, decode_field)

    def _pd_bodies(self, body: dict[str, Any], prefill: Unit, decode: Unit, rid: Any,
                   info: RequestInfo) -> tuple[bytes, bytes]:
        n = info.batch_size
        room: int | list[int] = _rng.getrandbits(63) if n is None else [_rng.getrandbits(63) for _ in range(n)]
        common = dict(body)
        common.pop(RANK_HEADER_FIELD, None)
        common["bootstrap_host"] = prefill.worker.host
        common["bootstrap_port"] = prefill.worker.bootstrap_port
        common["bootstrap_room"] = room
        common["rid"] = rid
        p = dict(common)
        p["data_parallel_rank"] = prefill.rank
        p["stream"] = False  # prefill's outcome is its status code; decode carries the stream
        p.pop("stream_options", None)
        d = common
        d["data_parallel_rank"] = decode.rank
        d["prefill_data_parallel_rank"] = prefill.rank
        d["disagg_prefill_dp_rank"] = prefill.rank
        return msgspec.json.encode(p), msgspec.json.encode(d)

    async def _pair(self, route: str, prefill: Unit, decode: Unit, p_body: bytes,
                    d_body: bytes, rid: Any, headers: dict[str, str], stream: bool, info: RequestInfo,
                    started: float, aborts: list[asyncio.Task]) -> Answer | Failure:
        """One attempt with one pair: the reply, or the failure that ended it (aborts sent go to ``aborts``)."""
        p_tokens, d_tokens = info.prompt_tokens, info.decode_tokens
        prefill.begin(p_tokens)
        decode.begin(d_tokens)
        decode_held = True

        def release_decode() -> None:
            nonlocal decode_held
            if decode_held:
                decode_held = False
                decode.end(d_tokens)

        p_task = asyncio.create_task(self.upstream.post(prefill.worker.url + route, p_body, headers))
        p_task.add_done_callback(lambda _: prefill.end(p_tokens))
        d_url = decode.worker.url + route
        d_call = self.upstream.open_stream(d_url, d_body, headers) if stream else self.upstream.post(
            d_url, d_body, headers)
        d_task: asyncio.Task[Stream | Reply] = asyncio.create_task(d_call)
        handed_off = False
        try:
            while True:
                await asyncio.wait([t for t in (p_task, d_task) if not t.done()],
                                   return_when=asyncio.FIRST_COMPLETED)
                d = d_task.result() if d_task.done() else None
                p = p_task.result() if p_task.done() else None
                if isinstance(d, Reply) and not d.ok:
                    aborts += self._drop(p_task, prefill.worker, rid, headers, by_rid=d.retryable)
                    release_decode()
                    return self._note_failure("decode", decode, d)
                if isinstance(d, Stream):
                    handed_off = True
                    return self._relay(route, d, started, prefill.worker, decode.worker, rid, headers,
                                       p_task, release_decode, served_headers({}, prefill.rank, decode.rank))
                if d is not None and p is not None:
                    release_decode()
                    return self._reply(route, d, started, served_headers(d.ranks, prefill.rank, decode.rank))
                if p is not None and not p.ok:
                    aborts += self._drop(d_task, decode.worker, rid, headers, by_rid=p.retryable)
                    release_decode()
                    return self._note_failure("prefill", prefill, p)
        finally:
            if not handed_off and decode_held:  # cancelled: the client went away or the router stops
                self._drop(p_task, prefill.worker, rid, headers)
                self._drop(d_task, decode.worker, rid, headers)
                release_decode()

    def _reply(self, route: str, d: Reply, started: float, ranks: dict[str, str]) -> Answer:
        """Decode's whole answer as it came: it is complete (prefill's input logprobs reach decode in
        the KV transfer's ``Aux``), so prefill's body is never read."""
        self.metrics.answered(route, d.status, time.perf_counter() - started)
        return BytesResponse(d.body, d.status, d.content_type, ranks)

    def _drop(self, task: asyncio.Task, worker: Worker, rid: Any, headers: dict[str, str],
              by_rid: bool = True) -> list[asyncio.Task]:
        """Stop one half: cancel its HTTP request (or close its stream; the server aborts what that
        connection carried) and, ``by_rid``, also tell its server to abort the rid. Not after a
        refusal: a duplicate rid is refused, and an abort by rid would hit the request owning it."""
        if not task.done():
            task.cancel()
        elif not task.cancelled() and isinstance(task.result(), Stream):
            task.result().close()
        elif not task.cancelled() and task.result().ok:
            return []
        if not by_rid:
            return []
        return [self._spawn(self.upstream.abort(worker.url, r, headers)) for r in _rids(rid)]

    # ------------------------------------------------------------------ mixed
    async def _mixed(self, route: str, body: dict[str, Any], info: RequestInfo, headers: dict[str, str],
                     started: float) -> Answer:
        stream = body.get("stream") is True
        tokens = info.decode_tokens
        pins = self._client_pins(body)
        exclude: set[Worker] = set()
        failure: Failure | None = None
        for attempt in range(self.config.retry_max_retries):
            if attempt:
                self.metrics.retries.labels(route).inc()
                await asyncio.sleep(self._backoff(attempt))
            try:
                unit = self.pairing.pick_one(info, exclude, pins)
            except BadClientRank as e:
                raise RouterError(400, str(e), "invalid_rank") from None
            self.metrics.selected("mixed", unit)
            routed = dict(body)
            routed.pop(RANK_HEADER_FIELD, None)
            routed["data_parallel_rank"] = unit.rank
            url = unit.worker.url + route
            data = msgspec.json.encode(routed)
            unit.begin(tokens)
            if stream:
                try:
                    reply = await self.upstream.open_stream(url, data, headers)
                except BaseException:
                    unit.end(tokens)
                    raise
                if isinstance(reply, Stream):
                    return self._relay(route, reply, started, None, unit.worker, None, headers, None,
                                       functools.partial(unit.end, tokens), served_headers({}, None, unit.rank))
                unit.end(tokens)
            else:
                try:
                    reply = await self.upstream.post(url, data, headers)
                finally:
                    unit.end(tokens)
                if reply.ok:
                    self.metrics.answered(route, reply.status, time.perf_counter() - started)
                    return BytesResponse(reply.body, reply.status, reply.content_type,
                                         served_headers(reply.ranks, None, unit.rank))
            failure = self._note_failure("mixed", unit, reply)
            if not reply.retryable:
                break
            exclude.add(_culprit(failure))
        assert failure is not None
        return self._failed(route, failure, started)

    # ------------------------------------------------------------------ shared
    def _relay(self, route: str, start: Stream, started: float, prefill: Worker | None, decode: Worker,
               rid: Any, headers: dict[str, str], p_task: asyncio.Task | None,
               release: Callable[[], None], ranks: dict[str, str]) -> RelayResponse:
        """Decode's (or the mixed server's) stream, chunk by chunk, as the client's reply, with the rank
        headers (``ranks``, the router's pick, overridden by the server's own)."""
        finished = False
        side = "decode" if prefill is not None else "mixed"

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal finished
            yield start.first
            self.metrics.first_byte.labels(route).observe(time.perf_counter() - started)
            try:
                async for chunk in start.rest():
                    yield chunk
            except UpstreamError as e:
                self.metrics.failed(side, decode, "stream_broken")
                message = f"{side} server {decode.url} broke the stream: {type(e).__name__}: {e}"
                yield b"data: " + msgspec.json.encode(error_body(route, 502, message)) + b"\n\n" + SSE_DONE
            finished = True

        def on_close() -> None:
            start.close()
            release()
            if p_task is not None and prefill is not None:
                if finished:
                    self._spawn(self._settle(p_task, prefill))
                else:
                    if not p_task.done():
                        p_task.cancel()
                    for r in _rids(rid):
                        self._spawn(self.upstream.abort(prefill.url, r, headers))
                        self._spawn(self.upstream.abort(decode.url, r, headers))
            self.metrics.answered(route, 200 if finished else 499, time.perf_counter() - started)

        return RelayResponse(chunks(), on_close, start.headers.get("content-type", "text/event-stream"),
                             {**ranks, **rank_headers(start.headers)})

    async def _settle(self, p_task: asyncio.Task, prefill: Worker) -> None:
        """Let a prefill half whose decode already finished answer (bounded); only count its failure."""
        try:
            await asyncio.wait([p_task], timeout=SETTLE_S)
        finally:
            if not p_task.done():
                p_task.cancel()
        if not p_task.cancelled() and not p_task.result().ok:
            self.metrics.failed("prefill", prefill, p_task.result().reason or "status")

    def _note_failure(self, side: str, unit: Unit, reply: Reply) -> Failure:
        """Count and log a server-side failure (a 4xx is the client's and is only relayed)."""
        if not reply.retryable:
            return side, unit, reply
        worker = unit.worker
        self.metrics.failed(side, worker, reply.reason or "status")
        if reply.reason == "connect":
            self.fleet.note_failure(worker, f"connection failed: {reply.body.decode(errors='replace')}")
        elif reply.status == 503:  # perhaps a rank down: the health answer says which
            self.fleet.recheck(worker)
        logger.info("%s server %s failed: %s %s", side, worker.url, reply.status or reply.reason,
                    reply.body[:200].decode(errors="replace"))
        return side, unit, reply

    def _failed(self, route: str, failure: Failure, started: float) -> Answer:
        """The client's answer once no attempt is left: the server's error, or 502 if none came."""
        side, unit, reply = failure
        worker = unit.worker
        status = reply.status or 502
        self.metrics.answered(route, status, time.perf_counter() - started)
        if reply.status:
            return BytesResponse(reply.body, reply.status, reply.content_type, reply.ranks)
        message = f"{side} server {worker.url} failed ({reply.reason}): {reply.body.decode(errors='replace')}"
        return error_response(route, 502, message, f"{side}_unreachable")

    def _backoff(self, attempt: int) -> float:
        c = self.config
        ms = min(c.retry_max_backoff_ms, c.retry_initial_backoff_ms * c.retry_backoff_multiplier ** (attempt - 1))
        return max(0.0, ms / 1000.0 * (1.0 + c.retry_jitter_factor * _rng.uniform(-1.0, 1.0)))

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task


def _culprit(failure: Failure) -> Worker | Unit:
    """What a retry leaves out: the whole server when it did not answer, else the failed unit."""
    _, unit, reply = failure
    return unit.worker if reply.status == 0 else unit
