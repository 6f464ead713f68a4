"""Every message of P/D disaggregation, defined once.

Three boundaries, one wire format each:

- bootstrap HTTP service (JSON): :class:`RankInfo`, :class:`BootstrapInfo`, :class:`RoomRank`,
  :class:`ErrorBody`;
- control plane, decode rank -> prefill rank (msgpack over ZMQ PUSH/PULL, each message sealed with
  the deployment's secret by :data:`CONTROL`): :data:`ControlMsg`;
- transfer stream, prefill rank -> decode rank (msgpack headers, each followed by its page bytes
  for the ``tcp`` backend, on a connection authenticated by a challenge): :data:`StreamMsg`.

Authentication (:mod:`.auth`) happens here, at encode/decode, for every type of a boundary: a new
member of :data:`ControlMsg` is sealed and checked like the others.

What managers report to the server (per-request ``meta_info``, counters) is in :mod:`.stats`.

A ``room`` is SGLang's ``bootstrap_room``: the random id both halves of one request carry.
"""

from __future__ import annotations

import hashlib
from array import array

import msgspec

from pdserve.disagg.auth import PlaneAuth
from pdserve.engine.kv_layout import KVLayout
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
    WRONG_RANK = "wrong_rank"  # decode asked another prefill rank than the one holding the room
    DECODE_REFUSED = "decode_refused"  # the decode server refused its half (bad input) or gave up resolving
    PEER_LOST = "peer_lost"  # the other side's process died or restarted (control connection lost)
    BAD_TRANSFER_PARAMS = "bad_transfer_params"  # vLLM's kv_transfer_params name no engine, rank or room there


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
    # names this prefill server's engines in vLLM's P/D protocol (engine ids ``pdserve-<instance>-dp<rank>``,
    # server/kv_transfer.py); empty from a peer that predates it
    instance_id: str = ""


class RoomRank(msgspec.Struct, frozen=True):
    """Which prefill DP rank holds a room (registered when prefill balances by load)."""

    room: int
    rank: int


class RoomAsk(msgspec.Struct, frozen=True):
    """A prefill rank got a KV request for a room it does not hold (yet): the bootstrap service
    checks whether another rank of the same server holds it (decode asked the wrong rank)."""

    room: int
    rank: int
    decode_rank: int


class RoomRefusal(msgspec.Struct, frozen=True):
    """Decode refused or gave up on its half of a room before it could reach the prefill rank
    (bad field, no such rank, aborted while resolving): the prefill server fails its half at once."""

    room: int
    reason: str
    status: int = 503  # HTTP status the prefill half answers


class ErrorBody(msgspec.Struct, frozen=True):
    """Body of every non-2xx bootstrap answer."""

    error: str
    awaited: str = ""
    waited_s: float = 0.0
    refused_status: int = 0  # 409 for a room the prefill server refused: the HTTP status it answered


# ---------------------------------------------------------------- control: decode -> prefill


class ShmSegment(msgspec.Struct, frozen=True):
    """Where a decode pool's shared memory is: prefill opens ``/proc/{pid}/fd/{fd}`` (built here, never a
    path from the wire) and maps it only if it is a pdserve KV segment whose trailer carries ``segment``
    and a MAC of it under the deployment's secret (:mod:`pdserve.disagg.transfer.shm`)."""

    pid: int
    fd: int
    segment: str  # random hex id the decode side chose when it created the segment


class RegisteredPool(msgspec.Struct, frozen=True):
    """A decode pool registered with a transfer engine (``nixl``, ``mooncake``): how the prefill rank
    reaches the engine and where each layer's pages are in the decode process. It travels only inside
    a sealed ``KVRequest`` (the authenticated plane); the engine itself refuses a write outside the
    memory the decode side registered."""

    peer: str  # nixl: the decode agent's name; mooncake: its session "host:rpc_port"
    layer_addrs: list[int]  # address of page 0 of each layer in the decode process
    layer_bytes: int  # bytes of one layer (num_pages * page bytes)
    mem: str = "DRAM"  # DRAM (a CPU pool) or VRAM (a CUDA pool)
    device: int = 0  # the CUDA device index of a VRAM pool
    metadata: bytes = b""  # nixl: the decode agent's metadata (UCX worker address, memory keys)


class ReceiverInfo(msgspec.Struct, frozen=True):
    """A decode rank's transfer endpoint: the prefill sender connects here."""

    backend: str
    host: str
    port: int
    num_pages: int
    shm: ShmSegment | None = None  # shm backend: the decode pool's shared-memory segment
    registered: RegisteredPool | None = None  # nixl, mooncake: the decode pool as the engine registered it

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
    notif: str = ""  # nixl: the notification the write carried; decode reports the frame once it has arrived


class Aux(msgspec.Struct, tag="aux", frozen=True):
    """The first output token and what decode needs to continue from it and answer completely: the
    prompt's input logprobs when asked for (decode never runs the prompt), so decode's answer is whole
    and a router relays it without reading prefill's."""

    room: int
    first_token: int | None
    logprobs: TokenLogprobs | None = None
    cached_tokens: int = 0
    input_logprobs: TokenLogprobs | None = None


class Status(msgspec.Struct, tag="status", frozen=True):
    """Last message of a room: ok after every page and the aux record, else why it failed."""

    room: int
    ok: bool
    reason: str = ""
    cause: str = ""
    status: int = 0  # failure: the HTTP status the other half answers (0: 503, retryable)


StreamMsg = Accepted | Pages | Aux | Status


_msgpack = msgspec.msgpack.Encoder()
_stream = msgspec.msgpack.Decoder(StreamMsg)


class SealedBoundary:
    """Encode/decode of one boundary's messages, each sealed with the deployment's secret."""

    def __init__(self, purpose: bytes, msg_type: object) -> None:
        self.purpose = purpose
        self._decoder = msgspec.msgpack.Decoder(msg_type)

    def encode(self, msg: msgspec.Struct, auth: PlaneAuth) -> bytes:
        return auth.seal(self.purpose, _msgpack.encode(msg))

    def decode(self, data: bytes, auth: PlaneAuth):
        """The message; :class:`~pdserve.disagg.auth.AuthError` unless sealed with the secret,
        ``msgspec.DecodeError``/``ValidationError`` if malformed."""
        return self._decoder.decode(auth.open(self.purpose, data))


CONTROL = SealedBoundary(b"control", ControlMsg)


def encode(msg: msgspec.Struct) -> bytes:
    return _msgpack.encode(msg)


def decode_stream(data: bytes | memoryview) -> StreamMsg:
    return _stream.decode(data)


def prompt_hash(input_ids: list[int]) -> str:
    """Short digest of a prompt, so both halves of a room can check they hold the same one."""
    return hashlib.blake2b(array("q", input_ids).tobytes(), digest_size=8).hexdigest()
