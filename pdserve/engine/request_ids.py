"""The one owner of request ids: a request's id and the ids of its samples are reserved together.

A request with ``n`` > 1 answers for ``n`` ids: its own and :func:`~pdserve.engine.request.sample_rid` ``(rid, i)`` for its
samples 1..n-1 (``rid.s1`` ...); batch items are named ``rid-i`` by the front. Every id is reserved
when the request arrives and freed when the request (or that sample) ends, so a request whose id,
or one of whose sample ids, is already live is refused before anything is created: no two live
requests or samples ever share an id, whichever order they come in.

The server's front uses this table for the client's labels (each reserved with the internal id of
the request or sample holding it, its ``token``): there a label is freed as soon as the client
aborts its request, while the worker still finishes the internal id; a release names the token, so
a late release of an old holder never frees the label of the request that reused it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from pdserve.engine.request import RequestError, sample_rid


class IdInUse(RequestError):
    """A request names an id a live request (or one of its samples) already holds."""


def request_ids(rid: str, num_samples: int) -> list[str]:
    """The ids a request with ``num_samples`` samples answers for: its own first."""
    return [rid, *(sample_rid(rid, i) for i in range(1, num_samples))]


class RequestIds:
    """Ids of live requests and samples, each with the rid of the request that reserved it and a token."""

    def __init__(self) -> None:
        self._owner: dict[str, tuple[str, str]] = {}  # id -> (rid of the request that reserved it, token)

    def reserve(self, rid: str, num_samples: int = 1, tokens: Sequence[str] | None = None) -> list[str]:
        """Reserve ``rid`` and its sample ids (each with its token, by default the id itself), or
        raise :class:`IdInUse` naming the first taken one."""
        ids = self.check_free(rid, num_samples)
        for name, token in zip(ids, tokens if tokens is not None else ids, strict=True):
            self._owner[name] = (rid, token)
        return ids

    def check_free(self, rid: str, num_samples: int = 1) -> list[str]:
        """The ids ``rid`` would reserve; :class:`IdInUse` if one is live."""
        ids = request_ids(rid, num_samples)
        for name in ids:
            held = self._owner.get(name)
            if held is None:
                continue
            owner = held[0]
            whose = "a running request" if owner == name else f"a sample of running request {owner!r}"
            mine = "" if name == rid else f" (its sample id {name!r})"
            raise IdInUse(f"rid {rid!r}{mine} is already in use by {whose}")
        return ids

    def release(self, name: str, token: str | None = None) -> None:
        """Free ``name``; with ``token``, only while that token still holds it."""
        held = self._owner.get(name)
        if held is not None and (token is None or held[1] == token):
            del self._owner[name]

    def owner(self, name: str) -> str | None:
        held = self._owner.get(name)
        return None if held is None else held[0]

    def token(self, name: str) -> str | None:
        """The token ``name`` was reserved with (the front: the internal id holding the label)."""
        held = self._owner.get(name)
        return None if held is None else held[1]

    def __contains__(self, name: object) -> bool:
        return name in self._owner

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)
