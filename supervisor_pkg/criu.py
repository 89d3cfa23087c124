"""The one adapter over pycriu: the only module that talks to CRIU.

Dump and restore go through CRIU's RPC (`criu swrk`), never by parsing CLI
output. The exchange is pycriu's (a SOCK_SEQPACKET socket pair, pycriu's own
protobuf classes in pycriu.rpc_pb2), driven by `_Swrk` here rather than by
pycriu's `criu` class, which blocks in recv() until CRIU answers. We need what
it lacks: CRIU's notifications (a restore stops at "pre-resume", the tree
complete but not one instruction run, until we say go), a wait a watchdog can
cut short (a restore that hangs, a SIGTERM meanwhile), and swrk's PID to kill.
Facts that shape this code (verified with CRIU 4.2.1):
- directory fds passed as images_dir_fd/work_dir_fd must be inheritable,
  because swrk is a spawned child;
- swrk runs with fds 0-2 closed (as pycriu does), so fds given in inherit_fd
  must be dups above 2.
A CRIU failure becomes DumpFailed/RestoreFailed with one readable line (the
likely cause and its fix, see `explain`, which reads every error line of the
log and CRIU's own hints, and never advises a setting this container already
has: `Granted`) and the path of the full CRIU log; a failed restore also says
whose fault it is (`restore_fault`). What a dump needs turned on (file locks,
linked remaps) is found in /proc before each dump (dump_needs.py), so no
caller and no setting has to ask for it.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import glob
import logging
import os
import quopri
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from supervisor_pkg import bundle, dump_needs, launcher
from supervisor_pkg.errors import (
    CHECKPOINT_AT_FAULT,
    CONTAINER_AT_FAULT,
    DumpFailed,
    EnvironmentProblem,
    RestoreFailed,
    RestoreInterrupted,
    RestoreStalled,
)
from supervisor_pkg.volume import Directory, VolumeRefusal, free_bytes, real_path

log = logging.getLogger("criu-supervisor")

CRIU_BINARY = "criu"
_NEARLY_FULL = 1 << 20  # bytes free on the log's volume below which a failure is put down to a full volume


def ensure_tmp(path: str = "/tmp") -> tuple[bool, str] | None:
    """CRIU probes the kernel in a directory it makes under /tmp (kerndat.c, a fixed path): make /tmp if missing.

    An image with almost nothing in it (FROM scratch and a static binary) has
    none, and every dump failed "Fail to make dir /tmp/.criu...". Returns
    (made, what to log), or None when /tmp was there.
    """
    if os.path.lexists(path):
        return None
    try:
        os.mkdir(path)
        os.chmod(path, 0o1777)  # as a distribution's /tmp (mkdir's mode is filtered by the umask)
    except OSError as error:
        return False, (f"CRIU needs {path} and this image has none, which could not be made ({error.strerror}): "
                       f"every checkpoint will fail; give the container one (docker run --tmpfs {path})")
    return True, f"made {path} (mode 1777): CRIU needs it and this image has none"


def criu_command() -> list[str]:
    """argv prefix that runs CRIU: `criu` on PATH, or the bundle's, through its own loader (bundle.py)."""
    if CRIU_BINARY != "criu":  # pointed elsewhere (tests, a custom build)
        return [CRIU_BINARY]
    return bundle.program("criu")
# Deleted-but-open files are copied into the checkpoint (ghost files) up to this
# size each; CRIU's default of 1 MiB is too small for real apps' temp files.
GHOST_LIMIT = 256 << 20


def _pycriu() -> Any:
    try:
        import pycriu  # type: ignore[import-not-found]
    except ImportError as error:
        raise EnvironmentProblem(
            "pycriu is not installed: use the criu-supervisor base image, or install "
            "Debian's python3-pycriu (CRIU >= 4.2)"
        ) from error
    return pycriu


def preload() -> threading.Thread:
    """Import pycriu in a background thread (~30 ms), while a restore's other steps wait on I/O.

    A restore needs pycriu only at its last step; importing it while the
    checkpoint is verified, claimed and the lazy-pages daemon starts takes it
    off the time to the app's first answer. A failure is left for the real
    import to report. Join the thread before forking (an import lock held by
    it would be held forever in the child).
    """

    def load() -> None:
        with contextlib.suppress(Exception):
            _pycriu()

    thread = threading.Thread(target=load, name="pycriu-preload", daemon=True)
    thread.start()
    return thread


