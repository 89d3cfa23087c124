"""A counter kept in SysV shared memory, guarded and mirrored by SysV semaphores.

Every SHM_TICK_INTERVAL seconds (0.2 by default) it takes semaphore 0 (a lock,
1 when free), adds 1 to the 64-bit counter in the shared memory segment, adds 1
to semaphore 1 (the ticks modulo SEM_WRAP, as a semaphore cannot exceed
SEMVMX = 32767), reads both back from the kernel, releases the lock and prints

    tick shm_counter=N sem_ticks=M shmid=S semid=T

The values come from the IPC objects, not from Python variables, so the line
shows what a migration carried. Invariant: sem_ticks == shm_counter % SEM_WRAP.
A fresh segment or semaphore set after a migration would restart at 0 and break
the count or the invariant; a lock semaphore restored as taken would stop it.

`python3 shm_counter.py --read` takes the lock (giving up after 5 s: the lock
was never released), reads the same values, and prints the same line once. Run
it in the app's IPC namespace (e.g. `nsenter --ipc --target PID`).

No SEM_UNDO: the lock is held for a few instructions only, and undo lists
would be state outside the objects themselves.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

SHM_KEY = 0x43525355  # "CRSU": fixed keys so another process can find the objects
SEM_KEY = 0x43525356
SHM_SIZE = 4096
SEM_WRAP = 10000
IPC_CREAT = 0o1000
GETVAL = 12
SETVAL = 16

libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmat.restype = ctypes.c_void_p
libc.semget.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
libc.semop.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
libc.semtimedop.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


class TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class SemBuf(ctypes.Structure):
    _fields_ = [("sem_num", ctypes.c_ushort), ("sem_op", ctypes.c_short), ("sem_flg", ctypes.c_short)]


def check(result: int, what: str) -> int:
    if result == -1 or result == ctypes.c_void_p(-1).value:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")
    return result


def semop(semid: int, number: int, delta: int, timeout: float | None = None) -> None:
    operation = SemBuf(number, delta, 0)
    if timeout is None:
        check(libc.semop(semid, ctypes.byref(operation), 1), f"semop({number}, {delta:+d})")
    else:  # EAGAIN after `timeout` seconds
        limit = TimeSpec(int(timeout), int(timeout % 1 * 1e9))
        result = libc.semtimedop(semid, ctypes.byref(operation), 1, ctypes.byref(limit))
        check(result, f"semop({number}, {delta:+d}) within {timeout} s")


def semval(semid: int, number: int) -> int:
    return check(libc.semctl(semid, number, GETVAL), f"semctl(GETVAL {number})")


def attach(create: bool) -> tuple[int, int, ctypes.c_uint64]:
    flags = (IPC_CREAT | 0o600) if create else 0
    shmid = check(libc.shmget(SHM_KEY, SHM_SIZE if create else 0, flags), "shmget")
    semid = check(libc.semget(SEM_KEY, 2 if create else 0, flags), "semget")
    address = check(libc.shmat(shmid, None, 0), "shmat")
    return shmid, semid, ctypes.c_uint64.from_address(address)


def line(shmid: int, semid: int, counter: ctypes.c_uint64) -> str:
    """Call with the lock held: the counter and semaphore 1 change together."""
    return f"tick shm_counter={counter.value} sem_ticks={semval(semid, 1)} shmid={shmid} semid={semid}"


def main() -> None:
    if sys.argv[1:] == ["--read"]:
        shmid, semid, counter = attach(create=False)
        semop(semid, 0, -1, timeout=5)
        text = line(shmid, semid, counter)
        semop(semid, 0, +1)
        print(text)
        return
    interval = float(os.environ.get("SHM_TICK_INTERVAL", "0.2"))
    shmid, semid, counter = attach(create=True)
    # A new set's values are 0 (Linux); make semaphore 0 a free lock.
    check(libc.semctl(semid, 0, SETVAL, ctypes.c_int(1)), "semctl(SETVAL)")

    def graceful_stop(_signum: int, _frame: object) -> None:
        print(f"graceful stop at shm_counter={counter.value}", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, graceful_stop)
    print(f"shm counter started, pid {os.getpid()}, shmid {shmid}, semid {semid}", flush=True)
    while True:
        semop(semid, 0, -1)  # take the lock
        counter.value += 1
        if semval(semid, 1) + 1 >= SEM_WRAP:
            semop(semid, 1, -(SEM_WRAP - 1))
        else:
            semop(semid, 1, +1)
        text = line(shmid, semid, counter)
        semop(semid, 0, +1)  # release it
        print(text, flush=True)
        time.sleep(interval)


if __name__ == "__main__":
    main()
