"""How vLLM's P/D protocol names a pdserve prefill engine and room (``kv_transfer_params``).

vLLM's connectors name the prefill engine holding a request's KV by an engine id (NIXL returns it
from prefill; Mooncake's bootstrap ``/query`` lists one per DP rank). pdserve's engine id of a
prefill DP rank is ``pdserve-<instance>-dp<rank>``: ``instance`` is the prefill server's random
16-hex-digit id (its bootstrap service's :attr:`~pdserve.disagg.bootstrap.BootstrapServer.instance_id`,
also in ``/bootstrap/info``), so decode can check that the engine id names the server it was told
to fetch from, and learns the prefill rank without a lookup. Mooncake's ``transfer_id`` (shared by
both legs) names the room: both sides hash it to the same 63-bit ``bootstrap_room``.
"""

from __future__ import annotations

import hashlib
import re

ENGINE_ID_RE = re.compile(r"pdserve-([0-9a-f]{16})-dp([0-9]{1,6})")
MAX_ROOM = 1 << 63  # rooms pdserve allocates or derives (below SGLang's 2^64 bound)


def engine_id(instance: str, rank: int) -> str:
    """The engine id of prefill DP ``rank`` of the server ``instance``."""
    return f"pdserve-{instance}-dp{rank}"


def parse_engine_id(value: str) -> tuple[str, int] | None:
    """``(instance, rank)`` of a pdserve engine id, or None when ``value`` is not one."""
    match = ENGINE_ID_RE.fullmatch(value)
    return None if match is None else (match.group(1), int(match.group(2)))


def transfer_room(transfer_id: str) -> int:
    """The room both legs derive from a Mooncake-style ``transfer_id`` (63 bits of its BLAKE2b)."""
    digest = hashlib.blake2b(transfer_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
