"""vLLM's P/D protocol on the OpenAI routes: ``kv_transfer_params`` mapped onto a pdserve room.

vllm-router (``--vllm-pd-disaggregation``) and vLLM's own proxies run P/D in two steps. Prefill gets
the request with ``max_tokens: 1``, ``stream: false`` and ``kv_transfer_params`` ``{do_remote_decode:
true, ...}``; decode then gets the client's request with ``kv_transfer_params`` ``{do_remote_prefill:
true, ...}``, which say where the KV is. Each leg's DP rank is the router's ``X-data-parallel-rank``.

NIXL style (vllm-router's default ``--kv-connector nixl``): prefill's answer carries the params decode
needs and the router forwards them verbatim. A pdserve prefill allocates a room for the request
(a detached room: the answer goes out once the prompt is computed, the room holds the KV until
decode asks for it) and answers::

    {"do_remote_prefill": true, "do_remote_decode": false,
     "remote_engine_id": "pdserve-<instance>-dp<rank>", "remote_host": H, "remote_port": P,
     "remote_dp_rank": rank, "remote_room": room, "remote_block_ids": null, "tp_size": 1,
     "remote_request_id": rid}

``remote_host``/``remote_port`` are the prefill server's bootstrap service; the room names the pages
(pdserve's decode allocates its own and asks the prefill rank by room, so ``remote_block_ids`` stays
null). Mooncake style (``--kv-connector mooncake``): the router queries the bootstrap service's
``/query`` for the engine id of each prefill DP rank, sends both legs the same ``transfer_id`` and
decode ``remote_bootstrap_addr`` (``http://host:port``) and ``remote_engine_id``; both sides derive
the room from the ``transfer_id``.

Every value is checked before anything is dispatched: a wrong type, an unknown key, a host outside
``--disaggregation-allowed-bootstrap``, an engine id that is not a pdserve one, a rank that
disagrees with it, or block ids that cannot be this prompt's are a 400 naming
``kv_transfer_params.<key>``. What only the prefill server can answer (is the instance the one
the engine id names, does it have that rank) is checked by decode at the bootstrap service before
any KV request (400 naming ``kv_transfer_params.remote_engine_id``, see ``disagg/decode.py``).
"""

from __future__ import annotations

import reprlib
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pdserve.disagg.vllm_ids import MAX_ROOM, engine_id, parse_engine_id, transfer_room
from pdserve.server.errors import bad_request

FIELD = "kv_transfer_params"
MAX_STRING = 256  # engine ids, hosts, transfer and request ids
MAX_BLOCK_IDS = 1 << 20
ALLOWED_KEYS = frozenset({
    "do_remote_decode", "do_remote_prefill", "remote_engine_id", "remote_block_ids", "remote_host", "remote_port",
    "remote_dp_rank", "remote_room", "remote_bootstrap_addr", "transfer_id", "tp_size", "remote_request_id",
})
PREFILL_NULL_KEYS = ("remote_engine_id", "remote_block_ids", "remote_host", "remote_port", "remote_dp_rank",
                     "remote_room", "remote_bootstrap_addr")


@dataclass(frozen=True)
class PrefillLeg:
    """A prefill half: the room it holds the KV in, answered once computed."""

    room: int
    transfer_id: str | None


@dataclass(frozen=True)
class DecodeLeg:
    """A decode half: where its KV is (the prefill server's bootstrap, rank and room)."""

    room: int
    host: str
    port: int
    prefill_rank: int
    instance: str
    block_ids: list[int] | None
    room_known: bool  # NIXL style: prefill answered, so its server registered the room already


def _name(key: str) -> str:
    return f"{FIELD}.{key}"


def _bool(params: dict[str, Any], key: str) -> bool:
    value = params.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{_name(key)} must be a boolean, got {_short(value)}", _name(key))
    return value


def _string(params: dict[str, Any], key: str, required: bool = False) -> str | None:
    value = params.get(key)
    if value is None:
        if required:
            raise bad_request(f"{_name(key)} is required with do_remote_prefill", _name(key))
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_STRING:
        raise bad_request(f"{_name(key)} must be a string of 1 to {MAX_STRING} characters, got {_short(value)}",
                          _name(key))
    return value


