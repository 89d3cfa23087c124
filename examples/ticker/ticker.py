"""A counter that prints to stdout: the smallest app whose state is visible.

Prints `tick N` every TICK_INTERVAL seconds. After a migration the count goes
on from where it was instead of starting at 1 again. Prints each forwarded
signal it receives, and on SIGTERM stops gracefully with TICKER_EXIT_CODE.
"""

import os
import signal
import sys
import time

interval = float(os.environ.get("TICK_INTERVAL", "0.5"))
exit_code = int(os.environ.get("TICKER_EXIT_CODE", "0"))
count = 0


def on_signal(signum, _frame):
    print(f"got {signal.Signals(signum).name} at tick {count}", flush=True)
    if signum == signal.SIGTERM:
        print(f"graceful stop at tick {count}, exit {exit_code}", flush=True)
        sys.exit(exit_code)


for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
            signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH):
    signal.signal(sig, on_signal)

print(f"ticker started, pid {os.getpid()}", flush=True)
while True:
    count += 1
    print(f"tick {count}", flush=True)
    time.sleep(interval)
