"""All simulated DP ranks of one server as threads of one process: ``python -m pdserve.sim.host SPEC...``.

A sim rank computes nothing (its steps are sleeps), so one process per rank would only cost a
Python interpreter with torch (~0.3 GB and seconds of start-up) each. Every rank keeps its own
:class:`~pdserve.server.worker.Worker` loop, sockets and P/D manager, exactly as in its own
process; the controller sees one process for all its ranks (if it dies, they all fail, as it would
for a node). Sleeping ranks release the GIL, so ranks wait concurrently; their Python work per
step (well under a millisecond) serialises, which the per-step overhead of the cost models
covers at GPU step times.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import traceback

from pdserve.server import messages as msg
from pdserve.server.worker import Worker

logger = logging.getLogger("pdserve.sim.host")


def run_rank(spec: msg.WorkerSpec, codes: list[int]) -> None:
    worker = Worker(spec)
    try:
        worker.start_engine()
        codes[spec.dp_rank] = worker.run()
    except Exception:
        text = traceback.format_exc()
        logger.error("simulated dp rank %d failed:\n%s", spec.dp_rank, text)
        worker.send(msg.WorkerFailed(spec.dp_rank, text))
        codes[spec.dp_rank] = 1
    finally:
        worker.close()


def main(argv: list[str] | None = None) -> int:
    specs = [msg.decode_spec(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the front shuts us down
    logging.basicConfig(level=specs[0].log_level.upper(),
                        format="%(asctime)s [%(threadName)s] %(levelname)s %(name)s: %(message)s")
    codes = [0] * (max(s.dp_rank for s in specs) + 1)
    threads = [threading.Thread(target=run_rank, args=(s, codes), name=f"sim-dp{s.dp_rank}") for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