def _int(params: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise bad_request(f"{_name(key)} must be an integer in [{low}, {high}), got {_short(value)}", _name(key))
    return value


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 60, 60, 4, 4


def _short(value: Any) -> str:
    """A bounded rendering of a client's value (a 30 MiB string or a deeply nested list costs nothing)."""
    text = _REPR.repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def parse(params: Any, mode: str, bootstrap_allowed: Any, page_size: int, prompt_tokens: int
          ) -> PrefillLeg | DecodeLeg | None:
    """The leg ``params`` asks for on a server in ``mode`` (None: neither flag is set, nothing to do);
    400 naming ``kv_transfer_params.<key>`` for anything malformed, lying or unservable here."""
    if params is None:
        return None
    if not isinstance(params, dict):
        raise bad_request(f"{FIELD} must be an object, got {_short(params)}", FIELD)
    unknown = sorted(k for k in params if k not in ALLOWED_KEYS)
    if unknown:
        raise bad_request(f"unsupported field: {_name(unknown[0][:64])} (pdserve implements "
                          f"{', '.join(sorted(ALLOWED_KEYS))})", _name(unknown[0][:64]))
    remote_decode, remote_prefill = _bool(params, "do_remote_decode"), _bool(params, "do_remote_prefill")
    if remote_decode and remote_prefill:
        raise bad_request(f"{FIELD}: do_remote_decode and do_remote_prefill cannot both be true", FIELD)
    tp_size = _int(params, "tp_size", 1, 2)
    del tp_size  # pdserve has no tensor parallelism: only 1 (or null) is accepted
    _string(params, "remote_request_id")  # informational (vLLM's prefill request id); checked, not used
    transfer_id = _string(params, "transfer_id")
    if remote_decode:
        if mode != "prefill":
            raise bad_request(f"{_name('do_remote_decode')} needs a P/D prefill server; this one runs "
                              f"--disaggregation-mode {mode}", _name("do_remote_decode"))
        for key in PREFILL_NULL_KEYS:
            if params.get(key) is not None:
                raise bad_request(f"{_name(key)} must be null with do_remote_decode (the prefill server answers "
                                  "it)", _name(key))
        room = transfer_room(transfer_id) if transfer_id is not None else secrets.randbelow(MAX_ROOM)
        return PrefillLeg(room, transfer_id)
    if not remote_prefill:
        given = sorted(k for k, v in params.items() if v is not None and k not in ("do_remote_decode",
                                                                                   "do_remote_prefill"))
        if given:
            raise bad_request(f"{_name(given[0])} needs do_remote_prefill (or do_remote_decode) true",
                              _name(given[0]))
        return None
    if mode != "decode":
        raise bad_request(f"{_name('do_remote_prefill')} needs a P/D decode server; this one runs "
                          f"--disaggregation-mode {mode}", _name("do_remote_prefill"))
    return _decode_leg(params, transfer_id, bootstrap_allowed, page_size, prompt_tokens)


def _decode_leg(params: dict[str, Any], transfer_id: str | None, bootstrap_allowed: Any, page_size: int,
                prompt_tokens: int) -> DecodeLeg:
    engine = _string(params, "remote_engine_id", required=True)
    assert engine is not None
    parsed = parse_engine_id(engine)
    if parsed is None:
        raise bad_request(f"{_name('remote_engine_id')} {_short(engine)} is not a pdserve prefill engine id "
                          "(pdserve-<16 hex digits>-dp<rank>, as a pdserve prefill server answers it)",
                          _name("remote_engine_id"))
    instance, rank = parsed
    dp_rank = _int(params, "remote_dp_rank", 0, 1 << 31)
    if dp_rank is not None and dp_rank != rank:
        raise bad_request(f"{_name('remote_dp_rank')} {dp_rank} disagrees with remote_engine_id {engine} "
                          f"(prefill DP rank {rank})", _name("remote_dp_rank"))
    addr = _string(params, "remote_bootstrap_addr")
    if addr is not None:
        key = "remote_bootstrap_addr"
        try:
            url = urlsplit(addr)
            host, port = url.hostname, url.port
        except ValueError:
            host = port = None
        if url.scheme != "http" or not host or port is None or url.path not in ("", "/"):
            raise bad_request(f"{_name(key)} must be http://HOST:PORT, got {_short(addr)}", _name(key))
    else:
        key = "remote_host"
        host = _string(params, "remote_host", required=True)
        port = _int(params, "remote_port", 1, 65536)
        if port is None:
            raise bad_request(f"{_name('remote_port')} is required with do_remote_prefill", _name("remote_port"))
    assert host is not None
    if not bootstrap_allowed(host):
        raise bad_request(f"{_name(key)} host {_short(host)} is not an allowed bootstrap address "
                          "(--disaggregation-allowed-bootstrap)", _name(key))
    room = _int(params, "remote_room", 0, MAX_ROOM)
    if transfer_id is not None:
        derived = transfer_room(transfer_id)
        if room is not None and room != derived:
            raise bad_request(f"{_name('remote_room')} {room} is not the room of transfer_id {_short(transfer_id)}",
                              _name("remote_room"))
        room = derived
    if room is None:
        raise bad_request(f"{_name('remote_room')} (or transfer_id) is required with do_remote_prefill: it names "
                          "the room the prefill server holds the KV in", _name("remote_room"))
    blocks = _block_ids(params.get("remote_block_ids"), page_size, prompt_tokens)
    return DecodeLeg(room, host, port, rank, instance, blocks, room_known=transfer_id is None)


def _block_ids(value: Any, page_size: int, prompt_tokens: int) -> list[int] | None:
    """vLLM's prefill page ids, if sent: a list of one distinct page id per prompt page (pdserve's
    prefill names its pages by room and does not send them, so they are only checked)."""
    name = _name("remote_block_ids")
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_BLOCK_IDS:
        raise bad_request(f"{name} must be a list of page ids, got {_short(value)}", name)
    bad = next((v for v in value if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 31), None)
    if bad is not None:
        raise bad_request(f"{name} must hold page ids in [0, 2^31), got {_short(bad)}", name)
    pages = -(-prompt_tokens // page_size)
    if len(value) != pages or len(set(value)) != len(value):
        raise bad_request(f"{name} has {len(value)} entries ({len(set(value))} distinct) for a {prompt_tokens}-token "
                          f"prompt of {pages} pages of {page_size}", name)
    return list(value)


def prefill_answer(leg: PrefillLeg, instance: str, rank: int, host: str, port: int, rid: str) -> dict[str, Any]:
    """The ``kv_transfer_params`` a prefill answer carries: what decode needs to fetch the KV."""
    answer: dict[str, Any] = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": engine_id(instance, rank),
        "remote_host": host,
        "remote_port": port,
        "remote_dp_rank": rank,
        "remote_room": leg.room,
        "remote_block_ids": None,
        "tp_size": 1,
        "remote_request_id": rid,
    }
    if leg.transfer_id is not None:
        answer["transfer_id"] = leg.transfer_id
    return answer
