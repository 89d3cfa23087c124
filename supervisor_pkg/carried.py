"""Files the app depends on outside the volume, carried inside the checkpoint.

CRIU restores memory and re-opens files by path; it does not copy the
container's filesystem. A file the app created in the container's writable
layer (/tmp, /var/lib/app) does not exist in the replacement, so the restore
fails or the app runs on a missing file. Like Podman's rootfs-diff, we pack
such files into `carried-files.tar` in the generation and unpack them before
the restore.

What is carried:
- every regular file CRIU recorded as open or mapped that lives on the
  container's root filesystem (not a volume, not a Docker bind mount such as
  /etc/hosts) and that was opened for writing or changed since the container
  started: i.e. not an untouched file of the image;
- files carried by the generation this app was restored from (their mtimes
  predate this container, but they are still not part of the image);
- everything under CKPT_STATE_PATHS on the root filesystem (with its
  directories, and the symbolic links among the carried files).
Deleted-but-open files are not here: CRIU saves their contents itself (ghost
files, up to criu.GHOST_LIMIT). Paths are carried by their real location
(CRIU records the kernel's path, symlinks resolved), so none goes through a
symbolic link: /var/run/app.pid travels as /run/app.pid where /var/run -> /run.

Putting them back: the archive comes from the shared volume, which any node or
NFS client may write, and nothing authenticates it without a signing key; yet
extract() runs as root at "/" before the app exists. So extract() trusts
nothing in it: it reads the whole archive, checks every member against the
replacement container as it is (see extract), and only then writes, through
directory descriptors opened one component at a time with O_NOFOLLOW, each
file staged under a temporary name and renamed into place. Either every member
is put back or none is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import secrets
import stat
import tarfile
from collections.abc import Collection, Iterable
from typing import BinaryIO

ARCHIVE = "carried-files.tar"

# The kernel's filesystems, and the secrets Docker and Kubernetes mount: never the app's files.
_NEVER = ("/proc", "/sys", "/dev", "/run/secrets")
# Written by the container engine for each container (bind mounts under Docker, Podman and Kubernetes,
# so mountinfo names them too): the replacement's own copy is the right one, even where an engine
# copies them into the root filesystem instead.
_ENGINE_FILES = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf")

_NAME_MAX = 255  # bytes in one path component (Linux NAME_MAX): longer fails only when written
_SYMLINK_MAX = 4095  # bytes in a symlink's target (PATH_MAX less the NUL)
_ID_MAX = 2**32 - 2  # chown(2) reads (uid_t)-1 as "leave it unchanged"
_NS_LIMIT = 2**63  # a timespec in nanoseconds is a signed 64-bit count
_COPY_CHUNK = 1 << 20
# Anything beyond the permission bits: a stored mode may carry the file type too (0o100644).
_PERMISSIONS = 0o7777
# setuid and setgid are not carried on files: a hostile archive could otherwise plant a setuid-root
# binary anywhere on the root filesystem, and no app keeps state in one. On a directory setgid only
# makes new entries inherit its group (apps rely on it for shared directories), so it stays there;
# setuid on a directory means nothing on Linux.
_FILE_MODE_MASK = _PERMISSIONS & ~(stat.S_ISUID | stat.S_ISGID)
_DIRECTORY_MODE_MASK = _PERMISSIONS & ~stat.S_ISUID
_IMPLICIT_DIRECTORY_MODE = 0o755  # what tar gives a parent the archive does not list

_MOUNTINFO_ESCAPE = re.compile(rb"\\([0-7]{3})")  # mountinfo writes space, tab, newline, \ as \ooo


class CarriedFilesRefused(ValueError):
    """The carried-files archive cannot be put back as it is; nothing was written.

    The message is one line: the member, and why it was refused.
    """


@dataclasses.dataclass(frozen=True)
class OpenFile:
    path: str
    writable: bool


def _read_mount_points() -> set[str]:
    """The mount points of this process's mount namespace; OSError if the kernel cannot say."""
    points = set()
    with open("/proc/self/mountinfo", "rb") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) > 4:
                raw = _MOUNTINFO_ESCAPE.sub(lambda match: bytes([int(match[1], 8)]), fields[4])
                points.add(os.fsdecode(raw))
    return points


