"""Fixtures for the unit tier: fakes only, no Docker, no CRIU, no pycriu.

Some code under test changes process-wide state (signal handlers, the signal
wakeup fd, the SignalReceiver singleton, the root logger, subreaper status).
The fixtures here put back what they can, so one test cannot change the
outcome of another.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from supervisor_pkg.config import SETTINGS
from supervisor_pkg.signals import HANDLED_SIGNALS, SignalReceiver

# Every signal a test here may install a handler for, or reset (reset_in_child does SIGPIPE and SIGXFSZ).
_TOUCHED_SIGNALS = (*HANDLED_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ)


def sleep_until(condition: Callable[[], Any], timeout: float, interval: float = 0.01, what: str = "condition") -> Any:
    """Poll `condition` until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(name="sleep_until")
def sleep_until_fixture() -> Callable[..., Any]:
    return sleep_until


@pytest.fixture(autouse=True)
def _no_ckpt_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's own CKPT_* variables must not leak into what a test parses."""
    for setting in SETTINGS:
        monkeypatch.delenv(setting.variable, raising=False)


@pytest.fixture
def restore_signal_state() -> Iterator[None]:
    """Put back signal handlers, the wakeup fd and the SignalReceiver singleton."""
    handlers = {signum: signal.getsignal(signum) for signum in _TOUCHED_SIGNALS}
    wakeup_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_fd)
    instance = SignalReceiver._instance
    SignalReceiver._instance = None
    try:
        yield
    finally:
        signal.set_wakeup_fd(wakeup_fd)
        for signum, handler in handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        installed = SignalReceiver._instance
        if installed is not None and installed is not instance:
            for fd in (installed._read_fd, installed._write_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
        SignalReceiver._instance = instance


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """cli.setup_logging replaces the root logger's handlers (basicConfig force=True)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
