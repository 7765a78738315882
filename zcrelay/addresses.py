"""Parsing and formatting the addresses users type.

Accepted forms (also in the man page's ADDRESSES section):
    PORT              listen: 127.0.0.1:PORT (loopback only, like ssh -L); target: 127.0.0.1:PORT
    :PORT             every interface (listen only)
    HOST:PORT         a name or an IPv4 address; names are resolved, IPv4 and IPv6 tried in turn
    [IPV6]:PORT       an IPv6 address
    unix:PATH         a Unix stream socket; unix:@NAME is the abstract namespace
Port 0 asks the kernel for a free port (listen only).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass


class AddressError(ValueError):
    """A malformed address: the message says what is wrong and what would be right."""


FORMS = "PORT, HOST:PORT, [IPV6]:PORT or unix:PATH"


@dataclass(frozen=True)
class Address:
    """A TCP (host, port) or a Unix socket path. `host` "" means every interface."""

    host: str = ""
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def sockaddr_path(self) -> str:
        """The path as bind/connect want it: a leading '@' becomes the abstract namespace's NUL."""
        assert self.path is not None
        return "\0" + self.path[1:] if self.path.startswith("@") else self.path

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}" if self.host else f"*:{self.port}"


_BRACKETED = re.compile(r"^\[([^\]]+)\]:(\w*)$")


def _digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²' (which int() refuses) and '١٢٣' (which
    int() reads as 123)."""
    return text.isascii() and text.isdigit()


def _port(text: str, original: str, allow_zero: bool) -> int:
    if not _digits(text):
        raise AddressError(f"{original!r}: port {text!r} is not a number (expected {FORMS})")
    port = int(text)
    if port > 65535 or (port == 0 and not allow_zero):
        low = 0 if allow_zero else 1
        raise AddressError(f"{original!r}: port {port} is out of range ({low}-65535)")
    return port


def parse(text: str, *, listen: bool) -> Address:
    """Parse a LISTEN (listen=True) or TARGET address; raise AddressError if malformed."""
    original = text
    text = text.strip()
    if not text:
        raise AddressError(f"empty address (expected {FORMS})")
    if text.startswith("unix:"):
        path = text[5:]
        if not path or path == "@":
            raise AddressError(f"{original!r}: unix: needs a path")
        if len(path.encode()) > 107:
            raise AddressError(f"{original!r}: a unix socket path is at most 107 bytes")
        return Address(path=path)
    if _digits(text):
        return Address("127.0.0.1", _port(text, original, listen))
    match = _BRACKETED.match(text)
    if not match and text.startswith("["):
        if "]" not in text:
            raise AddressError(f"{original!r}: no closing ']' after the IPv6 address")
        raise AddressError(f"{original!r}: no port after ']' (expected [ADDR]:PORT)")
    if match:
        host, port = match.groups()
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise AddressError(f"{original!r}: {host!r} is not an IPv6 address") from None
        return Address(host, _port(port, original, listen))
    host, sep, port = text.rpartition(":")
    if not sep:
        raise AddressError(f"{original!r}: no port (expected {FORMS})")
    if ":" in host:
        raise AddressError(f"{original!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    if not host and not listen:
        raise AddressError(f"{original!r}: a target needs a host (expected {FORMS})")
    if host and not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        raise AddressError(f"{original!r}: {host!r} is not a host name or address")
    return Address(host, _port(port, original, listen))


def format_sockname(sockname: object) -> str:
    """Format what getsockname()/getpeername()/accept() return."""
    if isinstance(sockname, tuple):
        host, port = sockname[0], sockname[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(sockname, bytes):
        sockname = sockname.decode(errors="replace")
    if isinstance(sockname, str):
        if sockname.startswith("\0"):
            return "unix:@" + sockname[1:]
        return f"unix:{sockname}" if sockname else "unix:(unnamed)"
    return str(sockname)
