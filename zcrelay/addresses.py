"""Parsing and formatting the addresses users type.

Accepted forms (also in the man page's ADDRESSES section):
    PORT              listen: 127.0.0.1:PORT (loopback only, like ssh -L); target: 127.0.0.1:PORT
    :PORT             every interface (listen only)
    HOST:PORT         a name or an IPv4 address; names are resolved, IPv4 and IPv6 tried in turn
    [IPV6]:PORT       an IPv6 address
    unix:PATH         a Unix stream socket; unix:@NAME is the abstract namespace
A PORT after a colon may be a TCP service name from /etc/services (host:http).
Port 0 asks the kernel for a free port (listen only).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
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


# The port: anything up to the end, for _port to judge (\w* refused the service "http-alt").
_BRACKETED = re.compile(r"^\[([^\]]*)\]:([^\]]*)$")
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the terminating NUL (unix(7))


def _digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²' (which int() refuses) and '١٢٣' (which
    int() reads as 123)."""
    return text.isascii() and text.isdigit()


_SERVICE = re.compile(r"[A-Za-z][A-Za-z0-9_+.-]{0,31}")  # a name in services(5)


def _port(text: str, original: str, allow_zero: bool) -> int:
    if not _digits(text):
        if _SERVICE.fullmatch(text):  # a service name, as ssh -L, socat and nc take ("http")
            try:
                return socket.getservbyname(text, "tcp")
            except OSError:
                raise AddressError(f"{original!r}: port {text!r} is not a number or a TCP service "
                                   f"in /etc/services (expected {FORMS})") from None
        raise AddressError(f"{original!r}: port {text!r} is not a number (expected {FORMS})")
    # int() refuses more than 4300 digits, leading zeros too, with a ValueError of its own.
    digits = text.lstrip("0")
    port = int(digits or "0") if len(digits) <= 5 else 65536
    if port > 65535 or (port == 0 and not allow_zero):
        low = 0 if allow_zero else 1
        shown = port if port <= 65535 else text if len(text) <= 12 else text[:9] + "..."
        raise AddressError(f"{original!r}: port {shown} is out of range ({low}-65535)")
    return port


