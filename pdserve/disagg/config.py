"""P/D options (``--disaggregation-*`` flags, SGLang's names) shared by the managers and the server.

Kept free of heavy imports: ``pdserve --help`` loads it."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field

from pdserve.transfer_names import ALL_BACKENDS, BACKENDS, SIM_BACKEND

__all__ = ["ALL_BACKENDS", "BACKENDS", "SIM_BACKEND"]  # re-exported: the transfer registry imports them from here

MODES = ("null", "prefill", "decode")
# Backends built on a transfer engine from PyPI: the module they import and the pdserve extra that installs it.
ENGINE_LIBRARIES = {"nixl": ("nixl", "nixl"), "mooncake": ("mooncake.engine", "mooncake")}
MOONCAKE_PROTOCOLS = ("tcp", "rdma")


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
    secret: str | None = None  # shared by every server of the deployment (pdserve.disagg.auth); never on a command line
    allow_insecure: bool = False  # serve the plane on a non-loopback address without a secret
    allowed_bootstrap: list[str] = field(default_factory=list)  # decode: hosts/CIDRs it may contact; [] = default
    max_connections: int = 256  # decode: concurrent transfer connections accepted (beyond: closed at once)
    handshake_timeout: float = 5.0  # a transfer connection must authenticate within this
    idle_timeout: float = 60.0  # decode closes a transfer connection idle this long; prefill reconnects before
    decode_allow_local_prefill: bool = False  # decode: compute a prompt whose request names no KV source (else 400)
    mooncake_protocol: str = "tcp"  # mooncake: the engine's transport (rdma needs an RDMA device)
    ib_device: str = ""  # mooncake rdma: the device(s) to use ("" : the engine picks)

    def engine_options(self) -> dict[str, str]:
        """What the chosen backend needs beyond the pool and the plane (today: mooncake's transport)."""
        if self.transfer_backend == "mooncake":
            return {"protocol": self.mooncake_protocol, "device": self.ib_device, "local_host": self.host}
        return {}

    def check_library(self) -> None:
        """Refuse, at startup, a backend whose transfer engine is not installed, naming the extra."""
        if self.mode != "null" and self.transfer_backend in ENGINE_LIBRARIES:
            library_error(self.transfer_backend, raise_it=True)

    def allowed_networks(self) -> list[str]:
        """The outbound allow-list in force: the flag's entries, else loopback when serving on
        loopback, else everything ("*")."""
        from pdserve.disagg.auth import is_loopback

        if self.allowed_bootstrap:
            return list(self.allowed_bootstrap)
        return ["127.0.0.0/8", "::1", "localhost"] if is_loopback(self.host) else ["*"]

    def bootstrap_allowed(self, host: str) -> bool:
        """Whether decode may contact a bootstrap service at ``host`` (IP literal or name)."""
        for entry in self.allowed_networks():
            if entry == "*" or entry.lower() == host.lower():
                return True
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"disaggregation mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.transfer_backend not in ALL_BACKENDS:
            raise ValueError(
                f"disaggregation transfer backend must be one of {', '.join(ALL_BACKENDS)}, got {self.transfer_backend!r}"
            )
        if not 0 <= self.bootstrap_port < 65536:
            raise ValueError(f"disaggregation bootstrap port must be in [0, 65535], got {self.bootstrap_port}")
        for entry in self.allowed_bootstrap:
            if entry != "*" and not _is_network(entry) and not _is_hostname(entry):
                raise ValueError(f"--disaggregation-allowed-bootstrap entry {entry!r} is not a host, address or CIDR")
        if self.mooncake_protocol not in MOONCAKE_PROTOCOLS:
            raise ValueError(f"mooncake protocol must be one of {', '.join(MOONCAKE_PROTOCOLS)}, "
                             f"got {self.mooncake_protocol!r}")
        if self.max_connections < 1:
            raise ValueError(f"disaggregation max connections must be >= 1, got {self.max_connections}")
        for name in ("bootstrap_timeout", "waiting_timeout", "transfer_timeout", "handshake_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"disaggregation {name.replace('_', ' ')} must be > 0 seconds, got {getattr(self, name)}")


    def check_device(self, device: str | None) -> None:
        """Refuse a backend that cannot move KV pages of a pool on ``device`` (None: cuda when available)."""
        if self.mode == "null" or self.transfer_backend != "shm" or device == "cpu":
            return
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if not device.startswith("cpu"):
            raise ValueError(shm_device_error(device))


def has_rdma_device() -> bool:
    """Whether this host has an RDMA (InfiniBand/RoCE/EFA) device."""
    import os

    try:
        return bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        return False


def prepare_engine_environment(backend: str) -> None:
    """Set what the engine's libraries read at load time, before they load. NIXL's bundled UCX loads its
    InfiniBand modules (and their bundled libnl-route) even on a host without an RDMA device, and that
    libnl-route crashes in its exit destructor (``rtnl_tc_unregister``: every process that created an
    agent ends with SIGSEGV) once the system's libibverbs/libnl are installed, as Mooncake needs. With
    no RDMA device those modules have nothing to drive, so they are not loaded (``UCX_MODULES``; a value
    the user set is kept)."""
    import os

    if backend == "nixl" and not has_rdma_device():
        os.environ.setdefault("UCX_MODULES", "^ib,rdmacm")


def library_error(backend: str, raise_it: bool = False) -> str | None:
    """Why ``backend``'s transfer engine cannot be loaded here (None: it can); a missing package names
    the pdserve extra that installs it."""
    import importlib

    module, extra = ENGINE_LIBRARIES[backend]
    prepare_engine_environment(backend)
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a shared library the wheel needs (an OSError from dlopen)
        why = (f"the {backend} transfer backend needs the {module.split('.')[0]} package, which cannot be loaded "
               f"here ({type(e).__name__}: {e}); install it with pip install -e '.[{extra}]' "
               f"(or pip install 'pdserve[{extra}]')")
        if raise_it:
            raise ValueError(why) from e
        return why
    return None


def shm_device_error(device: str) -> str:
    """Why the shm backend refuses a KV pool on ``device``."""
    return (f"the shm transfer backend maps the decode pool's host memory, so it needs a CPU KV pool; this server's "
            f"pool is on {device}: use --disaggregation-transfer-backend tcp (it stages GPU pages through pinned "
            "host memory) or --device cpu")


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
        return True
    except ValueError:
        return False


def _is_hostname(entry: str) -> bool:
    labels = entry.rstrip(".").split(".")
    return 0 < len(entry) <= 253 and all(
        0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii() for label in labels
    )


def add_disagg_arguments(parser: argparse.ArgumentParser) -> None:
    d = DisaggConfig()
    parser.add_argument("--disaggregation-mode", default=d.mode, choices=MODES, help="P/D role of this server")
    parser.add_argument(
        "--disaggregation-bootstrap-port", type=int, default=d.bootstrap_port,
        help="prefill: port of its bootstrap service; decode: used when a request's bootstrap_port is null",
    )
    parser.add_argument("--disaggregation-transfer-backend", default=d.transfer_backend, choices=ALL_BACKENDS,
                        help="how KV pages travel from prefill to decode (sim: bytes not sent, for --simulate)")
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
    parser.add_argument(
        "--disaggregation-secret", default=None,
        help="secret shared by every prefill and decode server of the deployment; authenticates bootstrap "
        "writes, control messages and transfer connections (default: $PDSERVE_DISAGG_SECRET, else derived "
        "from --api-key; pdserve launch generates one)",
    )
    parser.add_argument(
        "--disaggregation-allow-insecure", action="store_true",
        help="start a P/D server on a non-loopback --host without a secret (refused otherwise)",
    )
    parser.add_argument(
        "--disaggregation-allowed-bootstrap", default="",
        help="decode: comma-separated hosts/CIDRs whose bootstrap services requests may name "
        "(default: loopback when --host is loopback, else any; '*' for any)",
    )
    parser.add_argument(
        "--disaggregation-max-connections", type=int, default=d.max_connections,
        help="decode: concurrent KV transfer connections accepted; more are closed at once",
    )
    parser.add_argument(
        "--disaggregation-handshake-timeout", type=float, default=d.handshake_timeout,
        help="seconds a KV transfer connection has to authenticate before it is closed",
    )
    parser.add_argument(
        "--disaggregation-mooncake-protocol", default=d.mooncake_protocol, choices=MOONCAKE_PROTOCOLS,
        help="mooncake backend: the transfer engine's transport (rdma needs an RDMA device)",
    )
    parser.add_argument(
        "--disaggregation-ib-device", default=d.ib_device,
        help="mooncake backend with rdma: the RDMA device(s) to use, e.g. mlx5_0 (default: empty, the engine picks)",
    )
    parser.add_argument(
        "--disaggregation-idle-timeout", type=float, default=d.idle_timeout,
        help="decode: seconds an authenticated KV transfer connection may carry no frame (with no room of its "
        "own open) before it is closed; prefill: drops its connections idle half as long and reconnects",
    )
    parser.add_argument(
        "--disaggregation-decode-allow-local-prefill", action="store_true",
        help="decode: compute the prompt of a request that names no KV source (no bootstrap_room) on this server, "
        "counted in pdserve:decode_local_prefills_total and marked local_prefill in meta_info (default: off, "
        "such a request is refused with 400 naming what is missing)",
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
        secret=args.disaggregation_secret,
        allow_insecure=args.disaggregation_allow_insecure,
        allowed_bootstrap=[e.strip() for e in args.disaggregation_allowed_bootstrap.split(",") if e.strip()],
        max_connections=args.disaggregation_max_connections,
        handshake_timeout=args.disaggregation_handshake_timeout,
        idle_timeout=args.disaggregation_idle_timeout,
        decode_allow_local_prefill=args.disaggregation_decode_allow_local_prefill,
        mooncake_protocol=getattr(args, "disaggregation_mooncake_protocol", DisaggConfig.mooncake_protocol),
        ib_device=getattr(args, "disaggregation_ib_device", DisaggConfig.ib_device),
    )