def mount_points() -> set[str]:
    try:
        return _read_mount_points()
    except OSError:
        return set()


def _under(path: str, prefixes: Iterable[str]) -> str | None:
    """The first of `prefixes` that `path` is or lies beneath, whole components only ("/a" is not under "/ab")."""
    for prefix in prefixes:
        bare = prefix.rstrip("/")
        if path == bare or path.startswith(bare + "/"):
            return prefix
    return None


def _mount_at_or_above(path: str, mounts: Collection[str]) -> str | None:
    """The mount point other than "/" that `path` is, or lies beneath."""
    current = path.rstrip("/")
    while current:
        if current in mounts:
            return current
        current = current.rpartition("/")[0]
    return None


def _canonical(path: str) -> str:
    """`path` with its directories' symlinks resolved, its last component kept (an lstat still sees a link)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def select(
    open_files: Iterable[OpenFile],
    state_paths: Iterable[str],
    previously_carried: Iterable[str],
    exclude: Iterable[str],
    since: float,
) -> list[str]:
    """The sorted, de-duplicated list of files to carry, by their real paths.

    Only files extract() will put back: on the root filesystem, not at or under a mount point,
    not in the places that are never written, and not reached through a symlinked directory
    (a path through one would be refused at the restore, failing the whole archive).
    """
    root_device = os.stat("/").st_dev
    mounts = mount_points()
    never = (*exclude, *_NEVER, *_ENGINE_FILES)
    chosen: set[str] = set()

    def eligible(path: str) -> tuple[str, os.stat_result] | None:
        if not path.startswith("/"):
            return None
        canonical = _canonical(path)
        if _under(canonical, never) or _mount_at_or_above(canonical, mounts):
            return None
        try:
            info = os.lstat(canonical)
        except OSError:
            return None  # deleted since: CRIU keeps it as a ghost file
        if not stat.S_ISREG(info.st_mode) or info.st_dev != root_device:
            return None
        return canonical, info

    for item in open_files:
        found = eligible(item.path)
        if found is not None and (item.writable or max(found[1].st_mtime, found[1].st_ctime) >= since):
            chosen.add(found[0])
    for path in previously_carried:
        found = eligible(path)
        if found is not None:
            chosen.add(found[0])
    for root in state_paths:
        candidates = [root] if not os.path.isdir(root) else []
        for directory, _subdirs, files in os.walk(root):
            candidates.extend(os.path.join(directory, name) for name in files)
        for path in candidates:
            found = eligible(path)
            if found is not None:
                chosen.add(found[0])
    return sorted(chosen)


# --- the archive --------------------------------------------------------------------------------------------
def _ancestors(name: str) -> list[str]:
    """The directories above a relative name, shallowest first: 'a/b/c' -> ['a', 'a/b']."""
    parts = name.split("/")
    return ["/".join(parts[:end]) for end in range(1, len(parts))]


def _link_destination(name: str, linkname: str, directories: Collection[str]) -> str | None:
    """The relative name symlink `name` -> `linkname` reaches, or None where that is not decided by the archive.

    Resolved the way the kernel would, provided every component walked through (other than the
    last) is one of `directories`, which are real directories: then '..' means the parent
    lexically, and no other symlink can redirect the walk.
    """
    stack = [] if linkname.startswith("/") else name.split("/")[:-1]
    parts = [part for part in linkname.split("/") if part not in ("", ".")]
    for index, part in enumerate(parts):
        if part == "..":
            if stack:
                stack.pop()
            continue  # "/.." is "/"
        stack.append(part)
        if index < len(parts) - 1 and "/".join(stack) not in directories:
            return None
    return "/".join(stack) or None


def archive(paths: list[str], state_paths: Iterable[str], destination: str) -> None:
    """Write `paths`, their directories and the symlinks among them into a tar at `destination`.

    Every directory above a carried file is recorded with its owner, mode and mtime, and so is
    every directory under a state path (an app's empty directories matter to it, e.g. MariaDB's
    per-database ones): extract() creates those the replacement does not have, and leaves the
    image's own alone. Symbolic links (in `paths`, or under a state path) are recorded as links
    when they reach another carried file or directory; others are left out, as extract() would
    refuse them. Two paths of one inode become a tar hard link (tarfile does that itself).
    Members are stored with their full mode, numeric owner and mtime.
    """
    files: dict[str, None] = {}  # ordered, de-duplicated
    links: set[str] = set()
    directories: set[str] = set()
    for path in paths:
        canonical = _canonical(path)
        mode = os.lstat(canonical).st_mode
        if stat.S_ISREG(mode):
            files[canonical] = None
        elif stat.S_ISLNK(mode):
            links.add(canonical)
    for root in state_paths:
        top = os.path.realpath(root)
        if not os.path.isdir(top):
            continue
        device = os.lstat(top).st_dev
        for directory, subdirs, names in os.walk(top):
            directories.add(directory)
            for name in [*subdirs, *names]:
                if os.path.islink(os.path.join(directory, name)):
                    links.add(os.path.join(directory, name))
            # Like find -xdev: a volume mounted inside a state path is not the writable layer.
            subdirs[:] = [name for name in subdirs if os.lstat(os.path.join(directory, name)).st_dev == device]
    for path in [*files, *links, *directories]:
        directories.update("/" + ancestor for ancestor in _ancestors(path.lstrip("/")))

    known_directories = {path.lstrip("/") for path in directories}
    reachable = known_directories | {path.lstrip("/") for path in files}
    kept: set[str] = set()
    pending = {link: os.readlink(link) for link in links}
    while True:  # a link may reach another link: keep going until no more are decided
        decided = {
            link for link, target in pending.items()
            if _link_destination(link.lstrip("/"), target, known_directories) in reachable
        }
        if not decided:
            break
        kept |= decided
        reachable |= {link.lstrip("/") for link in decided}
        pending = {link: target for link, target in pending.items() if link not in decided}

    with tarfile.open(destination, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(directories - {"/"}):  # a parent sorts before its children
            tar.add(path, arcname=path.lstrip("/"), recursive=False)
        for path in files:
            tar.add(path, arcname=path.lstrip("/"), recursive=False)
        for path in sorted(kept):
            tar.add(path, arcname=path.lstrip("/"), recursive=False)


def members(source: str) -> list[str]:
    """The carried files in an archive (regular files and hard links to them), as absolute paths."""
    with tarfile.open(source) as tar:
        return ["/" + member.name for member in tar.getmembers() if member.isfile() or member.islnk()]


# --- putting them back -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Member:
    """One validated entry: what to write at `name` (relative to the root), with which attributes."""

    name: str
    kind: str  # "file", "hardlink", "symlink", "directory"
    info: tarfile.TarInfo | None  # None: a parent the archive does not list (written before they were)
    mode: int
    uid: int
    gid: int
    mtime_ns: int | None
    target: str = ""  # a hard link: the member it shares an inode with; a symlink: its text
    exists: bool = False  # replaces an existing file or symlink; a directory: the image's, left alone


_KIND_NAMES = {"file": "file", "hardlink": "hard link", "symlink": "symbolic link", "directory": "directory"}


def _refused(name: str, reason: str) -> CarriedFilesRefused:
    return CarriedFilesRefused(f"member {name!r}: {reason}")


def _name_problem(name: str) -> str | None:
    """Why `name` is not a normal relative path to write beneath the root, or None."""
    if "\x00" in name:
        return "its name has a NUL byte"
    if name in ("", ".", "/"):
        return "it names the root directory"
    if name.startswith("/"):
        return "its name is absolute"
    components = name.split("/")
    if ".." in components:
        return "its name has a '..' component"
    if "" in components or "." in components:
        return "its name is not in normal form (an empty or '.' component)"
    try:
        if any(len(os.fsencode(component)) > _NAME_MAX for component in components):
            return f"a component of its name is longer than {_NAME_MAX} bytes"
    except UnicodeError:
        return "its name cannot be encoded as a file name"
    return None


def _kind(name: str, info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.isdir():
        return "directory"
    if info.isreg():
        if info.sparse is not None or info.type == tarfile.GNUTYPE_SPARSE:
            raise _refused(name, "it is a sparse file, which carried.archive never writes")
        return "file"
    described = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}
    raise _refused(name, f"it is {described.get(info.type, f'of tar type {info.type!r}')}: only regular files, "
                         "directories and links among the carried files are put back")


def _mtime_ns(mtime: float) -> int | None:
    """A tar mtime (an int, or a float from a PAX header) in nanoseconds; None if no timespec can hold it."""
    if not math.isfinite(mtime):
        return None
    nanoseconds = round(mtime * 1_000_000_000)
    return nanoseconds if -_NS_LIMIT < nanoseconds < _NS_LIMIT else None


def _read_members(tar: tarfile.TarFile, archive_size: int, max_bytes: int | None) -> dict[str, _Member]:
    """Every member, named, typed and sized as extract() accepts them, in archive order."""
    found: dict[str, _Member] = {}
    total = 0
    for info in tar:
        name = info.name.rstrip("/") if info.isdir() else info.name
        problem = _name_problem(name)
        if problem:
            raise _refused(name, problem)
        kind = _kind(name, info)
        if kind == "file":
            if info.size < 0 or info.offset_data + info.size > archive_size:
                raise _refused(name, f"its {info.size} bytes of data run past the end of the archive (truncated?)")
            total += info.size
            if max_bytes is not None and total > max_bytes:
                raise _refused(name, f"the carried files add up to more than the {max_bytes} bytes expected")
        if not (0 <= info.uid <= _ID_MAX and 0 <= info.gid <= _ID_MAX):
            raise _refused(name, f"its owner {info.uid}:{info.gid} is not a valid uid:gid")
        mtime_ns = _mtime_ns(info.mtime)
        if mtime_ns is None:
            raise _refused(name, f"its mtime {info.mtime!r} is not a valid time")
        mode = info.mode & (_DIRECTORY_MODE_MASK if kind == "directory" else _FILE_MODE_MASK)
        member = _Member(name, kind, info, mode, info.uid, info.gid, mtime_ns, target=info.linkname)
        if name in found and not (kind == "directory" and found[name].kind == "directory"):
            raise _refused(name, "it appears twice in the archive")
        found[name] = member  # a directory listed twice: the last one counts, as with tar
    return found


def _check_links(found: dict[str, _Member]) -> None:
    """Parents are directories, and links stay among the members."""
    directories = {name for name, member in found.items() if member.kind == "directory"}
    for name in found:
        for ancestor in _ancestors(name):
            if ancestor in found and found[ancestor].kind != "directory":
                raise _refused(name, f"{ancestor!r} is a {found[ancestor].kind} in this archive, not a directory: "
                                     "carried files are never written through links")
            directories.add(ancestor)
    for name, member in found.items():
        if member.kind == "hardlink":
            target = found.get(member.target)
            if _name_problem(member.target) or target is None or target.kind != "file":
                raise _refused(name, f"it is a hard link to {member.target!r}, which is not a carried regular file")
        elif member.kind == "symlink":
            if not member.target or "\x00" in member.target or len(os.fsencode(member.target)) > _SYMLINK_MAX:
                raise _refused(name, "its symbolic link target is empty, too long, or has a NUL byte")
            if _link_destination(name, member.target, directories) not in found:
                raise _refused(name, f"it is a symbolic link to {member.target!r}, which is not one of the carried "
                                     "files")


def _describe(mode: int) -> str:
    for test, description in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"),
                              (stat.S_ISREG, "regular file"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return description
    return "device"


class _Filesystem:
    """What is at a name beneath the root now (lstat, cached): validation's only view of the container."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.device = os.stat(root).st_dev
        self._seen: dict[str, os.stat_result | None] = {}

    def lstat(self, name: str) -> os.stat_result | None:
        if name not in self._seen:
            try:
                self._seen[name] = os.lstat(os.path.join(self.root, name))
            except FileNotFoundError:
                self._seen[name] = None
            except OSError as error:
                raise _refused(name, f"cannot look at /{name}: {error.strerror}") from error
        return self._seen[name]


