"""Safe access to the shared checkpoint volume, whose content is untrusted input.

Any node, or any other client of the NFS export, can put anything on the
volume: a symlink where a directory should be, a FIFO where a file should be, a
file of any size, JSON of any shape. Opening a path like `lineage/gen-7/claim.json`
follows a symlink in any of its components out of the volume (chmod, rmtree and
writes then act on the node's own files), and opening a FIFO for reading blocks
until someone writes to it, which can be never.

So everything on the volume is reached from a `Directory`, an open directory fd:

    root = Directory.open(CKPT_DIR, create=True)      operator's path: symlinks allowed
    lineage = root.subdir(name, create=True)           one component, never a symlink
    manifest = generation.read_json("manifest.json", limit=...)

Each name is ONE path component ("..", "." and anything with "/" are refused),
looked up beneath the fd with O_NOFOLLOW, so no symlink on the volume is ever
followed. With a single component, O_NOFOLLOW on it is all openat2's
RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS would add (there is no other component to
resolve), so plain openat(2) is used and no syscall number or seccomp profile
matters.

Files are opened O_PATH|O_NOFOLLOW first: that never opens the file itself (a
FIFO cannot block it, a device's driver is not called, a symlink gives a handle
on the link), so fstat can tell what the name is before anything is opened for
reading. Only a regular file is then opened, by reopening that very inode
through /proc/self/fd (no window in which the name can be swapped; open(2),
"O_PATH"). Without /proc, it is opened by name again (O_NONBLOCK, so a FIFO
swapped in meanwhile does not block) and refused unless it is the same inode.

Everything found that is not what it must be raises VolumeRefusal, one line
naming the path. A missing name raises FileNotFoundError unchanged (callers
treat "missing" as a normal state). Every other OSError (EROFS, ENOSPC, EIO,
ESTALE...) propagates as it is: callers turn those into messages already.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import secrets
import stat
from types import TracebackType
from typing import Any, Final, Literal

from supervisor_pkg.errors import StoreError

MAX_JSON_DEPTH: Final = 32
# Nothing the supervisor writes holds an integer longer than an int64 (19
# digits). Python's own limit (4300 digits, sys.set_int_max_str_digits) can be
# lifted by PYTHONINTMAXSTRDIGITS=0, and converting a long digit string is
# quadratic, so the bound is ours.
MAX_INTEGER_DIGITS: Final = 64
# CRIU's image directories are flat and store.py's layout is a few levels deep:
# deeper trees come from someone else. Removing one holds a directory fd per
# level (Python's shutil.rmtree recurses instead: RecursionError near 1000).
MAX_TREE_DEPTH: Final = 64
# The NFS client renames a file that is unlinked while still open on that
# client to .nfsXXXX ("silly rename") and removes it itself at the last close;
# cleanup leaves them alone (STYLE.md).
NFS_SILLY_RENAME_PREFIX: Final = ".nfs"
# Where an O_PATH fd can be reopened for real; the tests point it elsewhere to
# exercise the reopen-by-name path taken where /proc is not mounted.
PROC_FD_DIRECTORY = "/proc/self/fd"

EntryKind = Literal["file", "dir", "symlink", "other"]
FILE: Final = "file"
DIRECTORY: Final = "dir"
SYMLINK: Final = "symlink"
OTHER: Final = "other"

# O_PATH: a handle on the name's inode without opening the inode itself.
_LOOK = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# O_DIRECTORY is checked before the inode is opened (fs/namei.c do_open: ENOTDIR
# before may_open and vfs_open), so a FIFO or device there fails at once; a
# symlink fails with ENOTDIR (seen on 6.18) or ELOOP (O_NOFOLLOW).
_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Creating: O_EXCL fails with EEXIST on any existing name, a symlink (even a
# dangling one) included, so creation never happens at a symlink's target.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)  # possessive: linear, no backtracking
_JSON_BRACKET = re.compile(r"[\[\]{}]")


class VolumeRefusal(StoreError):
    """Something on the volume is not what it must be (a symlink, a FIFO, too big, malformed JSON).

    `.message` is one line naming the path and what was found.
    """


@dataclasses.dataclass(frozen=True)
class Entry:
    """A name in a directory and what it is, as lstat sees it (a symlink is never followed)."""

    name: str
    kind: EntryKind


def shown(text: str) -> str:
    """`text` fit for a one-line message: names on the volume may hold newlines or undecodable bytes."""
    return text if text.isprintable() else ascii(text)


def real_path(path: str) -> str:
    """A path anchored at an open directory (/proc/PID/fd/N/...) as that directory's path now, for messages."""
    match = re.match(r"^/proc/(self|\d+)/fd/(\d+)(/.*)?$", path)
    if match is None:
        return path
    try:
        base = os.readlink(f"/proc/{match[1]}/fd/{match[2]}")
    except OSError:
        return path
    return base + (match[3] or "")


