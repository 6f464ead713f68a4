"""``pdserve router``: parse the flags, then serve the router app with uvicorn.

Importing this module stays light: ``pdserve --help`` imports every subcommand's module.
"""

from __future__ import annotations

import argparse
import logging
import socket

from pdserve.http_common import add_http_limit_arguments, http_limits_from_args, uvicorn_server
from pdserve.ports import PortInUse, listen_socket
from pdserve.router.config import add_arguments as _add_arguments
from pdserve.router.config import router_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_arguments(parser)
    add_http_limit_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        config = router_config_from_args(args)
        config.validate()
        limits = http_limits_from_args(args)
        sock = listen_socket(config.host, config.port)
    except ValueError as e:
        raise SystemExit(f"pdserve router: {e}") from None
    except PortInUse as e:
        raise SystemExit(f"pdserve router: {e}; stop it or choose another --port") from None
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s [router] %(levelname)s %(name)s: %(message)s")

    def serve(listener: socket.socket) -> None:
        from pdserve.router.app import create_app  # in each process: after its metrics folder is set

        app = create_app(config)
        uvicorn_server(app, limits, host=config.host, port=config.port, log_level=config.log_level,
                       access_log=config.log_level == "debug", timeout_graceful_shutdown=5).run(sockets=[listener])

    if config.router_processes > 1:
        from pdserve.router.processes import serve_processes

        return serve_processes(config.router_processes, serve, sock)
    serve(sock)
    return 0
