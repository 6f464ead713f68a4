"""Bootstrap service of a prefill server, and its client.

One service per prefill server (``--disaggregation-bootstrap-port``). Each prefill DP rank
registers its :class:`RankInfo` (control endpoint, KV layout); when prefill picks ranks by load
rather than ``room % dp_size``, the room -> rank assignments are registered too. Lookups of
something not yet registered wait (``?wait=SECONDS`` long-poll, capped at :data:`MAX_WAIT_S`) and
answer 503 with a JSON :class:`ErrorBody` at the bound; a rank outside ``[0, dp_size)`` is 404.
A rank whose worker died is unregistered by the front (lookups then wait for the restarted
worker's registration, and their 503 says why); a rank given up for good answers 410 at once.

Routes::

    GET  /health                        200 once every rank registered, else 503
    GET  /bootstrap/info                BootstrapInfo
    PUT  /bootstrap/ranks/{rank}        body RankInfo
    GET  /bootstrap/ranks/{rank}?wait=&room=  RankInfo; 409 at once (or when it happens during the
                                        wait) if the prefill server refused that room's prefill half
    PUT  /bootstrap/rooms/{room}        body RoomRank
    GET  /bootstrap/rooms/{room}?wait=  RoomRank
    DELETE /bootstrap/rooms/{room}
    PUT  /bootstrap/rooms/{room}/asked  body RoomAsk: a rank got a KV request for a room it lacks
    POST /bootstrap/rooms/{room}/refuse body RoomRefusal: decode refused its half of the room
    GET  /query                         vLLM's Mooncake bootstrap query: {dp_rank: {engine_id, worker_addr}}
                                        of the registered ranks (vllm-router --kv-connector mooncake reads it)

The front registers every room it dispatches; a room registered to one rank and asked of
another is reported to ``on_misroute`` (whichever comes first), a refusal to ``on_refusal``;
both callbacks run on the service's thread. The front also records the rooms whose prefill half it
refused (:meth:`BootstrapServer.refuse_room`, kept for ``refusal_ttl_s``): a decode asking for the
rank of such a room learns it at once, even while that rank is restarting and cannot be told.

Writes (PUT, POST, DELETE) must carry an ``X-PDServe-Auth`` envelope sealing method, path and body with
the deployment's secret (:mod:`.auth`); others are 401. Reads stay open: they reveal control
endpoints and KV layouts, which an attacker cannot use without the secret (every control message
and transfer connection is authenticated). Each read answer is MACed with the nonce the client
sent (``X-PDServe-Nonce`` -> ``X-PDServe-Answer``), so decode trusts only answers from a bootstrap
service of its own deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from pdserve.disagg.auth import AuthError, PlaneAuth
from pdserve.disagg.messages import BootstrapInfo, Cause, ErrorBody, RankInfo, RoomAsk, RoomRank, RoomRefusal
from pdserve.disagg.stats import Refusals
from pdserve.disagg.threads import EventLoopThread
from pdserve.disagg.vllm_ids import engine_id
from pdserve.ports import bound_socket

AUTH_HEADER = "X-PDServe-Auth"
NONCE_HEADER = "X-PDServe-Nonce"
ANSWER_HEADER = "X-PDServe-Answer"
MAX_BODY_BYTES = 1 << 20  # a RankInfo or RoomRank is well under this
KEEPALIVE_S = 15.0  # idle kept-alive connections are closed after this
MAX_NONCE_CHARS = 64


def _write_purpose(method: str, path: str) -> bytes:
    return f"bootstrap {method} {path}".encode()

MAX_WAIT_S = 60.0  # longest single long-poll; clients poll again until their own deadline
ROOM_TTL_S = 3600.0  # room registrations older than this are dropped
MAX_ROOMS = 1_000_000


class BootstrapError(RuntimeError):
    """A lookup or registration failed or hit its deadline; ``awaited`` names what was awaited."""

    def __init__(self, message: str, awaited: str, cause: str = Cause.BOOTSTRAP_TIMEOUT, status: int = 0) -> None:
        super().__init__(message)
        self.awaited = awaited
        self.cause = cause
        self.status = status  # the bootstrap service's HTTP answer (0: none)


class _Waitable:
    """Key -> value map whose lookups can wait for a key to appear (on the service's loop)."""

    def __init__(self, ttl_s: float | None = None, max_items: int | None = None) -> None:
        self.values: OrderedDict[Any, tuple[Any, float]] = OrderedDict()
        self._waiters: dict[Any, set[asyncio.Future]] = {}
        self._ttl_s = ttl_s
        self._max_items = max_items

    def set(self, key: Any, value: Any) -> None:
        now = time.monotonic()
        self.values[key] = (value, now)
        self.values.move_to_end(key)
        for fut in self._waiters.pop(key, ()):
            if not fut.done():
                fut.set_result(value)
        if self._ttl_s is not None:
            while self.values:
                _, (_, t) = next(iter(self.values.items()))
                if now - t <= self._ttl_s and (self._max_items is None or len(self.values) <= self._max_items):
                    break
                self.values.popitem(last=False)

    def pop(self, key: Any) -> None:
        self.values.pop(key, None)

    def get_now(self, key: Any) -> Any:
        item = self.values.get(key)
        return None if item is None else item[0]

    async def get(self, key: Any, wait_s: float) -> Any:
        value = self.get_now(key)
        if value is not None or wait_s <= 0:
            return value
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, set()).add(fut)
        try:
            return await asyncio.wait_for(fut, wait_s)
        except asyncio.TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(fut)
                if not waiters:
                    del self._waiters[key]


