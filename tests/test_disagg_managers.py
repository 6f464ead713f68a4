"""Prefill and decode managers on real engines, sockets and threads (one process): pairing in
either order across independent DP sizes, aborts both ways, timeouts, refusals — and no page leaks."""

from __future__ import annotations

import random
import socket
import threading
import time
from dataclasses import replace

import pytest
import torch

from pdserve.disagg import messages as m
from pdserve.disagg.bootstrap import BootstrapServer
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.decode import DecodeDisaggManager
from pdserve.disagg.errors import RoomConflictError
from pdserve.disagg.messages import RankInfo
from pdserve.disagg.prefill import PrefillDisaggManager
from pdserve.disagg.transfer import BACKENDS
from pdserve.disagg.transfer import stream as stream_module
from pdserve.engine.engine import Engine
from pdserve.engine.request import Req, SamplingParams, StepOutput

GREEDY = {"max_new_tokens": 8, "min_new_tokens": 8, "temperature": 0}
RUN_S = 20.0


@pytest.fixture(scope="module")
def engines():
    """A colocated reference, two prefill engines (small chunks: KV ships while later chunks compute),
    three decode engines, and one decode engine with another page size."""
    threads = torch.get_num_threads()
    options = {"page_size": 4, "max_total_tokens": 512, "torch_threads": 1}  # six engines share two cores
    ref = Engine(None, **options)
    prefill = [Engine(None, chunked_prefill_size=8, **options) for _ in range(2)]
    decode = [Engine(None, **options) for _ in range(3)]
    odd = Engine(None, **{**options, "page_size": 8})
    yield {"ref": ref, "prefill": [e.core for e in prefill], "decode": [e.core for e in decode], "odd": odd.core}
    torch.set_num_threads(threads)


class Cluster:
    """One prefill server (bootstrap service + a manager per prefill core) and decode managers,
    all driven from the test thread like worker loops would be."""

    def __init__(self, backend, prefill_cores, decode_cores, lb="follow_bootstrap_room", **timeouts):
        self.bootstrap = BootstrapServer(max(len(prefill_cores), 1), port=0, load_balance_method=lb).start()
        cfg = DisaggConfig(bootstrap_port=self.bootstrap.port, transfer_backend=backend, bootstrap_timeout=5,
                           waiting_timeout=10, transfer_timeout=5)
        cfg = replace(cfg, **timeouts)
        self.prefill: list[PrefillDisaggManager] = []
        self.decode: list[DecodeDisaggManager] = []
        for rank, core in enumerate(prefill_cores):
            manager = PrefillDisaggManager(core, replace(cfg, mode="prefill"), rank,
                                           register_rooms=lb != "follow_bootstrap_room")
            self.prefill.append(manager)
            manager.start()
        for rank, core in enumerate(decode_cores):
            self.decode.append(DecodeDisaggManager(core, replace(cfg, mode="decode"), rank))
        self.outputs: dict[str, list[StepOutput]] = {}
        self.meta: dict[str, dict] = {}

    def step(self, managers=None) -> None:
        """One loop iteration of every manager (or of ``managers``)."""
        for manager in managers or (*self.prefill, *self.decode):
            core = manager.core
            outputs, meta = manager.process(core.step() if core.has_work() else [])
            for out in outputs:
                self.outputs.setdefault(out.rid, []).append(out)
            self.meta.update(meta)

    def run(self, until, what: str, timeout: float = RUN_S) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, f"timed out waiting for {what}; outputs: {self.outputs}"
            self.step()
            time.sleep(0.0005)

    def run_until_transferring(self, timeout: float = RUN_S, settle_s: float = 0.25) -> None:
        """Until decode rank 0 holds a room mid-transfer: after each prefill step of a paired room only decode
        runs until it sees the pages sent so far (at most ``settle_s``), so a slow receive thread cannot let the whole
        prompt through between two looks (which a loaded machine did)."""
        deadline = time.monotonic() + timeout

        def transferring() -> bool:
            return self.decode[0].metrics().rooms["transferring"] == 1

        while not transferring():
            assert time.monotonic() < deadline, f"timed out waiting for the first KV pages; outputs: {self.outputs}"
            self.step()
            if not self.prefill[0].metrics().rooms["transferring"]:
                continue  # not paired yet: no page on the way
            settle = time.monotonic() + settle_s
            while not transferring() and time.monotonic() < settle:
                self.step(self.decode)
                time.sleep(0.0005)

    def finished(self, rid: str) -> StepOutput | None:
        outs = self.outputs.get(rid, [])
        return outs[-1] if outs and outs[-1].finished else None

    def tokens(self, rid: str) -> list[int]:
        return [t for out in self.outputs.get(rid, []) for t in out.new_token_ids]

    def run_until_finished(self, *rids: str) -> None:
        self.run(lambda: all(self.finished(rid) for rid in rids), f"{rids} to finish")

    def run_until_pools_empty(self) -> None:
        managers = (*self.prefill, *self.decode)
        # also until no core holds work or queued outputs (an abort's), so none surfaces in the next test
        self.run(lambda: all(m.core.kv_pool.num_used == 0 and not m.core.has_work() for m in managers),
                 "every KV page to be freed and every output delivered")
        for manager in managers:
            manager.core.kv_pool.check_integrity(expect_used=0)

    def close(self) -> None:
        for manager in (*self.prefill, *self.decode):
            manager.close()
        self.bootstrap.stop()


