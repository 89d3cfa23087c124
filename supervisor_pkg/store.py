"""The checkpoint layout on the shared volume, written for NFS semantics.

    CKPT_DIR/<CKPT_NAME>/                0700  one app's lineage
      latest                             0600  name of the newest published generation
      gen-00000007/                      0700  a published generation
        manifest.json                    0600  written last; lists size+sha256 of every file
        *.img, stats-dump ...            0600  CRIU's images
        parent -> ../gen-00000006              only in an incremental generation (see below)
        claim.json                       0600  the last restore of it: who, and whether its app ran
        rejected.json                    0600  why it must never be restored (its own fault only)
        app-changed.json                 0600  a replacement ran another app: not restored into it
        incompatible.json                0600  the last container that could not restore it, and why
      .staging-<host>-<pid>-<random>/    0700  a generation being written; never restored
      logs/                              0700  CRIU dump/restore logs

Publication (STYLE.md, "Storage on shared volumes"): write into a unique
staging directory, fsync every file, write the manifest (tmp -> fsync ->
rename), rename the directory to its generation name, fsync the parent, then
move the `latest` pointer. rename(2) of a directory onto an existing non-empty
one fails, so two writers can never publish the same number. A crash at any
point leaves either a staging directory (cleaned later, never restored) or a
complete generation.

"Newest" comes from what was published: the `latest` pointer and the
manifests, never from the mtime or order of a listing (NFS attribute caches can
make listings up to 60 s stale).

Claims are bookkeeping, not the guard against two copies: that is the lease
(lease.py), which a supervisor holds before it reads any claim. So a claim it
finds was made by an earlier holder, which is gone (it released the lease or
let it expire), and says how far that restore got: never resumed (the app never
ran: restore it again), resumed (the app ran and its instance died without a
newer checkpoint: a rollback), or ended (the app stopped on its own: its state
is superseded). Only `rejected.json` condemns a generation, and only for its own
faults (integrity, unusable images); a container that cannot restore it notes
why in `incompatible.json`, which nothing reads to decide.

Manifests of format 3 name their lineage, and are refused in any other; the app
they were made of (command, fingerprints of its files) is checked by the restore
flow (see fingerprint.py).

An incremental generation (a final dump that wrote only the pages dirtied
since a leave-running one, where the kernel has soft-dirty tracking) is
restorable only together with its parent: CRIU follows the `parent` symlink
for the pages it did not write. The manifest names the parent and the sha256
of the parent's manifest; verification checks the parent's files as well and
refuses a chain deeper than one; retention never removes a parent whose child
is kept.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from supervisor_pkg.errors import ConfigError, StoreError, VerificationFailed
from supervisor_pkg.volume import Directory, VolumeRefusal, parse_json_object, real_path, shown

log = logging.getLogger("criu-supervisor")

MANIFEST = "manifest.json"
CLAIM = "claim.json"
REJECTED = "rejected.json"
APP_CHANGED = "app-changed.json"
INCOMPATIBLE = "incompatible.json"
POINTER = "latest"
PARENT_LINK = "parent"  # CRIU's name for the link to the previous dump's images
# 3: the manifest names its lineage and its app (command, file fingerprints, version).
# 2: page images are hashed in PAGE_CHUNK pieces ("chunks"); 1 (whole-file sha256) is still read.
FORMAT_VERSION = 3
_READABLE_FORMATS = (1, 2, 3)
_GENERATION = re.compile(r"^gen-(\d{8})$")
MAX_GENERATION = 99_999_999  # gen-NNNNNNNN: the number never outgrows its eight digits
# What is read from the volume is bounded before it is parsed (a hostile file can be of any size):
MANIFEST_LIMIT = 16 << 20  # a manifest lists 1 chunk hash per 16 MiB of pages: a 64 GiB app needs ~300 KiB
RECORD_LIMIT = 1 << 20  # claims, rejections, notes
_POINTER_LIMIT = 64
_STAGING_PREFIX = ".staging-"
# Files that live in a generation directory but are not part of the checkpoint.
_BOOKKEEPING = {MANIFEST, CLAIM, REJECTED, APP_CHANGED, INCOMPATIBLE}
# Reads for hashing go through one reused buffer of this size per call: fresh
# multi-MiB bytes objects per read stayed in malloc's arenas after a restore's
# verification (+16 MiB RSS for the life of the supervisor).
_READ_SIZE = 1 << 20
# Page images are hashed in pieces of this size, each with its own sha256, so
# that verifying a big image uses every core (1.9x faster on 2 cores here)
# instead of one sequential sha256 (~0.65 s per GiB).
PAGE_CHUNK = 16 << 20
_CORES = min(8, len(os.sched_getaffinity(0)))  # the cores this container may use (a few)
ALL_CORES = max(2, _CORES)
# While CRIU restores, the pages are hashed on every core but one, which is left to CRIU: on 2 cores,
# hashing on both made CRIU's restore of 1 GiB take 1.09-1.87 s instead of 0.75-0.86 s, and one core
# (SHA-NI, ~1.7 GiB/s) still finishes before CRIU does (docs/performance.md).
BESIDE_CRIU = max(1, _CORES - 1)


def is_page_image(name: str) -> bool:
    return re.fullmatch(r"pages-\d+\.img", name) is not None


def generation_name(number: int) -> str:
    return f"gen-{number:08d}"


@dataclasses.dataclass(frozen=True)
class Generation:
    """A generation of the lineage. `path` is anchored at the lineage's open directory
    (/proc/PID/fd/N/gen-...), so that what CRIU and the hashing read is this lineage's,
    whatever was renamed or symlinked on the volume meanwhile; its own files are reached
    through `directory()`, one component at a time, never through a symlink."""

    number: int
    path: str
    lineage: Directory | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return generation_name(self.number)

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.path, MANIFEST)

    @contextlib.contextmanager
    def directory(self) -> Iterator[Directory]:
        """This generation's directory (VolumeRefusal if it is a symlink or not a directory)."""
        if self.lineage is None:
            with Directory.open(os.path.dirname(self.path)) as lineage, lineage.subdir(self.name) as own:
                yield own
            return
        with self.lineage.subdir(self.name) as own:
            yield own

    def has(self, filename: str) -> bool:
        try:
            with self.directory() as own:
                return own.exists(filename)
        except (OSError, VolumeRefusal):
            return False

    @property
    def claimed(self) -> bool:
        return self.has(CLAIM)

    @property
    def rejected(self) -> bool:
        return self.has(REJECTED)

    def read_bytes(self, filename: str, limit: int = RECORD_LIMIT) -> bytes:
        """A file of this generation; FileNotFoundError if missing, ValueError if it is not a plain file."""
        try:
            with self.directory() as own:
                return own.read_bytes(filename, limit)
        except VolumeRefusal as refusal:
            raise ValueError(refusal.message) from refusal

    def read_json(self, filename: str, limit: int = RECORD_LIMIT) -> dict[str, Any]:
        """A JSON object of this generation; ValueError if it is malformed or not a plain file."""
        data = self.read_bytes(filename, MANIFEST_LIMIT if filename == MANIFEST else limit)
        try:
            return parse_json_object(data, f"{self.name}/{filename}")
        except VolumeRefusal as refusal:
            raise ValueError(refusal.message) from refusal

    def write_json(self, filename: str, data: dict[str, Any]) -> None:
        """tmp -> fsync -> rename inside this generation's own directory (0600); OSError, VolumeRefusal."""
        with self.directory() as own:
            own.write_atomically(filename, _json_bytes(data))


