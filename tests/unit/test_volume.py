"""volume: nothing on the shared volume is followed, blocks us, or is believed unchecked.

Each test plants what a hostile client of the NFS export could plant (a symlink
to a directory outside the tree holding a canary, a FIFO, an oversized file,
malformed JSON) and checks both the answer and that nothing outside the tree
changed. Opens that could block (a FIFO) run under a deadline, so a blocking
bug fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import string
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor_pkg import volume as volume_module
from supervisor_pkg.errors import StoreError
from supervisor_pkg.volume import (
    MAX_JSON_DEPTH,
    MAX_TREE_DEPTH,
    Directory,
    Entry,
    VolumeRefusal,
    parse_json_object,
)

CANARY = b"the node's own file: must never change\n"


def call_within(seconds: float, function: Callable[[], Any], fifos: tuple[Path, ...] = ()) -> Any:
    """function() in a thread; fail the test if it has not returned after `seconds`.

    On a timeout, each FIFO is opened for writing once, which releases a reader
    blocked in open(2), so the stuck thread ends instead of outliving the test.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"still blocked after {seconds} s (an open of a FIFO that waits for a writer?)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def snapshot(root: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Every path under `root` (itself included) with its lstat mode and its content or link target."""
    found: dict[str, tuple[int, bytes | str | None]] = {}
    for directory, subdirectories, files in os.walk(root):
        for name in [".", *subdirectories, *files]:
            path = Path(directory, name)
            info = path.lstat()
            content: bytes | str | None = None
            if stat.S_ISREG(info.st_mode):
                content = path.read_bytes()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            found[str(path.relative_to(root))] = (info.st_mode, content)
    return found


class Outside:
    """A directory outside the volume, with a canary file: what a symlink on the volume points at."""

    def __init__(self, base: Path) -> None:
        self.directory = base / "outside"
        self.directory.mkdir()
        self.directory.chmod(0o755)
        self.canary = self.directory / "canary"
        self.canary.write_bytes(CANARY)
        self.canary.chmod(0o644)
        self.before = snapshot(self.directory)

    def untouched(self) -> bool:
        return snapshot(self.directory) == self.before


@pytest.fixture(name="outside")
def outside_fixture(tmp_path: Path) -> Outside:
    return Outside(tmp_path)


@pytest.fixture(name="root")
def root_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "volume"
    root.mkdir()
    return root


@pytest.fixture(name="volume")
def volume_fixture(root: Path) -> Iterator[Directory]:
    with Directory.open(str(root)) as directory:
        yield directory


