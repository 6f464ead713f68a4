"""Every socket pdserve accepts or opens has TCP_NODELAY (no Nagle + delayed-ACK stall).

Read back with ``getsockopt`` on the server side of a real accepted connection, found in this
process's own file descriptors: not a timing, so it cannot be flaky. Listeners covered: the HTTP
listener that server fronts and the router run (``http_common.uvicorn_server`` on a
``ports.listen_socket``, both parsers), the router's own app, the bootstrap service, the KV
receiver of the tcp backend, and the ZMQ control socket; on the client side, the router's
upstream connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from pdserve.disagg.bootstrap import BootstrapServer
from pdserve.disagg.transfer.tcp import TcpReceiver
from pdserve.engine.kv_pool import KVPool
from pdserve.http_common import HttpLimits, uvicorn_server
from pdserve.ports import listen_socket


def _socket_inodes(local_port: int, remote_port: int) -> set[str]:
    """Inodes of established TCP sockets from ``local_port`` to ``remote_port`` (loopback)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                cols = row.split()
                local, remote = cols[1].rsplit(":", 1)[1], cols[2].rsplit(":", 1)[1]
                if int(local, 16) == local_port and int(remote, 16) == remote_port and cols[3] == "01":
                    inodes.add(cols[9])
    return inodes


def no_delay_of(local_port: int, remote_port: int, timeout: float = 5.0) -> int:
    """TCP_NODELAY of this process's socket ``local_port`` -> ``remote_port`` (waits for it to appear)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        targets = {f"socket:[{i}]" for i in _socket_inodes(local_port, remote_port)}
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") in targets:
                    dup = socket.socket(fileno=os.dup(int(fd)))
                    try:
                        return dup.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                    finally:
                        dup.close()
        time.sleep(0.02)
    raise AssertionError(f"no socket {local_port} -> {remote_port} in this process")


def accepted_no_delay(port: int) -> int:
    """Connect a plain client to ``port`` and read TCP_NODELAY of the side the server accepted."""
    client = socket.create_connection(("127.0.0.1", port))
    try:
        return no_delay_of(port, client.getsockname()[1])
    finally:
        client.close()


async def _hello(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def serving(app, limits: HttpLimits):
    """``app`` served in a thread exactly as the CLIs serve it; yields the port."""
    sock = listen_socket("127.0.0.1", 0)
    server = uvicorn_server(app, limits, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.mark.parametrize("impl", ["httptools", "h11"])
def test_http_listener_accepts_with_no_delay(impl):
    with serving(_hello, HttpLimits(http_impl=impl)) as port:
        assert accepted_no_delay(port) == 1


def test_plain_socket_lacks_no_delay_so_the_check_can_fail():
    listener = socket.socket()  # what pdserve/ports.py created before: protocol 0, no option
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert no_delay_of(listener.getsockname()[1], client.getsockname()[1]) == 0
    finally:
        for s in (accepted, client, listener):
            s.close()


def test_bootstrap_service_accepts_with_no_delay():
    server = BootstrapServer(1, port=0, load_balance_method="round_robin").start()
    try:
        assert accepted_no_delay(server.port) == 1
    finally:
        server.stop()


def test_kv_receiver_accepts_with_no_delay():
    pool = KVPool(8, 4, 2, 2, 8, torch.float32, device="cpu")
    receiver = TcpReceiver(pool, lambda event: None, "127.0.0.1", io_timeout=5.0)
    try:
        assert accepted_no_delay(receiver.port) == 1
    finally:
        receiver.close()


def test_zmq_control_sockets_have_no_delay():
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        pull.bind("tcp://127.0.0.1:*")
        port = int(pull.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send(b"x")
        assert pull.recv() == b"x"
        remote = next(int(row.split()[2].rsplit(":", 1)[1], 16)
                      for row in Path("/proc/net/tcp").read_text().splitlines()[1:]
                      if int(row.split()[1].rsplit(":", 1)[1], 16) == port and row.split()[3] == "01")
        assert no_delay_of(port, remote) == 1
    finally:
        pull.close(0)
        push.close(0)
        ctx.term()


def test_router_listener_accepts_with_no_delay():
    from pdserve.router.app import create_app
    from pdserve.router.config import RouterConfig, WorkerSpec

    config = RouterConfig(host="127.0.0.1", port=0, workers=[WorkerSpec("http://127.0.0.1:9", "mixed")])
    with serving(create_app(config), HttpLimits()) as port:
        assert accepted_no_delay(port) == 1


def test_router_upstream_connections_have_no_delay():
    from pdserve.router.http_client import ClientPool, Target

    upstream = listen_socket("127.0.0.1", 0)
    port = upstream.getsockname()[1]

    async def connect() -> int:
        pool = ClientPool()
        conn = await pool.acquire("127.0.0.1", port)
        try:
            local_port = conn.transport.get_extra_info("sockname")[1]
            return await asyncio.to_thread(no_delay_of, local_port, port)
        finally:
            conn.close()
            await pool.close()

    try:
        assert Target.parse(f"http://127.0.0.1:{port}/generate").port == port
        assert asyncio.run(connect()) == 1
    finally:
        upstream.close()
