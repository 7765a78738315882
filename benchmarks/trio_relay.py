"""A TCP relay as a Python user would write it by hand with trio (the baseline
zcrelay must beat).  Usage: python trio_relay.py LISTEN_PORT TARGET_HOST:PORT
(LISTEN_PORT 0 picks a free port; prints "listening on 127.0.0.1:PORT")."""
import sys
import trio

async def pump(src, dst):
    while data := await src.receive_some(65536):
        await dst.send_all(data)
    await dst.send_eof()

async def main(port, host, target_port):
    async def handle(client):
        try:
            async with client, await trio.open_tcp_stream(host, target_port) as up:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pump, client, up)
                    nursery.start_soon(pump, up, client)
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # peer reset or target down: drop this connection only
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print(f"listening on 127.0.0.1:{listeners[0].socket.getsockname()[1]}",
          file=sys.stderr, flush=True)
    await trio.serve_listeners(handle, listeners)

host, _, tport = sys.argv[2].rpartition(":")
trio.run(main, int(sys.argv[1]), host, int(tport))
