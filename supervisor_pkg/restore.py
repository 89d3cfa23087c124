"""The restore flow: from the lease to a restored app, or the reason to start fresh.

For each published generation, newest first:

    1. skip it if it was rejected (its own fault, recorded earlier);
    2. verify it (store.verify: sizes, hashes, signature, lineage; a format,
       CRIU or architecture this container cannot read is case 2 below);
    3. the app check: a generation made of another app (another command,
       CKPT_APP_VERSION or build of its files) is not restored into this one;
    4. its history: a generation whose app already ended on its own is
       superseded; one whose app ran and whose instance died is a rollback
       (CKPT_ROLLBACK); one claimed by an instance that died before its app
       ran is restored as if never claimed;
    5. the container check (compat.py): capabilities, seccomp, terminal;
    6. claim it for our lease, put back its carried files, and restore it
       through CRIU, page images hashed while CRIU works; at "pre-resume" the
       tree exists but has not run: wait for the hashes, check the lease,
       record that the app resumes, and let it run.

A failed restore ends in one of three outcomes, decided by evidence:
    1. the checkpoint is at fault (integrity, images CRIU cannot use): it is
       rejected and the previous generation is tried;
    2. this container is at fault (capabilities, seccomp, CPU, CRIU version,
       a restore that hung): the generation is kept, never condemned, and the
       supervisor exits 6 (CKPT_CANNOT_RESTORE=exit) or starts fresh (=fresh);
    3. the app changed: start fresh, and note why on the generation.
A stop asked for during a restore aborts it at once; the generation is kept.

A lazy restore (CKPT_LAZY=on) returns before the app's pages are all in:
`LazyRestore` follows CRIU's lazy-pages daemon and the background check of the
page images, until every page is in and verified, or kills the app (exit 7).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import tarfile
import threading
import time
from collections.abc import Callable
from typing import Any

from supervisor_pkg import carried, compat, compression, criu, fingerprint
from supervisor_pkg.config import Config
from supervisor_pkg.errors import (
    CHECKPOINT_AT_FAULT,
    CannotRestoreHere,
    LazyRestoreCorrupt,
    RestoreFailed,
    RestoreInterrupted,
    StoppedDuringRestore,
    StoreError,
    VerificationFailed,
)
from supervisor_pkg.lease import Lease
from supervisor_pkg.metrics import Metrics
from supervisor_pkg.signals import SignalReceiver
from supervisor_pkg.store import (
    APP_CHANGED,
    BESIDE_CRIU,
    INCOMPATIBLE,
    Claim,
    Generation,
    Store,
)

log = logging.getLogger("criu-supervisor")

# Restore lazily (CKPT_LAZY=auto) above this many bytes of page images. Measured
# here (docs/benchmarks.md): a full restore's first answer grows ~0.6 s per GiB
# plus the hashing; a lazy one stays ~0.1-0.2 s.
LAZY_THRESHOLD_BYTES = 256 << 20
LAZY_WORK_ROOT = "/run/criu-supervisor"
_STDIO_KEYS = ("pipe:[", "socket:[", "tty[")


@dataclasses.dataclass
class Restored:
    """An app restored and running (lazily: its pages still arriving and being verified)."""

    generation: Generation
    manifest: dict[str, Any]
    pid: int
    claim: Claim
    carried_paths: list[str]
    started: float  # monotonic
    seconds: float
    daemon: criu.LazyPagesDaemon | None = None


class _PageCheck(threading.Thread):
    """Hashes a generation's page images while CRIU restores from them; the tree waits for the verdict."""

    def __init__(self, store: Store, generation: Generation, manifest: dict[str, Any]) -> None:
        super().__init__(name="page-check", daemon=True)
        self.store, self.generation, self.manifest = store, generation, manifest
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            self.store.verify_pages(self.generation, self.manifest, workers=BESIDE_CRIU)
        except BaseException as error:  # noqa: BLE001 - handed to the waiting restore
            self.failure = error

    def verdict(self, should_stop: Callable[[], bool], progressed: Callable[[], None]) -> None:
        """Wait for the hashes; raise what they found (VerificationFailed), or RestoreInterrupted on a stop."""
        while self.is_alive():
            self.join(0.05)
            progressed()  # hashing is progress of the restore (the heartbeat goes on meanwhile)
            if should_stop():
                raise RestoreInterrupted("restore interrupted while its pages were checked: the container was "
                                         "asked to stop")
        if isinstance(self.failure, VerificationFailed):
            raise self.failure
        if self.failure is not None:
            raise VerificationFailed(f"{self.generation.name}: the page check failed: {self.failure!r}")