def _host_name(host: str, original: str) -> None:
    """A name getaddrinfo can take: Python's idna codec raised UnicodeError (a traceback) for an
    empty label ('a..b') or one over 63 bytes, and DNS names are at most 253 (RFC 1035)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        raise AddressError(f"{original!r}: {host!r} is not a host name or address")
    labels = host[:-1].split(".") if host.endswith(".") and host != "." else host.split(".")
    if len(host.rstrip(".")) > 253 or not all(0 < len(label) <= 63 for label in labels):
        raise AddressError(f"{original!r}: {host!r} is not a host name (labels of 1 to 63 "
                           f"characters between dots, at most 253 in all)")


def parse(text: str, *, listen: bool) -> Address:
    """Parse a LISTEN (listen=True) or TARGET address; raise AddressError if malformed."""
    original = text
    text = text.strip()
    if not text:
        raise AddressError(f"empty address (expected {FORMS})")
    if "\0" in text:  # from a config file ("\u0000"): bind and lstat raised ValueError
        raise AddressError(f"{original!r}: an address cannot contain a NUL character")
    if text.startswith("unix:"):
        path = text[5:]
        if not path or path == "@":
            raise AddressError(f"{original!r}: unix: needs a path")
        # os.fsencode, as bind(2) will: a name that is not UTF-8 arrives with surrogates, which
        # str.encode() refused with a traceback.
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise AddressError(f"{original!r}: a unix socket path is at most {SUN_PATH_MAX} bytes")
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
        address, percent, zone = host.partition("%")
        if percent and not zone:
            raise AddressError(f"{original!r}: no interface after '%' (as in [fe80::1%eth0]:PORT)")
        try:
            ipaddress.IPv6Address(address)
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
    if host:
        _host_name(host, original)
    return Address(host, _port(port, original, listen))


# A side of a rule that holds '=' is a Unix path (or, far-fetched, an IPv6 zone): at most
# SUN_PATH_MAX of them each side. Past that only the first '=' is tried: a 128 KiB argument
# (MAX_ARG_STRLEN) of '='s, parsed at each of them, took over a minute.
_RULE_EQUALS_MAX = 2 * SUN_PATH_MAX + 1


def rule_readings(text: str) -> list[tuple[Address, Address]]:
    """Every (listen, target) that `text`, a LISTEN=TARGET rule, reads as, split at each of its
    '='s in turn from the left. A Unix path may hold '=' (unix:/run/a=b.sock); a host name, a
    port and an IP address never do, so one '=' at most makes both sides addresses, unless
    both are Unix paths with '=' in them (unix:/a=unix:/b=unix:/c). The caller decides what more
    than one reading means. None: AddressError, for the split at the first '=' (what was said
    before a path could hold '=') or for a rule without one."""
    parts = text.split("=")
    if len(parts) < 2:
        raise AddressError(f"{text!r}: a rule is LISTEN=TARGET")
    readings, first_error = [], None
    for i in range(1, len(parts) if len(parts) <= _RULE_EQUALS_MAX + 1 else 2):
        try:
            readings.append((parse("=".join(parts[:i]), listen=True), parse("=".join(parts[i:]), listen=False)))
        except AddressError as exc:
            first_error = first_error or exc
    if not readings:
        assert first_error is not None
        raise first_error
    return readings


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


# Rules checked together (zcrelay forward): listeners that cannot all be bound, and targets
# that lead back to a listener of the same rules. Only what can be told without DNS is found.

_IP = (ipaddress.IPv4Address, ipaddress.IPv6Address)
_V4_ANY, _V6_ANY = ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")
_WILD = ("", _V4_ANY, _V6_ANY)  # '' is bound dual-stack, and so is '::' (net.bindv6only is 0)
_LOOPBACK = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}


_AS_INET_ATON = re.compile(r"[0-9A-Fa-fXx.]+")  # the characters inet_aton's forms are made of


def _host_key(host: str) -> object:
    """An IP literal as an ip_address (so '::1' and '0:0::1' are one), a name in lower case.
    IPv4 in the forms getaddrinfo(3) also reads, through inet_aton(3) ('127.1', '0',
    '2130706433', '0x7f.0.0.1', '0177.0.0.1' octal), is that address too: `forward P 127.1:P`
    was taken for a name and connected to itself until the fds ran out."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _AS_INET_ATON.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            pass
    return host.lower().rstrip(".")


def _unix_key(path: str) -> str:
    """The path from /, without '.' and repeated '/'; '..' is kept (past a symlink, 'a/..' is
    not where it seems to be), so two spellings taken for one socket are one."""
    if path.startswith("@"):
        return path
    if not path.startswith("/"):
        # os.getcwd() for a relative path only: from a removed directory it raises
        # FileNotFoundError, and for absolute paths too that was a traceback. A relative path
        # is then kept relative, which no absolute one's key can equal.
        with contextlib.suppress(OSError):
            path = os.path.join(os.getcwd(), path)
    parts = [part for part in path.split("/") if part not in ("", ".")]
    return ("/" if path.startswith("/") else "") + "/".join(parts)


def _covers(wild: object, host: object) -> bool:
    """Whether a listener on the wildcard `wild` holds the port for `host` too (bind(2) says
    EADDRINUSE to either, even with SO_REUSEADDR): '' every address, '::' every IP address
    (dual-stack), 0.0.0.0 every IPv4 address."""
    if wild == "":
        return True
    if wild == _V6_ANY:
        return isinstance(host, _IP)
    return isinstance(host, ipaddress.IPv4Address)


