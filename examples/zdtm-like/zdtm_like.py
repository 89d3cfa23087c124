"""Tiny programs in the spirit of CRIU's zdtm tests, for what the supervisor must carry or explain.

    zdtm_like.py locks [DIR]    holds a POSIX (fcntl) lock, an OFD lock and a flock in DIR (default
                                /var/lib/zdtm), and a child holds a POSIX read lock: all carried (file_locks)
    zdtm_like.py locks --check [DIR]
                                run beside the app: tries to take each lock, and prints which are held
    zdtm_like.py link-remap DIR holds a file open whose name was removed while another hard link to it
                                remains (zdtm's link_remap cases): CRIU needs link_remap
    zdtm_like.py stopped        a child stopped by SIGSTOP (state T): CRIU carries it, still stopped
    zdtm_like.py traced         a child traced by its parent (zdtm ptrace_sig): CRIU cannot dump it

Each prints `tick N ...` every 0.2 s, so that a restored copy shows it goes on, and stops on SIGTERM
with `graceful stop at tick N`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import struct
import sys
import time

F_OFD_GETLK, F_OFD_SETLK = 36, 37  # <linux/fcntl.h>
PTRACE_CONT, PTRACE_SEIZE, PTRACE_INTERRUPT = 7, 0x4206, 0x4207
TICK = 0.2
tick = 0


def graceful(*_: object) -> None:
    print(f"graceful stop at tick {tick}", flush=True)
    sys.exit(0)


def ticks(describe: str) -> None:
    global tick
    print(f"ready {describe}", flush=True)
    while True:
        tick += 1
        print(f"tick {tick} {describe}", flush=True)
        time.sleep(TICK)


def flock_struct(kind: int, start: int, length: int) -> bytes:
    # struct flock on x86_64: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid (+ padding)
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, start, length, 0)


def locked_files(directory: str) -> dict[str, str]:
    return {name: os.path.join(directory, name) for name in ("posix", "ofd", "flock", "child-posix")}


def hold_locks(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    files = locked_files(directory)
    handles = {name: os.open(path, os.O_RDWR | os.O_CREAT, 0o644) for name, path in files.items()
               if name != "child-posix"}
    fcntl.lockf(handles["posix"], fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)  # bytes 0-99
    fcntl.fcntl(handles["ofd"], F_OFD_SETLK, flock_struct(fcntl.F_WRLCK, 0, 0))
    fcntl.flock(handles["flock"], fcntl.LOCK_EX | fcntl.LOCK_NB)
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # The child opens its file itself: CRIU 4.2.1 drops a POSIX lock that a process holds through a file
        # description inherited from its parent (it dumps each open file once, with the first holder's locks).
        own = os.open(files["child-posix"], os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.lockf(own, fcntl.LOCK_SH | fcntl.LOCK_NB, 10, 0)  # bytes 0-9, shared
        while True:
            time.sleep(1)
    ticks(f"locks held by {os.getpid()} and child {child}")


def check_locks(directory: str) -> None:
    """Which of the app's locks are held: each is tried non-blocking from this other process."""
    files = locked_files(directory)
    held = {}
    for name, path in files.items():
        fd = os.open(path, os.O_RDWR)
        try:
            if name == "ofd":
                fcntl.fcntl(fd, F_OFD_SETLK, flock_struct(fcntl.F_WRLCK, 0, 0))
            elif name == "flock":
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            held[name] = "free"
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            held[name] = "held"
        finally:
            os.close(fd)
    print(json.dumps(held))


def hold_link_remap(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    path, kept = os.path.join(directory, "linked"), os.path.join(directory, "linked.kept")
    for name in (path, kept):
        if os.path.exists(name):
            os.unlink(name)
    handle = open(path, "w+")
    handle.write("written before the name was removed\n")
    handle.flush()
    os.link(path, kept)
    os.unlink(path)  # the fd now names "linked (deleted)", but the inode keeps one link: a linked remap
    global tick
    print("ready link-remap", flush=True)
    while True:
        tick += 1
        handle.seek(0)
        print(f"tick {tick} link-remap reads {handle.readline().strip()!r} nlink {os.fstat(handle.fileno()).st_nlink}",
              flush=True)
        time.sleep(TICK)


def stopped_child() -> None:
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            time.sleep(1)
    os.kill(child, signal.SIGSTOP)
    os.waitpid(child, os.WUNTRACED)
    ticks(f"child {child} stopped")


def traced_child() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            time.sleep(1)
    if libc.ptrace(PTRACE_SEIZE, child, None, None) != 0:
        raise OSError(ctypes.get_errno(), "PTRACE_SEIZE failed")
    libc.ptrace(PTRACE_INTERRUPT, child, None, None)
    os.waitpid(child, 0)  # the child is in a ptrace stop (state t), traced by us
    ticks(f"child {child} traced by {os.getpid()}")


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGTERM, graceful)
    mode, rest = argv[0], argv[1:]
    if mode == "locks" and rest[:1] == ["--check"]:
        check_locks(rest[1] if len(rest) > 1 else "/var/lib/zdtm")
    elif mode == "locks":
        hold_locks(rest[0] if rest else "/var/lib/zdtm")
    elif mode == "link-remap":
        hold_link_remap(rest[0])
    elif mode == "stopped":
        stopped_child()
    elif mode == "traced":
        traced_child()
    else:
        sys.exit(f"unknown mode {mode!r}: see the docstring")


if __name__ == "__main__":
    main(sys.argv[1:])