@pytest.fixture(name="reopen_route", params=["proc", "by-name"])
def reopen_route_fixture(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Run a test both ways a checked file is opened: through /proc/self/fd, and by name where /proc is missing."""
    if request.param == "by-name":
        monkeypatch.setattr(volume_module, "PROC_FD_DIRECTORY", str(tmp_path / "no-proc-here"))
    return str(request.param)


def _can_make_devices(directory: Path) -> bool:
    try:
        os.mknod(directory / "probe", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except OSError:
        return False
    os.unlink(directory / "probe")
    return True


# --- a symlink where a directory is expected ---------------------------------------------------------------
def test_subdir_refuses_a_symlink_to_a_directory_outside(volume: Directory, root: Path, outside: Outside) -> None:
    (root / "lineage").symlink_to(outside.directory)
    for create in (False, True):
        with pytest.raises(VolumeRefusal, match=r"lineage is a symlink, not a directory"):
            volume.subdir("lineage", create=create)
    assert outside.untouched()


@pytest.mark.parametrize("kind", ["fifo", "file", "dangling symlink"])
def test_subdir_refuses_what_is_not_a_directory_without_blocking(volume: Directory, root: Path, kind: str) -> None:
    path = root / "lineage"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "file":
        path.write_bytes(b"")
    else:
        path.symlink_to(root / "nowhere")
    with pytest.raises(VolumeRefusal, match="not a directory"):
        call_within(2, lambda: volume.subdir("lineage", create=True), fifos=(path,))
    assert not (root / "nowhere").exists()


def test_subdir_refusal_is_a_store_error_naming_the_path(volume: Directory, root: Path) -> None:
    os.mkfifo(root / "gen-00000007")
    with pytest.raises(StoreError) as caught:
        call_within(2, lambda: volume.subdir("gen-00000007"), fifos=(root / "gen-00000007",))
    assert caught.value.message == f"{root}/gen-00000007 is a FIFO, not a directory"


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../outside", "x\0y"])
def test_names_must_be_one_path_component(volume: Directory, name: str, outside: Outside) -> None:
    with pytest.raises(VolumeRefusal, match="not a single path component"):
        volume.subdir(name)
    with pytest.raises(VolumeRefusal, match="not a single path component"):
        volume.write_atomically(name, b"x")
    with pytest.raises(VolumeRefusal, match="not a single path component"):
        volume.remove_tree(name)
    assert outside.untouched()


def test_subdir_create_makes_it_with_exactly_the_mode_whatever_the_umask(volume: Directory, root: Path) -> None:
    previous = os.umask(0o077)
    try:
        with volume.subdir("wide", create=True, mode=0o750):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE((root / "wide").stat().st_mode) == 0o750


def test_subdir_create_narrows_an_existing_directory_of_ours(volume: Directory, root: Path) -> None:
    (root / "lineage").mkdir()
    (root / "lineage").chmod(0o777)
    with volume.subdir("lineage", create=True) as lineage:
        assert lineage.path == f"{root}/lineage"
    assert stat.S_IMODE((root / "lineage").stat().st_mode) == 0o700


def test_subdir_without_create_leaves_the_mode_and_a_missing_one_is_file_not_found(
    volume: Directory, root: Path
) -> None:
    (root / "lineage").mkdir()
    (root / "lineage").chmod(0o755)
    volume.subdir("lineage").close()
    assert stat.S_IMODE((root / "lineage").stat().st_mode) == 0o755
    with pytest.raises(FileNotFoundError):
        volume.subdir("missing")


def test_create_subdir_is_exclusive_even_of_a_symlink(volume: Directory, root: Path, outside: Outside) -> None:
    with volume.create_subdir(".staging-a") as staging:
        staging.write_atomically("core-1.img", b"image")
    assert (root / ".staging-a" / "core-1.img").read_bytes() == b"image"
    with pytest.raises(FileExistsError):
        volume.create_subdir(".staging-a")
    (root / ".staging-b").symlink_to(outside.directory)
    with pytest.raises(FileExistsError):
        volume.create_subdir(".staging-b")
    assert outside.untouched()


def test_directory_open_follows_the_operators_symlink_and_creates(tmp_path: Path) -> None:
    real = tmp_path / "mnt" / "efs"
    real.mkdir(parents=True)
    (tmp_path / "ckpt").symlink_to(real)
    with Directory.open(str(tmp_path / "ckpt")) as directory:
        directory.write_atomically("latest", b"gen-00000001\n")
    assert (real / "latest").read_bytes() == b"gen-00000001\n"
    with Directory.open(str(tmp_path / "new" / "ckpt"), create=True) as created:
        assert created.entries() == []
    with pytest.raises(ValueError, match="not an absolute path"):
        Directory.open("relative/ckpt")


def test_directory_does_not_use_its_path_after_opening(tmp_path: Path, root: Path) -> None:
    with Directory.open(str(root)) as directory:
        root.rename(tmp_path / "moved")
        root.mkdir()  # a new directory at the old path: must not be where writes land
        directory.write_atomically("latest", b"x")
    assert (tmp_path / "moved" / "latest").exists()
    assert not (root / "latest").exists()


def test_close_is_idempotent(root: Path) -> None:
    directory = Directory.open(str(root))
    fd = directory.fd
    directory.close()
    directory.close()
    assert directory.fd == -1
    with pytest.raises(OSError) as caught:
        os.fstat(fd)
    assert caught.value.errno == errno.EBADF


# --- remove_tree ------------------------------------------------------------------------------------------
def test_remove_tree_of_a_symlink_removes_only_the_link(volume: Directory, root: Path, outside: Outside) -> None:
    (root / "gen-00000003").symlink_to(outside.directory)
    assert volume.remove_tree("gen-00000003") is True
    assert not os.path.lexists(root / "gen-00000003")
    assert outside.untouched()


def test_remove_tree_leaves_what_links_inside_the_tree_point_at(
    volume: Directory, root: Path, outside: Outside
) -> None:
    generation = root / "gen-00000004"
    (generation / "deeper").mkdir(parents=True)
    (generation / "pages-1.img").write_bytes(b"pages")
    (generation / "to-directory").symlink_to(outside.directory)
    (generation / "deeper" / "to-file").symlink_to(outside.canary)
    (generation / "deeper" / "to-parent").symlink_to("..")
    assert volume.remove_tree("gen-00000004") is True
    assert not generation.exists()
    assert outside.untouched()


def test_remove_tree_does_not_block_on_fifos(volume: Directory, root: Path) -> None:
    os.mkfifo(root / "a-fifo")
    (root / "tree").mkdir()
    os.mkfifo(root / "tree" / "inner-fifo")
    fifos = (root / "a-fifo", root / "tree" / "inner-fifo")
    assert call_within(2, lambda: volume.remove_tree("a-fifo"), fifos) is True
    assert call_within(2, lambda: volume.remove_tree("tree"), fifos) is True
    assert os.listdir(root) == []


def test_remove_tree_leaves_nfs_silly_rename_files_and_says_so(volume: Directory, root: Path) -> None:
    staging = root / ".staging-host-1-ab"
    (staging / "sub").mkdir(parents=True)
    (staging / "core-1.img").write_bytes(b"x")
    (staging / "sub" / ".nfs000000000012345600000001").write_bytes(b"still open somewhere")
    assert volume.remove_tree(".staging-host-1-ab") is False
    assert sorted(str(path.relative_to(staging)) for path in staging.rglob("*")) == [
        "sub",
        "sub/.nfs000000000012345600000001",
    ]


def test_remove_tree_of_a_missing_name_or_a_file(volume: Directory, root: Path) -> None:
    assert volume.remove_tree("never-there") is True
    (root / "stray").write_bytes(b"x")
    assert volume.remove_tree("stray") is True
    assert not (root / "stray").exists()


def test_remove_tree_refuses_a_tree_deeper_than_any_checkpoint(
    volume: Directory, root: Path, outside: Outside
) -> None:
    deepest = root.joinpath("junk", *["d"] * (MAX_TREE_DEPTH + 1))
    deepest.mkdir(parents=True)
    (deepest / "link").symlink_to(outside.directory)
    with pytest.raises(VolumeRefusal, match=f"more than {MAX_TREE_DEPTH} directories deep"):
        volume.remove_tree("junk")
    assert outside.untouched()


# --- chmod ------------------------------------------------------------------------------------------------
def test_chmod_through_a_symlink_refuses_and_leaves_the_target(
    volume: Directory, root: Path, outside: Outside, reopen_route: str
) -> None:
    (root / "to-file").symlink_to(outside.canary)
    (root / "to-directory").symlink_to(outside.directory)
    for name in ("to-file", "to-directory"):
        with pytest.raises(VolumeRefusal, match=f"{name} is a symlink, not a file or directory"):
            volume.chmod(name, 0o600)
    assert outside.untouched()


def test_chmod_sets_files_and_directories(volume: Directory, root: Path, reopen_route: str) -> None:
    (root / "core-1.img").write_bytes(b"x")
    (root / "core-1.img").chmod(0o644)
    (root / "logs").mkdir(mode=0o755)
    volume.chmod("core-1.img", 0o600)
    volume.chmod("logs", 0o700)
    assert stat.S_IMODE((root / "core-1.img").stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "logs").stat().st_mode) == 0o700


def test_chmod_refuses_a_fifo_without_blocking(volume: Directory, root: Path, reopen_route: str) -> None:
    os.mkfifo(root / "core-1.img", 0o644)
    with pytest.raises(VolumeRefusal, match="is a FIFO, not a file or directory"):
        call_within(2, lambda: volume.chmod("core-1.img", 0o600), fifos=(root / "core-1.img",))
    assert stat.S_IMODE((root / "core-1.img").lstat().st_mode) == 0o644


# --- writing ----------------------------------------------------------------------------------------------
def test_write_atomically_replaces_a_symlink_not_its_target(volume: Directory, root: Path, outside: Outside) -> None:
    (root / "latest").symlink_to(outside.canary)
    volume.write_atomically("latest", b"gen-00000009\n")
    assert not (root / "latest").is_symlink()
    assert (root / "latest").read_bytes() == b"gen-00000009\n"
    assert outside.untouched()


def test_write_atomically_content_mode_and_no_temporary_left(volume: Directory, root: Path) -> None:
    (root / "lease.json").write_bytes(b"old")
    previous = os.umask(0o077)
    try:
        volume.write_atomically("lease.json", b'{"beat": 2}', mode=0o640)
    finally:
        os.umask(previous)
    assert (root / "lease.json").read_bytes() == b'{"beat": 2}'
    assert stat.S_IMODE((root / "lease.json").stat().st_mode) == 0o640
    assert os.listdir(root) == ["lease.json"]


def test_write_atomically_onto_a_directory_refuses_and_cleans_up(volume: Directory, root: Path) -> None:
    (root / "manifest.json").mkdir()
    (root / "manifest.json" / "inside").write_bytes(b"kept")
    with pytest.raises(VolumeRefusal, match="manifest.json is a directory, not a file"):
        volume.write_atomically("manifest.json", b"{}")
    assert os.listdir(root) == ["manifest.json"]
    assert (root / "manifest.json" / "inside").read_bytes() == b"kept"


def test_create_exclusive_once_and_never_through_a_dangling_symlink(
    volume: Directory, root: Path, outside: Outside
) -> None:
    assert volume.create_exclusive("claim.json", b'{"pid": 1}') is True
    assert volume.create_exclusive("claim.json", b'{"pid": 2}') is False
    assert (root / "claim.json").read_bytes() == b'{"pid": 1}'
    assert stat.S_IMODE((root / "claim.json").stat().st_mode) == 0o600
    planted = outside.directory / "planted"
    (root / "lease.json").symlink_to(planted)
    assert volume.create_exclusive("lease.json", b"mine") is False
    assert not planted.exists()
    assert outside.untouched()


def test_unlink_removes_the_link_only_and_refuses_a_directory(
    volume: Directory, root: Path, outside: Outside
) -> None:
    (root / "latest").symlink_to(outside.canary)
    volume.unlink("latest")
    assert not os.path.lexists(root / "latest")
    volume.unlink("latest")  # missing_ok
    with pytest.raises(FileNotFoundError):
        volume.unlink("latest", missing_ok=False)
    (root / "logs").mkdir()
    with pytest.raises(VolumeRefusal, match="logs is a directory, not a file"):
        volume.unlink("logs")
    assert outside.untouched()


def test_rename_moves_entries_between_directories_without_following(
    volume: Directory, root: Path, outside: Outside
) -> None:
    (root / ".staging-x").mkdir()
    (root / ".staging-x" / "manifest.json").write_bytes(b"{}")
    (root / "gen-00000001").symlink_to(outside.directory)
    with volume.subdir(".staging-x") as staging:
        volume.rename(".staging-x", volume, "gen-00000002")
        staging.rename("manifest.json", volume, "latest-manifest")
    assert (root / "latest-manifest").read_bytes() == b"{}"
    (root / "pointer.tmp").write_bytes(b"gen-00000002\n")
    volume.rename("pointer.tmp", volume, "gen-00000001")  # onto the symlink: replaces the link
    assert (root / "gen-00000001").read_bytes() == b"gen-00000002\n"
    assert outside.untouched()


def test_link_of_a_symlink_links_the_symlink(volume: Directory, root: Path, outside: Outside) -> None:
    (root / "lease.json").symlink_to(outside.canary)
    volume.link("lease.json", volume, "lease.json.back")
    assert (root / "lease.json.back").is_symlink()
    with pytest.raises(FileExistsError):
        volume.link("lease.json", volume, "lease.json.back")
    assert outside.untouched()


# --- reading ----------------------------------------------------------------------------------------------
def test_read_bytes_of_a_fifo_is_refused_within_a_second(volume: Directory, root: Path, reopen_route: str) -> None:
    os.mkfifo(root / "latest")
    with pytest.raises(VolumeRefusal, match="latest is a FIFO, not a file"):
        call_within(1, lambda: volume.read_bytes("latest", 64), fifos=(root / "latest",))
    with pytest.raises(VolumeRefusal, match="latest is a FIFO, not a file"):
        call_within(1, lambda: volume.open_file("latest"), fifos=(root / "latest",))


def test_read_bytes_refuses_a_symlink_to_a_file_outside(
    volume: Directory, root: Path, outside: Outside, reopen_route: str
) -> None:
    (root / "manifest.json").symlink_to(outside.canary)
    with pytest.raises(VolumeRefusal, match="manifest.json is a symlink, not a file"):
        volume.read_bytes("manifest.json", 4096)


def test_read_bytes_limits(volume: Directory, root: Path, reopen_route: str) -> None:
    (root / "exact").write_bytes(b"x" * 10)
    (root / "over").write_bytes(b"x" * 11)
    assert volume.read_bytes("exact", 10) == b"x" * 10
    with pytest.raises(VolumeRefusal, match="over is 11 bytes, more than the 10 allowed"):
        volume.read_bytes("over", 10)


def test_read_bytes_refuses_a_file_that_grew_after_its_size_was_checked(
    volume: Directory, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "lease.json").write_bytes(b"x" * 1000)
    real_fstat = os.fstat

    def reports_empty(fd: int) -> os.stat_result:  # what fstat said just before the file grew
        info = real_fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return info
        fields = list(info)
        fields[stat.ST_SIZE] = 0
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", reports_empty)
    with pytest.raises(VolumeRefusal, match="grew past the 10 bytes allowed"):
        volume.read_bytes("lease.json", 10)


def test_read_bytes_of_a_directory_or_a_missing_file(volume: Directory, root: Path, reopen_route: str) -> None:
    (root / "claim.json").mkdir()
    with pytest.raises(VolumeRefusal, match="claim.json is a directory, not a file"):
        volume.read_bytes("claim.json", 64)
    with pytest.raises(FileNotFoundError):
        volume.read_bytes("missing.json", 64)
    with pytest.raises(FileNotFoundError):
        volume.read_json("missing.json", 64)
    with pytest.raises(FileNotFoundError):
        volume.open_file("missing.json")


def test_read_bytes_refuses_a_device(volume: Directory, root: Path, reopen_route: str) -> None:
    if not _can_make_devices(root):
        pytest.skip("mknod needs CAP_MKNOD")
    os.mknod(root / "pages-1.img", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers: reads b""
    with pytest.raises(VolumeRefusal, match="pages-1.img is a character device, not a file"):
        volume.read_bytes("pages-1.img", 64)


def test_a_file_swapped_for_a_fifo_while_being_opened(
    volume: Directory, root: Path, monkeypatch: pytest.MonkeyPatch, reopen_route: str
) -> None:
    """The name is checked, then swapped for a FIFO before the file is opened for reading (a race)."""
    path = root / "manifest.json"
    path.write_bytes(b'{"generation": 1}')
    real_open = os.open

    def swap_after_the_look(name: Any, flags: int, *arguments: Any, **keywords: Any) -> int:
        fd = real_open(name, flags, *arguments, **keywords)
        if flags & os.O_PATH and name == "manifest.json":
            os.unlink(path)
            os.mkfifo(path)
        return fd

    monkeypatch.setattr(os, "open", swap_after_the_look)
    if reopen_route == "proc":  # the inode that was checked is read, whatever the name is now
        assert call_within(2, lambda: volume.read_bytes("manifest.json", 64), (path,)) == b'{"generation": 1}'
    else:
        with pytest.raises(VolumeRefusal, match="manifest.json was replaced while being opened"):
            call_within(2, lambda: volume.read_bytes("manifest.json", 64), (path,))


def test_open_file_gives_a_blocking_fd_on_the_file(volume: Directory, root: Path, reopen_route: str) -> None:
    (root / "pages-1.img").write_bytes(b"p" * 100)
    fd = volume.open_file("pages-1.img")
    try:
        assert os.get_blocking(fd) is True
        assert os.get_inheritable(fd) is False
        assert os.pread(fd, 200, 0) == b"p" * 100
    finally:
        os.close(fd)


def test_read_json(volume: Directory, root: Path) -> None:
    (root / "manifest.json").write_bytes(b'{"generation": 7, "files": {}}')
    assert volume.read_json("manifest.json", 4096) == {"generation": 7, "files": {}}
    (root / "claim.json").write_bytes(b"[1]")
    with pytest.raises(VolumeRefusal, match=rf"^{root}/claim.json: JSON list, not an object$"):
        volume.read_json("claim.json", 4096)


# --- looking ----------------------------------------------------------------------------------------------
def test_entries_say_what_each_name_is_without_following(volume: Directory, root: Path, outside: Outside) -> None:
    (root / "gen-00000001").mkdir()
    (root / "latest").write_bytes(b"gen-00000001\n")
    (root / "parent").symlink_to(outside.directory)
    os.mkfifo(root / "pipe")
    assert volume.entries() == [
        Entry("gen-00000001", "dir"),
        Entry("latest", "file"),
        Entry("parent", "symlink"),
        Entry("pipe", "other"),
    ]
    assert volume.entries() == volume.entries()  # the shared fd's offset is rewound


def test_lstat_exists_and_readlink_do_not_follow(volume: Directory, root: Path, outside: Outside) -> None:
    (root / "parent").symlink_to("../gen-00000006")
    (root / "latest").write_bytes(b"x")
    assert stat.S_ISLNK(volume.lstat("parent").st_mode)
    assert volume.exists("parent") is True  # dangling, but there
    assert volume.exists("missing") is False
    assert volume.readlink("parent") == "../gen-00000006"
    with pytest.raises(VolumeRefusal, match="latest is a regular file, not a symlink"):
        volume.readlink("latest")


def test_refusals_name_unprintable_paths_on_one_line(volume: Directory, root: Path) -> None:
    os.mkfifo(root / "evil\nname")
    with pytest.raises(VolumeRefusal) as caught:
        call_within(2, lambda: volume.read_bytes("evil\nname", 10), fifos=(root / "evil\nname",))
    assert "\n" not in caught.value.message
    assert "evil\\nname" in caught.value.message


# --- parse_json_object ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"[" * 100_000, "nested deeper than"),
        (b'{"a": ' * 100_000, "nested deeper than"),
        (b"NaN", "NaN is not a JSON number"),
        (b'{"time": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"size": 1e999}', "out of range"),
        (b"[1, 2]", "JSON list, not an object"),
        (b'"text"', "JSON str, not an object"),
        (b"null", "JSON NoneType, not an object"),
        (b'{"host": "caf\xe9"}', "not UTF-8"),
        (b'{"size": ' + b"1" * 5000 + b"}", "an integer of 5000 digits"),
        (b'{"owner": "a", "owner": "b"}', "the key 'owner' appears twice"),
        (b'{"a": {"b": 1, "b": 1}}', "the key 'b' appears twice"),
        (b'{"a": 1} trailing', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'\xef\xbb\xbf{"a": 1}', "not valid JSON"),
    ],
)
def test_parse_json_object_refuses(data: bytes, complaint: str) -> None:
    with pytest.raises(VolumeRefusal) as caught:
        parse_json_object(data, "/ckpt/app/lease.json")
    assert caught.value.message.startswith("/ckpt/app/lease.json: ")
    assert complaint in caught.value.message
    assert "\n" not in caught.value.message


def test_parse_json_object_depth_limit_is_exact_and_ignores_brackets_in_strings() -> None:
    def nested(depth: int) -> bytes:
        return b'{"a": ' * (depth - 1) + b"{}" + b"}" * (depth - 1)

    assert parse_json_object(nested(MAX_JSON_DEPTH), "x") is not None
    with pytest.raises(VolumeRefusal, match="nested deeper"):
        parse_json_object(nested(MAX_JSON_DEPTH + 1), "x")
    brackets = "[{" * 200 + '\\"[['
    assert parse_json_object(json.dumps({"reason": brackets}).encode(), "x") == {"reason": brackets}


def test_parse_json_object_round_trips_a_valid_object() -> None:
    record = {
        "owner": "f" * 32,
        "beat": 12,
        "time": 1733000000.25,
        "size": -(2**63),
        "files": {"pages-1.img": {"size": 4096, "chunks": ["ab" * 32]}},
        "parent": None,
        "restored": False,
        "host": "nœud-1 ✓",
    }
    assert parse_json_object(json.dumps(record).encode(), "x") == record
    assert parse_json_object(json.dumps(record, ensure_ascii=False, indent=2).encode(), "x") == record


# --- properties (hypothesis) ------------------------------------------------------------------------------
def _json_values(strategies: Any) -> Any:
    scalars = (
        strategies.none()
        | strategies.booleans()
        | strategies.integers(min_value=-(2**63), max_value=2**63)
        | strategies.floats(allow_nan=False, allow_infinity=False)
        | strategies.text(max_size=20)
    )
    return strategies.recursive(
        scalars,
        lambda children: strategies.lists(children, max_size=4)
        | strategies.dictionaries(strategies.text(max_size=8), children, max_size=4),
        max_leaves=30,
    )


def test_parse_json_object_only_ever_returns_a_dict_or_refuses() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    strategies = hypothesis.strategies

    documents = strategies.builds(
        lambda value, indent: json.dumps(value, indent=indent, ensure_ascii=False).encode(),
        _json_values(strategies) | strategies.dictionaries(strategies.text(max_size=8), _json_values(strategies)),
        strategies.sampled_from([None, 2]),
    )
    truncated = strategies.tuples(documents, strategies.floats(min_value=0, max_value=1)).map(
        lambda pair: pair[0][: int(len(pair[0]) * pair[1])]
    )
    bracket_soup = strategies.text(alphabet='[]{}":,1 \\', max_size=3000).map(str.encode)

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(strategies.binary(max_size=400) | documents | truncated | bracket_soup)
    def check(data: bytes) -> None:
        try:
            parsed = parse_json_object(data, "/ckpt/app/manifest.json")
        except VolumeRefusal as refusal:
            assert "\n" not in refusal.message
        else:
            assert isinstance(parsed, dict)
            assert parsed == json.loads(data)

    check()


_PLANTABLE = [
    "file",
    "big file",
    "json file",
    "dir",
    "dir holding links out",
    "dir holding an nfs file",
    "link to the outside directory",
    "link to the outside canary",
    "dangling link",
    "fifo",
    "device",
]


def _plant(root: Path, name: str, kind: str, outside: Outside, devices: bool) -> None:
    path = root / name
    if kind == "file":
        path.write_bytes(b"x")
    elif kind == "big file":
        path.write_bytes(b"x" * 200)
    elif kind == "json file":
        path.write_bytes(b'{"generation": 3}')
    elif kind == "dir":
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "core-1.img").write_bytes(b"x")
    elif kind == "dir holding links out":
        path.mkdir()
        (path / "out").symlink_to(outside.directory)
        (path / "canary").symlink_to(outside.canary)
        os.mkfifo(path / "fifo")
    elif kind == "dir holding an nfs file":
        path.mkdir()
        (path / ".nfs0000000000abcdef00000001").write_bytes(b"open elsewhere")
    elif kind == "link to the outside directory":
        path.symlink_to(outside.directory)
    elif kind == "link to the outside canary":
        path.symlink_to(outside.canary)
    elif kind == "dangling link":
        path.symlink_to(outside.directory / "not-yet")
    elif kind == "device" and devices:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    else:
        os.mkfifo(path)


def test_whatever_is_planted_nothing_outside_changes_and_only_refusals_come_back() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    strategies = hypothesis.strategies
    names = strategies.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=10).filter(
        lambda name: name not in (".", "..") and not name.startswith(".nfs")
    )
    plantings = strategies.dictionaries(names, strategies.sampled_from(_PLANTABLE), min_size=1, max_size=6)

    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(plantings, strategies.booleans())
    def check(planted: dict[str, str], without_proc: bool) -> None:
        with tempfile.TemporaryDirectory() as base:
            outside = Outside(Path(base))
            root = Path(base, "volume")
            root.mkdir()
            devices = _can_make_devices(root)
            for name, kind in planted.items():
                _plant(root, name, kind, outside, devices)
            fifos = tuple(path for path in root.rglob("*") if path.is_fifo())
            previous_proc = volume_module.PROC_FD_DIRECTORY
            if without_proc:
                volume_module.PROC_FD_DIRECTORY = str(Path(base, "no-proc-here"))
            try:
                with Directory.open(str(root)) as directory:
                    removed = call_within(5, lambda: _exercise(directory), fifos)
            finally:
                volume_module.PROC_FD_DIRECTORY = previous_proc
            assert outside.untouched()
            for name, kind in planted.items():
                assert removed[name] is (kind != "dir holding an nfs file")
            assert sorted(os.listdir(root)) == sorted(
                name for name, kind in planted.items() if kind == "dir holding an nfs file"
            )

    check()


def _exercise(directory: Directory) -> dict[str, bool]:
    """Every reading and changing call on every entry; only refusals and "missing" may come back."""

    def open_and_close(name: str) -> None:
        os.close(directory.open_file(name))

    def write_in_subdir(name: str) -> None:  # lands outside if subdir followed a link there
        with directory.subdir(name) as child:
            child.write_atomically("written-through", b"x")

    calls: list[Callable[[str], Any]] = [
        lambda name: directory.read_bytes(name, 100),
        lambda name: directory.read_json(name, 100),
        open_and_close,
        lambda name: directory.chmod(name, 0o700),
        write_in_subdir,
        directory.readlink,
    ]
    for entry in directory.entries():
        for call in calls:
            with contextlib.suppress(VolumeRefusal, FileNotFoundError):
                call(entry.name)
    return {entry.name: directory.remove_tree(entry.name) for entry in directory.entries()}
