"""CKPT_COMPRESS: page images streamed compressed to the volume while CRIU writes them, and expanded back."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from supervisor_pkg import compression


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    local, volume = tmp_path / "local", tmp_path / "volume"
    local.mkdir()
    volume.mkdir()
    return local, volume


def heap(size: int) -> bytes:
    """Half random, half zeros: like a real heap, partly compressible."""
    return os.urandom(size // 2) + bytes(size - size // 2)


@pytest.mark.parametrize("algorithm", ["zstd", "lz4"])
def test_pages_written_while_followed_come_back_byte_for_byte(dirs: tuple[Path, Path], algorithm: str) -> None:
    local, volume = dirs
    data = heap(3 << 20)
    with compression.PageCompressor(algorithm, str(local), str(volume), poll=0.001) as compressor, \
            open(local / "pages-1.img", "wb") as image:
        for begin in range(0, len(data), 300_000):  # appended in pieces, as CRIU does
            image.write(data[begin:begin + 300_000])
            image.flush()
            time.sleep(0.002)
        (local / "core-1.img").write_bytes(b"registers")
        hashed, pages = compressor.finish()

    packed_name = "pages-1.img" + compression.SUFFIX[algorithm]
    assert sorted(os.listdir(volume)) == ["core-1.img", packed_name], "no raw page image on the volume"
    packed = (volume / packed_name).read_bytes()
    assert hashed[packed_name] == {"size": len(packed), "sha256": hashlib.sha256(packed).hexdigest()}
    assert pages == {packed_name: {"raw_name": "pages-1.img", "raw_size": len(data)}}
    assert len(packed) < len(data), "the zero half compresses"

    manifest = {"files": {packed_name: {}, "core-1.img": {}},
                "compression": {"algorithm": algorithm, "pages": pages}}
    compression.expand(str(volume), manifest, str(local / "expanded"))
    assert (local / "expanded" / "pages-1.img").read_bytes() == data
    assert (local / "expanded" / "core-1.img").read_bytes() == b"registers"


def test_each_raw_image_is_closed_exactly_once(dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # A second close(2) of a number that another thread has reused meanwhile closes that thread's file:
    # in CI a lease heartbeat's or `criu --version`'s pipe, failing the checkpoint with EBADF.
    local, volume = dirs
    (local / "pages-1.img").write_bytes(heap(1 << 20))
    (local / "pages-2.img").write_bytes(heap(1 << 20))
    closed: list[int] = []
    real_close = os.close

    def recording_close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(os, "close", recording_close)
    with compression.PageCompressor("zstd", str(local), str(volume)) as compressor:
        compressor.finish()
    monkeypatch.undo()

    assert len(closed) == 2 and len(set(closed)) == 2, f"closed {closed}: each raw image once, none twice"
