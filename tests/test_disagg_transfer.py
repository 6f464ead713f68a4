"""KV transfer backends: page bytes arrive intact, rooms guard the destination pool, failures are reported."""

from __future__ import annotations

import gc
import glob
import json
import os
import random
import subprocess
import sys
import threading
import time

import msgspec
import pytest
import torch

from pdserve.disagg import messages as m
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.transfer import (
    BACKENDS,
    DevicePoolError,
    PeerLost,
    SendResult,
    create_receiver,
    create_sender,
)
from pdserve.disagg.transfer.staging import IDLE_BUFFERS, PageStaging, needs_staging
from pdserve.disagg.transfer.stream import paired_runs, runs
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_pool import SHM_TRAILER_BYTES, KVPool
from pdserve.server.config import ServerConfig

HOST = "127.0.0.1"
WAIT_S = 10.0

SENDER_SCRIPT = r"""
import json, sys, time, torch
from pdserve.disagg import messages as m
from pdserve.disagg.transfer import create_sender
from tests.test_disagg_transfer import filled_pool
spec = json.loads(sys.argv[1])
pool = filled_pool(spec["seed"], spec["dtype"])
results = []
sender = create_sender(spec["backend"], pool, results.append, 10.0)
assert (getattr(sender, "staging", None) is not None) == spec["staged"]
dst = m.msgspec.convert(spec["receiver"], m.ReceiverInfo)
for room, src, dst_pages, finish in spec["jobs"]:
    sender.send_message(dst, m.Accepted(room, 0))
    sender.send_pages(dst, room, src, dst_pages)
    if finish:
        sender.send_message(dst, m.Status(room, True))
deadline = time.monotonic() + 10
while len(results) < sum(3 if job[3] else 2 for job in spec["jobs"]) and time.monotonic() < deadline:
    time.sleep(0.01)
assert all(r.error is None for r in results), results
sender.close()
"""

SHAPE = dict(num_pages=37, page_size=5, num_layers=3, num_kv_heads=2, head_dim=6)
# Half a staging buffer (float32) holds 4 page slots (one page of one layer each): a job of 2-9 pages of 3
# layers crosses 2-7 pieces, most of them spanning two layers.
SMALL_STAGING = 8 * SHAPE["page_size"] * SHAPE["num_kv_heads"] * SHAPE["head_dim"] * 2 * 4


def filled_pool(seed: int, dtype: str, num_pages: int = SHAPE["num_pages"], shared: bool = False) -> KVPool:
    """A pool whose every byte is a deterministic function of ``seed`` (so another process can rebuild it)."""
    shape = {**SHAPE, "num_pages": num_pages}
    pool = KVPool(dtype=getattr(torch, dtype), device="cpu", shared_memory=shared, **shape)
    gen = torch.Generator().manual_seed(seed)
    for layer in pool.layers:
        layer.copy_(torch.randn(layer.shape, generator=gen).to(layer.dtype))
    return pool


class Collector:
    """Receiver events, with a wait for a condition on them."""

    def __init__(self) -> None:
        self.events: list = []
        self._cond = threading.Condition()

    def __call__(self, event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, predicate, what: str) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.events), WAIT_S), f"timed out waiting for {what}: {self.events}"

    def statuses(self) -> dict[int, m.Status]:
        return {e.room: e for e in self.events if isinstance(e, m.Status)}


@pytest.fixture
def closing():
    """Close whatever the test registers, even when it fails."""
    things = []
    yield things.append
    for thing in reversed(things):
        thing.close()


def assert_pages_equal(src: KVPool, dst: KVPool, src_pages: list[int], dst_pages: list[int]) -> None:
    for layer in range(len(src.layers)):
        for s, d in zip(src_pages, dst_pages):
            assert torch.equal(src.page_view(layer, s), dst.page_view(layer, d)), f"layer {layer} page {s}->{d}"


