"""``pdserve bench pd-soak``: many P/D pairs at high concurrency on random rank pairs, under KV
pressure, with a share of them aborted — and not one room lost to its connection.

Each request is sent as its two halves at once, as a router does: the prefill half to the prefill
server and the decode half to the decode server, with one random ``bootstrap_room``. The rank
pair is random: the prefill rank pinned on both halves (``data_parallel_rank`` /
``disagg_prefill_dp_rank``) or left to ``room % dp_size``, the decode rank pinned or left to its
server. ``--abort-fraction`` of the pairs are aborted by their client (it closes the connection
of one half, or both, after a random delay), which is what a client that goes away does.

What must hold (the run's ``ok`` is all of them):
- every pair not aborted answers 200 on both halves with ``max_new_tokens`` tokens, and decode's
  first token is prefill's;
- an aborted pair's other half answers (200, or an error) within its bound: none hangs;
- no room failed with ``peer_lost`` or ``transfer_error`` (a connection lost or dropped under a
  room) on either server, per their ``pdserve:kv_transfer_failures_total`` counters;
- afterwards both servers' pools hold no page and no request.

Without ``--prefill``/``--decode`` it starts its own servers (:mod:`pdserve.bench.cluster`): a
prefill and a decode server of ``--dp-size`` ranks each with small pools
(``--max-total-tokens``) and a short ``--idle-timeout``, so connections go idle between rooms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

TRANSPORT_ERROR = -2  # a half's HTTP connection broke under it (httpx ReadError, RemoteProtocolError ...)
FAILURE_LINE = re.compile(r'^pdserve:kv_transfer_failures_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$', re.M)
LOST_CAUSES = ("peer_lost", "transfer_error")  # a room failed because its connection went away


@dataclass
class SoakConfig:
    prefill_url: str
    decode_url: str
    bootstrap_port: int
    prefill_dp: int
    decode_dp: int
    requests: int = 2000
    concurrency: int = 48
    abort_fraction: float = 0.10
    max_new_tokens: int = 8
    prompt_tokens: tuple[int, int] = (16, 160)
    seed: int = 0
    request_timeout_s: float = 120.0


@dataclass
class SoakResult:
    requests: int = 0
    aborted: int = 0
    answered: int = 0  # pairs not aborted whose two halves both answered 200, whole
    failed: list[str] = field(default_factory=list)  # pairs not aborted that did not (what went wrong)
    # pairs not aborted where a half's client connection broke (no HTTP answer at all): not a room failure
    # the servers named, so kept apart; ``ok`` still requires none
    transport_errors: list[str] = field(default_factory=list)
    aborted_outcomes: dict[str, int] = field(default_factory=dict)  # the other half's status
    aborted_examples: list[str] = field(default_factory=list)  # the other half's error, a few
    hung: int = 0  # halves with no answer within the request timeout
    lost: dict[str, int] = field(default_factory=dict)  # 'server:cause' -> rooms failed by a lost connection
    failures: dict[str, int] = field(default_factory=dict)  # 'server:cause' -> every room failure in the run
    pools_clean: bool = False
    pools: list[dict[str, int]] = field(default_factory=list)
    peak_page_use: dict[str, float] = field(default_factory=dict)  # server -> highest share of a rank's pool in use
    retractions: dict[str, int] = field(default_factory=dict)  # server -> requests retracted for KV in the run
    seconds: float = 0.0
    latency_s: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (not self.failed and not self.transport_errors and not self.hung and not self.lost
                and self.pools_clean and self.answered == self.requests - self.aborted)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "requests": self.requests, "aborted": self.aborted, "answered": self.answered,
                "failed": len(self.failed), "failed_examples": self.failed[:10],
                "transport_errors": len(self.transport_errors), "transport_error_examples": self.transport_errors[:10],
                "aborted_outcomes": self.aborted_outcomes, "aborted_examples": self.aborted_examples[:10], "hung": self.hung, "lost": self.lost,
                "failures": self.failures, "peak_page_use": self.peak_page_use, "retractions": self.retractions,
                "pools_clean": self.pools_clean, "pools": self.pools,
                "seconds": round(self.seconds, 2),
                "pairs_per_s": round(self.requests / self.seconds, 2) if self.seconds else 0.0,
                "latency_s": self.latency_s}


def failure_counts(metrics_text: str) -> dict[str, int]:
    """``cause -> rooms failed`` summed over ranks, from a server's ``/metrics``."""
    counts: dict[str, int] = {}
    for match in FAILURE_LINE.finditer(metrics_text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        cause = labels.get("cause", "?")
        counts[cause] = counts.get(cause, 0) + int(float(match["value"]))
    return counts


def _pair(cfg: SoakConfig, rng: random.Random, i: int) -> tuple[dict, dict, str | None, float]:
    """The two halves of request ``i``, which of them its client aborts (None, 'prefill', 'decode'
    or 'both') and after how long."""
    room = rng.randrange(1 << 62)
    ids = [rng.randrange(10, 2000) for _ in range(rng.randint(*cfg.prompt_tokens))]
    params = {"max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.max_new_tokens, "temperature": 0}
    common = {"input_ids": ids, "sampling_params": params, "bootstrap_host": "127.0.0.1",
              "bootstrap_port": cfg.bootstrap_port, "bootstrap_room": room, "rid": f"soak-{cfg.seed}-{i}"}
    prefill, decode = dict(common), dict(common)
    if rng.random() < 0.5:  # pin the prefill rank on both halves, else both follow the room
        rank = rng.randrange(cfg.prefill_dp)
        prefill["data_parallel_rank"] = decode["disagg_prefill_dp_rank"] = rank
    if rng.random() < 0.5:
        decode["data_parallel_rank"] = rng.randrange(cfg.decode_dp)
    abort = None
    if rng.random() < cfg.abort_fraction:
        abort = rng.choice(["prefill", "decode", "decode", "both"])
    return prefill, decode, abort, rng.choice([0.0, 0.005, 0.02, 0.05, 0.1, 0.2, rng.uniform(0.0, 0.5)])


async def _half(client: httpx.AsyncClient, url: str, body: dict, timeout: float) -> tuple[int, Any]:
    try:
        resp = await client.post(url + "/generate", json=body, timeout=timeout)
    except httpx.TimeoutException:
        return -1, "no answer within the request timeout"
    except httpx.HTTPError as e:
        return TRANSPORT_ERROR, f"{type(e).__name__}: {e}"
    try:
        return resp.status_code, resp.json()
    except ValueError:
        return resp.status_code, resp.text[:300]


ABANDONED = 0  # the client closed the connection before an answer came


async def _abandoned_half(url: str, body: dict, after: float) -> tuple[int, Any]:
    """Send one half whole, then close the connection after ``after`` seconds unless it answered
    first: the client going away. The request is written out before the wait, so its server does
    receive it (a client cancelled before its request left would be a half that never came, which
    its peer can only wait out)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    head = (f"POST /generate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + data)
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(), after)
        except asyncio.TimeoutError:
            return ABANDONED, None
        status_line = answer.split(b"\r\n", 1)[0].split()
        status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else -2
        return status, answer.split(b"\r\n\r\n", 1)[-1][:300].decode(errors="replace")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:300]
    return str(body)[:300]


async def _one(cfg: SoakConfig, client: httpx.AsyncClient, rng: random.Random, i: int, result: SoakResult,
               latencies: list[float]) -> None:
    prefill, decode, abort, after = _pair(cfg, rng, i)
    start = time.monotonic()
    halves = []
    for side, url, body in (("prefill", cfg.prefill_url, prefill), ("decode", cfg.decode_url, decode)):
        if abort in (side, "both"):
            halves.append(_abandoned_half(url, body, after))
        else:
            halves.append(_half(client, url, body, cfg.request_timeout_s))
    outcomes = await asyncio.gather(*halves)
    if abort is not None:
        result.aborted += 1
        for side, outcome in zip(("prefill", "decode"), outcomes):
            status = outcome[0]
            if status == ABANDONED:
                continue
            if status == -1:
                result.hung += 1
            key = f"{side}:{status}"
            result.aborted_outcomes[key] = result.aborted_outcomes.get(key, 0) + 1
            if status != 200 and len(result.aborted_examples) < 50:
                result.aborted_examples.append(f"request {i} ({abort} aborted after {after:.3f} s): {side} "
                                               f"{status} {_message(outcome[1])}")
        return
    (ps, pbody), (ds, dbody) = outcomes
    for status in (ps, ds):
        if status == -1:
            result.hung += 1
    problem = None
    if ps != 200 or ds != 200:
        problem = f"prefill {ps} {_message(pbody) if ps != 200 else ''} / decode {ds} {_message(dbody) if ds != 200 else ''}"
    elif len(dbody.get("output_ids", [])) != cfg.max_new_tokens:
        problem = f"decode answered {len(dbody.get('output_ids', []))} tokens, not {cfg.max_new_tokens}"
    elif pbody.get("output_ids", [None])[:1] != dbody["output_ids"][:1]:
        problem = f"prefill's first token {pbody.get('output_ids')} is not decode's {dbody['output_ids'][:1]}"
    if problem is None:
        result.answered += 1
        latencies.append(time.monotonic() - start)
    elif TRANSPORT_ERROR in (ps, ds):  # the client's connection broke: kept apart, and reported
        result.transport_errors.append(f"request {i} (room {prefill['bootstrap_room']}): {problem}")
    else:
        result.failed.append(f"request {i} (room {prefill['bootstrap_room']}): {problem}")


async def _metrics(client: httpx.AsyncClient, url: str) -> dict[str, int]:
    resp = await client.get(url + "/metrics", timeout=10)
    return failure_counts(resp.text)


async def _loads(client: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    return (await client.get(url + "/get_load", timeout=10)).json()


async def _watch_pressure(client: httpx.AsyncClient, servers: dict[str, str], result: SoakResult) -> None:
    """Sample every rank's page use while the soak runs (the evidence of KV pressure)."""
    while True:
        for name, url in servers.items():
            for rank in await _loads(client, url):
                share = rank["num_used_pages"] / max(1, rank["num_total_pages"])
                result.peak_page_use[name] = round(max(result.peak_page_use.get(name, 0.0), share), 3)
        await asyncio.sleep(0.2)


async def _pools(client: httpx.AsyncClient, urls: list[str], bound_s: float) -> tuple[bool, list[dict[str, int]]]:
    """Whether every rank of every server holds no page and no request within ``bound_s``."""
    deadline = time.monotonic() + bound_s
    while True:
        loads = []
        for url in urls:
            for rank in (await client.get(url + "/get_load", timeout=10)).json():
                loads.append({"server": url, "dp_rank": rank.get("dp_rank"), "num_reqs": rank["num_reqs"],
                              "num_used_pages": rank["num_used_pages"]})
        if all(x["num_reqs"] == 0 and x["num_used_pages"] == 0 for x in loads) or time.monotonic() > deadline:
            return all(x["num_reqs"] == 0 and x["num_used_pages"] == 0 for x in loads), loads
        await asyncio.sleep(0.25)


async def soak(cfg: SoakConfig) -> SoakResult:
    """Run the soak against running servers; the result says what held."""
    result = SoakResult(requests=cfg.requests)
    rng = random.Random(cfg.seed)
    latencies: list[float] = []
    # a kept connection is dropped before the servers' own keep-alive (--http-keep-alive, 5 s) can close it
    # under a request being written, which a client sees as a ReadError its server never received
    limits = httpx.Limits(max_connections=4 * cfg.concurrency, max_keepalive_connections=2 * cfg.concurrency,
                          keepalive_expiry=2.0)
    async with httpx.AsyncClient(limits=limits) as client:
        servers = {"prefill": cfg.prefill_url, "decode": cfg.decode_url}
        before = {name: await _metrics(client, url) for name, url in servers.items()}
        retracted = {name: sum(r["num_retractions"] for r in await _loads(client, url)) for name, url in servers.items()}
        watcher = asyncio.ensure_future(_watch_pressure(client, servers, result))
        seeds = [rng.randrange(1 << 32) for _ in range(cfg.requests)]  # request i is the same in every run
        next_i = 0

        async def worker() -> None:
            nonlocal next_i
            while next_i < cfg.requests:
                i, next_i = next_i, next_i + 1
                await _one(cfg, client, random.Random(seeds[i]), i, result, latencies)

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        result.seconds = time.monotonic() - start
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await watcher
        for name, url in servers.items():
            result.retractions[name] = sum(r["num_retractions"] for r in await _loads(client, url)) - retracted[name]
        result.pools_clean, result.pools = await _pools(client, list(servers.values()), 30.0)
        await asyncio.sleep(1.2)  # ranks report their failure counters at most every 0.5 s
        for name, url in servers.items():
            after = await _metrics(client, url)
            for cause, n in after.items():
                delta = n - before[name].get(cause, 0)
                if delta:
                    result.failures[f"{name}:{cause}"] = delta
                    if cause in LOST_CAUSES:
                        result.lost[f"{name}:{cause}"] = delta
    if latencies:
        latencies.sort()
        pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3)  # noqa: E731
        result.latency_s = {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": round(latencies[-1], 3)}
    return result


def server_flags(idle_timeout: float, waiting_timeout: float) -> list[str]:
    """The P/D flags of the servers this benchmark starts (also used by its CI variant)."""
    return ["--page-size", "4", "--disaggregation-idle-timeout", f"{idle_timeout:g}",
            "--disaggregation-waiting-timeout", f"{waiting_timeout:g}", "--disaggregation-bootstrap-timeout", "20",
            "--disaggregation-transfer-timeout", "10"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", help="URL of a running prefill server (else one is started)")
    parser.add_argument("--decode", help="URL of a running decode server (with --prefill)")
    parser.add_argument("--bootstrap-port", type=int, help="the prefill server's bootstrap port (with --prefill)")
    parser.add_argument("--dp-size", type=int, default=2, help="DP ranks of each server (given or started)")
    parser.add_argument("--requests", type=int, default=2000, help="pairs to send (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=48, help="pairs in flight (default: %(default)s)")
    parser.add_argument("--abort-fraction", type=float, default=0.10,
                        help="share of pairs whose client goes away (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens per pair (default: %(default)s)")
    parser.add_argument("--max-total-tokens", type=int, default=1024,
                        help="KV pool of each started server's ranks: small, for KV pressure")
    parser.add_argument("--idle-timeout", type=float, default=1.0, help="started servers' --disaggregation-idle-timeout")
    parser.add_argument("--waiting-timeout", type=float, default=60.0,
                        help="started servers' --disaggregation-waiting-timeout")
    parser.add_argument("--torch-threads", type=int, default=1, help="started servers' --torch-threads (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the pairs' random seed (default: %(default)s)")
    parser.add_argument("--output", help="write the result (JSON) here")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds the ``with Cluster``, which stops the servers it started


def run(args: argparse.Namespace) -> int:
    import signal

    from pdserve.bench.cluster import Cluster, machine_info, write_result

    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def config(prefill: str, decode: str, bootstrap_port: int) -> SoakConfig:
        return SoakConfig(prefill, decode, bootstrap_port, args.dp_size, args.dp_size, args.requests,
                          args.concurrency, args.abort_fraction, args.max_new_tokens, seed=args.seed)

    if args.prefill:
        if not (args.decode and args.bootstrap_port):
            raise SystemExit("--prefill needs --decode and --bootstrap-port")
        result = asyncio.run(soak(config(args.prefill, args.decode, args.bootstrap_port)))
        servers: dict[str, Any] = {"given": [args.prefill, args.decode]}
    else:
        flags = server_flags(args.idle_timeout, args.waiting_timeout)
        with tempfile.TemporaryDirectory(prefix="pdserve-soak-") as logs, \
                Cluster(logs, torch_threads=args.torch_threads) as cluster:
            prefill = cluster.server("prefill", "prefill", args.dp_size, args.max_total_tokens, extra=flags)
            decode = cluster.server("decode", "decode", args.dp_size, args.max_total_tokens, extra=flags)
            cluster.wait_healthy()
            result = asyncio.run(soak(config(prefill.url, decode.url, prefill.bootstrap_port)))
        servers = {"dp_size": args.dp_size, "max_total_tokens": args.max_total_tokens, "flags": flags}
    out = {"benchmark": "pd-soak", "machine": machine_info(), "servers": servers,
           "config": {k: v for k, v in vars(args).items() if k != "output"}, "result": result.as_dict()}
    print(json.dumps(out["result"], indent=2))
    if args.output:
        write_result(args.output, out)
    return 0 if result.ok else 1
