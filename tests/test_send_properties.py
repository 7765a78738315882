"""Property-based tests (hypothesis) of `send`'s engine (zcrelay.files.transfer): bytes
[offset, offset + length) of the file reach the peer exactly, by splice or by sendfile, and the
file's own position is never moved, whatever the file size, the span, the pipe size and the
rate limit, with or without an idle timeout (which keeps the socket non-blocking and starts
a watchdog thread, zcrelay.files._Idle).

`transfer` runs in process with blocking waits (zcrelay.waits), as `zcrelay send` runs it, on a
real loopback TCP connection whose far end is a thread reading to EOF and then closing
(pipeline_helpers.Sink).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading

from hypothesis import given
from hypothesis import strategies as st

from zcrelay import waits
from zcrelay.files import IDLE_WATCHDOG, SendConfig, span, transfer
from zcrelay.stats import Flow
from tests.pipeline_helpers import Sink
from tests import traffic
from tests.test_properties import PROPERTY_SETTINGS

@st.composite
def spans(draw):
    size = draw(st.integers(0, 3_000_000))
    offset = draw(st.integers(0, size))
    length = draw(st.one_of(st.none(), st.integers(0, size - offset)))
    return size, offset, length


@PROPERTY_SETTINGS
@given(case=spans(), seed=st.integers(0, 2**32), method=st.sampled_from(("splice", "sendfile")),
       pipe_size=st.sampled_from(traffic.PIPE_SIZES), rate=st.sampled_from((None, 64 << 20)),
       position=st.integers(0, 5000), idle=st.sampled_from((None, 30.0)))
def test_the_span_arrives_exactly(tmp_path_factory, case, seed, method, pipe_size, rate, position, idle):
    size, offset, length = case
    data = traffic.payload(seed, "file", size)
    path = tmp_path_factory.mktemp("send") / "file"
    path.write_bytes(data)
    offset, length = span(size, offset, length)
    expected = size - offset if length is None else length  # None: a file of size 0, to EOF
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    os.lseek(fd, position, os.SEEK_SET)  # someone's position in a shared fd: left alone
    sink = Sink()  # a thread: reads to EOF, hashing, then closes
    flow = Flow()
    config = SendConfig(method=method, pipe_size=pipe_size, rate_limit=rate, linger=30, idle_timeout=idle)
    try:
        with socket.create_connection(("127.0.0.1", sink.port)) as sock:
            waits.run_blocking(transfer, fd, sock, offset, length, flow, config)
        sink.join(60)
        assert os.lseek(fd, 0, os.SEEK_CUR) == position
    finally:
        os.close(fd)
    assert sink.size == expected
    assert sink.sha.digest() == hashlib.sha256(data[offset:offset + expected]).digest()
    assert flow.bytes == flow.spliced == expected and flow.copied == 0 and flow.end == "eof"
    # The idle clock is gone with the transfer: no watchdog left, the flow's hook restored.
    assert IDLE_WATCHDOG not in {thread.name for thread in threading.enumerate()}
    assert flow.on_bytes is None