def _check_place(member: _Member, here: _Filesystem, forbidden: dict[str, str], mounts: Collection[str]) -> None:
    """`member` may be written (or, an existing directory, left alone) at its name in this container."""
    name, path = member.name, "/" + member.name
    prefix = _under(path, forbidden)
    if prefix is not None:
        where = f"is {forbidden[prefix]}" if path == prefix else f"is under {prefix}, {forbidden[prefix]}"
        raise _refused(name, f"{path} {where}: carried files never write there")
    missing = False
    for ancestor in _ancestors(name):  # shallowest first, so no lstat below goes through a symlink
        info = here.lstat(ancestor)
        if info is None:
            missing = True  # and so is everything below it: created by this extraction
            break
        if not stat.S_ISDIR(info.st_mode):
            raise _refused(name, f"/{ancestor} is a {_describe(info.st_mode)} in this container, not a directory: "
                                 "carried files are never written through links")
    current = None if missing else here.lstat(name)
    if member.kind == "directory" and current is not None and stat.S_ISDIR(current.st_mode):
        member.exists = True  # the image's (or an earlier extraction's): owner, mode and mtime stay as they are
        return
    mount = _mount_at_or_above(path, mounts)
    if mount is not None:
        raise _refused(name, f"{mount} is a mount point in this container: carried files are only written to its "
                             "root filesystem")
    for ancestor in _ancestors(name):
        info = here.lstat(ancestor)
        if info is None:
            break
        if info.st_dev != here.device:
            raise _refused(name, f"/{ancestor} is on another filesystem than the container's root")
    if current is None:
        return
    if member.kind == "directory":
        raise _refused(name, f"{path} is a {_describe(current.st_mode)} in this container, where the archive has "
                             "a directory")
    if not (stat.S_ISREG(current.st_mode) or (member.kind == "symlink" and stat.S_ISLNK(current.st_mode))):
        replaces = "a regular file or symbolic link" if member.kind == "symlink" else "a regular file"
        raise _refused(name, f"{path} is a {_describe(current.st_mode)} in this container: a carried "
                             f"{_KIND_NAMES[member.kind]} only replaces {replaces}")
    if current.st_dev != here.device:
        raise _refused(name, f"{path} is on another filesystem than the container's root")
    member.exists = True