def test_run_helpers():
    assert runs([3, 4, 5, 9, 2, 3]) == [(3, 3), (9, 1), (2, 2)]
    assert paired_runs([1, 2, 3, 7], [5, 6, 9, 10]) == [(1, 5, 2), (3, 9, 1), (7, 10, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pages_arrive_intact(backend, dtype, closing):
    """Random page lists in several jobs and rooms; untouched destination pages stay zero."""
    check_pages_arrive_intact(backend, dtype, closing, {}, {})


@pytest.mark.parametrize("sender_staged,receiver_staged", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_staged_pages_arrive_intact(sender_staged, receiver_staged, dtype, closing):
    """Host staging (what a GPU pool goes through), forced on CPU pools with a buffer smaller than
    one job: the same bytes land, and a staged side talks to an unstaged one (the wire is unchanged)."""
    staging_bytes = SMALL_STAGING // (1 if dtype == "float32" else 2)  # the same 4 slots per half
    check_pages_arrive_intact("tcp", dtype, closing, {"staging": sender_staged, "staging_bytes": staging_bytes},
                              {"staging": receiver_staged, "staging_bytes": staging_bytes})


def check_pages_arrive_intact(backend: str, dtype: str, closing, sender_opts: dict, receiver_opts: dict) -> None:
    src = filled_pool(1, dtype)
    dst = KVPool(dtype=getattr(torch, dtype), device="cpu", **{**SHAPE, "num_pages": 50})
    events, done = Collector(), []
    receiver = create_receiver(backend, dst, events, HOST, 5.0, **receiver_opts)
    closing(receiver)
    sender = create_sender(backend, src, done.append, 5.0, **sender_opts)
    closing(sender)
    for side, opts in ((sender, sender_opts), (receiver, receiver_opts)):
        if "staging" in opts:
            assert (side.staging is not None) == opts["staging"]
            assert side.staging is None or side.staging.half_slots == 4
    rng = random.Random(7)
    plan = {}
    for room in (11, 12):
        n = rng.randint(5, 17)
        plan[room] = (rng.sample(range(src.num_pages), n), None)
    used = dst.alloc(sum(len(s) for s, _ in plan.values()))  # held as a decode room holds them
    rng.shuffle(used)
    plan[11] = (plan[11][0], used[: len(plan[11][0])])
    plan[12] = (plan[12][0], used[len(plan[11][0]) :])
    info = receiver.info()
    for room, (_, d) in plan.items():
        receiver.open_room(room, d)
        sender.send_message(info, m.Accepted(room, 0))
    for room, (s, d) in plan.items():  # interleave the two rooms' chunks
        cut = len(s) // 2
        sender.send_pages(info, room, s[:cut], d[:cut], tag=room)
    for room, (s, d) in plan.items():
        cut = len(s) // 2
        sender.send_pages(info, room, s[cut:], d[cut:], tag=room)
        sender.send_message(info, m.Status(room, True))
    events.wait_for(lambda ev: len([e for e in ev if isinstance(e, m.Status)]) == 2, "both rooms' status")
    for room, (s, d) in plan.items():
        assert_pages_equal(src, dst, s, d)
        kinds = [type(e).__name__ for e in events.events if getattr(e, "room", None) == room]
        assert kinds == ["Accepted", "Pages", "Pages", "Status"]
    untouched = sorted(set(range(dst.num_pages)) - set(used))
    assert all(not dst.layers[layer][untouched].any() for layer in range(len(dst.layers)))
    page_jobs = [r for r in done if r.kind == "pages"]
    assert all(r.error is None and not r.cancelled for r in done)
    assert sum(r.nbytes for r in page_jobs) == len(used) * len(src.layers) * src.page_bytes()
    assert sorted(r.tag for r in page_jobs) == [11, 11, 12, 12]
    for room in plan:
        assert receiver.close_room(room) is (backend == "tcp")
    dst.unref(used)
    dst.check_integrity(expect_used=0)


@pytest.mark.parametrize("backend", [*BACKENDS, "tcp-staged"])
def test_pages_arrive_from_another_process(backend, closing):
    """A sender in its own process fills the pool; a room it leaves unfinished is reported lost.
    ``tcp-staged``: both sides stage (the sender through the test hook's environment variable)."""
    staged = backend == "tcp-staged"
    backend = backend.removesuffix("-staged")
    dst = KVPool(dtype=torch.float32, device="cpu", **{**SHAPE, "num_pages": 64})
    events = Collector()
    receiver = create_receiver(backend, dst, events, HOST, 5.0, staging=staged or None, staging_bytes=SMALL_STAGING)
    closing(receiver)
    rng = random.Random(3)
    src_pages = rng.sample(range(SHAPE["num_pages"]), 20)
    dst_pages = rng.sample(range(dst.num_pages), 20)
    receiver.open_room(1, dst_pages[:12])
    receiver.open_room(2, dst_pages[12:])
    spec = {
        "seed": 5,
        "dtype": "float32",
        "backend": backend,
        "staged": staged,
        "receiver": msgspec.to_builtins(receiver.info()),
        "jobs": [[1, src_pages[:12], dst_pages[:12], True], [2, src_pages[12:], dst_pages[12:], False]],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
           "PDSERVE_TEST_KV_STAGING": "1" if staged else ""}
    proc = subprocess.run([sys.executable, "-c", SENDER_SCRIPT, json.dumps(spec)], env=env, timeout=60,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    events.wait_for(lambda ev: any(isinstance(e, PeerLost) for e in ev), "the lost room")
    assert events.statuses()[1].ok
    lost = [e for e in events.events if isinstance(e, PeerLost)]
    assert lost[0].rooms == [2]
    assert_pages_equal(filled_pool(5, "float32"), dst, src_pages, dst_pages)


@pytest.mark.parametrize("staged", [False, True])
def test_tcp_closed_room_is_not_written(staged, closing):
    """After close_room, frames for that room are discarded and the pages stay untouched; the
    stream stays in step for the next room's frame (staged or not)."""
    src = filled_pool(2, "float32")
    dst = KVPool(dtype=torch.float32, device="cpu", **SHAPE)
    events, done = Collector(), []
    opts = {"staging": staged, "staging_bytes": SMALL_STAGING}
    receiver = create_receiver("tcp", dst, events, HOST, 5.0, **opts)
    closing(receiver)
    sender = create_sender("tcp", src, done.append, 5.0, **opts)
    closing(sender)
    info = receiver.info()
    receiver.open_room(5, [0, 1, 2])
    assert receiver.close_room(5) is True
    sender.send_pages(info, 5, [3, 4, 5], [0, 1, 2])
    receiver.open_room(6, [7])
    sender.send_pages(info, 6, [8, 9], [7, 8])  # page 8 is not the room's
    sender.send_message(info, m.Status(6, True))
    events.wait_for(lambda ev: len([e for e in ev if isinstance(e, m.Status)]) == 2, "two statuses")
    assert not any(layer.any() for layer in dst.layers)
    bad = [e for e in events.events if isinstance(e, m.Status) and not e.ok]
    assert bad and "outside the room" in bad[0].reason
    receiver.open_room(7, [20, 11, 30, 12])
    sender.send_pages(info, 7, [1, 2, 3, 9], [20, 11, 30, 12])
    sender.send_message(info, m.Status(7, True))
    events.wait_for(lambda ev: 7 in {e.room for e in ev if isinstance(e, m.Status)}, "room 7's status")
    assert events.statuses()[7].ok
    assert_pages_equal(src, dst, [1, 2, 3, 9], [20, 11, 30, 12])
    written = {20, 11, 30, 12}
    assert not any(layer[[p for p in range(dst.num_pages) if p not in written]].any() for layer in dst.layers)


class HeldSender:
    """A sender whose thread waits in its first completion until ``gate`` is set, so later jobs stay queued."""

    def __init__(self, backend: str, closing) -> None:
        self.src = filled_pool(3, "float32")
        self.gate, self.entered = threading.Event(), threading.Event()
        self.done: list[SendResult] = []
        self.sender = create_sender(backend, self.src, self._on_done, 2.0)
        closing(self.sender)

    def _on_done(self, result: SendResult) -> None:
        self.entered.set()
        self.gate.wait(WAIT_S)
        self.done.append(result)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancel_and_unreachable_receiver(backend, closing):
    """Cancelled jobs are reported as such; a receiver nobody listens on fails the job, not the sender."""
    held = HeldSender(backend, closing)
    gate, entered, done, sender = held.gate, held.entered, held.done, held.sender
    dst = KVPool(dtype=torch.float32, device="cpu", shared_memory=True, **SHAPE)
    receiver = create_receiver(backend, dst, Collector(), HOST, 5.0)
    closing(receiver)
    info = receiver.info()
    receiver.open_room(9, [0, 1])
    sender.send_message(info, m.Accepted(9, 0))
    assert entered.wait(WAIT_S)
    sender.send_pages(info, 9, [1, 2], [0, 1])
    sender.send_pages(info, 9, [1, 2], [0, 1])
    sender.cancel(9)
    sender.send_message(info, m.Status(9, False, "stopped"))
    gate.set()
    deadline = time.monotonic() + WAIT_S
    while len(done) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    # the failed Status takes the control lane, ahead of the cancelled page jobs
    assert [(r.kind, r.cancelled) for r in done] == [("message", False), ("message", False), ("pages", True),
                                                     ("pages", True)]

    with socket_nobody_listens_on() as port:
        dead = m.ReceiverInfo(backend, HOST, port, SHAPE["num_pages"], info.shm)
        sender.send_pages(dead, 10, [1], [1])
        deadline = time.monotonic() + WAIT_S
        while len(done) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert done[4].error and str(port) in done[4].error


@pytest.mark.parametrize("backend", BACKENDS)
def test_control_frames_overtake_queued_bulk_pages(backend, closing):
    """An ``Accepted`` (and a failed ``Status``) queued behind another room's large transfer goes out
    next, not after it: a healthy room is acknowledged while pages stream. A successful ``Status``
    stays behind its room's pages."""
    held = HeldSender(backend, closing)
    src, gate, entered, sender = held.src, held.gate, held.entered, held.sender
    dst = KVPool(dtype=torch.float32, device="cpu", shared_memory=True, **SHAPE)
    events = Collector()
    receiver = create_receiver(backend, dst, events, HOST, 5.0)
    closing(receiver)
    info = receiver.info()
    receiver.open_room(1, list(range(8)))
    receiver.open_room(2, [10])
    receiver.open_room(3, [11])
    sender.send_message(info, m.Accepted(1, 0))
    assert entered.wait(WAIT_S)
    for page in range(8):  # room 1's bulk transfer, queued
        sender.send_pages(info, 1, [page], [page])
    sender.send_message(info, m.Status(1, True))
    sender.send_message(info, m.Accepted(2, 0))
    sender.send_message(info, m.Status(3, False, "refused"))
    gate.set()
    events.wait_for(lambda ev: sum(isinstance(e, m.Status) for e in ev) == 2, "both Status frames")
    order = [(type(e).__name__, e.room) for e in events.events]
    assert order[:3] == [("Accepted", 1), ("Accepted", 2), ("Status", 3)], order
    assert order[3:] == [("Pages", 1)] * 8 + [("Status", 1)], order
    assert_pages_equal(src, dst, list(range(8)), list(range(8)))


class socket_nobody_listens_on:
    """A loopback port that refuses connections (bound, not listening)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


def test_shm_sender_refuses_a_missing_segment(closing):
    done: list[SendResult] = []
    sender = create_sender("shm", filled_pool(4, "float32"), done.append, 2.0)
    closing(sender)
    missing = m.ShmSegment(os.getpid(), 10**6 - 1, "0" * 24)
    sender.send_pages(m.ReceiverInfo("shm", HOST, 1, SHAPE["num_pages"], missing), 1, [0], [0])
    deadline = time.monotonic() + WAIT_S
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "same host" in done[0].error


def test_kv_pool_shared_memory_keeps_contents_and_leaves_nothing_behind():
    pool = filled_pool(9, "float32")
    before = [layer.clone() for layer in pool.layers]
    layers_list = pool.layers
    path = pool.to_shared_memory()
    assert path.startswith(f"/proc/{os.getpid()}/fd/") and os.path.getsize(path) == pool.bytes_total() + SHM_TRAILER_BYTES
    assert "(deleted)" in os.readlink(path) and not glob.glob(f"/dev/shm/pdserve-kv-{os.getpid()}-*")
    assert pool.layers is layers_list and all(torch.equal(a, b) for a, b in zip(before, pool.layers))
    mapped = torch.from_file(path, shared=True, size=pool.bytes_total() // 4, dtype=torch.float32)
    assert torch.equal(mapped[: pool.layers[0].numel()].view_as(pool.layers[0]), before[0])
    mapped.fill_(1.5)  # writes through another mapping are what the pool sees
    assert bool((pool.layers[-1] == 1.5).all())
    pages = pool.alloc(3)
    pool.unref(pages)
    pool.check_integrity(expect_used=0)
    target = os.readlink(path)
    del pool, layers_list, mapped
    gc.collect()
    assert not os.path.exists(path) or os.readlink(path) != target  # the descriptor is closed


def test_shm_refuses_a_device_pool_and_tcp_stages_it():
    pool = KVPool(dtype=torch.float32, device="meta", **SHAPE)
    with pytest.raises(DevicePoolError, match="--disaggregation-transfer-backend tcp"):
        create_sender("shm", pool, lambda r: None, 1.0)
    with pytest.raises(DevicePoolError, match="--disaggregation-transfer-backend tcp"):
        create_receiver("shm", pool, lambda e: None, HOST, 1.0)
    with pytest.raises(ValueError, match="tcp backend option"):
        create_sender("shm", filled_pool(1, "float32"), lambda r: None, 1.0, staging=True)
    assert needs_staging(pool) and not needs_staging(filled_pool(1, "float32")) and needs_staging(pool, False)
    sender = create_sender("tcp", pool, lambda r: None, 1.0)
    try:
        assert sender.staging is not None and sender.src_arrays == []
    finally:
        sender.close()


@pytest.mark.parametrize("device", [None, "cuda", "cuda:1"])
def test_server_refuses_shm_with_a_device_pool_at_startup(device):
    """The shm + GPU mistake fails in config validation, naming the flag to use, before a worker starts."""
    config = ServerConfig(engine=EngineConfig(device=device), disagg=DisaggConfig(mode="decode", transfer_backend="shm"))
    if device is None and not torch.cuda.is_available():
        config.validate()  # the pool will be on the CPU
        return
    with pytest.raises(ValueError, match="--disaggregation-transfer-backend tcp"):
        config.validate()
    ServerConfig(engine=EngineConfig(device=device), disagg=DisaggConfig(mode="decode")).validate()  # tcp is fine


def test_serve_with_shm_on_a_gpu_exits_at_once_naming_the_flag():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pdserve.cli", "serve", "--disaggregation-mode", "prefill",
                           "--disaggregation-transfer-backend", "shm", "--device", "cuda:0", "--port", "0"],
                          env=env, timeout=60, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "pdserve serve: the shm transfer backend" in proc.stderr
    assert "use --disaggregation-transfer-backend tcp" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("num_pages", [1, 3, 4, 7, 13])
@pytest.mark.parametrize("max_pages", [1, 3, 4, 8, 40])
def test_staging_pieces_cover_the_frame_in_wire_order(num_pages, max_pages):
    """Every (layer, page) slot of a frame lands in exactly one piece, in wire order, packed from the
    start of a half buffer that never overflows (at least one page of every layer per half)."""
    pool = filled_pool(1, "float32")
    staging = PageStaging(pool, max_bytes=2 * max_pages * pool.page_bytes())
    assert staging.half_slots == max(max_pages, len(pool.layers))
    order = []
    for piece in staging._pieces(num_pages):
        offset = 0
        for seg in piece:
            assert seg.offset == offset and 0 <= seg.first < seg.end <= num_pages
            offset += seg.end - seg.first
            order += [(seg.layer, i) for i in range(seg.first, seg.end)]
        assert 0 < offset <= staging.half_slots
    assert order == [(layer, i) for layer in range(len(pool.layers)) for i in range(num_pages)]


def test_staged_senders_share_a_receiver_concurrently(closing):
    """Two staged senders write interleaved rooms into one staged receiver at once (one staging buffer
    per frame in flight); every page lands and the receiver keeps at most its idle bound of buffers."""
    dst = KVPool(dtype=torch.float32, device="cpu", **{**SHAPE, "num_pages": 96})
    events = Collector()
    receiver = create_receiver("tcp", dst, events, HOST, 5.0, staging=True, staging_bytes=SMALL_STAGING)
    closing(receiver)
    info, rng, plans = receiver.info(), random.Random(11), []
    free = rng.sample(range(dst.num_pages), dst.num_pages)
    for seed, rooms in ((21, (1, 2)), (22, (3, 4))):
        src = filled_pool(seed, "float32")
        sender = create_sender("tcp", src, lambda r: None, 5.0, staging=True, staging_bytes=SMALL_STAGING)
        closing(sender)
        for room in rooms:
            s, d = rng.sample(range(src.num_pages), 20), [free.pop() for _ in range(20)]
            receiver.open_room(room, d)
            plans.append((sender, src, room, s, d))
    for start in range(0, 20, 5):  # each sender's thread interleaves its two rooms; the two run at once
        for sender, _, room, s, d in plans:
            sender.send_pages(info, room, s[start : start + 5], d[start : start + 5])
    for sender, _, room, _, _ in plans:
        sender.send_message(info, m.Status(room, True))
    events.wait_for(lambda ev: len([e for e in ev if isinstance(e, m.Status)]) == 4, "four statuses")
    assert all(st.ok for st in events.statuses().values())
    for _, src, _, s, d in plans:
        assert_pages_equal(src, dst, s, d)
    assert len(receiver.staging._idle) <= IDLE_BUFFERS


ENGINES = ["nixl", "mooncake"]


@pytest.mark.parametrize("backend", ENGINES)
def test_engine_refuses_a_registration_that_lies(backend, closing):
    """A ReceiverInfo whose layer addresses point past the memory decode registered: the engine refuses
    the write, the job fails naming it, and no Pages frame reaches decode (its room never completes).
    A registration of the wrong shape is refused before the engine is asked."""
    src, dst = filled_pool(1, "float32"), KVPool(dtype=torch.float32, device="cpu", **SHAPE)
    events, done = Collector(), []
    receiver = create_receiver(backend, dst, events, HOST, 5.0)
    closing(receiver)
    info = receiver.info()
    reg = info.registered
    beyond = [(1 << 20) * (k + 1) for k in range(len(reg.layer_addrs))]  # low addresses nothing ever registered
    lying = msgspec.structs.replace(info, registered=msgspec.structs.replace(reg, layer_addrs=beyond))
    short = msgspec.structs.replace(info, registered=msgspec.structs.replace(reg, layer_addrs=reg.layer_addrs[:1]))
    receiver.open_room(1, [0, 1])
    for target in (lying, short):  # one sender each: a sender keeps the first info of an address
        sender = create_sender(backend, src, done.append, 5.0)
        closing(sender)
        sender.send_message(target, m.Accepted(1, 0))
        sender.send_pages(target, 1, [3, 4], [0, 1])
    deadline = time.monotonic() + WAIT_S
    while len(done) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    pages = [r for r in done if r.kind == "pages"]
    assert len(pages) == 2 and all(r.error for r in pages), done
    shape_refused = [r.error for r in pages if "layers of" in r.error]  # the short registration
    engine_refused = [r.error for r in pages if "outside" in r.error]  # the engine's own check
    assert len(shape_refused) == 1 and len(engine_refused) == 1, [r.error for r in pages]
    time.sleep(0.2)
    assert not any(isinstance(e, m.Pages) for e in events.events), events.events
    assert not any(layer.any() for layer in dst.layers)  # nothing landed anywhere in the pool


def test_nixl_frame_without_its_notification_fails_the_room(closing):
    """A Pages frame whose NIXL notification never came (or names another room) is reported as a
    failed Status, never as landed pages: a partial transfer cannot activate a room."""
    from pdserve.disagg.transfer.stream import _Destination, frame, send_buffers

    src, dst = filled_pool(1, "float32"), KVPool(dtype=torch.float32, device="cpu", **SHAPE)
    events = Collector()
    receiver = create_receiver("nixl", dst, events, HOST, 0.5)
    closing(receiver)
    sender = create_sender("nixl", src, lambda r: None, 5.0)
    closing(sender)
    info = receiver.info()
    receiver.open_room(5, [2, 3])
    dest = _Destination(sender, info)
    sock = dest.connect()
    send_buffers(sock, frame(m.Pages(5, [2, 3], 0, f"{sender.agent.name}/5/999")))  # no WRITE carried it
    send_buffers(sock, frame(m.Pages(5, [2, 3], 0, f"{sender.agent.name}/6/1")))  # another room's
    events.wait_for(lambda ev: len(ev) >= 2, "two verdicts")
    first, second = events.events[:2]
    assert isinstance(first, m.Status) and not first.ok and "no NIXL notification" in first.reason, first
    assert isinstance(second, m.Status) and not second.ok and "not one of room 5" in second.reason, second
    dest.put(None)


@pytest.mark.parametrize("backend", ENGINES)
def test_missing_engine_names_the_extra(backend, monkeypatch):
    """Without the engine's package a P/D server refuses to start, naming the pip extra."""
    from pdserve.disagg import config as disagg_config
    from pdserve.disagg.transfer import BackendUnavailable

    monkeypatch.setitem(disagg_config.ENGINE_LIBRARIES, backend, ("pdserve_no_such_engine_module", backend))
    why = disagg_config.library_error(backend)
    assert why and f"pip install -e '.[{backend}]'" in why
    with pytest.raises(BackendUnavailable, match=rf"\.\[{backend}\]"):
        create_sender(backend, filled_pool(1, "float32"), lambda r: None, 1.0)
    with pytest.raises(ValueError, match=rf"\.\[{backend}\]"):
        DisaggConfig(mode="decode", transfer_backend=backend).check_library()