@functools.cache
def version() -> str:
    """CRIU's version, e.g. '4.2.1'."""
    try:
        out = subprocess.run([*criu_command(), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        raise EnvironmentProblem(
            f"cannot run {CRIU_BINARY}: {error}; use the base image, which ships CRIU 4.2"
        ) from error
    match = re.search(r"Version:\s*(\S+)", out)
    if not match:
        raise EnvironmentProblem(f"cannot read CRIU's version from {out!r}")
    return match.group(1)


@functools.cache
def has_feature(name: str) -> bool:
    """`criu check --feature NAME` succeeded (e.g. mem_dirty_track: soft-dirty pre-dumps)."""
    try:
        result = subprocess.run([*criu_command(), "check", "--feature", name], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@dataclasses.dataclass(frozen=True)
class DumpResult:
    seconds: float
    log_path: str


@contextlib.contextmanager
def _directory_fd(path: str) -> Iterator[int]:
    # O_NOFOLLOW: the store hands paths anchored at its open lineage (/proc/PID/fd/N/gen-...); a
    # symlink put in the generation's place on the shared volume is refused, never followed.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.set_inheritable(fd, True)
        yield fd
    finally:
        os.close(fd)


def _rpc() -> Any:
    """pycriu's protobuf classes for CRIU's RPC (criu_req, criu_resp, criu_opts)."""
    return _pycriu().rpc_pb2


# CRIU's cpu_cap bits (criu/include/cr_options.h). IMAGE alone: the dump writes cpuinfo.img and the
# restore reads it, with CRIU's own sanity checks, but neither FPU (exact XSAVE sizes: refuses a move
# to a larger CPU) nor INS (refuses a CPU without ERMS, which is only a speed hint): what the app's
# CPU needs is compared by the supervisor before CRIU runs (cpu.py), which accepts every richer CPU.
CPU_CAP_IMAGE = 1 << 3


def _options(images_fd: int, work_fd: int, log_name: str, log_level: int) -> Any:
    opts = _rpc().criu_opts(images_dir_fd=images_fd)
    opts.work_dir_fd = work_fd
    opts.log_file = log_name
    opts.log_level = log_level
    opts.ghost_limit = GHOST_LIMIT
    opts.cpu_cap = CPU_CAP_IMAGE
    return opts


class _SwrkDied(Exception):
    """criu swrk closed its socket (it exited or was killed) without answering."""


class _Swrk:
    """One `criu swrk` child and the socket we speak CRIU's RPC over (see the module docstring)."""

    _MAX_MESSAGE = 1 << 20

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = criu_command()
        try:
            os.set_inheritable(theirs.fileno(), True)
            self.pid = os.posix_spawnp(
                command[0], [*command, "swrk", str(theirs.fileno())], os.environ,
                file_actions=[(os.POSIX_SPAWN_CLOSE, fd) for fd in (0, 1, 2)],
            )
        except OSError as error:
            ours.close()
            raise EnvironmentProblem(
                f"cannot run {CRIU_BINARY} swrk: {error}; use the base image, which ships CRIU 4.2"
            ) from error
        finally:
            theirs.close()
        self.socket = ours

    def send(self, message: Any) -> None:
        self.socket.send(message.SerializeToString())

    def receive(self, timeout: float | None) -> Any | None:
        """CRIU's next message, or None if none came within `timeout`."""
        ready, _, _ = select.select([self.socket], [], [], timeout)
        if not ready:
            return None
        data, ancillary, flags, _ = self.socket.recvmsg(
            self._MAX_MESSAGE, socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                # Some notifications carry an fd (orphan-pts-master); we never asked for one.
                for fd in array.array("i", payload[: len(payload) - len(payload) % 4]):
                    os.close(fd)
        if not data:
            raise _SwrkDied()
        if flags & socket.MSG_TRUNC:
            raise OSError(f"a message from CRIU was longer than {self._MAX_MESSAGE} bytes")
        response = _rpc().criu_resp()
        response.ParseFromString(data)
        return response

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Close the socket and reap swrk (which exits once it has answered); never wait forever."""
        self.socket.close()
        deadline = time.monotonic() + 5.0
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    self.kill()
                    os.waitpid(self.pid, 0)
                    return
                time.sleep(0.005)


def _exchange(
    request: Any,
    watch: Callable[[], None] | None = None,
    on_notify: Callable[[str, int | None], None] | None = None,
    poll: float = 0.1,
) -> Any:
    """Send one request to a new swrk; answer its notifications; return its final response.

    `watch` runs every `poll` seconds while CRIU works and `on_notify` at each
    notification; either may raise to abort, which kills swrk (the caller
    cleans up what it had restored).
    """
    rpc = _rpc()
    swrk = _Swrk()
    try:
        swrk.send(request)
        while True:
            message = swrk.receive(None if watch is None else poll)
            if message is None:
                assert watch is not None
                watch()
                continue
            if message.type == rpc.NOTIFY:
                if on_notify is not None:
                    on_notify(message.notify.script, getattr(message.notify, "pid", 0) or None)
                swrk.send(rpc.criu_req(type=rpc.NOTIFY, notify_success=True))
                continue
            return message
    except BaseException:
        swrk.kill()
        raise
    finally:
        swrk.close()


def _criu_said(response: Any) -> str:
    """CRIU's own error message in an RPC response (CRIU >= 3.15 fills cr_errmsg), for when its log says nothing."""
    message = str(getattr(response, "cr_errmsg", "") or "").strip()
    return message or f"CRIU failed (errno {getattr(response, 'cr_errno', 0) or 'unknown'})"


def dump(
    pid: int,
    images_dir: str,
    log_dir: str,
    log_name: str,
    *,
    tcp: str,
    log_level: int = 4,
    external: Sequence[str] = (),
    mount_namespace: bool = False,
    track_mem: bool = False,
    parent: str | None = None,
) -> DumpResult:
    """Checkpoint the tree rooted at `pid` into `images_dir`, and leave it STOPPED.

    `track_mem` resets the kernel's soft-dirty bits, so that a later dump with
    `parent` (the previous images, relative to `images_dir`; CRIU links it as
    `parent`) writes only the pages dirtied since. Both need mem_dirty_track.

    The caller decides what happens next: kill the tree once the checkpoint is
    safely published (a final checkpoint), or SIGCONT it (a leave-running one,
    or any failure). Were CRIU to kill the tree itself, a failure after the
    dump (volume full while publishing, the lease lost) would lose the app.
    """
    log_path = os.path.join(log_dir, log_name)
    rpc = _rpc()
    with _directory_fd(images_dir) as images_fd, _directory_fd(log_dir) as work_fd:
        opts = _options(images_fd, work_fd, log_name, log_level)
        opts.pid = pid
        opts.leave_stopped = True
        opts.track_mem = track_mem
        if parent is not None:
            opts.parent_img = parent
        # Resources outside the tree that CRIU must not try to dump, e.g. the
        # container runtime's terminal 'tty[rdev:dev]' under `docker run -t`.
        opts.external.extend(sorted(set(external)))
        if mount_namespace:
            _carry_mount_namespace(opts)
        _set_tcp(opts, tcp)
        _ask_for_what_the_app_needs(opts, pid)
        started = time.monotonic()
        try:
            response = _exchange(rpc.criu_req(type=rpc.DUMP, opts=opts))
        except (_SwrkDied, OSError) as error:
            raise DumpFailed(f"checkpoint failed: CRIU died ({error or 'no answer'}): {explain(log_path)} "
                             f"(full CRIU log: {real_path(log_path)})", log_path=log_path) from error
        finally:
            _private(log_dir)
        if not response.success:
            raise DumpFailed(
                f"checkpoint failed: {explain(log_path, RuntimeError(_criu_said(response)))} "
                f"(full CRIU log: {real_path(log_path)})",
                errno=response.cr_errno or None,
                log_path=log_path,
            )
    return DumpResult(seconds=time.monotonic() - started, log_path=log_path)


# The CRIU options turned on for this app so far, each logged once (the first dump that needs it).
_ANNOUNCED: set[str] = set()


def _announce(option: str, message: str) -> None:
    if option in _ANNOUNCED:
        log.debug("%s", message)
    else:
        _ANNOUNCED.add(option)
        log.info("%s", message)


def _listed(items: Sequence[str], most: int = 3) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def _ask_for_what_the_app_needs(opts: Any, pid: int) -> None:
    """Turn on CRIU's file_locks and link_remap when the app's processes need them (see dump_needs.py).

    Found in /proc just before the dump, so no setting is needed; the app is
    not frozen yet, so a lock taken in between fails the dump with CRIU's
    "Some file locks are hold" (explained), and the next checkpoint carries it.
    """
    needs = dump_needs.inspect(launcher.namespace_members(pid) or [pid])
    if needs.file_locks:
        opts.file_locks = True
        _announce("file_locks", f"the app holds {len(needs.file_locks)} file lock(s) "
                  f"({_listed([lock.describe() for lock in needs.file_locks])}): CRIU's file_locks is on, so "
                  "they are checkpointed and taken again on restore")
    if needs.link_remaps:
        opts.link_remap = True
        _announce("link_remap", f"the app holds {len(needs.link_remaps)} file(s) open under a removed name that "
                  f"another hard link keeps ({_listed(list(needs.link_remaps))}): CRIU's link_remap is on, so each is "
                  "linked as link_remap.N beside its old name for the restore to open it")


# CRIU writes filelocks.img with its magic only when no lock was dumped (criu/image-desc.c: CR_FD_FILE_LOCKS).
_FILE_LOCKS_IMAGE = "filelocks.img"
_EMPTY_IMAGE_SIZE = 8  # two 32-bit magics


def _has_file_locks(images_dir: str) -> bool:
    try:
        return os.stat(os.path.join(images_dir, _FILE_LOCKS_IMAGE)).st_size > _EMPTY_IMAGE_SIZE
    except OSError:
        return False


class LazyPagesDaemon:
    """CRIU's lazy-pages daemon: serves a restored app's memory from the images on demand.

    With it, `restore(lazy=True)` returns as soon as the process tree exists;
    each page arrives through userfaultfd when first touched, and the daemon
    pushes the rest in the background and exits 0 when every page is in. It is
    run with the CLI (the RPC has no request for it) and shares a work
    directory, where it listens on lazy-pages.socket, with the restore.
    The caller reaps it (we are PID 1: our reaper collects every child), so
    only its pid is kept here.
    """

    SOCKET = "lazy-pages.socket"

    def __init__(self, images_dir: str, work_dir: str, log_name: str, log_level: int = 4) -> None:
        self.images_dir = images_dir
        self.work_dir = work_dir
        self.log_path = os.path.join(work_dir, log_name)
        self.log_level = log_level
        self.pid: int | None = None

    def start(self, timeout: float = 5.0) -> int:
        os.makedirs(self.work_dir, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.work_dir, self.SOCKET))
        argv = [*criu_command(), "lazy-pages", "--images-dir", self.images_dir, "--work-dir", self.work_dir,
                "--log-file", self.log_path, f"-v{self.log_level}"]
        try:
            self.pid = os.posix_spawnp(argv[0], argv, os.environ, setsid=True)
        except OSError as error:
            raise RestoreFailed(f"cannot start CRIU's lazy-pages daemon: {error}") from error
        deadline = time.monotonic() + timeout
        while not os.path.exists(os.path.join(self.work_dir, self.SOCKET)):
            finished, _status = os.waitpid(self.pid, os.WNOHANG)
            if finished or time.monotonic() > deadline:
                raise RestoreFailed(f"CRIU's lazy-pages daemon did not start: {explain(self.log_path)} "
                                    f"(log: {real_path(self.log_path)})")
            time.sleep(0.002)
        return self.pid

    def kill(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def restore(
    images_dir: str,
    log_dir: str,
    log_name: str,
    *,
    inherit: Mapping[str, int],
    tcp: str,
    log_level: int = 4,
    lazy: bool = False,
    mount_namespace: bool = False,
    stall_timeout: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    before_resume: Callable[[int | None], None] | None = None,
    on_progress: Callable[[], None] | None = None,
) -> int:
    """Restore the tree in `images_dir` as our child; return its root's PID.

    `inherit` maps CRIU resource keys (e.g. 'pipe:[1234]', the dumped stdout)
    to our fds that should take their place (the new container's stdout).

    `before_resume(root_pid)` runs when the tree is complete but has not run
    one instruction (CRIU's "pre-resume" stage); raising there aborts. A
    restore that makes no progress for `stall_timeout` seconds raises
    RestoreStalled, and one for which `should_stop()` turns true
    RestoreInterrupted. Whatever the failure, nothing of the tree is left
    running: its processes are killed, and any mount or iptables rule CRIU
    left behind is removed (see `_Leftovers`).
    """
    log_path = os.path.join(log_dir, log_name)
    rpc = _rpc()
    dups: list[int] = []
    leftovers = _Leftovers(tcp)
    watchdog = _RestoreWatchdog(log_path, stall_timeout, should_stop, on_progress)
    roots: list[int] = []

    def notified(script: str, pid: int | None) -> None:
        if pid:
            roots[:] = [pid]
        if script == "pre-resume" and before_resume is not None:
            before_resume(roots[0] if roots else None)

    try:
        with _directory_fd(images_dir) as images_fd, _directory_fd(log_dir) as work_fd:
            opts = _options(images_fd, work_fd, log_name, log_level)
            opts.rst_sibling = True  # the restored root becomes our child
            opts.notify_scripts = True  # so that we hold the tree at pre-resume
            # Engines give the container's root directory other modes (Docker 0755, Podman 0555): CRIU
            # would refuse "File . has bad mode 040555 (expect 040755)". Permission bits of the files the
            # app has open say nothing about its state; their sizes (and build ids) are still checked.
            opts.skip_file_rwx_check = True
            opts.lazy_pages = lazy  # pages come from a LazyPagesDaemon sharing log_dir
            # Without file_locks CRIU restores the files but silently not their locks (prepare_file_locks).
            opts.file_locks = _has_file_locks(images_dir)
            if mount_namespace:
                _carry_mount_namespace(opts)
                opts.root = "/"  # CRIU 4.2.1 crashes in mount.c without it
            _set_tcp(opts, tcp)
            for key, fd in inherit.items():
                high = os.dup(fd)  # swrk runs with 0-2 closed
                while high <= 2:
                    high = os.dup(fd)
                os.set_inheritable(high, True)
                dups.append(high)
                opts.inherit_fd.add(key=key, fd=high)
            try:
                response = _exchange(rpc.criu_req(type=rpc.RESTORE, opts=opts), watch=watchdog.check,
                                     on_notify=notified)
            except (_SwrkDied, OSError) as error:
                leftovers.remove()
                raise RestoreFailed(f"restore failed: CRIU died ({error or 'no answer'}): {explain(log_path)} "
                                    f"(full CRIU log: {real_path(log_path)})", log_path=log_path) from error
            except BaseException:
                leftovers.remove()
                raise
            if not response.success:
                leftovers.remove()
                raise RestoreFailed(
                    f"restore failed: {explain(log_path, RuntimeError(_criu_said(response)))} "
                    f"(full CRIU log: {real_path(log_path)})",
                    errno=response.cr_errno or None,
                    log_path=log_path,
                    fault=restore_fault(log_path),
                )
    finally:
        for fd in dups:
            os.close(fd)
        _private(log_dir)
    return int(response.restore.pid)


def _processes() -> dict[int, int]:
    """PID -> parent PID of every process we can see."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return parents


def _descendants(roots: set[int], parents: Mapping[int, int]) -> set[int]:
    found = set(roots) & set(parents)
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def _read_io_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io") as handle:
            return sum(int(line.split()[1]) for line in handle if line.startswith(("rchar:", "wchar:")))
    except (OSError, ValueError, IndexError):
        return 0


class _RestoreWatchdog:
    """Kills a restore that makes no progress, or that we were asked to stop.

    Progress is anything CRIU does that we can see: its log growing, or bytes
    read and written by swrk and by the tasks it forks (they read their own
    page images). A restore stuck on a futex (CRIU's restorer hits a BUG when a
    capability is missing and waits on a zombie forever) shows none.
    """

    def __init__(
        self, log_path: str, stall_timeout: float | None, should_stop: Callable[[], bool] | None,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        self.log_path = log_path
        self.stall_timeout = stall_timeout
        self.should_stop = should_stop
        self.on_progress = on_progress
        self.children_before = {pid for pid, parent in _processes().items() if parent == os.getpid()}
        self.last_sample: tuple[int, int] | None = None
        self.last_progress = time.monotonic()

    def _sample(self) -> tuple[int, int]:
        try:
            log_size = os.stat(self.log_path).st_size
        except OSError:
            log_size = 0
        parents = _processes()
        new_children = {pid for pid, parent in parents.items() if parent == os.getpid()} - self.children_before
        return log_size, sum(_read_io_bytes(pid) for pid in _descendants(new_children, parents))

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise RestoreInterrupted("restore interrupted: the container was asked to stop", log_path=self.log_path)
        if self.stall_timeout is None:
            return
        sample, now = self._sample(), time.monotonic()
        if sample != self.last_sample:
            self.last_sample, self.last_progress = sample, now
            if self.on_progress is not None:
                self.on_progress()
        elif now - self.last_progress >= self.stall_timeout:
            raise RestoreStalled(
                f"restore made no progress for {self.stall_timeout:.0f} s (CKPT_RESTORE_STALL) and was killed: "
                f"{explain(self.log_path, RuntimeError('CRIU stopped logging'))} "
                f"(full CRIU log: {real_path(self.log_path)})",
                log_path=self.log_path,
            )


class _Leftovers:
    """What a failed restore may leave in this container, noted before it and removed after it.

    - Processes: the restored tree's root is our child (rst_sibling); a restore
      we abort, or one CRIU abandons, may leave it and its namespace behind.
    - Mounts: CRIU's mounts for the app's own mount namespace (CKPT_OWN_PROC)
      live in namespaces that die with their processes, but its root yard
      directories (/tmp/.criu.mntns.*) stay.
    - Netfilter rules: with CKPT_TCP=established CRIU locks each connection
      with an iptables DROP rule marked `! --mark 0xc114` and removes it after
      the restore; a failed restore can leave them (criu#2828), which would
      drop the app's traffic after a fresh start here.
    """

    _YARDS = "/tmp/.criu.mntns.*"
    _CRIU_MARK = "0xc114"  # SOCCR_MARK in criu/soccr/soccr.h

    def __init__(self, tcp: str) -> None:
        self.tcp = tcp
        self.children_before = {pid for pid, parent in _processes().items() if parent == os.getpid()}
        self.mounts_before = _mount_points()
        self.yards_before = set(glob.glob(self._YARDS))

    def remove(self) -> None:
        self._kill_processes()
        self._unmount()
        for yard in set(glob.glob(self._YARDS)) - self.yards_before:
            with contextlib.suppress(OSError):
                os.rmdir(yard)
        if self.tcp == "established":
            _remove_connection_locks(self._CRIU_MARK)

    def _kill_processes(self) -> None:
        parents = _processes()
        new_children = {pid for pid, parent in parents.items() if parent == os.getpid()} - self.children_before
        for pid in _descendants(new_children, parents):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        for pid in new_children:
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
                    time.sleep(0.005)

    def _unmount(self) -> None:
        new = [point for point in _mount_points() if point not in self.mounts_before]
        if not new:
            return
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        for point in reversed(new):
            libc.umount2(point.encode(), 2)  # MNT_DETACH


def _mount_points() -> list[str]:
    try:
        with open("/proc/self/mountinfo") as handle:
            return [line.split()[4] for line in handle if len(line.split()) > 4]
    except OSError:
        return []


def _remove_connection_locks(mark: str) -> None:
    """Delete CRIU's per-connection iptables DROP rules (see _Leftovers)."""
    for save, command in (("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")):
        if shutil.which(save) is None:
            continue
        try:
            rules = subprocess.run([save, "-t", "filter"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for rule in rules.splitlines():
            if rule.startswith("-A ") and f"! --mark {mark}" in rule and rule.endswith("-j DROP"):
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    subprocess.run([command, "-w", "-t", "filter", "-D", *rule[3:].split()],
                                   capture_output=True, timeout=10)


def opened_files(images_dir: str) -> list[tuple[str, bool]]:
    """(path, opened-for-writing) of every regular file CRIU recorded in a dump."""
    images = _pycriu().images
    try:
        with open(os.path.join(images_dir, "files.img"), "rb") as handle:
            entries = images.load(handle)["entries"]
    except Exception as error:  # OSError, or any of pycriu's decoding errors
        raise DumpFailed(f"cannot read the dump's file list: {error}") from error
    found = []
    for entry in entries:
        regular = entry.get("reg")
        # Not every entry has "size" (CRIU omits it e.g. for O_APPEND files): go by mode.
        if entry.get("type") == "REG" and regular and stat.S_ISREG(regular.get("mode", 0)):
            found.append((regular["name"], bool(regular.get("flags", 0) & (os.O_WRONLY | os.O_RDWR))))
    return found


def core_entries(paths: Sequence[str]) -> list[dict[str, Any]]:
    """The decoded first entry of each core-*.img (a thread's registers, credentials, seccomp mode).

    An image this pycriu cannot decode is left out: CRIU itself judges it then.
    """
    images = _pycriu().images
    entries = []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                entries.append(images.load(handle)["entries"][0])
        except Exception:  # noqa: BLE001, S112 - OSError or any of pycriu's decoding errors
            continue
    return entries


def _carry_mount_namespace(opts: Any) -> None:
    """The app's own mount namespace (CKPT_OWN_PROC): its mounts from the container are external,
    found again in the new container by path, with their sharing (rslave) kept."""
    opts.auto_ext_mnt = True
    opts.ext_sharing = True
    opts.ext_masters = True


def _private(log_dir: str) -> None:
    """CRIU writes its logs and stats 0644; they describe the app, so keep them 0600.

    Only regular files, reached without following symlinks: the logs live on the
    shared volume, where a symlink to /etc/passwd could be waiting.
    """
    with contextlib.suppress(OSError):
        directory = Directory(log_dir, os.open(log_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW))
        with directory:
            for entry in directory.entries():
                if entry.kind == "file":
                    with contextlib.suppress(OSError, VolumeRefusal):
                        directory.chmod(entry.name, 0o600)


def _unix_socket_files() -> dict[int, tuple[int, int]]:
    """Socket inode -> (inode, device) of the file it is bound to, for every bound Unix socket here.

    Asked of the kernel with sock_diag (NETLINK_SOCK_DIAG, UDIAG_SHOW_VFS), the
    only place that knows which file a listening socket was bound to after the
    name it was bound under is gone.
    """
    netlink_sock_diag, sock_diag_by_family, nlm_f_request, nlm_f_dump = 4, 20, 0x1, 0x300
    nlmsg_done, nlmsg_error, udiag_show_vfs, unix_diag_vfs = 3, 2, 0x2, 1
    request = struct.pack("=BBHIII2I", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, udiag_show_vfs, 0, 0)
    header = struct.pack("=IHHII", 16 + len(request), sock_diag_by_family, nlm_f_request | nlm_f_dump, 1, 0)
    found: dict[int, tuple[int, int]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netlink_sock_diag) as diag:
        diag.sendall(header + request)
        while True:
            data = diag.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind in (nlmsg_done, nlmsg_error) or length < 16:
                    return found
                body = offset + 16
                socket_inode = struct.unpack_from("=I", data, body + 4)[0]
                attribute = body + 16  # struct unix_diag_msg is 16 bytes
                while attribute + 4 <= offset + length:
                    attribute_length, attribute_type = struct.unpack_from("=HH", data, attribute)
                    if attribute_length < 4:
                        break
                    if attribute_type == unix_diag_vfs:
                        found[socket_inode] = struct.unpack_from("=II", data, attribute + 4)
                    attribute += (attribute_length + 3) & ~3
                offset += (length + 3) & ~3


def rename_relinked_unix_sockets(images_dir: str) -> list[tuple[str, str]]:
    """Give back their names to listening Unix sockets bound under a name that was then replaced.

    supervisord (and many daemons) bind `x.sock.N`, link `x.sock` to it and
    unlink `x.sock.N`. CRIU sees the bound name gone, records the socket as
    deleted, and restores it nameless: clients get "no such file". While the
    app is still stopped after the dump, find the surviving link (same inode,
    same directory) and record the socket under that name instead. Returns the
    (old, new) names changed; files.img is rewritten only if there are any.
    """
    images = _pycriu().images
    path = os.path.join(images_dir, "files.img")
    with open(path, "rb") as handle:
        dumped = images.load(handle)
    deleted = [entry["usk"] for entry in dumped["entries"]
               if entry.get("type") == "UNIXSK" and entry.get("usk", {}).get("deleted") and entry["usk"].get("name")]
    if not deleted:
        return []
    bound_files = _unix_socket_files()
    renamed = []
    for usk in deleted:
        old = quopri.decodestring(usk["name"].encode()).rstrip(b"\0").decode(errors="surrogateescape")
        target = bound_files.get(int(usk["ino"]))
        if not old.startswith("/") or target is None:
            continue
        directory = os.path.dirname(old)
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            links = [entry.path for entry in entries
                     if stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode)
                     and entry.inode() == target[0] and entry.path != old]
            if len(links) == 1:
                usk["name"] = quopri.encodestring(links[0].encode(errors="surrogateescape") + b"\0").decode()
                usk["deleted"] = False
                renamed.append((old, links[0]))
    if renamed:
        temporary = path + ".renamed"
        with open(temporary, "wb") as handle:
            images.dump(dumped, handle)
        os.replace(temporary, path)
    return renamed


def _set_tcp(opts: Any, tcp: str) -> None:
    if tcp == "established":
        opts.tcp_established = True
    else:
        # Dump: don't dump or block established connections; restore: bring
        # connected sockets back closed, so the app sees a reset and reconnects.
        opts.tcp_close = True


# What the container grants the supervisor, and so CRIU (its child), read when a failure is explained:
# advice never names a setting that is already there (the fix for "add --cap-add SYS_PTRACE" when the
# container has it is another one). Bits from <linux/capability.h>.
_CAPABILITY_BITS = {"DAC_READ_SEARCH": 2, "NET_ADMIN": 12, "SYS_PTRACE": 19, "SYS_ADMIN": 21, "SYS_RESOURCE": 24,
                    "SYS_TIME": 25, "CHECKPOINT_RESTORE": 40}


@dataclasses.dataclass(frozen=True)
class Granted:
    """The supervisor's effective capabilities, and whether a seccomp filter or an AppArmor profile confines it."""

    capabilities: frozenset[str]
    seccomp_filter: bool
    apparmor_profile: bool = False

    @classmethod
    def parse(cls, status: str, apparmor: str = "") -> Granted:
        """From /proc/self/status (CapEff, Seccomp) and /proc/self/attr/current (the AppArmor label)."""
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        try:
            effective = int(fields.get("CapEff", "0").strip() or "0", 16)
        except ValueError:
            effective = 0
        names = frozenset(name for name, bit in _CAPABILITY_BITS.items() if effective >> bit & 1)
        label = apparmor.strip().rstrip("\0")
        return cls(names, fields.get("Seccomp", "0").strip() not in ("", "0"),
                   bool(label) and not label.startswith("unconfined"))

    @classmethod
    def of_this_process(cls, proc: str = "/proc") -> Granted:
        status = _read_text(f"{proc}/self/status")
        apparmor = _read_text(f"{proc}/self/attr/apparmor/current") or _read_text(f"{proc}/self/attr/current")
        return cls.parse(status, apparmor)

    def has(self, capability: str) -> bool:
        return capability in self.capabilities


# What a container of nothing grants: every fix is worth naming (for a log read away from its container).
NOTHING_GRANTED = Granted(frozenset(), seccomp_filter=True, apparmor_profile=True)


def _read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


@dataclasses.dataclass(frozen=True)
class _Failure:
    """One line of CRIU's log, read: its message, the whole log, what the container grants, and /proc."""

    message: str
    match: re.Match[str]
    log: Sequence[str]
    granted: Granted
    proc: str


# Advice is a text, or a function of the failure that returns the text, or None when the cause it knows is
# ruled out (e.g. the capability it would ask for is already granted): the next line or rule is tried.
_Advice = str | Callable[[_Failure], "str | None"]


def _missing(granted: Granted, *capabilities: str, seccomp: bool = False, apparmor: bool = False) -> list[str]:
    """The container settings among these that are not in effect here, as `docker run` flags."""
    flags = [f"--cap-add {name}" for name in capabilities if not granted.has(name)]
    if seccomp and granted.seccomp_filter:
        flags.append("--security-opt seccomp=unconfined")
    if apparmor and granted.apparmor_profile:
        flags.append("--security-opt apparmor=unconfined")
    return flags


def _needs_capability(capability: str, advice: str) -> Callable[[_Failure], str | None]:
    """`advice` (which names --cap-add CAPABILITY) only when the container lacks it."""
    return lambda failure: None if failure.granted.has(capability) else advice


def _status_of(proc: str, pid: str) -> dict[str, str]:
    text = _read_text(f"{proc}/{pid}/status")
    return {key: value.strip() for key, value in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def _unseizable(failure: _Failure) -> str | None:
    """CRIU could not PTRACE_SEIZE a process: traced by another, or ptrace denied to CRIU."""
    pid, state = failure.match.group("pid"), failure.match.group("state")
    status = _status_of(failure.proc, pid)
    tracer = status.get("TracerPid", "0")
    traced = tracer not in ("", "0")
    if state == "t" or traced:
        by = f" by pid {tracer} ({_status_of(failure.proc, tracer).get('Name', '?')})" if traced else ""
        return (f"pid {pid} ({status.get('Name', '?')}) of the app is traced{by} (a debugger, strace, or the app's "
                "own tracer: zdtm ptrace_sig), and a traced process cannot be checkpointed (ptrace allows one tracer); "
                "detach the tracer before checkpoints")
    missing = _missing(failure.granted, "SYS_PTRACE")
    if missing:
        return ("CRIU cannot ptrace the app (it runs as another user, or the host restricts ptrace with Yama); add "
                + " ".join(missing))
    return (f"CRIU could not ptrace pid {pid} (state {state}) although this container has CAP_SYS_PTRACE: the "
            "host restricts ptrace further (Yama kernel.yama.ptrace_scope=3, or an LSM such as SELinux or a custom "
            "AppArmor profile); allow ptrace for the container on the host")


def _suspending_seccomp(failure: _Failure) -> str:
    if failure.granted.seccomp_filter:
        return ("CRIU runs under a seccomp filter (the engine's default profile: Docker's, Podman's, Kubernetes' "
                "RuntimeDefault), so it cannot suspend the app's filters; run the container unconfined "
                "(docker/podman run --security-opt seccomp=unconfined; Kubernetes "
                "securityContext.seccompProfile.type: Unconfined)")
    return ("the kernel refused to suspend the app's seccomp filters although CRIU runs without one: "
            "PTRACE_O_SUSPEND_SECCOMP needs CAP_SYS_ADMIN in the host's user namespace, which a container in a user "
            "namespace (rootless engine, userns-remap) does not have; run the container in the host's user namespace")


def _needs_sys_admin(failure: _Failure) -> str:
    if not failure.granted.has("SYS_ADMIN"):
        return "CRIU needs CAP_SYS_ADMIN; add --cap-add SYS_ADMIN"
    return ("CRIU has CAP_SYS_ADMIN only inside a user namespace (rootless engine, userns-remap), which is not "
            "enough; run the container in the host's user namespace")


def _fsnotify(failure: _Failure) -> str:
    if not failure.granted.has("DAC_READ_SEARCH"):
        return "the app holds inotify/fanotify watches; add --cap-add DAC_READ_SEARCH"
    return ("the app watches (inotify/fanotify) a file on a filesystem whose file handles cannot be opened again "
            "(overlayfs: the image's files and the writable layer), so even with CAP_DAC_READ_SEARCH CRIU cannot "
            "find it; watch files on a volume, or under /etc")


def _iptables(failure: _Failure) -> str:
    exited = next((re.search(r"exited, status=(\d+)", line) for line in failure.log if "exited, status=" in line), None)
    steps = []
    if exited is None or exited.group(1) == "127" or shutil.which("iptables") is None:
        steps.append("install iptables in the app's image")
    steps += ["add " + flag for flag in _missing(failure.granted, "NET_ADMIN")]
    fix = " and ".join(steps) or "check the iptables error above"
    return (f"CKPT_TCP=established locks the app's TCP connections with iptables during the dump: {fix}, or set "
            "CKPT_TCP=close")


def _link_remap_failed(failure: _Failure) -> str:
    what = ("the app holds a file open under a name that was removed while another hard link keeps it (a linked "
            "remap); CRIU links it again beside its old name (link_remap.N) from its fd, ")
    if not failure.granted.has("DAC_READ_SEARCH"):
        return what + "which the kernel allows only with CAP_DAC_READ_SEARCH; add --cap-add DAC_READ_SEARCH"
    return what + ("and that failed: its directory is read-only or gone; keep such files on a writable volume "
                   "mounted in every container of the app")


def _generic_eperm(failure: _Failure) -> str | None:
    missing = _missing(failure.granted, "SYS_ADMIN", "SYS_PTRACE", "SYS_TIME", "NET_ADMIN", seccomp=True,
                       apparmor=True)
    if missing:
        return "CRIU lacks a permission; add " + " ".join(missing)
    return ("CRIU was denied something although this container has every setting it needs (SYS_ADMIN, SYS_PTRACE, "
            "SYS_TIME, NET_ADMIN, no seccomp filter or AppArmor profile): a user namespace, an LSM (SELinux) or a "
            "read-only path; see the full CRIU log")


def _generic_ptrace(failure: _Failure) -> str | None:
    missing = _missing(failure.granted, "SYS_PTRACE", seccomp=True)
    if missing:
        return "CRIU cannot ptrace the app: add " + " and ".join(missing)
    return None  # the container's settings are not the cause: quote the line, let its own words speak


# The VMAs CRIU lists while dumping ("Handling VMA with the following smaps entry: START-END PERMS ...").
_VMA_LINE = re.compile(
    r"smaps entry: (?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) (?P<perms>\S{4}) \S+ \S+ \S+\s*(?P<name>.*)$")


def _mapping_at(log: Sequence[str], address: int) -> str | None:
    """The mapping CRIU listed that contains `address`, as 'START-END PERMS (SIZE, NAME)'."""
    for line in log:
        vma = _VMA_LINE.search(line)
        if vma and int(vma.group("start"), 16) <= address < int(vma.group("end"), 16):
            size = (int(vma.group("end"), 16) - int(vma.group("start"), 16)) >> 20
            name = vma.group("name").strip() or "anonymous"
            return f"{vma.group('start')}-{vma.group('end')} {vma.group('perms')} ({size} MiB, {name})"
    return None


def _cannot_poke(failure: _Failure) -> str | None:
    """compel writes its parasite's syscall at the start of the task's first executable mapping; a shared read+exec
    mapping (a JIT's code buffer: PHP opcache's JIT) refuses ptrace writes with EIO."""
    poke = next((re.search(r"Can't poke (\d+) @ 0x([0-9a-f]+)", line) for line in failure.log if "Can't poke" in line),
                None)
    # Else the parasite's syscall_ip, logged per task: the last one before the failure is the failing task's.
    before = failure.log[:next((n for n, line in enumerate(failure.log) if "POKEDATA failed" in line), None)]
    syscall_ip = next((re.search(r"syscall_ip at 0x([0-9a-f]+)", line) for line in reversed(before)
                       if "syscall_ip at" in line), None)
    address = int(poke.group(2), 16) if poke else int(syscall_ip.group(1), 16) if syscall_ip else None
    mapping = _mapping_at(failure.log, address) if address is not None else None
    if mapping is None or not re.search(r" r.xs ", f" {mapping.split(' ')[1]} "):
        return None
    pid = f" of pid {poke.group(1)}" if poke else ""
    return (f"CRIU cannot write its parasite code into the app: the first executable mapping{pid} is shared "
            f"memory, {mapping}, which ptrace cannot write: a JIT's code buffer. PHP's opcache JIT: set "
            "opcache.jit_buffer_size=0 (opcache keeps caching bytecode); another JIT: turn off its shared "
            "executable buffer")


# CRIU log messages -> cause; fix. Each was provoked with CRIU 4.2.1 in a real
# container (tests/integration/test_doctor_and_failures.py, test_popular_servers.py,
# docs/troubleshooting.md) unless marked "not provoked here". Patterns match the
# message, after CRIU's "Error (file.c:line): " prefix, so that a file name
# (compel/.../ptrace.c) is never taken for a cause. Specific causes are tried on
# every error line before the generic ones (_GENERIC_FAILURES): an early, vague
# EPERM must not hide the real cause logged after it. An advice that is a function
# sees what the container grants and returns None when its fix is already there.
_KNOWN_FAILURES: tuple[tuple[str, _Advice], ...] = (
    # CKPT_SHARE_IPC=1: SysV objects the app maps belong to the container, not to the dumped tree.
    (r"doesn't live in IPC ns",
     "the app uses SysV IPC objects of the container's IPC namespace, which CRIU cannot carry; set "
     "CKPT_SHARE_IPC=0 (the default) so the app has its own"),
    # A path under the container's /proc names a container PID, which differs in the replacement.
    (r"Can't open file proc/\d+/",
     "the app held a file under /proc/<pid>/, and that PID differs in this container; set CKPT_OWN_PROC=1 so "
     "the app sees a /proc of its own PID namespace"),
    # CRIU < 4.2 on kernels >= 6.16 (provoked with Debian trixie's CRIU 4.1.1).
    (r"Can't get \d+:\d+ opt: Operation not supported",
     "this CRIU is too old for the kernel's socket options; use CRIU >= 4.2 (the base image has it)"),
    # io_uring: a mapped ring fails while CRIU reads the memory map; an unmapped one
    # when CRIU collects the app's fds, which the kernel refuses to pass (EINVAL).
    (r"anon_inode:\[io_uring\]",
     "the app uses io_uring, which CRIU cannot dump; keep CKPT_IO_URING=deny"),
    (r"send_fds failed \(-22\)",
     "the app most likely holds an io_uring instance, whose fd the kernel will not hand to CRIU; keep "
     "CKPT_IO_URING=deny"),
    # Multipath TCP (IPPROTO_MPTCP = 262): Go >= 1.24 listens with it when the kernel has it; CRIU 4.2 dumps only
    # TCP, UDP(-lite) and raw inet sockets. CRIU's next line suggests GODEBUG=multipathtcp=0 (quoted with it).
    (r"Unsupported proto 262\b",
     "the app has a Multipath TCP socket (Go >= 1.24 listens with MPTCP), which CRIU cannot dump; keep "
     "CKPT_MPTCP=deny (the default: socket() with IPPROTO_MPTCP then fails as on a kernel without MPTCP, and Go "
     "falls back to TCP), or start the app with GODEBUG=multipathtcp=0"),
    (r"Unsupported proto \d+",
     "the app has an inet socket of a protocol CRIU cannot dump (SCTP, DCCP...); close it before checkpoints, or "
     "move that work out of the app"),
    (r"Can't dump file \d+ of that type|Unknown shit \d+",
     "the app holds a kind of file CRIU cannot checkpoint (named above); close it before checkpoints, or move "
     "that work out of the app"),
    # File locks are found in /proc before every dump and CRIU's file_locks turned on (dump_needs.py): this one
    # was taken between that look and the freeze.
    (r"Some file locks are hold by dumping tasks",
     "the app took a file lock after the supervisor looked for its locks, just before the dump (it turns CRIU's "
     "file_locks on whenever the app holds one); the next checkpoint carries it"),
    # Not provoked here: a POSIX lock CRIU cannot attribute to a process of the tree, or a lock the restore cannot
    # take again (another process in the replacement holds it).
    (r"Unresolved lock found|Can not set (posix lock|flock)|Dump file lock failed|Unknown file lock",
     "CRIU could not carry one of the app's file locks: the locked file is shared with a process outside the app, "
     "or another process in this container holds the lock; keep other processes off the app's locked files"),
    # Linked remaps are found before every dump and CRIU's link_remap turned on (dump_needs.py).
    (r"Can't create link remap|--link-remap",
     "the app holds a file open under a name removed after the supervisor looked (another hard link keeps the "
     "file); it turns CRIU's link_remap on whenever it finds one: the next checkpoint carries it"),
    # CRIU links the file again from its fd (linkat AT_EMPTY_PATH, which the kernel allows only with
    # CAP_DAC_READ_SEARCH), trying the directory, then each parent, and gives up with "trim failed".
    (r"trim failed: @link_remap|Can't link remap to|Can't link .*link_remap", _link_remap_failed),
    # The app's own mount namespace (CKPT_OWN_PROC=1, or one the app made) with a mount whose peer or master is
    # outside it. Not provoked here.
    (r"has unreachable sharing|--enable-external-(sharing|masters)|[Ee]xternal mount .* not found",
     "the app has a mount namespace of its own with a mount shared with, or a slave of, a mount outside it; set "
     "CKPT_OWN_PROC=1 (the supervisor then dumps external sharing and masters), and make no mount namespace in the "
     "app itself"),
    (r"POKEDATA failed: Input/output error|Can't poke \d+ @", _cannot_poke),
    (r"fsnotify:\s*Can't dump that handle", _fsnotify),
    (r"Can't get rlimit \d+: Operation not permitted",
     _needs_capability("SYS_RESOURCE", "the app runs as another user and CRIU needs CAP_SYS_RESOURCE to read its "
                       "limits; add --cap-add SYS_RESOURCE")),
    (r"Unseizable non-zombie (?P<pid>\d+) found, state (?P<state>\S)", _unseizable),
    (r"Can't seize|Unable to seize",
     _needs_capability("SYS_PTRACE", "CRIU cannot ptrace the app (it runs as another user, or the host restricts "
                       "ptrace with Yama); add --cap-add SYS_PTRACE")),
    (r"suspending seccomp failed", _suspending_seccomp),
    (r"CRIU needs to have the CAP_SYS_ADMIN", _needs_sys_admin),
    (r"session leader is outside",
     "the app's session leader is outside its PID namespace; start it through criu-supervisor run"),
    # Not provoked here: the supervisor always passes tcp_close or tcp_established.
    (r"Connected TCP socket|consider using --tcp-established",
     "the app has established TCP connections; set CKPT_TCP=close or CKPT_TCP=established"),
    # CKPT_TCP=established: CRIU runs iptables to lock the connections during the dump.
    (r"Iptables configuration failed|Failed to lock TCP connection", _iptables),
    # Not provoked here (iptables fails first without NET_ADMIN).
    (r"TCP repair mode|Can't (turn|set) .*repair",
     _needs_capability("NET_ADMIN", "CKPT_TCP=established needs TCP repair mode; add --cap-add NET_ADMIN")),
    (r"SO_SNDBUFFORCE|SO_RCVBUFFORCE",
     _needs_capability("NET_ADMIN", "restoring the app's sockets needs CAP_NET_ADMIN; add --cap-add NET_ADMIN")),
    (r"External socket is used|--ext-unix-sk",
     "the app is connected to a Unix socket whose other end is outside it (another process in the container, a "
     "sidecar, /dev/log); start that peer from the app's command so it is checkpointed too, or close the "
     "connection before checkpoints"),
    (r"Can't open file .* on restore: No such file or directory",
     "a file the app had open is missing in this container; mount the same volumes and bind mounts at the same "
     "paths as in the checkpointed one"),
    (r"has bad size \d+ \(expect \d+\)",
     "a file the app had open changed after the checkpoint (another writer, or another image or volume); run the "
     "same image and keep other writers off the app's open files"),
    # The container's own terminal (docker run -t) is carried as an external tty;
    # this is another one, e.g. a pty whose master a process outside the app holds.
    (r"\b(tty|pty|ptmx)\b|Can't dump.*terminal",
     "the app is attached to a terminal whose other end is outside it (not the container's own, which is "
     "carried); start the process that owns it from the app's command, or run without a TTY"),
    (r"timens|clock.*offset|Can't set.*time",
     _needs_capability("SYS_TIME", "the time-namespace offset was denied; add --cap-add SYS_TIME")),
    (r"No space left on device|ENOSPC",
     "the checkpoint volume is full; free space or give CKPT_DIR a larger volume"),
    (r"Read-only file system|EROFS",
     "the checkpoint volume is read-only; mount CKPT_DIR read-write"),
    # Not provoked with the supervisor (the app has a PID namespace of its own);
    # provoked with bare CRIU restoring a tree whose PIDs are taken.
    (r"Can't fork for \d+: File exists|set_tid.*File exists|PID.*already",
     "a PID the app needs is already taken; restore into a fresh container"),
)

# A restore that fails on a checkpoint whose every file matched its manifest is
# this container's fault unless CRIU says the images themselves are unusable:
# then no container could restore them, and the generation is rejected. Only
# these patterns condemn a checkpoint; anything unknown keeps it (a good
# checkpoint is never lost to a replacement's mistake).
_CHECKPOINT_FAULTS = (
    r"[Uu]nexpected EOF",
    r"[Cc]orrupted image|[Bb]ad magic|[Mm]agic mismatch",
    r"Failed unpacking|[Ff]ailed to unpack|Can't unpack",
    r"pb_read.*failed|Failed to read .*\.img",
    r"[Ii]mage .*(is|was) (truncated|corrupted)",
    r"No parent image|Can't open parent",
)


def restore_fault(log_path: str) -> str:
    """CHECKPOINT_AT_FAULT if CRIU's log says the images are unusable, else CONTAINER_AT_FAULT."""
    try:
        with open(log_path, errors="replace") as log:
            lines = [line for line in log.read().splitlines() if "Error" in line]
    except OSError:
        lines = []
    for line in lines:
        if any(re.search(pattern, line) for pattern in _CHECKPOINT_FAULTS):
            return CHECKPOINT_AT_FAULT
    return CONTAINER_AT_FAULT


# Tried only when no line has a specific cause.
_GENERIC_FAILURES: tuple[tuple[str, _Advice], ...] = (
    (r"ptrace|PTRACE|[Cc]an't infect", _generic_ptrace),
    (r"Operation not permitted|EPERM", _generic_eperm),
)


# Errors CRIU logs on every run on hosts like ours, which never explain a failure:
# no /dev/net/tun, no CAP_SYS_RESOURCE for its own fd limit, and (without
# CAP_NET_ADMIN) the kernel-feature probes that try to create a veth pair.
_HARMLESS = (r"tun: Unable to create tun", r"Can't setup RLIMIT_NOFILE", r"RLIMIT_NOFILE",
             r"Unable to create a veth pair", r"reported by netlink: Operation not permitted",
             r"net: Unexpected error: -1\(Operation not permitted\)")

# CRIU follows some errors with a line that suggests what to do ("For Go programs, consider using
# GODEBUG=multipathtcp=0"). Such a hint is quoted with its error, unless it names a CRIU option (--file-locks,
# --ext-unix-sk...): those are the supervisor's to set, and its own advice says what to do instead.
_HINT = re.compile(r"\b([Cc]onsider|[Ss]uggest|[Yy]ou (can|may|should) try)\b")
_CRIU_OPTION = re.compile(r"(^|\s)--[a-z]")


def _clean(line: str) -> str:
    """The error line alone: no timestamp, PID or parasite prefix, one space between words."""
    line = re.sub(r"^\(\s*[\d.]+\)\s*", "", line.strip())
    line = re.sub(r"^(pie:\s*)?\d+:\s*(?=Error)", "", line)
    return re.sub(r"\s+", " ", line).strip()


def _message(line: str) -> str:
    return re.sub(r"^Error \([^)]*\):\s*", "", line)


def _advice(text: str, table: tuple[tuple[str, _Advice], ...], log: Sequence[str], granted: Granted,
            proc: str) -> str | None:
    message = _message(text)
    for pattern, advice in table:
        match = re.search(pattern, message)
        if match is None:
            continue
        said = advice if isinstance(advice, str) else advice(_Failure(message, match, log, granted, proc))
        if said is not None:
            return said
    return None


def _hints_after(errors: Sequence[str], index: int) -> list[str]:
    """CRIU's hints logged right after errors[index] (see _HINT), as their messages."""
    hints = []
    for line in errors[index + 1:index + 3]:
        message = _message(line)
        if not _HINT.search(message):
            break
        if not _CRIU_OPTION.search(message):
            hints.append(message)
    return hints


def explain(log_path: str, error: BaseException | None = None, granted: Granted | None = None,
            proc: str = "/proc") -> str:
    """One readable line: the CRIU error that explains the failure, CRIU's own hint, its likely cause and fix.

    The first error line with a specific known cause wins, then the first with a
    generic one; otherwise the first error line that is not known noise;
    otherwise pycriu's own message. `granted` is what this container grants
    (default: read from /proc/self/status now): advice never names a setting
    that is already in effect. `proc` is where the app's processes are looked up
    (a traced task's tracer).
    """
    try:
        with open(log_path, errors="replace") as log:
            lines = log.read().splitlines()
    except OSError:
        lines = []
    if granted is None:
        granted = Granted.of_this_process(proc)
    errors = [
        _clean(line)
        for line in lines
        if ("Error (" in line or "Error:" in line) and not any(re.search(h, line) for h in _HARMLESS)
    ]
    fallback = str(error) if error else "CRIU gave no reason"
    for table in (_KNOWN_FAILURES, _GENERIC_FAILURES):
        candidates = errors or [fallback]
        for index, line in enumerate(candidates):
            advice = _advice(line, table, lines, granted, proc)
            if advice:
                hints = _hints_after(candidates, index)
                quoted = "; ".join([line, *(f"CRIU adds: {hint}" for hint in hints)])
                return f"{quoted} -> {advice}"
    line = errors[0] if errors else fallback
    free = free_bytes(os.path.dirname(log_path))
    if free is not None and free < _NEARLY_FULL:
        # CRIU's log is on the volume too: it may end mid-line, before the ENOSPC that would have said so.
        return f"{line} -> the checkpoint volume is full (CRIU's log may be cut short); free space or give " \
               "CKPT_DIR a larger volume"
    return line

