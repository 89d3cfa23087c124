"""Signal handlers that only record; the supervise loop acts.

Like supervisord's SignalReceiver and tini's sigtimedwait loop: a handler must
never call CRIU or do I/O. Each handler appends the signal number to a deque
(append is atomic under the GIL and takes no lock, so it cannot deadlock
against the main thread) and Python's wakeup fd writes a byte to a self-pipe,
which wakes the loop's select(). Other threads (triggers, heartbeats) post
their requests the same way with `post()`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import signal
from typing import ClassVar

# Every signal we care about. SIGKILL/SIGSTOP cannot be caught.
HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGPWR,
    signal.SIGCHLD,
)
# Python ignores these for itself; "ignored" survives exec, so the app must get them back.
_PYTHON_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ)


class SignalReceiver:
    """Records signals and posted events until the loop takes them."""

    _instance: ClassVar[SignalReceiver | None] = None

    def __init__(self) -> None:
        self._events: collections.deque[object] = collections.deque()
        # Non-inheritable (O_CLOEXEC) by default in Python: the app never sees it.
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    @classmethod
    def install_early(cls) -> SignalReceiver:
        """Install handlers for HANDLED_SIGNALS, then unblock them; idempotent.

        The image's entrypoint (images/base/shim.c) blocks these signals before
        it execs Python, so that one sent while Python starts stays pending
        instead of being dropped (PID 1 of a namespace ignores signals it has no
        handler for); unblocking delivers it to the handler installed here.
        """
        if cls._instance is None:
            receiver = cls()
            signal.set_wakeup_fd(receiver._write_fd, warn_on_full_buffer=False)
            for signum in HANDLED_SIGNALS:
                signal.signal(signum, receiver._record)
            cls._instance = receiver
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        return cls._instance

    def _record(self, signum: int, _frame: object) -> None:
        self._events.append(signum)

    def post(self, event: object) -> None:
        """Queue a non-signal event (from any thread) and wake the loop."""
        self._events.append(event)
        with contextlib.suppress(BlockingIOError):  # a full pipe: the loop is already due to wake
            os.write(self._write_fd, b"\0")

    def put_back(self, events: list[object]) -> None:
        """Return events taken by a nested wait, in order, ahead of anything newer."""
        self._events.extendleft(reversed(events))
        if events:
            self.post_wakeup()

    def post_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._write_fd, b"\0")

    def wait(self, timeout: float | None) -> list[object]:
        """Block until something is recorded or `timeout` passes; return it all."""
        if not self._events:
            select.select([self._read_fd], [], [], timeout)
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        taken: list[object] = []
        while self._events:
            taken.append(self._events.popleft())
        return taken

    def pending(self) -> list[object]:
        return list(self._events)


def reset_in_child() -> None:
    """In a forked child before exec: default dispositions, no wakeup fd."""
    signal.set_wakeup_fd(-1)
    for signum in (*HANDLED_SIGNALS, *_PYTHON_IGNORED):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
