"""Files the app depends on outside the volume, carried inside the checkpoint.

CRIU restores memory and re-opens files by path; it does not copy the
container's filesystem. A file the app created in the container's writable
layer (/tmp, /var/lib/app) does not exist in the replacement, so the restore
fails or the app runs on a missing file. Like Podman's rootfs-diff, we pack
such files into `carried-files.tar` in the generation and unpack them before
the restore.

What is carried:
- every regular file CRIU recorded as open or mapped that lives on the
  container's root filesystem (not a volume, not a Docker bind mount such as
  /etc/hosts) and that was opened for writing or changed since the container
  started: i.e. not an untouched file of the image;
- files carried by the generation this app was restored from (their mtimes
  predate this container, but they are still not part of the image);
- everything under CKPT_STATE_PATHS.
Deleted-but-open files are not here: CRIU saves their contents itself (ghost
files, up to criu.GHOST_LIMIT).
"""

from __future__ import annotations

import dataclasses
import os
import stat
import tarfile
from collections.abc import Callable, Iterable

ARCHIVE = "carried-files.tar"
_NEVER = ("/proc", "/sys", "/dev", "/run/secrets")


@dataclasses.dataclass(frozen=True)
class OpenFile:
    path: str
    writable: bool


def mount_points() -> set[str]:
    points = set()
    try:
        with open("/proc/self/mountinfo") as handle:
            for line in handle:
                points.add(line.split()[4].encode().decode("unicode_escape"))
    except OSError:
        pass
    return points


def select(
    open_files: Iterable[OpenFile],
    state_paths: Iterable[str],
    previously_carried: Iterable[str],
    exclude: Iterable[str],
    since: float,
) -> list[str]:
    """The sorted, de-duplicated list of files to carry."""
    root_device = os.stat("/").st_dev
    mounts = mount_points()
    excluded = tuple(p.rstrip("/") + "/" for p in (*exclude, *_NEVER))
    chosen: set[str] = set()

    def eligible(path: str) -> os.stat_result | None:
        if not path.startswith("/") or (path.rstrip("/") + "/").startswith(excluded) or path in mounts:
            return None
        try:
            info = os.lstat(path)
        except OSError:
            return None  # deleted since: CRIU keeps it as a ghost file
        if not stat.S_ISREG(info.st_mode) or info.st_dev != root_device:
            return None
        return info

    for item in open_files:
        info = eligible(item.path)
        if info is not None and (item.writable or max(info.st_mtime, info.st_ctime) >= since):
            chosen.add(item.path)
    for path in previously_carried:
        if eligible(path) is not None:
            chosen.add(path)
    for root in state_paths:
        if os.path.isfile(root) and not os.path.islink(root):
            chosen.add(root)
        for directory, _subdirs, files in os.walk(root):
            for name in files:
                path = os.path.join(directory, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    chosen.add(path)
    return sorted(chosen)


def archive(paths: list[str], state_paths: Iterable[str], destination: str) -> None:
    """Write `paths` (and the directories of state_paths, for their modes) into a tar."""
    with tarfile.open(destination, "w", format=tarfile.PAX_FORMAT) as tar:
        for root in state_paths:
            if os.path.isdir(root):
                tar.add(root, arcname=root.lstrip("/"), recursive=False)
        for path in paths:
            tar.add(path, arcname=path.lstrip("/"), recursive=False)


def members(source: str) -> list[str]:
    with tarfile.open(source) as tar:
        return ["/" + member.name for member in tar.getmembers() if member.isfile()]


def _safe_member_filter(exclude: Iterable[str]) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo]:
    """Only plain files and directories at relative paths outside /proc, /sys, /dev and `exclude`.

    Extracting at "/", tarfile's own 'tar' filter refuses nothing: '..' cannot
    leave "/" and a leading "/" is silently stripped. So names are checked here,
    before anything is written, even though the archive's hash (and signature,
    with a key) was verified already.
    """
    forbidden = tuple(prefix.rstrip("/") + "/" for prefix in (*_NEVER, *exclude))

    def check(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo:
        name = member.name
        if not name or name.startswith("/") or ".." in name.split("/") or not (member.isfile() or member.isdir()):
            raise tarfile.FilterError(f"refusing carried entry {name!r}: only plain files at relative paths")
        if ("/" + name.rstrip("/") + "/").startswith(forbidden):
            raise tarfile.FilterError(f"refusing carried entry {name!r}: that location is never written")
        return tarfile.tar_filter(member, destination)  # also clears setuid/setgid bits

    return check


def extract(source: str, exclude: Iterable[str] = ()) -> list[str]:
    """Put the carried files back at their paths. Returns the files restored."""
    check = _safe_member_filter(exclude)
    with tarfile.open(source) as tar:
        members = tar.getmembers()
        for member in members:  # refuse the whole archive before writing anything
            check(member, "/")
        tar.extractall("/", members=members, filter=check)
        return ["/" + member.name for member in members if member.isfile()]