@pytest.fixture
def cluster_factory():
    made = []

    def make(*args, **kwargs) -> Cluster:
        cluster = Cluster(*args, **kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2000) for _ in range(n)]


def req(rid: str, ids: list[int], params=GREEDY) -> Req:
    return Req(rid, list(ids), SamplingParams.from_dict(params))


def abort_message(out: StepOutput) -> str:
    assert out.finish_reason["type"] == "abort", out.finish_reason
    return out.finish_reason["message"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_rank_pair_matches_colocated_in_either_order(engines, backend, cluster_factory):
    """Prefill DP 2, decode DP 3: every (decode i, prefill j) pair, prefill rank from room % 2 or
    explicit, decode first or prefill first; greedy output equals the colocated engine's."""
    c = cluster_factory(backend, engines["prefill"], engines["decode"])
    rng = random.Random(11)
    cases = []
    for i in range(3):
        for j in range(2):
            for explicit in (False, True):
                room = rng.randrange(2**63)
                if not explicit:
                    room += (j - room % 2)  # follow_bootstrap_room: this room lands on prefill rank j
                ids = prompt(len(cases), rng.randint(3, 45))
                cases.append((f"{i}{j}{int(explicit)}", i, j, explicit, room, ids))

    def add(side, name, i, j, explicit, room, ids):
        if side == "d":
            c.decode[i].add(req("d" + name, ids), room, "127.0.0.1", c.bootstrap.port,
                            prefill_rank=j if explicit else None)
        else:
            c.prefill[j].add(req("p" + name, ids), room)

    for n, case in enumerate(cases):
        for side in ("d", "p") if n % 2 == 0 else ("p", "d"):  # decode first, then prefill first
            add(side, *case)
            for _ in range(3):
                c.step()
    c.run_until_finished(*(f"{side}{case[0]}" for case in cases for side in "pd"))
    for name, i, j, _, room, ids in cases:
        expected = engines["ref"].generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
        assert c.tokens("d" + name) == expected, name
        assert c.tokens("p" + name) == expected[:1]
        meta = c.meta["d" + name]
        assert (meta.prefill_dp_rank, meta.decode_dp_rank, meta.bootstrap_room) == (j, i, room)
        pages = -(-len(ids) // 4) - meta.decode_cached_tokens // 4  # pages decode's cache held are not sent
        assert meta.kv_transfer_bytes == pages * engines["ref"].core.kv_pool.page_bytes() * 4
        assert meta.kv_wait_ms >= meta.kv_transfer_ms >= 0
        assert c.meta["p" + name].kv_transfer_bytes == meta.kv_transfer_bytes
    c.run_until_pools_empty()
    assert sum(p.metrics().transfers for p in c.prefill) == len(cases)
    assert all(not d.metrics().failures for d in c.decode)


def test_rooms_registered_by_load_are_looked_up(engines, cluster_factory):
    """Prefill balancing by load: decode long-polls the room's registration (decode arrives first)."""
    c = cluster_factory("tcp", engines["prefill"], engines["decode"][:1], lb="round_robin")
    ids = prompt(99, 30)
    room = 2  # room % 2 == 0, but the prefill server puts it on rank 1
    c.decode[0].add(req("d", ids), room, "127.0.0.1", c.bootstrap.port)
    for _ in range(20):
        c.step()
    assert c.decode[0].metrics().rooms["resolving"] == 1
    c.prefill[1].add(req("p", ids), room)
    c.run_until_finished("d", "p")
    expected = engines["ref"].generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
    assert c.tokens("d") == expected and c.meta["d"].prefill_dp_rank == 1
    c.run_until_pools_empty()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_abort_reaches_decode(engines, backend, cluster_factory):
    c = cluster_factory(backend, engines["prefill"][:1], engines["decode"][:1])
    # 15 chunks of 8: pages are in flight when the abort comes (a prompt of its own per backend: the engines are
    # shared, and a prompt an earlier backend's run left in prefill's cache would be done before the abort)
    ids = prompt(5 + 100 * BACKENDS.index(backend), 120)
    c.decode[0].add(req("d", ids), 77, "127.0.0.1", c.bootstrap.port)
    c.prefill[0].add(req("p", ids), 77)
    c.run_until_transferring()
    assert c.prefill[0].abort("p", "the prefill client went away")
    c.run_until_finished("d", "p")
    assert abort_message(c.finished("p")) == "the prefill client went away"
    message = abort_message(c.finished("d"))
    assert message.startswith("prefill failed:") and "the prefill client went away" in message
    assert c.meta["d"].bootstrap_room == 77
    c.run_until_pools_empty()
    assert c.decode[0].metrics().failures == {"prefill_aborted": 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_abort_reaches_prefill(engines, backend, cluster_factory):
    c = cluster_factory(backend, engines["prefill"][:1], engines["decode"][:1])
    ids = prompt(6 + 100 * BACKENDS.index(backend), 120)  # its own per backend, as above
    c.prefill[0].add(req("p", ids), 78)
    c.decode[0].add(req("d", ids), 78, "127.0.0.1", c.bootstrap.port)
    c.run_until_transferring()
    assert c.decode[0].abort("d", "the decode client disconnected")
    c.run_until_finished("d", "p")
    assert abort_message(c.finished("d")) == "the decode client disconnected"
    message = abort_message(c.finished("p"))
    assert "decode rank 0 aborted room 78" in message and "the decode client disconnected" in message
    c.run_until_pools_empty()
    assert c.decode[0].metrics().rooms["quarantined"] == 0


def test_abort_before_the_other_side_arrives(engines, cluster_factory):
    """A decode aborted before its prefill request exists: that request then fails at once."""
    c = cluster_factory("tcp", engines["prefill"][:1], engines["decode"][:1])
    ids = prompt(7, 20)
    c.decode[0].add(req("d", ids), 79, "127.0.0.1", c.bootstrap.port)
    c.run(lambda: c.decode[0].metrics().rooms["waiting_for_prefill"] == 1, "the KV request to be sent")
    c.decode[0].abort("d", "client gone")
    c.run(lambda: 79 in c.prefill[0].tombstones, "prefill to learn of the abort")
    c.prefill[0].add(req("p", ids), 79)
    c.run_until_finished("d", "p")
    assert "client gone" in abort_message(c.finished("p"))
    c.run_until_pools_empty()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pages_long_after_the_accepted_keep_their_connection(engines, backend, cluster_factory):
    """Decode's KV request is accepted at once and the prefill request comes twice the idle bound
    later: the connection that carried the ``Accepted`` carries the room, so neither end drops it
    as idle and the room completes (it failed with "lost the KV transfer connection" before)."""
    c = cluster_factory(backend, engines["prefill"][:1], engines["decode"][:1], idle_timeout=1.0)
    ids = prompt(31, 30)
    c.decode[0].add(req("d", ids), 93, "127.0.0.1", c.bootstrap.port)
    c.run(lambda: 93 in c.prefill[0].early, "the KV request to arrive")
    c.run(lambda: c.decode[0].rooms[93].acked_at is not None, "the Accepted")
    until = time.monotonic() + 2.0
    c.run(lambda: time.monotonic() > until, "twice the idle bound")
    c.prefill[0].add(req("p", ids), 93)
    c.run_until_finished("d", "p")
    expected = engines["ref"].generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
    assert c.tokens("d") == expected, c.finished("d").finish_reason
    assert not c.decode[0].metrics().failures and not c.prefill[0].metrics().failures
    c.run_until_pools_empty()


def test_no_new_tokens_with_samples_finishes_every_sample(engines, cluster_factory):
    """``max_new_tokens`` 0 with ``n`` > 1: prefill produces no token, and decode ends the request
    and every one of its samples (``rid.s1`` ...) with length 0, so none waits and no page leaks."""
    c = cluster_factory("tcp", engines["prefill"][:1], engines["decode"][:1])
    ids = prompt(32, 21)
    params = {"max_new_tokens": 0, "n": 3, "temperature": 1.0}
    c.decode[0].add(req("d", ids, params), 94, "127.0.0.1", c.bootstrap.port)
    c.prefill[0].add(req("p", ids, params), 94)
    c.run_until_finished("p", "d", "d.s1", "d.s2")
    for rid in ("d", "d.s1", "d.s2"):
        out = c.finished(rid)
        assert out.finish_reason == {"type": "length", "length": 0} and c.tokens(rid) == [], (rid, out)
        assert out.prompt_tokens == len(ids)
    assert c.decode[0].core.scheduler.num_requests() == 0
    c.run_until_pools_empty()


@pytest.mark.parametrize("max_new_tokens", [4, 0])
def test_decode_answers_with_prefills_input_logprobs_for_every_sample(engines, cluster_factory, max_new_tokens):
    """The prompt's input logprobs travel in ``Aux``: decode's answer carries them whole, for the
    request and each of its samples, so a router relays decode's answer without reading prefill's."""
    c = cluster_factory("tcp", engines["prefill"][:1], engines["decode"][:1])
    ids = prompt(33, 18)
    params = {"max_new_tokens": max_new_tokens, "n": 2, "temperature": 1.0, "seed": 4}

    def logprob_req(rid: str) -> Req:
        return Req(rid, list(ids), SamplingParams.from_dict(params), return_logprob=True, logprob_start_len=0,
                   top_logprobs_num=2)

    c.decode[0].add(logprob_req("d"), 95, "127.0.0.1", c.bootstrap.port)
    c.prefill[0].add(logprob_req("p"), 95)
    c.run_until_finished("p", "d", "d.s1")

    def input_logprobs(rid: str):
        found = [out.input_logprobs for out in c.outputs[rid] if out.input_logprobs is not None]
        assert len(found) == 1, (rid, c.outputs[rid])
        return found[0]

    expected = input_logprobs("p")
    assert len(expected.ids) == len(ids) and expected.top is not None
    assert input_logprobs("d") == expected and input_logprobs("d.s1") == expected
    c.run_until_pools_empty()


def test_rejected_room_fails_decode_in_either_order(engines, cluster_factory):
    """The prefill front refused a room's request: decode's KV request for it fails at once, whether
    it came before or after; an active room is left alone, and the tombstone expires."""
    c = cluster_factory("tcp", engines["prefill"][:1], engines["decode"][:1], waiting_timeout=1.0)
    prefill, decode = c.prefill[0], c.decode[0]
    ids = prompt(12, 20)
    decode.add(req("early", ids), 90, "127.0.0.1", c.bootstrap.port)
    c.run(lambda: decode.metrics().rooms["waiting_for_prefill"] == 1, "the KV request to be sent")
    c.run(lambda: 90 in prefill.early, "the KV request to arrive")
    prefill.reject_room(90, "refused: bad temperature")
    prefill.reject_room(91, "refused: unknown key")
    decode.add(req("late", ids), 91, "127.0.0.1", c.bootstrap.port)
    prefill.add(req("p", ids), 92)
    prefill.reject_room(92, "a duplicate of an active room")
    decode.add(req("d", ids), 92, "127.0.0.1", c.bootstrap.port)
    c.run_until_finished("early", "late", "d", "p")
    assert abort_message(c.finished("early")) == "prefill failed: refused: bad temperature"
    assert abort_message(c.finished("late")) == "prefill failed: refused: unknown key"
    assert c.finished("d").finish_reason["type"] == "length"
    assert prefill.metrics().failures == {"prefill_rejected": 2}
    c.run(lambda: not prefill.tombstones, "the tombstones to expire")
    c.run_until_pools_empty()


def test_waiting_timeouts_free_pages_on_both_sides(engines, cluster_factory):
    """Each half alone fails at the waiting timeout, named; decode frees the pages it reserved, and
    the lonely prefill request never computed anything (admission waits for decode's KV request)."""
    c = cluster_factory("tcp", engines["prefill"][:1], engines["decode"][:1], waiting_timeout=0.6)
    lonely_prefill, lonely_decode = prompt(8, 30), prompt(9, 30)
    c.prefill[0].add(req("p", lonely_prefill), 80)
    c.decode[0].add(req("d", lonely_decode), 81, "127.0.0.1", c.bootstrap.port)
    start = time.monotonic()
    c.run(lambda: c.decode[0].core.kv_pool.num_used > 0, "decode's pages")
    computed = c.prefill[0].core.scheduler.prefill_tokens_computed
    assert c.prefill[0].num_gated() == 1 and c.prefill[0].metrics().rooms["waiting_for_decode"] == 1
    c.run_until_finished("p", "d")
    assert c.prefill[0].core.scheduler.prefill_tokens_computed == computed  # the gate held it outside the engine
    assert time.monotonic() - start < 5
    message = abort_message(c.finished("p"))
    assert "no decode server sent a KV request for bootstrap_room 80" in message and "waiting-timeout" in message
    message = abort_message(c.finished("d"))
    assert "prefill rank 0 received no prefill request for bootstrap_room 81" in message
    c.run_until_pools_empty()
    assert c.prefill[0].metrics().failures == {"waiting_timeout": 2}


@pytest.mark.parametrize("prefill_first", [False, True])
def test_layout_mismatch_is_refused_at_the_handshake(engines, cluster_factory, prefill_first):
    c = cluster_factory("tcp", engines["prefill"][:1], [engines["odd"]])
    ids = prompt(10, 25)
    if prefill_first:
        c.prefill[0].add(req("p", ids), 82)
    c.decode[0].add(req("d", ids), 82, "127.0.0.1", c.bootstrap.port)
    if not prefill_first:
        c.run(lambda: c.finished("d"), "decode to refuse")
        c.prefill[0].add(req("p", ids), 82)
    c.run_until_finished("d", "p")
    message = abort_message(c.finished("d"))
    assert "KV layout mismatch" in message and "page_size differs: 8 vs 4" in message
    assert "room 82" in message and "decode rank 0" in message and "prefill rank 0" in message
    assert "decode rank 0 aborted room 82" in abort_message(c.finished("p"))
    c.run_until_pools_empty()


def test_prefill_server_down_fails_within_the_bootstrap_timeout(engines, cluster_factory):
    c = cluster_factory("tcp", [], engines["decode"][:1], bootstrap_timeout=0.8)
    dead = socket.socket()  # bound, not listening: connections are refused
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    start = time.monotonic()
    c.decode[0].add(req("d", prompt(11, 20)), 83, "127.0.0.1", port)
    c.run_until_finished("d")
    dead.close()
    assert time.monotonic() - start < 0.8 + 2
    message = abort_message(c.finished("d"))
    assert f"bootstrap service at 127.0.0.1:{port}" in message and "room 83" in message
    c.run_until_pools_empty()


def test_dead_prefill_rank_fails_the_handshake(engines, cluster_factory):
    """The bootstrap service answers, but the prefill rank behind it is gone."""
    c = cluster_factory("tcp", [], engines["decode"][:1], bootstrap_timeout=0.8)
    layout = engines["decode"][0].kv_pool.layout
    c.bootstrap.register_rank(RankInfo(0, "127.0.0.1", 1, layout, c.decode[0].model, "tcp"))
    c.decode[0].add(req("d", prompt(12, 20)), 84, "127.0.0.1", c.bootstrap.port)
    c.run_until_finished("d")
    message = abort_message(c.finished("d"))
    # the control connection's monitor reports the refused connection before the handshake bound
    assert "lost prefill rank 0" in message and "nothing accepts connections there" in message
    assert "tcp://127.0.0.1:1" in message
    c.run_until_pools_empty()


def test_active_room_conflicts(engines, cluster_factory):
    c = cluster_factory("tcp", engines["prefill"][:1], engines["decode"][:2])
    ids = prompt(13, 20)
    c.decode[0].add(req("d", ids), 85, "127.0.0.1", c.bootstrap.port)
    with pytest.raises(RoomConflictError) as err:
        c.decode[0].add(req("d2", ids), 85, "127.0.0.1", c.bootstrap.port)
    assert err.value.status == 409
    c.run(lambda: 85 in c.prefill[0].early, "decode rank 0's KV request")
    c.decode[1].add(req("d3", ids), 85, "127.0.0.1", c.bootstrap.port)  # a second decode for the same room
    c.run_until_finished("d3")
    assert "already paired with decode rank 0" in abort_message(c.finished("d3"))
    c.prefill[0].add(req("p", ids), 85)
    with pytest.raises(RoomConflictError):
        c.prefill[0].add(req("p2", ids), 85)
    c.run_until_finished("p", "d")
    assert c.tokens("d") == engines["ref"].generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
    c.run_until_pools_empty()


def test_different_prompts_in_one_room_are_refused(engines, cluster_factory):
    c = cluster_factory("tcp", engines["prefill"][:1], engines["decode"][:1])
    c.decode[0].add(req("d", prompt(14, 21)), 86, "127.0.0.1", c.bootstrap.port)
    c.prefill[0].add(req("p", prompt(15, 21)), 86)
    c.run_until_finished("d", "p")
    assert "different prompts" in abort_message(c.finished("d"))
    assert "different prompts" in abort_message(c.finished("p"))
    c.run_until_pools_empty()


def test_retracted_request_keeps_its_pages_until_their_sends_are_done(engines, cluster_factory):
    """Issue 9 case 3: a P/D request whose pages are queued for transfer is retracted (KV pressure
    on a prefill server that also runs room-less requests). Its queued pages stay referenced by
    their sends: another request cannot get them (here: takes every free page and scribbles on
    it) until the sends read them, and decode still receives exactly the colocated output."""
    c = cluster_factory("tcp", engines["prefill"][:1], engines["decode"][:1])
    prefill = c.prefill[0]
    pool = prefill.core.kv_pool
    gate = threading.Event()
    write_pages = prefill.sender.write_pages

    def gated(dest, job):
        assert gate.wait(RUN_S), "the test never opened the gate"
        return write_pages(dest, job)

    prefill.sender.write_pages = gated
    ids = prompt(21, 120)  # 15 chunks of 8, 30 pages of 4
    c.decode[0].add(req("d", ids), 86, "127.0.0.1", c.bootstrap.port)
    c.prefill[0].add(req("p", ids), 86)
    c.run(lambda: prefill.rooms[86].pages_sent >= 4, "pages to be queued for transfer")
    p_req = prefill.rooms[86].req
    queued = p_req.pages[: prefill.rooms[86].pages_sent]
    prefill.core.scheduler._retract(p_req)
    assert all(pool.refcount(page) == 1 + pool.is_cached(page) for page in queued)  # the sends' (and cache's)
    others = pool.alloc(pool.num_free)
    assert not set(others) & set(queued)
    for layer in pool.layers:
        layer[others] = 1e4  # another request's KV (finite: masked slots of a partial page weigh 0 only then)
    pool.unref(others)
    prefill.core.add_request(req("local", prompt(22, 40)))
    gate.set()
    c.run_until_finished("d", "p", "local")
    expected = engines["ref"].generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
    assert p_req.num_retractions == 1
    assert c.tokens("d") == expected
    assert c.tokens("local") == engines["ref"].generate(input_ids=prompt(22, 40), sampling_params=GREEDY)["output_ids"]
    c.run_until_pools_empty()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_notices_a_dead_decode_before_any_send_fails(engines, backend, cluster_factory, monkeypatch):
    """A prefill room bound to a decode (its KV request came) whose KV is computed and queued behind a
    slow send: the decode process dies (its receiver's sockets close). Prefill's sender notices the
    ended connection at once, fails the room naming both ranks and the cause, and frees its KV,
    instead of holding it until the stalled send fails or times out."""
    monkeypatch.setattr(stream_module, "TEST_SEND_DELAY_S", 60.0)  # every page send waits (unless cancelled)
    c = cluster_factory(backend, engines["prefill"][:1], engines["decode"][:1])
    prefill, decode = c.prefill[0], c.decode[0]
    ids = prompt(31, 40)
    decode.add(req("d", ids), 95, "127.0.0.1", c.bootstrap.port)
    prefill.add(req("p", ids), 95)
    c.run(lambda: 95 in prefill.rooms and prefill.rooms[95].finishing and decode.rooms[95].acked_at is not None,
          "the KV to be computed and queued, and the KV request acknowledged")
    assert prefill.core.kv_pool.num_used > 0
    decode.receiver.close()  # what the decode process's death does to its sockets
    died = time.monotonic()
    c.run(lambda: c.finished("p") is not None, "prefill to notice the dead decode", timeout=3.0)
    assert time.monotonic() - died < 2.0
    message = abort_message(c.finished("p"))
    assert "room 95 (prefill rank 0, decode rank 0): lost decode rank 0's KV receiver" in message, message
    assert "closed the connection" in message
    assert prefill.metrics().failures == {"peer_lost": 1}
    c.run(lambda: prefill.core.kv_pool.num_used == 0, "prefill's KV to be freed", timeout=3.0)
    decode.abort("d", "test over")
    c.run_until_finished("d")  # its abort output must not leak into the next test on these engines
    c.run_until_pools_empty()


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_reuses_its_cached_prefix_and_receives_only_suffix_pages(engines, backend, cluster_factory):
    """A two-turn conversation on one decode rank: turn 2 asks prefill only for the pages after
    what turn 1 left in decode's prefix cache; prefill checks the page hash; output equals a
    cache-less engine's."""
    c = cluster_factory(backend, engines["prefill"][:1], engines["decode"][:1])
    page_bytes = engines["ref"].core.kv_pool.page_bytes() * len(engines["ref"].core.kv_pool.layers)
    plain = Engine(None, page_size=4, max_total_tokens=512, torch_threads=1, disable_radix_cache=True)
    rng = random.Random(BACKENDS.index(backend))

    def turn(name: str, ids: list[int]) -> list[int]:
        room = rng.randrange(2**63)
        c.decode[0].add(req("d" + name, ids), room, "127.0.0.1", c.bootstrap.port, prefill_rank=0)
        c.prefill[0].add(req("p" + name, ids), room)
        c.run_until_finished("d" + name, "p" + name)
        assert c.tokens("d" + name) == plain.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
        return c.tokens("d" + name)

    first = prompt(500 + BACKENDS.index(backend), 30)
    answer = turn("1", first)
    second = first + answer + prompt(7, 9)  # 47 tokens; decode's cache holds 36 (9 whole pages)
    turn("2", second)
    meta = c.meta["d2"]
    assert meta.decode_cached_tokens == 36
    assert meta.kv_transfer_bytes == (12 - 9) * page_bytes == c.meta["p2"].kv_transfer_bytes
    assert c.finished("d2").cached_tokens == 28  # prefill reused turn 1's prompt pages
    c.run_until_pools_empty()
    for core in (*engines["prefill"][:1], *engines["decode"][:1]):
        core.prefix_cache.check_integrity()


def test_prefill_refuses_a_decode_prefix_whose_page_hash_differs(engines, cluster_factory, monkeypatch):
    """Decode claims a cached prefix with a hash that does not match the prompt (a lying or buggy
    peer): prefill refuses the room naming the hash, nothing is decoded from unverified KV, and no
    page stays referenced."""
    import pdserve.disagg.decode as decode_module

    c = cluster_factory("tcp", engines["prefill"][1:2], engines["decode"][2:3])
    ids = prompt(900, 26)
    c.decode[0].add(req("d1", ids), 5, "127.0.0.1", c.bootstrap.port, prefill_rank=0)
    c.prefill[0].add(req("p1", ids), 5)
    c.run_until_finished("d1", "p1")
    real = decode_module.page_hashes
    monkeypatch.setattr(decode_module, "page_hashes", lambda *a, **k: [h ^ 1 for h in real(*a, **k)])
    second = ids + c.tokens("d1") + prompt(901, 5)
    c.decode[0].add(req("d2", second), 6, "127.0.0.1", c.bootstrap.port, prefill_rank=0)
    c.prefill[0].add(req("p2", second), 6)
    c.run_until_finished("d2", "p2")
    assert "page hash" in abort_message(c.finished("d2"))
    assert "page hash" in abort_message(c.finished("p2"))
    c.run_until_pools_empty()


def test_a_decode_abort_drained_with_the_prefill_finish_is_not_reported_as_success(engines, cluster_factory):
    """The race three full-suite runs hit: the step that finishes a room's prompt and decode's
    Abort of that room reach the prefill manager in the same round. The step's success output must
    not go to the client (its half failed); the abort naming decode's reason does."""
    c = cluster_factory("tcp", engines["prefill"][:1], engines["decode"][:1])
    manager = c.prefill[0]
    ids = prompt(12, 25)
    c.decode[0].add(req("d", ids), 91, "127.0.0.1", c.bootstrap.port)
    manager.add(req("p", ids), 91)
    c.run(lambda: manager.rooms[91].admitted, "decode's KV request to admit the prefill request")
    finished: list[StepOutput] = []
    deadline = time.monotonic() + RUN_S
    while not finished:  # step the engine alone: no network event is applied yet
        assert time.monotonic() < deadline, "the prefill never finished its prompt"
        finished = [out for out in manager.core.step() if out.rid == "p" and out.finished]
    manager.inbox.put(m.Abort(91, "the client went away", decode_rank=0))
    delivered, _ = manager.process(finished)
    assert not [out for out in delivered if out.rid == "p" and out.finish_reason["type"] != "abort"], delivered
    for out in delivered:
        c.outputs.setdefault(out.rid, []).append(out)
    c.run_until_finished("p")
    assert "decode rank 0 aborted room 91: the client went away" in abort_message(c.finished("p"))
    assert [out.finish_reason["type"] for out in c.outputs["p"] if out.finished] == ["abort"]
    c.run_until_finished("d")  # prefill's failed Status ends decode's half
    assert "decode rank 0 aborted room 91" in abort_message(c.finished("d"))
    c.run_until_pools_empty()


@pytest.mark.parametrize("prefill_first", [True, False])
def test_prefill_computes_nothing_until_decode_has_reserved_the_pages(engines, cluster_factory, prefill_first):
    """Decode-gated admission: decode has no free pages for the prompt (its pool is taken), so it
    sends no KV request; the prefill request meanwhile waits outside the engine — no pages, nothing
    computed — whichever half came first. Once decode's pages free up, the KV request goes out, the
    prefill request enters the engine, and the room completes with the colocated output."""
    c = cluster_factory("tcp", engines["prefill"][:1], engines["decode"][:1])
    prefill, decode = c.prefill[0], c.decode[0]
    dpool = decode.core.kv_pool
    assert decode.core.flush_cache() is None  # no cached page to evict: the pool really is full
    taken = dpool.alloc(dpool.num_free - 2)  # what decode's other requests would hold
    ids = prompt(41 + prefill_first, 40)  # 10 pages of 4
    halves = [lambda: decode.add(req("d", ids), 96, "127.0.0.1", c.bootstrap.port),
              lambda: prefill.add(req("p", ids), 96)]
    for add in halves if not prefill_first else halves[::-1]:
        add()
        c.step()
    computed = prefill.core.scheduler.prefill_tokens_computed
    until = time.monotonic() + 0.5
    c.run(lambda: time.monotonic() > until, "half a second of decode pressure")
    assert decode.metrics().rooms["waiting_for_pages"] == 1 and not prefill.rooms[96].admitted
    assert prefill.core.kv_pool.num_used == 0 and prefill.core.scheduler.prefill_tokens_computed == computed
    assert prefill.metrics().rooms["waiting_for_decode"] == 1
    dpool.unref(taken)
    c.run_until_finished("d", "p")
    assert c.tokens("d") == engines["ref"].generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
    c.run_until_pools_empty()


# ---------------------------------------------------------------------- vLLM's P/D protocol: detached rooms


def test_detached_room_answers_once_computed_then_ships_to_a_later_decode(engines, cluster_factory):
    """vLLM's two-step flow: the prefill half's output comes out as soon as the prompt is computed,
    before any decode exists; its KV stays held, and a decode that comes later gets it (engine id's
    instance checked at the bootstrap service) and matches the colocated output."""
    c = cluster_factory("tcp", engines["prefill"][:1], engines["decode"][:1], lb="round_robin")
    ids = prompt(40, 30)
    c.bootstrap.register_room(90, 0)  # the front does this when it dispatches the prefill half
    c.prefill[0].add(req("p", ids), 90, detached=True)
    c.run_until_finished("p")
    assert c.finished("p").finish_reason["type"] != "abort" and len(c.tokens("p")) == 1
    assert c.prefill[0].core.kv_pool.num_used > 0  # held for the decode still to come
    c.decode[0].add(req("d", ids), 90, "127.0.0.1", c.bootstrap.port, prefill_rank=0,
                    prefill_instance=c.bootstrap.instance_id, room_known=True)
    c.run_until_finished("d")
    expected = engines["ref"].generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
    assert c.tokens("d") == expected
    assert c.meta["d"].kv_transfer_bytes > 0
    assert len(c.outputs["p"]) == 1  # the shipping released nothing more to the prefill client
    c.run_until_pools_empty()


def test_detached_room_failing_after_its_answer_frees_its_kv_and_tells_nobody(engines, cluster_factory):
    """A detached room whose decode never comes: freed at the waiting timeout; its abort output is
    dropped (the client already had its answer)."""
    c = cluster_factory("tcp", engines["prefill"][:1], engines["decode"][:1], waiting_timeout=0.6)
    c.prefill[0].add(req("p", prompt(41, 20)), 91, detached=True)
    c.run_until_finished("p")
    c.run_until_pools_empty()
    assert [o.finish_reason["type"] for o in c.outputs["p"] if o.finished] == ["length"]
    assert c.prefill[0].metrics().failures == {"waiting_timeout": 1}
    assert not c.prefill[0]._answered_aborts


@pytest.mark.parametrize("lie", ["instance", "rank", "room"])
def test_lying_engine_id_fails_decode_400_and_spares_the_room(engines, cluster_factory, lie):
    """A decode naming another instance, a rank the room is not on, or an unregistered room fails 400
    naming the field, tells the prefill side nothing, and the room then serves its honest decode."""
    c = cluster_factory("tcp", engines["prefill"][:2], engines["decode"][:1], lb="round_robin")
    ids = prompt(42, 24)
    c.bootstrap.register_room(92, 1)
    c.prefill[1].add(req("p", ids), 92, detached=True)
    c.run_until_finished("p")
    instance, rank, room = c.bootstrap.instance_id, 1, 92
    if lie == "instance":
        instance = "0123456789abcdef"
    elif lie == "rank":
        rank = 0
    else:
        room = 93  # registered nowhere
    c.decode[0].add(req("liar", ids), room, "127.0.0.1", c.bootstrap.port, prefill_rank=rank,
                    prefill_instance=instance, room_known=True)
    c.run_until_finished("liar")
    out = c.finished("liar")
    assert out.finish_reason["status_code"] == 400 and out.finish_reason["param"].startswith("kv_transfer_params.")
    c.decode[0].add(req("d", ids), 92, "127.0.0.1", c.bootstrap.port, prefill_rank=1,
                    prefill_instance=c.bootstrap.instance_id, room_known=True)
    c.run_until_finished("d")
    assert c.tokens("d") == engines["ref"].generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
    c.run_until_pools_empty()
    assert c.decode[0].metrics().failures == {"bad_transfer_params": 1}