class RestoreFlow:
    """Chooses, checks and restores a generation for a supervisor that holds the lineage's lease."""

    def __init__(
        self, config: Config, command: list[str], store: Store, lease: Lease, receiver: SignalReceiver,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.command = command
        self.store = store
        self.lease = lease
        self.receiver = receiver
        self.metrics = metrics
        self._stop_signals = {int(config.signal), int(signal.SIGTERM), int(signal.SIGINT)}
        self.restoring = False
        self.last_progress = time.monotonic()  # of CRIU's, or of our page check: see stuck()

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def stuck(self) -> str | None:
        """Why the heartbeat must not renew the lease: a restore without progress for half a lease timeout."""
        quiet = time.monotonic() - self.last_progress
        if self.restoring and quiet > self.lease.timeout / 2:
            return (f"the restore has made no progress for {quiet:.0f} s; it is killed after CKPT_RESTORE_STALL="
                    f"{self.config.restore_stall:g} s")
        return None

    # --- choosing ------------------------------------------------------------------
    def run(self) -> Restored | str:
        """The restored app, or the reason the app starts fresh. Raises CannotRestoreHere, StoppedDuringRestore."""
        generations = self.store.generations()
        if not generations:
            return f"no checkpoint in {self.store.lineage}"
        preloading = criu.preload()
        try:
            local_criu = criu.version()
            reason = "no restorable checkpoint"
            for generation in generations:
                outcome = self._consider(generation, local_criu)
                if isinstance(outcome, Restored):
                    return outcome
                if outcome.final:
                    return outcome.reason
                reason = outcome.reason
            return reason
        finally:
            preloading.join()  # no import half-done in a thread when the caller forks

    def _consider(self, generation: Generation, local_criu: str) -> Restored | _Skip:
        if generation.rejected:
            log.info("skipping %s: rejected earlier", generation.name)
            return _Skip(f"{generation.name} was rejected earlier")
        lazy = self._restore_lazily(generation)
        verifying = time.monotonic()
        try:
            # Pages are hashed while CRIU restores (full) or after the app runs (lazy): sizes only here.
            manifest = self.store.verify(generation, local_criu, defer_pages=True)
        except VerificationFailed as error:
            if error.here_only:
                return self._cannot_restore(generation, error.message)
            log.warning("refusing %s: %s", generation.name, error.message)
            self.store.reject(generation, error.message, culprit=error.generation)
            return _Skip(f"{generation.name} was refused")
        log.debug("verified %s's metadata in %.3f s", generation.name, time.monotonic() - verifying)

        app = _app_section(manifest)
        source: dict[str, Any] = manifest["source"] if isinstance(manifest.get("source"), dict) else {}
        changes = fingerprint.differences(app.get("files") or {}, self.command, app.get("command"),
                                          self.config.app_version, app.get("version"),
                                          os.environ.get("CKPT_IMAGE_ID"), source.get("image_id"))
        if changes:
            reason = f"the app changed since {generation.name} was made: {'; '.join(changes)}"
            log.warning("not restoring %s into another app: %s; starting fresh (the checkpoint is kept for its own "
                        "app)", generation.name, "; ".join(changes))
            self.store.note(generation, APP_CHANGED, reason)
            return _Skip(reason, final=True)

        superseded = self._history(generation)
        if superseded is not None:
            return _Skip(superseded, final=True)

        problems = compat.problems(generation.path, manifest)
        if problems:
            return self._cannot_restore(generation, "; ".join(map(str, problems)))

        try:
            claim = self.store.claim(generation, self.lease.token)
        except StoreError as error:
            return self._cannot_restore(generation, error.message)
        return self._restore_or_judge(generation, manifest, claim, lazy)

    def _history(self, generation: Generation) -> str | None:
        """Why an earlier restore of `generation` means it must not be restored again, or None."""
        try:
            earlier = self.store.read_claim(generation)
        except ValueError as error:
            log.warning("%s's claim is unreadable (%s); taking it that its app may have run", generation.name, error)
            earlier = Claim(lease=None, host=None, container_id=None, time=0.0, resumed=0.0)
        if earlier is None:
            return None
        if earlier.ended is not None:
            return (f"{generation.name}, the newest state, was restored by {earlier.describe()} and its app "
                    f"then exited on its own (code {earlier.exit_code}): that state is superseded")
        if earlier.resumed is None:
            log.info("restoring %s again: %s claimed it at %s but stopped before its app ran", generation.name,
                     earlier.describe(), _when(earlier.time))
            return None
        if self.config.rollback == "refuse":
            return (f"{generation.name} was restored by {earlier.describe()}, whose instance died without a newer "
                    "checkpoint; CKPT_ROLLBACK=refuse: not running the same state twice")
        beat = self.lease.taken_from.get("time") if self.lease.taken_from else None
        lost = (f" and last beat its lease at {_when(beat)}" if isinstance(beat, (int, float)) else "")
        log.warning("rolling back to %s: its app was resumed by %s at %s, and that instance died without a newer "
                    "checkpoint%s; what the app did since is lost (CKPT_ROLLBACK=refuse starts fresh instead)",
                    generation.name, earlier.describe(), _when(earlier.resumed), lost)
        return None

    def _cannot_restore(self, generation: Generation, cause: str) -> _Skip:
        """Case 2: keep the generation; exit 6 naming the cause, or start fresh (CKPT_CANNOT_RESTORE)."""
        self.store.note(generation, INCOMPATIBLE, cause)
        if self.config.cannot_restore == "exit":
            raise CannotRestoreHere(
                f"this container cannot restore {generation.name}: {cause}. The checkpoint is kept for a replacement "
                "that can (CKPT_CANNOT_RESTORE=fresh would start the app fresh instead)", generation.name)
        log.error("this container cannot restore %s: %s", generation.name, cause)
        log.warning("starting the app fresh (CKPT_CANNOT_RESTORE=fresh); %s is left on the volume, not condemned, "
                    "until newer checkpoints replace it", generation.name)
        return _Skip(f"this container cannot restore {generation.name}", final=True)

    def _restore_lazily(self, generation: Generation) -> bool:
        """CKPT_LAZY: off, on, or auto (big enough, and no signing key demanding verification first)."""
        if self.config.lazy in ("off", "on"):
            return self.config.lazy == "on"
        if self.store.signing_key is not None:
            return False
        try:
            return self.store.memory_bytes(generation, generation.read_json("manifest.json")) >= LAZY_THRESHOLD_BYTES
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return False  # verify() says what is wrong

    # --- restoring ---------------------------------------------------------------------
    def _restore_or_judge(
        self, generation: Generation, manifest: dict[str, Any], claim: Claim, lazy: bool
    ) -> Restored | _Skip:
        """Restore; sort a failure into the checkpoint's fault (reject, try the next) or this container's."""
        try:
            restored = self._restore(generation, manifest, claim, lazy)
        except RestoreInterrupted as error:
            self.metrics.restore(ok=False)
            raise StoppedDuringRestore(f"asked to stop during the restore of {generation.name}: aborted it; the "
                                       "checkpoint is kept for the next container") from error
        except VerificationFailed as error:  # its pages, hashed while CRIU restored: the app never ran
            self.metrics.restore(ok=False)
            log.warning("refusing %s: %s; the restored tree was killed before it ran", generation.name, error.message)
            self.store.reject(generation, error.message, culprit=error.generation)
            return _Skip(f"{generation.name} was refused")
        except RestoreFailed as error:
            self.metrics.restore(ok=False)
            if error.fault == CHECKPOINT_AT_FAULT:
                log.error("%s", error.message)
                self.store.reject(generation, error.message)
                return _Skip(f"restoring {generation.name} failed")
            return self._cannot_restore(generation, error.message)
        self.metrics.restore(ok=True, seconds=restored.seconds)
        return restored

    def _restore(self, generation: Generation, manifest: dict[str, Any], claim: Claim, lazy: bool) -> Restored:
        started = time.monotonic()
        carried_paths, created = self._put_back_carried_files(generation, manifest)
        try:
            return self._restore_carried(generation, manifest, claim, lazy, started, carried_paths)
        except BaseException:
            # A failed restore leaves nothing behind that the fallback (an older generation, a fresh
            # start here) would trip over: the carried files this restore created go again.
            for path in created:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise

    def _restore_carried(
        self, generation: Generation, manifest: dict[str, Any], claim: Claim, lazy: bool, started: float,
        carried_paths: list[str],
    ) -> Restored:
        app = _app_section(manifest)
        images_dir = generation.path
        if "compression" in manifest:
            images_dir = f"{compression.LOCAL_ROOT}/restore-{generation.name}"
            try:
                compression.expand(generation.path, manifest, images_dir)
            except Exception as error:  # OSError, or the codec's own errors on a stream that matched its hash
                raise RestoreFailed(f"restore failed: cannot expand the compressed images: {error}") from error
            log.info("expanded %s's compressed page images in %.2f s", generation.name, time.monotonic() - started)
        daemon = self._start_lazy_pages(generation, images_dir) if lazy else None
        page_check = None
        if daemon is None:
            page_check = _PageCheck(self.store, generation, manifest)
            page_check.start()
        resumed: list[Claim] = []

        def before_resume(root_pid: int | None) -> None:
            """The tree exists and has not run: it runs only on verified pages, under our lease, on the record."""
            if page_check is not None:
                page_check.verdict(self._stop_requested, self.progressed)
            self.lease.check()
            try:
                resumed.append(self.store.mark_resumed(generation, claim))
            except StoreError as error:
                if self.config.rollback == "refuse":
                    raise RestoreFailed(f"restore failed: {error.message}: with CKPT_ROLLBACK=refuse the app may "
                                        "not run unrecorded") from error
                log.warning("%s; the app runs anyway (a later instance may restore this checkpoint again)",
                            error.message)

        log_name = f"restore-{generation.name}-{_stamp()}.log"
        log.debug("calling CRIU to restore %s, %.3f s after the restore began", generation.name,
                  time.monotonic() - started)
        self.restoring, self.last_progress = True, time.monotonic()
        try:
            pid = criu.restore(
                images_dir, daemon.work_dir if daemon else self.store.logs, log_name,
                inherit=inherit_map(app.get("stdio") or {}), tcp=self.config.tcp,
                log_level=int(self.config.criu_log_level), lazy=daemon is not None,
                mount_namespace=bool(app.get("own_mount_namespace")),
                stall_timeout=self.config.restore_stall, should_stop=self._stop_requested,
                before_resume=before_resume, on_progress=self.progressed,
            )
        except BaseException:
            if daemon is not None:
                daemon.kill()
            raise
        finally:
            self.restoring = False
            if images_dir != generation.path and daemon is None:
                shutil.rmtree(images_dir, ignore_errors=True)  # restored: CRIU needs the images no more
        seconds = time.monotonic() - started
        log.info("restored %s (made %s on %s) in %.2f s%s; app root pid %d", generation.name, manifest.get("created"),
                 (manifest.get("source") or {}).get("host"), seconds,
                 ", lazily: its pages arrive and are verified in the background" if daemon else "", pid)
        return Restored(generation, manifest, pid, resumed[0] if resumed else claim, carried_paths, started,
                        seconds, daemon)

    def _put_back_carried_files(self, generation: Generation, manifest: dict[str, Any]) -> tuple[list[str], list[str]]:
        """(the carried files put back, those of them that did not exist here before)."""
        if carried.ARCHIVE not in (manifest.get("files") or {}):
            return [], []
        archive = f"{generation.path}/{carried.ARCHIVE}"
        try:
            created = [path for path in carried.members(archive) if not os.path.lexists(path)]
            paths = carried.extract(archive, exclude=[self.config.dir],
                                    max_bytes=int(manifest["files"][carried.ARCHIVE]["size"]))
        except (ValueError, tarfile.TarError) as error:  # what the archive holds: its fault
            raise RestoreFailed(f"restore failed: cannot put back the carried files: {error}",
                                fault=CHECKPOINT_AT_FAULT) from error
        except OSError as error:  # this container's filesystem said no
            raise RestoreFailed(f"restore failed: cannot put back the carried files: {error}") from error
        log.info("put back %d carried file(s) from the container's writable layer", len(paths))
        return paths, created

    def _start_lazy_pages(self, generation: Generation, images_dir: str) -> criu.LazyPagesDaemon | None:
        """Start CRIU's lazy-pages daemon; None (restore fully, pages checked first) if it cannot run here."""
        daemon = criu.LazyPagesDaemon(images_dir, f"{LAZY_WORK_ROOT}/lazy-{generation.name}", "lazy-pages.log",
                                      log_level=int(self.config.criu_log_level))
        try:
            daemon.start()
        except RestoreFailed as error:
            log.warning("lazy restore unavailable (%s); restoring fully", error.message)
            return None
        return daemon

    def _stop_requested(self) -> bool:
        """A stop signal is waiting in the queue (other events keep their place, for after the restore)."""
        events = self.receiver.wait(timeout=0)
        stop = any(event in self._stop_signals for event in events)
        self.receiver.put_back([event for event in events if event not in self._stop_signals])
        return stop


LAZY_VERIFIED = "lazy-pages-verified"  # posted to the supervisor's queue by the background check


@dataclasses.dataclass(frozen=True)
class LazyProblem:
    """Posted by the background check: why the lazily restored app must die, and which generation is bad."""

    reason: str
    culprit: str | None = None  # an incremental checkpoint's parent, when the bad pages are there
    pages_bad: bool = True  # False: the pages could not be checked (not evidence against the checkpoint)


@dataclasses.dataclass
class LazyRestore:
    """A restore whose pages are still arriving, and whose page images are still being verified."""

    generation: Generation
    manifest: dict[str, Any]
    daemon: criu.LazyPagesDaemon
    started: float
    daemon_done: bool = False
    verified: bool = False

    def verify_in_background(self, store: Store, post: Callable[[object], None]) -> None:
        """Hash the page images the daemon serves, on one core; post LAZY_VERIFIED or a LazyProblem."""

        def check() -> None:
            try:
                store.verify_pages(self.generation, self.manifest)
            except VerificationFailed as error:
                post(LazyProblem(error.message, error.generation))
                return
            except Exception as error:  # noqa: BLE001 - unverified pages must never be taken for verified ones
                post(LazyProblem(f"the page check itself failed: {error!r}", pages_bad=False))
                return
            post(LAZY_VERIFIED)

        threading.Thread(target=check, name="page-verifier", daemon=True).start()

    def advance(
        self, store: Store, event: object, daemon_status: int | None, kill_app: Callable[[], None]
    ) -> bool:
        """Take the check's verdict or the daemon's end; True once every page is in and verified."""
        if isinstance(event, LazyProblem):
            self._failed(store, event.reason, event.culprit, event.pages_bad, kill_app)
        if event == LAZY_VERIFIED:
            self.verified = True
        if daemon_status is not None:
            if os.waitstatus_to_exitcode(daemon_status) != 0:
                self._failed(store, f"CRIU's lazy-pages daemon failed ({criu.explain(self.daemon.log_path)}); "
                                    f"log: {self.daemon.log_path}", None, False, kill_app)
            self.daemon_done = True
        if not (self.daemon_done and self.verified):
            return False
        if self.daemon.images_dir != self.generation.path:
            shutil.rmtree(self.daemon.images_dir, ignore_errors=True)
        resident = store.memory_bytes(self.generation, self.manifest)
        log.info("app fully resident: %.0f MiB of pages arrived and verified %.2f s after the restore began",
                 resident / 1048576, time.monotonic() - self.started)
        return True

    def _failed(
        self, store: Store, reason: str, culprit: str | None, pages_bad: bool, kill_app: Callable[[], None]
    ) -> None:
        """Kill the app, whose pages proved bad or could not all arrive, and raise LazyRestoreCorrupt (exit 7).

        It has run on pages that were not verified yet (the window CKPT_LAZY=on
        accepts): whatever it did since the restore is lost. Bad pages condemn
        the generation; a daemon that failed does not (its claim says the app
        ran: the next instance may roll back to it, see CKPT_ROLLBACK).
        """
        ran = time.monotonic() - self.started
        kill_app()
        self.daemon.kill()
        if pages_bad:
            store.reject(self.generation, f"lazy restore failed: {reason}", culprit=culprit)
        raise LazyRestoreCorrupt(
            f"killed the lazily restored app of {self.generation.name} after it ran {ran:.1f} s on pages not yet "
            f"verified: {reason}. What it did and acknowledged since the restore is lost (CKPT_LAZY=on accepts this "
            "window; CKPT_LAZY=off verifies every byte before the app runs). "
            + ("The generation is rejected; the next start falls back to the previous one or a cold start"
               if pages_bad else "The generation is kept for the next start"))


@dataclasses.dataclass(frozen=True)
class _Skip:
    """A generation not restored: why, and whether older ones may still be tried (final: they may not)."""

    reason: str
    final: bool = False


def inherit_map(stdio: Any) -> dict[str, int]:
    """Dumped stdio pipes -> this container's fds, so `docker logs` keeps showing the app."""
    inherit: dict[str, int] = {}
    for fd_text, target in (stdio.items() if isinstance(stdio, dict) else []):
        if not (isinstance(fd_text, str) and fd_text in ("0", "1", "2") and isinstance(target, str)):
            continue
        if not target.startswith(_STDIO_KEYS) or target in inherit:
            continue
        with contextlib.suppress(OSError):
            os.fstat(int(fd_text))
            inherit[target] = int(fd_text)
    return inherit


def _app_section(manifest: dict[str, Any]) -> dict[str, Any]:
    app = manifest.get("app")
    return app if isinstance(app, dict) else {}


def _when(timestamp: Any) -> str:
    if not isinstance(timestamp, (int, float)) or timestamp <= 0:
        return "an unknown time"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
