"""systemd's notification protocol (``Type=notify``): a few lines instead of a library.

``READY=1`` once the worker watches its sources, ``STATUS=`` with the backlog and the
last verdict, ``WATCHDOG=1`` from the loop that would hang, ``RELOADING=1`` /
``STOPPING=1`` around a reload and at the end.  Nothing happens outside systemd (no
``$NOTIFY_SOCKET``).
"""

from __future__ import annotations

import contextlib
import os
import socket


class SystemdNotifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        if address and address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self.address = address or None
        self.sock = (socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self.address
                     else None)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, **fields: object) -> None:
        """``send(READY=1, STATUS="...")``: one datagram; never raises."""
        if self.sock is None or self.address is None:
            return
        text = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items())
        with contextlib.suppress(OSError):  # systemd gone or not listening
            self.sock.sendto(text.encode(), self.address)

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 messages (half of WatchdogSec), None if unset."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2_000_000
