"""Network helpers for tests and benchmarks: a TCP proxy that delays or swallows traffic.

Used to make a real slapd slow (every answer delayed) or silent (connections accepted, never
answered), which a closed port cannot show.
"""

from __future__ import annotations

import asyncio
import threading

from labyard_hub.slapd import free_port


class DelayProxy:
    """Forward 127.0.0.1:<port> to ``target``, delaying every chunk from the server by ``delay``.

    ``silent = True`` accepts connections and never forwards anything (a hung server).
    Runs its own event loop in a thread, so blocking code under test cannot stall it.
    """

    def __init__(self, target_port: int, delay: float = 0.0):
        self.target_port = target_port
        self.delay = delay
        self.silent = False
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.connections = 0

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
        server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
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

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: bool) -> None:
            try:
                while data := await src.read(65536):
                    if delay and self.delay:
                        await asyncio.sleep(self.delay)
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
