"""A TCP relay as a Python user would write it by hand with trio (the baseline
zcrelay must beat).  Usage: python trio_relay.py LISTEN_PORT TARGET_HOST:PORT
(LISTEN_PORT 0 picks a free port; prints "listening on 127.0.0.1:PORT")."""
import sys
import trio

async def pump(src, dst, scope):
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
        await dst.send_eof()
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        scope.cancel()  # peer reset: drop this connection only

async def main(port, host, target_port):
    async def handle(client):
        async with client:
            try:
                up = await trio.open_tcp_stream(host, target_port)
            except OSError:
                return  # target down: drop this connection only
            async with up, trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, up, nursery.cancel_scope)
                nursery.start_soon(pump, up, client, nursery.cancel_scope)
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print(f"listening on 127.0.0.1:{listeners[0].socket.getsockname()[1]}",
          file=sys.stderr, flush=True)
    await trio.serve_listeners(handle, listeners)

host, _, tport = sys.argv[2].rpartition(":")
trio.run(main, int(sys.argv[1]), host, int(tport))
