"""Network helpers for tests and benchmarks: a TCP proxy that delays or swallows traffic.

Used to make a real slapd slow (every answer delayed) or silent (connections accepted, never
answered), which a closed port cannot show.
"""

from __future__ import annotations

import asyncio
import socket
import threading

from labyard_hub.slapd import free_port


class DelayProxy:
    """Forward 127.0.0.1:<port> to ``target``, delivering every chunk from the server ``delay``
    seconds after it arrived (latency, as across a WAN link: answers to requests sent together
    arrive together, in order, each ``delay`` late).

    ``silent = True`` accepts new connections and never forwards anything (a hung server);
    ``frozen = True`` stops forwarding on the connections already open.
    Runs its own event loop in a thread, so blocking code under test cannot stall it.
    """

    def __init__(self, target_port: int, delay: float = 0.0):
        self.target_port = target_port
        self.delay = delay
        self.silent = False
        self.frozen = False
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._ready.set()
        await self._stop.wait()
        # like a server that goes down: the port refuses, open connections are reset
        server.close()
        for writer in self._writers:
            writer.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.05)  # let the transports really close their sockets

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        if self.silent:
            try:
                await reader.read()  # hold the connection open until the client gives up
            finally:
                writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.append(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    while self.frozen:
                        await asyncio.sleep(0.05)
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        async def delayed(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            chunks: asyncio.Queue = asyncio.Queue()

            async def deliver() -> None:
                while (item := await chunks.get()) is not None:
                    due, data = item
                    if (wait := due - loop.time()) > 0:
                        await asyncio.sleep(wait)
                    while self.frozen:
                        await asyncio.sleep(0.05)
                    dst.write(data)
                    await dst.drain()

            sender = asyncio.create_task(deliver())
            try:
                while data := await src.read(65536):
                    chunks.put_nowait((loop.time() + self.delay, data))
            except ConnectionError:
                pass
            finally:
                chunks.put_nowait(None)
                try:
                    await sender
                except ConnectionError:
                    pass
                dst.close()

        loop = asyncio.get_running_loop()
        await asyncio.gather(pipe(reader, up_writer), delayed(up_reader, writer))


class BlackHole:
    """A loopback port where connecting hangs, as to a host that is down (no answer to SYN).

    A listening socket that never accepts, its accept queue filled: the kernel then drops new
    SYNs, so ``connect()`` waits until the client's own timeout.
    """

    def __init__(self):
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)
        self.port = self._listener.getsockname()[1]
        self._queued: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def __enter__(self) -> BlackHole:
        for _ in range(8):
            s = socket.socket()
            s.settimeout(0.2)
            try:
                s.connect(("127.0.0.1", self.port))
                self._queued.append(s)
            except OSError:
                s.close()
                return self
        raise RuntimeError("the accept queue did not fill up")

    def __exit__(self, *exc) -> None:
        for s in self._queued:
            s.close()
        self._listener.close()
