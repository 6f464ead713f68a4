"""Benchmark clients of the field, unmodified (only target, model name and a local tokenizer path
given), each run for 20 streaming requests against a mixed server and through ``pdserve router`` in
P/D mode: 0 errors, read from the client's own report.

The clients live in their own virtualenvs (they pin packages the test environment does not want):
``$PDSERVE_CLIENT_VENVS`` (default ``.ci/clients``, filled by ``.ci/install_clients``) holds
``guidellm/`` (guidellm 0.8.1) and ``inference-perf/`` (inference-perf 0.7.0, Python 3.12). A missing
client is a skip here, and a failure when ``PDSERVE_REQUIRE_CLIENTS=1`` (CI sets it).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.client_fleet import ClientFleet, client_fleet
from tests.server_harness import REPO_ROOT

VENVS = Path(os.environ.get("PDSERVE_CLIENT_VENVS", REPO_ROOT / ".ci" / "clients"))
CLIENT_TIMEOUT_S = 240
REQUESTS = 20
CLIENT_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "PYTHONPATH": "", "NO_COLOR": "1"}


def client_binary(venv: str, name: str) -> Path:
    path = VENVS / venv / "bin" / name
    if not path.exists():
        message = f"{path} is missing: run .ci/install_clients (or set PDSERVE_CLIENT_VENVS)"
        if os.environ.get("PDSERVE_REQUIRE_CLIENTS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def guidellm() -> Path:
    return client_binary("guidellm", "guidellm")


@pytest.fixture(scope="module")
def inference_perf() -> Path:
    return client_binary("inference-perf", "inference-perf")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with client_fleet(tmp_path_factory.mktemp("bench-clients")) as f:
        yield f


@pytest.fixture(scope="module")
def model(fleet: ClientFleet) -> tuple[str, str]:
    """The served model name and its local tokenizer folder, as the servers report them."""
    info = httpx.get(fleet.mixed.url + "/model_info", timeout=10).json()
    assert os.path.isabs(info["tokenizer_path"])
    return info["served_model_name"], info["tokenizer_path"]


def run_client(cmd: list[str | Path], cwd: Path) -> str:
    """Run a client to the end; its output on failure."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=CLIENT_TIMEOUT_S, env={**os.environ, **CLIENT_ENV}, stdin=subprocess.DEVNULL)
    output = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{output}"
    return output


@pytest.mark.parametrize("target", ["mixed", "router-pd"])
def test_guidellm_streams_without_errors(guidellm: Path, fleet: ClientFleet, model, target, tmp_path):
    name, tokenizer = model
    report = tmp_path / "guidellm.json"
    run_client([guidellm, "run", "--backend", f"kind=openai_http,target={fleet.targets[target].url},model={name}",
                "--profile", "kind=constant,rate=10", "--constraint", f"kind=max_requests,count={REQUESTS}",
                "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=8",
                "--tokenizer", f"kind=hf_auto,model={tokenizer}", "--output", f"kind=json,path={report}",
                "--disable-console-interactive"], tmp_path)
    totals = json.loads(report.read_text())["benchmarks"][0]["metrics"]["request_totals"]
    print(f"guidellm x {target}: {totals}")
    assert totals == {"successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}


@pytest.mark.parametrize("target", ["mixed", "router-pd"])
def test_inference_perf_streams_without_errors(inference_perf: Path, fleet: ClientFleet, model, target, tmp_path):
    """Completions (its ``random`` data generator serves no chat API)."""
    name, tokenizer = model
    config = tmp_path / "config.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "api": {"type": "completion", "streaming": True},
        "data": {"type": "random", "input_distribution": {"min": 16, "max": 64, "mean": 32, "std_dev": 8},
                 "output_distribution": {"min": 4, "max": 12, "mean": 8, "std_dev": 2}},
        "load": {"type": "constant", "stages": [{"rate": REQUESTS // 4, "duration": 4}]},
        "server": {"type": "vllm", "model_name": name, "base_url": fleet.targets[target].url, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": tokenizer},
        "report": {"request_lifecycle": {"summary": True, "per_stage": False, "per_request": False}},
        "storage": {"local_storage": {"path": str(tmp_path / "reports")}},
    }))
    run_client([inference_perf, "--config_file", config], tmp_path)
    summary = json.loads((tmp_path / "reports" / "summary_lifecycle_metrics.json").read_text())
    print(f"inference-perf x {target}: successes {summary['successes']['count']}, "
          f"failures {summary['failures']['count']}")
    assert summary["successes"]["count"] == REQUESTS and summary["failures"]["count"] == 0
