"""The container's writable layer, carried inside the checkpoint.

CRIU restores memory and re-opens files by path; it does not copy the
container's filesystem. What the app created, changed or deleted in the
container's writable layer is not in the replacement (same image, a fresh
layer): the restore fails, or the app runs on missing or stale files. Like
Podman's rootfs diff, the layer travels as `carried-files.tar` in the
generation and is put back before the restore (docs/writable-layer.md).

What is carried:
- the whole writable layer, as a walk tells it (LayerRecorder): every file,
  directory, symbolic link and FIFO of the root filesystem created or changed
  since the container started, and every deletion. The tree as the image made
  it is recorded in the background once the app runs; at each dump, while the
  app is frozen, it is walked again and compared (inode, type, mode, owner,
  size, mtime, ctime; any ctime since the container started is a change). A
  path of the image that is gone, or is now of another type, is a deletion
  (only the image's paths: a fresh replacement has no other);
- what the generation this app was restored from carried and deleted: this
  container put it back itself, so it is part of its start-time tree, yet not
  of the image (extract() remembers which of its paths the image had);
- every regular file CRIU recorded as open or mapped that was opened for
  writing or changed (all that was carried before the layer was, and all a
  container without a recorder carries), and everything under CKPT_STATE_PATHS.
Never carried: other filesystems and mount points (volumes, the engine's
/etc/hosts...), /proc, /sys, /dev, /run/secrets, the engine's per-container
files, what the supervisor and CRIU write for themselves, the checkpoint volume
and CKPT_CARRY_EXCLUDE; nor sockets (CRIU binds the app's again) or device
nodes. Deleted-but-open files travel as CRIU ghost files (up to
criu.GHOST_LIMIT). Paths are carried by their real location (symlinks
resolved), so none goes through a symbolic link.

The archive is a PAX tar: numeric owners, modes, mtime and atime to the
nanosecond, hard links as tar hard links, sparse files in GNU's sparse format
1.0 (their data only: holes come back as holes), and each deletion as a member
of tar type 'W' (POSIX leaves the types 'A'-'Z' to vendors).

Putting them back: the archive comes from the shared volume, which any node or
NFS client may write, and nothing authenticates it without a signing key; yet
extract() runs as root at "/" before the app exists. So extract() trusts
nothing in it: it reads the whole archive, checks every member and every
deletion against the replacement container as it is (see extract), and only
then writes, through directory descriptors opened one component at a time with
O_NOFOLLOW, each entry staged under a temporary name and renamed into place.
Nothing is changed unless everything was checked and staged; after that only a
failing filesystem can stop it halfway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import math
import os
import re
import secrets
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Collection, Iterable
from typing import BinaryIO

from supervisor_pkg import bundle

log = logging.getLogger("criu-supervisor")

ARCHIVE = "carried-files.tar"
WHITEOUT = b"W"  # the tar type of a deletion (a vendor type: POSIX leaves 'A'-'Z' to vendors)

# The kernel's filesystems, and the secrets Docker and Kubernetes mount: never the app's files.
_NEVER = ("/proc", "/sys", "/dev", "/run/secrets")
# Written by the container engine for each container (bind mounts under Docker, Podman and Kubernetes,
# so mountinfo names them too; /.dockerenv and /run/.containerenv are written into the root filesystem
# when the container is made): the replacement's own copy is the right one.
_ENGINE_FILES = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv", "/.dockerenv")
# What the supervisor and CRIU write in the container for themselves: restore.LAZY_WORK_ROOT,
# control.DEFAULT_SOCKET, compression.LOCAL_ROOT, and CRIU's cache of kernel facts (criu.kdat).
# CRIU's mount-namespace yards, /tmp/.criu.mntns.*, are skipped by name (_CRIU_YARDS).
# (and the drop-in bundle wherever it is: carried files must never reach the supervisor's own code)
_SUPERVISOR_FILES = ("/run/criu-supervisor", "/run/criu-supervisor.sock", "/var/lib/criu-supervisor",
                     "/run/criu.kdat", "/run/criu.kdat.tmp",
                     *sorted({bundle.DEFAULT_ROOT, bundle.root() or bundle.DEFAULT_ROOT}))
_CRIU_YARDS = ("/tmp", ".criu.")  # (directory, name prefix)

_NAME_MAX = 255  # bytes in one path component (Linux NAME_MAX): longer fails only when written
_SYMLINK_MAX = 4095  # bytes in a symlink's target (PATH_MAX less the NUL)
_ID_MAX = 2**32 - 2  # chown(2) reads (uid_t)-1 as "leave it unchanged"
_NS_LIMIT = 2**63  # a timespec in nanoseconds is a signed 64-bit count
_COPY_CHUNK = 1 << 20
# Python's tarfile writes a PAX "size" for members of 8 GiB or more, and then reads a GNU 1.0 sparse
# member back at the wrong offset: such files are stored whole (holes as zeros) instead.
_SPARSE_STORED_LIMIT = 8**11
_TAR_BLOCK = 512
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
_PAX_TIME = re.compile(r"(-?)([0-9]{1,19})(?:\.([0-9]*))?", re.ASCII)  # seconds, with an optional fraction


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


def _beneath(path: str, prefixes: Iterable[str]) -> str | None:
    """The first of `prefixes` that lies strictly beneath `path`."""
    top = path.rstrip("/") + "/"
    return next((prefix for prefix in prefixes if prefix.startswith(top) and prefix.rstrip("/") + "/" != top), None)


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
    never = (*exclude, *_NEVER, *_ENGINE_FILES, *_SUPERVISOR_FILES)
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


# --- the writable layer: what changed since the container started -------------------------------------------
# The kinds of entry the layer carries, as the low bits of a signature; sockets and devices are not carried.
_KINDS = {stat.S_IFDIR: 1, stat.S_IFREG: 2, stat.S_IFLNK: 3, stat.S_IFIFO: 4}
_KIND_BITS = 3
_DIRECTORY = 1
_REGULAR = 2
# How long a checkpoint waits for the baseline walk to end (a stop signal right after the start, on a
# big image): after that it carries what ctime says changed, and cannot tell the deletions.
_BASELINE_WAIT = 5.0
# Reading ahead costs an open and a close per file (about 10 us): beyond this many, it would cost more
# time before the dump than it can save during it.
_READ_AHEAD_FILES = 10_000


@dataclasses.dataclass(frozen=True)
class Layer:
    """What one generation's archive carried: every entry, and every deletion (absolute paths).

    `image`: which of the entries the image has too (they were there before the archive was put
    back), where that is known; None where it is not (an archive only read, not put back here).
    A deletion matters only for a path of the image: a fresh replacement has no other.
    """

    entries: frozenset[str] = frozenset()
    deleted: frozenset[str] = frozenset()
    image: frozenset[str] | None = frozenset()


@dataclasses.dataclass(frozen=True)
class LayerChanges:
    """The writable layer at a dump: what to carry and what to delete, as archive() takes them."""

    paths: list[str]  # created or changed (and those the previous generation carried), sorted
    deleted: list[str]  # sorted, none beneath another
    walked: int  # entries walked
    seconds: float  # the walk and the comparison, while the app was frozen


def _signature(info: os.stat_result, kind: int) -> int:
    """An entry's inode and attributes as one number (compact: a big image has 10^5 entries), its kind below."""
    attributes = (info.st_ino, info.st_mode, info.st_uid, info.st_gid, info.st_size, info.st_mtime_ns,
                  info.st_ctime_ns)
    return (hash(attributes) << _KIND_BITS) | kind


