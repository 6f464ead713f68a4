"""One owner of ids (issue 22): the front gives every request, sample and attempt an internal id of
its own; the client's rid is a label, unique among live requests. The controller runs here without
worker processes (a fake rank socket records what a worker would receive), so each case is exact:
a rid aborted by its client (or its router) is free at once, though the worker has not finished
the old request; a batch's rid aborts its own items only."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.engine.request import SamplingParams, StepOutput
from pdserve.server import messages as msg
from pdserve.server.config import ServerConfig
from pdserve.server.controller import DPController, RankPhase
from pdserve.server.errors import ServerError
from pdserve.server.generation import batch_rid


class FakeSocket:
    """What a worker would receive, decoded."""

    def __init__(self) -> None:
        self.sent: list[msg.ToWorker] = []

    def send(self, data: bytes, flags: int = 0) -> None:
        self.sent.append(msg.decode_to_worker(data))


@pytest.fixture
def controller():
    async def make() -> tuple[DPController, FakeSocket]:
        ctrl = DPController(ServerConfig())
        sock = FakeSocket()
        ctrl.ranks[0].phase = RankPhase.READY
        ctrl.ranks[0].sock = sock  # type: ignore[assignment]
        ctrl.ready_event.set()
        return ctrl, sock

    loop = asyncio.new_event_loop()
    try:
        yield loop.run_until_complete(make())
    finally:
        loop.close()


def generate(rid: str, n: int = 1) -> msg.GenerateReq:
    return msg.GenerateReq(rid=rid, input_ids=[1, 2, 3], sampling_params=SamplingParams(n=n, max_new_tokens=8),
                           dp_rank=0)


def worker_rids(sock: FakeSocket) -> list[str]:
    return [m.rid for m in sock.sent if isinstance(m, msg.GenerateReq)]


def finish(ctrl: DPController, iid: str) -> None:
    out = StepOutput(iid, [], finished=True, finish_reason={"type": "abort", "message": "aborted"}, prompt_tokens=3)
    ctrl._on_message(msg.OutputBatch(0, [out], msg.RankLoad(), {}))


def test_a_rid_aborted_by_its_client_is_free_at_once(controller):
    """A router retry (or a client's) with the rid it just aborted is accepted by that server at
    once, before the worker let go of the old request: the two never share an id in the worker,
    and the old request's late finish neither frees nor reaches the new one."""
    ctrl, sock = controller
    first = ctrl.submit(generate("x"))
    assert ctrl.abort("x") == 1
    second = ctrl.submit(generate("x"))  # main: 400 "rid 'x' is already in use by a running request"
    assert worker_rids(sock)[0] != worker_rids(sock)[1]
    assert {first.rid, second.rid} == {"x"} and first.iid != second.iid
    aborts = [m.rid for m in sock.sent if isinstance(m, msg.AbortReq)]
    assert aborts == [first.iid]  # the abort names the old internal id, never the label
    finish(ctrl, first.iid)  # the old request's abort output comes back late
    assert first.done and not second.done
    assert ctrl.ids.token("x") == second.iid
    assert second.queue.empty()
    with pytest.raises(ServerError) as err:
        ctrl.submit(generate("x"))  # the label is still unique among live requests
    assert err.value.status == 400


def test_sample_labels_collide_with_no_internal_id(controller):
    """``n`` = 2 under ``x`` labels its samples ``x.s1``; workers see fresh internal ids, so a
    client rid can never name another request's sample in a worker; the labels stay unique while live."""
    ctrl, sock = controller
    parent, sample = ctrl.submit_samples(generate("x", n=2))
    assert (parent.rid, sample.rid) == ("x", "x.s1")
    assert sample.iid == f"{parent.iid}.s1" and "x" not in (parent.iid, sample.iid)
    with pytest.raises(ServerError):
        ctrl.submit(generate("x.s1"))  # a live label
    finish(ctrl, sample.iid)
    other = ctrl.submit(generate("x.s1"))  # the sample ended: its label is free, its id never reused
    assert other.iid not in (parent.iid, sample.iid)
    assert worker_rids(sock) == [parent.iid, other.iid]


def test_a_batch_rid_aborts_its_own_items_only(controller):
    """``/abort_request`` with a batch's rid aborts that batch's items; a request whose own rid
    merely starts with ``rid-`` is another client's (main aborted it by prefix)."""
    ctrl, sock = controller
    lone = ctrl.submit(generate("job-0"))
    assert ctrl.abort("job") == 0  # no request or batch is called "job"
    assert not [m for m in sock.sent if isinstance(m, msg.AbortReq)] and not lone.done
    items = [ctrl.submit(generate(f"b-{i}")) for i in range(2)]
    ctrl.group_batch("b", items)
    assert ctrl.abort("b") == 2
    assert [m.rid for m in sock.sent if isinstance(m, msg.AbortReq)] == [items[0].iid, items[1].iid]
    assert "b" not in ctrl.batches and "b-0" not in ctrl.ids
    assert ctrl.abort("job-0") == 1


def test_batch_rid_names():
    assert batch_rid(["q-0", "q-1", "q-2"]) == "q"
    assert batch_rid(["q-0"]) is None and batch_rid(["q-0", "r-1"]) is None and batch_rid(["a", "b"]) is None
