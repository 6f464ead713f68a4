"""The wire format between the front process and the DP worker processes.

Every message that crosses a process boundary is one of the msgspec Structs below, encoded with
msgpack. Requests and outputs embed the engine's own dataclasses (:class:`SamplingParams`,
:class:`StepOutput`), so a field added there travels without a second definition here. The
worker's startup spec is a Struct too, passed as JSON on its command line.

Flow: front --PUSH(one per rank)--> worker: :data:`ToWorker`;
worker --PUSH--> front (one PULL for all ranks): :data:`FromWorker`.
"""

from __future__ import annotations

import msgspec

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.stats import DisaggMeta, DisaggReport
from pdserve.engine.config import EngineConfig
from pdserve.engine.request import SamplingParams, StepOutput
from pdserve.kv_events import CacheEvent


class WorkerSpec(msgspec.Struct, frozen=True):
    """Everything a worker process needs to start: its rank, its engine and where to connect."""

    dp_rank: int
    dp_size: int
    engine: EngineConfig
    input_addr: str  # the worker PULLs requests from here (bound by the front)
    output_addr: str  # the worker PUSHes outputs here (bound by the front)
    parent_pid: int  # the worker exits when its parent is gone
    log_level: str = "info"
    disagg: DisaggConfig = msgspec.field(default_factory=DisaggConfig)  # P/D role; bootstrap_port is the bound one


# ---------------------------------------------------------------- front -> worker


class GenerateReq(msgspec.Struct, tag="generate"):
    """One tokenized, validated generation request for one DP rank."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    dp_rank: int
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    # P/D fields, carried end to end for the disaggregated roles
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    prefill_dp_rank: int | None = None
    label: str | None = None  # the client's rid (``rid`` is the front's internal id): for logs and fault plans
    # vLLM's P/D protocol (server/kv_transfer.py): a prefill half answered once computed; the prefill
    # server instance a decode half's kv_transfer_params.remote_engine_id names (checked at its bootstrap)
    detach_room: bool = False
    prefill_instance: str | None = None
    prefill_room_known: bool = False  # the prefill half answered already: its room must be registered


class AbortReq(msgspec.Struct, tag="abort"):
    rid: str
    message: str = "aborted by request"


class RejectRoom(msgspec.Struct, tag="reject_room"):
    """P/D prefill: the front refused a request naming ``room``; the rank answers that room's KV
    request (now or when it comes) with ``Status{error, reason}`` instead of waiting for it."""

    room: int
    reason: str
    status: int = 0  # HTTP status decode answers (0: 503)
    cause: str = ""  # a disagg Cause (default: prefill_rejected)


class FlushCacheReq(msgspec.Struct, tag="flush_cache"):
    req_id: int


class ShutdownReq(msgspec.Struct, tag="shutdown"):
    pass


ToWorker = GenerateReq | AbortReq | RejectRoom | FlushCacheReq | ShutdownReq


# ---------------------------------------------------------------- worker -> front


class RankLoad(msgspec.Struct):
    """Load of one DP rank, as ``EngineCore.load()`` reports it."""

    num_reqs: int = 0
    num_waiting_reqs: int = 0
    num_tokens: int = 0
    num_used_pages: int = 0  # held by requests or transfers (pages only the prefix cache holds excluded)
    num_total_pages: int = 0
    num_retractions: int = 0  # requests retracted (KV dropped for recompute) since the rank started
    num_preemptions: int = 0  # of those, retracted for a request that had waited longer after its first token
    num_stall_timeouts: int = 0  # requests failed for not running again within --stall-timeout
    num_steps: int = 0  # engine steps since the rank started
    num_cached_pages: int = 0  # held by the prefix cache (some may also be in use)
    num_evictable_pages: int = 0  # held only by the prefix cache: evicted when room is needed
    prompt_tokens_total: int = 0
    cached_tokens_total: int = 0  # prompt tokens read from the prefix cache instead of computed
    prefill_tokens_computed: int = 0
    cache_hit_rate: float = 0.0  # cached_tokens_total / prompt_tokens_total


class WorkerReady(msgspec.Struct, tag="ready"):
    """Sent once the engine is loaded; the front validates requests against these limits."""

    dp_rank: int
    pid: int
    model_path: str
    context_length: int
    vocab_size: int
    max_total_tokens: int
    page_size: int
    load: RankLoad
    compute_path: dict[str, str] = {}  # dtype, device, CPU instruction sets (pdserve.models.cpu_features)


class OutputBatch(msgspec.Struct, tag="outputs"):
    """What one engine step produced, plus the rank's load right after the step and, for P/D
    requests among the outputs, their ``meta_info`` fields by rid."""

    dp_rank: int
    outputs: list[StepOutput]
    load: RankLoad
    disagg_meta: dict[str, DisaggMeta] = {}


class ReqRejected(msgspec.Struct, tag="rejected"):
    """The engine refused a request (validation); ``status`` is the HTTP status to answer."""

    dp_rank: int
    rid: str
    message: str
    status: int = 400


class FlushCacheDone(msgspec.Struct, tag="flush_cache_done"):
    dp_rank: int
    req_id: int
    success: bool
    message: str = ""  # why the rank refused


class DisaggStats(msgspec.Struct, tag="disagg_stats"):
    """A P/D rank's transfer counters, sent when they change (at most every few hundred ms)."""

    dp_rank: int
    report: DisaggReport


class CacheEvents(msgspec.Struct, tag="cache_events"):
    """What the rank's prefix cache stored and evicted since the last such message."""

    dp_rank: int
    events: list[CacheEvent]


class WorkerFailed(msgspec.Struct, tag="failed"):
    """The worker hit an unrecoverable error and is about to exit."""

    dp_rank: int
    message: str


FromWorker = WorkerReady | OutputBatch | ReqRejected | FlushCacheDone | DisaggStats | CacheEvents | WorkerFailed


_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(data: bytes) -> ToWorker:
    return _to_worker.decode(data)


def decode_from_worker(data: bytes) -> FromWorker:
    return _from_worker.decode(data)


def encode_spec(spec: WorkerSpec) -> str:
    return msgspec.json.encode(spec).decode()


def decode_spec(text: str) -> WorkerSpec:
    return msgspec.json.decode(text, type=WorkerSpec)
