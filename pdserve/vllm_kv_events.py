"""vLLM's KV-event wire format and block hashes (torch-free): what pdserve's ZMQ publisher sends.

Schedulers written for vLLM (vllm-router's ``kv_aware``, llm-d's precise prefix-cache scorer,
Dynamo's KV router) subscribe to a ZMQ PUB socket and read, per message, three frames: the topic,
an 8-byte big-endian sequence number, and a msgpack ``EventBatch`` ``[ts, events,
data_parallel_rank]`` (always a positional array). Each event is ``BlockStored`` / ``BlockRemoved``
/ ``AllBlocksCleared`` with vLLM's fields, encoded either as a tagged array (``["BlockStored",
hashes, parent, ...]``, vLLM before vllm#42892) or as a tagged map (``{"type": "BlockStored",
"block_hashes": ...}``, vLLM since); :data:`ENCODINGS` names them.

Block hashes are vLLM's (``vllm/v1/core/kv_cache_utils.py``), so a consumer that hashes its own
tokenization as vLLM does finds pdserve's pages: ``hash(block) = H((parent_digest, tuple(token_ids),
None))`` with ``H`` one of :data:`HASH_ALGOS` (``sha256``: SHA-256 of the pickle, protocol 5, vLLM's
default; ``sha256_cbor``: SHA-256 of canonical CBOR), the first block's parent being ``NONE_HASH =
H(seed)``, the seed ``$PYTHONHASHSEED`` if set, else ``"vllm-none-hash"`` (vLLM's fixed default for
cryptographic hashes). On the wire a hash is the low 64 bits of the digest read big-endian (an
unsigned int, vLLM's ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`` default), or the 32 raw bytes with
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

HASH_ALGOS = ("sha256", "sha256_cbor")
ENCODINGS = ("map", "array")  # tagged maps (vLLM since vllm#42892), tagged arrays (before)
DEFAULT_SEED = "vllm-none-hash"  # vLLM's NONE_HASH seed for cryptographic hashes without $PYTHONHASHSEED
MEDIUM = "GPU"  # vLLM's name of the engine's primary KV tier (pdserve's pool, whatever the device)
SPEC_KIND = "full_attention"
INT_HASHES_ENV = "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"


def _cbor_head(major: int, value: int) -> bytes:
    """A canonical (shortest) CBOR item head."""
    if value < 24:
        return bytes([major << 5 | value])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if value < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | info]) + struct.pack(fmt, value)
    raise ValueError(f"CBOR head value {value} exceeds 64 bits")


@functools.lru_cache(maxsize=1 << 18)
def _cbor_uint(value: int) -> bytes:
    """One token id's canonical CBOR (cached: a vocabulary is small, a prompt's ids repeat)."""
    return _cbor_head(0, value)


def canonical_cbor(obj: Any) -> bytes:
    """Canonical CBOR of what a block hash digests (None, int, bytes, str, tuple/list of those): the
    bytes ``cbor2.dumps(obj, canonical=True)`` gives for them."""
    if obj is None:
        return b"\xf6"
    if isinstance(obj, bool):
        return b"\xf5" if obj else b"\xf4"
    if isinstance(obj, int):
        return _cbor_head(0, obj) if obj >= 0 else _cbor_head(1, -1 - obj)
    if isinstance(obj, bytes):
        return _cbor_head(2, len(obj)) + obj
    if isinstance(obj, str):
        data = obj.encode("utf-8")
        return _cbor_head(3, len(data)) + data
    if isinstance(obj, (tuple, list)):
        if all(type(x) is int and x >= 0 for x in obj):  # a block's token ids: the hot path
            return _cbor_head(4, len(obj)) + b"".join(map(_cbor_uint, obj))
        return _cbor_head(4, len(obj)) + b"".join(canonical_cbor(x) for x in obj)
    raise TypeError(f"cannot CBOR-encode {type(obj).__name__} for a block hash")


def sha256(obj: Any) -> bytes:
    """vLLM's ``sha256``: SHA-256 of the highest-protocol pickle."""
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def sha256_cbor(obj: Any) -> bytes:
    """vLLM's ``sha256_cbor``: SHA-256 of canonical CBOR (reproducible outside Python)."""
    return hashlib.sha256(canonical_cbor(obj)).digest()


