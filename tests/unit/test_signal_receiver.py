"""SignalReceiver: handlers only record, the loop takes everything, in order, and wakes promptly.

These tests install real handlers in the pytest process and send real signals
to it; the restore_signal_state fixture puts everything back afterwards.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from supervisor_pkg import config
from supervisor_pkg.signals import HANDLED_SIGNALS, SignalReceiver, reset_in_child

pytestmark = pytest.mark.usefixtures("restore_signal_state")

SLOW = 30.0  # a wait() that is not woken takes this long; a woken one far less


def blocked_in_wait(thread_id: int) -> Callable[[], bool]:
    """True once `thread_id` is inside SignalReceiver.wait (i.e. about to block in select)."""
    def check() -> bool:
        frame = sys._current_frames().get(thread_id)
        return frame is not None and frame.f_code is SignalReceiver.wait.__code__
    return check


def wait_until_something(receiver: SignalReceiver, sleep_until: Callable[..., Any]) -> tuple[list[int | str], float]:
    """Call wait() as the loop does, until it returns something; report how long that took."""
    started = time.monotonic()
    taken: list[int | str] = []
    deadline = started + SLOW
    while not taken and time.monotonic() < deadline:
        taken = receiver.wait(timeout=deadline - time.monotonic())
    return taken, time.monotonic() - started


def test_install_early_installs_one_receiver_for_every_handled_signal() -> None:
    receiver = SignalReceiver.install_early()
    assert SignalReceiver.install_early() is receiver, "idempotent: entry.main and cli.run share it"
    for signum in HANDLED_SIGNALS:
        assert signal.getsignal(signum) == receiver._record, signum.name


@pytest.mark.parametrize("checkpoint_signal", config._CHECKPOINT_SIGNALS)
def test_every_accepted_checkpoint_signal_gets_a_handler(checkpoint_signal: str) -> None:
    receiver = SignalReceiver.install_early()
    assert signal.getsignal(signal.Signals[checkpoint_signal]) == receiver._record


def test_a_real_signal_is_recorded_and_returned_by_wait() -> None:
    receiver = SignalReceiver.install_early()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert receiver.wait(timeout=SLOW) == [signal.SIGUSR1]
    assert receiver.pending() == []


def test_a_signal_sent_while_the_loop_is_blocked_wakes_it(sleep_until: Callable[..., Any]) -> None:
    receiver = SignalReceiver.install_early()
    main = threading.get_ident()

    def send() -> None:
        sleep_until(blocked_in_wait(main), timeout=10, what="the main thread to block in wait()")
        os.kill(os.getpid(), signal.SIGUSR2)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        taken, elapsed = wait_until_something(receiver, sleep_until)
    finally:
        sender.join()
    assert taken == [signal.SIGUSR2]
    assert elapsed < SLOW / 3, "the wakeup fd must end select() at once"


def test_post_from_another_thread_wakes_wait(sleep_until: Callable[..., Any]) -> None:
    receiver = SignalReceiver()
    main = threading.get_ident()

    def post() -> None:
        sleep_until(blocked_in_wait(main), timeout=10, what="the main thread to block in wait()")
        receiver.post("spot-notice")

    poster = threading.Thread(target=post)
    poster.start()
    try:
        taken, elapsed = wait_until_something(receiver, sleep_until)
    finally:
        poster.join()
    assert taken == ["spot-notice"]
    assert elapsed < SLOW / 3


def test_nothing_is_lost_or_reordered_when_several_arrive_before_wait() -> None:
    receiver = SignalReceiver.install_early()
    os.kill(os.getpid(), signal.SIGUSR1)
    receiver.post("first-post")
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGWINCH)
    receiver.post("second-post")
    os.kill(os.getpid(), signal.SIGUSR1)  # a repeat is a separate event once the first was recorded
    assert receiver.wait(timeout=0) == [
        signal.SIGUSR1, "first-post", signal.SIGHUP, signal.SIGWINCH, "second-post", signal.SIGUSR1,
    ]
    assert receiver.wait(timeout=0) == []


def test_wait_returns_empty_after_its_timeout_when_nothing_happens() -> None:
    receiver = SignalReceiver()
    started = time.monotonic()
    assert receiver.wait(timeout=0.05) == []
    assert time.monotonic() - started >= 0.04


def test_many_posts_never_block_the_poster_even_when_the_pipe_is_full() -> None:
    receiver = SignalReceiver()
    for number in range(100_000):  # far more than a pipe buffer (64 KiB)
        receiver.post(f"event-{number}")
    taken = receiver.wait(timeout=0)
    assert len(taken) == 100_000
    assert taken[0] == "event-0" and taken[-1] == "event-99999"


# --- what the app inherits -------------------------------------------------------------------
def _signal_masks_of_a_program_execed_after(prepare: Callable[[], None]) -> dict[str, int]:
    """Fork, run `prepare` then reset_in_child(), exec cat /proc/self/status; return its Sig* masks."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_fd)
            os.dup2(write_fd, 1)
            prepare()
            reset_in_child()
            os.execv("/bin/cat", ["cat", "/proc/self/status"])
        finally:
            os._exit(127)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        status = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, status
    return {
        key: int(value, 16)
        for key, value in (line.split(":\t") for line in status.splitlines())
        if key in ("SigBlk", "SigIgn", "SigCgt")
    }


def _bit(signum: int) -> int:
    return 1 << (signum - 1)


def test_the_app_starts_with_no_blocked_and_no_ignored_handled_signals() -> None:
    def like_the_supervisor() -> None:
        SignalReceiver.install_early()
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGUSR1])
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    masks = _signal_masks_of_a_program_execed_after(like_the_supervisor)
    assert masks["SigBlk"] == 0
    for signum in HANDLED_SIGNALS:
        assert not masks["SigIgn"] & _bit(signum), f"{signum.name} would stay ignored in the app"


def test_the_app_does_not_inherit_pythons_ignored_sigpipe_and_sigxfsz() -> None:
    masks = _signal_masks_of_a_program_execed_after(lambda: None)
    assert not masks["SigIgn"] & (_bit(signal.SIGPIPE) | _bit(signal.SIGXFSZ))
