"""zcrelay: a zero-copy relay for Linux built on splice(2), tee(2) and sendfile(2).

As a library (trio; README.md, "From Python"), what a program that embeds zcrelay uses:

- relay(a, b, engine, up, down, *, idle=None, linger=None), in zcrelay.relay (the module has
  the function's name, so it is imported from there: `from zcrelay.relay import relay`):
  relays two connected, non-blocking stream sockets both ways, passing half-close on, until
  both sides are done, one fails or a timeout fires, and returns a RelayEnd. It closes
  neither socket; cancelling the caller's scope ends it at once.
- Engine: the pipe pool and the reactor that any number of relays share, in one trio run at
  a time; Engine.close() frees them.
- Flow: what crossed one direction (spliced, copied, bytes, fallback, end).
- RelayEnd: why a relay ended (reason, side, describe("client", "target")).
- Forwarder, ForwardConfig, Rule, Bound, Finished: the whole of `zcrelay forward`, embedded;
  parse(text, listen=...) makes a Rule's Address from PORT, HOST:PORT, [IPV6]:PORT or
  unix:PATH, and raises AddressError (a ValueError) for anything else.
- ZcrelayError, the base of zcrelay's own exceptions: BindError (Forwarder.serve could not
  listen), ConnectError, StreamError and its PeerGone and OutOfResources, SpliceRefused.
  relay() raises TypeError or ValueError for what it cannot relay, before a byte moves.

Those names can be imported from this package; each loads its module on first use, so that
`import zcrelay` stays as cheap as the command line's start-up needs it.
"""

__version__ = "0.1.0"

# Each public name and the module it lives in, loaded by __getattr__ on first use (PEP 562):
# importing them here would import trio and dataclasses on the path of `zcrelay tee`, whose
# start-up tests/test_cli_startup.py keeps free of them.
_LAZY = {
    "Engine": "zcrelay.relay",
    "RelayEnd": "zcrelay.relay",
    "Flow": "zcrelay.stats",
    "Totals": "zcrelay.stats",
    "Forwarder": "zcrelay.forward",
    "ForwardConfig": "zcrelay.forward",
    "Rule": "zcrelay.forward",
    "Bound": "zcrelay.forward",
    "Finished": "zcrelay.forward",
    "Address": "zcrelay.addresses",
    "parse": "zcrelay.addresses",
    "AddressError": "zcrelay.addresses",
    "ZcrelayError": "zcrelay.errors",
    "BindError": "zcrelay.errors",
    "ConnectError": "zcrelay.errors",
    "StreamError": "zcrelay.errors",
    "PeerGone": "zcrelay.errors",
    "OutOfResources": "zcrelay.errors",
    "SpliceRefused": "zcrelay.errors",
}

__all__ = [  # _LAZY's names (tests/test_library_review.py checks), written out for linters
    "__version__", "Engine", "RelayEnd", "Flow", "Totals", "Forwarder", "ForwardConfig", "Rule",
    "Bound", "Finished", "Address", "parse", "AddressError", "ZcrelayError", "BindError",
    "ConnectError", "StreamError", "PeerGone", "OutOfResources", "SpliceRefused",
]

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:  # what a type checker sees for the names __getattr__ provides
    from zcrelay.addresses import Address, AddressError, parse
    from zcrelay.errors import (BindError, ConnectError, OutOfResources, PeerGone, SpliceRefused,
                                StreamError, ZcrelayError)
    from zcrelay.forward import Bound, Finished, ForwardConfig, Forwarder, Rule
    from zcrelay.relay import Engine, RelayEnd
    from zcrelay.stats import Flow, Totals


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        # AttributeError, not ImportError: `from zcrelay import relay` and the like fall back to
        # importing the submodule only when the package says it has no such attribute.
        raise AttributeError(f"module 'zcrelay' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
