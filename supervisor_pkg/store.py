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
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from supervisor_pkg.errors import ConfigError, StoreError, VerificationFailed

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
ALL_CORES = min(8, max(2, len(os.sched_getaffinity(0))))  # the cores this container may use (a few)


def is_page_image(name: str) -> bool:
    return re.fullmatch(r"pages-\d+\.img", name) is not None


def generation_name(number: int) -> str:
    return f"gen-{number:08d}"


@dataclasses.dataclass(frozen=True)
class Generation:
    number: int
    path: str

    @property
    def name(self) -> str:
        return generation_name(self.number)

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.path, MANIFEST)

    def has(self, filename: str) -> bool:
        return os.path.exists(os.path.join(self.path, filename))

    @property
    def claimed(self) -> bool:
        return self.has(CLAIM)

    @property
    def rejected(self) -> bool:
        return self.has(REJECTED)

    def read_json(self, filename: str) -> dict[str, Any]:
        with open(os.path.join(self.path, filename)) as handle:
            data = json.load(handle)
        if not isinstance(data, dict):
            raise ValueError(f"{filename} is not a JSON object")
        return data


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
    """Where a checkpoint or claim comes from: host, container, image."""
    return {
        "host": os.environ.get("CKPT_HOST_NAME") or os.environ.get("NODE_NAME") or socket.gethostname(),
        "container_id": _container_id(),
        "image_id": os.environ.get("CKPT_IMAGE_ID"),
    }


def _container_id() -> str | None:
    try:
        with open("/proc/self/mountinfo") as handle:
            for line in handle:
                match = re.search(r"/containers/([0-9a-f]{64})/", line)
                if match:
                    return match.group(1)
    except OSError:
        pass
    return os.environ.get("HOSTNAME")


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


