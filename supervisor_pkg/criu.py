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
likely cause and its fix, see `explain`) and the path of the full CRIU log; a
failed restore also says whose fault it is (`restore_fault`).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import glob
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

from supervisor_pkg.errors import (
    CHECKPOINT_AT_FAULT,
    CONTAINER_AT_FAULT,
    DumpFailed,
    EnvironmentProblem,
    RestoreFailed,
    RestoreInterrupted,
    RestoreStalled,
)
from supervisor_pkg.volume import Directory, VolumeRefusal, real_path

CRIU_BINARY = "criu"
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
        out = subprocess.run([CRIU_BINARY, "--version"], capture_output=True, text=True, timeout=30).stdout
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
        result = subprocess.run([CRIU_BINARY, "check", "--feature", name], capture_output=True, timeout=30)
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
        try:
            os.set_inheritable(theirs.fileno(), True)
            self.pid = os.posix_spawnp(
                CRIU_BINARY, [CRIU_BINARY, "swrk", str(theirs.fileno())], os.environ,
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
        argv = [CRIU_BINARY, "lazy-pages", "--images-dir", self.images_dir, "--work-dir", self.work_dir,
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


# CRIU log messages -> cause; fix. Each was provoked with CRIU 4.2.1 in a real
# container (tests/integration/test_doctor_and_failures.py, docs/troubleshooting.md)
# unless marked "not provoked here". Patterns match the message, after CRIU's
# "Error (file.c:line): " prefix, so that a file name (compel/.../ptrace.c) is
# never taken for a cause. Specific causes are tried on every error line before
# the generic ones (_GENERIC_FAILURES): an early, vague EPERM must not hide the
# real cause logged after it.
_KNOWN_FAILURES: tuple[tuple[str, str], ...] = (
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
    (r"Can't dump file \d+ of that type|Unknown shit \d+",
     "the app holds a kind of file CRIU cannot checkpoint (named above); close it before checkpoints, or move "
     "that work out of the app"),
    (r"fsnotify:\s*Can't dump that handle",
     "the app holds inotify/fanotify watches; add --cap-add DAC_READ_SEARCH"),
    (r"Can't get rlimit \d+: Operation not permitted",
     "the app runs as another user and CRIU needs CAP_SYS_RESOURCE to read its limits; add --cap-add SYS_RESOURCE"),
    (r"Unseizable non-zombie|Can't seize|Unable to seize",
     "CRIU cannot ptrace the app (it runs as another user, or the host restricts ptrace with Yama); add "
     "--cap-add SYS_PTRACE"),
    (r"suspending seccomp failed",
     "CRIU runs under a seccomp filter (the engine's default profile: Docker's, Podman's, Kubernetes' "
     "RuntimeDefault), so it cannot suspend the app's filters; run the container unconfined (docker/podman run "
     "--security-opt seccomp=unconfined; Kubernetes securityContext.seccompProfile.type: Unconfined)"),
    (r"CRIU needs to have the CAP_SYS_ADMIN",
     "CRIU needs CAP_SYS_ADMIN; add --cap-add SYS_ADMIN"),
    (r"session leader is outside",
     "the app's session leader is outside its PID namespace; start it through criu-supervisor run"),
    # Not provoked here: the supervisor always passes tcp_close or tcp_established.
    (r"Connected TCP socket|consider using --tcp-established",
     "the app has established TCP connections; set CKPT_TCP=close or CKPT_TCP=established"),
    # CKPT_TCP=established: CRIU runs iptables to lock the connections during the dump.
    (r"Iptables configuration failed|Failed to lock TCP connection",
     "CKPT_TCP=established locks the app's TCP connections with iptables during the dump: install iptables in "
     "the app's image and add --cap-add NET_ADMIN, or set CKPT_TCP=close"),
    # Not provoked here (iptables fails first without NET_ADMIN).
    (r"TCP repair mode|Can't (turn|set) .*repair",
     "CKPT_TCP=established needs TCP repair mode; add --cap-add NET_ADMIN"),
    (r"SO_SNDBUFFORCE|SO_RCVBUFFORCE",
     "restoring the app's sockets needs CAP_NET_ADMIN; add --cap-add NET_ADMIN"),
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
     "the time-namespace offset was denied; add --cap-add SYS_TIME"),
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
_GENERIC_FAILURES: tuple[tuple[str, str], ...] = (
    (r"ptrace|PTRACE|[Cc]an't infect",
     "CRIU cannot ptrace the app: add --cap-add SYS_PTRACE and --security-opt seccomp=unconfined"),
    (r"Operation not permitted|EPERM",
     "CRIU lacks a permission; add --cap-add SYS_ADMIN SYS_PTRACE SYS_TIME NET_ADMIN and "
     "--security-opt seccomp=unconfined --security-opt apparmor=unconfined"),
)


# Errors CRIU logs on every run on hosts like ours, which never explain a failure:
# no /dev/net/tun, no CAP_SYS_RESOURCE for its own fd limit, and (without
# CAP_NET_ADMIN) the kernel-feature probes that try to create a veth pair.
_HARMLESS = (r"tun: Unable to create tun", r"Can't setup RLIMIT_NOFILE", r"RLIMIT_NOFILE",
             r"Unable to create a veth pair", r"reported by netlink: Operation not permitted",
             r"net: Unexpected error: -1\(Operation not permitted\)")


def _clean(line: str) -> str:
    """The error line alone: no timestamp, PID or parasite prefix, one space between words."""
    line = re.sub(r"^\(\s*[\d.]+\)\s*", "", line.strip())
    line = re.sub(r"^(pie:\s*)?\d+:\s*(?=Error)", "", line)
    return re.sub(r"\s+", " ", line).strip()


def _message(line: str) -> str:
    return re.sub(r"^Error \([^)]*\):\s*", "", line)


def _advice(text: str, table: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, advice in table:
        if re.search(pattern, _message(text)):
            return advice
    return None


def explain(log_path: str, error: BaseException | None = None) -> str:
    """One readable line: the CRIU error that explains the failure, its likely cause and fix.

    The first error line with a specific known cause wins, then the first with a
    generic one; otherwise the first error line that is not known noise;
    otherwise pycriu's own message.
    """
    try:
        with open(log_path, errors="replace") as log:
            lines = log.read().splitlines()
    except OSError:
        lines = []
    errors = [
        _clean(line)
        for line in lines
        if ("Error (" in line or "Error:" in line) and not any(re.search(h, line) for h in _HARMLESS)
    ]
    fallback = str(error) if error else "CRIU gave no reason"
    for table in (_KNOWN_FAILURES, _GENERIC_FAILURES):
        for line in errors or [fallback]:
            advice = _advice(line, table)
            if advice:
                return f"{line} -> {advice}"
    return errors[0] if errors else fallback
