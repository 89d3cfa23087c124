"""Compressed page images: fewer bytes on slow volumes (CKPT_COMPRESS=lz4|zstd).

Compressing after CRIU has written raw pages to the volume would save
nothing: the slow writes would already have happened. So with compression on,
CRIU dumps into local scratch space in the container's writable layer, and a
`PageCompressor` follows each pages-*.img as CRIU appends to it (as
store.PageHasher does), streaming compressed bytes into the staging directory
on the volume and hashing exactly the bytes written there. Only the small
metadata images are copied afterwards. On restore the verified, compressed
page images are expanded into local scratch space, and CRIU (lazily or not)
restores from there.

zstd level 1 with two threads compresses 1-2 GiB/s here (ratio ~8 on typical
heaps, 1.0 on random data), far above a 200-500 MiB/s network volume; lz4 is
the lighter alternative. See docs/benchmarks.md for the figures.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from typing import Any, BinaryIO

from supervisor_pkg.errors import EnvironmentProblem, StoreError

SUFFIX = {"zstd": ".zst", "lz4": ".lz4"}
LOCAL_ROOT = "/var/lib/criu-supervisor"
_CHUNK = 4 << 20


def _is_page_image(name: str) -> bool:
    from supervisor_pkg.store import is_page_image

    return is_page_image(name)


def check_available(algorithm: str) -> None:
    try:
        if algorithm == "zstd":
            import zstandard  # noqa: F401
        elif algorithm == "lz4":
            import lz4.frame  # noqa: F401
    except ImportError as error:
        package = {"zstd": "python3-zstandard", "lz4": "python3-lz4"}[algorithm]
        raise EnvironmentProblem(f"CKPT_COMPRESS={algorithm} needs {package} (the base image has it)") from error


class _HashingWriter:
    """A file object that hashes what it writes (the bytes that land on the volume)."""

    def __init__(self, path: str) -> None:
        self.handle: BinaryIO = open(path, "xb")  # noqa: SIM115 - closed in close()
        os.chmod(path, 0o600)
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


class _Stream:
    """One raw page image being compressed onto the volume."""

    def __init__(self, algorithm: str, source: str, destination: str) -> None:
        self.fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
        self.offset = 0
        self.out = _HashingWriter(destination)
        if algorithm == "zstd":
            import zstandard

            self._compressor: Any = zstandard.ZstdCompressor(level=1, threads=2).compressobj()
        else:
            import lz4.frame

            self._compressor = lz4.frame.LZ4FrameCompressor(compression_level=0)
            self.out.write(self._compressor.begin())

    def catch_up(self) -> None:
        while chunk := os.pread(self.fd, _CHUNK, self.offset):
            self.offset += len(chunk)
            self.out.write(self._compressor.compress(chunk))

    def finish(self) -> tuple[int, str, int]:
        self.catch_up()
        self.out.write(self._compressor.flush())
        self.out.close()
        self.close()
        return self.out.size, self.out.digest.hexdigest(), self.offset

    def close(self) -> None:
        """Close the raw image, once: a second close(2) of a number another thread has reused since
        would close *its* file (this made a later `criu --version` fail with EBADF)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class PageCompressor(threading.Thread):
    """Follows CRIU's page images in `local_dir`, writing them compressed into `volume_dir`."""

    def __init__(self, algorithm: str, local_dir: str, volume_dir: str, poll: float = 0.02) -> None:
        super().__init__(name="page-compressor", daemon=True)
        self.algorithm = algorithm
        self.local_dir = local_dir
        self.volume_dir = volume_dir
        self.poll = poll
        self._stop_event = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._error: BaseException | None = None

    def __enter__(self) -> PageCompressor:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop_event.set()
        self.join()
        for stream in self._streams.values():
            with contextlib.suppress(OSError):
                stream.close()

    def run(self) -> None:
        while not self._stop_event.wait(self.poll):
            try:
                self._catch_up()
            except BaseException as error:  # noqa: BLE001 - reported by finish()
                self._error = error
                return

    def _catch_up(self) -> None:
        for name in sorted(os.listdir(self.local_dir)):
            if _is_page_image(name) and name not in self._streams:
                self._streams[name] = _Stream(self.algorithm, os.path.join(self.local_dir, name),
                                              os.path.join(self.volume_dir, name + SUFFIX[self.algorithm]))
        for stream in self._streams.values():
            stream.catch_up()

    def finish(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """After CRIU returned: compress the rest, copy the other images; return (hashed, page table)."""
        self._stop_event.set()
        self.join()
        try:
            if self._error is not None:
                raise self._error
            self._catch_up()
            hashed: dict[str, dict[str, Any]] = {}
            pages: dict[str, dict[str, Any]] = {}
            for name, stream in self._streams.items():
                size, digest, raw_size = stream.finish()
                compressed = name + SUFFIX[self.algorithm]
                hashed[compressed] = {"size": size, "sha256": digest}
                pages[compressed] = {"raw_name": name, "raw_size": raw_size}
            for name in os.listdir(self.local_dir):
                if not _is_page_image(name):
                    shutil.copyfile(os.path.join(self.local_dir, name), os.path.join(self.volume_dir, name))
        except OSError as error:
            raise StoreError(f"cannot write the compressed checkpoint: {error}") from error
        return hashed, pages


def expand(generation_dir: str, manifest: dict[str, Any], local_dir: str) -> None:
    """Recreate CRIU's raw images in `local_dir` from a verified, compressed generation."""
    table = manifest["compression"]["pages"]
    algorithm = manifest["compression"]["algorithm"]
    os.makedirs(local_dir, mode=0o700, exist_ok=True)
    for name in manifest["files"]:
        source = os.path.join(generation_dir, name)
        if name in table:
            with open(source, "rb") as packed, open(os.path.join(local_dir, table[name]["raw_name"]), "wb") as raw:
                if algorithm == "zstd":
                    import zstandard

                    zstandard.ZstdDecompressor().copy_stream(packed, raw, read_size=_CHUNK, write_size=_CHUNK)
                else:
                    import lz4.frame

                    with lz4.frame.open(packed, "rb") as stream:
                        shutil.copyfileobj(stream, raw, _CHUNK)
        elif name != "carried-files.tar":
            shutil.copyfile(source, os.path.join(local_dir, name))
