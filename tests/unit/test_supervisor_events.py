"""Supervisor: which signal does what, the asserted state machine, and the checkpoint/restore decisions.

os.kill is replaced by a recorder so nothing is really signalled, except in the
tests that run a real child as the app.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor_pkg import compat, config, criu, launcher
from supervisor_pkg.errors import (
    CHECKPOINT_AT_FAULT,
    CannotRestoreHere,
    DumpFailed,
    EnvironmentProblem,
    LazyRestoreCorrupt,
    LeaseLost,
    RestoreFailed,
    RestoreInterrupted,
    RestoreRequired,
    RestoreStalled,
    StoppedDuringRestore,
    StoreError,
)
from supervisor_pkg.lease import Lease
from supervisor_pkg.signals import SignalReceiver
from supervisor_pkg.store import Store
from supervisor_pkg.supervisor import LEASE_LOST, LazyProblem, LazyRestore, State, Supervisor
from supervisor_pkg.triggers import Notice

FAKE_APP_PID = 4_194_305  # above PID_MAX_LIMIT (2**22): never a real process
FORWARDED = [signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGWINCH]


class Recorder:
    """Stands in for os.kill and for the supervisor's checkpoint."""

    def __init__(self) -> None:
        self.kills: list[tuple[int, int]] = []
        self.checkpoints = 0

    def kill(self, pid: int, signum: int) -> None:
        self.kills.append((pid, int(signum)))

    def final_checkpoint(self, notice: Notice, after: str | None = None) -> None:
        self.checkpoints += 1


# A queue only (no handlers installed); one for the module, so no test leaks pipe fds.
_RECEIVER = SignalReceiver()


def make_supervisor(tmp_path: Path, **environment: str) -> Supervisor:
    loaded = config.load({"CKPT_DIR": str(tmp_path / "checkpoints"), **environment})
    _RECEIVER.wait(timeout=0)  # nothing left over from another test
    return Supervisor(loaded, ["app"], receiver=_RECEIVER)


@pytest.fixture
def leased_supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    """A supervisor that owns its lineage's lease (free on a fresh volume: no waiting)."""
    supervisor = make_supervisor(tmp_path)
    supervisor.take_lease()
    assert supervisor.lease is not None and supervisor.lease.held
    try:
        yield supervisor
    finally:
        supervisor.release_lease()


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recording = Recorder()
    monkeypatch.setattr(os, "kill", recording.kill)
    return recording


def running(supervisor: Supervisor, recorder: Recorder, state: State = State.RUNNING) -> Supervisor:
    supervisor.app_pid = FAKE_APP_PID
    supervisor.state = state
    supervisor._final_checkpoint = recorder.final_checkpoint  # type: ignore[method-assign]
    return supervisor


# --- signal routing ----------------------------------------------------------------------
@pytest.mark.parametrize("signum", FORWARDED, ids=lambda s: s.name)
def test_signals_other_than_the_checkpoint_signal_are_forwarded_to_the_app(
    tmp_path: Path, recorder: Recorder, signum: signal.Signals
) -> None:
    supervisor = running(make_supervisor(tmp_path), recorder)
    supervisor._handle(int(signum))  # the receiver records plain ints
    assert recorder.kills == [(FAKE_APP_PID, signum)]
    assert recorder.checkpoints == 0


def test_the_default_checkpoint_signal_sigterm_checkpoints_and_is_not_forwarded(tmp_path: Path,
                                                                               recorder: Recorder) -> None:
    supervisor = running(make_supervisor(tmp_path), recorder)
    supervisor._handle(int(signal.SIGTERM))
    assert recorder.checkpoints == 1
    assert recorder.kills == []


def test_with_ckpt_signal_usr1_sigterm_is_forwarded_and_usr1_checkpoints(tmp_path: Path, recorder: Recorder) -> None:
    supervisor = running(make_supervisor(tmp_path, CKPT_SIGNAL="SIGUSR1"), recorder)
    supervisor._handle(int(signal.SIGTERM))
    assert recorder.kills == [(FAKE_APP_PID, signal.SIGTERM)]
    assert recorder.checkpoints == 0
    supervisor._handle(int(signal.SIGUSR1))
    assert recorder.checkpoints == 1
    assert recorder.kills == [(FAKE_APP_PID, signal.SIGTERM)]


@pytest.mark.parametrize("checkpoint_signal", ["SIGTERM", "SIGUSR1"])
def test_after_a_failed_checkpoint_the_checkpoint_signal_asks_the_app_to_stop_with_sigterm(
    tmp_path: Path, recorder: Recorder, checkpoint_signal: str
) -> None:
    supervisor = running(make_supervisor(tmp_path, CKPT_SIGNAL=checkpoint_signal), recorder, State.STOPPING)
    supervisor._handle(int(signal.Signals[checkpoint_signal]))
    assert recorder.kills == [(FAKE_APP_PID, signal.SIGTERM)]
    assert recorder.checkpoints == 0


@pytest.mark.parametrize(
    "state",
    [State.STARTING, State.RESTORING, State.COLD_START, State.CHECKPOINTING, State.CHECKPOINTED, State.EXITING],
)
def test_the_checkpoint_signal_outside_running_never_starts_a_second_dump(
    tmp_path: Path, recorder: Recorder, state: State
) -> None:
    supervisor = running(make_supervisor(tmp_path), recorder, state)
    supervisor._handle(int(signal.SIGTERM))
    assert recorder.checkpoints == 0
    assert recorder.kills == []


def test_sigchld_does_nothing_by_itself(tmp_path: Path, recorder: Recorder) -> None:
    supervisor = running(make_supervisor(tmp_path), recorder)
    supervisor._handle(int(signal.SIGCHLD))
    assert recorder.kills == []
    assert recorder.checkpoints == 0
    assert supervisor.state is State.RUNNING


def test_nothing_is_forwarded_before_there_is_an_app(tmp_path: Path, recorder: Recorder) -> None:
    supervisor = make_supervisor(tmp_path)
    supervisor._handle(int(signal.SIGHUP))
    assert recorder.kills == []


