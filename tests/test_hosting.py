"""zcrelay.hosting: trio as the guest of the reactor's own loop (how `zcrelay forward` runs).

Each test starts a guest run the way the CLI does and checks that the reactor is stepped by
the host loop (never by a trio task), that bytes arrive whole on both copy paths, that the
reactor's timers and trio's own waits both still fire, and that errors come out of the loop.
"""

from __future__ import annotations

import os

import pytest
import trio

from zcrelay import hosting
from zcrelay.excgroups import BaseExceptionGroup  # a builtin from 3.11 on, the backport's on 3.10
from zcrelay.pipes import PipePool
from zcrelay.reactor import Reactor
from zcrelay.relay import Engine, relay
from zcrelay.stats import Flow
from tests.test_reactor import _exchange, _two_pairs

MiB = 1 << 20


def run_hosted(async_fn, *args):
    """What zcrelay.cli.common.run does with hosted=True; returns (result, host)."""
    with hosting.Host() as host:
        trio.lowlevel.start_guest_run(async_fn, *args, run_sync_soon_threadsafe=host.call_threadsafe,
                                      run_sync_soon_not_threadsafe=host.call_soon, done_callback=host.done)
        return host.loop().unwrap(), host


@pytest.fixture
def no_reactor_task(monkeypatch):
    """Fail if any reactor is stepped or timed by a trio task instead of the host loop."""

    async def refuse(self):
        raise AssertionError("a reactor ran as a trio task")

    monkeypatch.setattr(Reactor, "run", refuse)
    monkeypatch.setattr(Reactor, "run_timers", refuse)


@pytest.mark.parametrize("path", ["splice", "copy"])
def test_hosted_relay_moves_every_byte_in_the_host_loop(no_reactor_task, path):
    engine = Engine(pool=PipePool(size=65536), splice=path == "splice")
    up_data, down_data = os.urandom(9 * MiB), os.urandom(7 * MiB)  # > pipe and socket buffers

    async def main():
        await trio.sleep(0.01)  # a trio wait: the guest's own I/O thread hands it back
        reactor = engine.reactor()
        assert hosting.current().reactor is reactor
        end, up, down = await _exchange(*await _two_pairs(), up_data, down_data, engine)
        engine.close()
        return end, up, down

    (end, up, down), host = run_hosted(main)
    assert end.reason == "eof"
    assert up.bytes == len(up_data) and down.bytes == len(down_data)
    if path == "splice":
        assert up.spliced == len(up_data) and down.spliced == len(down_data) and not engine.fallbacks
    else:
        assert up.copied == len(up_data) and engine.fallbacks == {"splice disabled": 2}
    assert hosting.current() is None


def test_hosted_reactor_timers_end_an_idle_relay(no_reactor_task):
    engine = Engine()

    async def main():
        (client, a), (b, server) = await _two_pairs()
        started = trio.current_time()
        with trio.fail_after(10):
            end = await relay(a, b, engine, Flow(), Flow(), idle=0.2)
        waited = trio.current_time() - started
        engine.close()
        for sock in (client, a, b, server):
            sock.close()
        return end, waited

    (end, waited), _host = run_hosted(main)
    assert end.reason == "idle"
    assert waited >= 0.2


def test_a_second_engine_in_one_host_runs_as_trio_tasks():
    """The host loop waits in one reactor; another engine's reactor runs as trio tasks."""
    first, second = Engine(), Engine()
    data = os.urandom(3 * MiB)

    async def main():
        one, two = first.reactor(), second.reactor()
        assert hosting.current().reactor is one and one is not two
        async with trio.open_nursery() as nursery:
            for engine in (first, second):
                nursery.start_soon(_exchange, *await _two_pairs(), data, data[::-1], engine)
        first.close()
        second.close()

    run_hosted(main)


def test_guest_errors_come_out_of_the_loop():
    async def main():
        engine = Engine()
        engine.reactor()
        await trio.sleep(0)
        raise ValueError("from the guest")

    with pytest.raises(ValueError, match="from the guest"):
        run_hosted(main)
    assert hosting.current() is None


def test_one_host_at_a_time():
    outer = hosting.Host()
    with outer:
        with pytest.raises(RuntimeError):
            with hosting.Host():
                pass
    os.close(outer._wakeup)  # left open: no guest run ended


def test_an_exception_out_of_the_loop_leaves_the_wakeup_fd_open():
    """If the loop itself raises (a KeyboardInterrupt outside any signal receiver), trio's
    helper thread may still post to the eventfd: closing it could hand its number to another
    file that the thread would then write to."""
    host = hosting.Host()
    with pytest.raises(KeyboardInterrupt):
        with host:
            raise KeyboardInterrupt
    os.fstat(host._wakeup)  # still open
    os.close(host._wakeup)


def test_a_reactor_callback_that_raises_ends_the_run_as_under_trio_run():
    """A reactor callback that raises (a bug: failing streams are ended by the reactor itself)
    used to leave the loop at once, abandoning the guest run: no task's cleanup ran (a
    forwarder's listeners, its connections), and trio's run state stayed in this thread, so
    no later trio.run could start ("Attempted to call run() from inside a run()"). It now
    ends the run as the reactor's crashed system task does under trio.run: every task is
    cancelled and cleaned up, and the error comes out as a TrioInternalError caused by it."""
    engine = Engine()
    cleaned = []

    async def main():
        reactor = engine.reactor()

        def bug() -> None:
            raise ValueError("a callback's bug")

        reactor.call_at(trio.current_time(), bug)
        try:
            await trio.sleep_forever()
        finally:
            cleaned.append(reactor.closed)
            engine.close()

    with pytest.raises(trio.TrioInternalError) as caught:
        run_hosted(main)
    cause = caught.value.__cause__
    while isinstance(cause, BaseExceptionGroup):  # trio's system nursery groups it, as under trio.run
        (cause,) = cause.exceptions
    assert isinstance(cause, ValueError)
    assert cleaned == [True]  # the task's cleanup ran, after the crashed reactor was closed
    assert hosting.current() is None
    trio.run(trio.sleep, 0)  # no run left behind in this thread