@dataclasses.dataclass(frozen=True)
class Claim:
    """The last restore of a generation: who made it, and how far it got (see the module docstring)."""

    lease: str | None  # the lease token of the instance that restored it
    host: str | None
    container_id: str | None
    time: float
    resumed: float | None = None  # the restored app started running at this time
    ended: float | None = None  # ... and stopped on its own at this time, with exit_code
    exit_code: int | None = None
    attempt: int = 1

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Claim:
        """A claim read from the volume; ValueError unless every field has its type."""

        def number(key: str, optional: bool = True) -> float | None:
            value = data.get(key)
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"claim field {key!r} is not a number")
            return float(value)

        def text(key: str) -> str | None:
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"claim field {key!r} is not a string")
            return value

        attempt, exit_code = data.get("attempt", 1), data.get("exit_code")
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError("claim field 'attempt' is not a positive integer")
        if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)):
            raise ValueError("claim field 'exit_code' is not an integer")
        claimed = number("time", optional=False)
        assert claimed is not None
        return cls(lease=text("lease"), host=text("host"), container_id=text("container_id"), time=claimed,
                   resumed=number("resumed"), ended=number("ended"), exit_code=exit_code, attempt=attempt)

    def describe(self) -> str:
        return f"container {str(self.container_id or '?')[:12]} on host {self.host or '?'}"


def identity() -> dict[str, str | None]:
    """Where a checkpoint or claim comes from: host, container, image, and the engine that runs it (engine.py)."""
    from supervisor_pkg import engine

    running = engine.current()
    return {"host": running.host, "container_id": running.container_id,
            "image_id": os.environ.get("CKPT_IMAGE_ID"), "engine": running.kind, "pod": running.pod}


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, text: str) -> None:
    """tmp -> fsync -> rename: readers see the old file or the whole new one, never a part (0600)."""
    temporary = f"{path}.tmp-{secrets.token_hex(4)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _write_json_atomically(path: str, data: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _digest_range(fd: int, digest: Any, begin: int, end: int | None = None) -> int:
    """Feed bytes [begin, end) of `fd` (end None: to its end) to `digest`; return where reading stopped.

    hashlib releases the GIL while it hashes, so several threads hash on several cores.
    """
    buffer = memoryview(bytearray(_READ_SIZE))
    while end is None or begin < end:
        count = os.preadv(fd, [buffer[: _READ_SIZE if end is None else min(_READ_SIZE, end - begin)]], begin)
        if count == 0:
            break
        digest.update(buffer[:count])
        begin += count
    return begin


def hash_file(path: str, fsync: bool = False, fd: int | None = None) -> tuple[int, str]:
    """(size, sha256) of a file (or of the open `fd`, which is closed), read once; optionally fsync it too."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW) if fd is None else fd
    try:
        size = _digest_range(fd, digest, 0)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return size, digest.hexdigest()


@contextlib.contextmanager
def _at_fault(generation: Generation) -> Iterator[None]:
    """A VerificationFailed raised inside names `generation` as the one at fault."""
    try:
        yield
    except VerificationFailed as error:
        if error.generation is None:
            error.generation = generation.name
        raise


def _is_parent_link(directory: Directory, parent_name: str) -> bool:
    """`directory` holds exactly the symlink CRIU makes for a parent that is a sibling generation."""
    try:
        return directory.readlink(PARENT_LINK) == f"../{parent_name}"
    except (OSError, VolumeRefusal):
        return False


@functools.cache
def _sync_file_range() -> Any:
    import ctypes  # only on the first checkpoint: not part of the supervisor's start-up

    function = ctypes.CDLL(None, use_errno=True).sync_file_range
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Have the kernel start writing these bytes (0: to the end) to the volume now, without waiting.

    sync_file_range(SYNC_FILE_RANGE_WRITE): the later fsync then waits only for
    what is still in flight, instead of for the whole image. Advisory: where it
    is unavailable, the fsync simply does all the work.
    """
    with contextlib.suppress(AttributeError, OSError):
        _sync_file_range()(fd, offset, length, 2)


def _hash_range(fd: int, begin: int, end: int, digest: Any = None) -> str:
    """sha256 of bytes [begin, end) of `fd`, continuing `digest` if given (hashlib releases the GIL)."""
    digest = digest or hashlib.sha256()
    stopped = _digest_range(fd, digest, begin, end)
    if stopped < end:
        raise OSError(errno.EIO, f"file ended at {stopped} bytes, before {end}")
    return digest.hexdigest()