def first_clash(listeners: list[Address]) -> tuple[int, int] | None:
    """(i, j), i < j, for the first listener j that cannot be bound beside an earlier one i:
    the same Unix path (absolute) or abstract name, or the same TCP port (not 0) on the same
    address, or on a wildcard address that covers the other (_covers). Names other than IP
    literals are compared as written: a clash behind a name is left to bind(2). Linear: a
    port holds at most one wildcard listener without a clash."""
    hosts: dict[object, dict[object, int]] = {}  # port or unix key -> host key -> first index
    end: tuple[str, str] | int
    for j, address in enumerate(listeners):
        if address.path is not None:
            end, host = ("unix", _unix_key(address.path)), None
        elif address.port:
            end, host = address.port, _host_key(address.host)
        else:
            continue  # port 0: the kernel picks a free port each time
        here = hosts.setdefault(end, {})
        if host in _WILD:  # once per port: a second wildcard clashes with the first
            clashes = [i for other, i in here.items()
                       if other == host or _covers(host, other) or (other in _WILD and _covers(other, host))]
        else:
            clashes = [here[other] for other in (host, *_WILD) if other in here
                       and (other == host or _covers(other, host))]
        if clashes:
            return min(clashes), j
        here[host] = j
    return None


def _reached(host: str) -> set[object]:
    """The addresses a connect to `host` may arrive at, where they can be told without DNS:
    0.0.0.0 and :: mean this host's loopback (Linux), localhost its two loopback addresses, an
    IPv4-mapped IPv6 address the IPv4 one too."""
    key = _host_key(host)
    if key == "localhost":
        return set(_LOOPBACK)
    if key == _V4_ANY:
        return {ipaddress.ip_address("127.0.0.1")}
    if key == _V6_ANY:
        return {ipaddress.ip_address("::1")}
    mapped = getattr(key, "ipv4_mapped", None)
    return {key} if mapped is None else {key, mapped}


def forwarding_cycle(rules: list[tuple[Address, Address]]) -> list[int] | None:
    """The indexes of (listen, target) rules, in order, each of whose targets reaches the next
    one's listener and the last one's the first's (a single index: a rule that forwards to its
    own listener), or None. A target reaches a listener on the same Unix socket, or on the same
    TCP port and address, or a loopback address and a listener on a wildcard that covers it.
    Not found: a name that resolves to this host, an interface address of a wildcard listener."""
    exact: dict[tuple, list[int]] = {}  # (port or "unix", address or path) -> listeners
    wild: dict[int, list[int]] = {}  # port -> listeners on a wildcard address
    for i, (listen, _) in enumerate(rules):
        if listen.path is not None:
            exact.setdefault(("unix", _unix_key(listen.path)), []).append(i)
        elif listen.port and _host_key(listen.host) in _WILD:
            wild.setdefault(listen.port, []).append(i)
        elif listen.port:
            for address in _reached(listen.host):
                exact.setdefault((listen.port, address), []).append(i)
    edges = []
    for _, target in rules:
        if target.path is not None:
            edges.append(exact.get(("unix", _unix_key(target.path)), []))
            continue
        arrives = _reached(target.host)
        loopback = [a for a in arrives if isinstance(a, _IP) and a.is_loopback]
        edges.append([i for a in arrives for i in exact.get((target.port, a), [])]
                     + [i for i in wild.get(target.port, [])
                        if any(_covers(_host_key(rules[i][0].host), a) for a in loopback)])
    return _cycle(edges)


def _cycle(edges: list[list[int]]) -> list[int] | None:
    """The nodes of a cycle, in order, in the graph `edges` (node -> successors), or None.
    Depth first without recursion: a config file may hold thousands of rules in a chain."""
    state = [0] * len(edges)  # 0 unseen, 1 on the current path, 2 done
    for start in range(len(edges)):
        if state[start]:
            continue
        path, pending = [start], [iter(edges[start])]
        state[start] = 1
        while pending:
            nxt = next(pending[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                pending.pop()
            elif state[nxt] == 1:
                return path[path.index(nxt):]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                pending.append(iter(edges[nxt]))
    return None
