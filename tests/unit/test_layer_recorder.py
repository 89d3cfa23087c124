"""carried.LayerRecorder: the writable layer, told by a walk, carried whole through archive and extract.

Each test makes an "image" (a directory tree under tmp_path), copies it where a
replacement container's root would have it, records the old container's tree,
changes it as an app would, and carries what the recorder found into the
replacement: afterwards the two trees must be equal, entry by entry (type, mode,
owner, mtime, a file's atime, content, link target, hard links, holes). A second
hop restores from the first and carries again, as a restored container does.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor_pkg import carried, compression, config, control, restore
from supervisor_pkg.checkpoint import CheckpointFlow
from supervisor_pkg.errors import ConfigError

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="owners and O_NOATIME need root, as in the container")
OLD_NS = 1_000_000_000 * 10**9


def make(path: Path, data: bytes = b"image", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def build_image(root: Path) -> None:
    """What an image holds: config, docs, an empty directory, a link, a hard-linked pair; all old."""
    make(root / "etc/motd", b"welcome\n")
    make(root / "etc/issue", b"Debian\n")
    make(root / "etc/app/app.conf", b"workers=2\n", 0o640)
    make(root / "usr/share/doc/pkg/deep/readme", b"doc\n")
    make(root / "usr/share/doc/other/readme", b"other\n")
    make(root / "usr/bin/tool", b"#!/bin/sh\n", 0o755)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-alias")
    (root / "usr/bin/tool-link").symlink_to("tool")
    (root / "opt/vendor").mkdir(parents=True)
    (root / "var/lib").mkdir(parents=True)
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)
    for directory, subdirs, files in os.walk(root, topdown=False):
        for name in [*files, *subdirs]:
            os.utime(os.path.join(directory, name), ns=(OLD_NS, OLD_NS), follow_symlinks=False)
        os.utime(directory, ns=(OLD_NS, OLD_NS))


def replacement_of(tmp_path: Path, old: Path, name: str) -> Path:
    """A replacement container's root, holding the image where the old container had it (archives name
    the old container's absolute paths)."""
    root = tmp_path / name
    image = root / str(old).lstrip("/")
    image.parent.mkdir(parents=True)
    build_image(image)
    return root


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry beneath `root`, relative to it: what the app could see of it."""
    state: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, list[str]] = {}
    for directory, subdirs, files in os.walk(root):
        for path in [*(os.path.join(directory, name) for name in [*subdirs, *files])]:
            info = os.lstat(path)
            name = os.path.relpath(path, root)
            inodes.setdefault(info.st_ino, []).append(name)
            detail: object = None
            times: tuple[int, ...] = (info.st_mtime_ns,)
            if stat.S_ISLNK(info.st_mode):
                detail = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NOATIME)  # reading must not move the atime compared
                with os.fdopen(fd, "rb") as handle:
                    detail = (handle.read(), info.st_size, info.st_blocks)
                times = (info.st_mtime_ns, info.st_atime_ns)
            state[name] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid,
                           info.st_nlink, times, detail, info.st_ino)
    # Inode numbers differ between the trees: compare which names share one instead.
    return {name: (*entry[:-1], tuple(sorted(inodes[entry[-1]]))) for name, entry in state.items()}  # type: ignore[index]


def differences(old: Path, new: Path) -> list[str]:
    a, b = snapshot(old), snapshot(new)
    return [f"{name}: {a.get(name)} != {b.get(name)}" for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]


def record(root: Path, previous: str | None = None, exclude: tuple[str, ...] = (),
           mounts: Callable[[], set[str]] = set) -> carried.LayerRecorder:
    recorder = carried.LayerRecorder(exclude=exclude, previous=previous, root=str(root), mounts=mounts).start()
    assert recorder.ready(timeout=30)
    return recorder


def carry(recorder: carried.LayerRecorder, since: float, destination: Path, into: Path) -> carried.LayerChanges:
    """Dump (walk and archive), then put it back in the replacement rooted at `into`."""
    changes = recorder.changes(since)
    assert changes is not None
    carried.archive(changes.paths, [], str(destination), deleted=changes.deleted)
    carried.extract(str(destination), root=str(into), mounts=set())
    return changes


def started() -> float:
    """The container's start: every change after this is the app's."""
    now = time.time()
    time.sleep(0.02)
    return now


def app_changes(old: Path) -> None:
    """Created, changed, deleted and renamed files; modes, owners, links, holes, a FIFO, a type change."""
    make(old / "var/lib/app/db/table.ibd", b"rows" * 1000, 0o660)
    (old / "var/lib/app/db/empty").mkdir(mode=0o700)
    os.chmod(old / "var/lib/app/db/empty", 0o700)
    os.chown(old / "var/lib/app/db", 999, 998)
    os.chown(old / "var/lib/app/db/table.ibd", 999, 998)
    os.link(old / "var/lib/app/db/table.ibd", old / "var/lib/app/table.hardlink")
    (old / "var/lib/app/current").symlink_to("db/table.ibd")
    (old / "var/lib/app/python").symlink_to("/usr/bin/python3")  # into the image
    (old / "var/lib/app/nowhere").symlink_to("/does/not/exist")
    os.mkfifo(old / "var/lib/app/control", 0o620)
    with open(old / "var/lib/app/sparse.img", "wb") as handle:
        handle.seek(1 << 20)
        handle.write(b"data")
        handle.truncate(16 << 20)
    (old / "etc/issue").write_bytes(b"changed by the app\n")  # an image file, changed in place
    os.chmod(old / "etc/app/app.conf", 0o600)  # only its mode
    os.chown(old / "usr/share/doc/other/readme", 4242, 4243)  # only its owner
    os.utime(old / "usr/bin/tool", ns=(1_234_000_000_000_000_001, 1_234_000_000_000_000_002))  # only times
    os.unlink(old / "etc/motd")
    shutil.rmtree(old / "usr/share/doc/pkg")
    os.rename(old / "usr/bin/tool-link", old / "usr/bin/tool-link-renamed")
    os.rename(old / "var/lib/app/db/empty", old / "var/lib/app/db/renamed-empty")
    shutil.rmtree(old / "opt")
    (old / "opt").symlink_to("var/lib/app")  # a directory of the image is a link now
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(old / "var/lib/app/app.sock"))  # CRIU binds the app's sockets again: not carried
    server.close()


@AS_ROOT
def test_the_writable_layer_comes_back_equal_entry_by_entry(tmp_path: Path) -> None:
    old = tmp_path / "old"
    build_image(old)
    new = replacement_of(tmp_path, old, "replacement")
    since = started()
    recorder = record(old)

    app_changes(old)
    os.unlink(old / "var/lib/app/app.sock")
    changes = carry(recorder, since, tmp_path / carried.ARCHIVE, new)

    assert differences(old, new / str(old).lstrip("/")) == []
    assert {os.path.relpath(path, old) for path in changes.deleted} == {
        "etc/motd", "usr/share/doc/pkg", "usr/bin/tool-link", "opt"}, "the app's own renamed directory is no deletion"
    assert not any(path.startswith(str(old / "usr/share/doc/pkg") + "/") for path in changes.deleted), "compacted"


ON_THE_ROOT_FS = pytest.mark.skipif(
    os.geteuid() != 0 or os.stat("/tmp").st_dev != os.stat("/").st_dev,
    reason="the hops put their layer back at the real / (the same paths in every container): needs root and a "
           "/tmp on the root filesystem",
)


@ON_THE_ROOT_FS
def test_two_hops_carry_what_the_first_container_did_and_the_second(tmp_path: Path) -> None:
    # Three containers of one image at the same path, as under an engine: each hop puts the previous
    # archive back at "/", then the app (here, the test) changes more.
    container = tmp_path / "container"
    build_image(container)
    since = started()
    recorder = record(container)
    app_changes(container)
    os.unlink(container / "var/lib/app/app.sock")
    first = recorder.changes(since)
    assert first is not None
    carried.archive(first.paths, [], str(tmp_path / "first.tar"), deleted=first.deleted, root=str(container))
    os.rename(container, tmp_path / "first-container")

    build_image(container)  # the second container, from the image
    since = started()  # its supervisor starts, then restores
    carried.extract(str(tmp_path / "first.tar"), mounts=set())
    assert differences(tmp_path / "first-container", container) == []
    # Deleted after the restore but before the recorder saw it: only the first archive's list tells it was
    # a changed file of the image, whose copy the next replacement would otherwise show again.
    os.unlink(container / "etc/issue")
    recorder = record(container, previous=str(tmp_path / "first.tar"))
    make(container / "var/lib/app/second.log", b"hop 2\n")
    os.unlink(container / "var/lib/app/db/table.ibd")  # made by the first container, deleted by the second
    os.rename(container / "var/lib/app/current", container / "var/lib/app/current-renamed")
    os.unlink(container / "usr/share/doc/other/readme")  # an image file, deleted in the second container
    second = recorder.changes(since)
    assert second is not None
    carried.archive(second.paths, [], str(tmp_path / "second.tar"), deleted=second.deleted, root=str(container))
    os.rename(container, tmp_path / "second-container")

    build_image(container)  # the third container
    carried.extract(str(tmp_path / "second.tar"), mounts=set())
    assert differences(tmp_path / "second-container", container) == []
    assert not (container / "etc/motd").exists(), "the first container's deletion still holds"
    # Deletions of the image's paths only: what the first container made and the second deleted (the table,
    # the renamed link) is in no fresh container, and needs no deletion.
    assert {os.path.relpath(path, container) for path in second.deleted} == {
        "etc/motd", "usr/share/doc/pkg", "usr/bin/tool-link", "opt", "etc/issue", "usr/share/doc/other/readme"}


@ON_THE_ROOT_FS
def test_deletions_of_what_the_chain_made_do_not_pile_up_from_hop_to_hop(tmp_path: Path) -> None:
    # Redis rewrites its append-only files under new names: each hop deletes the files the previous one
    # carried. Those deletions are needed nowhere (a fresh container never has those files).
    container = tmp_path / "container"
    build_image(container)
    since = started()
    recorder = record(container)
    make(container / "data/appendonlydir/appendonly.aof.1.base.rdb", b"base 1")
    os.unlink(container / "etc/motd")
    changes = recorder.changes(since)
    assert changes is not None
    archive = tmp_path / "hop.tar"
    carried.archive(changes.paths, [], str(archive), deleted=changes.deleted, root=str(container))
    for hop in range(2, 5):
        shutil.rmtree(container)
        build_image(container)
        since = started()
        carried.extract(str(archive), mounts=set())
        recorder = record(container, previous=str(archive))
        make(container / f"data/appendonlydir/appendonly.aof.{hop}.base.rdb", f"base {hop}".encode())
        os.unlink(container / f"data/appendonlydir/appendonly.aof.{hop - 1}.base.rdb")
        changes = recorder.changes(since)
        assert changes is not None
        assert changes.deleted == [str(container / "etc/motd")], f"hop {hop}: {changes.deleted}"
        archive = tmp_path / f"hop{hop}.tar"
        carried.archive(changes.paths, [], str(archive), deleted=changes.deleted, root=str(container))
    assert sorted(os.listdir(container / "data/appendonlydir")) == ["appendonly.aof.4.base.rdb"]


def test_changes_before_the_baseline_walk_are_carried_by_their_ctime(tmp_path: Path) -> None:
    old = tmp_path / "old"
    build_image(old)
    since = started()
    make(old / "var/lib/app/early.db", b"made before the recorder")  # the app runs before the walk ends
    (old / "etc/issue").write_bytes(b"changed early\n")
    recorder = record(old)  # sees both as they are now: only their ctime says they are the app's
    changes = recorder.changes(since)
    assert changes is not None
    assert {str(old / "var/lib/app/early.db"), str(old / "etc/issue")} <= set(changes.paths)
    assert str(old / "etc/motd") not in changes.paths


def test_a_change_after_the_walk_before_the_dump_is_seen_by_the_walk_while_frozen(tmp_path: Path) -> None:
    old = tmp_path / "old"
    build_image(old)
    since = started()
    recorder = record(old)
    recorder.prepare(since)  # the app still runs after this walk
    os.chmod(old / "etc/issue", 0o600)
    os.unlink(old / "etc/motd")
    changes = recorder.changes(since)
    assert changes is not None
    assert str(old / "etc/issue") in changes.paths and changes.deleted == [str(old / "etc/motd")]


def test_excluded_paths_are_neither_carried_nor_deleted(tmp_path: Path) -> None:
    old = tmp_path / "old"
    build_image(old)
    make(old / "var/cache/app/blob", b"image's cache")
    since = started()
    recorder = record(old, exclude=(str(old / "var/cache/app") + "/", str(old / "usr/share/doc/pkg")))
    make(old / "var/cache/app/new-blob", b"rebuilt")
    shutil.rmtree(old / "var/cache")  # holds an excluded path: its other entries go, the excluded one stays
    shutil.rmtree(old / "usr/share/doc")
    changes = recorder.changes(since)
    assert changes is not None
    assert not [path for path in changes.paths if "/var/cache" in path]
    assert changes.deleted == [str(old / "usr/share/doc/other")], changes.deleted


def test_mount_points_are_not_walked_carried_or_deleted(tmp_path: Path) -> None:
    old = tmp_path / "old"
    build_image(old)
    volume = old / "var/lib/data"
    make(volume / "image-file", b"under the mount point")
    mounts = {str(volume)}
    since = started()
    recorder = record(old, mounts=lambda: mounts)
    make(volume / "written-on-the-volume", b"not the writable layer")
    os.unlink(volume / "image-file")
    changes = recorder.changes(since)
    assert changes is not None
    assert not [path for path in [*changes.paths, *changes.deleted] if path.startswith(str(volume))]

    # A volume mounted over a directory after the baseline: what the image had there is not "deleted".
    make(old / "srv/www/index.html", b"image")
    since = started()
    recorder = record(old, mounts=lambda: mounts)
    mounts.add(str(old / "srv"))
    changes = recorder.changes(since)
    assert changes is not None and not [path for path in changes.deleted if "/srv" in path]


def test_an_unchanged_tree_carries_nothing(tmp_path: Path) -> None:
    old = tmp_path / "old"
    build_image(old)
    since = started()
    changes = record(old).changes(since)
    assert changes is not None and (changes.paths, changes.deleted) == ([], [])
    assert changes.walked == len(snapshot(old))


def test_without_a_baseline_there_are_no_changes_and_the_caller_falls_back(tmp_path: Path) -> None:
    recorder = carried.LayerRecorder(root=str(tmp_path / "missing"), mounts=set).start()
    assert not recorder.ready(timeout=30)
    assert recorder.changes(time.time()) is None


def test_before_the_baseline_walk_ends_a_checkpoint_carries_by_ctime_and_does_not_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = tmp_path / "old"
    build_image(old)
    monkeypatch.setattr(carried, "_BASELINE_WAIT", 0.01)
    since = started()
    recorder = carried.LayerRecorder(root=str(old), mounts=set)  # its walk has not ended (not even started)
    make(old / "var/lib/app/early.db", b"rows")
    os.chmod(old / "etc/issue", 0o600)
    os.unlink(old / "etc/motd")
    recorder.prepare(since)
    changes = recorder.changes(since)
    assert changes is not None
    assert set(changes.paths) == {str(old / "var/lib/app"), str(old / "var/lib/app/early.db"), str(old / "var/lib"),
                                  str(old / "etc/issue"), str(old / "etc")}
    assert changes.deleted == [], "a deletion needs the baseline"


def test_a_previous_archive_that_cannot_be_read_still_leaves_a_baseline(tmp_path: Path) -> None:
    old = tmp_path / "old"
    build_image(old)
    (tmp_path / "broken.tar").write_bytes(b"not a tar")
    recorder = record(old, previous=str(tmp_path / "broken.tar"))
    assert recorder.previous == carried.Layer()
    assert recorder.changes(time.time()) is not None


def test_read_layer_lists_what_an_archive_carried_and_deleted(tmp_path: Path) -> None:
    make(tmp_path / "a/b.db", b"rows")
    carried.archive([str(tmp_path / "a/b.db")], [], str(tmp_path / carried.ARCHIVE), deleted=["/etc/motd"])
    layer = carried.read_layer(str(tmp_path / carried.ARCHIVE))
    assert layer.deleted == frozenset({"/etc/motd"})
    assert str(tmp_path / "a/b.db") in layer.entries and str(tmp_path / "a") in layer.entries


def test_the_supervisors_own_files_are_never_carried() -> None:
    never = set(carried._SUPERVISOR_FILES)
    assert {compression.LOCAL_ROOT, restore.LAZY_WORK_ROOT, control.DEFAULT_SOCKET} <= never


@pytest.mark.parametrize(("pid", "parent", "records"), [(1, 0, True), (7, 1, True), (4242, 4241, False)])
def test_only_the_containers_init_records_the_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pid: int, parent: int, records: bool
) -> None:
    # PID 1, or the child of an --init at PID 1. Elsewhere (unit tests run on a host) "/" is not a
    # container's filesystem, and walking it could take minutes.
    started: list[carried.LayerRecorder] = []
    monkeypatch.setattr(os, "getpid", lambda: pid)
    monkeypatch.setattr(os, "getppid", lambda: parent)
    monkeypatch.setattr(carried.LayerRecorder, "start", lambda self: started.append(self) or self)
    flow = CheckpointFlow(config.load({"CKPT_DIR": str(tmp_path)}), store=None, metrics_=None)  # type: ignore[arg-type]
    flow.record_layer(None)
    assert (flow.layer is not None, len(started)) == (records, int(records))
    if records:
        assert flow.layer is not None and flow.layer.root == "/" and str(tmp_path) in flow.layer.exclude


# --- CKPT_CARRY_EXCLUDE ------------------------------------------------------------------------------------------
def test_carry_exclude_is_empty_by_default_and_split_on_colons() -> None:
    assert config.load({}).carry_exclude == ()
    loaded = config.load({"CKPT_CARRY_EXCLUDE": "/var/cache/app/::/home/app/.cache:"})
    assert loaded.carry_exclude == ("/var/cache/app", "/home/app/.cache")
    assert config.load({}, {"carry_exclude": "/srv/tmp"}).carry_exclude == ("/srv/tmp",)


@pytest.mark.parametrize(("raw", "reason"), [
    ("var/cache", "expected absolute paths separated by ':'"),
    ("/var/../etc", "expected absolute paths"),
    ("/var/./cache", "without '.' or '..'"),
    ("/var/ca\nche", "printable characters only"),
    ("/", "/ cannot be excluded"),
    ("/tmp:/", "/ cannot be excluded"),
])
def test_carry_exclude_is_parsed_strictly(raw: str, reason: str) -> None:
    with pytest.raises(ConfigError, match="CKPT_CARRY_EXCLUDE=.* is not valid: .*" + reason.replace(".", r"\.")):
        config.load({"CKPT_CARRY_EXCLUDE": raw})


def test_the_checkpoint_flow_never_carries_the_volume_the_control_socket_or_the_excluded(tmp_path: Path) -> None:
    loaded = config.load({"CKPT_DIR": str(tmp_path), "CKPT_CARRY_EXCLUDE": "/var/cache/app"})
    flow = CheckpointFlow(dataclasses.replace(loaded), store=None, metrics_=None)  # type: ignore[arg-type]
    assert flow._never_carried() == [str(tmp_path), "/run/criu-supervisor.sock", "/var/cache/app"]


@ON_THE_ROOT_FS
def test_extract_remembers_which_paths_the_image_had_and_which_deletions_it_did(tmp_path: Path) -> None:
    container = tmp_path / "container"
    build_image(container)
    archive = tmp_path / carried.ARCHIVE
    with_image = container / "etc/issue"
    new = make(tmp_path / "elsewhere/new.db", b"rows")
    carried.archive([str(with_image), str(new)], [], str(archive), root=str(tmp_path),
                    deleted=[str(container / "etc/motd"), str(container / "never/there")])
    os.rename(new, tmp_path / "new.db")  # the replacement does not have it

    carried.extract(str(archive), mounts=set())

    layer = carried.put_back_layer(str(archive))
    assert layer is not None and layer.image is not None
    assert str(with_image) in layer.image and str(new) not in layer.image
    assert layer.deleted == frozenset({str(container / "etc/motd")}), "a deletion that found nothing is forgotten"
    assert carried.read_layer(str(archive)).image is None, "an archive only read cannot tell"
