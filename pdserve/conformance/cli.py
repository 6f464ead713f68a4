"""``pdserve conformance --router TEMPLATE``: the DP-rank contract suite against any P/D router.

TEMPLATE is the router's command line; placeholders: ``{port}`` (where it must listen),
``{prefill_args}`` (``--prefill URL BOOTSTRAP_PORT`` per prefill server), ``{decode_args}``
(``--decode URL`` per decode server), ``{prefill_urls}``, ``{decode_urls}`` (space-separated) and
``{python}`` (this interpreter, e.g. ``{python} -m pdserve.cli router ...``) and ``{free_port}`` (one
more free port, e.g. for a metrics listener). The suite starts a sim
fleet with unequal DP sizes behind fault relays, starts the router, runs every case and prints one
row per case; exit status 0 only when every case passed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from pdserve.bench.cluster import ClusterError
from pdserve.conformance.cases import CaseResult, Suite
from pdserve.conformance.fleet import PLACEHOLDERS, Fleet


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated DP sizes, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"every DP size must be >= 1, got {text!r}")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", required=True, metavar="TEMPLATE",
                   help="the router's command line with placeholders " + ", ".join(f"{{{x}}}" for x in PLACEHOLDERS))
    p.add_argument("--json", default=None, metavar="FILE", help='also write {"cases": [{"name", "passed", "evidence"}]} here')
    p.add_argument("--prefill-dp", type=_sizes, default=[3, 3, 1],
                   help="DP size of each prefill server (default: 3,3,1: unequal sizes and a DP-1 server)")
    p.add_argument("--decode-dp", type=_sizes, default=[2, 2], help="DP size of each decode server (default: 2,2)")
    p.add_argument("--decode-max-total-tokens", type=int, default=2048,
                   help="KV tokens per decode rank, small so that the retraction case runs out (default: 2048)")
    p.add_argument("--cases", nargs="+", default=None, metavar="NAME", help="run only these cases (default: all)")
    p.add_argument("--log-dir", default=None, help="keep the servers' and router's logs here (default: a temporary "
                   "folder, removed afterwards)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default: 0)")
    p.add_argument("--router-ready-timeout", type=float, default=20.0, metavar="S",
                   help="how long to wait for the router's /readiness (else /health) to answer 200; a router "
                   "that never does is still tested (default: 20)")


def format_table(results: list[CaseResult], width: int = 110) -> str:
    """One row per case: PASS/FAIL, the name, the evidence wrapped under it."""
    name_w = max([len(r.name) for r in results] + [4])
    lines = [f"{'':4}  {'case':{name_w}}  evidence"]
    for r in results:
        wrapped = textwrap.wrap(r.evidence, max(40, width - name_w - 8)) or [""]
        lines.append(f"{'PASS' if r.passed else 'FAIL'}  {r.name:{name_w}}  {wrapped[0]}")
        lines += [f"{'':4}  {'':{name_w}}  {w}" for w in wrapped[1:]]
    passed = sum(r.passed for r in results)
    lines.append(f"{passed}/{len(results)} cases passed")
    return "\n".join(lines)


def run_suite(template: str, log_dir: Path, prefill_dp: list[int], decode_dp: list[int],
              decode_max_total_tokens: int = 2048, only: set[str] | None = None, seed: int = 0,
              echo: bool = True, ready_timeout: float = 20.0) -> dict:
    """Start the fleet and the router, run the cases; the result as written by ``--json``."""
    start = time.monotonic()
    fleet = Fleet(log_dir, prefill_dp, decode_dp, decode_max_total_tokens)
    try:
        fleet_s = time.monotonic() - start
        ready = fleet.start_router(template, ready_timeout=ready_timeout)
        if echo:
            print(f"fleet: prefill DP {prefill_dp}, decode DP {decode_dp} (sim), healthy in {fleet_s:.1f} s; "
                  f"router: {template} ({ready})", flush=True)

        def progress(r: CaseResult) -> None:
            if echo:
                print(f"  {'PASS' if r.passed else 'FAIL'} {r.name} ({r.seconds:.1f} s)", flush=True)
        results = Suite(fleet, seed).run(only, progress)
    finally:
        fleet.close()
    return {"router": template, "router_ready": ready, "prefill_dp": prefill_dp, "decode_dp": decode_dp,
            "wall_s": round(time.monotonic() - start, 1), "cases": [r.as_json() for r in results]}


def run(args: argparse.Namespace) -> int:
    try:
        args.router.format(**{k: "" for k in PLACEHOLDERS})
    except (KeyError, IndexError, ValueError) as e:
        print(f"--router: bad placeholder {e} (known: {', '.join(PLACEHOLDERS)})", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="pdserve-conformance-"))
    try:
        result = run_suite(args.router, log_dir, args.prefill_dp, args.decode_dp, args.decode_max_total_tokens,
                           set(args.cases) if args.cases else None, args.seed,
                           ready_timeout=args.router_ready_timeout)
    except ClusterError as e:
        print(f"conformance: could not start the fleet or the router: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.log_dir:
            shutil.rmtree(log_dir, ignore_errors=True)
    results = [CaseResult(c["name"], c["passed"], c["evidence"], c["seconds"]) for c in result["cases"]]
    print(format_table(results))
    print(f"whole run {result['wall_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if results and all(r.passed for r in results) else 1