def test_forwarding_to_an_app_that_is_already_gone_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def gone(pid: int, signum: int) -> None:
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(os, "kill", gone)
    supervisor = make_supervisor(tmp_path)
    supervisor.app_pid, supervisor.state = FAKE_APP_PID, State.RUNNING
    supervisor._handle(int(signal.SIGHUP))  # must not raise


@pytest.mark.parametrize("state", [State.EXITING, State.STOPPING])
def test_no_signal_is_sent_to_the_app_pid_after_the_app_was_reaped(
    tmp_path: Path, recorder: Recorder, state: State
) -> None:
    # Regression: after the final checkpoint _wait_for_app reaped the app, later signals of the same batch
    # were still sent to its old PID, which the kernel may already have given to another process.
    supervisor = make_supervisor(tmp_path)
    supervisor.app_pid, supervisor.state = FAKE_APP_PID, state
    supervisor._handle(int(signal.SIGHUP))
    assert recorder.kills == [(FAKE_APP_PID, signal.SIGHUP)], "not reaped yet: forwarded"
    supervisor.app_status = 0  # reaped
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1):
        supervisor._handle(int(signum))
    assert recorder.kills == [(FAKE_APP_PID, signal.SIGHUP)]


# --- the state machine ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        [State.RESTORING, State.RUNNING, State.CHECKPOINTING, State.CHECKPOINTED, State.EXITING],
        [State.COLD_START, State.RUNNING, State.CHECKPOINTING, State.FAILED, State.STOPPING, State.EXITING],
        [State.RESTORING, State.COLD_START, State.RUNNING, State.EXITING],
        [State.RESTORING, State.EXITING],
        [State.EXITING],
        [State.COLD_START, State.RUNNING, State.STOPPING, State.EXITING],
    ],
    ids=["restore-checkpoint", "cold-failed-stop", "restore-failed-cold", "require-nothing", "early-exit", "fenced"],
)
def test_the_documented_paths_are_legal(tmp_path: Path, path: list[State]) -> None:
    supervisor = make_supervisor(tmp_path)
    for state in path:
        supervisor._transition(state)
    assert supervisor.state is path[-1]


@pytest.mark.parametrize(
    ("start", "illegal"),
    [
        (State.STARTING, State.RUNNING),
        (State.STARTING, State.CHECKPOINTING),
        (State.RUNNING, State.CHECKPOINTED),
        (State.RUNNING, State.RESTORING),
        (State.CHECKPOINTING, State.EXITING),
        (State.CHECKPOINTING, State.CHECKPOINTING),
        (State.FAILED, State.EXITING),
        (State.CHECKPOINTED, State.RUNNING),
        (State.EXITING, State.RUNNING),
        (State.EXITING, State.EXITING),
    ],
    ids=lambda s: s.value,
)
def test_an_illegal_transition_raises_and_leaves_the_state_alone(tmp_path: Path, start: State, illegal: State) -> None:
    supervisor = make_supervisor(tmp_path)
    supervisor.state = start
    with pytest.raises(AssertionError, match=f"illegal transition {start.value} -> {illegal.value}"):
        supervisor._transition(illegal)
    assert supervisor.state is start


# --- the checkpoint path, with a fake CRIU and a real child as the app ------------------------
@pytest.fixture
def real_app() -> Iterator[int]:
    """A real `sleep` standing in for the app's namespace init; killed and reaped even if the test fails."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGCONT):
                signal.signal(signum, signal.SIG_DFL)
            os.execvp("sleep", ["sleep", "300"])
        finally:
            os._exit(127)
    yield pid
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def process_state(pid: int) -> str:
    """The kernel's state letter of `pid`: 'T' stopped, 'S'/'R' running, 'Z' dead but not reaped, '' gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


class CheckpointWorld:
    """A fake CRIU over a real app process, recording each step and the app's state at that moment.

    Like CRIU with leave_stopped, the fake dump leaves the app stopped (SIGSTOP) and
    writes images. launcher.resume is the real one, with namespace_members narrowed to
    the app (the real lookup would SIGCONT every process of our own PID namespace).
    """

    def __init__(
        self, supervisor: Supervisor, app: int, monkeypatch: pytest.MonkeyPatch, sleep_until: Callable[..., Any]
    ) -> None:
        self.supervisor = supervisor
        self.sleep_until = sleep_until
        self.app = app
        self.steps: list[tuple[str, str]] = []
        self.dump_options: list[dict[str, Any]] = []
        self.during_dump: list[Any] = []  # things that happen "while CRIU runs"
        self.files_failure: Exception | None = None
        real_kill, real_resume, real_publish = os.kill, launcher.resume, supervisor.store.publish

        def fake_dump(pid: int, images_dir: str, log_dir: str, log_name: str, **options: Any) -> criu.DumpResult:
            assert pid == app
            self.dump_options.append(options)
            real_kill(pid, signal.SIGSTOP)
            sleep_until(lambda: process_state(pid) == "T", timeout=10, what="the app to stop")
            if options.get("parent"):  # as CRIU does: link the previous images, write only dirty pages
                assert options["track_mem"], "CRIU refuses a parent without memory tracking"
                Path(images_dir, "parent").symlink_to(options["parent"])
            memory = b"dirty page" if options.get("parent") else b"memory of the app"
            Path(images_dir, "pages-1.img").write_bytes(memory)
            Path(images_dir, "core-1.img").write_bytes(b"registers")
            for happen in self.during_dump:
                happen()
            self._step("dump")
            return criu.DumpResult(seconds=0.01, log_path=os.path.join(log_dir, log_name))

        def fake_opened_files(images_dir: str) -> list[tuple[str, bool]]:
            self._step("carry")
            if self.files_failure is not None:
                raise self.files_failure
            return []  # the real one reads files.img through pycriu

        def recording_resume(init_pid: int) -> None:
            self._step("resume")
            real_resume(init_pid)

        def recording_publish(*args: Any, **kwargs: Any) -> Any:
            self._step("publish")
            generation = real_publish(*args, **kwargs)
            self._step("published")
            return generation

        def recording_kill(pid: int, signum: int) -> None:
            if pid == app and signum not in (signal.SIGCONT, signal.SIGSTOP):
                self._step(signal.Signals(signum).name)
            real_kill(pid, signum)

        monkeypatch.setattr(criu, "dump", fake_dump)
        monkeypatch.setattr(criu, "version", lambda: "4.2.1")
        self.dirty_tracking = False  # as on this machine's kernel; a test may say otherwise
        monkeypatch.setattr(criu, "has_feature", lambda name: name == "mem_dirty_track" and self.dirty_tracking)
        monkeypatch.setattr(criu, "opened_files", fake_opened_files)
        monkeypatch.setattr(launcher, "namespace_members", lambda init_pid: [init_pid] if init_pid == app else [])
        monkeypatch.setattr(launcher, "resume", recording_resume)
        monkeypatch.setattr(supervisor.store, "publish", recording_publish)
        monkeypatch.setattr(os, "kill", recording_kill)
        supervisor.app_pid, supervisor.state = app, State.RUNNING

    def _step(self, name: str) -> None:
        self.steps.append((name, process_state(self.app)))

    def names(self) -> list[str]:
        return [name for name, _ in self.steps]

    def state_at(self, name: str) -> str:
        [state] = [state for step, state in self.steps if step == name]
        return state

    def reap_app(self) -> int:
        """Collect the app the way the supervise loop does; return its wait status."""
        supervisor = self.supervisor

        def reaped() -> bool:
            supervisor._reap()
            return supervisor.app_status is not None

        self.sleep_until(reaped, timeout=10, what="the app to exit")
        assert supervisor.app_status is not None
        return supervisor.app_status