def _json(obj: msgspec.Struct, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type="application/json", headers=headers)


def _error(status: int, message: str, awaited: str = "", waited_s: float = 0.0) -> web.Response:
    headers = {"Retry-After": "1"} if status == 503 else None
    return _json(ErrorBody(message, awaited, round(waited_s, 3)), status, headers)


class BootstrapServer:
    """The bootstrap HTTP service, run on its own event-loop thread (start/stop from any thread)."""

    def __init__(
        self,
        dp_size: int,
        host: str = "127.0.0.1",
        port: int = 8998,
        load_balance_method: str = "follow_bootstrap_room",
        auth: PlaneAuth | None = None,
        refusals: Refusals | None = None,
        refusal_ttl_s: float = ROOM_TTL_S,
    ) -> None:
        if dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {dp_size}")
        self.dp_size = dp_size
        self.host = host
        self.requested_port = port
        self.load_balance_method = load_balance_method
        self.auth = auth or PlaneAuth(None)
        self.refusals = refusals or Refusals()
        self.port = 0
        self.instance_id = secrets.token_hex(8)  # this server's engines in vLLM's P/D protocol (server/kv_transfer.py)
        self._ranks = _Waitable()
        self._down: dict[int, tuple[str, bool]] = {}  # rank -> (why it is not registered, given up for good)
        self._rooms = _Waitable(ROOM_TTL_S, MAX_ROOMS)
        self._asked = _Waitable(ROOM_TTL_S, MAX_ROOMS)  # room -> RoomAsk of a rank that lacks it
        self._refused = _Waitable(refusal_ttl_s, MAX_ROOMS)  # room -> (RoomRefusal, expiry): prefill refused it
        self.refusal_ttl_s = refusal_ttl_s
        self.on_misroute: Callable[[int, int, RoomAsk], None] | None = None  # (room, holder rank, ask)
        self.on_refusal: Callable[[RoomRefusal], None] | None = None
        self._io: EventLoopThread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def follows_room(self) -> bool:
        return self.load_balance_method == "follow_bootstrap_room"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 10.0) -> BootstrapServer:
        try:
            sock = bound_socket(self.host, self.requested_port)  # TCP_NODELAY on every accepted connection
        except OSError as e:
            raise OSError(
                f"bootstrap service cannot listen on {self.host}:{self.requested_port}: {e} "
                "(choose another --disaggregation-bootstrap-port)"
            ) from e
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        self._io = EventLoopThread(f"bootstrap-{self.port}")
        self._io.run(self._start(sock), timeout)
        return self

    async def _start(self, sock: socket.socket) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._authenticate])
        app.router.add_get("/health", self._health)
        app.router.add_get("/bootstrap/info", self._info)
        app.router.add_put("/bootstrap/ranks/{rank}", self._put_rank)
        app.router.add_get("/bootstrap/ranks/{rank}", self._get_rank)
        app.router.add_put("/bootstrap/rooms/{room}", self._put_room)
        app.router.add_get("/bootstrap/rooms/{room}", self._get_room)
        app.router.add_delete("/bootstrap/rooms/{room}", self._delete_room)
        app.router.add_put("/bootstrap/rooms/{room}/asked", self._put_asked)
        app.router.add_post("/bootstrap/rooms/{room}/refuse", self._post_refuse)
        app.router.add_get("/query", self._query)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5, keepalive_timeout=KEEPALIVE_S,
            max_line_size=8190, max_field_size=8190,
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._io is None:
            return
        if self._runner is not None:
            with contextlib.suppress(Exception):  # stopping anyway
                self._io.run(self._runner.cleanup(), timeout)
        self._io.stop(timeout)
        self._io = None

    def __enter__(self) -> BootstrapServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ direct access (any thread)
    def register_rank(self, info: RankInfo) -> None:
        self._check_rank(info.rank)
        assert self._io is not None, "bootstrap service not started"
        self._io.loop.call_soon_threadsafe(self._ranks.set, info.rank, info)

    def unregister_rank(self, rank: int, reason: str, gone: bool = False) -> None:
        """The rank's worker died: lookups wait for its successor's registration (503 naming ``reason``
        at their bound), or, ``gone``, answer 410 at once."""
        self._check_rank(rank)
        assert self._io is not None, "bootstrap service not started"

        def apply() -> None:
            self._ranks.pop(rank)
            self._down[rank] = (reason, gone)

        self._io.loop.call_soon_threadsafe(apply)

    def register_room(self, room: int, rank: int) -> None:
        """Record that ``room`` is served by prefill ``rank`` (the front calls this when it dispatches)."""
        self._check_rank(rank)
        assert self._io is not None, "bootstrap service not started"
        self._io.loop.call_soon_threadsafe(self._set_room, room, rank)

    def refuse_room(self, refusal: RoomRefusal) -> None:
        """The prefill front refused the prefill half of ``refusal.room``: rank lookups naming that room
        answer 409 with the reason (for ``refusal_ttl_s``, or until :meth:`clear_refusal`)."""
        assert self._io is not None, "bootstrap service not started"
        expiry = time.monotonic() + self.refusal_ttl_s
        self._io.loop.call_soon_threadsafe(self._refused.set, refusal.room, (refusal, expiry))

    def clear_refusal(self, room: int) -> None:
        """A prefill half of ``room`` was accepted after all (a retry): forget the refusal."""
        assert self._io is not None, "bootstrap service not started"
        self._io.loop.call_soon_threadsafe(self._refused.pop, room)

    def _refusal(self, room: int | None) -> RoomRefusal | None:
        item = self._refused.get_now(room) if room is not None else None
        return item[0] if item is not None and item[1] > time.monotonic() else None

    def _set_room(self, room: int, rank: int) -> None:
        self._rooms.set(room, rank)
        ask = self._asked.get_now(room)
        if ask is not None:
            self._asked.pop(room)
            if ask.rank != rank and self.on_misroute is not None:
                self.on_misroute(room, rank, ask)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.dp_size:
            raise ValueError(f"prefill rank {rank} is outside [0, {self.dp_size})")

    # ------------------------------------------------------------------ handlers
    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Writes must be sealed with the secret; read answers are MACed with the client's nonce."""
        if request.method not in ("GET", "HEAD"):
            body = await request.read()
            try:
                self.auth.open_header(_write_purpose(request.method, request.path), request.headers.get(AUTH_HEADER),
                                      body)
            except AuthError as e:
                self.refusals.record("bootstrap", "unauthenticated_write", f"{request.method} {request.path}: {e}")
                return _error(401, f"{request.method} {request.path} refused: {e}")
        response = await handler(request)
        nonce = request.headers.get(NONCE_HEADER)
        if nonce is not None and len(nonce) <= MAX_NONCE_CHARS and isinstance(response, web.Response):
            response.headers[ANSWER_HEADER] = self.auth.answer_tag(nonce, response.body or b"")
        return response

    async def _health(self, request: web.Request) -> web.Response:
        missing = [r for r in range(self.dp_size) if self._ranks.get_now(r) is None]
        if missing:
            return _error(503, f"prefill ranks {missing} have not registered yet")
        return web.json_response({"status": "ok"})

    async def _info(self, request: web.Request) -> web.Response:
        registered = sorted(self._ranks.values)
        return _json(BootstrapInfo(self.dp_size, self.follows_room, self.load_balance_method, registered,
                                   self.instance_id))

    async def _query(self, request: web.Request) -> web.Response:
        """vLLM's Mooncake bootstrap ``/query``: per registered DP rank its engine id (what decode names in
        ``kv_transfer_params.remote_engine_id``) and its control endpoint as the one TP/PP worker."""
        answer = {
            str(rank): {"engine_id": engine_id(self.instance_id, rank),
                        "worker_addr": {"0": {"0": info.control_endpoint}}}
            for rank, (info, _) in sorted(self._ranks.values.items())
        }
        return web.json_response(answer)

    async def _put_rank(self, request: web.Request) -> web.Response:
        rank = _int_param(request, "rank")
        if isinstance(rank, web.Response):
            return rank
        try:
            info = msgspec.json.decode(await request.read(), type=RankInfo)
        except msgspec.ValidationError as e:
            return _error(400, f"bad RankInfo: {e}")
        if info.rank != rank:
            return _error(400, f"RankInfo.rank={info.rank} does not match the path rank {rank}")
        if not 0 <= rank < self.dp_size:
            return _error(400, f"prefill rank {rank} is outside [0, {self.dp_size}) (dp_size {self.dp_size})")
        self._down.pop(rank, None)
        self._ranks.set(rank, info)
        return web.json_response({"registered": rank})

    async def _get_rank(self, request: web.Request) -> web.Response:
        rank, wait = _int_param(request, "rank"), _wait_param(request)
        room = _int_param(request, "room", query=True) if "room" in request.query else None
        for bad in (rank, wait, room):
            if isinstance(bad, web.Response):
                return bad
        if not 0 <= rank < self.dp_size:
            return _error(404, f"prefill rank {rank} does not exist: this prefill server has dp_size {self.dp_size}")
        down = self._down.get(rank)
        if down is not None and down[1]:
            return _error(410, f"prefill rank {rank} is down for good: {down[0]}", f"prefill rank {rank}")
        info = await self._rank_unless_refused(rank, room, wait)
        if isinstance(info, RoomRefusal):
            body = ErrorBody(info.reason, f"prefill rank {rank} for room {room}", refused_status=info.status)
            return _json(body, 409)
        if info is None:
            down = self._down.get(rank)
            why = f" (it died and is restarting: {down[0]})" if down is not None else ""
            return _error(
                410 if down is not None and down[1] else 503,
                f"prefill rank {rank} has not registered with the bootstrap service at {self.address} "
                f"within {wait:.3g} s{why}",
                f"registration of prefill rank {rank}",
                wait,
            )
        return _json(info)

    async def _rank_unless_refused(self, rank: int, room: int | None, wait: float) -> RankInfo | RoomRefusal | None:
        """The rank's info, waiting up to ``wait`` for its registration — unless the prefill half of
        ``room`` is (or, during the wait, gets) refused: then that refusal."""
        refusal = self._refusal(room)
        if refusal is not None or room is None:
            return refusal or await self._ranks.get(rank, wait)
        lookups = [asyncio.ensure_future(self._ranks.get(rank, wait)),
                   asyncio.ensure_future(self._refused.get(room, wait))]
        try:
            for first in asyncio.as_completed(lookups):
                value = await first
                if isinstance(value, RankInfo):
                    return value
                if value is not None and self._refusal(room) is not None:
                    return value[0]
            return None
        finally:
            for lookup in lookups:
                lookup.cancel()

    async def _put_room(self, request: web.Request) -> web.Response:
        room = _int_param(request, "room")
        if isinstance(room, web.Response):
            return room
        try:
            body = msgspec.json.decode(await request.read(), type=RoomRank)
        except msgspec.ValidationError as e:
            return _error(400, f"bad RoomRank: {e}")
        if body.room != room or not 0 <= body.rank < self.dp_size:
            return _error(400, f"bad room registration {body} for room {room} (dp_size {self.dp_size})")
        self._set_room(room, body.rank)
        return web.json_response({"registered": room})

    async def _put_asked(self, request: web.Request) -> web.Response:
        room = _int_param(request, "room")
        if isinstance(room, web.Response):
            return room
        try:
            ask = msgspec.json.decode(await request.read(), type=RoomAsk)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            return _error(400, f"bad RoomAsk: {e}")
        if ask.room != room or not 0 <= ask.rank < self.dp_size:
            return _error(400, f"bad RoomAsk {ask} for room {room} (dp_size {self.dp_size})")
        holder = self._rooms.get_now(room)
        if holder is None:
            self._asked.set(room, ask)
        elif holder != ask.rank and self.on_misroute is not None:
            self.on_misroute(room, holder, ask)
        return web.json_response({"room": room, "holder": holder})

    async def _post_refuse(self, request: web.Request) -> web.Response:
        room = _int_param(request, "room")
        if isinstance(room, web.Response):
            return room
        try:
            refusal = msgspec.json.decode(await request.read(), type=RoomRefusal)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            return _error(400, f"bad RoomRefusal: {e}")
        if refusal.room != room or not 400 <= refusal.status <= 599:
            return _error(400, f"bad RoomRefusal for room {room}: room {refusal.room}, status {refusal.status}")
        if self.on_refusal is not None:
            self.on_refusal(refusal)
        return web.json_response({"refused": room})

    async def _get_room(self, request: web.Request) -> web.Response:
        room, wait = _int_param(request, "room"), _wait_param(request)
        for bad in (room, wait):
            if isinstance(bad, web.Response):
                return bad
        rank = await self._rooms.get(room, wait)
        if rank is None:
            return _error(
                503,
                f"room {room} has not been registered with a prefill rank at the bootstrap service "
                f"{self.address} within {wait:.3g} s",
                f"prefill rank of room {room}",
                wait,
            )
        return _json(RoomRank(room, rank))

    async def _delete_room(self, request: web.Request) -> web.Response:
        room = _int_param(request, "room")
        if isinstance(room, web.Response):
            return room
        self._rooms.pop(room)
        return web.json_response({"deleted": room})