def _walk(top: str, skipped: Collection[str], since_ns: int | None = None) -> tuple[dict[str, int], set[str]]:
    """Every directory, file, symlink and FIFO beneath `top` on its filesystem, by real path: their
    signatures, and those whose ctime is `since_ns` or later.

    Like `find -xdev`: nothing on another filesystem, nothing at or beneath a path in `skipped`
    (mount points of the same filesystem are given there), no symlink followed. An entry that
    vanishes while the walk runs is left out (the app is not frozen during the baseline walk).
    """
    device = os.lstat(top).st_dev
    tree: dict[str, int] = {}
    recent: set[str] = set()
    pending = [top]
    yards_directory, yards_prefix = _CRIU_YARDS
    kinds = _KINDS
    while pending:
        directory = pending.pop()
        try:
            scanner = os.scandir(directory)
        except OSError:
            continue  # gone or no longer a directory since it was listed
        in_yards = directory == yards_directory
        with scanner:
            for entry in scanner:
                path = entry.path
                if path in skipped or (in_yards and entry.name.startswith(yards_prefix)):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                kind = kinds.get(stat.S_IFMT(info.st_mode))
                if kind is None or info.st_dev != device:
                    continue
                tree[path] = _signature(info, kind)
                if since_ns is not None and info.st_ctime_ns >= since_ns:
                    recent.add(path)
                if kind == _DIRECTORY:
                    pending.append(path)
    return tree, recent


def _compact(deleted: Iterable[str], protected: Collection[str]) -> list[str]:
    """Deletions, none beneath another (a deleted directory goes whole), none holding a protected path.

    A deleted directory that holds a protected path (the volume, an excluded path) is not deleted
    whole: the deletions beneath it stand for themselves, and the protected path stays.
    """
    kept: set[str] = set()
    for path in sorted(deleted, key=lambda name: (name.count("/"), name)):
        if any("/" + ancestor in kept for ancestor in _ancestors(path.lstrip("/"))):
            continue
        if _beneath(path, protected) is None:
            kept.add(path)
    return sorted(kept)


# What extract() put back in this process, by archive: the restore and the recorder run one after the
# other in the supervisor, on the one filesystem of the container. Only extract() knows which of the
# archive's paths the fresh container, that is the image, had; an archive read again cannot tell.
_PUT_BACK: dict[str, Layer] = {}


def put_back_layer(source: str) -> Layer | None:
    """What extract(source) put back in this process: the entries, the deletions done, the image's paths."""
    return _PUT_BACK.get(source)


def read_layer(source: str) -> Layer:
    """What an archive carried and deleted (names as they are; extract() judges them, this only lists them)."""
    entries: set[str] = set()
    deleted: set[str] = set()
    with tarfile.open(source, "r:") as tar:
        for info in tar:
            name = info.name.rstrip("/") if info.isdir() else info.name
            if _name_problem(name) is None:
                (deleted if info.type == WHITEOUT else entries).add("/" + name)
    return Layer(frozenset(entries), frozenset(deleted), image=None)


