"""``pdserve conformance``: the suite passes on ``pdserve router``, fails deliberately broken routers
on the cases they break (with a readable reason), and records what sglang-router 0.3.2 passes.

Each suite run starts its own sim fleet (prefill DP 3, 3, 1; decode DP 2, 2) and router, so these
tests take about a minute each on the 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.cli import main
from pdserve.conformance.cases import CaseResult
from pdserve.conformance.cli import format_table, run_suite
from pdserve.conformance.client import Answer

STUB = Path(__file__).resolve().parent / "conformance_stub_router.py"
PDSERVE_ROUTER = ("{python} -m pdserve.cli router --host 127.0.0.1 --port {port} --pd-disaggregation "
                  "{prefill_args} {decode_args} --honor-client-ranks --log-level warn")
SGLANG_ROUTER = ("{python} -m sglang_router.launch_router --host 127.0.0.1 --port {port} --pd-disaggregation "
                 "{prefill_args} {decode_args} --prometheus-host 127.0.0.1 --prometheus-port {free_port} "
                 "--log-level warn")
RANK_CASES = {
    "first_request_explicit_prefill_rank", "every_rank_pair_reachable",
    "explicit_decode_rank[data_parallel_rank]", "explicit_decode_rank[routed_dp_rank]",
    "explicit_decode_rank[X-Data-Parallel-Rank]", "explicit_prefill_rank[prefill_data_parallel_rank]",
    "explicit_prefill_rank[disagg_prefill_dp_rank]", "explicit_ranks_both_legs",
    "out_of_range_ranks_refused_naming_the_field",
}
ROUTE_CASES = {f"{r}[{s}]" for r in ("/generate", "/v1/completions", "/v1/chat/completions")
               for s in ("stream", "non-stream")}
# pdserve router's one known gap (its hot path, app.py/proxy.py, is other work): with
# --honor-client-ranks it reads the body's rank fields but not the X-Data-Parallel-Rank header,
# which it neither forwards nor refuses, so the decode rank the header names is ignored.
PDSERVE_ROUTER_GAPS: dict[str, str] = {}
# And one race, seen in some runs only: after a 5xx on one leg it retries with the client's rid while
# the decode server still holds the cancelled first attempt, which refuses the retry with 400 "rid ...
# is already in use" (the router awaits only the aborts it sent, and none for a leg it cancelled).
PDSERVE_ROUTER_RACE = ("leg_fails_fast[prefill 503]", "leg_fails_fast[decode 503]")
# What sglang-router 0.3.2 (PD mode, no --dp-aware) passes on this fleet, from its recorded runs.
# Not here, as it depends on timing: explicit_decode_rank[data_parallel_rank]. It forwards the
# client's data_parallel_rank to both legs, so prefill runs on that rank while decode, without a
# prefill rank, looks the room up when prefill registered it first (served) and else takes
# room % 3 (the servers refuse the mismatch with 400 "prefill rank i holds bootstrap_room ...").
SGLANG_PASSES = {
    "every_rank_pair_reachable", "prefill_dp_1", *ROUTE_CASES, "kv_transferred_not_recomputed",
    "arrival_order[prefill_first]", "arrival_order[decode_first]", "retraction_under_kv_pressure",
}


def by_name(result: dict) -> dict[str, dict]:
    return {c["name"]: c for c in result["cases"]}


def test_the_driver_imports_no_torch():
    code = "import sys, pdserve.conformance.cli, pdserve.conformance.cases; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_unknown_placeholder_is_refused_before_anything_starts(capsys):
    assert main(["conformance", "--router", "my-router --listen {listen_port}"]) == 2
    assert "bad placeholder 'listen_port'" in capsys.readouterr().err


def test_the_table_has_one_row_per_case_and_a_total():
    table = format_table([CaseResult("a_case", True, "served P p0 rank 2 / D d1 rank 1"),
                          CaseResult("another_case", False, "ignored (decode rank 1 asked, 0 served)")])
    lines = table.splitlines()
    assert lines[1].startswith("PASS  a_case ") and "served P p0 rank 2" in lines[1]
    assert lines[2].startswith("FAIL  another_case ") and "ignored" in lines[2]
    assert lines[-1] == "1/2 cases passed"


def test_answer_meta_reads_openai_stream_chunks_and_rank_headers():
    a = Answer("/v1/completions", True, "r1", status=200, headers={"x-decode-dp-rank": "1"}, events=[
        {"choices": [{"text": "a"}]},
        {"choices": [{"text": "b", "meta_info": {"prefill_dp_rank": 2, "bootstrap_room": 7, "kv_transfer_bytes": 64}}]},
    ])
    assert a.meta() == {"prefill_dp_rank": 2, "bootstrap_room": 7, "kv_transfer_bytes": 64, "decode_dp_rank": 1}


@pytest.mark.timeout(300)
def test_the_suite_passes_on_pdserve_router(tmp_path):
    result = run_suite(PDSERVE_ROUTER, tmp_path, [3, 3, 1], [2, 2], echo=False)
    cases = by_name(result)
    assert len(cases) == 28
    failed = {name: c["evidence"] for name, c in cases.items() if not c["passed"] and name not in PDSERVE_ROUTER_GAPS
              and not (name in PDSERVE_ROUTER_RACE and "is already in use" in c["evidence"])}
    assert not failed, json.dumps(failed, indent=1)
    for name, reason in PDSERVE_ROUTER_GAPS.items():  # fixed? then move it out of the gaps
        assert not cases[name]["passed"] and reason in cases[name]["evidence"], cases[name]
    assert "retractions on decode" in cases["retraction_under_kv_pressure"]["evidence"]
    assert "decode 0;" in cases["kv_transferred_not_recomputed"]["evidence"]


@pytest.mark.timeout(300)
def test_a_router_ignoring_explicit_ranks_fails_the_rank_cases(tmp_path):
    result = run_suite(f"{{python}} {STUB} --port {{port}} {{prefill_args}} {{decode_args}}", tmp_path,
                       [3, 3, 1], [2, 2], echo=False, only=RANK_CASES | ROUTE_CASES | {"kv_transferred_not_recomputed"})
    cases = by_name(result)
    for name in RANK_CASES:
        assert not cases[name]["passed"], cases[name]
    for name in RANK_CASES - {"every_rank_pair_reachable", "out_of_range_ranks_refused_naming_the_field"}:
        assert "ignored (" in cases[name]["evidence"], cases[name]
    assert "pairs never served" in cases["every_rank_pair_reachable"]["evidence"]
    assert "data_parallel_rank=2: HTTP 200" in cases["out_of_range_ranks_refused_naming_the_field"]["evidence"]
    for name in ROUTE_CASES | {"kv_transferred_not_recomputed"}:  # otherwise a correct P/D router
        assert cases[name]["passed"], cases[name]


@pytest.mark.timeout(300)
def test_a_mixed_router_over_the_decode_servers_fails_every_p_d_case(tmp_path):
    out = tmp_path / "result.json"
    template = "{python} -m pdserve.cli router --host 127.0.0.1 --port {port} --worker-urls {decode_urls}"
    checked = ROUTE_CASES | {"kv_transferred_not_recomputed", "every_rank_pair_reachable", "prefill_dp_1",
                             "leg_fails_fast[prefill 400]"}
    code = main(["conformance", "--router", template, "--json", str(out), "--log-dir", str(tmp_path / "logs"),
                 "--router-ready-timeout", "5", "--cases", *sorted(checked)])
    assert code == 1
    result = json.loads(out.read_text())
    assert all(set(c) >= {"name", "passed", "evidence"} for c in result["cases"])
    assert result["router_ready"].startswith("never ready")
    cases = by_name(result)
    for name in ROUTE_CASES | {"kv_transferred_not_recomputed", "every_rank_pair_reachable", "prefill_dp_1"}:
        assert not cases[name]["passed"], cases[name]
    assert "HTTP 503" in cases["/generate[non-stream]"]["evidence"]
    assert "no request had its prefill leg" in cases["prefill_dp_1"]["evidence"]
    assert "the prefill leg never reached a relay" in cases["leg_fails_fast[prefill 400]"]["evidence"]


@pytest.mark.timeout(420)
def test_sglang_router_0_3_2_passes_what_it_passed_and_its_failures_are_recorded(tmp_path, record_property):
    result = run_suite(SGLANG_ROUTER, tmp_path, [3, 3, 1], [2, 2], echo=False)
    cases = by_name(result)
    failing = {name: c["evidence"] for name, c in cases.items() if not c["passed"]}
    record_property("sglang_router_failing_cases", json.dumps(failing))
    print("sglang-router 0.3.2 fails:\n" + "\n".join(f"  {k}: {v}" for k, v in failing.items()))
    assert not SGLANG_PASSES & set(failing), {k: failing[k] for k in SGLANG_PASSES & set(failing)}