@pytest.fixture
def world(
    leased_supervisor: Supervisor, real_app: int, monkeypatch: pytest.MonkeyPatch, sleep_until: Callable[..., Any]
) -> CheckpointWorld:
    return CheckpointWorld(leased_supervisor, real_app, monkeypatch, sleep_until)


def staging_dirs(store: Store) -> list[str]:
    return [entry for entry in os.listdir(store.lineage) if entry.startswith(".staging-")]


def test_a_final_checkpoint_kills_the_app_only_after_the_generation_is_published(world: CheckpointWorld) -> None:
    supervisor = world.supervisor

    supervisor._handle(int(signal.SIGTERM))

    assert world.names() == ["dump", "carry", "publish", "published", "SIGKILL"]
    assert world.state_at("publish") == "T", "the app must be alive and stopped while its checkpoint is written"
    assert world.state_at("SIGKILL") == "T", "killed straight from the stop: it never ran past its checkpoint"
    assert world.dump_options == [{"tcp": "close", "log_level": 4, "external": [], "mount_namespace": False,
                                   "track_mem": False, "parent": None}], (
        "no leave_running any more: CRIU leaves it stopped"
    )
    assert supervisor.state is State.EXITING
    assert supervisor.exit_code == 0
    assert supervisor.app_status is not None, "the killed app must have been reaped"
    assert os.WIFSIGNALED(supervisor.app_status) and os.WTERMSIG(supervisor.app_status) == signal.SIGKILL
    generations = supervisor.store.generations()
    assert [g.name for g in generations] == ["gen-00000001"]
    manifest = supervisor.store.verify(generations[0], "4.2.1")
    assert manifest["stats"]["final"] is True
    assert set(manifest["files"]) == {"pages-1.img", "core-1.img"}
    assert supervisor.lease is not None and not supervisor.lease.held, "released: the replacement may restore"
    assert not os.path.exists(supervisor.lease.path)


