"""A named counter for the supervisord example: prints `NAME tick N` every COUNTER_INTERVAL seconds.

Its count lives in memory only: after a migration it goes on from where it was.
"""

import os
import sys
import time

name = sys.argv[1] if len(sys.argv) > 1 else "counter"
interval = float(os.environ.get("COUNTER_INTERVAL", "0.5"))
count = 0

print(f"{name} started, pid {os.getpid()}", flush=True)
while True:
    count += 1
    print(f"{name} tick {count}", flush=True)
    time.sleep(interval)
