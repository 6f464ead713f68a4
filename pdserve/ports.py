"""Listening ports: bind one before anything starts, and name who holds a busy one.

``listen_socket`` binds (and listens on) a TCP port up front, so a server whose port is taken
fails at once with :class:`PortInUse` naming the port and, where ``/proc`` tells, the process
holding it, instead of starting workers first and failing on a late bind. Every TCP socket pdserve
creates or accepts has ``TCP_NODELAY`` (:func:`no_delay`): a small response written after its
head (or a small frame after a large one) must not wait for the peer's delayed ACK (Nagle), which
costs ~40 ms per request on a kept-alive connection. Torch-free.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

LISTEN_STATE = "0A"  # TCP_LISTEN in /proc/net/tcp


class PortInUse(OSError):
    """``host:port`` cannot be bound; the message names the owner when it can be found."""

    def __init__(self, host: str, port: int, error: OSError) -> None:
        self.host, self.port = host, port
        owner = port_owner(port)
        who = f"by {owner}" if owner else f"({error.strerror or error})"
        super().__init__(f"port {port} on {host} is already in use {who}")
        self.errno = error.errno


def no_delay(sock: socket.socket) -> socket.socket:
    """``sock`` with Nagle's algorithm off (``TCP_NODELAY``); returned for chaining."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: any free port), not yet listening; OSError if taken.

    Created with the TCP protocol number (asyncio sets ``TCP_NODELAY`` on accepted sockets only
    when the listener says ``IPPROTO_TCP``) and with ``TCP_NODELAY`` itself, which Linux copies to
    every accepted socket, so threads that ``accept()`` directly get it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers only, not a listener
        no_delay(sock)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def listen_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6 by the host's form, ``TCP_NODELAY`` on
    it and on what it accepts); PortInUse if taken."""
    try:
        sock = bound_socket(host, port)
    except OSError as e:
        raise PortInUse(host, port, e) from None
    try:
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise PortInUse(host, port, e) from None
    return sock


def check_free(host: str, port: int) -> None:
    """Raise :class:`PortInUse` unless ``host:port`` can be bound now."""
    listen_socket(host, port, 1).close()


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == LISTEN_STATE and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    return inodes


def port_owner(port: int) -> str | None:
    """``pid N (command line)`` of a process listening on ``port``, or None when not visible."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = os.listdir(proc / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(proc / "fd" / fd) in targets:
                    cmd = " ".join((proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split())
                    return f"pid {proc.name} ({cmd[:200] or '?'})"
            except OSError:
                continue
    return "a process this user cannot see"
