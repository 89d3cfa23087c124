"""carried: which files of the container's writable layer travel with a checkpoint, and packing them.

The files are real ones under tmp_path. carried.select judges "on the root
filesystem" by comparing with os.stat("/"); where tmp_path is not on the root
filesystem (a tmpfs /tmp), the `root_fs` fixture makes it so for the test.

carried.extract() writes at "/" in the container; here it is given root= (a
replacement container's root directory under tmp_path: names, devices and mount
points are judged beneath it) and mounts= (that container's mount points). Each
hostile archive is checked to write nothing anywhere under tmp_path, a canary
outside the replacement's root included. A few extractions also run at a real
"/", in a forked child chrooted into a temporary root.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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


def test_a_file_reached_through_a_symlinked_directory_is_carried_by_its_real_path(root_fs: Path) -> None:
    # Debian's /var/run -> /run: carried as /var/run/app.pid, extract() would refuse to write through the link.
    pid_file = make(root_fs / "run/app.pid")
    (root_fs / "var").mkdir()
    (root_fs / "var/run").symlink_to(root_fs / "run")
    chosen = select([OpenFile(str(root_fs / "var/run/app.pid"), True)], state_paths=[str(root_fs / "var/run")])
    assert chosen == [str(pid_file)]


def test_state_path_files_on_a_mount_are_not_carried(root_fs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # extract() never writes beneath a mount point: carrying them would make the checkpoint unrestorable.
    state = root_fs / "var/lib/app"
    kept = make(state / "app.db")
    make(state / "volume/data.db")
    monkeypatch.setattr(carried, "mount_points", lambda: {"/", str(state / "volume")})
    assert select(state_paths=[str(state)]) == [str(kept)]


def test_the_engines_etc_hosts_is_not_carried_even_when_not_a_mount() -> None:
    if not os.path.isfile("/etc/hosts") or "/etc/hosts" in carried.mount_points():
        pytest.skip("/etc/hosts is a mount point here: the mount check alone keeps it out")
    assert select([OpenFile("/etc/hosts", writable=True)]) == []


# --- archive and extract: round trips -----------------------------------------------------------------------
# extract() is given root= (a replacement container's root directory under tmp_path) and mounts= (its
# mount points): archives made by carried.archive() hold tmp_path's absolute paths, put back beneath it.
OLD_TIME = 1_000_000_000
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another owner needs root, as in the container")


def moved(root: Path, path: Path | str) -> Path:
    """Where the absolute path `path` of the old container is in the replacement whose root is `root`."""
    return root / str(path).lstrip("/")


def put_back(source: Path, root: Path, mounts: Iterable[str] = (), **options: Any) -> list[str]:
    return carried.extract(str(source), root=str(root), mounts=set(mounts), **options)


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

    assert carried.members(str(destination)) == paths, "files only; the directories are there for their modes"
    # The replacement container: the state directory does not exist, the scratch file differs.
    replacement = tmp_path / "replacement"
    make(moved(replacement, scratch), b"something else")

    restored = put_back(destination, replacement)

    assert sorted(restored) == paths
    assert moved(replacement, database).read_bytes() == b"rows"
    assert moved(replacement, journal).read_bytes() == b"entries"
    assert moved(replacement, scratch).read_bytes() == b"\x00\x01" * 1000
    assert stat.S_IMODE(os.stat(moved(replacement, state)).st_mode) == 0o750
    modes = [stat.S_IMODE(os.stat(moved(replacement, p)).st_mode) for p in (database, journal, scratch)]
    assert modes == [0o600, 0o640, 0o644]
    assert os.stat(moved(replacement, database)).st_mtime == 1_600_000_000


def test_an_empty_selection_makes_an_empty_archive(tmp_path: Path) -> None:
    destination = tmp_path / carried.ARCHIVE
    carried.archive([], [], str(destination))
    assert carried.members(str(destination)) == []
    assert carried.extract(str(destination)) == []


@AS_ROOT  # tmp_path's parents, recorded with their owner (root), are made again in the replacement
def test_archive_keeps_directories_links_and_the_group_write_bit_through_a_round_trip(tmp_path: Path) -> None:
    # MariaDB: restored 0640 where it had 0660, CRIU refuses the file ("bad mode 0100640 (expect 0100660)").
    state = tmp_path / "old/var/lib/mysql"
    state.mkdir(parents=True)
    (state / "test").mkdir(mode=0o700)  # an empty database: a directory the app needs
    os.chmod(state / "test", 0o700)
    table = make(state / "ibdata1", b"pages", 0o660)
    os.link(table, state / "ibdata1.hardlink")
    make(state / "binlog/0002.log", b"events", 0o640)
    (state / "binlog/current").symlink_to("0002.log")
    (state / "passwd-link").symlink_to("/etc/passwd")  # reaches nothing carried: kept as text all the same
    os.utime(state, (OLD_TIME, OLD_TIME))
    destination = tmp_path / carried.ARCHIVE
    paths = select(state_paths=[str(state)])

    carried.archive(paths, [str(state)], str(destination))
    replacement = tmp_path / "replacement"
    replacement.mkdir()
    restored = put_back(destination, replacement)

    assert sorted(restored) == paths == sorted(carried.members(str(destination)))
    new_state = moved(replacement, state)
    assert stat.S_IMODE(os.stat(new_state / "ibdata1").st_mode) == 0o660
    assert os.stat(new_state / "ibdata1").st_ino == os.stat(new_state / "ibdata1.hardlink").st_ino
    assert stat.S_IMODE(os.stat(new_state / "test").st_mode) == 0o700
    assert os.readlink(new_state / "binlog/current") == "0002.log"
    # Changed: links to what the archive does not carry were left out (and refused by extract); the
    # whole writable layer comes back now, an app's link to an image file as well.
    assert os.readlink(new_state / "passwd-link") == "/etc/passwd"
    assert os.stat(new_state).st_mtime == OLD_TIME


@AS_ROOT
def test_an_archive_written_by_the_previous_version_is_put_back(tmp_path: Path) -> None:
    # The previous archive() listed the state directories and the files, not every parent: parents the
    # archive does not list are made like tar makes them, owned like the directory above.
    replacement = image(tmp_path)
    source = craft(
        tmp_path / carried.ARCHIVE,
        member("var/lib/app", kind=tarfile.DIRTYPE, mode=0o750, uid=4242, gid=4243),
        member("var/lib/app/journal/0001.log", b"entries", mode=0o640, uid=4242, gid=4243),
        member("tmp/scratch.bin", b"scratch"),
    )
    assert put_back(source, replacement) == ["/var/lib/app/journal/0001.log", "/tmp/scratch.bin"]
    journal = os.stat(replacement / "var/lib/app/journal")
    assert (stat.S_IMODE(journal.st_mode), journal.st_uid, journal.st_gid) == (0o755, 4242, 4243)
    assert (replacement / "tmp/scratch.bin").read_bytes() == b"scratch"


# --- extract: an untrusted archive ---------------------------------------------------------------------------
def image(tmp_path: Path) -> Path:
    """A replacement container's root directory, as its image made it; a canary outside it."""
    root = tmp_path / "replacement"
    for directory in ("etc", "var/lib", "tmp", "run"):
        (root / directory).mkdir(parents=True)
    (root / "tmp").chmod(0o1777)
    for name in ("hosts", "hostname", "resolv.conf"):
        make(root / "etc" / name, b"written by the engine\n", 0o644)
    make(root / "etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644)
    make(tmp_path / "outside/canary", b"original", 0o644)
    for directory, _subdirs, _files in os.walk(root):
        os.utime(directory, (OLD_TIME, OLD_TIME))
    return root


def member(
    name: str,
    data: bytes = b"",
    kind: bytes = tarfile.REGTYPE,
    mode: int = 0o644,
    uid: int | None = None,
    gid: int | None = None,
    mtime: float = 1_600_000_000,
    linkname: str = "",
    pax: dict[str, str] | None = None,
) -> tuple[tarfile.TarInfo, bytes]:
    """A member as someone with write access to the volume could make it (not through carried.archive)."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.linkname = kind, mode, mtime, linkname
    info.uid = os.getuid() if uid is None else uid
    info.gid = os.getgid() if gid is None else gid
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.uname = info.gname = ""
    info.pax_headers = pax or {}
    return info, data


def craft(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def snapshot(*roots: Path) -> dict[str, tuple[object, ...]]:
    """Everything under `roots` (not following links): type, mode, owner, mtime, content."""
    state: dict[str, tuple[object, ...]] = {}
    for root in roots:
        for directory, subdirs, files in os.walk(root):
            for path in [directory, *(os.path.join(directory, name) for name in [*subdirs, *files])]:
                info = os.lstat(path)
                content: object = None
                if stat.S_ISLNK(info.st_mode):
                    content = os.readlink(path)
                elif stat.S_ISREG(info.st_mode):
                    content = Path(path).read_bytes()
                state[path] = (info.st_mode, info.st_uid, info.st_gid, info.st_mtime_ns, info.st_nlink, content)
    return state


def refuses(source: Path, root: Path, match: str, **options: Any) -> None:
    """extract() refuses `source` with one line matching `match`, and writes nothing anywhere under tmp_path."""
    everything = root.parent
    before = snapshot(everything)
    with pytest.raises(carried.CarriedFilesRefused, match=match) as refusal:
        put_back(source, root, **options)
    assert "\n" not in str(refusal.value)
    assert snapshot(everything) == before, "the refused archive wrote something"


# The red-team findings, each pinned by name.
def test_a_dot_member_is_refused_and_the_root_keeps_its_owner(tmp_path: Path) -> None:
    root = image(tmp_path)
    source = craft(
        tmp_path / carried.ARCHIVE,
        member("var/lib/app/app.db", b"rows"),
        member(".", kind=tarfile.DIRTYPE, mode=0o777, uid=4242, gid=4242),
    )
    refuses(source, root, r"member '\.': it names the root directory")


@AS_ROOT
def test_an_etc_member_gives_the_images_etc_the_owner_mode_and_times_it_had_in_the_old_container(
    tmp_path: Path,
) -> None:
    # Changed: the image's directories were left as they were ("an image directory's owner or mode is never
    # changed"). A directory the app changed is part of its writable layer: it comes back as it was. The
    # archive could replace any file of the root filesystem already, so this gives it no new power; the
    # root directory itself stays out of reach (test above).
    root = image(tmp_path)
    source = craft(
        tmp_path / carried.ARCHIVE,
        member("etc", kind=tarfile.DIRTYPE, mode=0o4750, uid=65534, gid=65533, mtime=1),
        member("etc/app.conf", b"key=value\n", mode=0o600),
    )
    assert put_back(source, root) == ["/etc/app.conf"]
    after = os.stat(root / "etc")
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode), after.st_mtime_ns) == (
        65534, 65533, 0o750, 1_000_000_000), "setuid means nothing on a directory: not carried"
    assert (root / "etc/app.conf").read_bytes() == b"key=value\n"


def test_a_listed_directory_that_is_a_mount_point_here_keeps_its_owner_and_mode(tmp_path: Path) -> None:
    # A volume's root directory is not the writable layer's, even where the old container had a plain one.
    root = image(tmp_path)
    (root / "data").mkdir()
    before = os.stat(root / "data")
    source = craft(tmp_path / carried.ARCHIVE, member("data", kind=tarfile.DIRTYPE, mode=0o777, mtime=1),
                   member("tmp/a", b"a"))
    put_back(source, root, mounts=["/", "/data"])
    after = os.stat(root / "data")
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


ENGINE_MOUNTS = ("/", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf")


@pytest.mark.parametrize("name", ["etc/hosts", "etc/hostname", "etc/resolv.conf"])
@pytest.mark.parametrize("mounts", [ENGINE_MOUNTS, ()], ids=["bind-mounted", "in-the-root-fs"])
def test_the_engines_files_are_never_overwritten(tmp_path: Path, name: str, mounts: tuple[str, ...]) -> None:
    root = image(tmp_path)
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"), member(name, b"10.0.0.66 db\n"))
    refuses(source, root, f"/{name} is the container engine's own file", mounts=mounts)


@pytest.mark.parametrize(("name", "mounts", "point"), [
    ("etc/app/secret.conf", ["/", "/etc/app/secret.conf"], "/etc/app/secret.conf"),  # a file bind mount
    ("data/new/app.db", ["/", "/data"], "/data"),  # beneath a volume, in a directory not there yet
    ("data", ["/", "/data"], "/data"),  # the volume's mount point itself, as a file
])
def test_nothing_is_written_at_or_beneath_a_mount_point(tmp_path: Path, name: str, mounts: list[str],
                                                        point: str) -> None:
    root = image(tmp_path)
    make(root / "etc/app/secret.conf", b"from the host")
    (root / "data").mkdir()
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"), member(name, b"evil"))
    refuses(source, root, f"{point} is a mount point in this container", mounts=mounts)


def on_another_device(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """os.lstat says `path` is on another filesystem (a volume the test cannot mount)."""
    real_lstat = os.lstat

    def lstat(name: str, *args: Any, **kwargs: Any) -> os.stat_result:
        info = real_lstat(name, *args, **kwargs)
        if Path(name) == path:
            return os.stat_result((info.st_mode, info.st_ino, info.st_dev + 1, *tuple(info)[3:]))
        return info

    monkeypatch.setattr(os, "lstat", lstat)


@pytest.mark.parametrize("other", ["srv", "srv/app.db"])
def test_nothing_is_written_on_another_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  other: str) -> None:
    root = image(tmp_path)
    make(root / "srv/app.db", b"on the volume")
    on_another_device(monkeypatch, root / other)
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"), member("srv/app.db", b"evil"))
    refuses(source, root, f"/{other} is on another filesystem than the container's root")


def test_a_member_through_a_symlink_into_proc_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    # Written member by member, the first went in and the second failed in /proc: half an archive.
    root = image(tmp_path)
    (root / "var/lib/link").symlink_to("/proc/self")
    source = craft(
        tmp_path / carried.ARCHIVE,
        member("var/lib/app/first.db", b"rows"),
        member("var/lib/link/attr/current", b"unconfined"),
    )
    refuses(source, root, "/var/lib/link is a symbolic link in this container, not a directory")


def test_a_symlink_in_a_parent_pointing_outside_the_root_is_refused_and_the_canary_untouched(tmp_path: Path) -> None:
    root = image(tmp_path)
    (root / "var/cache").symlink_to(tmp_path / "outside")
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"), member("var/cache/canary", b"evil"))
    refuses(source, root, "/var/cache is a symbolic link in this container")
    assert (tmp_path / "outside/canary").read_bytes() == b"original"


def test_a_symlink_member_is_never_a_parent_of_another_member(tmp_path: Path) -> None:
    root = image(tmp_path)
    source = craft(
        tmp_path / carried.ARCHIVE,
        member("var/lib/app", kind=tarfile.DIRTYPE),
        member("var/lib/shortcut", kind=tarfile.SYMTYPE, linkname="app"),  # a link among members: fine itself
        member("var/lib/shortcut/app.db", b"rows"),
    )
    refuses(source, root, "'var/lib/shortcut' is a symlink in this archive, not a directory")


@pytest.mark.parametrize("target", [
    "/etc/shadow", "../../../../../../../etc/passwd", "../../etc/passwd", "not-carried.db", "/", "..",
    "missing/../app.db", "/proc/self/fd/1", "/run/secrets/key",
])
def test_a_symlink_comes_back_with_its_target_as_the_app_made_it_and_nothing_is_written_through_it(
    tmp_path: Path, target: str
) -> None:
    # Changed: a symlink had to reach a carried file, anything else refused the archive. With the whole
    # writable layer carried, an app's links to the image, /dev/stdout or a secret must come back as they
    # were; extract() never follows one, nor writes beneath one, so a link is only text to it.
    root = image(tmp_path)
    before = snapshot(tmp_path / "outside")
    source = craft(
        tmp_path / carried.ARCHIVE,
        member("var/lib/app/app.db", b"rows"),
        member("var/lib/app/link", kind=tarfile.SYMTYPE, linkname=target),
    )
    put_back(source, root)
    assert os.readlink(root / "var/lib/app/link") == target
    assert snapshot(tmp_path / "outside") == before


@pytest.mark.parametrize("target", ["", "a\x00b", "x" * 4096])
def test_an_empty_nul_or_overlong_symlink_target_is_refused(tmp_path: Path, target: str) -> None:
    root = image(tmp_path)
    info, _data = member("var/lib/app/link", kind=tarfile.SYMTYPE)
    info.pax_headers = {"linkpath": target}
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"), (info, b""))
    refuses(source, root, "member 'var/lib/app/link': its symbolic link target is empty, too long, or has a NUL")


def test_a_symlink_to_the_outside_given_as_an_absolute_path_is_put_back_and_never_followed(tmp_path: Path) -> None:
    # Changed: refused before (see above); the canary outside the root is still untouched.
    root = image(tmp_path)
    source = craft(tmp_path / carried.ARCHIVE,
                   member("var/lib/app/link", kind=tarfile.SYMTYPE, linkname=str(tmp_path / "outside/canary")))
    put_back(source, root)
    assert os.readlink(root / "var/lib/app/link") == str(tmp_path / "outside/canary")
    assert (tmp_path / "outside/canary").read_bytes() == b"original"


@pytest.mark.parametrize(("target", "kind"), [
    ("etc/passwd", tarfile.LNKTYPE),  # the image's file, not carried
    ("var/lib/app", tarfile.LNKTYPE),  # a directory
    ("../etc/passwd", tarfile.LNKTYPE),
])
def test_a_hard_link_to_anything_but_a_carried_regular_file_is_refused(tmp_path: Path, target: str,
                                                                       kind: bytes) -> None:
    root = image(tmp_path)
    source = craft(
        tmp_path / carried.ARCHIVE,
        member("var/lib/app", kind=tarfile.DIRTYPE),
        member("var/lib/app/app.db", b"rows"),
        member("var/lib/app/link", kind=kind, linkname=target),
    )
    refuses(source, root, "it is a hard link to .*, which is not a carried regular file")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, b"Q"])
def test_devices_and_unknown_types_are_refused(tmp_path: Path, kind: bytes) -> None:
    # Changed: FIFOs were refused too; they are part of the writable layer now (next test).
    root = image(tmp_path)
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"), member("tmp/node", kind=kind))
    refuses(source, root, "member 'tmp/node': it is (a character device|a block device|of tar type b'Q')")


@AS_ROOT
def test_a_fifo_is_put_back_with_its_mode_owner_and_times(tmp_path: Path) -> None:
    root = image(tmp_path)
    info, data = member("run/app/control", kind=tarfile.FIFOTYPE, mode=0o620, uid=4242, gid=4243, mtime=1_500_000_000)
    info.pax_headers = {"atime": "1400000000.5"}
    assert put_back(craft(tmp_path / carried.ARCHIVE, (info, data)), root) == []
    restored = os.lstat(root / "run/app/control")
    assert stat.S_ISFIFO(restored.st_mode)
    assert (stat.S_IMODE(restored.st_mode), restored.st_uid, restored.st_gid) == (0o620, 4242, 4243)
    assert (restored.st_mtime_ns, restored.st_atime_ns) == (1_500_000_000_000_000_000, 1_400_000_000_500_000_000)


@pytest.mark.parametrize(("name", "pax", "reason"), [
    ("", None, "it names the root directory"),
    ("/", None, "it names the root directory"),
    ("./", None, "not in normal form"),  # a file: a directory "./" reads as "."
    ("..", None, "'..'"),
    ("../escaped", None, "'..'"),
    ("var/lib/../../../etc/profile.d/evil.sh", None, "'..'"),
    ("/etc/ld.so.preload", None, "absolute"),
    ("var//lib/app.db", None, "not in normal form"),
    ("./var/lib/app.db", None, "not in normal form"),
    ("var/lib/x", {"path": "var/lib/x\x00.so"}, "NUL"),
    ("tmp/" + "x" * 256, None, "longer than 255 bytes"),
])
def test_a_hostile_member_name_is_refused(tmp_path: Path, name: str, pax: dict[str, str] | None,
                                          reason: str) -> None:
    root = image(tmp_path)
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"), member(name, b"evil", pax=pax))
    refuses(source, root, reason)


@pytest.mark.parametrize(("name", "exclude"), [
    ("proc/sys/kernel/core_pattern", ()), ("sys/kernel/uevent_helper", ()), ("dev/sda", ()),
    ("run/secrets/token", ()), ("checkpoints/app/gen-00000002/pages-1.img", ("/checkpoints/",)),
    ("checkpoints", ("/checkpoints",)),
    ("opt/criu-supervisor/lib/python3/dist-packages/supervisor_pkg/restore.py", ()),  # the bundle's code
])
def test_the_kernels_filesystems_secrets_and_the_checkpoint_volume_are_never_written(
    tmp_path: Path, name: str, exclude: tuple[str, ...]
) -> None:
    root = image(tmp_path)
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"), member(name, b"evil"))
    refuses(source, root, "carried files never write there", exclude=exclude)


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_directory(path: Path) -> None:
    path.mkdir()


def make_symlink_to_the_canary(path: Path) -> None:
    path.symlink_to(path.parents[4] / "outside/canary")  # replacement/var/lib/app/<name> -> outside/canary


@pytest.mark.parametrize("already", [make_fifo, make_directory, make_symlink_to_the_canary])
def test_a_carried_file_replaces_only_a_regular_file(tmp_path: Path, already: Callable[[Path], None]) -> None:
    root = image(tmp_path)
    (root / "var/lib/app").mkdir()
    already(root / "var/lib/app/app.db")
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"), member("var/lib/app/app.db", b"evil"))
    refuses(source, root, "/var/lib/app/app.db is a (FIFO|directory|symbolic link) in this container")
    assert (tmp_path / "outside/canary").read_bytes() == b"original"


def test_an_existing_file_is_replaced_by_rename_never_written_in_place(tmp_path: Path) -> None:
    # A hard link to the image's file elsewhere keeps the old content: the new file is a new inode.
    root = image(tmp_path)
    old = make(root / "var/lib/app/app.db", b"image")
    os.link(old, root / "var/lib/elsewhere")
    source = craft(tmp_path / carried.ARCHIVE, member("var/lib/app/app.db", b"rows"))
    assert put_back(source, root) == ["/var/lib/app/app.db"]
    assert (root / "var/lib/app/app.db").read_bytes() == b"rows"
    assert (root / "var/lib/elsewhere").read_bytes() == b"image"
    assert [name for name in os.listdir(root / "var/lib/app") if name.startswith(".carried-")] == []


def test_a_symlink_at_the_final_name_is_replaced_by_the_carried_symlink_not_followed(tmp_path: Path) -> None:
    root = image(tmp_path)
    (root / "var/lib/app").mkdir()
    make_symlink_to_the_canary(root / "var/lib/app/current")
    source = craft(
        tmp_path / carried.ARCHIVE,
        member("var/lib/app/0002.log", b"events"),
        member("var/lib/app/current", kind=tarfile.SYMTYPE, linkname="0002.log"),
    )
    put_back(source, root)
    assert os.readlink(root / "var/lib/app/current") == "0002.log"
    assert (tmp_path / "outside/canary").read_bytes() == b"original"


def test_a_member_listed_twice_is_refused(tmp_path: Path) -> None:
    root = image(tmp_path)
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/app.db", b"rows"), member("tmp/app.db", b"evil"))
    refuses(source, root, "member 'tmp/app.db': it appears twice in the archive")


# What a valid archive puts back.
@AS_ROOT
def test_new_nested_directories_are_made_with_their_owner_mode_and_mtime(tmp_path: Path) -> None:
    root = image(tmp_path)
    source = craft(
        tmp_path / carried.ARCHIVE,
        member("var/lib/app", kind=tarfile.DIRTYPE, mode=0o2750, uid=4242, gid=4243, mtime=1_500_000_001),
        member("var/lib/app/journal", kind=tarfile.DIRTYPE, mode=0o700, uid=4242, gid=4243, mtime=1_500_000_002),
        member("var/lib/app/journal/0001.log", b"entries", mode=0o640, uid=4242, gid=4243, mtime=1_500_000_003),
    )
    var_lib = os.stat(root / "var/lib")

    assert put_back(source, root) == ["/var/lib/app/journal/0001.log"]

    expected = [(0o2750, 1_500_000_001), (0o700, 1_500_000_002), (0o640, 1_500_000_003)]
    for path, (mode, mtime) in zip(["var/lib/app", "var/lib/app/journal", "var/lib/app/journal/0001.log"],
                                   expected, strict=True):
        info = os.stat(root / path)
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, info.st_mtime) == (mode, 4242, 4243, mtime), path
    assert (root / "var/lib/app/journal/0001.log").read_bytes() == b"entries"
    after = os.stat(root / "var/lib")  # the image's directory the new one went into
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (var_lib.st_mode, var_lib.st_uid, var_lib.st_mtime_ns)


def test_a_hard_link_pair_is_put_back_as_one_inode(tmp_path: Path) -> None:
    root = image(tmp_path)
    source = craft(
        tmp_path / carried.ARCHIVE,
        member("var/lib/app/a.db", b"rows", mode=0o640),
        member("var/lib/app/b.db", kind=tarfile.LNKTYPE, linkname="var/lib/app/a.db"),
    )
    assert put_back(source, root) == ["/var/lib/app/a.db", "/var/lib/app/b.db"]
    a, b = os.stat(root / "var/lib/app/a.db"), os.stat(root / "var/lib/app/b.db")
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)
    assert (root / "var/lib/app/b.db").read_bytes() == b"rows"


def test_a_symlink_among_the_carried_files_is_put_back_as_a_link(tmp_path: Path) -> None:
    root = image(tmp_path)
    source = craft(
        tmp_path / carried.ARCHIVE,
        member("var/lib/app/journal/0002.log", b"events"),
        member("var/lib/app/current", kind=tarfile.SYMTYPE, linkname="journal/0002.log"),
        member("var/lib/app/absolute", kind=tarfile.SYMTYPE, linkname="/var/lib/app/journal/0002.log"),
        member("var/lib/app/journal/up", kind=tarfile.SYMTYPE, linkname="../current"),  # a link to a link
    )
    assert put_back(source, root) == ["/var/lib/app/journal/0002.log"], "files only"
    assert os.readlink(root / "var/lib/app/current") == "journal/0002.log"
    assert os.readlink(root / "var/lib/app/absolute") == "/var/lib/app/journal/0002.log"
    assert (root / "var/lib/app/journal/up").read_bytes() == b"events"


@pytest.mark.parametrize("mode", [0o660, 0o666, 0o664, 0o1777])
def test_group_and_other_write_bits_are_kept_so_criu_finds_the_mode_it_recorded(tmp_path: Path, mode: int) -> None:
    # MariaDB's files are 0660: restored 0640, CRIU fails with "bad mode 0100640 (expect 0100660)".
    root = image(tmp_path)
    source = craft(tmp_path / carried.ARCHIVE, member("var/lib/mysql/ibdata1", b"pages", mode=mode))
    put_back(source, root)
    assert stat.S_IMODE(os.stat(root / "var/lib/mysql/ibdata1").st_mode) == mode


@pytest.mark.parametrize(("mode", "expected"), [(0o4775, 0o775), (0o2775, 0o775), (0o6777, 0o777), (0o4777, 0o777)])
def test_setuid_and_setgid_are_cleared_on_files(tmp_path: Path, mode: int, expected: int) -> None:
    # Changed: this test asserted 0o4777 -> 0o755, tarfile's 'tar' filter also dropping group/other write.
    root = image(tmp_path)
    source = craft(tmp_path / carried.ARCHIVE, member("usr/local/bin/helper", b"#!/bin/sh\n", mode=mode))
    assert put_back(source, root) == ["/usr/local/bin/helper"]
    assert stat.S_IMODE(os.stat(root / "usr/local/bin/helper").st_mode) == expected


@AS_ROOT
def test_the_numeric_owner_not_the_name_and_the_mtime_are_kept(tmp_path: Path) -> None:
    # The app's process comes back with its numeric ids (CRIU restores credentials as numbers); a user
    # name would be looked up in the replacement's /etc/passwd (tarfile as root prefers the name).
    root = image(tmp_path)
    info, data = member("var/lib/app/app.db", b"rows", uid=4242, gid=4243, mtime=1_500_000_000.5)
    info.uname, info.gname = "root", "root"
    put_back(craft(tmp_path / carried.ARCHIVE, (info, data)), root)
    restored = os.stat(root / "var/lib/app/app.db")
    assert (restored.st_uid, restored.st_gid, restored.st_mtime_ns) == (4242, 4243, 1_500_000_000_500_000_000)


def test_an_archive_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    root = image(tmp_path)
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/a", b"a" * 600), member("tmp/b", b"b" * 600))
    refuses(source, root, "member 'tmp/b': the carried files add up to more than the 1000 bytes", max_bytes=1000)
    assert put_back(source, root, max_bytes=1200) == ["/tmp/a", "/tmp/b"]


def test_a_truncated_archive_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    root = image(tmp_path)
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/a", b"a" * 600), member("tmp/b", b"b" * 5000))
    with open(source, "r+b") as handle:
        handle.truncate(3 * 512 + 2048)  # headers of a, a's data, b's header(s), part of b's data
    refuses(source, root, "member 'tmp/b': .*run past the end of the archive")


def test_a_failure_while_writing_removes_everything_written_so_far(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = image(tmp_path)
    make(root / "tmp/b", b"the image's")
    source = craft(
        tmp_path / carried.ARCHIVE,
        member("var/lib/app/journal", kind=tarfile.DIRTYPE),
        member("var/lib/app/a.db", b"rows"),
        member("tmp/b", b"replacement"),
    )
    real_fchmod, calls = os.fchmod, []

    def fchmod_until_the_disk_is_full(fd: int, mode: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fchmod(fd, mode)

    monkeypatch.setattr(os, "fchmod", fchmod_until_the_disk_is_full)
    refuses(source, root, "member 'tmp/b': cannot write it: No space left on device; nothing was put back")


def test_an_archive_larger_than_the_free_space_is_refused_before_writing(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = image(tmp_path)
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/a", b"a" * 600), member("tmp/b", b"b" * 600))
    real_statvfs = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=1, f_frsize=1024)
                        if Path(path) == root else real_statvfs(path))
    refuses(source, root, "the carried files need 1200 bytes, the container's root filesystem has 1024 free")


def test_extract_refuses_when_the_mount_points_cannot_be_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable() -> set[str]:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(carried, "_read_mount_points", unreadable)
    root = image(tmp_path)
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/a", b"a"))
    with pytest.raises(carried.CarriedFilesRefused, match="cannot read /proc/self/mountinfo"):
        carried.extract(str(source), root=str(root))


# --- extract at "/", chrooted ------------------------------------------------------------------------------
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
                # No /proc in the chroot: extract() would refuse, unable to read the mount points.
                report = "extracted " + json.dumps(carried.extract(source_inside_root, mounts=set()))
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
    craft(root / carried.ARCHIVE, member("var/lib/app/app.db", b"rows"))
    assert extract_in_chroot(root, "/" + carried.ARCHIVE) == 'extracted ["/var/lib/app/app.db"]'
    assert (root / "var/lib/app/app.db").read_bytes() == b"rows"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs chroot(2) to extract a hostile archive safely")
@pytest.mark.parametrize(
    "name", ["../../etc/cron.d/evil", "/etc/ld.so.preload", "var/lib/app/../../../etc/profile.d/evil.sh"]
)
def test_a_hostile_member_name_is_refused_and_nothing_is_written(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    craft(root / carried.ARCHIVE, member(name, b"evil"))

    report = extract_in_chroot(root, "/" + carried.ARCHIVE)

    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != carried.ARCHIVE)
    assert written == [], f"{report}; wrote {written}"
    assert report.startswith("refused"), report


# --- the writable layer: exact times, holes, deletions --------------------------------------------------------
def sparse_member(name: str, size: int, extents: list[tuple[int, int]], data: bytes | None = None,
                  count: int | None = None) -> tuple[tarfile.TarInfo, bytes]:
    """A GNU 1.0 sparse member as anyone may write it: the map (count, offset, length...) then the data."""
    numbers = [len(extents) if count is None else count, *(n for extent in extents for n in extent)]
    prefix = ("\n".join(str(n) for n in numbers) + "\n").encode()
    prefix += b"\0" * (-len(prefix) % 512)
    if data is None:
        data = b"".join(bytes([65 + index % 26]) * length for index, (_offset, length) in enumerate(extents))
    body = data
    info, _ = member(name)
    info.size = len(prefix) + len(body)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                        "GNU.sparse.realsize": str(size)}
    return info, prefix + body


def test_a_sparse_file_comes_back_with_its_holes_and_tar_reads_the_same_bytes(tmp_path: Path) -> None:
    # A database's preallocated or punched file: 64 MiB apparent, 8 KiB of data, a hole at the end too.
    old = tmp_path / "old/var/lib/app/table.ibd"
    old.parent.mkdir(parents=True)
    with open(old, "wb") as handle:
        handle.seek(4096)
        handle.write(b"page" * 1024)
        handle.seek(32 << 20)
        handle.write(b"leaf" * 1024)
        handle.truncate(64 << 20)
    if os.stat(old).st_blocks * 512 >= 1 << 20:
        pytest.skip("this filesystem does not keep holes")
    destination = tmp_path / carried.ARCHIVE
    carried.archive([str(old)], [], str(destination))
    assert os.path.getsize(destination) < 64 * 1024, "only the data is stored"
    replacement = tmp_path / "replacement"
    replacement.mkdir()

    put_back(destination, replacement)

    restored = moved(replacement, old)
    assert restored.read_bytes() == old.read_bytes()
    assert os.stat(restored).st_size == 64 << 20
    assert os.stat(restored).st_blocks <= os.stat(old).st_blocks + 8
    with tarfile.open(destination) as tar:  # GNU's format: any tar reads the same bytes
        reader = tar.extractfile(str(old).lstrip("/"))
        assert reader is not None and reader.read() == old.read_bytes()
    if shutil.which("tar"):  # GNU tar too, the hole at the end included (its (size, 0) extent)
        (tmp_path / "by-tar").mkdir()
        subprocess.run(["tar", "-C", str(tmp_path / "by-tar"), "-xf", str(destination)], check=True)
        assert moved(tmp_path / "by-tar", old).read_bytes() == old.read_bytes()


def test_a_file_that_is_all_hole_comes_back_as_one(tmp_path: Path) -> None:
    root = image(tmp_path)
    source = craft(tmp_path / carried.ARCHIVE, sparse_member("var/lib/app/empty.img", 1 << 30, []))
    put_back(source, root)
    info = os.stat(root / "var/lib/app/empty.img")
    assert (info.st_size, info.st_blocks) == (1 << 30, 0)


@pytest.mark.parametrize(("extents", "size"), [
    ([(4096, 10), (0, 10)], 8192),  # out of order
    ([(0, 100), (50, 10)], 8192),  # overlapping
    ([(8000, 500)], 8192),  # past its size
    ([(0, -1)], 8192),
])
def test_a_sparse_map_out_of_order_overlapping_or_past_the_size_is_refused(
    tmp_path: Path, extents: list[tuple[int, int]], size: int
) -> None:
    root = image(tmp_path)
    data = b"d" * sum(max(length, 0) for _offset, length in extents)
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"),
                   sparse_member("var/lib/app/t.ibd", size, extents, data))
    refuses(source, root, "member 'var/lib/app/t.ibd': (its sparse map is out of order|its -?[0-9]+ bytes of data)")


def test_a_sparse_map_promising_more_data_than_the_archive_holds_is_refused(tmp_path: Path) -> None:
    root = image(tmp_path)
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"),
                   sparse_member("var/lib/app/t.ibd", 1 << 40, [(0, 1 << 39)], data=b"short"))
    refuses(source, root, "(run past the end of the archive|not a readable tar archive)")


def test_a_sparse_map_cut_short_is_refused_not_looped_over(tmp_path: Path) -> None:
    root = image(tmp_path)
    info, data = sparse_member("var/lib/app/t.ibd", 8192, [(0, 10)], count=10**6)  # a million extents promised
    refuses(craft(tmp_path / carried.ARCHIVE, (info, data)), root, "is not a readable tar archive")


def test_sparse_formats_the_archive_never_writes_are_refused(tmp_path: Path) -> None:
    root = image(tmp_path)
    info, data = member("var/lib/app/t.ibd", b"0123456789")
    info.pax_headers = {"GNU.sparse.map": "0,10", "GNU.sparse.size": "8192"}  # GNU's 0.1
    refuses(craft(tmp_path / carried.ARCHIVE, (info, data)), root, "a sparse file in a format carried.archive never")


@AS_ROOT
def test_mtimes_and_atimes_come_back_to_the_nanosecond(tmp_path: Path) -> None:
    old = tmp_path / "old"
    (old / "dir").mkdir(parents=True)
    make(old / "dir/file", b"x")
    (old / "dir/link").symlink_to("file")
    os.mkfifo(old / "dir/fifo")
    times = {"dir/file": (1_400_000_000_123_456_789, 1_500_000_000_987_654_321),
             "dir/link": (1_400_000_001_000_000_001, 1_500_000_001_000_000_002),
             "dir/fifo": (1_400_000_002_000_000_003, 1_500_000_002_000_000_004),
             "dir": (1_400_000_003_000_000_005, -1)}  # before 1970, too
    for name, (atime, mtime) in times.items():
        os.utime(old / name, ns=(atime, mtime), follow_symlinks=False)
    destination = tmp_path / carried.ARCHIVE
    carried.archive([str(old / name) for name in times], [], str(destination))
    replacement = tmp_path / "replacement"
    replacement.mkdir()

    put_back(destination, replacement)

    for name, expected in times.items():
        info = os.lstat(moved(replacement, old / name))
        assert (info.st_atime_ns, info.st_mtime_ns) == expected, name


@pytest.mark.parametrize("atime", ["yesterday", "1e9", "nan", "99999999999999999999"])
def test_an_atime_that_is_not_a_time_is_refused(tmp_path: Path, atime: str) -> None:
    root = image(tmp_path)
    info, data = member("tmp/a", b"a")
    info.pax_headers = {"atime": atime}
    refuses(craft(tmp_path / carried.ARCHIVE, (info, data)), root, "its atime .* is not a valid time")


def test_hard_links_in_different_directories_come_back_as_one_inode(tmp_path: Path) -> None:
    old = tmp_path / "old"
    first = make(old / "a/data.db", b"rows")
    os.link(first, make(old / "b/placeholder").parent / "data.db")
    destination = tmp_path / carried.ARCHIVE
    assert carried.archive([str(first), str(old / "b/data.db")], [], str(destination)) == 2
    replacement = tmp_path / "replacement"
    replacement.mkdir()
    put_back(destination, replacement)
    a, b = os.stat(moved(replacement, first)), os.stat(moved(replacement, old / "b/data.db"))
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)


def whiteout(name: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, kind=carried.WHITEOUT)


def test_deletions_remove_a_file_a_whole_directory_and_ignore_what_is_not_there(tmp_path: Path) -> None:
    root = image(tmp_path)
    make(root / "etc/motd", b"welcome")
    make(root / "usr/share/doc/pkg/deep/er/readme", b"doc")
    (root / "usr/share/doc/pkg/to-the-canary").symlink_to(tmp_path / "outside")  # removed, never followed
    make(root / "usr/share/doc/other/readme", b"kept")
    source = craft(tmp_path / carried.ARCHIVE, whiteout("etc/motd"), whiteout("usr/share/doc/pkg"),
                   whiteout("var/lib/never-there"), whiteout("var/lib/never/there"))
    os.utime(root / "etc", ns=(OLD_TIME * 10**9, OLD_TIME * 10**9))
    assert put_back(source, root) == []
    assert not os.path.lexists(root / "etc/motd") and not os.path.lexists(root / "usr/share/doc/pkg")
    assert (root / "usr/share/doc/other/readme").read_bytes() == b"kept"
    assert (tmp_path / "outside/canary").read_bytes() == b"original"
    assert os.stat(root / "etc").st_mtime_ns == OLD_TIME * 10**9, "the directory above keeps its mtime"


def test_a_deletion_and_a_new_entry_at_the_same_name_replace_a_directory_by_a_link_and_a_file_by_a_directory(
    tmp_path: Path,
) -> None:
    root = image(tmp_path)
    make(root / "mnt/vendor/lib.so", b"image")
    make(root / "srv", b"a file in the image")
    source = craft(
        tmp_path / carried.ARCHIVE,
        whiteout("mnt"), member("mnt", kind=tarfile.SYMTYPE, linkname="var/lib/app"),
        whiteout("srv"), member("srv", kind=tarfile.DIRTYPE, mode=0o750), member("srv/www/index.html", b"hi"),
        member("var/lib/app/state", b"s"),
    )
    put_back(source, root)
    assert os.readlink(root / "mnt") == "var/lib/app"
    assert stat.S_IMODE(os.lstat(root / "srv").st_mode) == 0o750
    assert (root / "srv/www/index.html").read_bytes() == b"hi"
    assert [name for name in os.listdir(root) if name.startswith(".carried-")] == []


def test_a_failure_before_the_deletions_deletes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = image(tmp_path)
    make(root / "etc/motd", b"welcome")
    source = craft(tmp_path / carried.ARCHIVE, whiteout("etc/motd"), member("var/lib/app/a.db", b"rows"))
    monkeypatch.setattr(os, "fchmod", lambda fd, mode: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    refuses(source, root, "cannot write it: No space left on device; nothing was put back")
    assert (root / "etc/motd").read_bytes() == b"welcome"


@pytest.mark.parametrize(("name", "mounts", "reason"), [
    ("proc/sys", (), "/proc/sys is under /proc, the kernel's: carried files never delete there"),
    ("run/secrets", (), "is the engine's secrets"),
    ("run", (), "deleting /run would delete /run/secrets, the engine's secrets"),
    ("etc/hosts", (), "the container engine's own file"),
    ("etc", (), "deleting /etc would delete /etc/hosts"),
    ("checkpoints", (), "the checkpoint volume"),
    ("run/criu-supervisor", (), "the supervisor's own"),
    ("opt/criu-supervisor/lib", (), "the supervisor's own"),  # the drop-in bundle: its code
    ("opt", (), "deleting /opt would delete /opt/criu-supervisor"),
    ("data", ("/", "/data"), "/data is a mount point in this container"),
    ("srv", ("/", "/srv/volume"), "/srv/volume is a mount point in this container: carried files never delete"),
    ("data/old.db", ("/", "/data"), "/data is a mount point"),
])
def test_deletions_never_touch_the_kernels_the_engines_the_volume_or_a_mount(
    tmp_path: Path, name: str, mounts: tuple[str, ...], reason: str
) -> None:
    root = image(tmp_path)
    for directory in ("proc/sys", "run/secrets", "run/criu-supervisor", "checkpoints/default", "data",
                      "srv/volume", "opt/criu-supervisor/lib"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    make(root / "data/old.db", b"on the volume")
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"), whiteout(name))
    refuses(source, root, re.escape(reason), exclude=("/checkpoints",), mounts=mounts)


def test_a_deletion_through_a_symlinked_parent_is_refused_and_the_canary_untouched(tmp_path: Path) -> None:
    root = image(tmp_path)
    (root / "var/cache").symlink_to(tmp_path / "outside")
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"), whiteout("var/cache/canary"))
    refuses(source, root, "/var/cache is a symbolic link in this container, not a directory: carried files never "
                          "delete through links")


def test_a_deletion_on_another_filesystem_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = image(tmp_path)
    make(root / "srv/app.db", b"on the volume")
    on_another_device(monkeypatch, root / "srv")
    source = craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"), whiteout("srv/app.db"))
    refuses(source, root, "/srv is on another filesystem than the container's root")


def test_a_path_deleted_twice_is_refused(tmp_path: Path) -> None:
    root = image(tmp_path)
    make(root / "etc/motd", b"welcome")
    refuses(craft(tmp_path / carried.ARCHIVE, whiteout("etc/motd"), whiteout("etc/motd")), root,
            "it is deleted twice in the archive")


@pytest.mark.parametrize("name", ["", ".", "../etc", "/etc/motd", "etc/../../x"])
def test_a_deletion_with_a_hostile_name_is_refused(tmp_path: Path, name: str) -> None:
    root = image(tmp_path)
    refuses(craft(tmp_path / carried.ARCHIVE, member("tmp/first", b"1"), whiteout(name)), root, "member")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs chroot(2)")
def test_in_the_chroot_a_deletion_of_the_root_or_beyond_it_is_refused_and_nothing_is_deleted(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make(root / "etc/motd", b"welcome")
    craft(root / carried.ARCHIVE, whiteout("etc/motd"), whiteout("../../etc"))
    report = extract_in_chroot(root, "/" + carried.ARCHIVE)
    assert report.startswith("refused"), report
    assert (root / "etc/motd").read_bytes() == b"welcome"
