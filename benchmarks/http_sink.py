"""A small HTTP/1.1 server on the loopback interface, for webhook
benchmarks and tests: keep-alive, h11, one task per connection.

``serve_http(respond)`` calls ``await respond(path, headers, body)`` for each
request and answers with the status it returns. Run as a program
(``python -m benchmarks.http_sink``), it prints ``{"event": "ready",
"port": N}`` and answers every request 204 at once, except paths under
``/hang/``, which it never answers (a receiver that times out), until it is
killed.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial

import h11
import trio

__all__ = ["Respond", "serve_http"]

Respond = Callable[[str, dict[str, str], bytes], Awaitable[int]]


async def serve_http(
    respond: Respond,
    *,
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on 127.0.0.1 until cancelled; ``started`` gets the port."""
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=1024)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_connection, respond), listeners)


async def _connection(respond: Respond, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            request: h11.Request | None = None
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(bytes(data))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if request is None:
                return
            headers = {k.decode(): v.decode() for k, v in request.headers}
            status = await respond(request.target.decode(), headers, bytes(body))
            head = h11.Response(status_code=status, headers=[("content-length", "0")])
            await stream.send_all(conn.send(head) + conn.send(h11.EndOfMessage()))
            if conn.our_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await stream.aclose()


async def _default(path: str, headers: dict[str, str], body: bytes) -> int:
    if path.startswith("/hang/"):
        await trio.sleep_forever()
    return 204


async def _main() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, _default)
        print(json.dumps({"event": "ready", "port": port}), flush=True)


if __name__ == "__main__":
    trio.run(_main)
