"""What a dump of the app needs CRIU to be told, found in /proc just before CRIU runs.

CRIU refuses, rather than guesses, two things an ordinary server does:
- **File locks** (POSIX `fcntl`/`lockf`, open file description `F_OFD_SETLK`,
  BSD `flock`, leases): without its `file_locks` option the dump fails with
  "Some file locks are hold by dumping tasks! You can try --file-locks"
  (criu/file-lock.c). MariaDB, SQLite, Redis's AOF rewrite, pid-file lockers
  and supervisord all hold some. With the option CRIU records each lock and
  takes it again on restore (F_SETLKW/flock in the restored process).
- **Linked remaps**: a file held open under a name that was removed while
  another hard link to it remains (`st_nlink > 0`, "(deleted)" in
  /proc/PID/fd), and NFS silly-renamed `.nfsXXXX` files. CRIU can reopen such
  a file only by a name, so with `link_remap` it links the inode under
  `link_remap.N` beside the old name during the dump and removes that link
  after the restore; without it: "Can't create link remap for ... Use
  --link-remap option" (criu/files-reg.c, create_link_remap). Files with no
  link left are ghost files, which CRIU copies into the images itself.

Neither option is turned on blindly: `file_locks` makes the restore take the
locks again (it blocks on a lock someone else holds in the replacement), and
`link_remap` leaves a `link_remap.N` hard link in the app's directory after a
leave-running checkpoint. The kernel lists every lock an fd holds in
/proc/PID/fdinfo/FD ("lock:" lines, Linux >= 4.1) and /proc/locks by holder PID
(OFD locks have no PID there: -1); both are read for every process of the app.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable

# NFS renames a file that is deleted while open to .nfs followed by 24 hex digits (fs/nfs/unlink.c).
_NFS_SILLY_RENAME = re.compile(r"/\.nfs[0-9a-fA-F]{24}$")
_DELETED = " (deleted)"
# Kernel-internal files CRIU dumps by other means (shared anonymous memory, SysV segments, memfds): never remapped.
_INTERNAL = ("/dev/zero", "/SYSV", "/memfd:", "/anon_hugepage")


@dataclasses.dataclass(frozen=True)
class FileLock:
    kind: str  # POSIX, OFDLCK, FLOCK, LEASE, DELEG as the kernel names them
    access: str  # READ, WRITE (or a lease's type)
    pid: int  # the holder, as this supervisor sees PIDs
    path: str  # the locked file, or its device:inode when no fd names it
    inode: str = ""  # MAJOR:MINOR:INODE as the kernel prints it

    @property
    def key(self) -> tuple[str, str, str, int]:
        """One lock seen through several fds (a flock or OFD lock belongs to an open file, shared across fork)."""
        return self.kind, self.access, self.inode, self.pid if self.kind == "POSIX" else 0

    def describe(self) -> str:
        return f"{self.kind} {self.access.lower()} lock on {self.path} (pid {self.pid})"


@dataclasses.dataclass(frozen=True)
class DumpNeeds:
    file_locks: tuple[FileLock, ...] = ()
    link_remaps: tuple[str, ...] = ()  # paths of open files that need a linked remap


def _read(path: str) -> str | None:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def _lock_fields(text: str) -> tuple[str, str, str, str] | None:
    """(kind, access, pid, dev:ino) of one lock line ('1: POSIX  ADVISORY  WRITE 42 00:2f:1234 0 EOF'), or None.

    Waiters ('1: -> POSIX ...') hold nothing and are skipped.
    """
    fields = text.split()
    if len(fields) < 6 or fields[1] == "->":
        return None
    return fields[1], fields[3], fields[4], fields[5]


def _fd_locks(proc: str, pid: int) -> tuple[list[FileLock], set[str]]:
    """The locks each fd of `pid` holds, from its fdinfo, and the dev:ino of every file it has open by an fd."""
    locks: list[FileLock] = []
    inodes: set[str] = set()
    try:
        fds = os.listdir(f"{proc}/{pid}/fdinfo")
    except OSError:
        return locks, inodes
    for fd in sorted(fds, key=lambda name: int(name) if name.isdigit() else -1):
        info = _read(f"{proc}/{pid}/fdinfo/{fd}")
        if not info or "lock:" not in info:
            continue
        try:
            target = os.readlink(f"{proc}/{pid}/fd/{fd}")
        except OSError:
            target = f"fd {fd}"
        for line in info.splitlines():
            if line.startswith("lock:"):
                fields = _lock_fields(line.removeprefix("lock:"))
                if fields is not None:
                    locks.append(FileLock(fields[0], fields[1], pid, target, fields[3]))
                    inodes.add(fields[3])
    return locks, inodes


def _file_locks(pids: Iterable[int], proc: str) -> list[FileLock]:
    members = set(pids)
    found: list[FileLock] = []
    seen_inodes: set[str] = set()
    for pid in sorted(members):
        locks, inodes = _fd_locks(proc, pid)
        found += locks
        seen_inodes |= inodes
    # /proc/locks names POSIX and flock holders by PID: it also catches a lock whose fd the fdinfo scan could
    # not read (a process that exited meanwhile is no holder any more, so nothing is lost the other way).
    for line in (_read(f"{proc}/locks") or "").splitlines():
        fields = _lock_fields(line)
        if fields is None or not fields[2].lstrip("-").isdigit() or int(fields[2]) not in members:
            continue
        if fields[3] not in seen_inodes:
            found.append(FileLock(fields[0], fields[1], int(fields[2]), f"inode {fields[3]}", fields[3]))
            seen_inodes.add(fields[3])
    unique: dict[tuple[str, str, str, int], FileLock] = {}
    for lock in found:
        unique.setdefault(lock.key, lock)
    return list(unique.values())


def _needs_link_remap(target: str, stat_path: str) -> bool:
    if not target.startswith("/") or target.startswith(_INTERNAL):
        return False  # pipes, sockets, anon inodes; shared memory
    if _NFS_SILLY_RENAME.search(target.removesuffix(_DELETED)):
        return True
    if not target.endswith(_DELETED):
        return False
    try:
        return os.stat(stat_path).st_nlink > 0  # no link left: a ghost file, which CRIU copies itself
    except OSError:
        return False


def _link_remaps(pids: Iterable[int], proc: str) -> list[str]:
    found: list[str] = []
    for pid in sorted(set(pids)):
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{proc}/{pid}/fd/{fd}")
            except OSError:
                continue
            if _needs_link_remap(target, f"{proc}/{pid}/fd/{fd}"):
                found.append(target.removesuffix(_DELETED))
        # Mapped files go through the same path in CRIU (a deleted library or data file still linked elsewhere).
        for line in (_read(f"{proc}/{pid}/maps") or "").splitlines():
            fields = line.split(None, 5)
            if (len(fields) == 6 and fields[5].endswith(_DELETED)
                    and _needs_link_remap(fields[5], f"{proc}/{pid}/map_files/{fields[0]}")):
                found.append(fields[5].removesuffix(_DELETED))
    return sorted(set(found))


def inspect(pids: Iterable[int], proc: str = "/proc") -> DumpNeeds:
    """What CRIU must be told to dump the processes `pids` (the app's PID namespace, as our PIDs)."""
    members = list(pids)
    return DumpNeeds(file_locks=tuple(_file_locks(members, proc)), link_remaps=tuple(_link_remaps(members, proc)))
