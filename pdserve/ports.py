"""Listening ports: bind one before anything starts, and name who holds a busy one.

``listen_socket`` binds (and listens on) a TCP port up front, so a server whose port is taken
fails at once with :class:`PortInUse` naming the port and, where ``/proc`` tells, the process
holding it, instead of starting workers first and failing on a late bind. Torch-free.
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


def listen_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6 by the host's form); PortInUse if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers only, not a listener
        sock.bind((host, port))
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