def hash_file(path: str, fsync: bool = False) -> tuple[int, str]:
    """(size, sha256) of a file, read once; optionally fsync it in the same pass."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
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


def _is_parent_link(path: str, parent_name: str) -> bool:
    """`path` is exactly the symlink CRIU makes for a parent that is a sibling generation."""
    try:
        return os.readlink(path) == f"../{parent_name}"
    except OSError:
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
    path: str, chunk_size: int | None = None, fsync: bool = False, workers: int = ALL_CORES
) -> tuple[int, list[str]]:
    """(size, [sha256 of each chunk_size (default PAGE_CHUNK) piece]) of a file, hashed on `workers` threads."""
    chunk_size = chunk_size or PAGE_CHUNK
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
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


def _describe_os_error(error: OSError, path: str) -> str:
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
    """A generation being written. Never restored until `Store.publish`."""

    def __init__(self, path: str) -> None:
        self.path = path


class Store:
    def __init__(self, root: str, name: str, keep: int = 2, signing_key: bytes | None = None) -> None:
        self.root = root
        self.name = name
        self.keep = keep
        self.signing_key = signing_key
        self.lineage = os.path.join(root, name)
        self.logs = os.path.join(self.lineage, "logs")

    # --- opening -----------------------------------------------------------
    def open(self) -> None:
        """Create the lineage (0700) if missing. Raises StoreError if it cannot."""
        try:
            os.makedirs(self.root, exist_ok=True)
            for path in (self.lineage, self.logs):
                os.makedirs(path, mode=0o700, exist_ok=True)
                os.chmod(path, 0o700)
        except OSError as error:
            raise StoreError(_describe_os_error(error, self.lineage)) from error

    # --- reading what was published ----------------------------------------
    def generations(self) -> list[Generation]:
        """Published generations, newest first: the pointer plus every manifest found."""
        numbers: set[int] = set()
        with contextlib.suppress(OSError):
            for entry in os.listdir(self.lineage):
                match = _GENERATION.match(entry)
                if match and os.path.exists(os.path.join(self.lineage, entry, MANIFEST)):
                    numbers.add(int(match.group(1)))
        pointed = self._pointer()
        if pointed is not None and os.path.exists(os.path.join(self.lineage, generation_name(pointed), MANIFEST)):
            numbers.add(pointed)
        return [Generation(n, os.path.join(self.lineage, generation_name(n))) for n in sorted(numbers, reverse=True)]

    def named(self, name: str) -> Generation:
        """The generation called `name` (gen-NNNNNNNN) in this lineage, published or not."""
        match = _GENERATION.match(name)
        if match is None:
            raise ValueError(f"not a generation name: {name!r}")
        return Generation(int(match.group(1)), os.path.join(self.lineage, name))

    def _pointer(self) -> int | None:
        try:
            with open(os.path.join(self.lineage, POINTER)) as handle:
                match = _GENERATION.match(handle.read().strip())
        except OSError:
            return None
        return int(match.group(1)) if match else None

    def newest_number(self) -> int:
        """The highest generation number ever used (published or pointed to)."""
        gens = self.generations()
        return max([g.number for g in gens] + [self._pointer() or 0])

    # --- writing a generation ----------------------------------------------
    @contextlib.contextmanager
    def staging(self) -> Iterator[Staging]:
        """A fresh staging directory; removed on any failure."""
        host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40]
        path = os.path.join(self.lineage, f"{_STAGING_PREFIX}{host}-{os.getpid()}-{secrets.token_hex(6)}")
        try:
            os.makedirs(self.lineage, mode=0o700, exist_ok=True)
            os.mkdir(path, 0o700)
        except OSError as error:
            raise StoreError(_describe_os_error(error, self.lineage)) from error
        staging = Staging(path)
        try:
            yield staging
        except BaseException:
            self.discard(staging)
            raise

    def discard(self, staging: Staging) -> None:
        shutil.rmtree(staging.path, ignore_errors=True)

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
        try:
            files = self._hash_tree(staging.path, hashed or {}, parent)
            if parent is not None:
                metadata = {**metadata, "parent": {"generation": parent.name,
                                                   "manifest_sha256": hash_file(parent.manifest_path)[1]}}
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
                manifest["generation"] = number
                if self.signing_key is not None:
                    manifest["signature"] = {"algorithm": "hmac-sha256", "value": sign(manifest, self.signing_key)}
                _write_json_atomically(os.path.join(staging.path, MANIFEST), manifest)
                _fsync_path(staging.path, directory=True)
                if before_rename is not None:
                    before_rename()
                target = os.path.join(self.lineage, generation_name(number))
                try:
                    os.rename(staging.path, target)
                    break
                except OSError as error:
                    # Another writer took this number first (rename onto a non-empty dir).
                    if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    number += 1
        except OSError as error:
            self.discard(staging)
            raise StoreError(_describe_os_error(error, staging.path)) from error
        except BaseException:
            self.discard(staging)
            raise
        # Published: the rename made it restorable. What follows only speeds up
        # readers and durability of the listing; a failure here must not make the
        # caller believe the checkpoint failed (it would then stop the app and the
        # replacement would restore the state from before that stop).
        try:
            _fsync_path(self.lineage, directory=True)
            self._write_pointer(number)
        except OSError as error:
            log.warning("%s published, but updating the lineage afterwards failed: %s", generation_name(number),
                        _describe_os_error(error, self.lineage))
        return Generation(number, target)

    def _write_pointer(self, number: int) -> None:
        # Only ever move the pointer forward: a slow writer must not hide a newer generation.
        if (self._pointer() or 0) >= number:
            return
        write_atomically(os.path.join(self.lineage, POINTER), generation_name(number) + "\n")
        _fsync_path(self.lineage, directory=True)

    def _hash_tree(
        self, directory: str, hashed: dict[str, dict[str, Any]], parent: Generation | None = None
    ) -> dict[str, dict[str, Any]]:
        """Manifest entries (size, sha256 or chunk digests) of every file, fsynced.

        `hashed` holds entries computed while CRIU wrote; a file whose size
        changed since is hashed again.
        """
        names = sorted(os.listdir(directory))
        if parent is not None:
            if not _is_parent_link(os.path.join(directory, PARENT_LINK), parent.name):
                raise StoreError(f"an incremental checkpoint lacks its link to {parent.name}")
            names.remove(PARENT_LINK)
        for name in names:
            path = os.path.join(directory, name)
            if not os.path.isfile(path) or os.path.islink(path):
                raise StoreError(f"unexpected non-file {name!r} in a checkpoint")
            os.chmod(path, 0o600)  # CRIU writes 0644; checkpoints hold secrets

        def entry(name: str) -> dict[str, Any]:
            path = os.path.join(directory, name)
            if name in hashed and hashed[name]["size"] == os.stat(path).st_size:
                _fsync_path(path)
                return hashed[name]
            if is_page_image(name):
                return page_entry(*hash_chunks(path, fsync=True))
            size, sha = hash_file(path, fsync=True)
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
        link = os.path.join(generation.path, PARENT_LINK)
        if record is None:
            return None
        name = record.get("generation") if isinstance(record, dict) else None
        match = _GENERATION.match(name) if isinstance(name, str) else None
        if match is None or not isinstance(name, str) or int(match.group(1)) >= generation.number:
            raise VerificationFailed(f"{generation.name}: manifest names a malformed parent {record!r}")
        if not _is_parent_link(link, name):
            raise VerificationFailed(f"{generation.name}: its link to the parent {name} is missing or wrong")
        parent = self.named(name)
        try:
            with open(parent.manifest_path, "rb") as handle:
                raw = handle.read()
        except OSError as error:
            raise VerificationFailed(f"{generation.name}: its parent {name}, which holds its unchanged pages, "
                                     f"is missing ({error.strerror})") from error
        if hashlib.sha256(raw).hexdigest() != record.get("manifest_sha256"):
            raise VerificationFailed(f"{generation.name}: its parent {name} is not the checkpoint it was dumped "
                                     "against (the parent's manifest changed)")
        try:
            parent_manifest = json.loads(raw)
        except ValueError as error:
            raise VerificationFailed(f"{name}: manifest unreadable: {error}", generation=name) from error
        if not isinstance(parent_manifest, dict):
            raise VerificationFailed(f"{name}: manifest unreadable: not a JSON object", generation=name)
        return parent, parent_manifest

    def verify_pages(self, generation: Generation, manifest: dict[str, Any], workers: int = 1) -> None:
        """Hash the page images deferred by verify(defer_pages=True): the generation's and its parent's.

        One worker by default: this runs beside a lazily restored app, which needs the other cores.
        """
        members = [(generation, manifest), *filter(None, [self.parent_of(generation, manifest)])]
        for member, member_manifest in members:
            with _at_fault(member):
                for name, expected in member_manifest["files"].items():
                    if is_page_image(name):
                        self._verify_file(member, name, expected, workers=workers)

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
        if os.path.islink(generation.path):
            raise VerificationFailed(f"{generation.name} is a symlink")
        if manifest is None:
            try:
                manifest = generation.read_json(MANIFEST)
            except (OSError, ValueError) as error:
                raise VerificationFailed(f"{generation.name}: manifest unreadable: {error}") from error
        self._check_signature(generation, manifest)
        if manifest.get("format_version") not in _READABLE_FORMATS:
            raise VerificationFailed(f"{generation.name}: unknown manifest format {manifest.get('format_version')!r} "
                                     "(written by a newer criu-supervisor?)", here_only=True)
        if manifest.get("generation") != generation.number:
            raise VerificationFailed(f"{generation.name}: manifest names generation {manifest.get('generation')!r}")
        if manifest["format_version"] >= 3 and manifest.get("lineage") != self.name:
            raise VerificationFailed(f"{generation.name}: it was made for the lineage {manifest.get('lineage')!r}, "
                                     f"not {self.name!r} (copied from another app's checkpoints?)")
        if manifest.get("machine") != os.uname().machine:
            raise VerificationFailed(
                f"{generation.name}: made on {manifest.get('machine')}, this machine is {os.uname().machine}",
                here_only=True,
            )
        if local_criu_version is not None:
            self._check_criu_version(generation, str(manifest.get("criu_version", "")), local_criu_version)
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise VerificationFailed(f"{generation.name}: manifest lists no files")
        present = set(os.listdir(generation.path)) - _BOOKKEEPING
        if manifest.get("parent") is not None:
            present.discard(PARENT_LINK)  # checked by parent_of
        unexpected = sorted(present - set(files))
        if unexpected:
            raise VerificationFailed(f"{generation.name}: files not in the manifest: {', '.join(unexpected[:5])}")
        for name, expected in files.items():
            self._verify_file(generation, name, expected, hash_it=not (defer_pages and is_page_image(name)))
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
        try:
            info = os.statvfs(self.lineage)
        except OSError:
            return None
        return info.f_bavail * info.f_frsize

    @staticmethod
    def _check_criu_version(generation: Generation, dumped: str, local: str) -> None:
        from supervisor_pkg.criu import version_tuple

        if not dumped:
            raise VerificationFailed(f"{generation.name}: manifest does not record the CRIU version")
        if version_tuple(local)[:2] < version_tuple(dumped)[:2]:
            raise VerificationFailed(
                f"{generation.name}: dumped by CRIU {dumped}, but this image has CRIU {local}; "
                "restore needs the same or a newer CRIU",
                here_only=True,
            )

    @staticmethod
    def _verify_file(
        generation: Generation, name: str, expected: Any, hash_it: bool = True, workers: int = ALL_CORES
    ) -> None:
        if not isinstance(name, str) or "/" in name or name in ("", ".", "..") or name in _BOOKKEEPING:
            raise VerificationFailed(f"{generation.name}: manifest names an unsafe path {name!r}")
        if not isinstance(expected, dict):
            raise VerificationFailed(f"{generation.name}: manifest entry for {name} is malformed")
        path = os.path.join(generation.path, name)
        try:
            info = os.lstat(path)
        except OSError as error:
            raise VerificationFailed(f"{generation.name}: {name} is missing ({error.strerror})") from error
        if not os.path.isfile(path) or os.path.islink(path):
            raise VerificationFailed(f"{generation.name}: {name} is not a regular file")
        if info.st_size != expected.get("size"):
            raise VerificationFailed(
                f"{generation.name}: {name} is {info.st_size} bytes, "
                f"the manifest says {expected.get('size')} (truncated?)"
            )
        chunk_size = expected.get("chunk_size")
        if "chunks" in expected and not (isinstance(chunk_size, int) and chunk_size >= 4096):
            raise VerificationFailed(f"{generation.name}: manifest entry for {name} has a bad chunk size")
        if not hash_it:
            return
        try:
            if "chunks" in expected:
                _, chunks = hash_chunks(path, chunk_size, workers=workers)
                matches = chunks == expected["chunks"]
            else:
                matches = hash_file(path)[1] == expected.get("sha256")
        except OSError as error:
            raise VerificationFailed(f"{generation.name}: {name} is unreadable ({error.strerror})") from error
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
                      attempt=(earlier.attempt + 1) if earlier else 1)
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
            _write_json_atomically(os.path.join(generation.path, CLAIM), dataclasses.asdict(claim))
        except OSError as error:
            raise StoreError(f"cannot claim {generation.name}: {_describe_os_error(error, generation.path)}") from error

    def note(self, generation: Generation, filename: str, reason: str) -> None:
        """Record why a generation was not restored here, without condemning it (APP_CHANGED, INCOMPATIBLE)."""
        assert filename in (APP_CHANGED, INCOMPATIBLE)
        with contextlib.suppress(OSError):
            _write_json_atomically(os.path.join(generation.path, filename),
                                   {"reason": reason, "time": time.time(), **identity()})

    def reject(self, generation: Generation, reason: str, culprit: str | None = None) -> None:
        """Record on the volume why this generation must never be restored.

        `culprit`: another generation at fault (an incremental one's parent), rejected with it.
        """
        with contextlib.suppress(OSError):
            _write_json_atomically(
                os.path.join(generation.path, REJECTED), {"reason": reason, "time": time.time(), **identity()}
            )
        if culprit not in (None, generation.name):
            self.reject(self.named(culprit), f"as the parent of {generation.name}: {reason}")

    # --- retention -----------------------------------------------------------
    def prune(self, keep: int | None = None, protect: set[int] | None = None) -> list[str]:
        """Delete all but the newest `keep` usable generations, and stale staging dirs."""
        keep = self.keep if keep is None else keep
        protect = protect or set()
        removed: list[str] = []
        usable = 0
        needed: set[int] = set()  # parents of generations that stay
        for generation in self.generations():  # newest first, so a child comes before its parent
            kept = generation.number in protect or generation.number in needed
            if not generation.rejected:
                usable += 1
                kept = kept or usable <= keep
            if kept or self._restore_in_progress(generation):
                needed |= self._parent_number(generation)
                continue
            shutil.rmtree(generation.path, ignore_errors=True)
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
        """Remove staging dirs of crashed writers; skip NFS silly-rename files (.nfsXXXX)."""
        removed = []
        now = time.time()
        with contextlib.suppress(OSError):
            for entry in os.listdir(self.lineage):
                if not entry.startswith(_STAGING_PREFIX):
                    continue
                path = os.path.join(self.lineage, entry)
                with contextlib.suppress(OSError):
                    if now - os.stat(path).st_mtime < older_than:
                        continue
                    for inner in os.listdir(path):
                        if not inner.startswith(".nfs"):
                            os.unlink(os.path.join(path, inner))
                    os.rmdir(path)  # fails while an .nfsXXXX file is still there; retried next time
                    removed.append(entry)
        return removed
