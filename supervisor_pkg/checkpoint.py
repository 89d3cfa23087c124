"""The checkpoint flow: from the decision to checkpoint to a published generation.

    1. check the lease (fencing: never publish over a new holder's lineage);
    2. note what the manifest binds the checkpoint to: the app's stdio, its
       command and the fingerprints of its files, its CPU and baseline;
    3. open a staging generation on the volume; CRIU dumps the app's tree into
       it and leaves the tree STOPPED; page images are hashed (or, with
       CKPT_COMPRESS, compressed) while CRIU writes them;
    4. carry the container's writable layer: walk it while the app is frozen,
       and pack what changed since the container started (walked once more
       just before the dump, while the app still runs, to warm the caches);
    5. a leave-running checkpoint resumes the app here; the store hashes and
       fsyncs the rest, writes the manifest, checks the lease again and renames
       the generation into place (publication is atomic);
    6. retention prunes older generations.

The caller (supervisor.py) decides when, kills the tree after a final one,
and stops the app gracefully if anything here fails: every failure resumes the
tree first. Incremental dumps (soft-dirty kernels) keep their state here: the
last leave-running dump of this run is the parent of the next final one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any

from supervisor_pkg import carried, compression, cpu, criu, fingerprint, launcher, metrics
from supervisor_pkg.config import Config
from supervisor_pkg.errors import DumpFailed, StoreError
from supervisor_pkg.lease import Lease
from supervisor_pkg.store import Generation, PageHasher, Store

log = logging.getLogger("criu-supervisor")

_STDIO_FDS = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class AppFacts:
    """What a checkpoint needs to know of the running app."""

    pid: int  # its namespace init (tini)
    command: list[str]
    restored_from: Generation | None
    carried_paths: list[str]  # carried by the generation it was restored from
    baseline: str  # the CKPT_CPU_BASELINE it was started with
    container_started: float  # files changed after this are the app's state (carried.select)


class CheckpointFlow:
    def __init__(self, config: Config, store: Store, metrics_: metrics.Metrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics_
        # The last leave-running checkpoint of this run, dumped with soft-dirty tracking:
        # a final dump may then write only the pages dirtied since (see _incremental_parent).
        self.incremental_base: Generation | None = None
        self.dirty_tracking_failed = False  # a dump with track_mem or a parent failed: no more tries this run
        self.layer: carried.LayerRecorder | None = None  # the container's filesystem at the app's start

    def record_layer(self, restored_from: Generation | None) -> None:
        """Record the container's filesystem as it is now, in the background: the app has just started.

        What changes after this is the writable layer each checkpoint carries; a restored app's
        generation adds what it carried and deleted. Only the container's init records (PID 1, or
        the child of an --init): elsewhere "/" is not a container's filesystem (tests run on a
        host), and checkpoints carry the app's open files and CKPT_STATE_PATHS as before.
        """
        if os.getpid() != 1 and os.getppid() != 1:
            log.debug("not the container's init: its filesystem is not recorded, only open files are carried")
            return
        previous = None
        if restored_from is not None and restored_from.has(carried.ARCHIVE):
            previous = f"{restored_from.path}/{carried.ARCHIVE}"
        self.layer = carried.LayerRecorder(exclude=self._never_carried(), previous=previous).start()

    def _never_carried(self) -> list[str]:
        """What is never carried beside the kernel's, the engine's and the supervisor's own (see carried.py)."""
        return [self.config.dir, self.config.control_socket, *self.config.carry_exclude]

    def run(
        self, app: AppFacts, lease: Lease, final: bool, trigger: str, requested: float
    ) -> tuple[Generation, dict[str, Any]]:
        """Steps 1-6 (see the module docstring): the published generation and what `status` shows of it.

        The tree is left stopped after a final checkpoint (the caller kills it), running after a
        leave-running one, and running after any failure.
        """
        lease.check()
        stdio = _stdio_of(app.pid)
        app_files = fingerprint.record(launcher.namespace_members(app.pid), app.command, [self.config.dir],
                                       app.container_started)  # while the app runs; warmed in the background
        if self.layer is not None:
            self.layer.prepare(app.container_started)  # while the app runs: the walk while it is frozen is then short
        parent = self._incremental_parent(final)
        track_mem = parent is not None or (not final and self.tracks_dirty_pages())
        try:
            generation, result = self._dump_and_publish(app, lease, final, stdio, app_files, parent, track_mem)
        except DumpFailed as error:
            if not track_mem:
                raise
            # CRIU refused memory tracking or the parent (a path this machine's kernel cannot run; see
            # docs/performance.md): a full dump is still possible, and the app was resumed by CRIU.
            self.dirty_tracking_failed = True
            log.warning("%s; dumping again in full, and without memory tracking for the rest of this run",
                        error.message)
            parent, track_mem = None, False
            generation, result = self._dump_and_publish(app, lease, final, stdio, app_files, None, False)
        if not final and track_mem:
            self.incremental_base = generation
        manifest = generation.read_json("manifest.json")
        summary = {
            "generation": generation.name, "trigger": trigger, "final": final, "time": manifest["created"],
            "parent": parent.name if parent else None,
            "seconds": round(time.monotonic() - requested, 3), "criu_seconds": round(result.seconds, 3),
            "bytes": sum(entry["size"] for entry in manifest["files"].values()),
        }
        self.metrics.checkpoint(trigger, final, ok=True, seconds=summary["seconds"], size=summary["bytes"],
                                when=float(manifest["created_unix"]))
        removed = self.store.prune(protect={generation.number})
        if removed:
            log.debug("pruned %s", ", ".join(removed))
        return generation, summary

    def _dump_and_publish(
        self, app: AppFacts, lease: Lease, final: bool, stdio: dict[str, str], app_files: dict[str, Any],
        parent: Generation | None, track_mem: bool,
    ) -> tuple[Generation, criu.DumpResult]:
        """One CRIU dump into a staging generation, published; the app is left stopped only after a final one."""
        log_name = f"dump-{_stamp()}.log"
        stopped = False
        scratch: str | None = None
        try:
            with self.store.staging() as staging:
                # Page images are followed while CRIU writes them: hashed in place, or
                # (CKPT_COMPRESS) read from local scratch and streamed compressed to the volume.
                follower: PageHasher | compression.PageCompressor
                if self.config.compress == "none":
                    images_dir = staging.path
                    follower = PageHasher(images_dir)
                else:
                    compression.check_available(self.config.compress)
                    os.makedirs(compression.LOCAL_ROOT, mode=0o700, exist_ok=True)
                    images_dir = scratch = tempfile.mkdtemp(prefix="dump-", dir=compression.LOCAL_ROOT)
                    follower = compression.PageCompressor(self.config.compress, images_dir, staging.path)
                with _DumpProgress(staging.path), follower:
                    result = criu.dump(app.pid, images_dir, self.store.logs, log_name,
                                       tcp=self.config.tcp, log_level=int(self.config.criu_log_level),
                                       external=_terminals(stdio), mount_namespace=self.config.own_proc,
                                       track_mem=track_mem, parent=f"../{parent.name}" if parent else None)
                    stopped = True
                    self._keep_socket_names(images_dir)
                    extra: dict[str, Any] = {}
                    if isinstance(follower, compression.PageCompressor):
                        hashed, pages = follower.finish()
                        extra["compression"] = {"algorithm": self.config.compress, "pages": pages}
                    else:
                        hashed = follower.finish()
                carried_count = self._carry_files(app, images_dir, staging.path)
                if not final:
                    launcher.resume(app.pid)
                    stopped = False
                generation = self.store.publish(
                    staging,
                    {
                        "criu_version": criu.version(),
                        "stats": {"dump_seconds": round(result.seconds, 4), "final": final,
                                  "carried_files": carried_count},
                        "app": {"stdio": stdio, "own_mount_namespace": self.config.own_proc,
                                "command": app.command, "version": self.config.app_version,
                                "files": app_files,
                                "listening_ports": sorted(metrics.read_listening_ports(f"/proc/{app.pid}/net"))},
                        "restored_from": app.restored_from.name if app.restored_from else None,
                        "cpu": cpu.record(baseline=app.baseline),
                        **extra,
                    },
                    before_rename=lease.check,
                    hashed=hashed,
                    parent=parent,
                )
        except BaseException:
            if stopped:
                launcher.resume(app.pid)
            raise
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        return generation, result

    @staticmethod
    def _keep_socket_names(images_dir: str) -> None:
        """Listening Unix sockets bound under a since-replaced name keep the name clients use."""
        try:
            renamed = criu.rename_relinked_unix_sockets(images_dir)
        except Exception as error:  # noqa: BLE001 - a nameless socket beats a failed checkpoint
            log.warning("could not check the app's Unix socket names (%s); a socket bound under a temporary "
                        "name may be restored without a name", error)
            return
        for old, new in renamed:
            log.info("unix socket bound as %s is reachable as %s: recorded under that name", old, new)

    def _carry_files(self, app: AppFacts, images_dir: str, destination: str) -> int:
        """Pack the writable layer into the generation (see carried.py); the number of regular files carried.

        Runs while the app is frozen, after CRIU's dump: what is carried is what its memory knows.
        """
        opened = [carried.OpenFile(path, writable) for path, writable in criu.opened_files(images_dir)]
        started = time.monotonic()
        paths = carried.select(opened, self.config.state_paths, app.carried_paths,
                               exclude=self._never_carried(), since=app.container_started)
        deleted: list[str] = []
        changes = self.layer.changes(app.container_started) if self.layer is not None else None
        if changes is not None:
            paths = sorted({*paths, *changes.paths})
            deleted = changes.deleted
        if not (paths or deleted or self.config.state_paths):
            return 0
        try:
            files = carried.archive(paths, self.config.state_paths, f"{destination}/{carried.ARCHIVE}",
                                    deleted=deleted)
            size = os.stat(f"{destination}/{carried.ARCHIVE}").st_size
        except OSError as error:
            raise StoreError(f"cannot carry the app's files: {error}") from error
        walk = f", walked {changes.walked} entries in {changes.seconds:.3f} s" if changes is not None else ""
        log.info("carrying %d file(s) from the container's writable layer (%d entries, %d deletions, %.1f MiB; "
                 "%.3f s while frozen%s)", files, len(paths), len(deleted), size / 1048576,
                 time.monotonic() - started, walk)
        return files

    def incremental_plan(self) -> str:
        """What the final dump after a safety net will be, and why, for the log."""
        if not criu.has_feature("mem_dirty_track"):
            return "not possible (the kernel has no soft-dirty tracking); the final dump is a full one"
        if self.config.compress != "none":
            return (f"not used with CKPT_COMPRESS={self.config.compress} (a chain needs the parent's pages "
                    "uncompressed); the final dump is a full one")
        return ("on: the safety net is dumped with soft-dirty tracking, and the final dump writes only the pages "
                "dirtied since")

    def tracks_dirty_pages(self) -> bool:
        """Whether a leave-running dump should track memory, to be the parent of an incremental final dump."""
        return (self.config.compress == "none" and not self.dirty_tracking_failed
                and criu.has_feature("mem_dirty_track"))

    def _incremental_parent(self, final: bool) -> Generation | None:
        """The generation a final dump writes only dirtied pages against, or None for a full dump.

        Only the last leave-running dump of this run qualifies: each dump with
        tracking resets the kernel's soft-dirty bits, so the bits describe the
        changes since that dump and no other. Any dump, even a failed one, uses
        the base up (CRIU may have reset the bits before failing).
        """
        base, self.incremental_base = self.incremental_base, None
        if not final or base is None or base.rejected or not os.path.isfile(base.manifest_path):
            return None
        return base


