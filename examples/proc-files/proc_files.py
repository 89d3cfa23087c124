"""Holds /proc/self/status open and reads it every tick, as CRIU's zdtm shm and
fanotify tests hold files under /proc/<pid>/.

The open file is recorded by path, /proc/<pid>/status. With the container's
/proc that <pid> is a container PID, which differs in the replacement, and the
restore fails. With CKPT_OWN_PROC=1 it is the PID inside the app's namespace,
which CRIU restores exactly.
"""

import os
import time

status = os.open("/proc/self/status", os.O_RDONLY)
print(f"proc-files: holding {os.readlink(f'/proc/self/fd/{status}')}", flush=True)
tick = 0
while True:
    tick += 1
    fields = dict(line.split(":\t", 1) for line in os.pread(status, 4096, 0).decode().splitlines() if ":\t" in line)
    print(f"tick {tick} status-of-pid {fields['Pid'].strip()} mine {os.getpid()}", flush=True)
    time.sleep(0.2)
