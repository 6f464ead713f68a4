"""The targets a client of the field is pointed at: a mixed server, and ``pdserve router`` in P/D
mode in front of a prefill and a decode server (all real processes on free ports, tiny default model)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.server_harness import ServerProcess, free_port, launch

SERVER_FLAGS = ["--max-total-tokens", "8192", "--page-size", "16", "--log-level", "warning"]


@dataclass
class ClientFleet:
    mixed: ServerProcess
    prefill: ServerProcess
    decode: ServerProcess
    router: ServerProcess

    @property
    def targets(self) -> dict[str, ServerProcess]:
        """What a client runs against: ``mixed`` (a server) and ``router-pd``."""
        return {"mixed": self.mixed, "router-pd": self.router}


@contextlib.contextmanager
def client_fleet(log_dir: Path, server_flags: list[str] = SERVER_FLAGS) -> Iterator[ClientFleet]:
    """Start the fleet, wait until every part answers ``/health``, stop it all on exit."""
    started: list[ServerProcess] = []
    try:
        mixed = launch(server_flags, log_dir)
        started.append(mixed)
        prefill = launch([*server_flags, "--disaggregation-mode", "prefill",
                          "--disaggregation-bootstrap-port", str(free_port())], log_dir)
        started.append(prefill)
        decode = launch([*server_flags, "--disaggregation-mode", "decode"], log_dir)
        started.append(decode)
        for server in started:
            server.wait_healthy()
        router = launch(["--pd-disaggregation", "--prefill", prefill.url, "--decode", decode.url,
                         "--log-level", "warning"], log_dir, command="router")
        started.append(router)
        router.wait_healthy()
        yield ClientFleet(mixed, prefill, decode, router)
    finally:
        for server in reversed(started):
            server.stop()