def _stdio_of(pid: int) -> dict[str, str]:
    stdio = {}
    for fd in _STDIO_FDS:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("/dev/pts/"):
                # The runtime's terminal (docker run -t) lives outside the tree: CRIU
                # names it by device numbers, and inherit-fd gives it the new one.
                info = os.stat(f"/proc/{pid}/fd/{fd}")
                target = f"tty[{info.st_rdev:x}:{info.st_dev:x}]"
            stdio[str(fd)] = target
        except OSError:
            continue
    return stdio


class _DumpProgress(threading.Thread):
    """Logs bytes written and the rate every few seconds while a long dump runs."""

    def __init__(self, directory: str, every: float = 3.0) -> None:
        super().__init__(name="dump-progress", daemon=True)
        self.directory = directory
        self.every = every
        self._done = threading.Event()

    def __enter__(self) -> _DumpProgress:
        self.started = time.monotonic()
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()

    def run(self) -> None:
        while not self._done.wait(self.every):
            written = 0
            try:
                with os.scandir(self.directory) as entries:
                    written = sum(entry.stat().st_size for entry in entries if entry.is_file())
            except OSError:
                return
            elapsed = time.monotonic() - self.started
            log.info("dump in progress: %.0f MiB written in %.0f s (%.0f MiB/s)",
                     written / 1048576, elapsed, written / 1048576 / elapsed)


def _terminals(stdio: dict[str, str]) -> list[str]:
    return [target for target in stdio.values() if target.startswith("tty[")]


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