def _int_param(request: web.Request, name: str, query: bool = False) -> int | web.Response:
    raw = request.query[name] if query else request.match_info[name]
    try:
        return int(raw)
    except ValueError:
        return _error(400, f"{name} must be an integer, got {raw!r}")


def _wait_param(request: web.Request) -> float | web.Response:
    raw = request.query.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        return _error(400, f"wait must be a number of seconds, got {raw!r}")
    if wait != wait or wait < 0:
        return _error(400, f"wait must be >= 0 seconds, got {raw!r}")
    return min(wait, MAX_WAIT_S)


class BootstrapClient:
    """Async client of one bootstrap service; every call is bounded by an absolute ``deadline``
    (``time.monotonic()``), retrying refused connections and expired long-polls until then."""

    RETRY_MIN_S = 0.05
    RETRY_MAX_S = 1.0

    def __init__(self, host: str, port: int, auth: PlaneAuth | None = None) -> None:
        self.host = host
        self.port = port
        self.auth = auth or PlaneAuth(None)
        self.base = f"http://{host}:{port}"
        self._session: aiohttp.ClientSession | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30), raise_for_status=False
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def info(self, deadline: float) -> BootstrapInfo:
        return await self._call("GET", "/bootstrap/info", BootstrapInfo, deadline, "the prefill server's info")

    async def rank_info(self, rank: int, deadline: float, room: int | None = None) -> RankInfo:
        """Prefill ``rank``'s info; with ``room``, a refusal of that room's prefill half raises a
        :class:`BootstrapError` (cause ``prefill_rejected``, ``status`` the prefill's answer) at once."""
        return await self._call(
            "GET", f"/bootstrap/ranks/{rank}", RankInfo, deadline, f"rank info of prefill rank {rank}", poll=True,
            query={"room": str(room)} if room is not None else None,
        )

    async def room_rank(self, room: int, deadline: float) -> int:
        body = await self._call(
            "GET", f"/bootstrap/rooms/{room}", RoomRank, deadline, f"the prefill rank of room {room}", poll=True
        )
        return body.rank

    async def register_rank(self, info: RankInfo, deadline: float) -> None:
        await self._call(
            "PUT", f"/bootstrap/ranks/{info.rank}", None, deadline, f"registration of prefill rank {info.rank}", info
        )

    async def register_room(self, room: int, rank: int, deadline: float) -> None:
        await self._call(
            "PUT", f"/bootstrap/rooms/{room}", None, deadline, f"registration of room {room}", RoomRank(room, rank)
        )

    async def note_asked(self, ask: RoomAsk, deadline: float) -> None:
        await self._call("PUT", f"/bootstrap/rooms/{ask.room}/asked", None, deadline, f"the holder of room {ask.room}",
                         ask)

    async def refuse_room(self, refusal: RoomRefusal, deadline: float) -> None:
        await self._call("POST", f"/bootstrap/rooms/{refusal.room}/refuse", None, deadline,
                         f"the refusal of room {refusal.room}", refusal)

    async def _call(
        self,
        method: str,
        path: str,
        result_type: type | None,
        deadline: float,
        what: str,
        body: msgspec.Struct | None = None,
        poll: bool = False,
        query: dict[str, str] | None = None,
    ) -> Any:
        delay = self.RETRY_MIN_S
        last = "no answer"
        data = msgspec.json.encode(body) if body is not None else None
        while True:
            nonce = secrets.token_hex(16)
            headers = {NONCE_HEADER: nonce}
            if data is not None:
                headers["Content-Type"] = "application/json"
            if method not in ("GET", "HEAD"):
                headers[AUTH_HEADER] = self.auth.seal_header(_write_purpose(method, path), data or b"")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BootstrapError(
                    f"timed out waiting for {what} from the bootstrap service at {self.address}: {last}", what
                )
            params = {**(query or {}), **({"wait": f"{min(remaining, MAX_WAIT_S):.3f}"} if poll else {})} or None
            try:
                timeout = aiohttp.ClientTimeout(total=remaining + 2.0, connect=min(remaining, 5.0))
                async with self._http().request(
                    method, self.base + path, params=params, data=data, timeout=timeout, headers=headers,
                ) as resp:
                    raw = await resp.read()
                    if resp.status == 200:
                        try:
                            self.auth.check_answer(nonce, raw, resp.headers.get(ANSWER_HEADER))
                        except AuthError as e:
                            raise BootstrapError(f"bootstrap service at {self.address} answered {what}: {e}", what,
                                                 Cause.BOOTSTRAP_ERROR) from None
                        return msgspec.json.decode(raw, type=result_type) if result_type is not None else None
                    message = _error_message(raw, resp.status)
                    refused = _refused(raw) if resp.status == 409 else None
                    if refused is not None:  # the prefill server refused this room's prefill half
                        try:
                            self.auth.check_answer(nonce, raw, resp.headers.get(ANSWER_HEADER))
                        except AuthError as e:
                            raise BootstrapError(f"bootstrap service at {self.address} answered {what}: {e}", what,
                                                 Cause.BOOTSTRAP_ERROR) from None
                        raise BootstrapError(f"prefill failed: {refused.error}", what, Cause.PREFILL_REJECTED,
                                             refused.refused_status)
                    if resp.status != 503:
                        raise BootstrapError(
                            f"bootstrap service at {self.address} refused {what}: {message}",
                            what,
                            Cause.BOOTSTRAP_ERROR,
                            resp.status,
                        )
                    last = message
                    if poll:
                        continue  # the long-poll expired: poll again while time remains
            except aiohttp.ClientConnectorError as e:
                if isinstance(e.os_error, ConnectionRefusedError):  # nothing listens there: waiting cannot help
                    raise BootstrapError(
                        f"no bootstrap service at {self.address} (connection refused) for {what}: is the prefill "
                        "server down, or is bootstrap_port wrong?", what, Cause.BOOTSTRAP_ERROR,
                    ) from None
                last = f"{type(e).__name__}: {e}"
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0)))
            delay = min(delay * 2, self.RETRY_MAX_S)


def _refused(raw: bytes) -> ErrorBody | None:
    try:
        body = msgspec.json.decode(raw, type=ErrorBody)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return body if 400 <= body.refused_status <= 599 else None


def _error_message(raw: bytes, status: int) -> str:
    try:
        return f"HTTP {status}: {msgspec.json.decode(raw, type=ErrorBody).error}"
    except (msgspec.DecodeError, msgspec.ValidationError):
        return f"HTTP {status}: {raw[:200].decode(errors='replace')}"
