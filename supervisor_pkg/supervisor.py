"""The PID-1 loop: start (restore or spawn), supervise, checkpoint, exit.

States and the only transitions allowed (asserted, as supervisord does):

    STARTING ──> RESTORING ──> RUNNING ──> CHECKPOINTING ──> CHECKPOINTED ──> EXITING
        │            │            │  │           │
        └──> COLD_START ──> RUNNING  │           └──> FAILED ──> STOPPING ──> EXITING
                                     ├──> STOPPING (lease lost: fenced) ──> EXITING
                                     └──────────────────────────────────────> EXITING
    CHECKPOINTING ──> RUNNING        (a leave-running checkpoint, done or failed)
    CHECKPOINTED ──> IDLE ──> EXITING (after a cloud notice: idle until SIGTERM)

Signal handlers only record (see signals.py); this loop takes the records in
order and acts, so a checkpoint signal that arrives during start-up or a
restore is acted on as soon as the app is running, and a second one arriving
during a dump cannot start a second dump.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import threading
import time
from typing import Any

from supervisor_pkg import compat, cpu, criu, fingerprint, launcher, metrics
from supervisor_pkg.checkpoint import AppFacts, CheckpointFlow
from supervisor_pkg.config import Config
from supervisor_pkg.control import ControlRequest
from supervisor_pkg.errors import (
    CannotRestoreHere,
    ConfigError,
    EnvironmentProblem,
    LazyRestoreCorrupt,
    RestoreRequired,
    StoppedDuringRestore,
    StoreError,
    SupervisorError,
)
from supervisor_pkg.lease import Heartbeat, Lease
from supervisor_pkg.restore import LAZY_VERIFIED, LazyProblem, LazyRestore, Restored, RestoreFlow
from supervisor_pkg.signals import SignalReceiver
from supervisor_pkg.store import Claim, Generation, Store, identity, read_signing_key
from supervisor_pkg.triggers import CLOUD_SOURCES, ActiveTriggers, Notice

log = logging.getLogger("criu-supervisor")

# Passed on to the app as they are (tini, at the app's PID 1, passes them to CMD).
FORWARDED_SIGNALS = frozenset(
    {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH}
)
_STDIO_FDS = (0, 1, 2)
LEASE_LOST = "lease-lost"
# A notice shorter than this (GCP, Azure: ~30 s) goes straight to the final checkpoint;
# a longer one (AWS: 2 min) gets a leave-running safety net first.
LONG_NOTICE_SECONDS = 45.0
# A fresh app gets this long to bind its own ports before the metrics server checks them and binds its own.
METRICS_DELAY_AFTER_FRESH_START = 2.0
_STARTED_AT = time.time()


class State(enum.Enum):
    STARTING = "starting"
    RESTORING = "restoring"
    COLD_START = "cold-start"
    RUNNING = "running"
    CHECKPOINTING = "checkpointing"
    CHECKPOINTED = "checkpointed"
    FAILED = "failed"
    STOPPING = "stopping"
    IDLE = "idle"
    EXITING = "exiting"


_TRANSITIONS: dict[State, set[State]] = {
    State.STARTING: {State.RESTORING, State.COLD_START, State.EXITING},
    State.RESTORING: {State.RUNNING, State.COLD_START, State.EXITING},
    State.COLD_START: {State.RUNNING, State.EXITING},
    State.RUNNING: {State.CHECKPOINTING, State.STOPPING, State.EXITING},
    State.CHECKPOINTING: {State.CHECKPOINTED, State.FAILED, State.RUNNING},
    State.CHECKPOINTED: {State.EXITING, State.IDLE},
    State.IDLE: {State.EXITING},
    State.FAILED: {State.STOPPING},
    State.STOPPING: {State.EXITING},
    State.EXITING: set(),
}


def exit_code_for(status: int) -> int:
    """The app's wait status -> our exit code: its code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class Supervisor:
    def __init__(
        self, config: Config, command: list[str], receiver: SignalReceiver, store: Store | None = None
    ) -> None:
        self.config = config
        self.command = command
        self.receiver = receiver
        self.store = store or Store(
            config.dir, config.name, keep=config.keep, signing_key=read_signing_key(config.signing_key_file)
        )
        self.state = State.STARTING
        self.app_pid: int | None = None
        self.app_status: int | None = None
        self.exit_code: int | None = None
        self.restored_from: Generation | None = None
        self.restored_claim: Claim | None = None  # our claim on restored_from: marked ended if the app stops
        self.checkpointed_ports: set[int] = set()  # the app's listening ports in the checkpoint it came from
        self.app_baseline = "native"  # the CKPT_CPU_BASELINE the app was started with (restored: its checkpoint's)
        self.carried_paths: list[str] = []
        self.lease: Lease | None = None
        self.heartbeat: Heartbeat | None = None
        self.volume_problem = "the checkpoint volume is unusable"
        self.active_triggers: ActiveTriggers | None = None
        self.next_periodic: float | None = None  # monotonic time of the next periodic checkpoint
        self.final_at: float | None = None  # monotonic time of a scheduled final checkpoint
        self.pending_final: Notice | None = None  # the long notice that scheduled it
        self.deadline_notice: Notice | None = None  # the earliest announced end of this machine
        self.last_checkpoint: dict[str, Any] = {}
        self.last_restore: dict[str, Any] = {}
        self.metrics = metrics.Metrics()
        self.lazy: LazyRestore | None = None
        self.checkpoints = CheckpointFlow(config, self.store, self.metrics)
        self._announced_dirty_tracking = False

    # --- the whole life of a container, in order ----------------------------
    def run(self) -> int:
        launcher.become_subreaper()
        self._warn_if_checkpoints_cannot_work()
        try:
            self.take_lease()
            self.start()
            self.start_triggers()
            self.supervise()
        finally:
            self.stop_triggers()
            self.release_lease()
        assert self.exit_code is not None
        return self.exit_code

    @staticmethod
    def _warn_if_checkpoints_cannot_work() -> None:
        """Say at start, not at SIGTERM, what makes every checkpoint fail here (a seccomp filter on us, no /tmp)."""
        tmp = criu.ensure_tmp()
        if tmp is not None:
            made, message = tmp
            log.log(logging.INFO if made else logging.ERROR, "%s", message)
        try:
            problem = compat.check_seccomp(compat.own_status())
        except OSError:
            return
        if problem is not None:
            log.error("no checkpoint can work in this container: %s; the app runs, and stops gracefully at "
                      "SIGTERM without a checkpoint", problem)

    def take_lease(self) -> None:
        """Own the lineage before touching it: wait for a handoff, or take over a dead holder's lease."""
        # An app whose checkpoints cannot work must not run as if they could: a volume that is read-only,
        # full, missing or not a directory of ours at start is exit 4, before anything is started.
        try:
            self.store.open()
            assert self.store.lineage_dir is not None  # open() succeeded
            self.lease = Lease(self.store.lineage_dir, identity(), interval=self.config.lease_interval,
                               timeout=self.config.lease_timeout)
            how = self.lease.acquire(self.config.handoff_timeout, self._stop_requested_within)
        except StoreError as error:
            self.lease = None
            self._transition(State.EXITING)
            raise EnvironmentProblem(f"the checkpoint volume {self.config.dir} cannot be used: {error.message}. "
                                     "Nothing was started (checkpoints could not work)") from error
        log.info("took the lease on %s (%s)", self.store.lineage, how)
        # We own the lineage now: a staging dir older than a lease timeout is a crashed writer's.
        stale = self.store.clean_stale_staging(older_than=self.config.lease_timeout)
        if stale:
            log.info("removed %d unfinished checkpoint(s) left by a crashed writer: %s", len(stale), ", ".join(stale))
        self.heartbeat = Heartbeat(self.lease, on_lost=lambda reason: self.receiver.post(LEASE_LOST))
        self.heartbeat.start()

    def _stop_requested_within(self, seconds: float) -> bool:
        """While waiting for a lease there is no app: a stop request just ends the wait."""
        events = self.receiver.wait(timeout=seconds)
        return any(event in (self.config.signal, signal.SIGTERM, signal.SIGINT) for event in events)

    def release_lease(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.lease is not None:
            self.lease.release()

    def start(self) -> None:
        """Restore the newest valid checkpoint, or start CMD fresh; log which and why."""
        why_fresh = "CKPT_RESTORE=never"
        if self.config.restore != "never":
            self._transition(State.RESTORING)
            outcome = self._restore_newest()
            if isinstance(outcome, Restored):
                self._adopt(outcome)
                self._transition(State.RUNNING)
                self.checkpoints.record_layer(self.restored_from)
                self._warm_fingerprints()
                return
            why_fresh = outcome
            if self.config.restore == "require":
                self._transition(State.EXITING)
                raise RestoreRequired(f"CKPT_RESTORE=require but nothing can be restored: {why_fresh}")
        self._transition(State.COLD_START)
        launcher.check_command(self.command)
        self.app_baseline = self.config.cpu_baseline
        self.app_pid = launcher.spawn(
            self.command, share_ipc=self.config.share_ipc, deny_io_uring=self.config.io_uring == "deny",
            own_proc=self.config.own_proc, portable_caps=self.config.portable_caps,
            deny_mptcp=self.config.mptcp == "deny",
            environment=self._fresh_environment(),
        )
        log.info("started the app fresh (%s); app root pid %d", why_fresh, self.app_pid)
        self._transition(State.RUNNING)
        self.checkpoints.record_layer(self.restored_from)
        self._warm_fingerprints()

    def _fresh_environment(self) -> dict[str, str]:
        """The environment of a freshly started app: the one we were started with, plus what CKPT_CPU_BASELINE adds."""
        environment = launcher.environment_at_start()
        tunables = cpu.baseline_tunables(self.config.cpu_baseline, environment.get("GLIBC_TUNABLES"))
        if tunables is not None:
            environment["GLIBC_TUNABLES"] = tunables
            here = cpu.record()
            log.info("the app's glibc is kept to %s (CKPT_CPU_BASELINE; this CPU is %s): GLIBC_TUNABLES=%s",
                     self.config.cpu_baseline, here["level"], tunables)
        return environment

    def _restore_newest(self) -> Restored | str:
        """See restore.py: the restored app, or why the app starts fresh."""
        if self.lease is None:
            return self.volume_problem
        flow = RestoreFlow(self.config, self.command, self.store, self.lease, self.receiver, self.metrics)
        if self.heartbeat is not None:
            self.heartbeat.stuck = flow.stuck
        try:
            return flow.run()
        except (CannotRestoreHere, StoppedDuringRestore):
            self._transition(State.EXITING)
            raise
        finally:
            if self.heartbeat is not None:
                self.heartbeat.stuck = lambda: None

    def _adopt(self, restored: Restored) -> None:
        """The restored app is ours now: its pid, where it came from, and (lazily) its pages to watch."""
        self.app_pid = restored.pid
        self.restored_from, self.restored_claim = restored.generation, restored.claim
        self.carried_paths = restored.carried_paths
        self.checkpointed_ports = _ports(_app_section(restored.manifest).get("listening_ports"))
        recorded_cpu = restored.manifest.get("cpu")
        baseline = recorded_cpu.get("baseline") if isinstance(recorded_cpu, dict) else None
        self.app_baseline = baseline if baseline in cpu.BASELINES else "native"  # chosen at the app's fresh start
        self.last_restore = {
            "generation": restored.generation.name, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(restored.seconds, 3),
            "bytes": sum(int(entry.get("size", 0)) for entry in restored.manifest["files"].values()),
        }
        if restored.daemon is not None:
            self.lazy = LazyRestore(restored.generation, restored.manifest, restored.daemon, restored.started)
            self.lazy.verify_in_background(self.store, self.receiver.post)

    def _warm_fingerprints(self) -> None:
        """Hash the app's files in the background, so that its first checkpoint finds them hashed."""
        pid = self.app_pid

        def warm() -> None:
            time.sleep(1.0)  # let a fresh app map its libraries first
            if pid is not None and self.app_status is None:
                with contextlib.suppress(Exception):
                    fingerprint.record(launcher.namespace_members(pid), self.command, [self.config.dir], _STARTED_AT)

        threading.Thread(target=warm, name="fingerprint-warm-up", daemon=True).start()

    def start_triggers(self) -> None:
        """Start every configured source of checkpoint requests (each only posts to our queue)."""
        from supervisor_pkg import triggers as trigger_sources

        self.active_triggers = trigger_sources.start_all(self.config, self.store.lineage, self.receiver.post)
        if self.config.metrics_port:
            # After a fresh start the app may not have bound its ports yet: give it a moment, so that the
            # check below sees them and our server never takes the app's own port (its bind would fail).
            delay = 0.0 if self.restored_from else METRICS_DELAY_AFTER_FRESH_START
            timer = threading.Timer(delay, self._serve_metrics)
            timer.daemon = True
            timer.start()
            self.active_triggers.stoppers.append(timer.cancel)
        if self.config.interval > 0:
            self.next_periodic = time.monotonic() + self.config.interval
        log.info("checkpoint triggers: %s", ", ".join(self.active_triggers.names) or "none")

    def _serve_metrics(self) -> None:
        """Serve CKPT_METRICS_PORT, unless the app listens there (now, or at its last checkpoint)."""
        port, address = self.config.metrics_port, self.config.metrics_address
        app_ports = set(self.checkpointed_ports)
        if self.app_pid is not None:
            app_ports |= metrics.read_listening_ports(f"/proc/{self.app_pid}/net")
        problem = metrics.metrics_port_conflict(port, app_ports)
        if problem:
            log.warning("%s; metrics are not served", problem)
            return
        try:
            server = metrics.serve(self.metrics, port, address)
        except ConfigError as error:
            log.warning("%s", error.message)
            return
        if self.active_triggers is not None:
            self.active_triggers.stoppers.append(server.shutdown)
        shown = f"[{address}]" if ":" in address else address
        log.info("metrics at http://%s:%d/metrics", shown, port)

    def stop_triggers(self) -> None:
        if self.active_triggers is not None:
            self.active_triggers.stop()

    def supervise(self) -> None:
        """Take recorded events in order and act, until we know our exit code."""
        while self.exit_code is None:
            for event in self.receiver.wait(timeout=self._seconds_to_next_timer()):
                self._handle(event)
            self._reap()
            if self.app_status is not None and self.state in (State.RUNNING, State.STOPPING):
                self._app_exited()  # (after a final checkpoint the app's end is expected: not this)
            self._run_due_timers()

    def _seconds_to_next_timer(self) -> float | None:
        due = [t for t in (self.next_periodic, self.final_at) if t is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _run_due_timers(self) -> None:
        if self.state is not State.RUNNING:
            return
        now = time.monotonic()
        if self.final_at is not None and now >= self.final_at:
            notice, self.final_at, self.pending_final = self.pending_final, None, None
            assert notice is not None
            log.info("deadline margin reached (%s): taking the final checkpoint", self._time_left() or "no deadline")
            self._final_checkpoint(notice)
        elif self.next_periodic is not None and now >= self.next_periodic:
            self._leave_running_checkpoint(Notice(source="periodic", final=False))
            self.next_periodic = time.monotonic() + self.config.interval

    # --- a lazy restore: pages still arriving and being verified (restore.LazyRestore) -------
    def _lazy_progress(self, event: object = None, daemon_status: int | None = None) -> None:
        """Advance a lazy restore: verified, daemon done, or failed (then the app is killed: exit 7)."""
        if self.lazy is None:
            return
        try:
            if self.lazy.advance(self.store, event, daemon_status, kill_app=self._kill_app_now):
                self.lazy = None
        except LazyRestoreCorrupt:
            self.restored_claim = None  # killed by us, not ended on its own
            self.lazy = None
            raise

    def _kill_app_now(self) -> None:
        if self.app_pid is not None and self.app_status is None:
            os.kill(self.app_pid, signal.SIGKILL)

    def _wait_for_lazy_restore(self) -> None:
        """Before a new checkpoint: every page must be in and verified (CRIU would otherwise fault them in)."""
        held: list[object] = []  # other events keep their place in the queue
        try:
            self._wait_for_lazy_restore_holding(held)
        finally:
            self.receiver.put_back(held)

    def _wait_for_lazy_restore_holding(self, held: list[object]) -> None:
        while self.lazy is not None:
            lazy = self.lazy
            if not lazy.daemon_done and lazy.daemon.pid is not None:
                try:
                    _pid, status = os.waitpid(lazy.daemon.pid, 0)
                    self._lazy_progress(daemon_status=status)
                except ChildProcessError:
                    lazy.daemon_done = True
                continue
            for event in self.receiver.wait(timeout=1.0):
                if isinstance(event, LazyProblem) or event == LAZY_VERIFIED:
                    self._lazy_progress(event)
                else:
                    held.append(event)

    # --- events -------------------------------------------------------------------
    def _handle(self, event: object) -> None:
        if event == signal.SIGCHLD:
            return  # reaped right after
        if isinstance(event, LazyProblem) or event == LAZY_VERIFIED:
            self._lazy_progress(event)
        elif event == LEASE_LOST:
            self._fenced()
        elif isinstance(event, ControlRequest):
            self._on_control(event)
        elif isinstance(event, Notice):
            self._on_notice(event)
        elif event == self.config.signal and "sigterm" in self.config.triggers:
            self._on_checkpoint_signal()
        elif isinstance(event, int) and event in FORWARDED_SIGNALS:
            self._forward(signal.Signals(event))

    def _on_checkpoint_signal(self) -> None:
        if self.state is State.RUNNING:
            self._final_checkpoint(Notice(source=self.config.signal.name, final=True), after="exit")
        elif self.state is State.STOPPING:
            self._forward(signal.SIGTERM)  # asked again while the app stops on its own
        elif self.state is State.IDLE:
            log.info("%s while idle after the final checkpoint; exiting 0", self.config.signal.name)
            self._transition(State.EXITING)
            self.exit_code = 0

    def _on_notice(self, notice: Notice) -> None:
        """A trigger asked for a checkpoint: decide what to do with it (deterministic, see docs)."""
        if self.state is not State.RUNNING:
            log.info("%s request ignored: already %s", notice.source, self.state.value)
            if notice.on_failed is not None:
                notice.on_failed(f"the supervisor is {self.state.value}")
            return
        if not notice.final:
            if notice.early_warning:
                log.warning("%s early warning: %s; taking a leave-running checkpoint", notice.source, notice.detail)
            self._leave_running_checkpoint(notice)
            return
        if notice.deadline is not None and (
            self.deadline_notice is None or notice.deadline < (self.deadline_notice.deadline or float("inf"))
        ):
            self.deadline_notice = notice
        left = notice.seconds_left()
        log.warning("%s interruption notice: %s (%s)", notice.source, notice.detail or "final checkpoint requested",
                    "no deadline given" if left is None else f"{left:.0f} s left")
        if left is None or left < LONG_NOTICE_SECONDS:
            self._final_checkpoint(notice)
            return
        # A long notice: a safety net now, then the final checkpoint as late as is safe,
        # so that work done after the notice is not lost. Where the kernel tracks
        # dirty pages, the safety net doubles as CRIU's pre-dump: the final dump
        # then writes only the pages dirtied since (see checkpoint()).
        if not self._announced_dirty_tracking:
            self._announced_dirty_tracking = True
            log.info("incremental final dump: %s", self._incremental_plan())
        final_in = max(0.0, left - self.config.deadline_margin)
        if self.final_at is None or time.monotonic() + final_in < self.final_at:
            self.final_at, self.pending_final = time.monotonic() + final_in, notice
        self._leave_running_checkpoint(Notice(source=notice.source, final=False, detail="safety net"))
        if self.state is State.RUNNING and self.final_at is not None:
            log.info("final checkpoint in %.0f s (CKPT_DEADLINE_MARGIN=%g s before the deadline), or at SIGTERM",
                     max(0.0, self.final_at - time.monotonic()), self.config.deadline_margin)

    def _on_control(self, request: ControlRequest) -> None:
        if request.command == "status":
            request.answer({"ok": True, "status": self.status()})
        elif request.command == "checkpoint":
            leave_running = bool(request.arguments.get("leave_running"))
            notice = Notice(
                source="control", final=not leave_running,
                on_published=lambda name: request.answer({"ok": True, "generation": name, **self.last_checkpoint}),
                on_failed=lambda reason: request.answer({"ok": False, "error": reason}),
            )
            if leave_running:
                self._on_notice(notice)
            elif self.state is State.RUNNING:
                self._final_checkpoint(notice, after="exit")
            else:
                request.answer({"ok": False, "error": f"the supervisor is {self.state.value}"})
        else:
            request.answer({"ok": False, "error": f"unknown command {request.command!r}"})

    def _forward(self, signum: signal.Signals) -> None:
        if self.app_pid is None or self.app_status is not None:
            return  # never signal a PID we reaped: it may belong to someone else now
        try:
            os.kill(self.app_pid, signum)
            log.debug("forwarded %s to the app", signum.name)
        except ProcessLookupError:
            log.debug("app already gone; %s not forwarded", signum.name)

    def _reap(self) -> None:
        """Collect every exited child: the app's init, and orphans re-parented to us."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.app_pid:
                self.app_status = status
            elif self.lazy is not None and pid == self.lazy.daemon.pid:
                self._lazy_progress(daemon_status=status)
            else:
                log.debug("reaped orphan %d (status %d)", pid, status)

    def _fenced(self) -> None:
        """Another instance took our lineage over: two copies must never run, so stop ours."""
        if self.state is not State.RUNNING:
            return
        log.error("the lease on %s was taken over by another instance; stopping the app so that two "
                  "copies never run (is CKPT_LEASE_TIMEOUT too short for this volume?)", self.store.lineage)
        self._transition(State.STOPPING)
        self._forward(signal.SIGTERM)

    def _app_exited(self) -> None:
        assert self.app_status is not None
        code = exit_code_for(self.app_status)
        log.info("app exited with code %d", code)
        if self.restored_from is not None and self.restored_claim is not None:
            # Its own end is newer than the checkpoint it was restored from: never restore that state again.
            self.store.mark_ended(self.restored_from, self.restored_claim, code)
        self._transition(State.EXITING)
        self.exit_code = code

    # --- checkpoint -----------------------------------------------------------------
    def _final_checkpoint(self, notice: Notice, after: str | None = None) -> None:
        """Checkpoint, stop the app, release the lease; then exit 0 or idle. On failure, stop gracefully."""
        after = after or (self.config.after_notice if notice.source in CLOUD_SOURCES else "exit")
        self._transition(State.CHECKPOINTING)
        started = time.monotonic()
        try:
            generation = self.checkpoint(final=True, trigger=notice.source)
        except LazyRestoreCorrupt:
            raise  # the app was killed: nothing to stop gracefully
        except Exception as error:  # noqa: BLE001 - whatever failed, the app still gets its graceful stop
            self.metrics.checkpoint(notice.source, final=True, ok=False, seconds=time.monotonic() - started)
            self._transition(State.FAILED)
            message = _checkpoint_failure(error)
            if notice.on_failed is not None:
                notice.on_failed(message)
            log.warning("falling back to the app's own graceful stop: sending it SIGTERM%s", self._time_left(", "))
            self._transition(State.STOPPING)
            self._forward(signal.SIGTERM)
            return
        self._transition(State.CHECKPOINTED)
        parent = self.last_checkpoint.get("parent")
        log.info("final checkpoint %s published in %.2f s%s%s", generation.name, time.monotonic() - started,
                 f" (incremental: only pages dirtied since {parent}, {self.last_checkpoint['bytes'] / 1048576:.1f} "
                 "MiB written)" if parent else "", self._time_left("; "))
        self.release_lease()  # now a replacement may take the lineage and restore it
        if notice.on_published is not None:
            notice.on_published(generation.name)
        self._wait_for_app()
        self.stop_triggers()
        self.final_at = self.next_periodic = None
        if after == "idle":
            log.info("idling without the app until the machine goes away, so that no restart here can "
                     "restore it on a doomed machine (CKPT_AFTER_NOTICE=idle)")
            self._transition(State.IDLE)
            return
        log.info("exiting 0")
        self._transition(State.EXITING)
        self.exit_code = 0

    def _leave_running_checkpoint(self, notice: Notice) -> None:
        """A checkpoint the app survives; a failure is logged and the app keeps running."""
        self._transition(State.CHECKPOINTING)
        started = time.monotonic()
        try:
            generation = self.checkpoint(final=False, trigger=notice.source)
        except LazyRestoreCorrupt:
            raise
        except Exception as error:  # noqa: BLE001 - whatever failed, the app keeps running
            self.metrics.checkpoint(notice.source, final=False, ok=False, seconds=time.monotonic() - started)
            message = _checkpoint_failure(error)
            log.error("the %s checkpoint failed; the app keeps running", notice.source)
            self._transition(State.RUNNING)
            if notice.on_failed is not None:
                notice.on_failed(message)
            return
        self._transition(State.RUNNING)
        log.info("%s checkpoint %s published in %.2f s; the app kept running%s", notice.source, generation.name,
                 time.monotonic() - started, self._time_left("; "))
        if notice.on_published is not None:
            notice.on_published(generation.name)

    def _time_left(self, prefix: str = "") -> str:
        """'N s left before the deadline' for the log, when a notice gave one."""
        notice = self.deadline_notice
        left = notice.seconds_left() if notice is not None else None
        return "" if left is None else f"{prefix}{left:.0f} s left before the {notice.source} deadline"  # type: ignore[union-attr]

    def status(self) -> dict[str, Any]:
        """What `criu-supervisor status` shows."""
        lease = self.lease.read() if self.lease is not None else None
        return {
            "state": self.state.value,
            "app_pid": self.app_pid,
            "app_pids": launcher.namespace_members(self.app_pid) if self.app_pid and self.app_status is None else [],
            "lineage": self.store.lineage,
            "lease": {k: v for k, v in (lease or {}).items() if k != "owner"}
            | {"held": bool(self.lease and self.lease.held)},
            "triggers": list(self.active_triggers.names) if self.active_triggers else [],
            "next_periodic_in": None if self.next_periodic is None else round(self.next_periodic - time.monotonic(), 1),
            "final_checkpoint_in": None if self.final_at is None else round(self.final_at - time.monotonic(), 1),
            "last_checkpoint": self.last_checkpoint or None,
            "last_restore": self.last_restore or None,
        }

    def checkpoint(self, final: bool, trigger: str = "manual") -> Generation:
        """Dump the app into a generation and publish it (checkpoint.py); a final one kills the app after.

        On any failure the tree is resumed, so the caller can still stop it gracefully.
        """
        assert self.app_pid is not None
        requested = time.monotonic()
        self._wait_for_lazy_restore()
        if self.lease is None:
            raise StoreError(f"checkpoint impossible: {self.volume_problem}")
        app = AppFacts(self.app_pid, self.command, self.restored_from, self.carried_paths, self.app_baseline,
                       _STARTED_AT)
        generation, self.last_checkpoint = self.checkpoints.run(app, self.lease, final, trigger, requested)
        if final:
            os.kill(self.app_pid, signal.SIGKILL)  # the namespace's init: the kernel kills the rest
        return generation

    def _incremental_plan(self) -> str:
        return self.checkpoints.incremental_plan()

    def _tracks_dirty_pages(self) -> bool:
        return self.checkpoints.tracks_dirty_pages()

    def _wait_for_app(self) -> None:
        """After a final dump CRIU has killed the tree; collect its init."""
        while self.app_status is None:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return
            if pid == self.app_pid:
                self.app_status = status

    # --- the state machine --------------------------------------------------------
    def _transition(self, new: State) -> None:
        assert new in _TRANSITIONS[self.state], f"illegal transition {self.state.value} -> {new.value}"
        log.debug("state %s -> %s", self.state.value, new.value)
        self.state = new
        self.metrics.state = new.value


def _checkpoint_failure(error: Exception) -> str:
    """Log why a checkpoint failed: our one-line message, or a traceback for anything unforeseen."""
    if isinstance(error, SupervisorError):
        log.error("%s", error.message)
        return error.message
    log.exception("checkpoint failed unexpectedly (a bug: please report it with this traceback)")
    return f"checkpoint failed unexpectedly: {error!r}"


def _app_section(manifest: dict[str, Any]) -> dict[str, Any]:
    app = manifest.get("app")
    return app if isinstance(app, dict) else {}


def _ports(recorded: Any) -> set[int]:
    """Ports read back from a manifest (untrusted): only whole numbers 1-65535."""
    if not isinstance(recorded, list):
        return set()
    return {port for port in recorded if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536}


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
