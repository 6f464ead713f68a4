"""Session-wide test settings: every process the tests start keeps its temp files (the servers'
``pdserve-*`` socket folders included) in one folder that is removed when the session ends, even
when a test killed a server before it could clean up."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


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
