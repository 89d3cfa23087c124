"""A counter in memory, on an image that is not ours: Debian bookworm and its own Python 3.11.

One line per request on 127.0.0.1:7000: `incr` adds one; any other line only asks.
The answer: count=N born=T python=X.Y (T: when this process started, which a
restore keeps and a fresh start does not).
"""

import socket
import sys
import time

born = time.time_ns()
count = 0
server = socket.create_server(("127.0.0.1", 7000))
print(f"counter ready on Python {sys.version.split()[0]}", flush=True)
while True:
    connection, _ = server.accept()
    with connection:
        request = connection.makefile().readline().strip()
        if request == "incr":
            count += 1
        python = "%d.%d" % sys.version_info[:2]
        connection.sendall(f"count={count} born={born} python={python}\n".encode())
