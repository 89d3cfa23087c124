"""What the app is, so that its checkpoint is restored only into the same app.

A checkpoint is the memory of one build of an app: its code, the libraries it
had mapped, the interpreter it ran in. Restored under another build (after a
deploy, or onto a newer image), CRIU maps the *new* files into the *old*
memory: it refuses when a size differs ("has bad size"), and when sizes match
the app runs old data structures against new code. So a generation records,
and a restore compares before CRIU runs:

- the command (CMD) the app was started with;
- CKPT_APP_VERSION, when the deployment sets it;
- a fingerprint (size, mtime, sha256) of every executable file the app's
  processes had mapped (the interpreter, libc, shared objects, tini), and of
  every file named in the command (`python3 /app/kv.py`: kv.py), as long as it
  lives in the image: on the container's root filesystem, not a volume, not
  created or changed by the app since the container started (those travel in
  the checkpoint as carried files).

What it cannot see: files the app read and closed, or imported after its start
(a Python module, a config file), unless they are named in the command. Set
CKPT_APP_VERSION from the image tag or digest to cover those.

Same-image replacements cost nothing: a file whose size and mtime match is
taken as unchanged (an image's files have the same mtimes wherever it runs);
only a file whose mtime differs is hashed, so that a rebuilt image with
byte-identical files still restores.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# A file is hashed once per (device, inode, size, mtime) in this process: the
# second and later checkpoints of a run pay nothing.
_HASHES: dict[tuple[int, int, int, int], str] = {}


def _sha256(path: str, info: os.stat_result) -> str:
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def mapped_executables(pids: Iterable[int]) -> set[str]:
    """Paths of the executable files mapped by these processes (from /proc/PID/maps)."""
    paths: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as handle:
            for line in handle:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and "x" in fields[1] and fields[5].startswith("/"):
                    paths.add(fields[5].rstrip("\n"))
    return {path for path in paths if not path.endswith(" (deleted)")}


def command_files(command: Sequence[str]) -> set[str]:
    """The command's program (resolved as execvp would) and any argument naming an existing file."""
    found = set()
    program = command[0] if "/" in command[0] else shutil.which(command[0])
    for candidate in [program, *command[1:]]:
        if candidate and candidate.startswith("/") and os.path.isfile(candidate):
            found.add(os.path.realpath(candidate))
    return found


def _from_the_image(path: str, info: os.stat_result, root_device: int, since: float, exclude: tuple[str, ...]) -> bool:
    return (stat.S_ISREG(info.st_mode) and info.st_dev == root_device and not path.startswith(exclude)
            and max(info.st_mtime, info.st_ctime) < since)


def record(pids: Iterable[int], command: Sequence[str], exclude: Iterable[str], since: float) -> dict[str, Any]:
    """The fingerprints of the app's files: {path: {size, mtime_ns, sha256}}.

    `since`: when this container started (files changed after it are the app's
    state, carried, not its build); `exclude`: path prefixes (the volume).
    """
    prefixes = tuple(prefix.rstrip("/") + "/" for prefix in exclude)
    root_device = os.stat("/").st_dev
    files: dict[str, Any] = {}
    for path in sorted(mapped_executables(pids) | command_files(command)):
        try:
            info = os.stat(path)
            if _from_the_image(path, info, root_device, since, prefixes):
                files[path] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": _sha256(path, info)}
        except OSError:
            continue  # gone meanwhile: nothing to compare later
    return files


def differences(
    recorded: Mapping[str, Any], command: Sequence[str], recorded_command: Any, version: str | None,
    recorded_version: Any, image: str | None = None, recorded_image: Any = None,
) -> list[str]:
    """How this container's app differs from the one a checkpoint was made of ([] if it is the same).

    Checkpoints made before fingerprints were recorded (no command recorded)
    are taken as the same app. `image`: what the deployment says of the image
    (CKPT_IMAGE_ID, e.g. its digest), compared only when both sides know it.
    """
    changes = []
    if image and isinstance(recorded_image, str) and recorded_image and recorded_image != image:
        changes.append(f"the image was {_short(recorded_image)}, it is {_short(image)} here (CKPT_IMAGE_ID)")
    if isinstance(recorded_command, list) and list(recorded_command) != list(command):
        changes.append(_command_change(list(recorded_command), list(command)))
    if (recorded_version or None) != (version or None):
        changes.append(f"CKPT_APP_VERSION was {recorded_version or 'unset'}, it is {version or 'unset'} here")
    changed_files = []
    for path, expected in sorted(recorded.items()):
        if not isinstance(expected, dict):
            changed_files.append(path)
            continue
        try:
            info = os.stat(path)
        except OSError:
            changed_files.append(f"{path} (missing)")
            continue
        if info.st_size != expected.get("size"):
            changed_files.append(path)
        elif info.st_mtime_ns != expected.get("mtime_ns"):
            try:
                if _sha256(path, info) != expected.get("sha256"):
                    changed_files.append(path)
            except OSError:
                changed_files.append(f"{path} (unreadable)")
    if changed_files:
        shown = ", ".join(changed_files[:3]) + (f" and {len(changed_files) - 3} more" if len(changed_files) > 3 else "")
        changes.append(f"its files differ: {shown}")
    return changes


def _command_change(recorded: list[Any], command: list[str]) -> str:
    """'the command was X, it is Y here', or for long commands the first argument that differs."""
    whole_recorded, whole = " ".join(map(str, recorded)), " ".join(command)
    if len(whole_recorded) <= 80 and len(whole) <= 80:
        return f"the command was {whole_recorded!r}, it is {whole!r} here"
    pairs = zip(recorded, command, strict=False)  # (lengths may differ: the first difference, or the shorter's end)
    index = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(recorded), len(command)))
    was = _short(recorded[index]) if index < len(recorded) else "(nothing)"
    now = _short(command[index]) if index < len(command) else "(nothing)"
    return f"argument {index} of the command was {was}, it is {now} here"


def _short(argument: Any) -> str:
    text = str(argument)
    if len(text) <= 60:
        return repr(text)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{text[:40]!r}... ({len(text)} characters, sha256 {digest})"