def _volume_full_when_publishing(world: CheckpointWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    real_rename = os.rename

    def rename(source: str, target: str, **dir_fds: int) -> None:
        if os.path.basename(target).startswith("gen-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_rename(source, target, **dir_fds)

    monkeypatch.setattr(os, "rename", rename)


def _lease_taken_over_during_the_dump(world: CheckpointWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    lease = world.supervisor.lease
    assert lease is not None

    def take_over() -> None:  # what another instance does after judging our lease expired
        os.unlink(lease.path)
        assert Lease(os.path.dirname(lease.path), {"host": "other-host", "container_id": "other"}, 5, 30).try_create()

    world.during_dump.append(take_over)


def _files_img_unreadable(world: CheckpointWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    world.files_failure = DumpFailed("cannot read the dump's file list: truncated files.img")


PUBLISH_FAILURES = [
    (_volume_full_when_publishing, "publish", "the checkpoint volume is full"),
    (_lease_taken_over_during_the_dump, "publish", "the lease is no longer ours"),
    (_files_img_unreadable, "carry", "cannot read the dump's file list"),
]


@pytest.mark.parametrize(
    ("failure", "last_step", "logged"), PUBLISH_FAILURES, ids=["ENOSPC", "LeaseLost", "files.img"]
)
def test_a_failure_after_the_dump_resumes_the_app_then_stops_it_gracefully_and_publishes_nothing(
    world: CheckpointWorld,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: Any,
    last_step: str,
    logged: str,
) -> None:
    supervisor = world.supervisor
    failure(world, monkeypatch)

    supervisor._handle(int(signal.SIGTERM))

    steps = world.names()
    assert steps == ["dump", "carry", *(["publish"] if last_step == "publish" else []), "resume", "SIGTERM"]
    assert world.state_at("resume") == "T"
    assert world.state_at("SIGTERM") in ("R", "S"), "the app must be alive and running when asked to stop"
    assert logged in caplog.text
    assert (supervisor.state, supervisor.exit_code) == (State.STOPPING, None)
    # The app lived until our SIGTERM, and that SIGTERM is what ended it.
    status = world.reap_app()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    supervisor._app_exited()
    assert (supervisor.state, supervisor.exit_code) == (State.EXITING, 128 + signal.SIGTERM)
    assert supervisor.store.generations() == []
    assert staging_dirs(supervisor.store) == []
    assert not os.path.exists(os.path.join(supervisor.store.lineage, "latest"))


def test_a_fenced_checkpoint_leaves_the_new_holders_lease_alone(
    world: CheckpointWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisor = world.supervisor
    _lease_taken_over_during_the_dump(world, monkeypatch)
    supervisor._handle(int(signal.SIGTERM))
    supervisor.release_lease()
    assert supervisor.lease is not None
    assert (supervisor.lease.read() or {}).get("container_id") == "other"


def test_a_takeover_seen_while_publishing_a_leave_running_checkpoint_still_stops_the_app(
    world: CheckpointWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The failed checkpoint leaves the app running; the heartbeat's next beat must still fence it.
    supervisor = world.supervisor
    _lease_taken_over_during_the_dump(world, monkeypatch)
    supervisor._handle(Notice(source="periodic", final=False))
    assert supervisor.state is State.RUNNING
    assert supervisor.lease is not None

    with pytest.raises(LeaseLost):
        supervisor.lease.renew()  # what the heartbeat thread does next; it then posts LEASE_LOST
    supervisor._handle(LEASE_LOST)

    assert supervisor.state is State.STOPPING
    assert world.names()[-1] == "SIGTERM"


def test_a_leave_running_checkpoint_resumes_the_app_before_publishing(world: CheckpointWorld) -> None:
    supervisor = world.supervisor

    generation = supervisor.checkpoint(final=False, trigger="periodic")

    assert world.names() == ["dump", "carry", "resume", "publish", "published"]
    assert world.state_at("carry") == "T", "carried files are copied while the app is stopped, matching its memory"
    assert world.state_at("publish") in ("R", "S"), "the app must not wait for the volume"
    assert process_state(world.app) in ("R", "S"), "still running, not killed"
    assert supervisor.app_status is None
    assert generation.name == "gen-00000001"
    assert supervisor.store.verify(generation, "4.2.1")["stats"]["final"] is False
    assert supervisor.lease is not None and supervisor.lease.held


def test_a_leave_running_checkpoint_that_fails_to_publish_resumes_the_app_once_and_keeps_it_running(
    world: CheckpointWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    _volume_full_when_publishing(world, monkeypatch)
    failures: list[str] = []
    supervisor = world.supervisor

    supervisor._handle(Notice(source="periodic", final=False, on_failed=failures.append))

    assert world.names() == ["dump", "carry", "resume", "publish"], "resumed once, before publishing, not again"
    assert process_state(world.app) in ("R", "S")
    assert supervisor.state is State.RUNNING
    assert len(failures) == 1 and "full" in failures[0]
    assert supervisor.store.generations() == []
    assert staging_dirs(supervisor.store) == []


# --- incremental final dumps, where the kernel tracks dirty pages (not this machine's kernel) -----------
def test_with_dirty_tracking_the_final_dump_writes_only_what_changed_since_the_safety_net(
    world: CheckpointWorld, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="criu-supervisor")
    world.dirty_tracking = True
    supervisor = world.supervisor
    supervisor.store.keep = 1

    supervisor.checkpoint(final=False, trigger="aws")  # the long notice's safety net
    supervisor._handle(int(signal.SIGTERM))

    assert [(o["track_mem"], o["parent"]) for o in world.dump_options] == [(True, None), (True, "../gen-00000001")]
    assert supervisor.exit_code == 0
    final = supervisor.store.generations()[0]
    manifest = supervisor.store.verify(final, "4.2.1")
    assert (final.name, manifest["parent"]["generation"]) == ("gen-00000002", "gen-00000001")
    assert os.readlink(os.path.join(final.path, "parent")) == "../gen-00000001"
    assert [g.name for g in supervisor.store.generations()] == ["gen-00000002", "gen-00000001"], (
        "CKPT_KEEP=1, but the parent holds the final checkpoint's unchanged pages"
    )
    assert supervisor.last_checkpoint["parent"] == "gen-00000001"
    assert "(incremental: only pages dirtied since gen-00000001" in caplog.text


def test_without_dirty_tracking_both_dumps_are_full_ones(world: CheckpointWorld) -> None:
    supervisor = world.supervisor
    supervisor.checkpoint(final=False, trigger="aws")
    supervisor._handle(int(signal.SIGTERM))

    assert [(o["track_mem"], o["parent"]) for o in world.dump_options] == [(False, None), (False, None)]
    final = supervisor.store.generations()[0]
    assert "parent" not in supervisor.store.verify(final, "4.2.1")
    assert not os.path.lexists(os.path.join(final.path, "parent"))


def test_a_final_dump_without_an_earlier_one_in_this_run_is_full(world: CheckpointWorld) -> None:
    world.dirty_tracking = True
    world.supervisor._handle(int(signal.SIGTERM))
    assert [(o["track_mem"], o["parent"]) for o in world.dump_options] == [(False, None)]


def criu_refuses_once(world: CheckpointWorld) -> None:
    """The next dump fails as CRIU would (e.g. "Tracking memory is not available"), the one after works."""

    def refuse() -> None:
        world.during_dump.remove(refuse)
        raise DumpFailed("checkpoint failed: Tracking memory is not available", errno=1, log_path="/x/dump.log")

    world.during_dump.append(refuse)


def test_a_tracked_dump_that_criu_refuses_is_taken_again_in_full_and_tracking_stops_for_the_run(
    world: CheckpointWorld, caplog: pytest.LogCaptureFixture
) -> None:
    world.dirty_tracking = True
    supervisor = world.supervisor
    supervisor.checkpoint(final=False, trigger="aws")
    criu_refuses_once(world)

    supervisor._handle(Notice(source="periodic", final=False))  # CRIU may reset the dirty bits before failing
    assert supervisor.state is State.RUNNING
    supervisor._handle(int(signal.SIGTERM))

    assert [(o["track_mem"], o["parent"]) for o in world.dump_options] == [
        (True, None), (True, None), (False, None), (False, None)]
    assert [g.name for g in supervisor.store.generations()] == ["gen-00000003", "gen-00000002"], "kept 2, none lost"
    assert "parent" not in supervisor.store.verify(supervisor.store.generations()[0], "4.2.1")
    assert "dumping again in full, and without memory tracking for the rest of this run" in caplog.text


def test_an_incremental_final_dump_that_criu_refuses_is_taken_again_in_full(world: CheckpointWorld) -> None:
    world.dirty_tracking = True
    supervisor = world.supervisor
    supervisor.checkpoint(final=False, trigger="aws")
    criu_refuses_once(world)

    supervisor._handle(int(signal.SIGTERM))

    assert [(o["track_mem"], o["parent"]) for o in world.dump_options] == [
        (True, None), (True, "../gen-00000001"), (False, None)]
    assert supervisor.exit_code == 0, "the final checkpoint was published, not replaced by a graceful stop"
    final = supervisor.store.generations()[0]
    assert final.name == "gen-00000002" and "parent" not in supervisor.store.verify(final, "4.2.1")


def test_a_safety_net_rejected_meanwhile_is_not_used_as_a_parent(world: CheckpointWorld) -> None:
    world.dirty_tracking = True
    supervisor = world.supervisor
    net = supervisor.checkpoint(final=False, trigger="aws")
    supervisor.store.reject(net, "refused by an operator")

    supervisor._handle(int(signal.SIGTERM))

    assert world.dump_options[-1]["parent"] is None


@pytest.mark.parametrize(
    ("feature", "compress", "tracks", "plan"),
    [
        (False, "none", False, "not possible (the kernel has no soft-dirty tracking); the final dump is a full one"),
        (True, "zstd", False, "not used with CKPT_COMPRESS=zstd"),
        (True, "none", True, "on: the safety net is dumped with soft-dirty tracking"),
    ],
)
def test_the_incremental_plan_is_logged_as_it_will_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, feature: bool, compress: str, tracks: bool, plan: str
) -> None:
    monkeypatch.setattr(criu, "has_feature", lambda name: feature)
    supervisor = make_supervisor(tmp_path, CKPT_COMPRESS=compress)
    assert supervisor._tracks_dirty_pages() is tracks
    assert supervisor._incremental_plan().startswith(plan)


def test_a_failed_dump_falls_back_to_a_graceful_sigterm_and_publishes_nothing(
    leased_supervisor: Supervisor, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_dump(*args: Any, **kwargs: Any) -> None:
        raise DumpFailed("checkpoint failed: ptrace denied", errno=1, log_path="/x/dump.log")

    resumed: list[int] = []
    monkeypatch.setattr(criu, "dump", failing_dump)
    monkeypatch.setattr(launcher, "resume", resumed.append)
    supervisor = leased_supervisor
    supervisor.app_pid, supervisor.state = FAKE_APP_PID, State.RUNNING

    supervisor._handle(int(signal.SIGTERM))

    assert supervisor.state is State.STOPPING
    assert supervisor.exit_code is None, "we wait for the app's own exit"
    assert resumed == [], "CRIU resumes a tree it failed to dump itself"
    assert recorder.kills == [(FAKE_APP_PID, signal.SIGTERM)]
    assert supervisor.store.generations() == []
    assert staging_dirs(supervisor.store) == []


@pytest.mark.parametrize("failure", [
    EnvironmentProblem("pycriu is not installed: use the criu-supervisor base image"),
    RuntimeError("a bug"),
], ids=["environment", "bug"])
def test_any_failure_of_a_final_checkpoint_falls_back_to_the_graceful_stop_rather_than_ending_pid_1(
    world: CheckpointWorld, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failure: Exception
) -> None:
    # Were it to escape, PID 1 would exit and the kernel would SIGKILL the app: no checkpoint and no graceful stop.
    def failing_dump(*args: Any, **kwargs: Any) -> None:
        raise failure  # before CRIU stops anything, as a failed pycriu import would

    monkeypatch.setattr(criu, "dump", failing_dump)
    supervisor = world.supervisor

    supervisor._handle(int(signal.SIGTERM))

    assert world.names() == ["SIGTERM"], "dump failed; the app asked to stop"
    assert supervisor.state is State.STOPPING
    assert str(failure) in caplog.text
    status = world.reap_app()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_after_the_fallback_the_supervisor_exits_with_the_apps_own_code(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_checkpoint(final: bool, trigger: str = "manual") -> None:
        raise StoreError("the checkpoint volume is full")

    supervisor = make_supervisor(tmp_path)
    supervisor.app_pid, supervisor.state = FAKE_APP_PID, State.RUNNING
    monkeypatch.setattr(supervisor, "checkpoint", failing_checkpoint)
    supervisor._handle(int(signal.SIGTERM))
    assert supervisor.state is State.STOPPING
    child = os.fork()
    if child == 0:  # pragma: no cover - the app's graceful stop ends with code 3
        os._exit(3)
    _, supervisor.app_status = os.waitpid(child, 0)
    supervisor._app_exited()
    assert (supervisor.state, supervisor.exit_code) == (State.EXITING, 3)


def test_without_a_lease_a_checkpoint_is_refused_before_anything_is_dumped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(criu, "dump", lambda *a, **k: pytest.fail("dumped without owning the lineage"))
    supervisor = make_supervisor(tmp_path)
    supervisor.app_pid, supervisor.volume_problem = FAKE_APP_PID, "the checkpoint volume is read-only"
    with pytest.raises(StoreError, match="checkpoint impossible: the checkpoint volume is read-only"):
        supervisor.checkpoint(final=True)


# --- the lease lost while running: fenced -----------------------------------------------------
def test_a_lost_lease_stops_the_running_app_with_sigterm(tmp_path: Path, recorder: Recorder) -> None:
    supervisor = running(make_supervisor(tmp_path), recorder)
    supervisor._handle(LEASE_LOST)
    assert supervisor.state is State.STOPPING
    assert recorder.kills == [(FAKE_APP_PID, signal.SIGTERM)]
    assert recorder.checkpoints == 0, "never checkpoint over the new holder's lineage"
    supervisor._handle(int(signal.SIGTERM))  # docker stop meanwhile: still only a stop request
    assert recorder.checkpoints == 0
    assert recorder.kills == [(FAKE_APP_PID, signal.SIGTERM)] * 2


@pytest.mark.parametrize("state", [State.STARTING, State.RESTORING, State.CHECKPOINTING, State.STOPPING])
def test_a_lost_lease_outside_running_changes_nothing(tmp_path: Path, recorder: Recorder, state: State) -> None:
    supervisor = running(make_supervisor(tmp_path), recorder, state)
    supervisor._handle(LEASE_LOST)
    assert supervisor.state is state
    assert recorder.kills == []


# --- the start-up decision ------------------------------------------------------------------
def publish_fake_generation(store: Store, criu_version: str = "4.2.1", app: dict[str, Any] | None = None) -> Any:
    with store.staging() as staging:
        Path(staging.path, "pages-1.img").write_bytes(os.urandom(256))
        return store.publish(staging, {"criu_version": criu_version, **({"app": app} if app else {})})


def publish_fake_child(store: Store, parent: Any) -> Any:
    """An incremental generation, as a final dump with a parent publishes it."""
    with store.staging() as staging:
        Path(staging.path, "pages-1.img").write_bytes(b"dirty page")
        Path(staging.path, "parent").symlink_to(f"../{parent.name}")
        return store.publish(staging, {"criu_version": "4.2.1"}, parent=parent)


def corrupt(generation: Any) -> None:
    with open(os.path.join(generation.path, "pages-1.img"), "r+b") as image:
        first = image.read(1)
        image.seek(0)
        image.write(bytes([first[0] ^ 0xFF]))  # flipped: the pages are random, so writing a fixed byte might not


@dataclasses.dataclass
class StartWorld:
    """Fakes for what a restore needs from CRIU and the OS; records what was restored or spawned."""

    restored: list[str] = dataclasses.field(default_factory=list)
    spawned: list[list[str]] = dataclasses.field(default_factory=list)
    status_text: str = "CapPrm:\tffffffffff\nSeccomp:\t0\n"
    core_entries: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    failure: Exception | None = None

    def restore(self, images_dir: str, *args: Any, before_resume: Any = None, **kwargs: Any) -> int:
        """As CRIU: the tree is built, held at pre-resume (the hook may refuse), then runs."""
        if self.failure is not None:
            raise self.failure
        if before_resume is not None:
            before_resume(FAKE_APP_PID)
        self.restored.append(images_dir)
        return FAKE_APP_PID


@pytest.fixture
def start_world(monkeypatch: pytest.MonkeyPatch) -> StartWorld:
    world = StartWorld()
    monkeypatch.setattr(criu, "version", lambda: "4.2.1")
    monkeypatch.setattr(criu, "restore", world.restore)
    monkeypatch.setattr(criu, "core_entries", lambda paths: world.core_entries)
    monkeypatch.setattr(compat, "own_status", lambda: world.status_text)
    monkeypatch.setattr(launcher, "check_command", lambda command: command[0])
    monkeypatch.setattr(launcher, "spawn", lambda command, **options: world.spawned.append(command) or FAKE_APP_PID)
    return world


def test_restore_require_with_an_empty_volume_raises_restore_required(leased_supervisor: Supervisor) -> None:
    supervisor = leased_supervisor
    supervisor.config = dataclasses.replace(supervisor.config, restore="require")
    with pytest.raises(RestoreRequired, match="no checkpoint in"):
        supervisor.start()
    assert supervisor.state is State.EXITING


def test_a_corrupt_newest_generation_is_rejected_and_the_older_one_is_restored(
    leased_supervisor: Supervisor, start_world: StartWorld
) -> None:
    supervisor = leased_supervisor
    older = publish_fake_generation(supervisor.store)
    newest = publish_fake_generation(supervisor.store)
    with open(os.path.join(newest.path, "pages-1.img"), "r+b") as image:
        image.truncate(10)

    supervisor.start()

    assert start_world.restored == [older.path]
    assert supervisor.state is State.RUNNING
    assert newest.rejected and "truncated" in json.loads(Path(newest.path, "rejected.json").read_text())["reason"]
    claim = supervisor.store.read_claim(older)
    assert claim is not None and claim.lease == supervisor.lease.token and claim.resumed is not None


def test_pages_that_fail_their_check_reject_the_generation_before_the_app_runs(
    leased_supervisor: Supervisor, start_world: StartWorld
) -> None:
    # Pages are hashed while CRIU restores; the tree waits at pre-resume for the verdict.
    supervisor = leased_supervisor
    older = publish_fake_generation(supervisor.store)
    newest = publish_fake_generation(supervisor.store)
    corrupt(newest)

    supervisor.start()

    assert newest.rejected
    claim = supervisor.store.read_claim(newest)
    assert claim is not None and claim.resumed is None, "the app never ran on the bad pages"
    assert start_world.restored == [older.path]


def test_a_generation_this_container_cannot_read_is_kept_and_the_supervisor_exits_6(
    leased_supervisor: Supervisor, start_world: StartWorld
) -> None:
    supervisor = leased_supervisor
    older = publish_fake_generation(supervisor.store)
    newest = publish_fake_generation(supervisor.store, criu_version="4.3")

    with pytest.raises(CannotRestoreHere, match="this container cannot restore gen-00000002: .*CRIU 4.3"):
        supervisor.start()

    assert supervisor.state is State.EXITING
    assert not newest.rejected, "an image with CRIU 4.3 can still restore it"
    assert supervisor.store.read_claim(newest) is None, "a check before CRIU never touches the claim"
    assert not older.claimed, "never a silent rollback to an older state"
    assert "CRIU 4.3" in json.loads(Path(newest.path, "incompatible.json").read_text())["reason"]
    assert start_world.spawned == [] and start_world.restored == []


def test_with_ckpt_cannot_restore_fresh_the_app_starts_fresh_and_the_generation_is_kept(
    leased_supervisor: Supervisor, start_world: StartWorld, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = leased_supervisor
    supervisor.config = dataclasses.replace(supervisor.config, cannot_restore="fresh")
    newest = publish_fake_generation(supervisor.store, criu_version="4.3")

    supervisor.start()

    assert start_world.spawned == [["app"]]
    assert not newest.rejected
    assert "gen-00000001 is left on the volume, not condemned" in caplog.text


@pytest.mark.parametrize(
    ("status_text", "core", "cause"),
    [
        ("CapPrm:\t00000000a80425fb\nSeccomp:\t0\n",
         [{"thread_core": {"creds": {"cap_prm": [0xA80425FB | 1 << 25, 0], "cap_eff": [0, 0]}}}],
         "the app held CAP_SYS_TIME, which this container lacks"),
        ("CapPrm:\t000001ffffffffff\nSeccomp:\t2\n", [], "the supervisor runs under a seccomp filter"),
    ],
    ids=["capability", "seccomp"],
)
def test_a_container_check_failing_before_criu_keeps_the_generation_and_its_claim(
    leased_supervisor: Supervisor, start_world: StartWorld, status_text: str, core: list[dict[str, Any]], cause: str
) -> None:
    supervisor = leased_supervisor
    generation = publish_fake_generation(supervisor.store)
    start_world.status_text, start_world.core_entries = status_text, core

    with pytest.raises(CannotRestoreHere, match=cause):
        supervisor.start()

    assert not generation.rejected and not generation.claimed
    assert start_world.restored == []


def test_a_terminal_checkpoint_on_a_replacement_without_one_is_this_containers_fault(
    leased_supervisor: Supervisor, start_world: StartWorld
) -> None:
    supervisor = leased_supervisor
    generation = publish_fake_generation(supervisor.store, app={"stdio": {"1": "tty[8800:1d]"}})
    with pytest.raises(CannotRestoreHere, match="made on a terminal"):
        supervisor.start()
    assert not generation.rejected


@pytest.mark.parametrize(
    ("failure", "rejected"),
    [
        (RestoreFailed("restore failed: Unable to set a monotonic clock offset -> add --cap-add SYS_TIME"), False),
        (RestoreFailed("restore failed: Unexpected EOF on mm-1.img", fault=CHECKPOINT_AT_FAULT), True),
        (RestoreStalled("restore made no progress for 30 s"), False),
    ],
    ids=["container-at-fault", "images-at-fault", "stalled"],
)
def test_a_criu_failure_condemns_the_generation_only_when_its_images_are_at_fault(
    leased_supervisor: Supervisor, start_world: StartWorld, failure: RestoreFailed, rejected: bool
) -> None:
    supervisor = leased_supervisor
    generation = publish_fake_generation(supervisor.store)
    start_world.failure = failure
    if rejected:
        supervisor.start()
        assert start_world.spawned == [["app"]], "nothing older: a fresh start"
    else:
        with pytest.raises(CannotRestoreHere):
            supervisor.start()
        assert start_world.spawned == []
    assert generation.rejected is rejected


def test_a_stop_during_the_restore_aborts_it_and_keeps_the_generation(
    leased_supervisor: Supervisor, start_world: StartWorld
) -> None:
    supervisor = leased_supervisor
    generation = publish_fake_generation(supervisor.store)
    start_world.failure = RestoreInterrupted("restore interrupted: the container was asked to stop")
    with pytest.raises(StoppedDuringRestore, match="the checkpoint is kept"):
        supervisor.start()
    assert not generation.rejected and supervisor.state is State.EXITING


def test_a_corrupt_parent_is_rejected_with_its_incremental_child(
    leased_supervisor: Supervisor, start_world: StartWorld
) -> None:
    supervisor = leased_supervisor
    parent = publish_fake_generation(supervisor.store)
    child = publish_fake_child(supervisor.store, parent)
    corrupt(parent)

    supervisor.start()

    assert child.rejected and parent.rejected
    assert "as the parent of gen-00000002" in json.loads(Path(parent.path, "rejected.json").read_text())["reason"]
    assert start_world.spawned == [["app"]], "started fresh: nothing restorable"


def test_when_lazy_pages_cannot_run_every_page_is_checked_before_the_app_runs(
    leased_supervisor: Supervisor, start_world: StartWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisor = leased_supervisor
    supervisor.config = dataclasses.replace(supervisor.config, lazy="on")
    generation = publish_fake_generation(supervisor.store)
    corrupt(generation)

    def no_daemon(self: Any, timeout: float = 5.0) -> int:
        raise RestoreFailed("CRIU's lazy-pages daemon did not start: no userfaultfd")

    monkeypatch.setattr(criu.LazyPagesDaemon, "start", no_daemon)

    supervisor.start()  # falls back to a full restore, whose pages are checked before the app runs: they fail

    assert generation.rejected
    assert supervisor.state is State.RUNNING and start_world.spawned == [["app"]]


def test_a_claim_left_by_an_instance_that_died_before_its_app_ran_is_restored_again(
    leased_supervisor: Supervisor, start_world: StartWorld, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    supervisor = leased_supervisor
    generation = publish_fake_generation(supervisor.store)
    supervisor.store.claim(generation, "a-dead-holder")  # killed during its restore: never resumed

    supervisor.start()

    assert start_world.restored == [generation.path]
    assert "stopped before its app ran" in caplog.text
    claim = supervisor.store.read_claim(generation)
    assert claim is not None and claim.attempt == 2 and claim.lease == supervisor.lease.token


@pytest.mark.parametrize("rollback", ["allow", "refuse"])
def test_a_generation_whose_app_ran_in_an_instance_that_died_is_a_rollback_or_a_fresh_start(
    leased_supervisor: Supervisor, start_world: StartWorld, caplog: pytest.LogCaptureFixture, rollback: str
) -> None:
    caplog.set_level(logging.INFO)
    supervisor = leased_supervisor
    supervisor.config = dataclasses.replace(supervisor.config, rollback=rollback)
    generation = publish_fake_generation(supervisor.store)
    store = supervisor.store
    store.mark_resumed(generation, store.claim(generation, "a-dead-holder"))

    supervisor.start()

    if rollback == "allow":
        assert start_world.restored == [generation.path]
        assert "rolling back to gen-00000001" in caplog.text and "what the app did since is lost" in caplog.text
    else:
        assert start_world.restored == [] and start_world.spawned == [["app"]]
        assert "CKPT_ROLLBACK=refuse" in caplog.text


def test_a_generation_whose_restored_app_ended_on_its_own_is_superseded(
    leased_supervisor: Supervisor, start_world: StartWorld
) -> None:
    supervisor = leased_supervisor
    older = publish_fake_generation(supervisor.store)
    generation = publish_fake_generation(supervisor.store)
    store = supervisor.store
    store.mark_ended(generation, store.mark_resumed(generation, store.claim(generation, "holder")), 0)

    supervisor.start()

    assert start_world.restored == [] and start_world.spawned == [["app"]], "not older either: superseded"
    assert not older.claimed


def test_the_app_ending_on_its_own_is_recorded_on_the_generation_it_was_restored_from(
    leased_supervisor: Supervisor, start_world: StartWorld
) -> None:
    supervisor = leased_supervisor
    generation = publish_fake_generation(supervisor.store)
    supervisor.start()
    supervisor.app_status = 3 << 8  # exit(3)
    supervisor._app_exited()
    claim = supervisor.store.read_claim(generation)
    assert claim is not None and claim.ended is not None and claim.exit_code == 3
    assert supervisor.exit_code == 3


def test_a_generation_of_another_app_is_not_restored_and_the_change_is_noted(
    leased_supervisor: Supervisor, start_world: StartWorld, tmp_path: Path
) -> None:
    supervisor = leased_supervisor
    script = tmp_path / "app.py"
    script.write_text("print('v1')")
    # Same size, another mtime (a rebuilt image): hashed, and the hash differs.
    recorded = {str(script): {"size": 11, "mtime_ns": script.stat().st_mtime_ns - 1, "sha256": "0" * 64}}
    generation = publish_fake_generation(supervisor.store, app={"command": ["app"], "files": recorded})

    supervisor.start()  # the file's hash differs from the recorded one: another build of the app

    assert start_world.restored == [] and start_world.spawned == [["app"]]
    assert not generation.rejected, "not corrupt: the checkpoint of another version"
    noted = json.loads(Path(generation.path, "app-changed.json").read_text())["reason"]
    assert f"its files differ: {script}" in noted


def test_a_generation_made_with_another_command_is_not_restored(
    leased_supervisor: Supervisor, start_world: StartWorld
) -> None:
    supervisor = leased_supervisor
    generation = publish_fake_generation(supervisor.store, app={"command": ["ticker", "--fast"], "files": {}})
    supervisor.start()
    assert start_world.restored == []
    assert "the command was 'ticker --fast', it is 'app' here" in Path(generation.path, "app-changed.json").read_text()


def test_a_volume_error_while_claiming_keeps_the_generation_and_exits_6(
    leased_supervisor: Supervisor, start_world: StartWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisor = leased_supervisor
    generation = publish_fake_generation(supervisor.store)
    real_open = os.open

    def failing_open(path: str, flags: int, *args: Any, **kwargs: Any) -> int:
        if "claim.json" in str(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(CannotRestoreHere, match=f"cannot claim {generation.name}: I/O error on the checkpoint volume"):
        supervisor.start()
    assert start_world.restored == []
    assert not generation.rejected, "a volume hiccup says nothing against the checkpoint itself"


def test_when_a_lazy_restores_parent_pages_fail_the_check_the_parent_is_rejected_too(
    leased_supervisor: Supervisor, recorder: Recorder
) -> None:
    supervisor = leased_supervisor
    parent = publish_fake_generation(supervisor.store)
    child = publish_fake_child(supervisor.store, parent)
    supervisor.app_pid = FAKE_APP_PID
    daemon = criu.LazyPagesDaemon(child.path, "/nonexistent", "lazy-pages.log")  # never started: nothing to kill
    supervisor.lazy = LazyRestore(child, child.read_json("manifest.json"), daemon, started=time.monotonic())

    with pytest.raises(LazyRestoreCorrupt, match=r"after it ran \d+\.\d s on pages not yet verified.*is lost"):
        supervisor._lazy_progress(LazyProblem("gen-00000001: pages-1.img does not match its sha256", parent.name))

    assert (FAKE_APP_PID, signal.SIGKILL) in recorder.kills
    assert child.rejected and parent.rejected, "the next start must not lazily run the same bad pages again"


def test_a_lazy_daemon_that_fails_kills_the_app_but_keeps_the_generation(
    leased_supervisor: Supervisor, recorder: Recorder
) -> None:
    supervisor = leased_supervisor
    generation = publish_fake_generation(supervisor.store)
    supervisor.app_pid = FAKE_APP_PID
    daemon = criu.LazyPagesDaemon(generation.path, "/nonexistent", "lazy-pages.log")
    supervisor.lazy = LazyRestore(generation, generation.read_json("manifest.json"), daemon, started=time.monotonic())
    with pytest.raises(LazyRestoreCorrupt, match="The generation is kept"):
        supervisor._lazy_progress(daemon_status=1 << 8)
    assert not generation.rejected, "the daemon failing says nothing against the pages"


def test_the_same_app_with_a_rebuilt_but_identical_file_is_restored(
    leased_supervisor: Supervisor, start_world: StartWorld, tmp_path: Path
) -> None:
    supervisor = leased_supervisor
    script = tmp_path / "app.py"
    script.write_text("print('v1')")
    import hashlib

    same = {"size": 11, "mtime_ns": script.stat().st_mtime_ns - 1, "sha256": hashlib.sha256(b"print('v1')").hexdigest()}
    generation = publish_fake_generation(supervisor.store, app={"command": ["app"], "files": {str(script): same}})
    supervisor.start()
    assert start_world.restored == [generation.path]


def test_a_generation_of_another_image_digest_is_not_restored(
    leased_supervisor: Supervisor, start_world: StartWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisor = leased_supervisor
    monkeypatch.setenv("CKPT_IMAGE_ID", "sha256:" + "a" * 64)
    generation = publish_fake_generation(supervisor.store, app={"command": ["app"], "files": {}})
    monkeypatch.setenv("CKPT_IMAGE_ID", "sha256:" + "b" * 64)  # a deploy of another image
    supervisor.start()
    assert start_world.restored == [] and start_world.spawned == [["app"]]
    assert "(CKPT_IMAGE_ID)" in Path(generation.path, "app-changed.json").read_text()