class LayerRecorder:
    """The container's root filesystem as it was when the app started, to tell at each dump what changed.

    start() records it in a background thread (0.15-0.3 s and 2 MiB for the base image's 13,000
    entries). prepare() walks once more while the app still runs, so that the walk in changes(),
    while the app is frozen, finds the kernel's caches warm. A restored app's recorder is given
    its generation's archive: what that archive carried is carried again, and its deletions of the
    image's paths stay deletions (this container put it back itself, so its start-time tree has
    it; extract() told which paths the image has, see put_back_layer).
    """

    def __init__(
        self,
        exclude: Iterable[str] = (),
        previous: str | None = None,
        root: str = "/",
        mounts: Callable[[], set[str]] = mount_points,
    ) -> None:
        self.root = root.rstrip("/") or "/"
        self.exclude = tuple(path for path in exclude if path.rstrip("/"))
        self.previous_archive = previous
        self.previous = Layer()
        self._mounts = mounts
        self._baseline: dict[str, int] | None = None
        self._done = threading.Event()

    def start(self) -> LayerRecorder:
        threading.Thread(target=self._record, name="writable-layer", daemon=True).start()
        return self

    def _protected(self) -> tuple[set[str], set[str]]:
        """(the protected paths, the mount points other than the root): never carried, never deleted."""
        protected = {_canonical(path.rstrip("/")) for path in (*_NEVER, *_ENGINE_FILES, *_SUPERVISOR_FILES,
                                                                *self.exclude)}
        mounts = {point.rstrip("/") for point in self._mounts()} - {"", self.root}
        return protected, mounts

    def _record(self) -> None:
        started = time.monotonic()
        try:
            if self.previous_archive is not None:
                try:
                    previous = put_back_layer(self.previous_archive) or read_layer(self.previous_archive)
                    mine = [self.root]  # the whole of "/" in a container

                    def own(paths: frozenset[str]) -> frozenset[str]:
                        return frozenset(path for path in paths if _under(path, mine))

                    self.previous = Layer(own(previous.entries), own(previous.deleted),
                                          None if previous.image is None else own(previous.image))
                except (OSError, tarfile.TarError, ValueError) as error:
                    log.warning("cannot read what the restored checkpoint carried (%s): the files it put back are "
                                "carried again, its deletions are not, so the image's copies of them would come "
                                "back in the next replacement", error)
            protected, mounts = self._protected()
            self._baseline = _walk(self.root, protected | mounts)[0]
            log.info("recorded the image's tree for the writable-layer carry: %d entries in %.2f s",
                     len(self._baseline), time.monotonic() - started)
        except Exception as error:  # noqa: BLE001 - without a baseline the older, narrower carry still works
            log.warning("cannot record the container's filesystem (%r): checkpoints carry only the files the app "
                        "has open and CKPT_STATE_PATHS, not the whole writable layer", error)
        finally:
            self._done.set()

    def ready(self, timeout: float | None = None) -> bool:
        """Wait for the baseline walk; whether there is a baseline to compare with."""
        self._done.wait(timeout)
        return self._baseline is not None

    def prepare(self, since: float) -> None:
        """While the app runs, before the dump: walk, warming the caches, and read ahead what will be carried."""
        if not self.ready(_BASELINE_WAIT):
            if not self._done.is_set():
                log.warning("the image's tree is still being recorded (a big image, or a checkpoint right after the "
                            "start): this checkpoint carries what changed by its ctime, but no deletion")
            return
        started = time.monotonic()
        protected, mounts = self._protected()
        now, recent = _walk(self.root, protected | mounts, _nanoseconds(since))
        baseline = self._baseline or {}
        candidates = (path for path, signature in now.items() if signature & ((1 << _KIND_BITS) - 1) == _REGULAR
                      and (path in recent or baseline.get(path) != signature))
        for path in itertools.islice(candidates, _READ_AHEAD_FILES):
            _read_ahead(path)
        log.debug("walked the writable layer before the dump, while the app runs: %d entries in %.3f s", len(now),
                  time.monotonic() - started)

    def changes(self, since: float) -> LayerChanges | None:
        """What changed since `since` (the container's start) and what was deleted; None without a baseline.

        Called while the app is frozen: the walk sees the filesystem as the app's memory knows it.
        Before the baseline walk has ended, ctime alone tells what changed, and no deletion is
        found (only those the previous generation carried).
        """
        if not self.ready(_BASELINE_WAIT) and self._done.is_set():
            return None  # the baseline walk failed (logged): the caller carries what it can without
        started = time.monotonic()
        protected, mounts = self._protected()
        now, recent = _walk(self.root, protected | mounts, _nanoseconds(since))
        previous = self.previous  # read before the baseline walk starts
        baseline = self._baseline if self._baseline is not None else {path: signature for path, signature in now.items()
                                                                       if path not in recent}
        kind_mask = (1 << _KIND_BITS) - 1
        carried = sorted(path for path, signature in now.items()
                         if path in recent or baseline.get(path) != signature or path in previous.entries)

        def kept_out(path: str) -> bool:
            return _under(path, protected) is not None or _mount_at_or_above(path, mounts) is not None

        # Only a path of the image needs deleting in a fresh replacement: what the baseline saw, less what
        # the previous generation put back that the image did not have. Where that is not known (an
        # archive read, not put back here), every path the chain carried might be the image's.
        image = None if previous.image is None else previous.image | previous.deleted | (baseline.keys()
                                                                                       - previous.entries)
        # A deletion the previous generation carried stays one, even where the path was made again:
        # the image's copy must still go before the new one is put back.
        gone = {path for path in previous.deleted if not kept_out(path)}
        for path in itertools.chain(baseline, previous.entries):
            if image is not None and path not in image:
                continue  # made since the container from the image started: a replacement never has it
            signature = now.get(path)
            if signature is None:
                if not kept_out(path):
                    gone.add(path)  # deleted, or renamed away
            elif path in baseline and signature & kind_mask != baseline[path] & kind_mask:
                gone.add(path)  # a file that is a directory now, or the reverse: the image's must go first
        deleted = _compact(gone, protected | mounts)
        return LayerChanges(carried, deleted, len(now), time.monotonic() - started)


def _nanoseconds(seconds: float) -> int:
    return math.floor(seconds * 1_000_000_000)


