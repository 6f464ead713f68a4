"""The disaggregation plane's shared secret: where it comes from (flag, environment, API key, or a
fresh one per ``pdserve launch``). Torch-free and free of the P/D code, so the launcher (a router
module) can make one without importing the plane; :mod:`pdserve.disagg.auth` uses it to authenticate."""

from __future__ import annotations

import hashlib
import os
import secrets

SECRET_ENV = "PDSERVE_DISAGG_SECRET"


def derive_secret(api_key: str) -> str:
    """The plane secret implied by ``--api-key`` (never the key itself, so one does not reveal the other)."""
    return hashlib.sha256(b"pdserve-disaggregation-secret\0" + api_key.encode()).hexdigest()


def generate_secret() -> str:
    """A fresh random secret (``pdserve launch`` makes one per launch)."""
    return secrets.token_hex(32)


def resolve_secret(secret: str | None, api_key: str | None) -> str | None:
    """The secret a server uses: the flag, else the environment variable, else derived from the API key."""
    if secret:
        return secret
    env = os.environ.get(SECRET_ENV)
    if env:
        return env
    return derive_secret(api_key) if api_key else None
