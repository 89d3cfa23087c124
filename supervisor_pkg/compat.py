"""Can this container restore that checkpoint? Asked before CRIU runs.

Each check compares what a verified checkpoint needs (its manifest, its CRIU
images) with what this container has, and returns the reason it cannot,
naming the fix, or nothing. A reason found here is never the checkpoint's
fault: the generation is kept for a replacement that can restore it (see
CKPT_CANNOT_RESTORE), and its claim is not touched.

Found here, rather than by CRIU half-way through a restore:
- capabilities: the app's processes held capabilities this container lacks
  (Podman's default set has no NET_RAW, MKNOD, AUDIT_WRITE; `--cap-drop`). CRIU
  cannot give them back, and its restorer can hang on the failure;
- a seccomp filter on the supervisor: a restore might work, but no checkpoint
  of the app could ever be taken here again, so its state would be lost at the
  next stop;
- a terminal: a checkpoint made on one (docker run -t) restores only onto one;
- the CPU: one without an instruction-set feature the app's CPU had (or its
  CKPT_CPU_BASELINE's share of them) would crash the app with SIGILL (cpu.py).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Callable, Mapping
from typing import Any

from supervisor_pkg import cpu, engine

# <linux/capability.h>, in bit order.
CAPABILITY_NAMES = dict(enumerate((
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
)))


@dataclasses.dataclass(frozen=True)
class Incompatibility:
    cause: str
    fix: str

    def __str__(self) -> str:
        return f"{self.cause}; {self.fix}"


def parse_status(text: str) -> dict[str, str]:
    """/proc/PID/status as a mapping: {'CapEff': '00000000aa2c35fb', 'Seccomp': '0', ...}."""
    fields = {}
    for line in text.splitlines():
        key, separator, value = line.partition(":")
        if separator:
            fields[key.strip()] = value.strip()
    return fields


def _status_field(status_text: str, key: str) -> str:
    return parse_status(status_text).get(key, "")


def _capability_bits(words: Any) -> int:
    """CRIU stores a capability set as 32-bit words, lowest first."""
    if not isinstance(words, list):
        return 0
    value = 0
    for index, word in enumerate(words):
        if isinstance(word, int) and not isinstance(word, bool):
            value |= (word & 0xFFFFFFFF) << (32 * index)
    return value


def _names(bits: int) -> list[str]:
    return [CAPABILITY_NAMES.get(bit, f"capability {bit}") for bit in range(64) if bits >> bit & 1]


def dumped_capabilities(core_entries: list[dict[str, Any]]) -> int:
    """Every capability any dumped thread held (permitted, effective, inheritable, ambient)."""
    held = 0
    for entry in core_entries:
        creds = ((entry or {}).get("thread_core") or {}).get("creds") or {}
        for key in ("cap_prm", "cap_eff", "cap_inh", "cap_amb"):
            held |= _capability_bits(creds.get(key))
    return held


def check_capabilities(held: int, status_text: str) -> Incompatibility | None:
    """The app's capabilities against the ones this supervisor (and so CRIU) may hand out."""
    try:
        ours = int(_status_field(status_text, "CapPrm") or "0", 16)
    except ValueError:
        return None
    missing = held & ~ours
    if not missing:
        return None
    names = _names(missing)
    return Incompatibility(
        f"the app held {', '.join('CAP_' + name for name in names)}, which this container lacks (another engine's "
        "default capability set, or --cap-drop)",
        "add " + " ".join(f"--cap-add {name}" for name in names) + " (compose: cap_add; Kubernetes: "
        "securityContext.capabilities.add)",
    )


SECCOMP_CAUSE = ("the supervisor runs under a seccomp filter, so no checkpoint of the app can be taken here "
                 "(CRIU cannot suspend the app's filters while itself filtered: 'suspending seccomp failed')")


def check_seccomp(status_text: str, running: engine.Engine | None = None) -> Incompatibility | None:
    """A seccomp filter on us; the fix is spelled for the engine that runs this container."""
    mode = _status_field(status_text, "Seccomp")
    if mode in ("", "0"):
        return None
    return Incompatibility(SECCOMP_CAUSE, "run it without one: " + engine.seccomp_fix(running or engine.current()))


def check_terminal(stdio: Any, isatty: Callable[[int], bool] = os.isatty) -> Incompatibility | None:
    for fd_text, target in (stdio if isinstance(stdio, Mapping) else {}).items():
        if not (isinstance(fd_text, str) and fd_text.isdigit() and isinstance(target, str)):
            continue
        if target.startswith("tty[") and not isatty(int(fd_text)):
            return Incompatibility("it was made on a terminal (docker run -t / tty: true) and this container has "
                                   f"none on fd {fd_text}", "start the replacement with -t too")
    return None


def check_cpu(recorded: Any, here: Mapping[str, Any]) -> Incompatibility | None:
    """The checkpoint's CPU record against this CPU (cpu.record())."""
    lacking = cpu.missing(recorded, here)
    if not lacking:
        return None
    assert isinstance(recorded, Mapping)
    return Incompatibility(
        f"this CPU, {cpu.describe(here)}, lacks {', '.join(lacking)}, which the app's CPU, {cpu.describe(recorded)}, "
        "had and the app may use (it would die of SIGILL)",
        "restore it on an instance type with those features; for a fleet of mixed CPUs start the app with "
        "CKPT_CPU_BASELINE set to the lowest level among them (x86-64-v2, -v3 or -v4)",
    )


def load_core_entries(images_dir: str) -> list[dict[str, Any]]:
    """The first entry of every core-*.img (one per dumped thread), decoded by pycriu."""
    from supervisor_pkg import criu

    return criu.core_entries(sorted(glob.glob(os.path.join(glob.escape(images_dir), "core-*.img"))))


def own_status() -> str:
    """This process's /proc/self/status: its capability sets and seccomp mode."""
    with open("/proc/self/status") as handle:
        return handle.read()


def problems(
    images_dir: str, manifest: Mapping[str, Any], status_text: str | None = None,
    this_cpu: Mapping[str, Any] | None = None,
) -> list[Incompatibility]:
    """Every reason this container cannot restore the verified checkpoint in `images_dir`."""
    status_text = own_status() if status_text is None else status_text
    app = manifest.get("app")
    found = [
        check_seccomp(status_text),
        check_terminal(app.get("stdio") if isinstance(app, Mapping) else None),
        check_cpu(manifest.get("cpu"), cpu.record() if this_cpu is None else this_cpu),
        check_capabilities(dumped_capabilities(load_core_entries(images_dir)), status_text),
    ]
    return [problem for problem in found if problem is not None]