def _plan(found: dict[str, _Member], here: _Filesystem) -> list[_Member]:
    """Directories to create (shallowest first, with the parents the archive does not list), then the rest."""
    created: dict[str, _Member] = {}

    def owner_of(name: str) -> tuple[int, int]:
        planned = created.get(name) or found.get(name)
        if planned is not None and not planned.exists:
            return planned.uid, planned.gid
        info = here.lstat(name)
        assert info is not None  # parents are planned or exist: ancestors are walked shallowest first
        return info.st_uid, info.st_gid

    for member in found.values():
        if member.kind == "directory" and member.exists:
            continue
        for ancestor in _ancestors(member.name):
            if ancestor in created or ancestor in found or here.lstat(ancestor) is not None:
                continue
            # Archives written before archive() listed every parent: owned like the directory above
            # it, so an app that made it can still write in it.
            uid, gid = owner_of(ancestor.rpartition("/")[0])
            created[ancestor] = _Member(ancestor, "directory", None, _IMPLICIT_DIRECTORY_MODE, uid, gid, None)
    directories = [*created.values(), *(m for m in found.values() if m.kind == "directory" and not m.exists)]
    directories.sort(key=lambda member: member.name.count("/"))
    order = {"file": 0, "hardlink": 1, "symlink": 2}  # a hard link needs its file staged first
    others = sorted((m for m in found.values() if m.kind != "directory"), key=lambda member: order[member.kind])
    return [*directories, *others]


