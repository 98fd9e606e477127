"""The rendezvous port of a multi-process job, checked before torch is imported.

    python -m mqsa_ted.rendezvous HOST:PORT NODE_RANK    # prints torchrun's --rdzv_conf prefix

torchrun on node 0 hosts the rendezvous store on ``HOST:PORT``. If another job already holds
that port, torchrun would join that job's store and wait, or fail only after importing torch
(~30 s on a busy machine): :func:`host_conf` refuses it at once instead, in one line. ``launch.sh``
runs this module before anything imports torch; ``mqsa-ted train --nproc N`` calls
:func:`host_conf` when ``MASTER_PORT`` or ``RDZV_ENDPOINT`` names the port (without them torchrun
picks a free port itself). Light: the standard library and :mod:`mqsa_core.errors` only.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Mapping

from mqsa_core.errors import UserError

DEFAULT_ADDR = "127.0.0.1"


class RendezvousError(UserError):
    """The rendezvous endpoint is malformed or its port is taken on this machine."""


def endpoint_of(env: Mapping[str, str]) -> str | None:
    """``HOST:PORT`` that ``env`` asks for (``RDZV_ENDPOINT``, else ``MASTER_ADDR`` (default
    127.0.0.1) and ``MASTER_PORT``); None when it names no port."""
    if env.get("RDZV_ENDPOINT"):
        return env["RDZV_ENDPOINT"]
    if env.get("MASTER_PORT"):
        return f"{env.get('MASTER_ADDR') or DEFAULT_ADDR}:{env['MASTER_PORT']}"
    return None


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (an IPv6 host in brackets)."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RendezvousError(f"rendezvous endpoint '{endpoint}' is not HOST:PORT (port 1-65535)")
    return host.strip("[]"), int(port)


def _bind(host: str, port: int) -> None:
    """Bind and release ``(host, port)`` (raises :class:`OSError` when that fails)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))


def host_conf(endpoint: str, node_rank: int) -> str:
    """torchrun's ``--rdzv_conf`` prefix for this machine: ``""`` when ``endpoint``'s host is
    not an address of this machine (torchrun decides), ``"is_host=false,"`` on a node other than
    0 (it only connects), ``"is_host=true,"`` on node 0 once the port is known to be free.

    Raises :class:`RendezvousError` when the port is in use (on the host's address or on any
    other of this machine's) or cannot be bound."""
    host, port = split_endpoint(endpoint)
    try:
        _bind(host, 0)
    except OSError:
        return ""  # not an address of this machine
    if node_rank != 0:
        return "is_host=false,"
    try:
        _bind(host, port)
        _bind("", port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise RendezvousError(
                f"rendezvous port {port} on {host} is already in use (another job?): "
                "set MASTER_PORT (or RDZV_ENDPOINT) to a free port"
            ) from e
        raise RendezvousError(f"rendezvous port {port} on {host}: {e.strerror}") from e
    return "is_host=true,"


def main(argv: list[str] | None = None) -> int:
    """``python -m mqsa_ted.rendezvous HOST:PORT NODE_RANK``: print :func:`host_conf`, or one
    ``error:`` line and exit 2."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 2 or not args[1].isdigit():
            raise RendezvousError("usage: python -m mqsa_ted.rendezvous HOST:PORT NODE_RANK")
        print(host_conf(args[0], int(args[1])))
    except RendezvousError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
