"""zcrelay: a zero-copy relay for Linux built on splice(2), tee(2) and sendfile(2)."""

__version__ = "0.1.0"
