"""Exceptions the engine raises. No errno travels above the mover: it is translated here once.

The CLI maps these (and nothing else) to exit codes, see zcrelay/exitcodes.py.
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from zcrelay.addresses import Address


class ZcrelayError(Exception):
    """Base of every error zcrelay reports to a user as one line."""


class StreamError(ZcrelayError):
    """A direction of a stream failed. `role` says which side ("source" or "destination")."""

    def __init__(self, role: str, err: int, op: str = "") -> None:
        self.role = role
        self.errno = err
        self.op = op
        super().__init__(f"{role}: {op + ': ' if op else ''}{os.strerror(err)} ({errno.errorcode.get(err, err)})")

    @property
    def reason(self) -> str:
        return errno.errorcode.get(self.errno, str(self.errno)).lower()


class PeerGone(StreamError):
    """The peer reset the connection or stopped reading (ECONNRESET, EPIPE, ENOTCONN...): "reset";
    or it vanished, its connection timed out or its host became unreachable (ETIMEDOUT,
    EHOSTUNREACH, ENETUNREACH): "lost", which a log must not call a reset."""

    @property
    def reason(self) -> str:
        return "lost" if self.errno in PEER_LOST else "reset"


class OutOfResources(StreamError):
    """No fd or memory for a pipe or a socket (EMFILE, ENFILE, ENOMEM, ENOBUFS)."""

    @property
    def reason(self) -> str:
        return "out-of-fds" if self.errno in (errno.EMFILE, errno.ENFILE) else "out-of-memory"


class SpliceRefused(ZcrelayError):
    """splice(2) refused this fd pair before a byte moved: a user-space copy may take over."""

    def __init__(self, err: int, role: str) -> None:
        self.errno = err
        self.role = role
        super().__init__(f"splice refused on {role}: {errno.errorcode.get(err, err)}")

    @property
    def reason(self) -> str:
        return f"splice refused on {self.role} ({errno.errorcode.get(self.errno, self.errno)})"


class BindError(ZcrelayError):
    """A listen address could not be bound. `errno` says why (EADDRINUSE, EACCES...)."""

    def __init__(self, address: Address, err: int, detail: str = "") -> None:
        self.address = address
        self.errno = err
        reason = detail or os.strerror(err).lower()
        super().__init__(f"cannot listen on {address}: {reason}")


class ConnectError(ZcrelayError):
    """A target could not be reached. `reason` is one word for logs: refused, unreachable,
    timeout, resolve, no-socket, reset (it accepted, then reset, before the connect was seen
    to complete), out-of-fds, out-of-memory, error; `detail` says why in words."""

    def __init__(self, address: Address, reason: str, detail: str) -> None:
        self.address = address
        self.reason = reason
        self.detail = detail
        super().__init__(f"cannot connect to {address}: {detail}")


class InputFailed(ZcrelayError):
    """Reading stdin (or the file to send) failed."""


class OutputFailed(ZcrelayError):
    """Writing stdout failed (a full disk, an I/O error)."""


class OutputClosed(ZcrelayError):
    """stdout's reader went away (EPIPE), as `| head -c 100` does: not worth a message."""


class ConnectionLost(ZcrelayError):
    """The peer reset the connection or stopped reading before the transfer was over."""


PEER_LOST = frozenset({errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH})
PEER_GONE = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ECONNABORTED,
                       errno.ESHUTDOWN}) | PEER_LOST
NO_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def translate(exc: OSError, role: str, op: str = "") -> StreamError:
    """The one place an OSError from the payload path becomes a stream error."""
    err = exc.errno or errno.EIO
    if err in PEER_GONE:
        return PeerGone(role, err, op)
    if err in NO_RESOURCES:
        return OutOfResources(role, err, op)
    return StreamError(role, err, op)