def _read_ahead(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = _open_for_reading(path)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def _open_for_reading(path: str) -> int:
    """A regular file, opened without following a symlink, and without touching its atime where we may."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs the file's owner or CAP_FOWNER
        return os.open(path, flags)


# --- the archive --------------------------------------------------------------------------------------------
def _ancestors(name: str) -> list[str]:
    """The directories above a relative name, shallowest first: 'a/b/c' -> ['a', 'a/b']."""
    parts = name.split("/")
    return ["/".join(parts[:end]) for end in range(1, len(parts))]


def _time_text(nanoseconds: int) -> str:
    """A PAX time, exact to the nanosecond: '1600000000.123456789', '-0.000000001'."""
    seconds, fraction = divmod(abs(nanoseconds), 1_000_000_000)
    return f"{'-' if nanoseconds < 0 else ''}{seconds}.{fraction:09d}"


def _data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """(offset, length) of the data of a file with holes, per SEEK_DATA/SEEK_HOLE; None if not sparse or unknown."""
    extents: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:  # no data after offset: a hole up to the end
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end - start))
            offset = end
    except OSError:
        return None  # the filesystem cannot tell: the file is stored whole
    if extents == [(0, size)]:
        return None
    return extents


class _FileData:
    """A regular file's bytes as the archive stores them: all of them, or (sparse) GNU's 1.0 map and the data.

    GNU sparse 1.0: the member's data starts with the number of extents and each one's offset and
    length, in decimal, one per line, padded with NULs to a 512-byte block; the extents' bytes follow.
    """

    def __init__(self, fd: int, size: int, blocks: int) -> None:
        self.fd = fd
        extents = _data_extents(fd, size) if blocks * 512 < size else None
        self.sparse = extents is not None
        prefix = b""
        if extents is not None:
            if not extents or sum(extents[-1]) < size:
                extents.append((size, 0))  # a hole up to the end: GNU tar's mark of the file's size
            lines = [str(len(extents))] + [str(number) for extent in extents for number in extent]
            prefix = ("\n".join(lines) + "\n").encode()
            prefix += b"\0" * (-len(prefix) % _TAR_BLOCK)
            if len(prefix) + sum(length for _offset, length in extents) >= _SPARSE_STORED_LIMIT:
                extents, prefix, self.sparse = None, b"", False
        self.extents = extents if extents is not None else [(0, size)]
        self.prefix = prefix
        self.size = len(prefix) + sum(length for _offset, length in self.extents)
        self._prefix_read = 0
        self._extent = 0
        self._within = 0

    def read(self, size: int = -1) -> bytes:
        """Exactly `size` bytes (tarfile asks for whole buffers), fewer only at the end of the data."""
        wanted = self.size if size < 0 else size
        pieces = []
        if self._prefix_read < len(self.prefix):
            piece = self.prefix[self._prefix_read:self._prefix_read + wanted]
            self._prefix_read += len(piece)
            pieces.append(piece)
            wanted -= len(piece)
        while wanted > 0 and self._extent < len(self.extents):
            offset, length = self.extents[self._extent]
            if self._within >= length:
                self._extent, self._within = self._extent + 1, 0
                continue
            piece = os.pread(self.fd, min(wanted, length - self._within), offset + self._within)
            if not piece:
                break  # the file shrank since its lstat: tarfile says "unexpected end of data"
            self._within += len(piece)
            pieces.append(piece)
            wanted -= len(piece)
        return b"".join(pieces)


def _add_member(tar: tarfile.TarFile, path: str, hard_links: dict[tuple[int, int], str]) -> bool:
    """Write one entry (lstat now, not followed); whether it is a regular file (or a hard link to one)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False  # removed since it was chosen (not by the app: it is frozen)
    name = path.lstrip("/")
    member = tarfile.TarInfo(name)
    member.mode = stat.S_IMODE(info.st_mode)
    member.uid, member.gid = info.st_uid, info.st_gid
    member.uname = member.gname = ""  # owners are numbers: CRIU restores the app's credentials as numbers
    member.mtime = info.st_mtime_ns // 1_000_000_000
    member.pax_headers = {"mtime": _time_text(info.st_mtime_ns), "atime": _time_text(info.st_atime_ns)}
    if stat.S_ISDIR(info.st_mode):
        member.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(info.st_mode):
        member.type, member.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISFIFO(info.st_mode):
        member.type = tarfile.FIFOTYPE
    elif not stat.S_ISREG(info.st_mode):
        return False
    elif info.st_nlink > 1 and (info.st_dev, info.st_ino) in hard_links:
        member.type, member.linkname = tarfile.LNKTYPE, hard_links[(info.st_dev, info.st_ino)]
        tar.addfile(member)
        return True
    else:
        if info.st_nlink > 1:
            hard_links[(info.st_dev, info.st_ino)] = name
        fd = _open_for_reading(path)
        try:
            data = _FileData(fd, info.st_size, info.st_blocks)
            member.size = data.size
            if data.sparse:
                member.pax_headers.update({"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                           "GNU.sparse.name": name, "GNU.sparse.realsize": str(info.st_size)})
            tar.addfile(member, data)  # type: ignore[arg-type]  # tarfile only calls read()
        finally:
            os.close(fd)
        return True
    tar.addfile(member)
    return False


def archive(
    paths: Iterable[str], state_paths: Iterable[str], destination: str, deleted: Iterable[str] = (), root: str = "/"
) -> int:
    """Write `paths` (files, directories, symlinks, FIFOs), their directories and `deleted` into a tar at `destination`.

    Returns the number of regular files written (each name of a hard-linked file counts).

    Every directory above a carried entry (below `root`) is recorded with its owner, mode and times, and so is
    every directory under a state path (an app's empty directories matter to it, e.g. MariaDB's
    per-database ones), so that extract() makes those the replacement lacks and gives those it has
    the attributes they had here. Symbolic links are recorded as they are, wherever they point
    (extract() never follows one). Two paths of one inode become a tar hard link. Members are
    stored with their mode, numeric owner, and mtime and atime to the nanosecond; a file with
    holes is stored sparse; each of `deleted` is a whiteout member.
    """
    files: dict[str, None] = {}  # ordered, de-duplicated
    others: set[str] = set()  # symlinks and FIFOs
    directories: set[str] = set()
    for path in paths:
        canonical = _canonical(path)
        try:
            mode = os.lstat(canonical).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISREG(mode):
            files[canonical] = None
        elif stat.S_ISDIR(mode):
            directories.add(canonical)
        elif stat.S_ISLNK(mode) or stat.S_ISFIFO(mode):
            others.add(canonical)
    for root in state_paths:
        top = os.path.realpath(root)
        if not os.path.isdir(top):
            continue
        device = os.lstat(top).st_dev
        for directory, subdirs, names in os.walk(top):
            directories.add(directory)
            for name in [*subdirs, *names]:
                mode = os.lstat(os.path.join(directory, name)).st_mode
                if stat.S_ISLNK(mode) or stat.S_ISFIFO(mode):
                    others.add(os.path.join(directory, name))
            # Like find -xdev: a volume mounted inside a state path is not the writable layer.
            subdirs[:] = [name for name in subdirs if os.lstat(os.path.join(directory, name)).st_dev == device]
    top = root.rstrip("/")
    for path in [*files, *others, *directories]:
        directories.update(ancestor for ancestor in ("/" + name for name in _ancestors(path.lstrip("/")))
                           if ancestor.startswith(top + "/"))
    directories.discard("/")

    hard_links: dict[tuple[int, int], str] = {}
    written = 0
    with tarfile.TarFile(destination, "w", format=tarfile.PAX_FORMAT, copybufsize=_COPY_CHUNK) as tar:
        for path in sorted(set(deleted)):
            whiteout = tarfile.TarInfo(path.lstrip("/"))
            whiteout.type, whiteout.mode, whiteout.uname, whiteout.gname = WHITEOUT, 0, "", ""
            tar.addfile(whiteout)
        for path in [*sorted(directories), *files, *sorted(others)]:  # a parent sorts before its children
            written += _add_member(tar, path, hard_links)
    return written


def members(source: str) -> list[str]:
    """The carried files in an archive (regular files and hard links to them), as absolute paths."""
    with tarfile.open(source) as tar:
        return ["/" + member.name for member in tar.getmembers() if member.isfile() or member.islnk()]


# --- putting them back -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Member:
    """One validated entry: what to write at `name` (relative to the root), with which attributes."""

    name: str
    kind: str  # "file", "hardlink", "symlink", "fifo", "directory"
    info: tarfile.TarInfo | None  # None: a parent the archive does not list (written before they were)
    mode: int
    uid: int
    gid: int
    mtime_ns: int | None
    atime_ns: int | None = None
    target: str = ""  # a hard link: the member it shares an inode with; a symlink: its text
    exists: bool = False  # replaces an existing file or symlink; a directory: the container has it
    update: bool = False  # an existing directory that gets the archive's owner, mode and times
    sparse: list[tuple[int, int]] | None = None  # a sparse file's data extents: (offset, length)
    data_size: int = 0  # bytes of data in the archive
    replaces: bool = False  # a new directory where a deletion removes what the container has now


_KIND_NAMES = {"file": "file", "hardlink": "hard link", "symlink": "symbolic link", "directory": "directory",
               "fifo": "FIFO"}


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
    if info.type == WHITEOUT:
        return "whiteout"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.isdir():
        return "directory"
    if info.isfifo():
        return "fifo"
    if info.isreg():
        if info.sparse is not None and (
            info.type == tarfile.GNUTYPE_SPARSE
            or (info.pax_headers.get("GNU.sparse.major"), info.pax_headers.get("GNU.sparse.minor")) != ("1", "0")
        ):
            raise _refused(name, "it is a sparse file in a format carried.archive never writes (only GNU 1.0)")
        return "file"
    described = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device"}
    raise _refused(name, f"it is {described.get(info.type, f'of tar type {info.type!r}')}: only regular files, "
                         "directories, links, FIFOs and deletions are put back")


def _mtime_ns(mtime: float) -> int | None:
    """A tar mtime (an int, or a float from a PAX header) in nanoseconds; None if no timespec can hold it."""
    if not math.isfinite(mtime):
        return None
    nanoseconds = round(mtime * 1_000_000_000)
    return nanoseconds if -_NS_LIMIT < nanoseconds < _NS_LIMIT else None


def _pax_time_ns(text: str) -> int | None:
    """A PAX time ('1600000000.123456789') in nanoseconds, exactly (a float would lose them); None if invalid."""
    match = _PAX_TIME.fullmatch(text)
    if match is None:
        return None
    sign, seconds, fraction = match.groups()
    nanoseconds = int(seconds) * 1_000_000_000 + int((fraction or "")[:9].ljust(9, "0"))
    nanoseconds = -nanoseconds if sign else nanoseconds
    return nanoseconds if -_NS_LIMIT < nanoseconds < _NS_LIMIT else None


def _times(name: str, info: tarfile.TarInfo) -> tuple[int, int]:
    """(mtime, atime) in nanoseconds: exact from the PAX header where there is one; atime defaults to mtime."""
    text = info.pax_headers.get("mtime")
    mtime_ns = _mtime_ns(info.mtime) if text is None else _pax_time_ns(text)
    if mtime_ns is None:
        raise _refused(name, f"its mtime {text if text is not None else info.mtime!r} is not a valid time")
    text = info.pax_headers.get("atime")
    atime_ns = mtime_ns if text is None else _pax_time_ns(text)
    if atime_ns is None:
        raise _refused(name, f"its atime {text!r} is not a valid time")
    return mtime_ns, atime_ns


def _sparse_map(name: str, info: tarfile.TarInfo) -> list[tuple[int, int]]:
    """A sparse member's extents, checked: in order, not overlapping, within its size."""
    if not 0 <= info.size < _NS_LIMIT:
        raise _refused(name, f"its size {info.size} is not a file size")
    extents: list[tuple[int, int]] = list(info.sparse or [])  # type: ignore[arg-type]  # typeshed says bytes
    end = 0
    for offset, length in extents:
        if offset < end or length < 0 or offset + length > info.size:
            raise _refused(name, "its sparse map is out of order, overlaps, or runs past its size")
        end = offset + length
    return extents


def _read_members(
    tar: tarfile.TarFile, archive_size: int, max_bytes: int | None
) -> tuple[dict[str, _Member], list[str]]:
    """Every member, named, typed and sized as extract() accepts them, in archive order; and the deletions."""
    found: dict[str, _Member] = {}
    deletions: dict[str, None] = {}
    total = 0
    for info in tar:
        name = info.name.rstrip("/") if info.isdir() else info.name
        problem = _name_problem(name)
        if problem:
            raise _refused(name, problem)
        kind = _kind(name, info)
        if kind == "whiteout":
            if name in deletions:
                raise _refused(name, "it is deleted twice in the archive")
            deletions[name] = None
            continue
        sparse = None
        data_size = 0
        if kind == "file":
            sparse = _sparse_map(name, info) if info.sparse is not None else None
            data_size = info.size if sparse is None else sum(length for _offset, length in sparse)
            if data_size < 0 or info.offset_data + data_size > archive_size:
                raise _refused(name, f"its {data_size} bytes of data run past the end of the archive (truncated?)")
            total += data_size
            if max_bytes is not None and total > max_bytes:
                raise _refused(name, f"the carried files add up to more than the {max_bytes} bytes expected")
        if not (0 <= info.uid <= _ID_MAX and 0 <= info.gid <= _ID_MAX):
            raise _refused(name, f"its owner {info.uid}:{info.gid} is not a valid uid:gid")
        mtime_ns, atime_ns = _times(name, info)
        mode = info.mode & (_DIRECTORY_MODE_MASK if kind == "directory" else _FILE_MODE_MASK)
        member = _Member(name, kind, info, mode, info.uid, info.gid, mtime_ns, atime_ns, target=info.linkname,
                         sparse=sparse, data_size=data_size)
        if name in found and not (kind == "directory" and found[name].kind == "directory"):
            raise _refused(name, "it appears twice in the archive")
        found[name] = member  # a directory listed twice: the last one counts, as with tar
    return found, list(deletions)


def _check_links(found: dict[str, _Member]) -> None:
    """Parents are directories, hard links stay among the members, symlink targets are plain text."""
    for name in found:
        for ancestor in _ancestors(name):
            if ancestor in found and found[ancestor].kind != "directory":
                raise _refused(name, f"{ancestor!r} is a {found[ancestor].kind} in this archive, not a directory: "
                                     "carried files are never written through links")
    for name, member in found.items():
        if member.kind == "hardlink":
            target = found.get(member.target)
            if _name_problem(member.target) or target is None or target.kind != "file":
                raise _refused(name, f"it is a hard link to {member.target!r}, which is not a carried regular file")
        # A symlink is put back as the app made it, wherever it points: extract() never follows a
        # link, nor writes beneath one (a symlink is never a parent, above).
        elif member.kind == "symlink" and (
            not member.target or "\x00" in member.target or len(os.fsencode(member.target)) > _SYMLINK_MAX
        ):
            raise _refused(name, "its symbolic link target is empty, too long, or has a NUL byte")


def _describe(mode: int) -> str:
    for test, description in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"),
                              (stat.S_ISREG, "regular file"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return description
    return "device"


class _Filesystem:
    """What is at a name beneath the root (lstat, cached): validation's only view of the container.

    `real` is what is there now; `lstat` what will be there once the archive's deletions are done.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.device = os.stat(root).st_dev
        self.deleted: set[str] = set()  # names the extraction deletes (each one exists now)
        self._seen: dict[str, os.stat_result | None] = {}

    def real(self, name: str) -> os.stat_result | None:
        if name not in self._seen:
            try:
                self._seen[name] = os.lstat(os.path.join(self.root, name))
            except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: a parent is a file (judged on its own)
                self._seen[name] = None
            except OSError as error:
                raise _refused(name, f"cannot look at /{name}: {error.strerror}") from error
        return self._seen[name]

    def lstat(self, name: str) -> os.stat_result | None:
        if self.deleted and (name in self.deleted or any(ancestor in self.deleted for ancestor in _ancestors(name))):
            return None
        return self.real(name)


def _check_deletion(name: str, here: _Filesystem, forbidden: dict[str, str], mounts: Collection[str]) -> bool:
    """`name` may be deleted (recursively) in this container; False where there is nothing to delete.

    Deletions are checked shallowest first: one beneath another goes with it.
    """
    path = "/" + name
    prefix = _under(path, forbidden)
    if prefix is not None:
        where = f"is {forbidden[prefix]}" if path == prefix else f"is under {prefix}, {forbidden[prefix]}"
        raise _refused(name, f"{path} {where}: carried files never delete there")
    inside = _beneath(path, forbidden)
    if inside is not None:
        raise _refused(name, f"deleting {path} would delete {inside}, {forbidden[inside]}")
    for ancestor in _ancestors(name):
        if ancestor in here.deleted:
            return False
        info = here.real(ancestor)
        if info is None:
            return False  # not in this container: nothing to delete
        if not stat.S_ISDIR(info.st_mode):
            raise _refused(name, f"/{ancestor} is a {_describe(info.st_mode)} in this container, not a directory: "
                                 "carried files never delete through links")
    current = here.real(name)
    if current is None:
        return False
    mount = _mount_at_or_above(path, mounts) or _beneath(path, mounts)
    if mount is not None:
        raise _refused(name, f"{mount} is a mount point in this container: carried files never delete on or "
                             "around one")
    for ancestor in _ancestors(name):
        if (info := here.real(ancestor)) is not None and info.st_dev != here.device:
            raise _refused(name, f"/{ancestor} is on another filesystem than the container's root")
    if current.st_dev != here.device:
        raise _refused(name, f"{path} is on another filesystem than the container's root")
    here.deleted.add(name)
    return True


def _check_place(member: _Member, here: _Filesystem, forbidden: dict[str, str], mounts: Collection[str]) -> None:
    """`member` may be written (or, an existing directory, given its attributes) at its name in this container."""
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
    mount = _mount_at_or_above(path, mounts)
    if member.kind == "directory" and current is not None and stat.S_ISDIR(current.st_mode):
        member.exists = True
        # The image's directory, or an earlier extraction's: it gets the owner, mode and times it had in
        # the old container, unless it is a mount point or beneath one here (a volume's root is not ours).
        member.update = mount is None and current.st_dev == here.device
        return
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
    allowed = {"symlink": stat.S_ISLNK, "fifo": stat.S_ISFIFO}.get(member.kind, stat.S_ISREG)
    if not (stat.S_ISREG(current.st_mode) or allowed(current.st_mode)):
        replaces = {"symlink": "a regular file or symbolic link", "fifo": "a regular file or FIFO"}.get(
            member.kind, "a regular file")
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
    new = [*created.values(), *(m for m in found.values() if m.kind == "directory" and not m.exists)]
    for member in new:
        # Where a deletion removes what is there now, the new directory is made under a temporary
        # name and renamed into place after the deletion, like a file.
        member.replaces = here.real(member.name) is not None
    new.sort(key=lambda member: member.name.count("/"))
    updated = [m for m in found.values() if m.kind == "directory" and m.update]
    order = {"file": 0, "hardlink": 1, "symlink": 2, "fifo": 3}  # a hard link needs its file staged first
    others = sorted((m for m in found.values() if m.kind != "directory"), key=lambda member: order[member.kind])
    return [*new, *updated, *others]


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Directories:
    """Directory descriptors beneath the root, opened one component at a time, never through a symlink."""

    def __init__(self, root: str, device: int) -> None:
        self.device = device
        self.fds = {"": os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)}
        self.created: list[tuple[str, str]] = []  # (parent, name on disk) made by this extraction, shallowest first
        self.new: set[str] = set()  # the names of the directories it made
        self.times: dict[str, tuple[int, int]] = {}  # directories that existed and get new entries: atime, mtime

    def open(self, name: str) -> int:
        if name not in self.fds:
            parent, _, base = name.rpartition("/")
            parent_fd = self.open(parent)
            # O_NOFOLLOW: ELOOP rather than following a symlink planted since the check.
            fd = os.open(base, _DIRECTORY_FLAGS, dir_fd=parent_fd)
            self.fds[name] = fd
            if os.fstat(fd).st_dev != self.device:
                raise OSError(f"/{name} is on another filesystem than the container's root")
        return self.fds[name]

    def make(self, name: str, on_disk: str) -> int:
        """Create directory `name` as `on_disk` in its parent (0700 until complete); its fd."""
        parent = name.rpartition("/")[0]
        parent_fd = self.entering(parent)
        os.mkdir(on_disk, 0o700, dir_fd=parent_fd)
        self.created.append((parent, on_disk))
        self.new.add(name)
        self.fds[name] = fd = os.open(on_disk, _DIRECTORY_FLAGS, dir_fd=parent_fd)
        return fd

    def entering(self, name: str) -> int:
        """Directory `name`, about to get a new entry: one that existed keeps its times (put back at the end)."""
        fd = self.open(name)
        if name not in self.times and name not in self.new:
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


def _remove(parent_fd: int, name: str, device: int) -> None:
    """Delete `name` in `parent_fd`, a directory with everything in it; never through a symlink, never off `device`."""
    try:
        info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return
    stack: list[tuple[int, str, int]] = []  # (parent fd, name, fd), deepest last: no recursion limit

    def enter(parent: int, base: str) -> None:
        fd = os.open(base, _DIRECTORY_FLAGS | os.O_NONBLOCK, dir_fd=parent)
        if os.fstat(fd).st_dev != device:
            os.close(fd)
            raise OSError(errno.EXDEV, f"{base} is on another filesystem than the container's root")
        stack.append((parent, base, fd))

    enter(parent_fd, name)
    try:
        while stack:
            parent, base, fd = stack[-1]
            descended = False
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        enter(fd, entry.name)
                        descended = True
                        break
                    os.unlink(entry.name, dir_fd=fd)
            if not descended:
                stack.pop()
                os.close(fd)
                os.rmdir(base, dir_fd=parent)
    finally:
        for _parent, _base, fd in stack:
            os.close(fd)


def _write(tar: tarfile.TarFile, plan: list[_Member], deletions: list[str], root: str, device: int) -> None:
    """Create the directories, stage every entry under a temporary name; then delete, rename, set attributes.

    A failure before the deletions removes everything staged and created, and nothing of the
    container was changed. The deletions and renames come last, after every check and every byte
    is written, and fail only if the filesystem does.
    """
    directories = _Directories(root, device)
    staged: dict[str, _Staged] = {}
    renamed_directories: list[tuple[int, str, str]] = []  # (parent fd, temporary name, final name)
    deleted = 0
    current = ""
    try:
        for member in plan:
            current = member.name
            parent, _, base = member.name.rpartition("/")
            if member.kind == "directory":
                if member.exists:
                    continue  # an existing directory: its attributes once everything else is in place
                on_disk = _temporary_name() if member.replaces else base
                fd = directories.make(member.name, on_disk)
                if member.replaces:
                    renamed_directories.append((directories.open(parent), on_disk, base))
                os.fchown(fd, member.uid, member.gid)
                continue
            parent_fd = directories.entering(parent)
            entry = staged[member.name] = _Staged(parent_fd, _temporary_name(), member)
            if member.kind == "file":
                _stage_file(tar, member, entry)
            elif member.kind == "hardlink":
                source = staged[member.target]
                os.link(source.temporary, entry.temporary, src_dir_fd=source.parent_fd, dst_dir_fd=parent_fd,
                        follow_symlinks=False)
            elif member.kind == "symlink":
                assert member.mtime_ns is not None and member.atime_ns is not None
                os.symlink(member.target, entry.temporary, dir_fd=parent_fd)
                os.chown(entry.temporary, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
                os.utime(entry.temporary, ns=(member.atime_ns, member.mtime_ns), dir_fd=parent_fd,
                         follow_symlinks=False)
            else:
                _stage_fifo(member, entry)
        for member in plan:
            if member.kind == "directory" and not member.exists:
                current = member.name
                os.fchmod(directories.open(member.name), member.mode)
        # Nothing of the container has changed so far: from here on, what is done stays done.
        for name in deletions:
            current = name
            parent, _, base = name.rpartition("/")
            _remove(directories.entering(parent), base, device)
            deleted += 1
        for parent_fd, temporary, base in renamed_directories:
            os.rename(temporary, base, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        for entry in staged.values():
            current = entry.member.name
            # rename(2) replaces whatever is at the final name, a symlink too, and never writes through it.
            os.rename(entry.temporary, entry.member.name.rpartition("/")[2], src_dir_fd=entry.parent_fd,
                      dst_dir_fd=entry.parent_fd)
            entry.renamed = True
        for member in plan:
            if member.kind == "directory" and member.update:
                current = member.name
                fd = directories.open(member.name)
                os.fchown(fd, member.uid, member.gid)  # before the mode: chown(2) may clear setgid
                os.fchmod(fd, member.mode)
        directories.put_back_times()
        for member in plan:  # last: every entry above changed its directory's mtime
            if member.kind == "directory" and member.mtime_ns is not None and (member.update or not member.exists):
                current = member.name
                atime_ns = member.mtime_ns if member.atime_ns is None else member.atime_ns
                os.utime(directories.open(member.name), ns=(atime_ns, member.mtime_ns))
    except (OSError, tarfile.TarError) as error:
        lost = deleted + _undo(directories, list(staged.values()), renamed_directories)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        outcome = ("nothing was put back" if not lost
                   else f"{lost} entr{'y' if lost == 1 else 'ies'} of the image were already replaced or deleted")
        raise _refused(current, f"cannot write it: {reason}; {outcome}") from error
    finally:
        directories.close()
    if deletions:
        log.info("deleted %d path(s) of the image that the app had deleted", len(deletions))


def _stage_file(tar: tarfile.TarFile, member: _Member, entry: _Staged) -> None:
    """Write a regular file's data and attributes under its temporary name (a sparse one with its holes)."""
    assert member.info is not None and member.mtime_ns is not None and member.atime_ns is not None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(entry.temporary, flags, 0o600, dir_fd=entry.parent_fd), "wb") as out:
        fd = out.fileno()
        if member.sparse is None:
            data = tar.extractfile(member.info)
            assert data is not None  # a regular file
            while chunk := data.read(_COPY_CHUNK):
                out.write(chunk)
            out.flush()
        else:
            source = tar.fileobj
            assert source is not None
            source.seek(member.info.offset_data)
            os.ftruncate(fd, member.info.size)  # all holes, until the data is written at its offsets
            for offset, length in member.sparse:
                done = 0
                while done < length:
                    chunk = source.read(min(_COPY_CHUNK, length - done))
                    if not chunk:
                        raise tarfile.ReadError(f"the archive ends inside its data at offset {offset + done}")
                    os.pwrite(fd, chunk, offset + done)
                    done += len(chunk)
        if os.fstat(fd).st_size != member.info.size:
            raise tarfile.ReadError(f"the archive holds {os.fstat(fd).st_size} of its {member.info.size} bytes")
        # Owner first: chown(2) clears setuid/setgid, and the mode set after it is the one that counts.
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode)
        os.utime(fd, ns=(member.atime_ns, member.mtime_ns))


def _stage_fifo(member: _Member, entry: _Staged) -> None:
    assert member.mtime_ns is not None and member.atime_ns is not None
    os.mkfifo(entry.temporary, 0o600, dir_fd=entry.parent_fd)
    # O_NONBLOCK: opening a FIFO for reading does not wait for a writer.
    fd = os.open(entry.temporary, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=entry.parent_fd)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise OSError(errno.EEXIST, "not the FIFO just made")
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode)
        os.utime(fd, ns=(member.atime_ns, member.mtime_ns))
    finally:
        os.close(fd)


def _undo(directories: _Directories, staged: list[_Staged], renamed_directories: list[tuple[int, str, str]]) -> int:
    """Remove what a failed extraction wrote; the number of image files already replaced (not undone)."""
    lost = 0
    for entry in staged:
        if entry.renamed and entry.member.exists:
            lost += 1  # rename(2) dropped the image's file: nothing left to bring back
            continue
        with contextlib.suppress(OSError):  # ENOENT: the failure came before it was created
            os.unlink(entry.member.name.rpartition("/")[2] if entry.renamed else entry.temporary,
                      dir_fd=entry.parent_fd)
    final_names = {(parent_fd, temporary): base for parent_fd, temporary, base in renamed_directories}
    for parent, on_disk in reversed(directories.created):
        with contextlib.suppress(OSError):  # ENOENT: not made yet; ENOTEMPTY: holds what could not be removed
            parent_fd = directories.open(parent)
            if not _present(on_disk, parent_fd):
                on_disk = final_names.get((parent_fd, on_disk), on_disk)  # renamed into place already
            os.rmdir(on_disk, dir_fd=parent_fd)
    with contextlib.suppress(OSError):
        directories.put_back_times()
    return lost


def _present(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _open_archive(handle: BinaryIO, source: str) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=handle, mode="r:")  # archive() never compresses: no decompression bomb
    except (tarfile.TarError, ValueError) as error:  # ValueError: tarfile on a malformed sparse map
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
    """Put the carried layer back where it came from, or refuse the whole archive. Returns the files restored.

    The archive is untrusted (see the module's docstring). Read whole first; refused, with
    nothing written, unless every member is:
    - a regular file (sparse ones in GNU's 1.0 format only), a directory, a FIFO, a hard link to
      another member, a symbolic link (its target is text, kept as it is: never followed), or a
      deletion, at a normal relative name;
    - together with the others, no more than `max_bytes` of data (the caller knows the
      archive's size from the manifest);
    - outside /proc, /sys, /dev, /run/secrets, the engine's /etc/hosts, /etc/hostname,
      /etc/resolv.conf, /run/.containerenv and /.dockerenv, the supervisor's own files, and the
      `exclude` prefixes (the checkpoint volume);
    - below real directories only (lstat: a symlink in a parent is refused), on the root
      filesystem, not at or under a mount point;
    - a directory (the container's own gets the recorded owner, mode and times, unless it is a
      mount point or beneath one), or replacing only a regular file (a symlink also a symlink, a
      FIFO also a FIFO), unless a deletion removes what is there first;
    - a deletion: of a path beneath real directories, not at, above or beneath any of the places
      above or a mount point, on the root filesystem; a directory goes with everything in it.
    Files keep their mode (group and other write bits too: CRIU refuses a file whose mode
    differs, "bad mode 0100640 (expect 0100660)"), numeric owner, mtime and atime (to the
    nanosecond where the archive has them), and their holes; not setuid/setgid.

    `root` and `mounts` are for tests only: the container's root directory (names, devices and
    mount points are judged beneath it) and its mount points as paths inside it (by default
    read from /proc/self/mountinfo).
    """
    forbidden = {prefix: "the kernel's" for prefix in _NEVER}
    forbidden["/run/secrets"] = "the engine's secrets"
    forbidden.update({prefix: "the container engine's own file" for prefix in _ENGINE_FILES})
    forbidden.update({prefix: "the supervisor's own" for prefix in _SUPERVISOR_FILES})
    forbidden.update({("/" + prefix.strip("/")).rstrip("/") or "/": "the checkpoint volume" for prefix in exclude})
    if mounts is None:
        mounts = _mounts_beneath(root)
    mounts = {point.rstrip("/") for point in mounts} - {""}
    here = _Filesystem(root)
    with open(source, "rb") as handle, _open_archive(handle, source) as tar:
        try:
            found, deletions = _read_members(tar, os.fstat(handle.fileno()).st_size, max_bytes)
        except CarriedFilesRefused:
            raise
        except (tarfile.TarError, ValueError) as error:  # ValueError: tarfile on a malformed sparse map
            raise CarriedFilesRefused(f"{source} is not a readable tar archive: {error}") from error
        _check_links(found)
        deletions.sort(key=lambda name: name.count("/"))
        applied = [name for name in deletions if _check_deletion(name, here, forbidden, mounts)]
        for member in found.values():
            _check_place(member, here, forbidden, mounts)
        # Before anything is written, this container is its image: what is here now, the image has.
        image = frozenset("/" + name for name in found if here.real(name) is not None)
        # Every file is staged before any is renamed into place: the data must fit alongside what it replaces.
        needed = sum(member.data_size for member in found.values() if member.kind == "file")
        space = os.statvfs(root)
        if needed > space.f_bavail * space.f_frsize:
            raise CarriedFilesRefused(f"the carried files need {needed} bytes, the container's root filesystem has "
                                      f"{space.f_bavail * space.f_frsize} free; nothing was put back")
        _write(tar, _plan(found, here), applied, root, here.device)
    if root == "/":
        _PUT_BACK[source] = Layer(frozenset("/" + name for name in found), frozenset("/" + name for name in applied),
                                  image)
    return ["/" + name for name, member in found.items() if member.kind in ("file", "hardlink")]
