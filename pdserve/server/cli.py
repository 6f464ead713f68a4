"""``pdserve serve``: parse the flags, then run the front (uvicorn) which spawns the DP workers.

Importing this module stays light (no torch, no FastAPI): ``pdserve --help`` imports every
subcommand's module.
"""

from __future__ import annotations

import argparse
import logging

from pdserve.http_common import add_http_limit_arguments, http_limits_from_args, uvicorn_server
from pdserve.ports import PortInUse, check_free, listen_socket
from pdserve.server.config import add_arguments as _add_arguments
from pdserve.server.config import server_config_from_args
from pdserve.server.kv_events_config import bound_tcp_ports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_arguments(parser)
    add_http_limit_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        config = server_config_from_args(args)
        config.validate()
        limits = http_limits_from_args(args)
    except ValueError as e:
        raise SystemExit(f"pdserve serve: {e}") from None
    try:  # before any worker starts: a busy port fails here, naming who holds it
        sock = listen_socket(config.host, config.port)
        if config.disagg.mode == "prefill" and config.disagg.bootstrap_port:
            check_free(config.host, config.disagg.bootstrap_port)
    except PortInUse as e:
        raise SystemExit(f"pdserve serve: {e}; stop it or choose another "
                         f"{'--port' if e.port == config.port else '--disaggregation-bootstrap-port'}") from None
    if config.kv_events is not None and config.kv_events.enabled:
        try:  # the ZMQ event ports of every rank, before any worker starts
            for host, port in bound_tcp_ports(config.kv_events, config.dp_size):
                check_free(host, port)
        except PortInUse as e:
            raise SystemExit(f"pdserve serve: {e}; it is a --kv-events-config port (the endpoint's or the "
                             "replay endpoint's, plus the DP rank): choose others") from None
    from pdserve.server.app import create_app

    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s [front] %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(config)
    server = uvicorn_server(app, limits, host=config.host, port=config.port, log_level=config.log_level,
                            access_log=config.log_level == "debug",
                            timeout_graceful_shutdown=int(config.graceful_shutdown_s))
    state = app.state.server
    fatal: list[str] = []

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        logging.getLogger("pdserve.server").error("cannot start: %s", reason)
        server.should_exit = True

    state.controller.on_fatal = on_fatal
    server.run(sockets=[sock])
    return 1 if fatal else 0
