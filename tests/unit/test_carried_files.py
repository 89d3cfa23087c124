"""carried: which files of the container's writable layer travel with a checkpoint, and packing them.

The files are real ones under tmp_path. carried.select judges "on the root
filesystem" by comparing with os.stat("/"); where tmp_path is not on the root
filesystem (a tmpfs /tmp), the `root_fs` fixture makes it so for the test.

carried.extract() always writes to "/" (member names are absolute paths
without their leading slash). Round trips here only ever archive files under
tmp_path, so extracting them writes back under tmp_path. Hostile archives are
extracted only in a forked child chrooted into a temporary root.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
import time
from pathlib import Path

import pytest

from supervisor_pkg import carried
from supervisor_pkg.carried import OpenFile


@pytest.fixture
def root_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path, counted as lying on the container's root filesystem."""
    if os.stat(tmp_path).st_dev != os.stat("/").st_dev:
        pretend_root(monkeypatch, tmp_path)
    return tmp_path


def pretend_root(monkeypatch: pytest.MonkeyPatch, device_of: str | Path) -> None:
    """Make carried.select see `device_of`'s filesystem as the root filesystem."""
    real_stat = os.stat

    def stat_with_another_root(path: object, *args: object, **kwargs: object) -> os.stat_result:
        return real_stat(device_of if path == "/" else path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", stat_with_another_root)


def make(path: Path, data: bytes = b"state", mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def changed_at(path: Path) -> float:
    info = os.stat(path)
    return max(info.st_mtime, info.st_ctime)


def select(
    open_files: list[OpenFile] = (),  # type: ignore[assignment]
    state_paths: list[str] = (),  # type: ignore[assignment]
    previously_carried: list[str] = (),  # type: ignore[assignment]
    exclude: list[str] = (),  # type: ignore[assignment]
    since: float = 0.0,
) -> list[str]:
    return carried.select(open_files, state_paths, previously_carried, exclude=exclude, since=since)


# --- select: open files --------------------------------------------------------------------------------
def test_a_file_the_app_opened_for_writing_is_carried_even_if_untouched_since_the_start(root_fs: Path) -> None:
    database = make(root_fs / "var/lib/app/app.db")
    since = changed_at(database) + 60  # the container started after the file last changed
    assert select([OpenFile(str(database), writable=True)], since=since) == [str(database)]


def test_an_untouched_file_of_the_image_opened_read_only_is_not_carried(root_fs: Path) -> None:
    library = make(root_fs / "usr/lib/libapp.so", mode=0o644)
    since = changed_at(library) + 60
    assert select([OpenFile(str(library), writable=False)], since=since) == []


def test_a_read_only_open_file_modified_since_the_container_started_is_carried(root_fs: Path) -> None:
    config = make(root_fs / "etc/app.conf", mode=0o644)
    since = changed_at(config) + 60
    os.utime(config, (since + 1, since + 1))  # rewritten by the app, then reopened read-only
    assert select([OpenFile(str(config), writable=False)], since=since) == [str(config)]


def test_a_file_created_since_the_start_counts_as_changed_even_with_an_old_mtime(root_fs: Path) -> None:
    # e.g. unpacked from a tar that kept its mtime: only its ctime says it is new.
    since = time.time() - 60
    unpacked = make(root_fs / "tmp/unpacked.dat")
    os.utime(unpacked, (since - 3600, since - 3600))
    assert os.stat(unpacked).st_mtime < since <= os.stat(unpacked).st_ctime
    assert select([OpenFile(str(unpacked), writable=False)], since=since) == [str(unpacked)]


def test_files_on_the_checkpoint_volume_are_not_carried_but_a_sibling_with_the_same_prefix_is(root_fs: Path) -> None:
    on_volume = make(root_fs / "checkpoints/app/gen-00000001/pages-1.img")
    sibling = make(root_fs / "checkpoints-old/notes.txt")
    chosen = select(
        [OpenFile(str(on_volume), True), OpenFile(str(sibling), True)], exclude=[str(root_fs / "checkpoints") + "/"]
    )
    assert chosen == [str(sibling)]


def test_files_under_proc_are_never_carried_even_if_proc_were_the_root_filesystem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status = "/proc/self/status"
    assert stat.S_ISREG(os.lstat(status).st_mode)
    pretend_root(monkeypatch, "/proc")  # so only the /proc exclusion can keep it out
    assert select([OpenFile(status, writable=True)]) == []


def test_a_file_on_another_filesystem_is_not_carried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_a_volume = make(tmp_path / "data/app.db")
    pretend_root(monkeypatch, "/proc")  # the root filesystem is now one tmp_path is not on
    assert select([OpenFile(str(on_a_volume), writable=True)]) == []


def test_a_mount_point_is_not_carried(root_fs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = make(root_fs / "etc/hosts")  # Docker bind-mounts /etc/hosts, /etc/resolv.conf, /etc/hostname
    monkeypatch.setattr(carried, "mount_points", lambda: {str(hosts)})
    assert select([OpenFile(str(hosts), writable=True)]) == []


def test_mount_points_are_read_from_the_kernel() -> None:
    points = carried.mount_points()
    assert "/" in points and "/proc" in points


def test_symlinks_directories_missing_and_relative_paths_are_not_carried(root_fs: Path) -> None:
    target = make(root_fs / "var/lib/app/real.db")
    link = root_fs / "var/lib/app/link.db"
    link.symlink_to(target)
    offered = [
        OpenFile(str(link), True),
        OpenFile(str(root_fs / "var/lib/app"), True),
        OpenFile(str(root_fs / "var/lib/app/deleted.db"), True),  # deleted while open: a CRIU ghost file
        OpenFile("var/lib/app/real.db", True),
    ]
    assert select(offered) == []


# --- select: files carried before, and CKPT_STATE_PATHS -----------------------------------------------------
def test_files_carried_by_the_restored_generation_are_carried_again_while_they_exist(root_fs: Path) -> None:
    # Restored from a checkpoint: their mtimes predate this container, and the app may not have them open now.
    kept = make(root_fs / "tmp/cache/index")
    gone = root_fs / "tmp/cache/removed-since"
    link = root_fs / "tmp/cache/now-a-link"
    link.symlink_to(kept)
    since = changed_at(kept) + 60
    assert select(previously_carried=[str(kept), str(gone), str(link)], since=since) == [str(kept)]


def test_state_paths_are_walked_and_every_regular_file_under_them_is_carried(root_fs: Path) -> None:
    state = root_fs / "var/lib/app"
    files = [make(state / "a.db"), make(state / "journal/0001.log"), make(state / "journal/deep/0002.log")]
    (state / "link-to-a").symlink_to(files[0])
    (state / "empty-dir").mkdir()
    single = make(root_fs / "etc/app/runtime.conf")
    since = max(changed_at(f) for f in [*files, single]) + 60  # untouched: chosen because configured

    chosen = select(state_paths=[str(state), str(single), str(root_fs / "not/there")], since=since)

    assert chosen == sorted(str(f) for f in [*files, single])


def test_a_file_chosen_for_several_reasons_is_listed_once_and_the_list_is_sorted(root_fs: Path) -> None:
    state = root_fs / "var/lib/app"
    b, a = make(state / "b.db"), make(state / "a.db")
    chosen = select(
        [OpenFile(str(b), True), OpenFile(str(a), True)], state_paths=[str(state)], previously_carried=[str(b)]
    )
    assert chosen == [str(a), str(b)]


# --- archive, members, extract ---------------------------------------------------------------------------------
def test_archive_and_extract_put_the_files_back_with_their_content_and_modes(tmp_path: Path) -> None:
    state = tmp_path / "var/lib/app"
    state.mkdir(parents=True)
    state.chmod(0o750)
    database = make(state / "app.db", b"rows", 0o600)
    journal = make(state / "journal/0001.log", b"entries", 0o640)
    scratch = make(tmp_path / "tmp/scratch.bin", b"\x00\x01" * 1000, 0o644)
    os.utime(database, (1_600_000_000, 1_600_000_000))
    paths = sorted(str(p) for p in (database, journal, scratch))
    destination = tmp_path / "gen" / carried.ARCHIVE
    destination.parent.mkdir()

    carried.archive(paths, [str(state)], str(destination))

    assert carried.members(str(destination)) == paths, "files only; the state directory is there for its mode"
    assert all(member.startswith(str(tmp_path) + "/") for member in carried.members(str(destination)))
    # The replacement container: the state directory does not exist, the scratch file differs.
    for path in (journal, database):
        path.unlink()
    (state / "journal").rmdir()
    state.rmdir()
    scratch.write_bytes(b"something else")

    restored = carried.extract(str(destination))

    assert sorted(restored) == paths
    assert database.read_bytes() == b"rows"
    assert journal.read_bytes() == b"entries"
    assert scratch.read_bytes() == b"\x00\x01" * 1000
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o750
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in (database, journal, scratch)] == [0o600, 0o640, 0o644]
    assert os.stat(database).st_mtime == 1_600_000_000


def test_an_empty_selection_makes_an_empty_archive(tmp_path: Path) -> None:
    destination = tmp_path / carried.ARCHIVE
    carried.archive([], [], str(destination))
    assert carried.members(str(destination)) == []
    assert carried.extract(str(destination)) == []


def craft_archive(path: Path, members: dict[str, bytes], mode: int = 0o644) -> None:
    """An archive as someone with write access to the volume could make it (not through carried.archive)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uname, info.gname = len(data), mode, "", ""
            tar.addfile(info, io.BytesIO(data))


def test_extract_drops_setuid_and_group_or_other_write_bits(tmp_path: Path) -> None:
    target = tmp_path / "usr/local/bin/helper"
    source = tmp_path / carried.ARCHIVE
    craft_archive(source, {str(target).lstrip("/"): b"#!/bin/sh\n"}, mode=0o4777)
    assert carried.extract(str(source)) == [str(target)]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755


def extract_in_chroot(root: Path, source_inside_root: str) -> str:
    """Run carried.extract in a forked child chrooted into `root`; report what happened."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_fd)
            os.chroot(root)
            os.chdir("/")
            try:
                report = "extracted " + json.dumps(carried.extract(source_inside_root))
            except BaseException as error:  # noqa: BLE001 - reported to the parent
                report = f"refused {type(error).__name__}: {error}"
            os.write(write_fd, report.encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        report = pipe.read()
    os.waitpid(pid, 0)
    return report


@pytest.mark.skipif(os.geteuid() != 0, reason="needs chroot(2)")
def test_in_the_chroot_a_well_formed_archive_is_extracted(tmp_path: Path) -> None:
    # The control for the test below: the chrooted extraction itself works.
    root = tmp_path / "root"
    root.mkdir()
    craft_archive(root / carried.ARCHIVE, {"var/lib/app/app.db": b"rows"})
    assert extract_in_chroot(root, "/" + carried.ARCHIVE) == 'extracted ["/var/lib/app/app.db"]'
    assert (root / "var/lib/app/app.db").read_bytes() == b"rows"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs chroot(2) to extract a hostile archive safely")
@pytest.mark.parametrize(
    "member", ["../../etc/cron.d/evil", "/etc/ld.so.preload", "var/lib/app/../../../etc/profile.d/evil.sh"]
)
def test_a_hostile_member_name_is_refused_and_nothing_is_written(tmp_path: Path, member: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    craft_archive(root / carried.ARCHIVE, {member: b"evil"})

    report = extract_in_chroot(root, "/" + carried.ARCHIVE)

    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != carried.ARCHIVE)
    assert written == [], f"{report}; wrote {written}"
    assert report.startswith("refused"), report