def hash_chunks(
    path: str, chunk_size: int | None = None, fsync: bool = False, workers: int = ALL_CORES, fd: int | None = None
) -> tuple[int, list[str]]:
    """(size, [sha256 of each chunk_size (default PAGE_CHUNK) piece]) of a file (or of the open `fd`, which is
    closed), hashed on `workers` threads."""
    chunk_size = chunk_size or PAGE_CHUNK
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW) if fd is None else fd
    try:
        size = os.fstat(fd).st_size
        starts = range(0, size, chunk_size)

        def piece(start: int) -> str:
            return _hash_range(fd, start, min(size, start + chunk_size))

        if workers == 1:  # in this thread: a daemon thread must not leave a pool that holds up the exit
            chunks = [piece(start) for start in starts]
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                chunks = list(pool.map(piece, starts))
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return size, chunks


def page_entry(size: int, chunks: list[str]) -> dict[str, Any]:
    """A page image's manifest entry: its size and one sha256 per PAGE_CHUNK piece."""
    return {"size": size, "chunk_size": PAGE_CHUNK, "chunks": chunks}


def describe_os_error(error: OSError, path: str) -> str:
    if error.errno == errno.EROFS:
        return f"the checkpoint volume is read-only ({path}); mount CKPT_DIR read-write"
    if error.errno == errno.ENOSPC:
        return f"the checkpoint volume is full ({path}); free space or use a larger volume"
    if error.errno == errno.EDQUOT:
        return f"the checkpoint volume's quota is exhausted ({path})"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write the checkpoint volume ({path}); check the volume's owner and mode"
    return f"I/O error on the checkpoint volume ({path}): {error.strerror}"


def read_signing_key(path: str | None) -> bytes | None:
    """The HMAC key from CKPT_SIGNING_KEY_FILE (a mounted secret). Never logged, never on the volume."""
    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            key = handle.read().strip()
    except OSError as error:
        raise ConfigError(f"CKPT_SIGNING_KEY_FILE={path!r} cannot be read: {error.strerror}") from error
    if len(key) < 16:
        raise ConfigError(f"CKPT_SIGNING_KEY_FILE={path!r} holds {len(key)} bytes: use a key of at least 16 bytes")
    return key


