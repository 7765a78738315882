"""Property-based tests (hypothesis) of `zcrelay tee`'s pipeline mode: whatever the writes, the
pipe sizes and the outputs, stdout and every FILE end up holding exactly the input, in order.

The tee loop is where this can go wrong: each round is decided by what the lead output (a
pipe) takes, copied into private pipes for the other outputs, and consumed by one regular
file, and the pipes' capacity is counted in page slots, not bytes. So the input here is cut
into writes of 1 byte to 300 KB, stdin's pipe is one page, 64 KiB or 1 MiB, stdout is a pipe
(the lead), a regular file or /dev/null, there are 0 to 3 FILEs and 0 to 2 /dev/null FILEs,
and `-a` keeps what the FILEs held. `run_tee` runs in process on real pipes: with stdin a pipe it runs with blocking
waits (zcrelay.waits, no trio), as the CLI runs it; with stdin a regular file, under trio,
with a task feeding our pipe.
"""

from __future__ import annotations

import fcntl
import os
import threading

import trio
from hypothesis import given
from hypothesis import strategies as st

from zcrelay import waits
from zcrelay.stats import Flow
from zcrelay.tee import TeeConfig, run_tee
from tests import traffic
from tests.test_properties import PROPERTY_SETTINGS

writes = st.lists(st.integers(min_value=1, max_value=300_000), min_size=0, max_size=12)


@PROPERTY_SETTINGS
@given(sizes=writes, seed=st.integers(0, 2**32), stdin_size=st.sampled_from(traffic.PIPE_SIZES),
       stdout_kind=st.sampled_from(("pipe", "file", "devnull")), files=st.integers(0, 3),
       nulls=st.integers(0, 2), append=st.booleans(), pipe_size=st.sampled_from(traffic.PIPE_SIZES))
def test_every_output_gets_the_input(tmp_path_factory, sizes, seed, stdin_size, stdout_kind, files,
                                     nulls, append, pipe_size):
    tmp = tmp_path_factory.mktemp("tee")
    data = traffic.payload(seed, "tee", sum(sizes))
    prefix = b"kept by -a\n"
    paths = [tmp / f"out{i}" for i in range(files)]
    for path in paths:
        path.write_bytes(prefix)
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    fcntl.fcntl(stdin_w, fcntl.F_SETPIPE_SZ, stdin_size)
    stdout_r = None
    if stdout_kind == "pipe":
        stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
    elif stdout_kind == "file":
        stdout_w = os.open(tmp / "stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    else:
        stdout_w = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    got = bytearray()
    threads = [threading.Thread(target=traffic.write_pieces, args=(stdin_w, data, sizes))]
    if stdout_r is not None:
        threads.append(threading.Thread(target=traffic.read_to_eof, args=(stdout_r, got)))
    for thread in threads:
        thread.start()
    # /dev/null FILEs (which take no part in a round) among the others, first or last
    names = [str(p) for p in paths]
    names = [os.devnull] * (nulls - nulls // 2) + names + [os.devnull] * (nulls // 2)
    config = TeeConfig(files=tuple(names), append=append, pipe_size=pipe_size)
    flow = Flow()
    try:
        try:
            outcome = waits.run_blocking(run_tee, config, stdin_r, stdout_w, flow)
        finally:
            os.close(stdout_w)
            for thread in threads:
                thread.join(60)
    finally:
        os.close(stdin_r)
        if stdout_r is not None:
            os.close(stdout_r)
    assert not any(thread.is_alive() for thread in threads)
    assert outcome.failed == []
    assert outcome.bytes == flow.bytes == len(data)
    if stdout_kind == "pipe":
        assert bytes(got) == data
    elif stdout_kind == "file":
        assert (tmp / "stdout").read_bytes() == data
    for path in paths:
        assert path.read_bytes() == (prefix if append else b"") + data


@PROPERTY_SETTINGS
@given(size=st.integers(0, 3_000_000), seed=st.integers(0, 2**32), files=st.integers(1, 3),
       pipe_size=st.sampled_from(traffic.PIPE_SIZES), skip=st.integers(0, 5000))
def test_a_regular_file_on_stdin_is_fed_from_its_position(tmp_path_factory, size, seed, files, pipe_size, skip):
    """stdin a regular file, opened and read up to `skip` by someone before: the tee feeds our
    pipe from the file's position (under trio), and every output gets the rest."""
    tmp = tmp_path_factory.mktemp("teefile")
    data = traffic.payload(seed, "tee", size)
    (tmp / "in").write_bytes(data)
    skip = min(skip, size)
    stdin = os.open(tmp / "in", os.O_RDONLY | os.O_CLOEXEC)
    os.lseek(stdin, skip, os.SEEK_SET)
    stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
    got = bytearray()
    reader = threading.Thread(target=traffic.read_to_eof, args=(stdout_r, got))
    reader.start()
    paths = [tmp / f"out{i}" for i in range(files)]
    config = TeeConfig(files=tuple(str(p) for p in paths), pipe_size=pipe_size)
    try:
        try:
            outcome = trio.run(run_tee, config, stdin, stdout_w)
        finally:
            os.close(stdout_w)
            reader.join(60)
    finally:
        os.close(stdin)
        os.close(stdout_r)
    rest = data[skip:]
    assert outcome.failed == [] and outcome.bytes == len(rest)
    assert bytes(got) == rest
    for path in paths:
        assert path.read_bytes() == rest