class _Directories:
    """Directory descriptors beneath the root, opened one component at a time, never through a symlink."""

    def __init__(self, root: str, device: int) -> None:
        self.device = device
        self.fds = {"": os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)}
        self.created: list[str] = []  # by this extraction, shallowest first
        self.times: dict[str, tuple[int, int]] = {}  # directories that existed and get new entries: atime, mtime

    def open(self, name: str) -> int:
        if name not in self.fds:
            parent, _, base = name.rpartition("/")
            parent_fd = self.open(parent)
            # O_NOFOLLOW: ELOOP rather than following a symlink planted since the check.
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            self.fds[name] = fd
            if os.fstat(fd).st_dev != self.device:
                raise OSError(f"/{name} is on another filesystem than the container's root")
        return self.fds[name]

    def entering(self, name: str) -> int:
        """Directory `name`, about to get a new entry: one that existed keeps its mtime (put back at the end)."""
        fd = self.open(name)
        if name not in self.times and name not in self.created:
            info = os.fstat(fd)
            self.times[name] = (info.st_atime_ns, info.st_mtime_ns)
        return fd

    def put_back_times(self) -> None:
        for name, times in self.times.items():
            os.utime(self.open(name), ns=times)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


@dataclasses.dataclass
class _Staged:
    parent_fd: int
    temporary: str
    member: _Member
    renamed: bool = False


