"""The one adapter over pycriu: the only module that talks to CRIU.

Dump and restore go through CRIU's RPC (`criu swrk`, forked by pycriu), never
by parsing CLI output. Two pycriu facts shape this code (verified with 4.2.1):
- directory fds passed as images_dir_fd/work_dir_fd must be inheritable,
  because swrk is a forked+exec'd child;
- swrk closes fds 0-2 before exec, so fds given in inherit_fd must be dups
  above 2.
A CRIU failure becomes DumpFailed/RestoreFailed with one readable line (the
likely cause and its fix, see `explain`) and the path of the full CRIU log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import quopri
import re
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from supervisor_pkg.errors import DumpFailed, EnvironmentProblem, RestoreFailed

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
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.set_inheritable(fd, True)
        yield fd
    finally:
        os.close(fd)


def _new_client(images_fd: int, work_fd: int, log_name: str, log_level: int) -> Any:
    pycriu = _pycriu()
    client = pycriu.criu()
    client.use_binary(CRIU_BINARY)
    client.opts.images_dir_fd = images_fd
    client.opts.work_dir_fd = work_fd
    client.opts.log_file = log_name
    client.opts.log_level = log_level
    client.opts.ghost_limit = GHOST_LIMIT
    return client


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
    pycriu = _pycriu()
    with _directory_fd(images_dir) as images_fd, _directory_fd(log_dir) as work_fd:
        client = _new_client(images_fd, work_fd, log_name, log_level)
        client.opts.pid = pid
        client.opts.leave_stopped = True
        client.opts.track_mem = track_mem
        if parent is not None:
            client.opts.parent_img = parent
        # Resources outside the tree that CRIU must not try to dump, e.g. the
        # container runtime's terminal 'tty[rdev:dev]' under `docker run -t`.
        client.opts.external.extend(sorted(set(external)))
        if mount_namespace:
            _carry_mount_namespace(client.opts)
        _set_tcp(client.opts, tcp)
        started = time.monotonic()
        try:
            client.dump()
        except pycriu.CRIUException as error:
            raise DumpFailed(
                f"checkpoint failed: {explain(log_path, error)} (full CRIU log: {log_path})",
                errno=getattr(error, "errno", None),
                log_path=log_path,
            ) from error
        finally:
            _private(log_dir)
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
                raise RestoreFailed(
                    f"CRIU's lazy-pages daemon did not start: {explain(self.log_path)} (log: {self.log_path})"
                )
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
) -> int:
    """Restore the tree in `images_dir` as our child; return its root's PID.

    `inherit` maps CRIU resource keys (e.g. 'pipe:[1234]', the dumped stdout)
    to our fds that should take their place (the new container's stdout).
    """
    log_path = os.path.join(log_dir, log_name)
    pycriu = _pycriu()
    dups: list[int] = []
    try:
        with _directory_fd(images_dir) as images_fd, _directory_fd(log_dir) as work_fd:
            client = _new_client(images_fd, work_fd, log_name, log_level)
            client.opts.rst_sibling = True  # the restored root becomes our child
            client.opts.lazy_pages = lazy  # pages come from a LazyPagesDaemon sharing log_dir
            if mount_namespace:
                _carry_mount_namespace(client.opts)
                client.opts.root = "/"  # CRIU 4.2.1 crashes in mount.c without it
            _set_tcp(client.opts, tcp)
            for key, fd in inherit.items():
                high = os.dup(fd)  # swrk closes 0-2 before exec
                while high <= 2:
                    high = os.dup(fd)
                os.set_inheritable(high, True)
                dups.append(high)
                client.opts.inherit_fd.add(key=key, fd=high)
            try:
                response = client.restore()
            except pycriu.CRIUException as error:
                raise RestoreFailed(
                    f"restore failed: {explain(log_path, error)} (full CRIU log: {log_path})",
                    errno=getattr(error, "errno", None),
                    log_path=log_path,
                ) from error
    finally:
        for fd in dups:
            os.close(fd)
        _private(log_dir)
    return int(response.pid)


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


def _carry_mount_namespace(opts: Any) -> None:
    """The app's own mount namespace (CKPT_OWN_PROC): its mounts from the container are external,
    found again in the new container by path, with their sharing (rslave) kept."""
    opts.auto_ext_mnt = True
    opts.ext_sharing = True
    opts.ext_masters = True


def _private(log_dir: str) -> None:
    """CRIU writes its logs and stats 0644; they describe the app, so keep them 0600."""
    for name in os.listdir(log_dir):
        with contextlib.suppress(OSError):
            os.chmod(os.path.join(log_dir, name), 0o600)


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
     "CRIU runs under a seccomp filter (Docker's default profile), so it cannot suspend the app's filters; add "
     "--security-opt seccomp=unconfined"),
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
