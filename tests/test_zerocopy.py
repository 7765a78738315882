"""Proof of zero-copy: under `strace -f -yy`, the fds that carry the payload (the stdio pipes,
the TCP socket, the file being sent) see splice/sendfile only, never a read or a write.

trio's wake-up socketpair (UNIX-STREAM) and Python's own files may see reads and writes; they
carry no payload and are not checked. A call left <unfinished ...> by strace on a payload fd
counts as a violation: nothing may even try.
"""

from __future__ import annotations

import re

from tests.pipeline_helpers import need, random_file, sha256_file, shell

SIZE = 12 << 20
COPYING = ("read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg",
           "pread64", "pwrite64", "preadv", "pwritev", "recvmmsg", "sendmmsg")
TRACE = "-e trace=" + ",".join(COPYING + ("splice", "sendfile"))
CALL = re.compile(r"^\d+\s+(\w+)\((\d+)<([^>]*)>(.*?)(?:= (-?\d+))?")


def calls(trace: str):
    """(syscall, fd annotation, first-argument-to-end text, result or None) per traced call."""
    for line in trace.splitlines():
        match = CALL.match(line)
        if match:
            name, _fd, what, rest, result = match.groups()
            tail = line.rsplit("= ", 1)
            value = int(tail[1].split()[0]) if len(tail) == 2 and tail[1].split()[0].lstrip("-").isdigit() else None
            yield name, what, line, value


def payload_report(trace: str, payload: set[str]) -> tuple[dict[str, int], list[str]]:
    """Bytes moved by splice/sendfile per source annotation, and the violating lines."""
    moved: dict[str, int] = {}
    violations = []
    for name, what, line, value in calls(trace):
        if name in ("splice", "sendfile"):
            if value and value > 0:
                moved[what] = moved.get(what, 0) + value
        elif name in COPYING and any(p in what for p in payload):
            if value is None or value > 0:
                violations.append(line)
    return moved, violations


def test_connect_pipes_move_only_by_splice(tmp_path):
    need("strace")
    data = random_file(tmp_path / "data", SIZE)
    back = random_file(tmp_path / "back", SIZE // 2)
    listener = shell("$Z listen 127.0.0.1:0 < back > out", tmp_path, listening=True)
    sender = shell(f"cat data | strace -f -yy -o trace {TRACE} $Z connect 127.0.0.1:{listener.port} "
                   f"| cat > got", tmp_path)
    code, err = sender.wait()
    assert code == 0, err
    assert listener.wait()[0] == 0
    assert sha256_file(tmp_path / "out") == sha256_file(data)
    assert sha256_file(tmp_path / "got") == sha256_file(back)
    trace = (tmp_path / "trace").read_text()
    # The payload fds: the socket, and stdin's and stdout's pipes (fds 0 and 1 of the process
    # strace started; other processes' pipes, such as ldconfig's run by trio, are not payload).
    pid = trace.split(None, 1)[0]
    mine = "\n".join(line for line in trace.splitlines() if line.split(None, 1)[0] == pid)
    payload = {"TCP:["} | set(re.findall(r"[(,] ?[01]<(pipe:\[\d+\])>", mine))
    assert len(payload) == 3, payload
    moved, violations = payload_report(trace, payload)
    assert not violations, "\n".join(violations[:20])
    sent = sum(n for what, n in moved.items() if what.startswith("pipe:"))
    received = sum(n for what, n in moved.items() if what.startswith("TCP:"))
    assert sent == SIZE and received == SIZE // 2, moved


def _send_trace(tmp_path, method: str) -> tuple[str, int]:
    data = random_file(tmp_path / "data", SIZE)
    listener = shell("$Z listen 127.0.0.1:0 > out", tmp_path, listening=True)
    code, err = shell(f"strace -f -yy -o trace {TRACE} $Z send data 127.0.0.1:{listener.port} "
                      f"--method {method}", tmp_path).wait()
    assert code == 0, err
    assert listener.wait()[0] == 0
    assert sha256_file(tmp_path / "out") == sha256_file(data)
    return (tmp_path / "trace").read_text(), SIZE


def test_send_splice_moves_only_by_splice(tmp_path):
    need("strace")
    trace, size = _send_trace(tmp_path, "splice")
    lines = trace.splitlines()
    payload = {str(tmp_path / "data"), "TCP:["}
    payload |= set(re.findall(r"pipe:\[\d+\]", " ".join(line for line in lines if "splice(" in line)))
    moved, violations = payload_report(trace, payload)
    assert not violations, "\n".join(violations[:20])
    assert moved.get(str(tmp_path / "data")) == size, moved
    # file → pipe with an explicit offset: the file position is never used.
    assert all(re.search(r"splice\(\d+<[^>]*data>, \[\d+\]", line) for line in lines
               if re.match(r"^\d+\s+splice\(\d+<[^>]*data>", line))


def test_send_sendfile_moves_only_by_sendfile(tmp_path):
    need("strace")
    trace, size = _send_trace(tmp_path, "sendfile")
    payload = {str(tmp_path / "data"), "TCP:["}
    moved, violations = payload_report(trace, payload)
    assert not violations, "\n".join(violations[:20])
    assert sum(n for what, n in moved.items() if what.startswith("TCP:")) == size, moved
