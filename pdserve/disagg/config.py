"""P/D options (``--disaggregation-*`` flags, SGLang's names) shared by the managers and the server.

Kept free of heavy imports: ``pdserve --help`` loads it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

MODES = ("null", "prefill", "decode")
BACKENDS = ("tcp", "shm")  # one module each under pdserve.disagg.transfer (they move KV bytes)
SIM_BACKEND = "sim"  # --simulate only: protocol frames, no bytes (pdserve.sim.transfer)
ALL_BACKENDS = (*BACKENDS, SIM_BACKEND)


@dataclass
class DisaggConfig:
    """Role of a server in P/D disaggregation and the bounds of every wait."""

    mode: str = "null"  # null (mixed), prefill or decode
    bootstrap_port: int = 8998  # prefill: where its bootstrap service listens; decode: default when a request gives none
    transfer_backend: str = "tcp"
    host: str = "127.0.0.1"  # address this server's control and transfer sockets bind and publish
    bootstrap_timeout: float = 30.0  # decode: reach the prefill server's bootstrap service and rank; prefill: register
    waiting_timeout: float = 300.0  # either side: the other half of a room must show up (and prefill compute) within this
    transfer_timeout: float = 60.0  # a started transfer may stall at most this long

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"disaggregation mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.transfer_backend not in ALL_BACKENDS:
            raise ValueError(
                f"disaggregation transfer backend must be one of {', '.join(ALL_BACKENDS)}, got {self.transfer_backend!r}"
            )
        if not 0 <= self.bootstrap_port < 65536:
            raise ValueError(f"disaggregation bootstrap port must be in [0, 65535], got {self.bootstrap_port}")
        for name in ("bootstrap_timeout", "waiting_timeout", "transfer_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"disaggregation {name.replace('_', ' ')} must be > 0 seconds, got {getattr(self, name)}")


def add_disagg_arguments(parser: argparse.ArgumentParser) -> None:
    d = DisaggConfig()
    parser.add_argument("--disaggregation-mode", default=d.mode, choices=MODES, help="P/D role of this server")
    parser.add_argument(
        "--disaggregation-bootstrap-port", type=int, default=d.bootstrap_port,
        help="prefill: port of its bootstrap service; decode: used when a request's bootstrap_port is null",
    )
    parser.add_argument("--disaggregation-transfer-backend", default=d.transfer_backend, choices=ALL_BACKENDS)
    parser.add_argument(
        "--disaggregation-bootstrap-timeout", type=float, default=d.bootstrap_timeout,
        help="seconds to reach the prefill bootstrap service, resolve a rank and get the KV request acknowledged",
    )
    parser.add_argument(
        "--disaggregation-waiting-timeout", type=float, default=d.waiting_timeout,
        help="seconds either side waits for the other half of a room (prefill frees held KV after this)",
    )
    parser.add_argument(
        "--disaggregation-transfer-timeout", type=float, default=d.transfer_timeout,
        help="seconds a started KV transfer may stall",
    )


def disagg_config_from_args(args: argparse.Namespace) -> DisaggConfig:
    return DisaggConfig(
        mode=args.disaggregation_mode,
        bootstrap_port=args.disaggregation_bootstrap_port,
        transfer_backend=args.disaggregation_transfer_backend,
        host=getattr(args, "host", DisaggConfig.host),
        bootstrap_timeout=args.disaggregation_bootstrap_timeout,
        waiting_timeout=args.disaggregation_waiting_timeout,
        transfer_timeout=args.disaggregation_transfer_timeout,
    )
