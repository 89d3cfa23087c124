"""Lease: one running instance per lineage, handed over on purpose, taken over from the dead; Heartbeat.

Every test uses a real lineage directory under tmp_path and real Lease objects
standing for instances in different containers; "waiting" is real time, kept
short by small intervals and timeouts.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor_pkg import config
from supervisor_pkg.errors import LeaseHeld, LeaseLost, StoppedWhileWaiting, StoreError
from supervisor_pkg.lease import LEASE_FILE, Heartbeat, Lease
from supervisor_pkg.signals import SignalReceiver
from supervisor_pkg.supervisor import Supervisor


@pytest.fixture
def lineage(tmp_path: Path) -> str:
    path = tmp_path / "checkpoints" / "app"
    path.mkdir(parents=True)
    return str(path)


def instance(lineage: str, name: str, host: str | None = None, interval: float = 0.05, timeout: float = 0.3) -> Lease:
    """The lease object of the instance running in container `name` on `host`."""
    identity = {"host": host or f"host-of-{name}", "container_id": name, "image_id": None}
    return Lease(lineage, identity, interval=interval, timeout=timeout)


def sleeping(seconds: float) -> bool:
    """should_stop for a waiter nobody asks to stop."""
    time.sleep(seconds)
    return False


def never_called(seconds: float) -> bool:
    pytest.fail("the waiter waited although it did not have to")


def lease_file(lineage: str) -> dict[str, Any]:
    return json.loads(Path(lineage, LEASE_FILE).read_text())


# --- acquiring ---------------------------------------------------------------------------------
def test_a_free_lineage_is_acquired_at_once_with_a_private_lease_file_naming_its_owner(lineage: str) -> None:
    mine = instance(lineage, "a")
    assert mine.acquire(handoff_timeout=5, should_stop=never_called) == "free"
    assert mine.held
    record = lease_file(lineage)
    assert record["owner"] == mine.token
    assert (record["host"], record["container_id"], record["pid"]) == ("host-of-a", "a", os.getpid())
    assert stat.S_IMODE(os.stat(mine.path).st_mode) == 0o600


def test_of_instances_creating_the_lease_at_the_same_moment_exactly_one_gets_it(lineage: str) -> None:
    contenders = [instance(lineage, f"c{number}") for number in range(8)]
    start = threading.Barrier(len(contenders))
    won: list[Lease] = []

    def contend(lease: Lease) -> None:
        start.wait()
        if lease.try_create():
            won.append(lease)

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(won) == 1
    assert [lease.held for lease in contenders].count(True) == 1
    assert lease_file(lineage)["owner"] == won[0].token


def test_the_loser_of_a_race_with_no_handoff_time_is_told_who_holds_the_lease(lineage: str) -> None:
    assert instance(lineage, "holder-container-id-0123456789").try_create()
    loser = instance(lineage, "b")
    with pytest.raises(LeaseHeld) as caught:
        loser.acquire(handoff_timeout=0, should_stop=sleeping)
    assert "host-of-holder-container-id-0123456789 container holder-conta" in caught.value.message
    assert "CKPT_HANDOFF_TIMEOUT" in caught.value.message and "own CKPT_NAME" in caught.value.message
    assert not loser.held


def test_a_live_lease_makes_the_waiter_wait_then_raise_lease_held_at_the_handoff_timeout(lineage: str) -> None:
    holder = instance(lineage, "a", interval=0.02)
    assert holder.try_create()
    heartbeat = Heartbeat(holder, on_lost=lambda reason: pytest.fail(f"holder lost its lease: {reason}"))
    heartbeat.start()
    # Without beats the waiter would take over after 0.3 s; they keep it waiting until the handoff timeout.
    waiter = instance(lineage, "b", interval=0.02, timeout=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(LeaseHeld, match=r"still leased by host host-of-a container a after 1 s"):
            waiter.acquire(handoff_timeout=1.2, should_stop=sleeping)
    finally:
        heartbeat.stop()
        heartbeat.join(timeout=5)
    assert time.monotonic() - started >= 1.2
    assert holder.held and lease_file(lineage)["owner"] == holder.token
    assert not waiter.held
    assert holder.beat > 5, "the holder kept beating all along"


def test_a_lease_released_by_its_holder_is_acquired_by_the_waiter(lineage: str) -> None:
    holder = instance(lineage, "a")
    assert holder.try_create()
    waiter = instance(lineage, "b")
    waits: list[float] = []

    def holder_publishes_and_releases_meanwhile(seconds: float) -> bool:
        waits.append(seconds)
        holder.release()
        return False

    how = waiter.acquire(handoff_timeout=30, should_stop=holder_publishes_and_releases_meanwhile)

    assert how == "released by its previous holder"
    assert len(waits) == 1
    assert waiter.held and not holder.held
    assert lease_file(lineage)["owner"] == waiter.token


def test_a_stale_lease_is_taken_over_and_its_old_holder_is_fenced(lineage: str) -> None:
    dead = instance(lineage, "a")  # its host froze: it never beats again
    assert dead.try_create()
    waiter = instance(lineage, "b", timeout=0.3)
    started = time.monotonic()

    assert waiter.acquire(handoff_timeout=30, should_stop=sleeping) == "expired"

    assert time.monotonic() - started >= 0.3, "only after `timeout` without a change"
    assert lease_file(lineage)["owner"] == waiter.token
    assert not [name for name in os.listdir(lineage) if name != LEASE_FILE], "no stale copy left behind"
    # The old holder wakes up: its next beat and its pre-publish check both say it was taken over.
    with pytest.raises(LeaseLost, match="taken over by host host-of-b container b"):
        dead.renew()
    with pytest.raises(LeaseLost):
        dead.check()
    assert not dead.held
    dead.release()  # must not delete the new holder's lease
    assert lease_file(lineage)["owner"] == waiter.token
    waiter.renew()
    assert lease_file(lineage)["beat"] == 1


def test_expiry_is_judged_by_the_waiters_clock_not_by_the_holders_timestamps(lineage: str) -> None:
    # A holder whose clock is an hour behind still beats: its lease changes, so it is live.
    holder = instance(lineage, "a", interval=0.02)
    assert holder.try_create()
    behind = time.time() - 3600
    stop = threading.Event()

    def beat_with_a_slow_clock() -> None:
        while not stop.wait(0.02):
            holder.renew()
            record = lease_file(lineage)
            record["time"] = behind
            Path(lineage, "lease.json.tmp").write_text(json.dumps(record))
            os.rename(Path(lineage, "lease.json.tmp"), Path(lineage, LEASE_FILE))

    beater = threading.Thread(target=beat_with_a_slow_clock)
    beater.start()
    try:
        with pytest.raises(LeaseHeld):
            instance(lineage, "b", timeout=0.3).acquire(handoff_timeout=0.8, should_stop=sleeping)
    finally:
        stop.set()
        beater.join(timeout=5)
    # A dead holder whose clock is an hour ahead is still dead once its lease stops changing.
    Path(lineage, LEASE_FILE).unlink()
    frozen = instance(lineage, "c")
    assert frozen.try_create()
    record = lease_file(lineage) | {"time": time.time() + 3600}
    Path(lineage, LEASE_FILE).write_text(json.dumps(record))
    assert instance(lineage, "d", timeout=0.3).acquire(handoff_timeout=30, should_stop=sleeping) == "expired"


def test_the_same_container_restarted_takes_its_own_lease_back_at_once(lineage: str) -> None:
    before_restart = instance(lineage, "0123456789ab", host="node-1")
    assert before_restart.try_create()
    after_restart = instance(lineage, "0123456789ab", host="node-1")

    how = after_restart.acquire(handoff_timeout=30, should_stop=never_called)

    assert how == "left by an earlier run of this same container"
    assert lease_file(lineage)["owner"] == after_restart.token


@pytest.mark.parametrize(("container_id", "host"), [("0123456789ab", "node-2"), ("fedcba987654", "node-1")])
def test_only_the_same_container_on_the_same_host_counts_as_a_restart(
    lineage: str, container_id: str, host: str
) -> None:
    assert instance(lineage, "0123456789ab", host="node-1").try_create()
    other = instance(lineage, container_id, host=host, timeout=10)
    with pytest.raises(LeaseHeld):
        other.acquire(handoff_timeout=0.1, should_stop=sleeping)


def test_without_a_container_id_no_lease_is_taken_for_ones_own(lineage: str) -> None:
    anonymous = {"host": "node-1", "container_id": None, "image_id": None}
    assert Lease(lineage, anonymous, interval=0.05, timeout=10).try_create()
    with pytest.raises(LeaseHeld):
        Lease(lineage, anonymous, interval=0.05, timeout=10).acquire(handoff_timeout=0.1, should_stop=sleeping)


def test_a_stop_request_while_waiting_raises_stopped_while_waiting(lineage: str) -> None:
    assert instance(lineage, "a").try_create()
    waiter = instance(lineage, "b", timeout=10)
    with pytest.raises(StoppedWhileWaiting, match="nothing was running"):
        waiter.acquire(handoff_timeout=30, should_stop=lambda seconds: True)
    assert not waiter.held


def test_a_volume_error_creating_the_lease_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "lineage").mkdir()
    missing = instance(str(tmp_path / "lineage"), "a")
    (tmp_path / "lineage").rmdir()  # the lineage vanished (an operator, another node's clean-up)
    with pytest.raises(StoreError, match="cannot create the lease: .*No such file"):
        missing.acquire(handoff_timeout=30, should_stop=never_called)


def test_two_waiters_taking_over_the_same_stale_lease_do_not_both_win(lineage: str) -> None:
    assert instance(lineage, "dead").try_create()
    first = instance(lineage, "b", timeout=0.2)
    second = instance(lineage, "c", timeout=0.2)
    take_over = second._take_over
    outcomes: list[bool] = []

    def first_takes_over_between_seconds_read_and_its_rename(*args: Any) -> bool:
        if outcomes:  # only the one race; afterwards first (not beating here) would legitimately expire
            raise LeaseHeld("test: the race is over")
        assert first.acquire(handoff_timeout=30, should_stop=sleeping) == "expired"
        outcomes.append(take_over(*args))
        first.check()  # second's rename must not have taken it away for good
        return outcomes[-1]

    second._take_over = first_takes_over_between_seconds_read_and_its_rename  # type: ignore[method-assign]
    with pytest.raises(LeaseHeld):
        second.acquire(handoff_timeout=30, should_stop=sleeping)
    assert outcomes == [False]
    first.check()  # the first taker still owns what it took
    assert not second.held


def test_a_lease_file_that_exists_but_cannot_be_read_does_not_make_acquire_spin(
    lineage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.symlink("/nonexistent/lease-target", os.path.join(lineage, LEASE_FILE))
    waiter = instance(lineage, "b", timeout=10)
    reads = 0
    real_read = waiter.read

    def counting_read() -> dict[str, Any] | None:
        nonlocal reads
        reads += 1
        if reads > 10_000:
            raise RuntimeError("acquire() spins: 10000 reads without waiting")
        return real_read()

    monkeypatch.setattr(waiter, "read", counting_read)
    with pytest.raises(LeaseHeld):
        waiter.acquire(handoff_timeout=0.2, should_stop=sleeping)


# --- holding -------------------------------------------------------------------------------------
def test_renew_rewrites_the_lease_with_the_next_beat_and_keeps_it_private(lineage: str) -> None:
    mine = instance(lineage, "a")
    assert mine.try_create()
    for expected in (1, 2, 3):
        mine.renew()
        assert lease_file(lineage)["beat"] == expected
    assert stat.S_IMODE(os.stat(mine.path).st_mode) == 0o600
    assert sorted(os.listdir(lineage)) == [LEASE_FILE], "no temporary file left behind"


def test_renew_and_release_of_a_lease_never_held_do_nothing(lineage: str) -> None:
    assert instance(lineage, "a").try_create()
    bystander = instance(lineage, "b")
    bystander.renew()
    bystander.release()
    assert lease_file(lineage)["container_id"] == "a"


def test_check_passes_while_the_lease_is_ours_and_fails_once_it_was_deleted(lineage: str) -> None:
    mine = instance(lineage, "a")
    assert mine.try_create()
    mine.check()
    os.unlink(mine.path)  # an operator "cleaning up" the volume
    with pytest.raises(LeaseLost, match="no longer ours"):
        mine.check()


def test_release_deletes_our_lease_so_a_replacement_may_take_it(lineage: str) -> None:
    mine = instance(lineage, "a")
    assert mine.try_create()
    mine.release()
    assert not os.path.exists(mine.path)
    assert not mine.held
    assert instance(lineage, "b").acquire(handoff_timeout=0, should_stop=never_called) == "free"


def test_a_volume_error_reading_the_lease_during_renew_is_a_volume_error_not_a_lost_lease(
    lineage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = instance(lineage, "a")
    assert mine.try_create()

    def failing_read(name: str, limit: int) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO), name)

    monkeypatch.setattr(mine.lineage, "read_bytes", failing_read)
    with pytest.raises(OSError):
        mine.renew()
    assert mine.held


# --- the heartbeat -----------------------------------------------------------------------------------
def test_the_heartbeat_renews_the_lease_every_interval(lineage: str, sleep_until: Callable[..., Any]) -> None:
    mine = instance(lineage, "a", interval=0.02)
    assert mine.try_create()
    heartbeat = Heartbeat(mine, on_lost=lambda reason: pytest.fail(reason))
    heartbeat.start()
    try:
        sleep_until(lambda: lease_file(lineage)["beat"] >= 3, timeout=10, what="three beats on the volume")
    finally:
        heartbeat.stop()
        heartbeat.join(timeout=5)
    assert not heartbeat.is_alive()
    assert mine.beat >= 3
    stopped_at = lease_file(lineage)["beat"]
    time.sleep(0.1)  # five intervals: a stopped heartbeat must not beat again
    assert lease_file(lineage)["beat"] == stopped_at


def test_the_heartbeat_reports_a_taken_over_lease_exactly_once_and_stops(
    lineage: str, monkeypatch: pytest.MonkeyPatch, sleep_until: Callable[..., Any]
) -> None:
    mine = instance(lineage, "a", interval=0.02)
    assert mine.try_create()
    # No beat may be in flight while the take-over below happens (that interleaving is
    # test_a_renewal_in_flight_during_a_take_over_...): the test holds this lock meanwhile.
    no_beat_in_flight = threading.Lock()
    real_renew = mine.renew

    def renew_under_lock() -> None:
        with no_beat_in_flight:
            real_renew()

    monkeypatch.setattr(mine, "renew", renew_under_lock)
    reports: list[str] = []
    heartbeat = Heartbeat(mine, on_lost=reports.append)
    heartbeat.start()
    try:
        sleep_until(lambda: mine.beat >= 2, timeout=10, what="two beats")
        with no_beat_in_flight:  # another instance judged us dead and took over
            os.unlink(mine.path)
            usurper = instance(lineage, "b")
            assert usurper.try_create()
        sleep_until(lambda: reports, timeout=10, what="the loss to be reported")
        heartbeat.join(timeout=5)
        time.sleep(0.1)  # five more intervals: no second report
    finally:
        heartbeat.stop()
    assert not heartbeat.is_alive(), "a fenced heartbeat ends"
    assert len(reports) == 1
    assert "taken over by host host-of-b container b" in reports[0]
    assert not mine.held
    assert lease_file(lineage)["owner"] == usurper.token, "the fenced heartbeat must not overwrite the new lease"


def test_a_renewal_in_flight_during_a_take_over_does_not_leave_the_taker_believing_it_holds_the_lease(
    lineage: str, monkeypatch: pytest.MonkeyPatch, sleep_until: Callable[..., Any]
) -> None:
    frozen = instance(lineage, "a", interval=0.5, timeout=1.0)
    assert frozen.try_create()
    read_done, may_write = threading.Event(), threading.Event()
    real_read = frozen.read

    def read_then_freeze() -> dict[str, Any] | None:
        record = real_read()
        read_done.set()
        may_write.wait(timeout=30)  # the holder's VM is frozen between its read and its rename
        return record

    monkeypatch.setattr(frozen, "read", read_then_freeze)
    renewing = threading.Thread(target=frozen.renew)
    renewing.start()
    taker = instance(lineage, "b", timeout=0.2)
    outcome: list[str] = []
    taking = threading.Thread(target=lambda: outcome.append(taker.acquire(handoff_timeout=10, should_stop=sleeping)))
    try:
        assert read_done.wait(timeout=10)
        taking.start()
        sleep_until(lambda: lease_file(lineage)["owner"] == taker.token, timeout=10, what="the take-over")
    finally:
        may_write.set()  # the holder thaws: its beat lands on the taker's lease
        renewing.join(timeout=10)
        if taking.is_alive() or taking.ident is not None:
            taking.join(timeout=10)
    assert outcome, "the taker eventually gets the lease (the holder never beats again)"
    assert lease_file(lineage)["owner"] == taker.token, "acquire() returned, so the lease must be the taker's"


def test_the_heartbeat_logs_volume_errors_once_per_change_of_state_and_keeps_beating(
    lineage: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, sleep_until: Callable[..., Any]
) -> None:
    caplog.set_level(logging.INFO, logger="criu-supervisor")
    mine = instance(lineage, "a", interval=0.01)
    assert mine.try_create()
    # The volume: fails 5 beats, works 5, fails 5 again, then works.
    script = iter(["fail"] * 5 + ["ok"] * 5 + ["fail"] * 5)
    real_renew = mine.renew
    beats: list[str] = []

    def scripted_renew() -> None:
        step = next(script, "ok")
        beats.append(step)
        if step == "fail":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_renew()

    monkeypatch.setattr(mine, "renew", scripted_renew)
    heartbeat = Heartbeat(mine, on_lost=lambda reason: pytest.fail(reason))
    heartbeat.start()
    try:
        sleep_until(lambda: len(beats) >= 18, timeout=10, what="the scripted beats")
    finally:
        heartbeat.stop()
        heartbeat.join(timeout=5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot renew the lease" in r.message]
    recoveries = [r for r in caplog.records if "lease heartbeat works again" in r.message]
    assert len(warnings) == 2, [r.message for r in warnings]
    assert "Input/output error" in warnings[0].message
    assert len(recoveries) == 2
    assert mine.held


# --- the supervisor's use of the lease -----------------------------------------------------------------
def test_a_stop_request_while_the_supervisor_waits_for_the_lease_ends_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "default").mkdir(parents=True)
    holder = Lease(str(checkpoints / "default"), {"host": "other", "container_id": "other"}, interval=5, timeout=30)
    assert holder.try_create()
    receiver = SignalReceiver()
    loaded = config.load({"CKPT_DIR": str(checkpoints), "CKPT_HANDOFF_TIMEOUT": "300"})
    supervisor = Supervisor(loaded, ["app"], receiver)
    receiver._events.append(int(signal.SIGTERM))  # docker stop while we wait: what the handler records
    started = time.monotonic()
    try:
        with pytest.raises(StoppedWhileWaiting):
            supervisor.take_lease()
    finally:
        supervisor.release_lease()
        for fd in (receiver._read_fd, receiver._write_fd):
            os.close(fd)
    assert time.monotonic() - started < 10, "not the 300 s handoff timeout"
    assert supervisor.heartbeat is None
    assert lease_file(str(checkpoints / "default"))["owner"] == holder.token


def test_a_supervisor_whose_restore_is_stuck_does_not_renew_its_lease(
    lineage: str, sleep_until: Callable[..., Any]
) -> None:
    mine = instance(lineage, "a", interval=0.02)
    assert mine.try_create()
    heartbeat = Heartbeat(mine, on_lost=lambda reason: pytest.fail(reason))
    stuck = {"reason": "the restore has made no progress for 20 s"}
    heartbeat.stuck = lambda: stuck["reason"]
    heartbeat.start()
    try:
        time.sleep(0.3)
        assert lease_file(lineage)["beat"] == 0, "no beat while stuck: the lease expires for a replacement"
        stuck["reason"] = None  # type: ignore[assignment]
        sleep_until(lambda: lease_file(lineage)["beat"] >= 2, timeout=10, what="beats once unstuck")
    finally:
        heartbeat.stop()
        heartbeat.join(timeout=5)


def test_a_restore_is_stuck_for_the_heartbeat_only_after_half_a_lease_timeout_without_progress(
    tmp_path: Path,
) -> None:
    from supervisor_pkg import config, metrics
    from supervisor_pkg.restore import RestoreFlow
    from supervisor_pkg.signals import SignalReceiver
    from supervisor_pkg.store import Store

    loaded = config.load({"CKPT_DIR": str(tmp_path), "CKPT_LEASE_TIMEOUT": "10", "CKPT_LEASE_INTERVAL": "1"})
    (tmp_path / "default").mkdir()
    lease = instance(str(tmp_path / "default"), "a", interval=1, timeout=10)
    flow = RestoreFlow(loaded, ["app"], Store(str(tmp_path), "default"), lease, SignalReceiver(), metrics.Metrics())
    assert flow.stuck() is None, "not restoring"
    flow.restoring, flow.last_progress = True, time.monotonic() - 4
    assert flow.stuck() is None, "quiet for less than half the lease timeout"
    flow.last_progress = time.monotonic() - 6
    assert "no progress for 6 s" in (flow.stuck() or "")
    flow.progressed()
    assert flow.stuck() is None
