"""The short-lived program: works for JOB_SECONDS, then exits 0 (supervisord: autorestart=false).

`supervisorctl signal USR1 job` makes it finish JOB_FINISH_DELAY seconds after
the signal instead (0: at once), so a test can place its exit just before or
inside a checkpoint.

Deadlines are on CLOCK_MONOTONIC. A job frozen by the dump cannot exit while
CRIU holds it; CRIU restores the tree in a time namespace whose offsets keep the
monotonic clock going on from the moment of the dump, so the job finishes in
the replacement container after the time it still had left, not at once.
"""

import os
import signal
import time

work_seconds = float(os.environ.get("JOB_SECONDS", "30"))
finish_delay = float(os.environ.get("JOB_FINISH_DELAY", "0"))
deadline = time.monotonic() + work_seconds


def finish_soon(_signum, _frame):
    global deadline
    deadline = min(deadline, time.monotonic() + finish_delay)
    print(f"job asked to finish in {finish_delay:g} s", flush=True)


signal.signal(signal.SIGUSR1, finish_soon)
print(f"job started, pid {os.getpid()}, working for {work_seconds:g} s", flush=True)
while (remaining := deadline - time.monotonic()) > 0:
    # Short slices: after a signal handler, sleep() resumes its original length (PEP 475).
    time.sleep(min(remaining, 0.05))
print(f"job finished, pid {os.getpid()}, exit 0", flush=True)
