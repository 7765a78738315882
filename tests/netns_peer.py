"""A traffic peer to run inside a network namespace (`ip netns exec NS python -m tests.netns_peer`).

    server HOST          serve tests.traffic on HOST:0; print "listening on HOST:PORT", then one
                         JSON line per finished connection: [id, length, sha256]
    client HOST PORT N UP DOWN
                         run N traffic clients; print one JSON line with what arrived
"""

from __future__ import annotations

import json
import sys

import trio

from tests import traffic


async def server(host: str) -> None:
    srv = await traffic.open_server(host)
    print(f"listening on {host}:{srv.port}", flush=True)
    reported: set[int] = set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(srv.serve)
        while True:
            for conn_id, (length, sha) in list(srv.received.items()):
                if conn_id not in reported:
                    reported.add(conn_id)
                    print(json.dumps([conn_id, length, sha]), flush=True)
            await trio.sleep(0.05)


async def client(host: str, port: int, count: int, up: int, down: int) -> None:
    results = await traffic.run_clients((host, port), count, up, down)
    print(json.dumps([[r.conn_id, r.up_size, r.down_size, list(r.received)] for r in results]), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        trio.run(server, sys.argv[2])
    else:
        trio.run(client, sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:7]))