HASH_FUNCTIONS: dict[str, Callable[[Any], bytes]] = {"sha256": sha256, "sha256_cbor": sha256_cbor}


class BlockHasher:
    """vLLM's chained block hashes for one algorithm and seed."""

    def __init__(self, algo: str = "sha256", seed: str | None = None, int_hashes: bool | None = None) -> None:
        if algo not in HASH_FUNCTIONS:
            raise ValueError(f"prefix_caching_hash_algo must be one of {', '.join(HASH_ALGOS)}, got {algo!r}")
        self.algo = algo
        self.fn = HASH_FUNCTIONS[algo]
        self.seed = seed if seed is not None else os.environ.get("PYTHONHASHSEED", DEFAULT_SEED)
        self.none_hash = self.fn(self.seed)
        if int_hashes is None:
            int_hashes = os.environ.get(INT_HASHES_ENV, "1").strip() not in ("0", "")
        self.int_hashes = int_hashes

    def digest(self, parent: bytes | None, tokens: Sequence[int]) -> bytes:
        """Digest of a full block of ``tokens`` after the block whose digest is ``parent`` (None: first)."""
        return self.fn((parent or self.none_hash, tuple(tokens), None))

    def external(self, digest: bytes) -> int | bytes:
        """The hash as events carry it: low 64 bits big-endian (unsigned), or the raw digest."""
        return int.from_bytes(digest, "big") & 0xFFFF_FFFF_FFFF_FFFF if self.int_hashes else digest

    def chain(self, token_ids: Sequence[int], block_size: int) -> list[int | bytes]:
        """External hashes of the full blocks of ``token_ids`` from the start of a prompt."""
        out: list[int | bytes] = []
        parent: bytes | None = None
        for i in range(len(token_ids) // block_size):
            parent = self.digest(parent, token_ids[i * block_size : (i + 1) * block_size])
            out.append(self.external(parent))
        return out


def _structs(array_like: bool) -> tuple[type, type, type, type]:
    """vLLM's event structs (latest schema, its defaults and ``omit_defaults``) in one encoding; the
    batch is always positional."""
    opts = {"omit_defaults": True, "array_like": array_like, "tag": True}

    class BlockStored(msgspec.Struct, **opts):
        block_hashes: list[int | bytes]
        parent_block_hash: int | bytes | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list[Any] | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None

    class BlockRemoved(msgspec.Struct, **opts):
        block_hashes: list[int | bytes]
        medium: str | None
        group_idx: int | None = None

    class AllBlocksCleared(msgspec.Struct, **opts):
        pass

    class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
        ts: float
        events: list[BlockStored | BlockRemoved | AllBlocksCleared]
        data_parallel_rank: int | None = None

    return BlockStored, BlockRemoved, AllBlocksCleared, EventBatch


class WireFormat:
    """Builds and encodes batches in one of :data:`ENCODINGS`, with the values vLLM fills in for a
    plain full-attention model without LoRA: ``medium`` ``"GPU"``, ``group_idx`` 0,
    ``kv_cache_spec_kind`` ``"full_attention"``, ``extra_keys`` one ``None`` per block."""

    def __init__(self, encoding: str = "map") -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        self.encoding = encoding
        self._stored, self._removed, self._cleared, self._batch = _structs(encoding == "array")
        self._encoder = msgspec.msgpack.Encoder()

    def stored(self, hashes: list[int | bytes], parent: int | bytes | None, token_ids: list[int],
               block_size: int) -> Any:
        return self._stored(hashes, parent, token_ids, block_size, None, MEDIUM, None,
                            extra_keys=[None] * len(hashes), group_idx=0, kv_cache_spec_kind=SPEC_KIND)

    def removed(self, hashes: list[int | bytes]) -> Any:
        return self._removed(hashes, MEDIUM, group_idx=0)

    def cleared(self) -> Any:
        return self._cleared()

    def encode(self, ts: float, events: list[Any], dp_rank: int) -> bytes:
        return self._encoder.encode(self._batch(ts, events, dp_rank))
