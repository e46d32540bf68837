"""The echo backend of tests/load.rs, in a process of its own: the test process holds
the client sockets and carousel both sides of every connection, so the backend's
thousands of sockets must live in a third process (20 000 descriptors a process here).

Usage: python3 echo_server.py IP:PORT [IP:PORT ...]    (port 0: any free port)

Prints `ready IP:PORT ...` once every listener is up, echoes every connection until the
client half-closes, then closes it. Exits when its standard input closes, so that it
ends with the test however the test ends.
"""

import asyncio
import resource
import sys


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        # A false return has the transport close itself once what is buffered is sent:
        # the client's half-close is answered with the rest of its echo, then a close.
        return False

    # Flow control: while the client reads slower than it writes, stop reading from it,
    # so that a big transfer never piles up here.
    def pause_writing(self):
        self.transport.pause_reading()

    def resume_writing(self):
        self.transport.resume_reading()


async def main(addresses):
    # The soft descriptor limit may be below the hard one; this process needs one a
    # connection.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    servers = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        servers.append(await loop.create_server(Echo, host, int(port), backlog=4096))
    bound = ["%s:%d" % s.sockets[0].getsockname()[:2] for s in servers]
    print("ready " + " ".join(bound), flush=True)
    # Blocks in a worker thread until the test closes our standard input (or dies).
    await loop.run_in_executor(None, sys.stdin.buffer.read)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