def _temporary_name() -> str:
    return f".carried-{secrets.token_hex(8)}.tmp"  # short: fits NAME_MAX whatever the final name's length


def _write(tar: tarfile.TarFile, plan: list[_Member], root: str, device: int) -> None:
    """Create the directories, stage every file under a temporary name, then rename them all into place.

    A failure before the renames removes everything staged and created. The renames come last,
    after every check and every byte is written, and fail only if the filesystem does.
    """
    directories = _Directories(root, device)
    staged: dict[str, _Staged] = {}
    current = ""
    try:
        for member in plan:
            current = member.name
            parent, _, base = member.name.rpartition("/")
            parent_fd = directories.entering(parent)
            if member.kind == "directory":
                os.mkdir(base, 0o700, dir_fd=parent_fd)  # its mode once it is complete, below
                directories.created.append(member.name)
                os.fchown(directories.open(member.name), member.uid, member.gid)
                continue
            entry = staged[member.name] = _Staged(parent_fd, _temporary_name(), member)
            if member.kind == "file":
                _stage_file(tar, member, entry)
            elif member.kind == "hardlink":
                source = staged[member.target]
                os.link(source.temporary, entry.temporary, src_dir_fd=source.parent_fd, dst_dir_fd=parent_fd,
                        follow_symlinks=False)
            else:
                assert member.mtime_ns is not None
                os.symlink(member.target, entry.temporary, dir_fd=parent_fd)
                os.chown(entry.temporary, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
                os.utime(entry.temporary, ns=(member.mtime_ns, member.mtime_ns), dir_fd=parent_fd,
                         follow_symlinks=False)
        for member in plan:
            if member.kind == "directory":
                current = member.name
                os.fchmod(directories.open(member.name), member.mode)
        for entry in staged.values():
            current = entry.member.name
            # rename(2) replaces whatever is at the final name, a symlink too, and never writes through it.
            os.rename(entry.temporary, entry.member.name.rpartition("/")[2], src_dir_fd=entry.parent_fd,
                      dst_dir_fd=entry.parent_fd)
            entry.renamed = True
        for member in plan:
            if member.kind == "directory" and member.mtime_ns is not None:
                current = member.name
                os.utime(directories.open(member.name), ns=(member.mtime_ns, member.mtime_ns))
        directories.put_back_times()
    except (OSError, tarfile.TarError) as error:
        lost = _undo(directories, list(staged.values()))
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        outcome = "nothing was put back" if not lost else f"{lost} file(s) of the image were already replaced"
        raise _refused(current, f"cannot write it: {reason}; {outcome}") from error
    finally:
        directories.close()


def _stage_file(tar: tarfile.TarFile, member: _Member, entry: _Staged) -> None:
    """Write a regular file's data and attributes under its temporary name."""
    assert member.info is not None and member.mtime_ns is not None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(entry.temporary, flags, 0o600, dir_fd=entry.parent_fd), "wb") as out:
        data = tar.extractfile(member.info)
        assert data is not None  # a regular file
        while chunk := data.read(_COPY_CHUNK):
            out.write(chunk)
        out.flush()
        fd = out.fileno()
        if os.fstat(fd).st_size != member.info.size:
            raise tarfile.ReadError(f"the archive holds {os.fstat(fd).st_size} of its {member.info.size} bytes")
        # Owner first: chown(2) clears setuid/setgid, and the mode set after it is the one that counts.
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode)
        os.utime(fd, ns=(member.mtime_ns, member.mtime_ns))


