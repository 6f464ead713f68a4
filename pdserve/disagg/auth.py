"""Authentication of the disaggregation plane: one shared secret, HMAC-SHA256, no secret on the wire.

Every server of one deployment holds the same secret (``--disaggregation-secret`` or
``PDSERVE_DISAGG_SECRET``; derived from ``--api-key`` when only that is set; ``pdserve launch``
generates one per launch). What proves knowledge of it:

- **messages** (ZMQ control plane, bootstrap writes): :meth:`PlaneAuth.seal` wraps an encoded
  message as ``MAGIC | timestamp | nonce | HMAC(purpose, timestamp, nonce, payload) | payload``;
  :meth:`PlaneAuth.open` checks the MAC (constant time), the timestamp window and that the nonce
  was not seen before (replay), and returns the payload;
- **answers** (bootstrap reads): the client sends a fresh nonce, the service MACs its answer body
  with it (:meth:`PlaneAuth.answer_tag`), so a forged or replayed answer is refused;
- **connections** (transfer streams): the receiver sends a random challenge, the sender answers
  with its MAC (:meth:`PlaneAuth.respond`), and only then is any frame read.

Without a secret the same formats are used with an empty key: the checks then catch a peer that is
not pdserve, or that runs with a secret, but prove nothing against an attacker.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import struct
import threading
import time
from collections import OrderedDict

MAGIC = b"PDA1"
NONCE_BYTES = 16
MAC_BYTES = 32
CHALLENGE_BYTES = 32
ENVELOPE_BYTES = len(MAGIC) + 8 + NONCE_BYTES + MAC_BYTES
DEFAULT_WINDOW_S = 120.0  # a sealed message older or newer than this (wall clock) is refused
MAX_NONCES = 1 << 20


class AuthError(ValueError):
    """A message, answer or connection failed authentication."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; a wildcard or any other interface is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PlaneAuth:
    """HMAC sealing and checking with one secret; thread-safe (the nonce cache has a lock)."""

    def __init__(self, secret: str | None, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.enabled = bool(secret)
        self._key = (secret or "").encode()
        self.window_s = window_s
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def _mac(self, *parts: bytes) -> bytes:
        h = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:
            h.update(struct.pack("<I", len(part)))
            h.update(part)
        return h.digest()

    # ------------------------------------------------------------------ sealed messages
    def seal(self, purpose: bytes, payload: bytes) -> bytes:
        """``payload`` wrapped with a timestamp, a fresh nonce and their MAC under ``purpose``."""
        stamp = struct.pack("<d", time.time())
        nonce = secrets.token_bytes(NONCE_BYTES)
        return MAGIC + stamp + nonce + self._mac(purpose, stamp, nonce, payload) + payload

    def open(self, purpose: bytes, data: bytes | memoryview) -> bytes:
        """The payload of a sealed message; :class:`AuthError` if forged, stale or replayed."""
        data = bytes(data)
        if len(data) < ENVELOPE_BYTES or data[: len(MAGIC)] != MAGIC:
            raise AuthError("not a sealed pdserve message (is the peer an older pdserve or not pdserve at all?)")
        i = len(MAGIC)
        stamp, nonce, mac = data[i : i + 8], data[i + 8 : i + 8 + NONCE_BYTES], data[i + 8 + NONCE_BYTES : ENVELOPE_BYTES]
        payload = data[ENVELOPE_BYTES:]
        if not hmac.compare_digest(mac, self._mac(purpose, stamp, nonce, payload)):
            raise AuthError("bad message signature (do both servers use the same --disaggregation-secret?)")
        sent_at = struct.unpack("<d", stamp)[0]
        now = time.time()
        if not abs(now - sent_at) <= self.window_s:
            raise AuthError(f"message timestamp is {now - sent_at:.0f} s off (window {self.window_s:g} s; clocks?)")
        self._remember(nonce, now)
        return payload

    def _remember(self, nonce: bytes, now: float) -> None:
        with self._lock:
            if nonce in self._seen:
                raise AuthError("replayed message (nonce already seen)")
            self._seen[nonce] = now
            while self._seen:
                oldest, at = next(iter(self._seen.items()))
                if now - at <= 2 * self.window_s and len(self._seen) <= MAX_NONCES:
                    break
                self._seen.popitem(last=False)

    def seal_header(self, purpose: bytes, payload: bytes) -> str:
        """The envelope of :meth:`seal` without the payload, as hex (an HTTP header next to a body)."""
        return self.seal(purpose, payload)[:ENVELOPE_BYTES].hex()

    def open_header(self, purpose: bytes, header: str | None, payload: bytes) -> None:
        """Check a :meth:`seal_header` envelope for ``payload``; :class:`AuthError` if missing or bad."""
        if not header:
            raise AuthError("missing X-PDServe-Auth header: writes need the deployment's secret")
        try:
            envelope = bytes.fromhex(header)
        except ValueError:
            raise AuthError("malformed X-PDServe-Auth header") from None
        if len(envelope) != ENVELOPE_BYTES:
            raise AuthError("malformed X-PDServe-Auth header")
        self.open(purpose, envelope + payload)

    # ------------------------------------------------------------------ answers and connections
    def answer_tag(self, nonce: str, body: bytes) -> str:
        """MAC of an answer ``body`` to a request that carried ``nonce`` (hex)."""
        return self._mac(b"answer", nonce.encode(), body).hex()

    def check_answer(self, nonce: str, body: bytes, tag: str | None) -> None:
        if tag is None or not hmac.compare_digest(tag.encode(), self.answer_tag(nonce, body).encode()):
            raise AuthError("the answer is not signed with this deployment's secret "
                            "(a different --disaggregation-secret, or not a pdserve bootstrap service)")

    def challenge(self) -> bytes:
        return secrets.token_bytes(CHALLENGE_BYTES)

    def respond(self, purpose: bytes, challenge: bytes) -> bytes:
        """Proof of the secret for one connection: the MAC of the receiver's fresh challenge."""
        return self._mac(purpose, challenge)

    def check_response(self, purpose: bytes, challenge: bytes, response: bytes) -> None:
        if not hmac.compare_digest(response, self.respond(purpose, challenge)):
            raise AuthError("the peer did not prove the deployment's secret")
