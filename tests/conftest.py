"""Session-wide test settings: every process the tests start keeps its temp files (the servers'
``pdserve-*`` socket folders included) in one folder that is removed when the session ends, even
when a test killed a server before it could clean up.

GPUs are hidden from the suite (``CUDA_VISIBLE_DEVICES=""``, inherited by every server the tests
start): engines default to CUDA in bfloat16 when a GPU is visible, which would silently turn the
float32 token-identity tests against transformers on CPU into bf16-vs-fp32 comparisons, put shared
memory P/D pools on a device they cannot live on, and have every test server claim a share of one
GPU's memory. GPU checks live in ``benchmarks/gpu_check.sh``; ``PDSERVE_TEST_CUDA=1`` keeps GPUs visible.

The test process runs torch on one thread (``OMP_NUM_THREADS=1`` before torch loads; the servers it starts
choose their own): with two, each op waits at an OpenMP barrier whenever a server or a neighbour holds
the other core (a sampler test took 3.6 s instead of 0.08 s beside one busy process).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
if os.environ.get("PDSERVE_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA (see the module docstring)


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir():
    folder = tempfile.mkdtemp(prefix="pdserve-tests-")
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = folder
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        yield folder
    finally:
        if saved is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved
        tempfile.tempdir = None
        shutil.rmtree(folder, ignore_errors=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test of a transfer-engine backend (a ``backend`` parameter, or the ``engine_pair`` fixture's)
    skips, printing why, only where this machine cannot load the engine — and fails instead under
    ``PDSERVE_REQUIRE_ENGINES=1`` (CI on the machine type that can)."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return
    from pdserve.disagg.config import ENGINE_LIBRARIES, library_error

    backend = callspec.params.get("backend", callspec.params.get("engine_pair"))
    if backend not in ENGINE_LIBRARIES:
        return
    why = library_error(backend)
    if why is None:
        return
    if os.environ.get("PDSERVE_REQUIRE_ENGINES") == "1":
        pytest.fail(f"PDSERVE_REQUIRE_ENGINES=1 but {why}")
    print(f"\nskipping {item.nodeid}: {why}")
    pytest.skip(why)
