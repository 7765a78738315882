"""Exit codes of the zcrelay command.

The man page's EXIT STATUS section is checked against this table by the tests: add a code here
and document it there.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    ADDRESS_IN_USE = 3
    PERMISSION_DENIED = 4
    ADDRESS_NOT_AVAILABLE = 5
    CONNECT_FAILED = 6
    NO_RESOURCES = 7
    INPUT_ERROR = 8
    OUTPUT_ERROR = 9
    FILE_CHANGED = 10
    INTERRUPTED = 130
    BROKEN_PIPE = 141


DESCRIPTIONS: dict[ExitCode, str] = {
    ExitCode.OK: "Success, including a relay stopped by SIGINT or SIGTERM.",
    ExitCode.FAILURE: "A runtime error not covered by a more specific code.",
    ExitCode.USAGE: "A malformed command line, address, size, option or config file.",
    ExitCode.ADDRESS_IN_USE: "A listen address is already in use.",
    ExitCode.PERMISSION_DENIED: "Not allowed to bind a listen address (a privileged port, a protected path).",
    ExitCode.ADDRESS_NOT_AVAILABLE: "A listen address is not on this host, or its name does not resolve.",
    ExitCode.CONNECT_FAILED: "The target refused the connection, was unreachable, or did not answer in time; for bench and demo, their own loopback connections (the loopback interface is down).",
    ExitCode.NO_RESOURCES: "Out of file descriptors, memory or processes (--workers) before any work could start; for demo, also when the relay dropped connections for lack of them.",
    ExitCode.INPUT_ERROR: "A file to read is missing, unreadable or not a regular file.",
    ExitCode.OUTPUT_ERROR: "Writing an output failed: a full disk, an I/O error, an output closed early.",
    ExitCode.FILE_CHANGED: "The file being sent shrank while it was sent.",
    ExitCode.INTERRUPTED: "Interrupted by SIGINT before the command was running, or bench interrupted by SIGINT or SIGTERM (128 + 2, as shells report it).",
    ExitCode.BROKEN_PIPE: "stdout's reader went away (as with '| head'), or stderr's before a line zcrelay had to write there (a listening line; demo's report); nothing is printed (128 + 13, as for a program killed by SIGPIPE).",
}
