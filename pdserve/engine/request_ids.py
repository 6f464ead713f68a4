"""The one owner of request ids: a request's id and the ids of its samples are reserved together.

A request with ``n`` > 1 answers for ``n`` ids: its own and :func:`~pdserve.engine.request.sample_rid` ``(rid, i)`` for its
samples 1..n-1 (``rid.s1`` ...); batch items are named ``rid-i`` by the front. Every id is reserved
when the request arrives and freed when the request (or that sample) ends, so a request whose id,
or one of whose sample ids, is already live is refused before anything is created: no two live
requests or samples ever share an id, whichever order they come in.
"""

from __future__ import annotations

from collections.abc import Iterator

from pdserve.engine.request import RequestError, sample_rid


class IdInUse(RequestError):
    """A request names an id a live request (or one of its samples) already holds."""


def request_ids(rid: str, num_samples: int) -> list[str]:
    """The ids a request with ``num_samples`` samples answers for: its own first."""
    return [rid, *(sample_rid(rid, i) for i in range(1, num_samples))]


class RequestIds:
    """Ids of live requests and samples, each with the rid of the request that reserved it."""

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}

    def reserve(self, rid: str, num_samples: int = 1) -> list[str]:
        """Reserve ``rid`` and its sample ids, or raise :class:`IdInUse` naming the first taken one."""
        ids = self.check_free(rid, num_samples)
        for name in ids:
            self._owner[name] = rid
        return ids

    def check_free(self, rid: str, num_samples: int = 1) -> list[str]:
        """The ids ``rid`` would reserve; :class:`IdInUse` if one is live."""
        ids = request_ids(rid, num_samples)
        for name in ids:
            owner = self._owner.get(name)
            if owner is None:
                continue
            whose = "a running request" if owner == name else f"a sample of running request {owner!r}"
            mine = "" if name == rid else f" (its sample id {name!r})"
            raise IdInUse(f"rid {rid!r}{mine} is already in use by {whose}")
        return ids

    def release(self, name: str) -> None:
        self._owner.pop(name, None)

    def owner(self, name: str) -> str | None:
        return self._owner.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._owner

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)