def free_bytes(path: str) -> int | None:
    """Bytes free to us on the filesystem holding `path`, or None if it cannot be asked."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def describe_kind(mode: int) -> str:
    """What an st_mode is, for a message: "a symlink", "a FIFO", ..."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((word for test, word in kinds if test(mode)), "an unknown kind of file")


def _nesting_depth(text: str, stop_above: int) -> int:
    """How deeply arrays and objects nest in `text` (counting stops once past `stop_above`).

    Brackets inside strings do not count: strings are cut out first, as JSON
    defines them. On input that is not JSON the count may be too high, never too
    low for the part json.loads would get to parse, and such input is refused
    either way.
    """
    depth = deepest = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        if bracket.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > stop_above:
                break
        else:
            depth -= 1
    return deepest


def parse_json_object(data: bytes, where: str) -> dict[str, Any]:
    """A JSON object from the volume, parsed strictly; anything else raises VolumeRefusal(f"{where}: ...").

    Strict, because the same bytes are read by other versions and other nodes,
    and json.loads accepts more than JSON: NaN and Infinity (and 1e999 as
    infinity), duplicate keys (the last wins, so two readers may disagree on
    what a record says), nesting deep enough for RecursionError (not a
    ValueError, so it would escape callers' handlers), and integers long enough
    to take seconds to convert.
    """

    def refuse_constant(name: str) -> Any:
        raise VolumeRefusal(f"{where}: {name} is not a JSON number")

    def finite_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise VolumeRefusal(f"{where}: the number {shown(text[:40])} is out of range")
        return value

    def bounded_integer(text: str) -> int:
        if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
            raise VolumeRefusal(f"{where}: an integer of {len(text)} digits (at most {MAX_INTEGER_DIGITS})")
        return int(text)

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise VolumeRefusal(f"{where}: the key {shown(repr(key)[:60])} appears twice")
            result[key] = value
        return result

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise VolumeRefusal(f"{where}: not UTF-8 (byte {error.start})") from error
    if _nesting_depth(text, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise VolumeRefusal(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(
            text,
            parse_constant=refuse_constant,
            parse_float=finite_float,
            parse_int=bounded_integer,
            object_pairs_hook=unique_keys,
        )
    except json.JSONDecodeError as error:
        raise VolumeRefusal(f"{where}: not valid JSON ({error.msg} at character {error.pos})") from error
    except RecursionError as error:  # the depth check above should make this unreachable
        raise VolumeRefusal(f"{where}: JSON nested too deeply") from error
    except ValueError as error:  # a conversion the hooks did not foresee
        raise VolumeRefusal(f"{where}: not valid JSON ({shown(str(error)[:100])})") from error
    if not isinstance(value, dict):
        raise VolumeRefusal(f"{where}: JSON {type(value).__name__}, not an object")
    return value


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written: a write to a file may be short (write(2))."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_at_most(fd: int, count: int) -> bytes:
    """Up to `count` bytes from `fd`, fewer only at its end (read(2) may return less than asked)."""
    pieces = bytearray()
    while len(pieces) < count:
        piece = os.read(fd, count - len(pieces))
        if not piece:
            break
        pieces += piece
    return bytes(pieces)


def _check_name(name: str, where: str) -> None:
    """`name` must be one path component: "..", "." or a "/" would reach outside the directory."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise VolumeRefusal(f"{where}: {shown(repr(name))} is not a single path component")


class Directory:
    """An open directory fd; every name is ONE path component resolved beneath it without following symlinks.

    `path` is for messages only: after construction nothing is opened by path,
    so renaming the directory (or a parent) while it is open changes nothing.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def __repr__(self) -> str:
        return f"Directory({self.path!r}, fd={self.fd})"

    def __enter__(self) -> Directory:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the fd (again: nothing)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def _where(self, name: str) -> str:
        return shown(os.path.join(self.path, name))

    def _refusal(self, name: str, mode: int, wanted: str) -> VolumeRefusal:
        return VolumeRefusal(f"{self._where(name)} is {describe_kind(mode)}, not {wanted}")

    # --- opening directories ------------------------------------------------
    @classmethod
    def open(cls, path: str, create: bool = False, mode: int = 0o700) -> Directory:
        """The operator's directory (CKPT_DIR), made with `mode` if `create` and missing.

        Symlinks in `path` are followed: it is configuration, not volume content
        (a mount point reached through a symlink is common). It must be absolute,
        so that the working directory plays no part.
        """
        if not os.path.isabs(path):
            raise ValueError(f"{path!r} is not an absolute path")
        if create:
            os.makedirs(path, mode=mode, exist_ok=True)
        return cls(path, os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))

    def subdir(self, name: str, create: bool = False, mode: int = 0o700) -> Directory:
        """The directory `name` beneath this one; made (mkdirat) when `create` and missing.

        With `create`, its mode is set to `mode` when we made it or own it:
        umask narrows mkdir's mode, and a directory somebody else owns keeps
        theirs (we could not change it without being root, and chown is not ours
        to do). Not a directory (a symlink, FIFO, file) -> VolumeRefusal.
        """
        _check_name(name, self.path)
        made = False
        if create:
            try:
                os.mkdir(name, mode, dir_fd=self.fd)
                made = True
            except FileExistsError:
                pass  # already there (maybe made by another node just now); checked below
        directory = self._open_directory(name)
        if create:
            try:
                info = os.fstat(directory.fd)
                if stat.S_IMODE(info.st_mode) != mode and (made or info.st_uid == os.geteuid()):
                    os.fchmod(directory.fd, mode)
            except BaseException:
                directory.close()
                raise
        return directory

    def create_subdir(self, name: str, mode: int = 0o700) -> Directory:
        """A NEW directory `name` (staging): FileExistsError if anything, a symlink included, is there."""
        _check_name(name, self.path)
        os.mkdir(name, mode, dir_fd=self.fd)
        directory = self._open_directory(name)
        try:
            if stat.S_IMODE(os.fstat(directory.fd).st_mode) != mode:
                os.fchmod(directory.fd, mode)  # umask narrowed mkdir's mode
        except BaseException:
            directory.close()
            raise
        return directory

    def _open_directory(self, name: str) -> Directory:
        try:
            fd = os.open(name, _OPEN_DIRECTORY, dir_fd=self.fd)
        except OSError as error:
            if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            try:
                found = os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                raise error from None  # gone since: "missing", as for any other name
            raise self._refusal(name, found, "a directory") from error
        return Directory(os.path.join(self.path, name), fd)

    # --- reading files ------------------------------------------------------
    def _open_checked(self, name: str, kinds: tuple[int, ...], wanted: str, flags: int) -> tuple[int, os.stat_result]:
        """An fd opened with `flags` on `name`, whose file type (S_IFMT) must be one of `kinds`."""
        _check_name(name, self.path)
        handle = os.open(name, _LOOK, dir_fd=self.fd)  # FileNotFoundError propagates unchanged
        try:
            info = os.fstat(handle)
            if stat.S_IFMT(info.st_mode) not in kinds:
                raise self._refusal(name, info.st_mode, wanted)
            try:
                # The magic link resolves to the inode `handle` holds, whatever the name now is.
                fd = os.open(os.path.join(PROC_FD_DIRECTORY, str(handle)), flags | os.O_CLOEXEC)
            except FileNotFoundError:  # no /proc here: `handle` is open, so its entry would exist
                fd = self._reopen_by_name(name, info, wanted, flags)
            return fd, info
        finally:
            os.close(handle)

    def _reopen_by_name(self, name: str, looked: os.stat_result, wanted: str, flags: int) -> int:
        """Open `name` again and make sure it is still the inode `looked` described."""
        # O_NONBLOCK: should a FIFO be swapped in meanwhile, its open returns at
        # once instead of waiting for a writer (fifo(7)); the inode check below
        # refuses it. O_NOCTTY: a terminal swapped in never becomes ours.
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino, stat.S_IFMT(opened.st_mode)) != (
                looked.st_dev, looked.st_ino, stat.S_IFMT(looked.st_mode)
            ):
                now = describe_kind(opened.st_mode)
                raise VolumeRefusal(f"{self._where(name)} was replaced while being opened (now {now})")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_file(self, name: str) -> int:
        """A blocking O_RDONLY fd on the regular file `name` (to hash a big image); the caller closes it.

        Not a regular file -> VolumeRefusal; missing -> FileNotFoundError.
        """
        fd, _ = self._open_checked(name, (stat.S_IFREG,), "a file", os.O_RDONLY)
        return fd

    def read_bytes(self, name: str, limit: int) -> bytes:
        """The whole regular file `name`, refused if it is more than `limit` bytes.

        The size is checked before reading and again by what arrives (at most
        limit + 1 bytes are read), since a file on a shared volume can grow
        between the two. Missing -> FileNotFoundError.
        """
        fd = self.open_file(name)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise VolumeRefusal(f"{self._where(name)} is {size} bytes, more than the {limit} allowed")
            data = _read_at_most(fd, limit + 1)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise VolumeRefusal(f"{self._where(name)} grew past the {limit} bytes allowed while being read")
        return data

    def read_json(self, name: str, limit: int) -> dict[str, Any]:
        """The JSON object in `name` (see read_bytes and parse_json_object)."""
        return parse_json_object(self.read_bytes(name, limit), self._where(name))

    # --- writing ------------------------------------------------------------
    def _create(self, name: str, mode: int) -> int:
        fd = os.open(name, _CREATE, mode, dir_fd=self.fd)
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
                os.fchmod(fd, mode)  # umask narrowed it
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write_atomically(self, name: str, data: bytes, mode: int = 0o600) -> None:
        """Readers see the old `name` or all of `data`, never a part: temp -> fsync -> rename -> fsync the dir.

        rename(2) replaces the directory entry `name` whatever it is: a symlink
        there is replaced itself, its target is never written. A directory there
        -> VolumeRefusal.
        """
        _check_name(name, self.path)
        temporary = f".{name}.tmp-{secrets.token_hex(4)}"
        fd = self._create(temporary, mode)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)  # NFS may report a delayed write error only here (close(2))
            try:
                os.rename(temporary, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            except IsADirectoryError as error:
                raise VolumeRefusal(f"{self._where(name)} is a directory, not a file") from error
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=self.fd)
            raise
        self.fsync()

    def create_exclusive(self, name: str, data: bytes, mode: int = 0o600) -> bool:
        """Create `name` holding `data`; False if anything (a symlink included) already has that name.

        O_CREAT|O_EXCL is atomic on NFSv3+: of several nodes, exactly one gets
        True (a claim, a lease). If writing fails, the file is removed again, so
        that a half-written record claims nothing.
        """
        _check_name(name, self.path)
        try:
            fd = self._create(name, mode)
        except FileExistsError:
            return False
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self.fd)
            raise
        self.fsync()
        return True

    # --- changing what is there -----------------------------------------------
    def unlink(self, name: str, missing_ok: bool = True) -> None:
        """Remove the name `name` (a symlink: the link itself). A directory there -> VolumeRefusal."""
        _check_name(name, self.path)
        try:
            os.unlink(name, dir_fd=self.fd)  # unlinkat(2): never follows the name
        except FileNotFoundError:
            if not missing_ok:
                raise
        except IsADirectoryError as error:
            raise VolumeRefusal(f"{self._where(name)} is a directory, not a file") from error

    def remove_tree(self, name: str) -> bool:
        """Delete `name` beneath this directory: a tree, a file, or a symlink (the link, never its target).

        True if `name` is gone (or was already). False if something had to stay:
        NFS silly-rename files (.nfsXXXX, left alone: the NFS client removes them
        when their last user closes them), or entries that appeared meanwhile.
        A tree deeper than MAX_TREE_DEPTH -> VolumeRefusal.

        Not shutil.rmtree(name, dir_fd=...): on Python 3.11 it opens `name`
        O_RDONLY before knowing what it is, so a FIFO there blocks it forever
        (cpython#116401, seen here on 3.11.7), and a tree ~1000 deep raises
        RecursionError. This walk opens only directories (O_DIRECTORY|O_NOFOLLOW,
        which cannot block or follow), unlinks everything else by name
        (unlinkat never follows), and skips .nfsXXXX files, which rmtree cannot.
        """
        _check_name(name, self.path)
        try:
            found = self.lstat(name)
        except FileNotFoundError:
            return True
        if name.startswith(NFS_SILLY_RENAME_PREFIX) and not stat.S_ISDIR(found.st_mode):
            return False
        if not stat.S_ISDIR(found.st_mode):
            return self._unlink_leaf(name)
        try:
            inside = self._open_directory(name)
        except FileNotFoundError:
            return True
        except VolumeRefusal:  # replaced by a non-directory since the lstat
            return self._unlink_leaf(name)
        with inside:
            emptied = inside._empty(depth=1)
        return emptied and self._remove_empty_directory(name)

    def _empty(self, depth: int) -> bool:
        """Remove everything beneath this directory except .nfsXXXX files; True if nothing is left."""
        complete = True
        for entry in self.entries():
            if entry.name.startswith(NFS_SILLY_RENAME_PREFIX) and entry.kind != DIRECTORY:
                complete = False
            elif entry.kind != DIRECTORY:
                complete = self._unlink_leaf(entry.name) and complete
            elif depth >= MAX_TREE_DEPTH:
                raise VolumeRefusal(
                    f"{self._where(entry.name)}: more than {MAX_TREE_DEPTH} directories deep; not removed "
                    "(no checkpoint looks like this: remove it by hand)"
                )
            else:
                try:
                    child = self._open_directory(entry.name)
                except FileNotFoundError:
                    continue
                except VolumeRefusal:  # replaced by a non-directory since the listing
                    complete = self._unlink_leaf(entry.name) and complete
                    continue
                with child:
                    emptied = child._empty(depth + 1)
                complete = emptied and self._remove_empty_directory(entry.name) and complete
        return complete

    def _unlink_leaf(self, name: str) -> bool:
        """Unlink a non-directory; False if a directory has taken its name meanwhile."""
        try:
            self.unlink(name)
        except VolumeRefusal:
            return False
        return True

    def _remove_empty_directory(self, name: str) -> bool:
        """rmdir `name`; False if it is not empty (an .nfsXXXX file, or a file written meanwhile)."""
        try:
            os.rmdir(name, dir_fd=self.fd)
        except FileNotFoundError:
            return True
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                return False
            raise
        return True

    def chmod(self, name: str, mode: int) -> None:
        """Set the mode of the regular file or directory `name`; anything else (a symlink) -> VolumeRefusal.

        Through an fd on the inode checked to be a file or directory: chmod by
        name follows a symlink, and fchmodat(AT_SYMLINK_NOFOLLOW) is refused on
        Linux (EOPNOTSUPP), while fchmod does not work on an O_PATH fd (EBADF).
        """
        fd, _ = self._open_checked(name, (stat.S_IFREG, stat.S_IFDIR), "a file or directory", os.O_RDONLY)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def rename(self, old: str, new_parent: Directory, new: str) -> None:
        """renameat(2) `old` here to `new` in `new_parent`; neither name is followed if it is a symlink.

        A directory onto a non-empty directory fails (ENOTEMPTY/EEXIST): that is
        what makes publication by rename safe. Not fsynced: the caller fsyncs the
        directories whose entries must survive a crash.
        """
        _check_name(old, self.path)
        _check_name(new, new_parent.path)
        os.rename(old, new, src_dir_fd=self.fd, dst_dir_fd=new_parent.fd)

    def link(self, old: str, new_parent: Directory, new: str) -> None:
        """A hard link `new` in `new_parent` to `old` here (a symlink: to the link). FileExistsError if taken.

        follow_symlinks=False: Python's os.link follows by default (AT_SYMLINK_FOLLOW).
        """
        _check_name(old, self.path)
        _check_name(new, new_parent.path)
        os.link(old, new, src_dir_fd=self.fd, dst_dir_fd=new_parent.fd, follow_symlinks=False)

    # --- looking ------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Every name here with what it is (lstat: symlinks are not followed), sorted by name.

        A name that vanishes while it is looked at is left out. The order is for
        repeatability only: "newest" must come from what was published, never
        from a listing (STYLE.md: NFS listings can be stale).
        """
        found: list[Entry] = []
        with os.scandir(self.fd) as listing:  # scandir(fd) reads a dup of the fd, then rewinds it
            for item in listing:
                try:
                    if item.is_symlink():
                        kind: EntryKind = SYMLINK
                    elif item.is_dir(follow_symlinks=False):
                        kind = DIRECTORY
                    elif item.is_file(follow_symlinks=False):
                        kind = FILE
                    else:
                        kind = OTHER
                except FileNotFoundError:
                    continue
                found.append(Entry(item.name, kind))
        return sorted(found, key=lambda entry: entry.name)

    def lstat(self, name: str) -> os.stat_result:
        """fstatat(AT_SYMLINK_NOFOLLOW) of `name`: a symlink is described, not followed."""
        _check_name(name, self.path)
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def exists(self, name: str) -> bool:
        """Whether anything (a dangling symlink included) has the name `name`."""
        try:
            self.lstat(name)
        except FileNotFoundError:
            return False
        return True

    def readlink(self, name: str) -> str:
        """The target of the symlink `name`, as text (never resolved). Not a symlink -> VolumeRefusal."""
        _check_name(name, self.path)
        try:
            return os.readlink(name, dir_fd=self.fd)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            raise self._refusal(name, self.lstat(name).st_mode, "a symlink") from error

    def fsync(self) -> None:
        """Make this directory's entries (a rename, a create) durable."""
        os.fsync(self.fd)