def _undo(directories: _Directories, staged: list[_Staged]) -> int:
    """Remove what a failed extraction wrote; the number of image files already replaced (not undone)."""
    lost = 0
    for entry in staged:
        if entry.renamed and entry.member.exists:
            lost += 1  # rename(2) dropped the image's file: nothing left to bring back
            continue
        with contextlib.suppress(OSError):  # ENOENT: the failure came before it was created
            os.unlink(entry.member.name.rpartition("/")[2] if entry.renamed else entry.temporary,
                      dir_fd=entry.parent_fd)
    for name in reversed(directories.created):
        parent, _, base = name.rpartition("/")
        with contextlib.suppress(OSError):
            os.rmdir(base, dir_fd=directories.open(parent))
    with contextlib.suppress(OSError):
        directories.put_back_times()
    return lost


def _open_archive(handle: BinaryIO, source: str) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=handle, mode="r:")  # archive() never compresses: no decompression bomb
    except tarfile.TarError as error:
        raise CarriedFilesRefused(f"{source} is not a readable tar archive: {error}") from error


def _mounts_beneath(root: str) -> set[str]:
    """The kernel's mount points, as paths inside `root`: fails closed if it cannot tell."""
    try:
        points = _read_mount_points()
    except OSError as error:
        raise CarriedFilesRefused(f"cannot read /proc/self/mountinfo to tell this container's mount points: "
                                  f"{error.strerror}") from error
    if root == "/":
        return points
    base = os.path.realpath(root)
    return {"/" + point[len(base):].lstrip("/") for point in points if point == base or point.startswith(base + "/")}


def extract(
    source: str,
    exclude: Iterable[str] = (),
    *,
    max_bytes: int | None = None,
    root: str = "/",
    mounts: set[str] | None = None,
) -> list[str]:
    """Put the carried files back where they came from, or refuse the whole archive. Returns the files restored.

    The archive is untrusted (see the module's docstring). Read whole first; refused, with
    nothing written, unless every member is:
    - a regular file, a directory, or a hard or symbolic link to another member (resolved
      through the archive's own directories only), at a normal relative name;
    - together with the others, no more than `max_bytes` of data (the caller knows the
      archive's size from the manifest);
    - outside /proc, /sys, /dev, /run/secrets, the engine's /etc/hosts, /etc/hostname and
      /etc/resolv.conf, and the `exclude` prefixes (the checkpoint volume);
    - below real directories only (lstat: a symlink in a parent is refused), on the root
      filesystem, not at or under a mount point;
    - a directory the container does not have yet (one it has keeps its owner, mode and
      mtime), or replacing only a regular file (a symlink by a symlink).
    Files keep their mode (group and other write bits too: CRIU refuses a file whose mode
    differs, "bad mode 0100640 (expect 0100660)"), numeric owner and mtime; not setuid/setgid.

    `root` and `mounts` are for tests only: the container's root directory (names, devices and
    mount points are judged beneath it) and its mount points as paths inside it (by default
    read from /proc/self/mountinfo).
    """
    forbidden = {prefix: "the kernel's" for prefix in _NEVER}
    forbidden["/run/secrets"] = "the engine's secrets"
    forbidden.update({prefix: "the container engine's own file" for prefix in _ENGINE_FILES})
    forbidden.update({("/" + prefix.strip("/")).rstrip("/") or "/": "the checkpoint volume" for prefix in exclude})
    if mounts is None:
        mounts = _mounts_beneath(root)
    mounts = {point.rstrip("/") for point in mounts} - {""}
    here = _Filesystem(root)
    with open(source, "rb") as handle, _open_archive(handle, source) as tar:
        try:
            found = _read_members(tar, os.fstat(handle.fileno()).st_size, max_bytes)
        except tarfile.TarError as error:
            raise CarriedFilesRefused(f"{source} is not a readable tar archive: {error}") from error
        _check_links(found)
        for member in found.values():
            _check_place(member, here, forbidden, mounts)
        # Every file is staged before any is renamed into place: the data must fit alongside what it replaces.
        needed = sum(member.info.size for member in found.values() if member.info is not None and member.kind == "file")
        space = os.statvfs(root)
        if needed > space.f_bavail * space.f_frsize:
            raise CarriedFilesRefused(f"the carried files need {needed} bytes, the container's root filesystem has "
                                      f"{space.f_bavail * space.f_frsize} free; nothing was put back")
        _write(tar, _plan(found, here), root, here.device)
    return ["/" + name for name, member in found.items() if member.kind in ("file", "hardlink")]