def sign(manifest: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 over the canonical JSON of the manifest without its signature."""
    unsigned = {k: v for k, v in manifest.items() if k != "signature"}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


class PageHasher(threading.Thread):
    """Hashes CRIU's page images while CRIU is still writing them.

    Hashing after the dump means reading every byte back (about 0.65 s per GiB
    here) while the app is frozen. CRIU writes pages-*.img strictly in order,
    append-only, and a reader never sees past the bytes already copied in
    (i_size grows as each page is copied), so following the file's end hashes
    it, chunk by chunk, on the other core while CRIU works. When CRIU writes
    faster than one core hashes (a fast page cache), `finish` hashes the rest
    on every core. Only page images are followed; every other file is small and
    hashed after the dump as before. The restore-side check re-hashes
    everything, so a wrong digest here could only make a checkpoint refused,
    never a corrupt one accepted.
    """

    def __init__(self, directory: str, poll: float = 0.02) -> None:
        super().__init__(name="page-hasher", daemon=True)
        self.directory = directory
        self.poll = poll
        self._stop_event = threading.Event()
        self._files: dict[str, _FollowedImage] = {}
        self._failed: set[str] = set()

    def __enter__(self) -> PageHasher:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop_event.set()
        self.join()
        for followed in self._files.values():
            with contextlib.suppress(OSError):
                os.close(followed.fd)

    def run(self) -> None:
        while not self._stop_event.wait(self.poll):
            self._catch_up()

    def _catch_up(self, follow: bool = True) -> None:
        try:
            names = [n for n in os.listdir(self.directory) if is_page_image(n)]
        except OSError:
            return
        for name in names:
            if name in self._failed:
                continue
            try:
                if name not in self._files:
                    self._files[name] = _FollowedImage(os.open(os.path.join(self.directory, name),
                                                               os.O_RDONLY | os.O_NOFOLLOW))
                if follow:
                    self._files[name].follow()
            except OSError:
                self._failed.add(name)  # hashed the slow way after the dump

    def finish(self) -> dict[str, dict[str, Any]]:
        """After CRIU returned: stop following, hash the rest on every core, return {name: manifest entry}."""
        self._stop_event.set()
        self.join()
        self._catch_up(follow=False)  # open images CRIU created since the last poll; hashed below
        entries = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=ALL_CORES) as pool:
            for name, followed in self._files.items():
                if name in self._failed:
                    continue
                try:
                    entries[name] = followed.finish(pool)
                except OSError:
                    continue  # hashed the slow way by publish
        return entries


@dataclasses.dataclass
class _FollowedImage:
    """One page image being hashed as CRIU appends to it: finished chunks, and the one in progress."""

    fd: int
    done: list[str] = dataclasses.field(default_factory=list)
    current: Any = dataclasses.field(default_factory=hashlib.sha256)
    offset: int = 0  # bytes hashed so far

    def follow(self) -> None:
        while True:
            boundary = (len(self.done) + 1) * PAGE_CHUNK
            self.offset = _digest_range(self.fd, self.current, self.offset, boundary)
            if self.offset < boundary:
                return  # CRIU has not written more yet
            self.done.append(self.current.hexdigest())
            self.current = hashlib.sha256()
            start_writeback(self.fd, boundary - PAGE_CHUNK, PAGE_CHUNK)

    def finish(self, pool: concurrent.futures.ThreadPoolExecutor) -> dict[str, Any]:
        """The rest in parallel: the chunk in progress continues its digest, each later chunk is hashed apart."""
        size = os.fstat(self.fd).st_size
        start = len(self.done) * PAGE_CHUNK
        start_writeback(self.fd, start)  # the rest goes to the volume while it is hashed
        rest = []
        if size > start:
            rest.append(pool.submit(_hash_range, self.fd, self.offset, min(size, start + PAGE_CHUNK), self.current))
            rest += [pool.submit(_hash_range, self.fd, begin, min(size, begin + PAGE_CHUNK))
                     for begin in range(start + PAGE_CHUNK, size, PAGE_CHUNK)]
        return page_entry(size, self.done + [future.result() for future in rest])


class Staging:
    """A generation being written. Never restored until `Store.publish`.

    `path` is anchored at the lineage's open directory, like Generation.path.
    """

    def __init__(self, path: str, name: str = "") -> None:
        self.path = path
        self.name = name or os.path.basename(path)


class Store:
    def __init__(self, root: str, name: str, keep: int = 2, signing_key: bytes | None = None) -> None:
        self.root = root
        self.name = name
        self.keep = keep
        self.signing_key = signing_key
        self.lineage = os.path.join(root, name)  # for messages; access goes through lineage_dir
        self._lineage_dir: Directory | None = None

    # --- opening -----------------------------------------------------------
    def open(self) -> None:
        """Create the lineage and its logs (0700) if missing, never through a symlink. Raises StoreError."""
        try:
            with Directory.open(self.root, create=True) as root:
                lineage = root.subdir(self.name, create=True, mode=0o700)
            try:
                lineage.subdir("logs", create=True, mode=0o700).close()
            except BaseException:
                lineage.close()
                raise
        except VolumeRefusal as refusal:
            raise StoreError(f"{refusal.message}: refusing to use it (the volume is shared: somebody put it there); "
                             f"remove it, or choose another CKPT_NAME") from refusal
        except OSError as error:
            raise StoreError(describe_os_error(error, self.lineage)) from error
        if self._lineage_dir is not None:
            self._lineage_dir.close()
        self._lineage_dir = lineage

    @property
    def lineage_dir(self) -> Directory | None:
        """The lineage's open directory (opened on first use, creating nothing); None if there is none."""
        if self._lineage_dir is None:
            try:
                with Directory.open(self.root) as root:
                    self._lineage_dir = root.subdir(self.name)
            except (OSError, VolumeRefusal):
                return None
        return self._lineage_dir

    @property
    def anchor(self) -> str:
        """A path to the lineage through its open fd, immune to renames and symlinks on the volume.

        /proc/<our pid>/fd/N rather than /proc/self: our children (CRIU's lazy-pages
        daemon) are handed these paths too, and reach the same directory through it.
        """
        lineage = self.lineage_dir
        if lineage is None or not os.path.isdir(f"/proc/{os.getpid()}/fd"):
            return self.lineage
        return f"/proc/{os.getpid()}/fd/{lineage.fd}"

    @property
    def logs(self) -> str:
        return f"{self.anchor}/logs"

    def shown(self, path: str) -> str:
        """A path for messages: the lineage's real path instead of its fd anchor."""
        return real_path(path)

    # --- reading what was published ----------------------------------------
    def generations(self) -> list[Generation]:
        """Published generations, newest first: the pointer plus every manifest found.

        A symlink named like a generation is listed too, so that verify says what
        it is; anything else of that name (a FIFO, a file) is not a generation.
        """
        lineage = self.lineage_dir
        if lineage is None:
            return []
        numbers: set[int] = set()
        try:
            entries = lineage.entries()
        except OSError:
            entries = []
        for entry in entries:
            match = _GENERATION.match(entry.name)
            if match and (entry.kind == "symlink" or (entry.kind == "dir" and self._has_manifest(entry.name))):
                numbers.add(int(match.group(1)))
        pointed = self._pointer()
        if pointed is not None and self._has_manifest(generation_name(pointed)):
            numbers.add(pointed)  # a listing may be stale on NFS: the pointer is a hint, checked here
        return [self._generation(n) for n in sorted(numbers, reverse=True)]

    def _generation(self, number: int) -> Generation:
        return Generation(number, f"{self.anchor}/{generation_name(number)}", self.lineage_dir)

    def _has_manifest(self, name: str) -> bool:
        lineage = self.lineage_dir
        try:
            with lineage.subdir(name) as generation:  # type: ignore[union-attr]
                return generation.exists(MANIFEST)
        except (OSError, VolumeRefusal, AttributeError):
            return False

    def named(self, name: str) -> Generation:
        """The generation called `name` (gen-NNNNNNNN) in this lineage, published or not."""
        match = _GENERATION.match(name)
        if match is None:
            raise ValueError(f"not a generation name: {name!r}")
        return self._generation(int(match.group(1)))

    def _pointer(self) -> int | None:
        lineage = self.lineage_dir
        if lineage is None:
            return None
        try:
            text = lineage.read_bytes(POINTER, _POINTER_LIMIT).decode("ascii", "replace").strip()
        except (OSError, VolumeRefusal):
            return None
        match = _GENERATION.match(text)
        return int(match.group(1)) if match else None

    def newest_number(self) -> int:
        """The highest generation number ever used: published, or remembered by the pointer.

        The pointer keeps numbers from being reused after generations were
        deleted; one that leaves no number after it (gen-99999999, written by
        somebody else) is not believed.
        """
        pointed = self._pointer() or 0
        return max([g.number for g in self.generations()] + [pointed if pointed < MAX_GENERATION else 0])

    # --- writing a generation ----------------------------------------------
    def _require_lineage(self) -> Directory:
        lineage = self.lineage_dir
        if lineage is None:
            self.open()
            lineage = self.lineage_dir
        assert lineage is not None
        return lineage

    @contextlib.contextmanager
    def staging(self) -> Iterator[Staging]:
        """A fresh staging directory; removed on any failure."""
        host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40]
        name = f"{_STAGING_PREFIX}{host}-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            lineage = self._require_lineage()
            lineage.create_subdir(name, 0o700).close()
        except VolumeRefusal as refusal:
            raise StoreError(refusal.message) from refusal
        except OSError as error:
            raise StoreError(describe_os_error(error, self.lineage)) from error
        staging = Staging(f"{self.anchor}/{name}", name)
        try:
            yield staging
        except BaseException:
            self.discard(staging)
            raise

    def discard(self, staging: Staging) -> None:
        lineage = self.lineage_dir
        if lineage is not None:
            with contextlib.suppress(OSError, VolumeRefusal):
                lineage.remove_tree(staging.name)

    def publish(
        self,
        staging: Staging,
        metadata: dict[str, Any],
        before_rename: Callable[[], None] | None = None,
        hashed: dict[str, dict[str, Any]] | None = None,
        parent: Generation | None = None,
    ) -> Generation:
        """Hash+fsync every file, write the manifest, rename into place, move the pointer.

        `before_rename` is the fencing check (do we still hold the lease?); if it
        raises, nothing is published and the staging directory is removed.
        `parent` is the generation an incremental dump's `parent` link points to.
        """
        lineage = self._require_lineage()
        try:
            with lineage.subdir(staging.name) as own:
                files = self._hash_tree(own, staging.path, hashed or {}, parent)
                if parent is not None:
                    metadata = {**metadata, "parent": {"generation": parent.name,
                                                       "manifest_sha256": hashlib.sha256(
                                                           parent.read_bytes(MANIFEST, MANIFEST_LIMIT)).hexdigest()}}
                number = self.newest_number() + 1
                manifest = {
                    "format_version": FORMAT_VERSION,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "created_unix": time.time(),
                    "lineage": self.name,
                    "source": identity(),
                    "kernel": os.uname().release,
                    "machine": os.uname().machine,
                    **metadata,
                    "files": files,
                }
                while True:
                    if number > MAX_GENERATION:
                        raise StoreError(f"no generation number is left after {generation_name(number - 1)} in "
                                         f"{self.lineage}: remove that generation (written by somebody else?)")
                    manifest["generation"] = number
                    if self.signing_key is not None:
                        manifest["signature"] = {"algorithm": "hmac-sha256", "value": sign(manifest, self.signing_key)}
                    own.write_atomically(MANIFEST, _json_bytes(manifest))
                    own.fsync()
                    if before_rename is not None:
                        before_rename()
                    try:
                        lineage.rename(staging.name, lineage, generation_name(number))
                        break
                    except OSError as error:
                        # Another writer took this number first (rename onto a non-empty dir), or
                        # something else sits at that name (ENOTDIR): never replaced, the next number.
                        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                            raise
                        number += 1
        except (OSError, ValueError) as error:
            self.discard(staging)
            if isinstance(error, OSError):
                raise StoreError(describe_os_error(error, self.shown(staging.path))) from error
            raise StoreError(f"cannot publish: {error}") from error
        except BaseException:
            self.discard(staging)
            raise
        # Published: the rename made it restorable. What follows only speeds up
        # readers and durability of the listing; a failure here must not make the
        # caller believe the checkpoint failed (it would then stop the app and the
        # replacement would restore the state from before that stop).
        try:
            lineage.fsync()
            self._write_pointer(number)
        except (OSError, VolumeRefusal) as error:
            reason = error.message if isinstance(error, VolumeRefusal) else describe_os_error(error, self.lineage)
            log.warning("%s published, but updating the lineage afterwards failed: %s", generation_name(number), reason)
        return self._generation(number)

    def _write_pointer(self, number: int) -> None:
        # Only ever move the pointer forward: a slow writer must not hide a newer generation.
        if number <= (self._pointer() or 0) < MAX_GENERATION:
            return
        lineage = self._require_lineage()
        lineage.write_atomically(POINTER, (generation_name(number) + "\n").encode())
        lineage.fsync()

    def _hash_tree(
        self, directory: Directory, path: str, hashed: dict[str, dict[str, Any]], parent: Generation | None = None
    ) -> dict[str, dict[str, Any]]:
        """Manifest entries (size, sha256 or chunk digests) of every file, fsynced.

        `hashed` holds entries computed while CRIU wrote; a file whose size
        changed since is hashed again.
        """
        entries = directory.entries()
        names = sorted(entry.name for entry in entries)
        if parent is not None:
            if not _is_parent_link(directory, parent.name):
                raise StoreError(f"an incremental checkpoint lacks its link to {parent.name}")
            names.remove(PARENT_LINK)
        kinds = {entry.name: entry.kind for entry in entries}
        for name in names:
            if kinds[name] != "file":
                raise StoreError(f"unexpected non-file {name!r} in a checkpoint")
            directory.chmod(name, 0o600)  # CRIU writes 0644; checkpoints hold secrets

        def entry(name: str) -> dict[str, Any]:
            fd = directory.open_file(name)
            if name in hashed and hashed[name]["size"] == os.fstat(fd).st_size:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                return hashed[name]
            if is_page_image(name):
                return page_entry(*hash_chunks(os.path.join(path, name), fsync=True, fd=fd))
            size, sha = hash_file(os.path.join(path, name), fsync=True, fd=fd)
            return {"size": size, "sha256": sha}

        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            return dict(zip(names, pool.map(entry, names), strict=True))

    # --- verification, claims, rejection -----------------------------------
    def verify(
        self, generation: Generation, local_criu_version: str | None = None, defer_pages: bool = False
    ) -> dict[str, Any]:
        """Check the manifest and every file, the parent's too; return the manifest or raise VerificationFailed.

        With `defer_pages`, page images (pages-*.img) are checked for presence and
        size only; the caller must hash them later with `verify_pages` (a lazy
        restore does so in the background).
        """
        manifest = self._verify_one(generation, local_criu_version, defer_pages)
        chain = self.parent_of(generation, manifest)
        if chain is not None:
            parent, parent_manifest = chain
            with _at_fault(parent):
                self._verify_one(parent, local_criu_version, defer_pages, parent_manifest)
            if parent_manifest.get("parent") is not None:
                raise VerificationFailed(f"{generation.name}: its parent {parent.name} has a parent itself; "
                                         "chains deeper than one are never written")
            if "compression" in manifest or "compression" in parent_manifest:
                raise VerificationFailed(f"{generation.name}: an incremental checkpoint with compressed pages "
                                         "is never written")
        return manifest

    def parent_of(self, generation: Generation, manifest: dict[str, Any]) -> tuple[Generation, dict[str, Any]] | None:
        """The generation an incremental one depends on and its manifest (link, name and hash checked), or None.

        The parent's manifest is read once, hashed and parsed from the same
        bytes, so that what is verified next is what the hash was taken of.
        """
        record = manifest.get("parent")
        if record is None:
            return None
        name = record.get("generation") if isinstance(record, dict) else None
        match = _GENERATION.match(name) if isinstance(name, str) else None
        if match is None or not isinstance(name, str) or int(match.group(1)) >= generation.number:
            raise VerificationFailed(f"{generation.name}: manifest names a malformed parent {record!r:.100}")
        try:
            with generation.directory() as own:
                linked = _is_parent_link(own, name)
        except (OSError, VolumeRefusal):
            linked = False
        if not linked:
            raise VerificationFailed(f"{generation.name}: its link to the parent {name} is missing or wrong")
        parent = self.named(name)
        try:
            raw = parent.read_bytes(MANIFEST, MANIFEST_LIMIT)
        except (OSError, ValueError) as error:
            raise VerificationFailed(f"{generation.name}: its parent {name}, which holds its unchanged pages, "
                                     f"is missing or unreadable ({_reason(error)})") from error
        if hashlib.sha256(raw).hexdigest() != record.get("manifest_sha256"):
            raise VerificationFailed(f"{generation.name}: its parent {name} is not the checkpoint it was dumped "
                                     "against (the parent's manifest changed)")
        try:
            parent_manifest = parse_json_object(raw, f"{name}/{MANIFEST}")
        except VolumeRefusal as refusal:
            raise VerificationFailed(f"{name}: manifest unreadable: {refusal.message}", generation=name) from refusal
        with _at_fault(parent):
            check_manifest(name, parent_manifest)
        return parent, parent_manifest

    def verify_pages(self, generation: Generation, manifest: dict[str, Any], workers: int = 1) -> None:
        """Hash the page images deferred by verify(defer_pages=True): the generation's and its parent's.

        One worker by default: this runs beside a lazily restored app, which needs the other cores.
        """
        members = [(generation, manifest), *filter(None, [self.parent_of(generation, manifest)])]
        for member, member_manifest in members:
            with _at_fault(member), _opened(member) as own:
                for name, expected in member_manifest["files"].items():
                    if is_page_image(name):
                        self._verify_file(member, own, name, expected, workers=workers)

    def memory_bytes(self, generation: Generation, manifest: dict[str, Any]) -> int:
        """Bytes of page images a restore reads (uncompressed), the parent's included."""
        members = [manifest]
        with contextlib.suppress(VerificationFailed):
            members += [chain[1] for chain in filter(None, [self.parent_of(generation, manifest)])]
        total = 0
        for member in members:
            total += sum(int(entry["size"]) for name, entry in member.get("files", {}).items() if is_page_image(name))
            compressed = (member.get("compression") or {}).get("pages", {})
            total += sum(int(entry["raw_size"]) for entry in compressed.values())
        return total

    def _verify_one(
        self, generation: Generation, local_criu_version: str | None, defer_pages: bool,
        manifest: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        with _opened(generation) as own:
            if manifest is None:
                try:
                    raw = own.read_bytes(MANIFEST, MANIFEST_LIMIT)
                    manifest = parse_json_object(raw, f"{generation.name}/{MANIFEST}")
                except (OSError, VolumeRefusal) as error:
                    raise VerificationFailed(f"{generation.name}: manifest unreadable: {_reason(error)}") from error
                check_manifest(generation.name, manifest)
            self._check_signature(generation, manifest)
            if manifest["format_version"] not in _READABLE_FORMATS:
                raise VerificationFailed(f"{generation.name}: unknown manifest format {manifest['format_version']!r} "
                                         "(written by a newer criu-supervisor?)", here_only=True)
            if manifest["generation"] != generation.number:
                raise VerificationFailed(f"{generation.name}: manifest names generation {manifest['generation']!r}")
            if manifest["format_version"] >= 3 and manifest.get("lineage") != self.name:
                made_for = repr(manifest.get("lineage"))[:80]
                raise VerificationFailed(f"{generation.name}: it was made for the lineage {made_for}, "
                                         f"not {self.name!r} (copied from another app's checkpoints?)")
            if manifest["machine"] != os.uname().machine:
                raise VerificationFailed(
                    f"{generation.name}: made on {manifest['machine']!r:.40}, this machine is {os.uname().machine}",
                    here_only=True,
                )
            if local_criu_version is not None:
                self._check_criu_version(generation, manifest.get("criu_version") or "", local_criu_version)
            files = manifest["files"]
            if not files:
                raise VerificationFailed(f"{generation.name}: manifest lists no files")
            try:
                present = {entry.name for entry in own.entries()} - _BOOKKEEPING
            except OSError as error:
                raise VerificationFailed(f"{generation.name}: cannot list it ({error.strerror})") from error
            if manifest.get("parent") is not None:
                present.discard(PARENT_LINK)  # checked by parent_of
            unexpected = sorted(present - set(files))
            if unexpected:
                raise VerificationFailed(f"{generation.name}: files not in the manifest: "
                                         f"{', '.join(shown(name) for name in unexpected[:5])}")
            for name, expected in files.items():
                self._verify_file(generation, own, name, expected, hash_it=not (defer_pages and is_page_image(name)))
        return manifest

    def _check_signature(self, generation: Generation, manifest: dict[str, Any]) -> None:
        if self.signing_key is None:
            return
        signature = manifest.get("signature")
        if not isinstance(signature, dict) or signature.get("algorithm") != "hmac-sha256":
            raise VerificationFailed(f"{generation.name}: the manifest is not signed, and CKPT_SIGNING_KEY_FILE is set")
        if not hmac.compare_digest(str(signature.get("value", "")), sign(manifest, self.signing_key)):
            raise VerificationFailed(f"{generation.name}: the manifest's signature is wrong (tampered, or another key)")

    def free_bytes(self) -> int | None:
        lineage = self.lineage_dir
        try:
            info = os.fstatvfs(lineage.fd) if lineage is not None else os.statvfs(self.root)
        except OSError:
            return None
        return info.f_bavail * info.f_frsize

    @staticmethod
    def _check_criu_version(generation: Generation, dumped: str, local: str) -> None:
        from supervisor_pkg.criu import version_tuple

        if not dumped or not version_tuple(dumped):
            raise VerificationFailed(f"{generation.name}: manifest does not record the CRIU version")
        if version_tuple(local)[:2] < version_tuple(dumped)[:2]:
            raise VerificationFailed(
                f"{generation.name}: dumped by CRIU {dumped:.20}, but this image has CRIU {local}; "
                "restore needs the same or a newer CRIU",
                here_only=True,
            )

    @staticmethod
    def _verify_file(
        generation: Generation, directory: Directory, name: str, expected: Any, hash_it: bool = True,
        workers: int = ALL_CORES,
    ) -> None:
        try:
            info = directory.lstat(name)
        except FileNotFoundError as error:
            raise VerificationFailed(f"{generation.name}: {name} is missing ({error.strerror})") from error
        except (OSError, VolumeRefusal) as error:
            raise VerificationFailed(f"{generation.name}: {name} is unreadable ({_reason(error)})") from error
        if not stat.S_ISREG(info.st_mode):
            raise VerificationFailed(f"{generation.name}: {name} is not a regular file")
        if info.st_size != expected["size"]:
            raise VerificationFailed(
                f"{generation.name}: {name} is {info.st_size} bytes, the manifest says {expected['size']} (truncated?)"
            )
        if not hash_it:
            return
        try:
            fd = directory.open_file(name)
            if "chunks" in expected:
                _, chunks = hash_chunks(name, expected["chunk_size"], workers=workers, fd=fd)
                matches = chunks == expected["chunks"]
            else:
                matches = hash_file(name, fd=fd)[1] == expected["sha256"]
        except (OSError, VolumeRefusal) as error:
            raise VerificationFailed(f"{generation.name}: {name} is unreadable ({_reason(error)})") from error
        if not matches:
            raise VerificationFailed(f"{generation.name}: {name} does not match its sha256 (corrupted or tampered)")

    def read_claim(self, generation: Generation) -> Claim | None:
        """The generation's last claim, None if it was never claimed. ValueError if the file is malformed."""
        try:
            data = generation.read_json(CLAIM)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise ValueError(f"{CLAIM} unreadable: {error.strerror}") from error
        return Claim.parse(data)

    def claim(self, generation: Generation, lease_token: str) -> Claim:
        """Record that the lease holder `lease_token` restores `generation` now.

        An earlier claim is void (its holder no longer holds the lease): it is
        replaced, and counted in `attempt`. Raises StoreError if the volume
        refuses the write.
        """
        try:
            earlier = self.read_claim(generation)
        except ValueError:
            earlier = None
        source = identity()
        claim = Claim(lease=lease_token, host=source["host"], container_id=source["container_id"], time=time.time(),
                      attempt=min((earlier.attempt + 1) if earlier else 1, 1_000_000))
        self._write_claim(generation, claim)
        return claim

    def mark_resumed(self, generation: Generation, claim: Claim) -> Claim:
        """The restored app is about to run: a later instance that finds this claim knows it ran."""
        resumed = dataclasses.replace(claim, resumed=time.time())
        self._write_claim(generation, resumed)
        return resumed

    def mark_ended(self, generation: Generation, claim: Claim, exit_code: int) -> None:
        """The app restored from `generation` stopped on its own: its state is superseded, never restored again."""
        with contextlib.suppress(StoreError):
            self._write_claim(generation, dataclasses.replace(claim, ended=time.time(), exit_code=exit_code))

    def _write_claim(self, generation: Generation, claim: Claim) -> None:
        try:
            generation.write_json(CLAIM, dataclasses.asdict(claim))
        except VolumeRefusal as refusal:
            raise StoreError(f"cannot claim {generation.name}: {refusal.message}") from refusal
        except OSError as error:
            raise StoreError(f"cannot claim {generation.name}: "
                             f"{describe_os_error(error, self.shown(generation.path))}") from error

    def note(self, generation: Generation, filename: str, reason: str) -> None:
        """Record why a generation was not restored here, without condemning it (APP_CHANGED, INCOMPATIBLE)."""
        assert filename in (APP_CHANGED, INCOMPATIBLE)
        with contextlib.suppress(OSError, VolumeRefusal):
            generation.write_json(filename, {"reason": reason, "time": time.time(), **identity()})

    def reject(self, generation: Generation, reason: str, culprit: str | None = None) -> None:
        """Record on the volume why this generation must never be restored.

        `culprit`: another generation at fault (an incremental one's parent), rejected with it.
        """
        with contextlib.suppress(OSError, VolumeRefusal):
            generation.write_json(REJECTED, {"reason": reason, "time": time.time(), **identity()})
        if culprit not in (None, generation.name) and isinstance(culprit, str) and _GENERATION.match(culprit):
            self.reject(self.named(culprit), f"as the parent of {generation.name}: {reason}")

    # --- retention -----------------------------------------------------------
    def prune(self, keep: int | None = None, protect: set[int] | None = None) -> list[str]:
        """Delete all but the newest `keep` usable generations, and stale staging dirs."""
        keep = self.keep if keep is None else keep
        protect = protect or set()
        removed: list[str] = []
        usable = 0
        needed: set[int] = set()  # parents of generations that stay
        lineage = self.lineage_dir
        if lineage is None:
            return []
        for generation in self.generations():  # newest first, so a child comes before its parent
            kept = generation.number in protect or generation.number in needed
            if not generation.rejected:
                usable += 1
                kept = kept or usable <= keep
            if kept or self._restore_in_progress(generation):
                needed |= self._parent_number(generation)
                continue
            with contextlib.suppress(OSError, VolumeRefusal):
                if lineage.remove_tree(generation.name):
                    removed.append(generation.name)
        removed += self.clean_stale_staging()
        return removed

    @staticmethod
    def _parent_number(generation: Generation) -> set[int]:
        """{the parent's number} for an incremental generation, else {} (unreadable: nothing to keep)."""
        try:
            name = (generation.read_json(MANIFEST).get("parent") or {}).get("generation", "")
        except (OSError, ValueError, AttributeError):
            return set()
        match = _GENERATION.match(name) if isinstance(name, str) else None
        return {int(match.group(1))} if match else set()

    def _restore_in_progress(self, generation: Generation, window: float = 600.0) -> bool:
        """Claimed, not yet resumed nor rejected, and recent: CRIU may still be reading it."""
        if generation.rejected:
            return False
        try:
            claim = self.read_claim(generation)
        except ValueError:
            return False
        return claim is not None and claim.resumed is None and time.time() - claim.time < window

    def clean_stale_staging(self, older_than: float = 3600.0) -> list[str]:
        """Remove staging dirs of crashed writers, never through a symlink; skip NFS silly-rename files."""
        lineage = self.lineage_dir
        if lineage is None:
            return []
        removed = []
        now = time.time()
        try:
            entries = lineage.entries()
        except OSError:
            return []
        for entry in entries:
            if not entry.name.startswith(_STAGING_PREFIX):
                continue
            with contextlib.suppress(OSError, VolumeRefusal):
                if now - lineage.lstat(entry.name).st_mtime < older_than:
                    continue
                # A symlink named like a staging dir: only the link goes. A .nfsXXXX file inside keeps
                # the directory until the next clean-up (remove_tree leaves it, and says so).
                if lineage.remove_tree(entry.name):
                    removed.append(entry.name)
        return removed


@contextlib.contextmanager
def _opened(generation: Generation) -> Iterator[Directory]:
    """The generation's directory, or VerificationFailed naming what is there instead."""
    try:
        context = generation.directory()
        own = context.__enter__()
    except FileNotFoundError as error:
        raise VerificationFailed(f"{generation.name} is missing") from error
    except (OSError, VolumeRefusal) as error:
        raise VerificationFailed(f"{generation.name}: {_reason(error)}") from error
    try:
        yield own
    finally:
        context.__exit__(None, None, None)


def _reason(error: BaseException) -> str:
    if isinstance(error, VolumeRefusal):
        return error.message
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)


