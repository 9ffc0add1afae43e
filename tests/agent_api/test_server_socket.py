"""The API's listening socket: connections it accepts run without Nagle's algorithm.

With Nagle on, a response's body waited for the client's delayed ACK of its headers: 44 ms per request
(measured with tritonclient, binary and JSON alike). asyncio turns it off only for sockets whose proto
says TCP; this checks the accepted connection's TCP_NODELAY as the event loop serving the API sees it.
"""

from __future__ import annotations

import asyncio
import socket

from edgepack.agent.api.server import _bind


def test_accepted_connections_have_tcp_nodelay() -> None:
    sock = _bind("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP

    async def main() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted = transport.get_extra_info("socket")
                seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        try:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            value = await asyncio.wait_for(seen, 10)
            writer.close()
            return value
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) != 0, "Nagle's algorithm is on for the API's connections"
