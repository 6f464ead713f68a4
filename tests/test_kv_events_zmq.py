"""KV events over ZMQ in vLLM's wire format, read from real servers by an independent decoder.

The decoder below is written from vLLM's schema (``vllm/distributed/kv_events.py``: the batch
``[ts, events, data_parallel_rank]``, events as tagged maps since vllm#42892 or tagged arrays
before) and recomputes vLLM's block hashes from the token ids (``vllm/v1/core/kv_cache_utils.py``:
``H((parent, tuple(tokens), None))``, ``NONE_HASH = H(seed)``, the low 64 bits big-endian); it
imports nothing of pdserve's encoder. One server per encoding, shared by the tests of the module;
hostile subscribers run against the first, and its /metrics are checked against /get_load.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
import time
from typing import Any

import cbor2
import httpx
import msgspec
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from tests.server_harness import launch, port_is_free, wait_until

PAGE = 16
MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------- the independent decoder
class MapBlockStored(msgspec.Struct, tag="BlockStored", tag_field="type"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class MapBlockRemoved(msgspec.Struct, tag="BlockRemoved", tag_field="type"):
    block_hashes: list[int]
    medium: str | None = None
    group_idx: int | None = None


class MapAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", tag_field="type"):
    pass


class MapBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[MapBlockStored | MapBlockRemoved | MapAllBlocksCleared]
    data_parallel_rank: int | None = None


class ArrBlockStored(msgspec.Struct, tag="BlockStored", array_like=True):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class ArrBlockRemoved(msgspec.Struct, tag="BlockRemoved", array_like=True):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None


class ArrAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", array_like=True):
    pass


class ArrBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[ArrBlockStored | ArrBlockRemoved | ArrAllBlocksCleared]
    data_parallel_rank: int | None = None


DECODERS = {"map": msgspec.msgpack.Decoder(MapBatch), "array": msgspec.msgpack.Decoder(ArrBatch)}
STORED = (MapBlockStored, ArrBlockStored)
REMOVED = (MapBlockRemoved, ArrBlockRemoved)
CLEARED = (MapAllBlocksCleared, ArrAllBlocksCleared)


def vllm_hashes(token_ids: list[int], algo: str, seed: str) -> list[int]:
    """vLLM's chained block hashes of the full pages of ``token_ids``, as int64 event hashes."""
    if algo == "sha256":
        def h(obj):
            return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()
    else:
        def h(obj):
            return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()
    parent, out = h(seed), []
    for i in range(len(token_ids) // PAGE):
        parent = h((parent, tuple(token_ids[i * PAGE : (i + 1) * PAGE]), None))
        out.append(int.from_bytes(parent, "big") & MASK64)
    return out


class Subscriber:
    """A SUB socket on every rank's endpoint, keeping what arrived per rank: (seq, batch, payload)."""

    def __init__(self, ctx: zmq.Context, endpoints: list[str], topic: bytes, encoding: str) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        for ep in endpoints:
            self.sock.connect(ep)
        self.ranks = {ep: rank for rank, ep in enumerate(endpoints)}
        self.decoder = DECODERS[encoding]
        self.got: dict[int, list[tuple[int, Any, bytes]]] = {r: [] for r in range(len(endpoints))}
        self.topics: set[bytes] = set()

    def pump(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.sock.poll(50):
                continue
            topic, seq, payload = self.sock.recv_multipart()
            self.topics.add(topic)
            batch = self.decoder.decode(payload)
            self.got[batch.data_parallel_rank].append((int.from_bytes(seq, "big"), batch, payload))

    def events(self, rank: int) -> list[Any]:
        return [e for _, b, _ in self.got[rank] for e in b.events]


def replay(ctx: zmq.Context, endpoint: str, start: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
    """vLLM's replay protocol from a DEALER (a REQ socket takes only the first answer of many):
    send ``[b"", start]``, read ``[b"", seq, payload]`` until ``seq == -1``."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not dealer.poll(100):
                continue
            empty, seq, payload = dealer.recv_multipart()
            assert empty == b""
            value = int.from_bytes(seq, "big", signed=True)
            if value == -1:
                assert payload == b""
                return out
            out.append((value, payload))
        raise AssertionError(f"replay from {endpoint} did not end within {timeout} s")
    finally:
        dealer.close(0)


def free_port_pair(count: int) -> int:
    """A base port with ``count`` consecutive free ports above it."""
    import socket

    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count < 65536 and all(port_is_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no run of free ports")


def start_server(tmp_path_factory, name: str, dp: int, encoding: str, algo: str, env: dict[str, str]):
    pub, rep = free_port_pair(dp), free_port_pair(dp)
    cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{pub}",
           "replay_endpoint": f"tcp://127.0.0.1:{rep}", "bind": True, "encoding": encoding}
    srv = launch(["--dp-size", str(dp), "--page-size", str(PAGE), "--max-total-tokens", "384",
                  "--chunked-prefill-size", "64", "--log-level", "warning", "--kv-events-config", json.dumps(cfg),
                  "--prefix-caching-hash-algo", algo], tmp_path_factory.mktemp(name), env=env)
    srv.pub = [f"tcp://127.0.0.1:{pub + r}" for r in range(dp)]
    srv.rep = [f"tcp://127.0.0.1:{rep + r}" for r in range(dp)]
    srv.encoding, srv.algo, srv.dp = encoding, algo, dp
    return srv


@pytest.fixture(scope="module")
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture(scope="module")
def map_server(tmp_path_factory):
    env = {}
    srv = start_server(tmp_path_factory, "kv-zmq-map", 2, "map", "sha256", env)
    srv.seed = os.environ.get("PYTHONHASHSEED", "vllm-none-hash")  # the server inherits the test's environment
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def array_server(tmp_path_factory):
    srv = start_server(tmp_path_factory, "kv-zmq-array", 1, "array", "sha256_cbor", {"PYTHONHASHSEED": "0"})
    srv.seed = "0"
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def assert_no_leaked_pages(srv) -> None:
    """Idle again: every rank holds no request and no page outside the prefix cache."""
    def idle() -> bool:
        loads = httpx.get(srv.url + "/get_load", timeout=10).json()
        return all(lo["num_reqs"] == 0 and lo["num_used_pages"] == 0 for lo in loads)
    assert wait_until(idle, 20), httpx.get(srv.url + "/get_load").json()


def generate(srv, ids: list[int], rank: int, tokens: int = 2) -> dict:
    resp = httpx.post(srv.url + "/generate", timeout=60, json={
        "input_ids": ids, "data_parallel_rank": rank,
        "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}})
    assert resp.status_code == 200, resp.text
    return resp.json()


def prompt(salt: int, pages: int) -> list[int]:
    return [(salt * 131 + 7 * i) % 240 + 5 for i in range(pages * PAGE + 3)]  # full pages and 3 tokens


def check_stream(srv, ctx, sub: Subscriber, prompts: dict[int, list[list[int]]]) -> None:
    """What a vLLM consumer relies on, per rank, over the whole history (replayed from seq 0): seq 0,
    1, 2, ...; the rank in every batch; the live batches byte for byte the replayed ones; stored pages
    chained to stored parents, with the prompts' tokens and the hashes a consumer computes from them;
    removals of stored hashes only."""
    for rank in range(srv.dp):
        history = replay(ctx, srv.rep[rank], 0)
        assert [seq for seq, _ in history] == list(range(len(history))) and history, rank
        by_seq = dict(history)
        seen = [seq for seq, _, _ in sub.got[rank]]
        assert seen and seen == list(range(seen[0], seen[0] + len(seen))), (rank, seen)
        assert all(by_seq[seq] == payload for seq, _, payload in sub.got[rank])
        batches = [DECODERS[srv.encoding].decode(payload) for _, payload in history]
        assert all(b.data_parallel_rank == rank for b in batches)
        events = [e for b in batches for e in b.events]
        live: set[int] = set()
        for event in events:
            if isinstance(event, STORED):
                assert event.block_size == PAGE and len(event.token_ids) == PAGE * len(event.block_hashes)
                assert event.medium == "GPU" and event.group_idx == 0 and event.lora_name is None
                assert event.parent_block_hash is None or event.parent_block_hash in live
                live.update(event.block_hashes)
            elif isinstance(event, REMOVED):
                assert set(event.block_hashes) <= live, "removed a hash never stored"
                live.difference_update(event.block_hashes)
            else:
                assert isinstance(event, CLEARED)
                live.clear()
        stores = [e for e in events if isinstance(e, STORED)]
        for ids in prompts.get(rank, []):
            want = vllm_hashes(ids, srv.algo, srv.seed)
            full = ids[: len(want) * PAGE]
            first = [e for e in stores if e.parent_block_hash is None and e.token_ids[:PAGE] == full[:PAGE]]
            assert first, f"rank {rank}: no store of the prompt's first page"
            assert first[-1].block_hashes == want[: len(first[-1].block_hashes)]
            assert first[-1].token_ids == full[: len(first[-1].token_ids)]
            assert set(want) <= {h for e in stores for h in e.block_hashes}, (rank, want)


def test_events_of_both_ranks_decode_match_prompts_and_hashes(map_server, ctx):
    srv = map_server
    sub = Subscriber(ctx, srv.pub, b"kv@127.0.0.1@", "map")
    time.sleep(0.5)  # PUB/SUB: a subscription takes effect after the connection is up
    prompts = {0: [prompt(1, 3), prompt(2, 2)], 1: [prompt(3, 4)]}
    for rank, ids_list in prompts.items():
        for ids in ids_list:
            generate(srv, ids, rank)
    sub.pump(1.5)
    assert sub.topics == {b"kv@127.0.0.1@" + httpx.get(srv.url + "/v1/models").json()["data"][0]["id"].encode()}
    check_stream(srv, ctx, sub, prompts)
    # a repeated prompt stores nothing new; a longer one with the same prefix extends the chain
    before = len(sub.got[0])
    generate(srv, prompts[0][0], 0)
    longer = prompts[0][0][: 3 * PAGE] + prompt(9, 1)
    generate(srv, longer, 0)
    sub.pump(1.0)
    new = [e for _, b, _ in sub.got[0][before:] for e in b.events if isinstance(e, STORED)]
    want = vllm_hashes(longer, srv.algo, srv.seed)
    assert new and new[0].parent_block_hash == want[2] and new[0].block_hashes[0] == want[3]
    check_stream(srv, ctx, sub, {})


def test_evictions_are_removed_events_and_replay_returns_missed_batches(map_server, ctx):
    srv = map_server
    sub = Subscriber(ctx, srv.pub, b"", "map")
    time.sleep(0.5)
    for salt in range(20, 30):  # 10 prompts of 4 pages on rank 1: more than its 24 pages, so the cache evicts
        generate(srv, prompt(salt, 4), 1)
    sub.pump(1.5)
    removed = [h for e in sub.events(1) if isinstance(e, REMOVED) for h in e.block_hashes]
    assert removed, "no BlockRemoved under KV pressure"
    # a subscriber that joined late asks the replay socket for everything: it gets every batch so far,
    # numbered from 0, the ones this subscriber saw byte for byte
    got = replay(ctx, srv.rep[1], 0)
    seqs = [s for s, _ in got]
    assert seqs == list(range(len(seqs))) and len(seqs) >= len(sub.got[1])
    by_seq = dict(got)
    assert all(by_seq[seq] == payload for seq, _, payload in sub.got[1])
    decoded = [DECODERS["map"].decode(p) for _, p in got]
    assert all(b.data_parallel_rank == 1 for b in decoded)
    # from the middle: exactly the later batches; from far beyond: just the end marker
    mid = seqs[len(seqs) // 2]
    assert [s for s, _ in replay(ctx, srv.rep[1], mid)][0] == mid
    assert replay(ctx, srv.rep[1], (1 << 63) - 1) == []
    # all the hashes removed had been stored (replayed history starts at seq 0: complete)
    stored = {h for b in decoded for e in b.events if isinstance(e, STORED) for h in e.block_hashes}
    assert set(removed) <= stored


def test_flush_cache_publishes_all_blocks_cleared_on_every_rank(map_server, ctx):
    srv = map_server
    sub = Subscriber(ctx, srv.pub, b"", "map")
    time.sleep(0.5)
    assert httpx.post(srv.url + "/flush_cache", timeout=30).status_code == 200
    sub.pump(1.0)
    for rank in range(srv.dp):
        assert any(isinstance(e, CLEARED) for e in sub.events(rank)), rank


def test_array_encoding_and_sha256_cbor_with_a_seed(array_server, ctx):
    srv = array_server
    sub = Subscriber(ctx, srv.pub, b"kv@", "array")
    time.sleep(0.5)
    prompts = {0: [prompt(40, 3), prompt(41, 2)]}
    for ids in prompts[0]:
        generate(srv, ids, 0)
    sub.pump(1.5)
    check_stream(srv, ctx, sub, prompts)
    raw = msgspec.msgpack.decode(sub.got[0][0][2])  # positional all the way down
    assert isinstance(raw, list) and isinstance(raw[1][0], list) and raw[1][0][0] == "BlockStored"
    assert raw[2] == 0
    got = replay(ctx, srv.rep[0], 0)
    assert [s for s, _ in got] == list(range(len(got))) and len(got) >= len(sub.got[0])


def test_hostile_subscribers_never_stall_the_engine(map_server, ctx):
    """Garbage and huge frames on the replay socket, a start seq of 2^64-1, a subscriber that never
    reads, a thousand connects: requests keep their latency and events keep flowing."""
    srv = map_server
    t0 = time.monotonic()
    generate(srv, prompt(60, 2), 0)
    baseline = time.monotonic() - t0
    stop = threading.Event()
    errors: list[str] = []

    def hostile() -> None:
        c = zmq.Context()
        try:
            slow = c.socket(zmq.SUB)
            slow.setsockopt(zmq.RCVHWM, 1)
            slow.setsockopt(zmq.SUBSCRIBE, b"")
            slow.connect(srv.pub[0])  # never reads
            dealer = c.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(srv.rep[0])
            rounds = 0
            while not stop.is_set():
                dealer.send_multipart([b"", os.urandom(3)], zmq.NOBLOCK)
                dealer.send_multipart([b"junk", b"more", b"frames", b"x" * 100], zmq.NOBLOCK)
                dealer.send_multipart([b"", MASK64.to_bytes(8, "big")], zmq.NOBLOCK)  # huge start seq
                dealer.send(os.urandom(1 << 20), zmq.NOBLOCK)  # 1 MiB frame: over the size cap
                if rounds < 10:
                    socks = [c.socket(zmq.DEALER) for _ in range(100)]
                    for s in socks:
                        s.setsockopt(zmq.LINGER, 0)
                        s.connect(srv.rep[0])
                        s.connect(srv.pub[1])
                    for s in socks:
                        s.close(0)
                rounds += 1
                time.sleep(0.01)
            slow.close(0)
            dealer.close(0)
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(repr(e))
        finally:
            c.destroy(linger=0)

    thread = threading.Thread(target=hostile)
    thread.start()
    try:
        time.sleep(0.5)
        sub = Subscriber(ctx, srv.pub, b"", "map")
        time.sleep(0.5)
        worst = 0.0
        for salt in range(61, 66):
            t0 = time.monotonic()
            generate(srv, prompt(salt, 2), salt % 2)
            worst = max(worst, time.monotonic() - t0)
            assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
        sub.pump(1.0)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    print(f"hostile subscribers: one request {baseline:.3f} s before, worst {worst:.3f} s during")
    assert worst < max(5.0, 10 * baseline), f"a request took {worst:.2f} s under hostile subscribers"
    assert any(isinstance(e, STORED) for r in range(srv.dp) for e in sub.events(r))
    assert len(replay(ctx, srv.rep[0], 0)) > 0  # the replay socket still answers honest requests
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text)}
    refused = {s.labels["outcome"]: s.value for s in families["pdserve:kv_events_replays"].samples
               if s.name.endswith("_total")}
    assert refused.get("malformed", 0) > 0
    assert_no_leaked_pages(srv)


def test_gaie_metric_names_match_get_load(map_server):
    """The names the Gateway API Inference Extension's endpoint picker scrapes, per DP rank (vLLM's
    ``engine`` label), with /get_load's values, idle and with a request running."""
    srv = map_server

    def scrape() -> tuple[dict, list[dict], list[dict]]:
        """/get_load, /metrics, /get_load again: a running request changes the loads between two
        reads, so each metric must lie between the loads read just before and just after it."""
        before = httpx.get(srv.url + "/get_load", timeout=10).json()
        text = httpx.get(srv.url + "/metrics", timeout=10).text
        after = httpx.get(srv.url + "/get_load", timeout=10).json()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        return families, before, after

    def consistent(families, before, after) -> bool:
        for early, late in zip(before, after):
            rank = str(early["dp_rank"])

            def value(name, rank=rank):
                (s,) = [s for s in families[name].samples if s.labels.get("engine") == rank]
                return s.value

            def between(metric: float, a: float, b: float) -> bool:
                return min(a, b) - 1e-9 <= metric <= max(a, b) + 1e-9
            if not between(value("vllm:num_requests_waiting"), early["num_waiting_reqs"], late["num_waiting_reqs"]):
                return False
            if not between(value("vllm:num_requests_running"), early["num_reqs"] - early["num_waiting_reqs"],
                           late["num_reqs"] - late["num_waiting_reqs"]):
                return False
            if not between(value("vllm:kv_cache_usage_perc"), early["num_used_pages"] / early["num_total_pages"],
                           late["num_used_pages"] / late["num_total_pages"]):
                return False
        return True

    families, loads, _ = scrape()
    assert consistent(families, loads, loads)
    info = {s.labels["engine"]: s for s in families["vllm:cache_config_info"].samples}
    for load in loads:
        s = info[str(load["dp_rank"])]
        assert s.value == 1 and s.labels["block_size"] == str(PAGE)
        assert s.labels["num_gpu_blocks"] == str(load["num_total_pages"])
    for name in ("sglang:num_queue_reqs", "sglang:num_running_reqs", "sglang:token_usage"):
        assert {s.labels["dp_rank"] for s in families[name].samples} == {"0", "1"}
    assert "pdserve:kv_events_dropped" in families and "pdserve:kv_events_published" in families

    done = threading.Event()
    answers: list[dict] = []

    def long_request() -> None:
        try:
            answers.append(generate(srv, prompt(80, 2), 1, tokens=300))  # 35 + 300 tokens fit the 384 of a rank
        finally:
            done.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    try:
        seen_running = wait_until(lambda: (lambda f, before, after: consistent(f, before, after) and any(
            s.value >= 1 for s in f["vllm:num_requests_running"].samples if s.labels["engine"] == "1"))(*scrape()),
            timeout=30, interval=0.05)
        assert seen_running, "never saw the running request in both /metrics and /get_load"
    finally:
        thread.join(60)
    assert answers and answers[0]["meta_info"]["completion_tokens"] == 300
    assert_no_leaked_pages(srv)



def test_a_dead_worker_clears_its_rank_for_subscribers(map_server, ctx):
    """A rank's worker dies: its cache is gone, so subscribers get AllBlocksCleared on that rank
    (and only there); after the restart the rank publishes again, seq continuing."""
    import signal

    srv = map_server
    sub = Subscriber(ctx, srv.pub, b"", "map")
    time.sleep(0.5)
    generate(srv, prompt(90, 2), 0)
    sub.pump(0.5)
    (rank0,) = [r for r in httpx.get(srv.url + "/health").json()["dp_ranks"] if r["dp_rank"] == 0]
    os.kill(rank0["pid"], signal.SIGKILL)
    assert wait_until(lambda: any(isinstance(e, CLEARED) for e in (sub.pump(0.2) or sub.events(0))), 20)
    assert not any(isinstance(e, CLEARED) for e in sub.events(1))
    assert wait_until(lambda: httpx.get(srv.url + "/health").status_code == 200 and all(
        r["state"] == "ready" for r in httpx.get(srv.url + "/health").json()["dp_ranks"]), 60)
    before = sub.got[0][-1][0]
    generate(srv, prompt(91, 2), 0)
    sub.pump(1.0)
    seqs = [seq for seq, _, _ in sub.got[0]]
    assert seqs[-1] > before and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert_no_leaked_pages(srv)


# ---------------------------------------------------------------------- no server needed
def test_config_parsing_names_bad_fields_and_offsets_ports_by_rank():
    from pdserve.server.kv_events_config import bound_tcp_ports, offset_endpoint, parse_kv_events_config

    cfg = parse_kv_events_config('{"enable_kv_cache_events": true, "endpoint": "tcp://*:6000", '
                                 '"replay_endpoint": "tcp://*:7000", "topic": ""}')
    assert cfg.enabled and cfg.publisher == "zmq" and cfg.topic == "" and cfg.encoding == "map"
    assert offset_endpoint("tcp://*:6000", 2) == "tcp://*:6002"
    assert offset_endpoint("ipc:///tmp/ev", 1) == "ipc:///tmp/ev_dp1"
    assert bound_tcp_ports(cfg, 2) == [("0.0.0.0", 6000), ("0.0.0.0", 6001), ("0.0.0.0", 7000), ("0.0.0.0", 7001)]
    for text, field in (('{"enable_kv_cache_events": true, "bogus": 1}', "bogus"),
                        ('{"enable_kv_cache_events": "yes"}', "enable_kv_cache_events"),
                        ('{"enable_kv_cache_events": true, "encoding": "xml"}', "encoding"),
                        ('{"enable_kv_cache_events": true, "endpoint": "http://x:1"}', "endpoint"),
                        ('{"enable_kv_cache_events": true, "endpoint": "tcp://*:99999"}', "endpoint"),
                        ('{"enable_kv_cache_events": true, "hwm": 1e400}', "hwm"),
                        ('{"enable_kv_cache_events": true, "buffer_steps": 0}', "buffer_steps"),
                        ('{"publisher": "kafka"}', "publisher"), ("[1]", "object"), ("{", "JSON")):
        with pytest.raises(ValueError, match=field):
            parse_kv_events_config(text)


def test_block_hashes_match_an_independent_computation():
    from pdserve.vllm_kv_events import BlockHasher, canonical_cbor

    ids = [(13 * i) % 70000 for i in range(5 * PAGE + 7)]
    for algo in ("sha256", "sha256_cbor"):
        for seed in ("vllm-none-hash", "0", "12345"):
            assert BlockHasher(algo, seed).chain(ids, PAGE) == vllm_hashes(ids, algo, seed)
    for obj in ((b"\x00" * 32, tuple(range(0, 2**20, 4099)), None), "seed", (b"", (), None), (b"x", (2**40, 0, 23, 24), None)):
        assert canonical_cbor(obj) == cbor2.dumps(obj, canonical=True)
    raw = BlockHasher("sha256", "0", int_hashes=False).chain(ids, PAGE)
    assert [int.from_bytes(d, "big") & MASK64 for d in raw] == vllm_hashes(ids, "sha256", "0")


def test_a_busy_event_port_fails_startup_naming_it(tmp_path):
    import socket
    import subprocess
    import sys

    from tests.server_harness import REPO_ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        cfg = json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://127.0.0.1:{port}", "bind": True})
        proc = subprocess.run([sys.executable, "-m", "pdserve.cli", "serve", "--port", "0", "--kv-events-config", cfg],
                              capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                              env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode != 0 and str(port) in proc.stderr and "kv-events-config" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "pdserve.cli", "serve", "--kv-events-config", '{"nope": 1}'],
                         capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert bad.returncode != 0 and "nope" in bad.stderr
