"""The DP-rank contract, case by case, against one router in front of one sim fleet.

Every case returns whether it passed and its evidence: what the client got, and what the servers
themselves logged (which server and DP rank served each leg, by rid and room), their ``/get_load``
counters, and what the fault relays saw. Cases run in order: the first one on a fleet no request
has touched yet, the destructive ones (closed port, killed ranks, no capacity) last.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pdserve.conformance.client import Answer, new_client, payload, send
from pdserve.conformance.fleet import Fleet, Served, Server

FAST_S = 5.0  # "fails the other leg fast": well under the servers' own 10 s bootstrap/waiting timeouts
ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
DECODE_RANK_FIELDS = ("data_parallel_rank", "routed_dp_rank")
PREFILL_RANK_FIELDS = ("prefill_data_parallel_rank", "disagg_prefill_dp_rank")
RANK_HEADER = "X-Data-Parallel-Rank"
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]


@dataclass
class CaseResult:
    name: str
    passed: bool
    evidence: str
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "evidence": self.evidence, "seconds": round(self.seconds, 2)}


@dataclass
class Legs:
    """What the servers logged for one answered request."""

    prefill: Served | None
    decode: Served | None

    def describe(self) -> str:
        p = f"{self.prefill.server} rank {self.prefill.prefill_rank}" if self.prefill else "no prefill leg logged"
        d = f"{self.decode.server} rank {self.decode.decode_rank}" if self.decode else "no decode leg logged"
        return f"P {p} / D {d}"


class Suite:
    """The cases, in order, over ``fleet`` (whose router is already started)."""

    def __init__(self, fleet: Fleet, seed: int = 0) -> None:
        self.fleet = fleet
        self.url = fleet.router_url
        self.rng = random.Random(seed)
        self.count = 0
        self.seen: list[tuple[Answer, Legs]] = []  # every answered unpinned request, for coverage
        self.client = new_client()

    # ------------------------------------------------------------------ helpers
    def prompt(self, words: int = 12) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(words))

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(10, 1990) for _ in range(n)]

    def rid(self, case: str) -> str:
        self.count += 1
        return f"conf-{case}-{self.count}-{self.rng.getrandbits(32):08x}"

    def request(self, case: str, route: str = "/generate", stream: bool = False, prompt: Any = None,
                headers: dict[str, str] | None = None, timeout: float = 60.0, max_new_tokens: int = 8,
                **extra: Any) -> Answer:
        body = payload(route, self.prompt() if prompt is None else prompt, self.rid(case), max_new_tokens,
                       stream, **extra)
        return send(self.client, self.url, route, body, headers, timeout)

    def many(self, calls: list[Callable[[], Answer]], workers: int = 8) -> list[Answer]:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda f: f(), calls))

    def legs(self, answer: Answer, wait_s: float = 3.0) -> Legs:
        """The servers' access-log lines for ``answer``: the decode leg by rid (else by the answer's
        room), the prefill leg by the decode leg's room."""
        room = answer.meta().get("bootstrap_room")
        deadline = time.monotonic() + wait_s
        while True:
            lines = self.fleet.served(rid=answer.rid, room=room)
            decode = next((x for x in lines if x.role == "decode"), None)
            if decode is not None and decode.room is not None:
                lines += self.fleet.served(room=decode.room)
            prefill = next((x for x in lines if x.role == "prefill" and x.status == 200
                            and (decode is None or x.room == decode.room)), None)
            if (decode and prefill) or time.monotonic() > deadline:
                return Legs(prefill, decode)
            time.sleep(0.1)

    def judge_pin(self, answer: Answer, fields: tuple[str, ...], prefill: int | None = None,
                  decode: int | None = None) -> tuple[bool, str]:
        """Pinned ranks honoured on the legs the servers logged, or refused with a 4xx naming a field."""
        if 400 <= answer.status < 500:
            named = [f for f in fields if f.lower() in answer.text.lower()]
            if named:
                return True, f"refused HTTP {answer.status} naming {named[0]}"
            return False, f"refused HTTP {answer.status} without naming {'/'.join(fields)}: {answer.text[:160]}"
        if not answer.ok:
            return False, answer.summary()
        legs = self.legs(answer)
        got_p = legs.prefill.prefill_rank if legs.prefill else None
        got_d = legs.decode.decode_rank if legs.decode else None
        wrong = []
        if prefill is not None and got_p != prefill:
            wrong.append(f"prefill rank {prefill} asked, {got_p} served")
        if decode is not None and got_d != decode:
            wrong.append(f"decode rank {decode} asked, {got_d} served")
        want = f"asked P {prefill if prefill is not None else '*'} / D {decode if decode is not None else '*'}"
        if wrong:
            return False, f"{want}: ignored ({'; '.join(wrong)}; {legs.describe()})"
        return True, f"{want}: served {legs.describe()}"

    def pinned_case(self, name: str, field_names: tuple[str, ...], ranks: list[tuple[int | None, int | None]],
                    build: Callable[[int | None, int | None], dict[str, Any]],
                    headers: Callable[[int | None, int | None], dict[str, str]] | None = None) -> tuple[bool, str]:
        answers = self.many([lambda p=p, d=d: self.request(name, headers=headers(p, d) if headers else None,
                                                           **build(p, d)) for p, d in ranks], workers=4)
        verdicts = [self.judge_pin(a, field_names, p, d) for a, (p, d) in zip(answers, ranks)]
        bad = [v for ok, v in verdicts if not ok]
        if bad:
            return False, f"{len(bad)} of {len(ranks)} wrong: " + " | ".join(bad[:3])
        return True, f"{len(ranks)} of {len(ranks)}: " + " | ".join(v for _, v in verdicts[:3])

    def served_ok(self, answer: Answer) -> tuple[bool, str, Legs | None]:
        """A 2xx answer whose prefill leg was served by a prefill server and decode leg by a decode server."""
        if not answer.ok:
            return False, answer.summary(), None
        legs = self.legs(answer)
        if legs.decode is None:
            return False, f"{answer.summary()}, but no decode server logged rid {answer.rid}", legs
        if legs.prefill is None:
            return False, (f"{answer.summary()}, but no prefill server served room {legs.decode.room} "
                           f"(decode {legs.decode.server} computed it alone)"), legs
        return True, f"{answer.summary()}, {legs.describe()}, room {legs.decode.room}", legs

    def idle_or_note(self) -> str:
        busy = self.fleet.wait_idle(15.0)
        return f" (fleet still busy before the case: {', '.join(busy)})" if busy else ""

    # ------------------------------------------------------------------ the cases
    def case_first_request_explicit_prefill_rank(self) -> tuple[bool, str]:
        """The first requests the fleet ever sees name a prefill rank only the DP-3 servers have, and a
        decode rank (sglang#22990: the first one failed); one alone could match by luck, so three more follow."""
        top = max(s.dp_size for s in self.fleet.prefills) - 1
        d_top = max(s.dp_size for s in self.fleet.decodes) - 1
        first = self.request("first", disagg_prefill_dp_rank=top, data_parallel_rank=d_top)
        ok, evidence = self.judge_pin(first, (*PREFILL_RANK_FIELDS, *DECODE_RANK_FIELDS), top, d_top)
        pins = [(0, d_top), (top, 0), (top, d_top)]
        rest_ok, rest = self.pinned_case("first", (*PREFILL_RANK_FIELDS, *DECODE_RANK_FIELDS), pins,
                                         lambda p, d: {"disagg_prefill_dp_rank": p, "data_parallel_rank": d})
        return ok and rest_ok, f"first request: {evidence}; the next {rest}"

    def case_every_rank_pair_reachable(self) -> tuple[bool, str]:
        """Unpinned traffic reaches every (prefill rank, decode rank) pair and every unit of both sides."""
        p_units = {(s.name, r) for s in self.fleet.prefills for r in range(s.dp_size)}
        d_units = {(s.name, r) for s in self.fleet.decodes for r in range(s.dp_size)}
        pairs = {(i, j) for i in range(max(s.dp_size for s in self.fleet.prefills))
                 for j in range(max(s.dp_size for s in self.fleet.decodes))}
        seen_p, seen_d, seen_pairs, failed, sent = set(), set(), set(), [], 0
        while sent < 96 and not (p_units <= seen_p and d_units <= seen_d and pairs <= seen_pairs):
            answers = self.many([lambda: self.request("pairs") for _ in range(8)])
            sent += len(answers)
            for a in answers:
                ok, why, legs = self.served_ok(a)
                if not ok or legs is None or legs.prefill is None or legs.decode is None:
                    failed.append(why)
                    continue
                self.seen.append((a, legs))
                seen_p.add((legs.prefill.server, legs.prefill.prefill_rank))
                seen_d.add((legs.decode.server, legs.decode.decode_rank))
                seen_pairs.add((legs.prefill.prefill_rank, legs.decode.decode_rank))
        missing = sorted(pairs - seen_pairs)
        evidence = (f"{sent} requests: {len(seen_pairs)}/{len(pairs)} rank pairs, {len(seen_p & p_units)}/"
                    f"{len(p_units)} prefill units, {len(seen_d & d_units)}/{len(d_units)} decode units")
        if missing:
            evidence += f"; pairs never served: {missing}"
        if p_units - seen_p or d_units - seen_d:
            evidence += f"; units never used: {sorted((p_units - seen_p) | (d_units - seen_d))}"
        if failed:
            evidence += f"; {len(failed)} failed, e.g. {failed[0]}"
        return not missing and p_units <= seen_p and d_units <= seen_d and not failed, evidence

    def case_prefill_dp_1(self) -> tuple[bool, str]:
        """Requests whose KV comes from a DP-1 prefill server are served (sglang#19305)."""
        dp1 = {s.name for s in self.fleet.prefills if s.dp_size == 1}
        if not dp1:
            return False, "the fleet has no DP-1 prefill server"
        hits = [(a, legs) for a, legs in self.seen if legs.prefill and legs.prefill.server in dp1]
        tries = 0
        while not hits and tries < 32:
            for a in self.many([lambda: self.request("dp1") for _ in range(8)]):
                ok, _, legs = self.served_ok(a)
                if ok and legs and legs.prefill and legs.prefill.server in dp1:
                    hits.append((a, legs))
            tries += 8
        if not hits:
            return False, f"no request had its prefill leg on {sorted(dp1)} ({len(self.seen) + tries} tried)"
        slowest = max(a.elapsed for a, _ in hits)
        return True, (f"{len(hits)} requests prefilled on {sorted(dp1)} rank 0, all served; slowest "
                      f"{slowest:.2f} s; e.g. {hits[0][1].describe()}")

    def case_explicit_decode_rank_data_parallel_rank(self) -> tuple[bool, str]:
        return self.pinned_case("dpr", (*DECODE_RANK_FIELDS, RANK_HEADER), self._decode_pins(),
                                lambda p, d: {"data_parallel_rank": d})

    def case_explicit_decode_rank_routed_dp_rank(self) -> tuple[bool, str]:
        return self.pinned_case("routed", (*DECODE_RANK_FIELDS, RANK_HEADER), self._decode_pins(),
                                lambda p, d: {"routed_dp_rank": d})

    def case_explicit_decode_rank_header(self) -> tuple[bool, str]:
        return self.pinned_case("header", (RANK_HEADER, *DECODE_RANK_FIELDS), self._decode_pins(),
                                lambda p, d: {}, headers=lambda p, d: {RANK_HEADER: str(d)})

    def case_explicit_prefill_rank_prefill_data_parallel_rank(self) -> tuple[bool, str]:
        return self.pinned_case("pdpr", PREFILL_RANK_FIELDS, self._prefill_pins(),
                                lambda p, d: {"prefill_data_parallel_rank": p})

    def case_explicit_prefill_rank_disagg_prefill_dp_rank(self) -> tuple[bool, str]:
        return self.pinned_case("dpdr", PREFILL_RANK_FIELDS, self._prefill_pins(),
                                lambda p, d: {"disagg_prefill_dp_rank": p})

    def case_explicit_ranks_both_legs(self) -> tuple[bool, str]:
        """Every (prefill i, decode j) pair pinned at once, i != j included."""
        p_dp = max(s.dp_size for s in self.fleet.prefills)
        d_dp = max(s.dp_size for s in self.fleet.decodes)
        pins = [(i, j) for i in range(p_dp) for j in range(d_dp)]
        return self.pinned_case("both", (*PREFILL_RANK_FIELDS, *DECODE_RANK_FIELDS), pins,
                                lambda p, d: {"disagg_prefill_dp_rank": p, "data_parallel_rank": d})

    def case_out_of_range_ranks_refused_naming_the_field(self) -> tuple[bool, str]:
        """A rank no unit of that side has cannot be honoured: a 4xx naming the field."""
        d_bad = max(s.dp_size for s in self.fleet.decodes)  # a prefill rank, but no decode rank
        p_bad = max(s.dp_size for s in self.fleet.prefills)
        out = []
        for field, value in (("data_parallel_rank", d_bad), ("disagg_prefill_dp_rank", p_bad)):
            a = self.request("range", **{field: value})
            named = 400 <= a.status < 500 and field in a.text
            out.append((named, f"{field}={value}: {a.summary() if not named else f'HTTP {a.status} naming it'}"))
        return all(ok for ok, _ in out), "; ".join(v for _, v in out)

    def route_case(self, route: str, stream: bool) -> tuple[bool, str]:
        answer = self.request("route", route=route, stream=stream)
        ok, why, _ = self.served_ok(answer)
        if ok and stream and not (answer.events and answer.done):
            return False, f"{why}; the stream had {len(answer.events)} events and {'a' if answer.done else 'no'} [DONE]"
        if ok and not stream and not isinstance(answer.body, dict):
            return False, f"{why}; the body is not JSON: {answer.text[:120]}"
        kv = answer.meta().get("kv_transfer_bytes")
        extra = f", {len(answer.events)} events + [DONE]" if stream and ok else ""
        return ok, f"{why}{extra}, kv_transfer_bytes {kv}"

    def case_kv_transferred_not_recomputed(self) -> tuple[bool, str]:
        """The prompt's KV moves from prefill to decode: bytes in the answer, no prompt tokens computed on decode."""
        before_d = self.fleet.load_totals("decode").get("prefill_tokens_computed", 0)
        before_p = self.fleet.load_totals("prefill").get("prefill_tokens_computed", 0)
        answers = [self.request("kv", prompt=self.ids(300)) for _ in range(3)]
        after_d = self.fleet.load_totals("decode").get("prefill_tokens_computed", 0)
        after_p = self.fleet.load_totals("prefill").get("prefill_tokens_computed", 0)
        problems = []
        for a in answers:
            ok, why, _ = self.served_ok(a)
            if not ok:
                problems.append(why)
            elif not a.meta().get("kv_transfer_bytes"):
                problems.append(f"rid {a.rid}: no kv_transfer_bytes in the answer")
        if after_d != before_d:
            problems.append(f"decode servers computed {after_d - before_d} prompt tokens themselves")
        if after_p - before_p < 3 * 300:
            problems.append(f"prefill servers computed only {after_p - before_p} of 900 prompt tokens")
        kv = [a.meta().get("kv_transfer_bytes") for a in answers]
        evidence = (f"3 prompts of 300 tokens: prefill computed {after_p - before_p} tokens, decode "
                    f"{after_d - before_d}; kv_transfer_bytes {kv}")
        return not problems, evidence + ("; " + "; ".join(problems[:3]) if problems else "")

    def arrival_case(self, late_role: str) -> tuple[bool, str]:
        late = [s for s in self.fleet.servers if s.role == late_role]
        for s in late:
            assert s.proxy is not None
            s.proxy.delay_s = 0.6
        try:
            answers = [self.request("order") for _ in range(2)]
        finally:
            self.fleet.clear_faults()
        notes, passed = [], True
        for a in answers:
            ok, why, legs = self.served_ok(a)
            room = legs.decode.room if legs and legs.decode else None
            times = {s.role: next((x.at for x in s.proxy.arrivals if x.room == room), None)
                     for s in self.fleet.servers if s.proxy is not None and room is not None
                     and any(x.room == room for x in s.proxy.arrivals)}
            order = ""
            if times.get("prefill") is not None and times.get("decode") is not None:
                first = "prefill" if times["prefill"] < times["decode"] else "decode"
                order = f"; {first} leg arrived first by {abs(times['prefill'] - times['decode']):.2f} s"
            passed &= ok
            notes.append(why + order)
        return passed, " | ".join(notes)

    def case_retraction_under_kv_pressure(self) -> tuple[bool, str]:
        """Decode runs out of KV pages mid-generation; retracted requests finish, their KV from the right prefill rank."""
        count, tokens = 32, 600  # ~4x the decode ranks' KV pages in all, so every rank runs out
        before = self.fleet.load_totals("decode")
        answers = self.many([lambda: self.request("retract", prompt=self.ids(160), max_new_tokens=tokens,
                                                  timeout=120) for _ in range(count)], workers=count)
        after = self.fleet.load_totals("decode")
        retractions = after.get("num_retractions", 0) - before.get("num_retractions", 0)
        recomputed = after.get("prefill_tokens_computed", 0) - before.get("prefill_tokens_computed", 0)
        problems, extra_legs = [], 0
        for a in answers:
            ok, why, legs = self.served_ok(a)
            if not ok or legs is None or legs.decode is None or legs.prefill is None:
                problems.append(why)
                continue
            if a.meta().get("completion_tokens") not in (None, tokens):
                problems.append(f"rid {a.rid}: {a.meta().get('completion_tokens')} of {tokens} tokens")
            named = a.meta().get("prefill_dp_rank")
            if named is not None and named != legs.prefill.prefill_rank:
                problems.append(f"rid {a.rid}: the answer names prefill rank {named}, "
                                f"{legs.prefill.server} rank {legs.prefill.prefill_rank} served it")
            prefill_lines = [x for x in self.fleet.served(room=legs.decode.room) if x.role == "prefill"]
            extra_legs += max(0, len(prefill_lines) - 1)
            if len({(x.server, x.prefill_rank) for x in prefill_lines}) > 1:
                problems.append(f"room {legs.decode.room} re-served from another prefill rank: "
                                + ", ".join(f"{x.server} rank {x.prefill_rank}" for x in prefill_lines))
        if retractions <= 0:
            problems.append("no retraction happened on decode (the case was not exercised)")
        how = (f"re-served by local recompute on decode ({recomputed} tokens)" if recomputed
               else "no local recompute on decode") + f", {extra_legs} extra prefill legs"
        evidence = f"{count} requests x {tokens} tokens: {retractions} retractions on decode, {how}"
        return not problems, evidence + ("; " + "; ".join(problems[:3]) if problems else "; all served in full")

    def leg_failure_case(self, role: str, status: int) -> tuple[bool, str]:
        """The relay answers one leg with ``status``; the client must get an answer and the other leg
        must be gone from its server, both within FAST_S."""
        note = self.idle_or_note()
        plan = self.fleet.fail_next(role, status)
        try:
            answer = self.request("legfail", timeout=30.0)
        finally:
            self.fleet.clear_faults()
        if not plan.failed:
            return False, f"the {role} leg never reached a relay; client got {answer.summary()}{note}"
        start = time.monotonic()
        busy = self.fleet.wait_idle(FAST_S)
        idle_after = time.monotonic() - start
        hit = plan.failed[0].proxy
        evidence = f"relay {hit} answered the {role} leg HTTP {status}; client got {answer.summary()}"
        if answer.error or answer.elapsed > FAST_S:
            return False, f"{evidence}: not within {FAST_S:g} s (the other leg waited){note}"
        if status >= 500 and 400 <= answer.status < 500:
            return False, f"{evidence}: a server's {status} reached the client as a client error{note}"
        if busy:
            return False, f"{evidence}; still held {FAST_S:g} s later: {', '.join(busy)}{note}"
        return True, f"{evidence}; every server idle {idle_after:.2f} s later{note}"

    def _in_flight_then(self, case: str, act: Callable[[Server], str]) -> tuple[bool, str]:
        """Long requests in flight; ``act`` breaks the first decode server seen holding some; every
        request must end (failures within FAST_S of the break) and the prefill side be idle within FAST_S."""
        note = self.idle_or_note()

        def timed() -> tuple[Answer, float]:
            answer = self.request(case, max_new_tokens=1500, timeout=60.0)
            return answer, time.monotonic()

        seen = {s.name: len(s.proxy.arrivals) for s in self.fleet.decodes if s.proxy is not None}

        def holding() -> Server | None:  # the relays see a decode leg arrive at once; /get_load lags
            return next((s for s in self.fleet.decodes if s.proxy is not None
                         and len(s.proxy.arrivals) > seen[s.name]), None)

        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = [pool.submit(timed) for _ in range(6)]
            deadline, victim = time.monotonic() + 10, None
            while time.monotonic() < deadline and not all(f.done() for f in futures):
                victim = holding()
                if victim is not None:
                    break
                time.sleep(0.02)
            if victim is None:
                done = [f.result()[0].summary()[:150] for f in futures if f.done()]
                return False, (f"no request reached a decode server within 10 s; {len(done)} of 6 had ended: "
                               f"{'; '.join(done[:2])}{note}")
            time.sleep(0.3)  # decoding by now: a 1500-token request takes over a second here
            what = act(victim)
            broke = time.monotonic()
            ended = [f.result() for f in futures]
        busy_prefill = [b for b in self.fleet.wait_idle(FAST_S) if b.startswith("p")]
        statuses = sorted(0 if a.error else a.status for a, _ in ended)
        problems = []
        hung = [a for a, _ in ended if a.error]
        slow = [at - broke for a, at in ended if not a.ok and at - broke > FAST_S]
        if hung:
            problems.append(f"{len(hung)} got no answer: {hung[0].summary()}")
        if slow:
            problems.append(f"{len(slow)} failed only {max(slow):.1f} s after the break")
        if busy_prefill:
            problems.append(f"prefill still held {FAST_S:g} s later: {', '.join(busy_prefill)}")
        evidence = f"{what}; 6 in-flight requests of 1500 tokens ended with HTTP {statuses}"
        return not problems, evidence + ("; " + "; ".join(problems) if problems else "; prefill side idle") + note

    def case_closed_port_fails_fast(self) -> tuple[bool, str]:
        def close(victim: Server) -> str:
            assert victim.proxy is not None
            victim.proxy.close_port()
            return f"closed {victim.name}'s port mid-request"
        return self._in_flight_then("closed", close)

    def case_killed_rank_fails_fast(self) -> tuple[bool, str]:
        return self._in_flight_then("killed", lambda victim: f"SIGKILLed {victim.name}'s ranks "
                                    f"(pid {self.fleet.kill_ranks(victim)})")

    def case_killed_prefill_ranks_fail_fast(self) -> tuple[bool, str]:
        """A prefill server's ranks die (its front stays up and refuses with 503); requests sent at once
        must all be answered, and every decode leg paired with a dead prefill gone, within FAST_S."""
        note = self.idle_or_note()
        victim = self.fleet.prefills[0]
        assert victim.proxy is not None
        before = len(victim.proxy.arrivals)
        pids = self.fleet.kill_ranks(victim)
        time.sleep(0.2)
        answers = self.many([lambda: self.request("pkilled", timeout=30.0) for _ in range(8)])
        hits = len(victim.proxy.arrivals) - before
        busy = [b for b in self.fleet.wait_idle(FAST_S) if b.startswith("d")]
        statuses = sorted(0 if a.error else a.status for a in answers)
        evidence = (f"SIGKILLed {victim.name}'s ranks (pid {pids}); {hits} prefill legs reached it; 8 requests "
                    f"ended with HTTP {statuses}, slowest {max(a.elapsed for a in answers):.2f} s")
        problems = []
        if not hits and not before:
            problems.append(f"no prefill leg reached {victim.name}, before or after (not exercised)")
        elif not hits:  # it served legs before: the router saw the ranks die (load or health poll) first
            evidence += f"; the router routed around {victim.name} (it had served {before} legs before)"
        late = [a for a in answers if a.error or a.elapsed > FAST_S]
        if late:
            problems.append(f"{len(late)} not answered within {FAST_S:g} s: {late[0].summary()[:200]}")
        if busy:
            problems.append(f"decode still held {FAST_S:g} s later: {', '.join(busy)}")
        return not problems, evidence + ("; " + "; ".join(problems) if problems else "; decode side idle") + note

    def case_no_capacity_answers_503(self) -> tuple[bool, str]:
        """No reachable decode unit: once the router could notice (a request every 0.5 s for up to
        15 s), it answers 503, never hanging."""
        for s in self.fleet.decodes:
            assert s.proxy is not None
            s.proxy.close_port()
        start, seen = time.monotonic(), []
        while True:
            answer = self.request("nocap", timeout=30.0)
            seen.append(answer.summary().split(":")[0])
            if answer.status == 503 or answer.error or time.monotonic() - start > 15:
                break
            time.sleep(0.5)
        first = f"first answer {seen[0]}" + (f", then {len(seen) - 1} more" if len(seen) > 1 else "")
        return answer.status == 503, f"every decode port closed: {first}; last {answer.summary()[:300]}"

    # ------------------------------------------------------------------ order and running
    def _decode_pins(self) -> list[tuple[int | None, int | None]]:
        d_dp = max(s.dp_size for s in self.fleet.decodes)
        return [(None, j % d_dp) for j in (1, 0, 1, 1)]

    def _prefill_pins(self) -> list[tuple[int | None, int | None]]:
        p_dp = max(s.dp_size for s in self.fleet.prefills)
        return [(i % p_dp, None) for i in (p_dp - 1, 0, p_dp - 1, 1)]

    def cases(self) -> list[tuple[str, Callable[[], tuple[bool, str]]]]:
        out: list[tuple[str, Callable[[], tuple[bool, str]]]] = [
            ("first_request_explicit_prefill_rank", self.case_first_request_explicit_prefill_rank),
            ("every_rank_pair_reachable", self.case_every_rank_pair_reachable),
            ("prefill_dp_1", self.case_prefill_dp_1),
            ("explicit_decode_rank[data_parallel_rank]", self.case_explicit_decode_rank_data_parallel_rank),
            ("explicit_decode_rank[routed_dp_rank]", self.case_explicit_decode_rank_routed_dp_rank),
            ("explicit_decode_rank[X-Data-Parallel-Rank]", self.case_explicit_decode_rank_header),
            ("explicit_prefill_rank[prefill_data_parallel_rank]",
             self.case_explicit_prefill_rank_prefill_data_parallel_rank),
            ("explicit_prefill_rank[disagg_prefill_dp_rank]", self.case_explicit_prefill_rank_disagg_prefill_dp_rank),
            ("explicit_ranks_both_legs", self.case_explicit_ranks_both_legs),
            ("out_of_range_ranks_refused_naming_the_field", self.case_out_of_range_ranks_refused_naming_the_field),
        ]
        for route in ROUTES:
            for stream in (False, True):
                out.append((f"{route}[{'stream' if stream else 'non-stream'}]",
                            lambda r=route, s=stream: self.route_case(r, s)))
        out += [
            ("kv_transferred_not_recomputed", self.case_kv_transferred_not_recomputed),
            ("arrival_order[prefill_first]", lambda: self.arrival_case("decode")),
            ("arrival_order[decode_first]", lambda: self.arrival_case("prefill")),
            ("retraction_under_kv_pressure", self.case_retraction_under_kv_pressure),
        ]
        for role in ("prefill", "decode"):
            for status in (400, 503):
                out.append((f"leg_fails_fast[{role} {status}]", lambda r=role, s=status: self.leg_failure_case(r, s)))
        out += [
            ("leg_fails_fast[killed prefill ranks]", self.case_killed_prefill_ranks_fail_fast),
            ("leg_fails_fast[killed decode ranks]", self.case_killed_rank_fails_fast),
            ("leg_fails_fast[closed port]", self.case_closed_port_fails_fast),
            ("no_capacity_answers_503", self.case_no_capacity_answers_503),
        ]
        return out

    def run(self, only: set[str] | None = None, progress: Callable[[CaseResult], None] | None = None
            ) -> list[CaseResult]:
        try:
            return self._run(only, progress)
        finally:
            self.client.close()

    def _run(self, only: set[str] | None, progress: Callable[[CaseResult], None] | None) -> list[CaseResult]:
        results = []
        for name, case in self.cases():
            if only and name not in only:
                continue
            start = time.monotonic()
            try:
                passed, evidence = case()
            except Exception as e:  # a case that crashed fails with its error as the evidence
                passed, evidence = False, f"the case raised {type(e).__name__}: {e}"[:500]
            result = CaseResult(name, passed, evidence, time.monotonic() - start)
            results.append(result)
            if progress:
                progress(result)
        return results
