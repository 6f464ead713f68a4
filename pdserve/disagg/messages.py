"""Every message of P/D disaggregation, defined once.

Three boundaries, one wire format each:

- bootstrap HTTP service (JSON): :class:`RankInfo`, :class:`BootstrapInfo`, :class:`RoomRank`,
  :class:`ErrorBody`;
- control plane, decode rank -> prefill rank (msgpack over ZMQ PUSH/PULL): :data:`ControlMsg`;
- transfer stream, prefill rank -> decode rank (msgpack headers, each followed by its page bytes
  for the ``tcp`` backend): :data:`StreamMsg`.

What managers report to the server (per-request ``meta_info``, counters) is in :mod:`.stats`.

A ``room`` is SGLang's ``bootstrap_room``: the random id both halves of one request carry.
"""

from __future__ import annotations

import hashlib
from array import array

import msgspec

from pdserve.engine.kv_pool import KVLayout
from pdserve.engine.request import TokenLogprobs


class Cause:
    """Failure causes, as counted in metrics and reported in ``Status.cause``."""

    BOOTSTRAP_TIMEOUT = "bootstrap_timeout"  # the bootstrap service or prefill rank info never came
    BOOTSTRAP_ERROR = "bootstrap_error"  # the bootstrap service refused the lookup (e.g. no such rank)
    HANDSHAKE_TIMEOUT = "handshake_timeout"  # prefill rank never acknowledged the KV request
    WAITING_TIMEOUT = "waiting_timeout"  # the other half of the room never showed up
    TRANSFER_TIMEOUT = "transfer_timeout"  # a started transfer stalled
    TRANSFER_ERROR = "transfer_error"  # a connection or copy failed
    LAYOUT_MISMATCH = "layout_mismatch"  # model or KV layout differ between prefill and decode
    PROMPT_MISMATCH = "prompt_mismatch"  # the two halves of a room carry different prompts
    ROOM_CONFLICT = "room_conflict"  # a room already active
    PREFILL_ABORTED = "prefill_aborted"  # prefill failed or was aborted
    PREFILL_REJECTED = "prefill_rejected"  # the prefill server refused the request (bad input)
    DECODE_ABORTED = "decode_aborted"  # decode was aborted (client gone) or failed
    NO_PAGES = "no_pages"  # decode never got KV pages for the prompt


# ---------------------------------------------------------------- bootstrap service (JSON)


class RankInfo(msgspec.Struct, frozen=True):
    """What a prefill rank publishes at its bootstrap service: where to send KV requests."""

    rank: int
    host: str
    control_port: int
    layout: KVLayout
    model: str
    backend: str
    pid: int = 0

    @property
    def control_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.control_port}"


class BootstrapInfo(msgspec.Struct, frozen=True):
    """The prefill server as a whole: its DP size and whether rank = room % dp_size."""

    dp_size: int
    follows_room: bool
    load_balance_method: str
    registered_ranks: list[int]


class RoomRank(msgspec.Struct, frozen=True):
    """Which prefill DP rank holds a room (registered when prefill balances by load)."""

    room: int
    rank: int


class ErrorBody(msgspec.Struct, frozen=True):
    """Body of every non-2xx bootstrap answer."""

    error: str
    awaited: str = ""
    waited_s: float = 0.0


# ---------------------------------------------------------------- control: decode -> prefill


class ReceiverInfo(msgspec.Struct, frozen=True):
    """A decode rank's transfer endpoint: the prefill sender connects here."""

    backend: str
    host: str
    port: int
    num_pages: int
    shm_path: str | None = None  # shm backend: the decode pool's shared-memory file

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class KVRequest(msgspec.Struct, tag="kv_request", frozen=True):
    """Decode has reserved ``dst_pages`` for the room's prompt after its first ``cached_tokens``
    (which its prefix cache holds); prefill fills them."""

    room: int
    decode_rank: int
    prefill_rank: int
    receiver: ReceiverInfo
    dst_pages: list[int]
    num_tokens: int
    prompt_hash: str
    layout: KVLayout
    model: str
    cached_tokens: int = 0  # leading prompt tokens (whole pages) decode already holds: not sent
    cached_hash: int = 0  # chained page hash of those tokens (kv_events.page_hashes), checked by prefill


class Abort(msgspec.Struct, tag="abort", frozen=True):
    """Decode gave up on the room (client gone, timeout): prefill stops and frees its KV."""

    room: int
    reason: str
    decode_rank: int = -1


ControlMsg = KVRequest | Abort


# ---------------------------------------------------------------- stream: prefill -> decode


class Accepted(msgspec.Struct, tag="accepted", frozen=True):
    """Prefill received the KV request (sent at once, before any compute)."""

    room: int
    prefill_rank: int


class Pages(msgspec.Struct, tag="pages", frozen=True):
    """``dst_pages`` (all layers) are written: ``nbytes`` follow this header (tcp) or 0 (written in place)."""

    room: int
    dst_pages: list[int]
    nbytes: int = 0


class Aux(msgspec.Struct, tag="aux", frozen=True):
    """The first output token and what decode needs to continue from it."""

    room: int
    first_token: int | None
    logprobs: TokenLogprobs | None = None
    cached_tokens: int = 0


class Status(msgspec.Struct, tag="status", frozen=True):
    """Last message of a room: ok after every page and the aux record, else why it failed."""

    room: int
    ok: bool
    reason: str = ""
    cause: str = ""


StreamMsg = Accepted | Pages | Aux | Status


_msgpack = msgspec.msgpack.Encoder()
_control = msgspec.msgpack.Decoder(ControlMsg)
_stream = msgspec.msgpack.Decoder(StreamMsg)


def encode(msg: msgspec.Struct) -> bytes:
    return _msgpack.encode(msg)


def decode_control(data: bytes) -> ControlMsg:
    return _control.decode(data)


def decode_stream(data: bytes | memoryview) -> StreamMsg:
    return _stream.decode(data)


def prompt_hash(input_ids: list[int]) -> str:
    """Short digest of a prompt, so both halves of a room can check they hold the same one."""
    return hashlib.blake2b(array("q", input_ids).tobytes(), digest_size=8).hexdigest()