def _is_hex(value: Any, length: int = 64) -> bool:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_manifest(name: str, manifest: dict[str, Any]) -> None:
    """Every field the supervisor reads has its type: VerificationFailed naming the first that has not.

    A manifest comes from the shared volume: after this check, the code that
    reads it (verification, the restore flow, compression, `list`) cannot trip
    over a value of the wrong kind, signing key or not.
    """

    def need(condition: bool, what: str) -> None:
        if not condition:
            raise VerificationFailed(f"{name}: manifest is malformed: {what}")

    def optional(key: str, kind: type | tuple[type, ...]) -> None:
        need(manifest.get(key) is None or isinstance(manifest.get(key), kind), f"{key!r} has the wrong type")

    need(_is_int(manifest.get("format_version")), "no format_version")
    if manifest["format_version"] not in _READABLE_FORMATS:
        return  # a newer format: refused here_only, by the caller, without judging its fields
    need(_is_int(manifest.get("generation")), "no generation number")
    for key in ("created", "kernel", "machine"):
        need(isinstance(manifest.get(key), str), f"{key!r} is not a string")
    optional("criu_version", str)
    need(isinstance(manifest.get("created_unix"), (int, float)) and not isinstance(manifest.get("created_unix"), bool),
         "'created_unix' is not a number")
    if manifest["format_version"] >= 3:
        need(isinstance(manifest.get("lineage"), str), "'lineage' is not a string")
    for key in ("lineage", "restored_from"):
        optional(key, str)
    for key in ("source", "stats", "signature", "app", "parent", "compression", "cpu"):
        optional(key, dict)
    cpu_record = manifest.get("cpu") or {}
    need(isinstance(cpu_record.get("flags", []), list) and all(isinstance(f, str) for f in cpu_record.get("flags", []))
         and all(isinstance(cpu_record.get(key, ""), str) for key in ("vendor", "model", "level", "baseline")),
         "'cpu' is malformed")
    for key, value in (manifest.get("source") or {}).items():
        need(value is None or isinstance(value, str), f"source.{key} is not a string")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise VerificationFailed(f"{name}: manifest is malformed: 'files' is not an object")
    for file_name, entry in files.items():
        need(isinstance(file_name, str) and "/" not in file_name and "\0" not in file_name
             and file_name not in ("", ".", "..") and file_name not in _BOOKKEEPING,
             f"it names an unsafe path {file_name!r:.80}")
        need(isinstance(entry, dict) and _is_int(entry.get("size")) and entry["size"] >= 0,
             f"manifest entry for {file_name} is malformed")
        if "chunks" in entry:
            chunk_size, chunks = entry.get("chunk_size"), entry.get("chunks")
            need(_is_int(chunk_size) and chunk_size >= 4096, f"manifest entry for {file_name} has a bad chunk size")
            need(isinstance(chunks, list) and all(_is_hex(c) for c in chunks)
                 and len(chunks) == -(-entry["size"] // chunk_size), f"the entry of {file_name} has bad chunk hashes")
        else:
            need(_is_hex(entry.get("sha256")), f"the entry of {file_name} has no sha256")
    app = manifest.get("app") or {}
    stdio = app.get("stdio", {})
    need(isinstance(stdio, dict) and all(k in ("0", "1", "2") and isinstance(v, str) for k, v in stdio.items()),
         "'app.stdio' is not a map of fds 0-2 to strings")
    command = app.get("command")
    need(command is None or (isinstance(command, list) and all(isinstance(part, str) for part in command)),
         "'app.command' is not a list of strings")
    need(app.get("version") is None or isinstance(app.get("version"), str), "'app.version' is not a string")
    need(isinstance(app.get("own_mount_namespace", False), bool), "'app.own_mount_namespace' is not a boolean")
    app_files = app.get("files", {})
    need(isinstance(app_files, dict) and all(
        isinstance(path, str) and isinstance(print_, dict) and _is_int(print_.get("size"))
        and _is_int(print_.get("mtime_ns")) and _is_hex(print_.get("sha256"))
        for path, print_ in app_files.items()), "'app.files' is not a map of paths to fingerprints")
    ports = app.get("listening_ports", [])
    need(isinstance(ports, list) and all(_is_int(port) for port in ports), "'app.listening_ports' is not a list")
    parent = manifest.get("parent")
    if parent is not None:
        need(isinstance(parent.get("generation"), str) and isinstance(parent.get("manifest_sha256", ""), str),
             "'parent' is malformed")
    compression = manifest.get("compression")
    if compression is not None:
        need(compression.get("algorithm") in ("zstd", "lz4"), "'compression.algorithm' is unknown")
        pages = compression.get("pages")
        need(isinstance(pages, dict), "'compression.pages' is not an object")
        for packed, record in pages.items():
            need(packed in files and isinstance(record, dict) and is_page_image(str(record.get("raw_name")))
                 and _is_int(record.get("raw_size")) and record["raw_size"] >= 0,
                 f"'compression.pages' entry {packed!r:.80} is malformed")
