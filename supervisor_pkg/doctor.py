"""`criu-supervisor doctor`: can a checkpoint work in this container, and if not, what to change.

Every check is a small function from plain inputs (the text of a /proc file, a
command's exit status and output) to Findings, so that unit tests feed it fake
/proc contents. `Host` is the one place that touches the real system; its
fields are the small parameters a test replaces. `run_checks` wires the two.

A Finding is OK, WARN (a checkpoint works, but something is lost or risky) or
FAIL (a checkpoint or its restore cannot work). Every WARN and FAIL carries the
exact change for `docker run`, docker-compose and Kubernetes. `exit_code` is
non-zero when anything FAILs. Each finding is explained in
docs/troubleshooting.md.

Run doctor with the app's own settings: best inside the app's container
(`docker exec C criu-supervisor doctor`), else as a throwaway container with
the same flags, volume and memory limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import importlib.util
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from supervisor_pkg.compat import parse_status
from supervisor_pkg.criu import criu_command, version_tuple
from supervisor_pkg.volume import free_bytes

TROUBLESHOOTING = "docs/troubleshooting.md"


class Status(enum.StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclasses.dataclass(frozen=True)
class Fix:
    """The same change, spelled for each way of running the container."""

    docker_run: str
    compose: str
    kubernetes: str


@dataclasses.dataclass(frozen=True)
class Finding:
    name: str
    status: Status
    detail: str
    fix: Fix | None = None

    def __post_init__(self) -> None:
        if self.status is not Status.OK and self.fix is None:
            raise ValueError(f"{self.name}: a {self.status.value} finding must say how to fix it")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail,
                "fix": dataclasses.asdict(self.fix) if self.fix else None}


def _ok(name: str, detail: str) -> Finding:
    return Finding(name, Status.OK, detail)


# --- fixes ------------------------------------------------------------------------------------------
def capability_fix(capability: str) -> Fix:
    return Fix(
        docker_run=f"--cap-add {capability}",
        compose=f"cap_add: [{capability}]",
        kubernetes=f"securityContext: {{capabilities: {{add: [{capability}]}}}}",
    )


RUN_AS_ROOT = Fix(
    docker_run="run the supervisor as root: drop --user (and USER in the image); the app may drop root itself",
    compose="remove `user:`; the app may drop root itself",
    kubernetes="securityContext: {runAsUser: 0, allowPrivilegeEscalation: true} on the container",
)
SECCOMP_UNCONFINED = Fix(
    docker_run="--security-opt seccomp=unconfined",
    compose="security_opt: [seccomp=unconfined]",
    kubernetes="securityContext: {seccompProfile: {type: Unconfined}}",
)
APPARMOR_UNCONFINED = Fix(
    docker_run="--security-opt apparmor=unconfined",
    compose="security_opt: [apparmor=unconfined]",
    kubernetes="securityContext: {appArmorProfile: {type: Unconfined}} (Kubernetes >= 1.30; before: the annotation "
               "container.apparmor.security.beta.kubernetes.io/CONTAINER: unconfined)",
)
SELINUX_LABEL = Fix(
    docker_run="if checkpoints fail with 'Permission denied': --security-opt label=disable",
    compose="if checkpoints fail with 'Permission denied': security_opt: [label=disable]",
    kubernetes="if checkpoints fail with 'Permission denied': securityContext: {seLinuxOptions: {type: spc_t}}",
)
USE_BASE_IMAGE = Fix(
    docker_run="build the app image FROM criu-supervisor:latest (CRIU 4.2.1 and pycriu)",
    compose="build the app image FROM criu-supervisor:latest (CRIU 4.2.1 and pycriu)",
    kubernetes="build the app image FROM criu-supervisor:latest (CRIU 4.2.1 and pycriu)",
)
SHARED_VOLUME = Fix(
    docker_run="-v NAME:/checkpoints with a volume every replacement host mounts too, e.g. docker volume create "
               "--driver local -o type=nfs -o o=addr=NFS_HOST,rw,nfsvers=4 -o device=:/export/ckpt NAME",
    compose="volumes: [ckpt:/checkpoints] on the service, and at the top level volumes: {ckpt: {driver_opts: "
            "{type: nfs, o: 'addr=NFS_HOST,rw,nfsvers=4', device: ':/export/ckpt'}}}",
    kubernetes="volumeMounts: [{name: ckpt, mountPath: /checkpoints}] and volumes: [{name: ckpt, "
               "persistentVolumeClaim: {claimName: ckpt}}], a ReadWriteMany claim (NFS, EFS, Filestore, Azure Files)",
)
WRITABLE_VOLUME = Fix(
    docker_run="mount it read-write: -v NAME:/checkpoints (no :ro); on NFS export it rw and with no_root_squash, "
               "or owned by root",
    compose="volumes: [ckpt:/checkpoints] (no :ro); on NFS export it rw and with no_root_squash, or owned by root",
    kubernetes="volumeMounts: [{name: ckpt, mountPath: /checkpoints, readOnly: false}] on a ReadWriteMany claim "
               "the supervisor (root) may write",
)
MORE_SPACE = Fix(
    docker_run="a larger volume, or a memory limit the volume can hold twice (--memory 2g); "
               "CKPT_COMPRESS=zstd also helps",
    compose="a larger volume, or mem_limit: 2g (deploy.resources.limits.memory); CKPT_COMPRESS=zstd also helps",
    kubernetes="a larger claim (resources.requests.storage), or resources: {limits: {memory: 2Gi}} on the "
               "container; CKPT_COMPRESS=zstd also helps",
)
OVERLAY_STORAGE = Fix(
    docker_run='on the host: {"storage-driver": "overlay2"} in /etc/docker/daemon.json, then restart dockerd',
    compose='on the host: {"storage-driver": "overlay2"} in /etc/docker/daemon.json, then restart dockerd',
    kubernetes="nodes whose container runtime uses the overlayfs snapshotter (containerd's default)",
)
KEEP_ENTRYPOINT = Fix(
    docker_run="keep the image's ENTRYPOINT [criu-supervisor-shim, run, --] (no --entrypoint, no --init, no shell "
               "wrapper); give the app as CMD",
    compose="no entrypoint: and no init: true; give the app as command:",
    kubernetes="give the app as args: (command: replaces the image's ENTRYPOINT, the supervisor); "
               "shareProcessNamespace: false",
)


def _kernel_fix(what: str, config_option: str) -> Fix:
    on_host = f"run on a host whose kernel has {what} ({config_option}); no container setting changes this"
    return Fix(docker_run=on_host, compose=on_host,
               kubernetes=f"schedule on nodes whose kernel has {what} ({config_option}), e.g. with a nodeSelector")


# --- parsing ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Mount:
    mount_point: str
    root: str  # the path inside the mounted filesystem (a bind mount's source directory)
    fs_type: str
    source: str
    options: tuple[str, ...]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \040 etc. (proc(5)).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        before, separator, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not separator or len(fields) < 6 or len(tail) < 2:
            continue
        mounts.append(Mount(mount_point=_unescape(fields[4]), root=_unescape(fields[3]), fs_type=tail[0],
                            source=_unescape(tail[1]), options=tuple(fields[5].split(","))))
    return mounts


def mount_of(path: str, mounts: Sequence[Mount]) -> Mount | None:
    """The mount a path lives on: the longest mount point above it (the last one mounted, if stacked)."""
    best: Mount | None = None
    for mount in mounts:
        above = path == mount.mount_point or path.startswith(mount.mount_point.rstrip("/") + "/")
        if above and (best is None or len(mount.mount_point) >= len(best.mount_point)):
            best = mount
    return best


def _size(number: int) -> str:
    value = float(number)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# --- CRIU ---------------------------------------------------------------------------------------------
def check_criu(returncode: int, output: str) -> tuple[Finding, str | None]:
    """`criu --version`: CRIU is there, and which version. Returns the finding and the version."""
    match = re.search(r"Version:\s*(\S+)", output)
    if returncode != 0 or not match:
        reason = "not found" if returncode == 127 else f"`criu --version` failed: {output.strip()[:200]!r}"
        return Finding("criu", Status.FAIL, f"CRIU {reason}: nothing can be checkpointed", USE_BASE_IMAGE), None
    version = match.group(1)
    if version_tuple(version) < (4, 2):
        return Finding("criu", Status.WARN, f"CRIU {version}: criu-supervisor is made and tested for CRIU >= 4.2",
                       USE_BASE_IMAGE), version
    return _ok("criu", f"CRIU {version}"), version


# CRIU releases that fail on newer kernels, with the failure they show.
# CRIU < 4.2 asks every socket for options that kernels >= 6.16 no longer answer
# ("sockets: Can't get 1:16 opt: Operation not supported"; verified with 4.1.1 on 6.18).
_TOO_OLD_FOR_KERNEL = (
    ((4, 2), (6, 16), "fails on every process holding a TCP or UDP socket (sockets: Can't get 1:16 opt)"),
)


def check_criu_for_kernel(version: str | None, kernel_release: str) -> Finding:
    if version is None:
        return Finding("criu-vs-kernel", Status.FAIL, "no CRIU to compare with the kernel", USE_BASE_IMAGE)
    criu, kernel = version_tuple(version), version_tuple(kernel_release)
    for fixed_in, kernel_from, failure in _TOO_OLD_FOR_KERNEL:
        if criu < fixed_in and kernel >= kernel_from:
            return Finding(
                "criu-vs-kernel", Status.FAIL,
                f"CRIU {version} is too old for kernel {kernel_release}: it {failure}; CRIU >= "
                f"{'.'.join(map(str, fixed_in))} is needed on kernels >= {'.'.join(map(str, kernel_from))}",
                USE_BASE_IMAGE)
    return _ok("criu-vs-kernel", f"CRIU {version} knows kernel {kernel_release}")


def check_pycriu(available: bool) -> Finding:
    if available:
        return _ok("pycriu", "pycriu is installed (the supervisor drives CRIU through its RPC)")
    return Finding("pycriu", Status.FAIL, "pycriu is not installed: the supervisor cannot talk to CRIU",
                   USE_BASE_IMAGE)


# Lines `criu check` prints in every container, which do not stop checkpoints:
# no /dev/net/tun; no CAP_SYS_RESOURCE for CRIU's own fd limit; no tmpfs for
# its kernel-data cache; its summary line.
_CHECK_NOISE = (r"tun: Unable to create tun", r"RLIMIT_NOFILE", r"Can't keep kdat cache", r"Does not look good",
                r"^Looks good")
_NS_LAST_PID = r"ns_last_pid sysctl is inaccessible"


def check_criu_check(returncode: int, output: str, clone3_set_tid: bool) -> Finding:
    """`criu check`: the kernel and the container let CRIU do its basic job.

    /proc/sys is read-only in containers, so `criu check` always complains that
    it cannot write ns_last_pid; CRIU >= 4 restores PIDs with clone3(set_tid)
    instead, so that line only matters when clone3_set_tid is missing.
    """
    noise = _CHECK_NOISE if not clone3_set_tid else (*_CHECK_NOISE, _NS_LAST_PID)
    problems = [line.strip().rstrip(":") for line in output.splitlines()
                if line.strip() and not line.startswith("Warn") and not any(re.search(n, line) for n in noise)]
    if returncode == 0 or not problems:
        ignored = " (its complaints about tun, RLIMIT_NOFILE and the read-only ns_last_pid do not matter here)"
        return _ok("criu-check", "`criu check` passes" + ("" if returncode == 0 else ignored))
    return Finding(
        "criu-check", Status.FAIL,
        f"`criu check` fails: {problems[0]}"
        + (f" (and {len(problems) - 1} more line(s))" if len(problems) > 1 else ""),
        Fix(docker_run="--cap-add SYS_ADMIN --cap-add SYS_PTRACE --cap-add SYS_TIME --cap-add NET_ADMIN "
                       "--security-opt seccomp=unconfined --security-opt apparmor=unconfined",
            compose="cap_add: [SYS_ADMIN, SYS_PTRACE, SYS_TIME, NET_ADMIN] and "
                    "security_opt: [seccomp=unconfined, apparmor=unconfined]",
            kubernetes="securityContext: {capabilities: {add: [SYS_ADMIN, SYS_PTRACE, SYS_TIME, NET_ADMIN]}, "
                       "seccompProfile: {type: Unconfined}, appArmorProfile: {type: Unconfined}}"))


# What CRIU prints, instead of checking anything, without CAP_SYS_ADMIN (or CAP_CHECKPOINT_RESTORE).
_REFUSED = re.compile(r"CRIU needs to have the CAP_SYS_ADMIN")

# `criu check --feature NAME` for each optional kernel feature criu-supervisor uses.
FEATURES = ("uffd", "uffd-noncoop", "mem_dirty_track", "timens", "clone3_set_tid")


def check_features(supported: Mapping[str, bool], lazy: str = "auto", refused: str | None = None) -> list[Finding]:
    """What each optional kernel feature gives, or what is lost without it.

    `refused`: CRIU would not probe at all (it says so without CAP_SYS_ADMIN);
    then nothing is known about the kernel, and one finding says why.
    """
    if refused:
        return [Finding("features", Status.FAIL, f"CRIU refuses to probe the kernel's features: {refused}",
                        capability_fix("SYS_ADMIN"))]
    findings = []
    if supported.get("uffd") and supported.get("uffd-noncoop"):
        findings.append(_ok("feature:uffd", "userfaultfd works: lazy restore (CKPT_LAZY) is possible"))
    elif lazy == "off":
        findings.append(_ok("feature:uffd", "userfaultfd is not available, and not used (CKPT_LAZY=off)"))
    else:
        findings.append(Finding(
            "feature:uffd", Status.WARN,
            "userfaultfd is not available: restores are never lazy (CKPT_LAZY falls back to a full restore, so a "
            "large app answers later). userfaultfd() needs CAP_SYS_PTRACE and is blocked by Docker's default "
            "seccomp profile; else the kernel lacks CONFIG_USERFAULTFD",
            Fix(docker_run="--cap-add SYS_PTRACE --security-opt seccomp=unconfined",
                compose="cap_add: [SYS_PTRACE] and security_opt: [seccomp=unconfined]",
                kubernetes="securityContext: {capabilities: {add: [SYS_PTRACE]}, seccompProfile: {type: Unconfined}}"),
        ))
    if supported.get("mem_dirty_track"):
        findings.append(_ok("feature:mem_dirty_track", "soft-dirty tracking works: a final dump after a leave-running "
                            "one writes only the pages dirtied since (with CKPT_COMPRESS=none)"))
    else:
        findings.append(Finding(
            "feature:mem_dirty_track", Status.WARN,
            "soft-dirty memory tracking is off in this kernel: every dump copies all the app's memory while it is "
            "frozen (no pre-dump, no incremental final dump)",
            _kernel_fix("soft-dirty tracking", "CONFIG_MEM_SOFT_DIRTY=y; most x86_64 distribution kernels have it"),
        ))
    if supported.get("timens"):
        findings.append(_ok("feature:timens", "time namespaces work: monotonic clocks continue across a restore"))
    else:
        findings.append(Finding(
            "feature:timens", Status.WARN,
            "time namespaces are not available: after a restore the app's monotonic and boot-time clocks jump "
            "to the new machine's, so its timeouts and timers may fire early or late",
            _kernel_fix("time namespaces", "Linux >= 5.6, CONFIG_TIME_NS=y"),
        ))
    if supported.get("clone3_set_tid"):
        findings.append(_ok("feature:clone3_set_tid", "clone3(set_tid) works: the app gets its PIDs back"))
    else:
        findings.append(Finding(
            "feature:clone3_set_tid", Status.FAIL,
            "clone3() with set_tid is not available, and /proc/sys (ns_last_pid) is read-only in a container: "
            "CRIU cannot give the app its PIDs back, so no restore can work. Docker's default seccomp profile "
            "blocks clone3 without CAP_SYS_ADMIN; else the kernel is older than 5.5",
            Fix(docker_run="--cap-add SYS_ADMIN --security-opt seccomp=unconfined, on a kernel >= 5.5",
                compose="cap_add: [SYS_ADMIN] and security_opt: [seccomp=unconfined], on a kernel >= 5.5",
                kubernetes="securityContext: {capabilities: {add: [SYS_ADMIN]}, seccompProfile: {type: Unconfined}}, "
                           "on nodes with a kernel >= 5.5"),
        ))
    return findings


# --- capabilities, seccomp, AppArmor -------------------------------------------------------------------
CAPABILITY_BITS = {
    "DAC_READ_SEARCH": 2, "NET_ADMIN": 12, "SYS_PTRACE": 19, "SYS_ADMIN": 21, "SYS_RESOURCE": 24, "SYS_TIME": 25,
    "CHECKPOINT_RESTORE": 40,
}
# Capability -> (FAIL when missing?, why it is needed). Verified on this project's machine; see troubleshooting.md.
NEEDED_CAPABILITIES: dict[str, tuple[bool, str]] = {
    "SYS_ADMIN": (True, "the supervisor creates the app's PID and IPC namespaces, and CRIU restores them"),
    "SYS_PTRACE": (True, "CRIU seizes the app with ptrace; without it that fails for an app running as another "
                         "user and on hosts with Yama ptrace restrictions (Ubuntu's default), and userfaultfd "
                         "(lazy restore) is refused"),
    "SYS_TIME": (True, "on restore CRIU sets the clock offsets of the app's time namespace "
                       "('Unable to set a monotonic clock offset')"),
    "NET_ADMIN": (True, "restoring any socket sets its buffer sizes with SO_SNDBUFFORCE, and CKPT_TCP=established "
                        "uses TCP repair mode and iptables"),
    "SYS_RESOURCE": (False, "needed when the app drops root (nginx workers, postgres): CRIU reads its rlimits with "
                            "prlimit() ('Can't get rlimit')"),
    "DAC_READ_SEARCH": (False, "needed when the app holds inotify/fanotify watches: CRIU reopens the watched "
                               "files by handle ('fsnotify: Can't dump that handle')"),
}


def _capability_set(fields: Mapping[str, str], key: str) -> int:
    try:
        return int(fields.get(key, "0"), 16)
    except ValueError:
        return 0


def check_capabilities(status_text: str, cap_last_cap: int | None) -> list[Finding]:
    """Each capability CRIU needs, in the effective set (what we can use) or only the bounding set."""
    fields = parse_status(status_text)
    effective, bounding = _capability_set(fields, "CapEff"), _capability_set(fields, "CapBnd")
    findings = []
    for name, (required, why) in NEEDED_CAPABILITIES.items():
        bit = 1 << CAPABILITY_BITS[name]
        finding_name = f"capability:{name}"
        if effective & bit:
            findings.append(_ok(finding_name, f"CAP_{name} present"))
        elif bounding & bit:
            findings.append(Finding(finding_name, Status.FAIL if required else Status.WARN,
                                    f"CAP_{name} is granted to the container but not effective here: the supervisor "
                                    f"must run as root; {why}", RUN_AS_ROOT))
        else:
            findings.append(Finding(finding_name, Status.FAIL if required else Status.WARN,
                                    f"CAP_{name} is missing: {why}", capability_fix(name)))
    findings.append(_check_checkpoint_restore(effective, cap_last_cap))
    return findings


def _check_checkpoint_restore(effective: int, cap_last_cap: int | None) -> Finding:
    # CAP_CHECKPOINT_RESTORE (Linux 5.9) lets CRIU do a part of what CAP_SYS_ADMIN
    # allows; the supervisor needs SYS_ADMIN anyway (namespaces), which covers it.
    # Docker 20.10 rejects --cap-add CHECKPOINT_RESTORE, so it is never the advice.
    name = "capability:CHECKPOINT_RESTORE"
    if cap_last_cap is not None and cap_last_cap < CAPABILITY_BITS["CHECKPOINT_RESTORE"]:
        return _ok(name, "this kernel has no CAP_CHECKPOINT_RESTORE (< 5.9): CAP_SYS_ADMIN covers it")
    present = bool(effective & 1 << CAPABILITY_BITS["CHECKPOINT_RESTORE"])
    if effective & 1 << CAPABILITY_BITS["SYS_ADMIN"]:
        return _ok(name, f"CAP_CHECKPOINT_RESTORE {'present' if present else 'not granted'}; optional: CAP_SYS_ADMIN "
                         "covers it")
    if present:
        return Finding(name, Status.WARN,
                       "CAP_CHECKPOINT_RESTORE is present but not enough alone: the supervisor creates the app's "
                       "namespaces, which needs CAP_SYS_ADMIN", capability_fix("SYS_ADMIN"))
    return _ok(name, "CAP_CHECKPOINT_RESTORE not granted; optional once CAP_SYS_ADMIN is (see capability:SYS_ADMIN)")


def check_seccomp(status_text: str, running: Any = None) -> Finding:
    """Any seccomp filter on CRIU is fatal once the app has one (and it inherits the container's).

    CRIU suspends the app's seccomp filters with PTRACE_O_SUSPEND_SECCOMP, which
    the kernel refuses to a tracer that is itself under seccomp (kernel/ptrace.c):
    the dump fails with 'suspending seccomp failed: Operation not permitted'.
    The detail is the line the supervisor logs at start (compat.check_seccomp),
    with the fix for the engine detected here.
    """
    from supervisor_pkg import compat

    fields = parse_status(status_text)
    mode = fields.get("Seccomp", "0")
    if mode == "0":
        return _ok("seccomp", "no seccomp filter (seccomp=unconfined)")
    kind = {"1": "strict", "2": f"filter, {fields.get('Seccomp_filters', '?')} filter(s)"}.get(mode, mode)
    problem = compat.check_seccomp(status_text, running)
    here = f" ({running.describe()})" if running is not None else ""
    return Finding("seccomp", Status.FAIL, f"{problem}{here}; mode {mode}: {kind}", SECCOMP_UNCONFINED)


def check_apparmor(label: str | None) -> Finding:
    """The AppArmor profile this container runs under (/proc/self/attr/current)."""
    label = (label or "").strip().rstrip("\x00")
    if not label:
        return _ok("apparmor", "no AppArmor on this host")
    if label == "unconfined":
        return _ok("apparmor", "unconfined")
    profile, _, mode = label.partition(" ")
    if ":" in profile and not mode:  # an SELinux context, e.g. system_u:system_r:container_t:s0:c1,c2
        return Finding("apparmor", Status.WARN,
                       f"not AppArmor but SELinux ({profile}): criu-supervisor has not been tested under SELinux",
                       SELINUX_LABEL)
    if mode == "(complain)":
        return _ok("apparmor", f"{profile} in complain mode: logs, does not deny")
    if profile in ("docker-default", "cri-containerd.apparmor.d", "containers-default") or profile.startswith(
        "cri-containerd"
    ):
        return Finding("apparmor", Status.FAIL,
                       f"the runtime's default AppArmor profile {label} confines the container: it denies mount and "
                       "limits ptrace and /proc writes, which CRIU uses", APPARMOR_UNCONFINED)
    return Finding("apparmor", Status.WARN,
                   f"a custom AppArmor profile {label}: it must allow ptrace of the app and mount, or checkpoints "
                   "fail with 'Permission denied'", APPARMOR_UNCONFINED)


# --- storage -------------------------------------------------------------------------------------------
def check_root_storage(mounts: Sequence[Mount]) -> Finding:
    root = mount_of("/", mounts)
    if root is None:
        return Finding("root-storage", Status.WARN, "cannot find the container's root in /proc/self/mountinfo",
                       OVERLAY_STORAGE)
    if root.fs_type == "overlay":
        return _ok("root-storage", "the container's root is overlayfs (Docker's overlay2, containerd's overlayfs)")
    if root.fs_type == "aufs":
        return Finding(
            "root-storage", Status.FAIL,
            "the container's root is aufs: the kernel shows the app's open files and mappings under aufs' branch "
            "paths (/var/lib/docker/aufs/...), which do not exist in the replacement container, so CRIU cannot "
            "restore them; Docker removed aufs in 24.0", OVERLAY_STORAGE)
    return Finding("root-storage", Status.WARN,
                   f"the container's root is {root.fs_type}: criu-supervisor is tested on overlayfs only",
                   OVERLAY_STORAGE)


# Filesystems whose contents another machine sees: a replacement elsewhere can restore from them.
_NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "lustre", "9p", "virtiofs", "gcsfuse",
                        "beegfs", "gpfs")
# Docker's volumes live in /var/lib/docker/volumes/NAME/_data; an anonymous one is named by 64 hex digits.
_DOCKER_VOLUME = re.compile(r"/volumes/(?P<name>[^/]+)/_data$")
_ANONYMOUS = re.compile(r"^[0-9a-f]{64}$")


def check_ckpt_mount(ckpt_dir: str, exists: bool, mounts: Sequence[Mount]) -> Finding:
    """CKPT_DIR must be a volume of its own that outlives the container (and the host)."""
    name = "ckpt-dir:mount"
    mount = mount_of(ckpt_dir, mounts)
    if not exists or mount is None or mount.mount_point == "/":
        where = "does not exist" if not exists else "is not a mount point"
        return Finding(name, Status.FAIL,
                       f"CKPT_DIR {ckpt_dir} {where}: checkpoints would land in the container's writable layer, "
                       "which is deleted with the container and never seen by a replacement", SHARED_VOLUME)
    on = f"{mount.fs_type} from {mount.source}" + (f" at {mount.mount_point}" if mount.mount_point != ckpt_dir else "")
    volume = _DOCKER_VOLUME.search(mount.root)
    if mount.fs_type in ("tmpfs", "ramfs"):
        return Finding(name, Status.FAIL,
                       f"CKPT_DIR {ckpt_dir} is {mount.fs_type}: in memory, gone with the container", SHARED_VOLUME)
    if "kubernetes.io~empty-dir" in mount.root:
        return Finding(name, Status.FAIL,
                       f"CKPT_DIR {ckpt_dir} is an emptyDir: it lives and dies with the pod on this node",
                       SHARED_VOLUME)
    if volume and _ANONYMOUS.match(volume.group("name")):
        return Finding(name, Status.FAIL,
                       f"CKPT_DIR {ckpt_dir} is an anonymous Docker volume (the image's VOLUME, made because no -v "
                       "was given): every new container gets a new, empty one, so no replacement can restore",
                       SHARED_VOLUME)
    if mount.fs_type in _NETWORK_FILESYSTEMS or mount.fs_type.startswith("fuse."):
        return _ok(name, f"CKPT_DIR {ckpt_dir} is a shared filesystem ({on})")
    if volume:
        return Finding(name, Status.WARN,
                       f"CKPT_DIR {ckpt_dir} is the local Docker volume {volume.group('name')!r} ({on}): only "
                       "containers on this host see it, so a replacement on another machine starts fresh",
                       SHARED_VOLUME)
    return _ok(name, f"CKPT_DIR {ckpt_dir} is a mount of its own ({on})")


def check_ckpt_writable(ckpt_dir: str, error: OSError | None) -> Finding:
    name = "ckpt-dir:writable"
    if error is None:
        return _ok(name, f"created, synced and removed a file in {ckpt_dir}")
    why = {
        errno.EROFS: "the volume is mounted read-only",
        errno.EACCES: "permission denied (an NFS export with root_squash maps root to nobody)",
        errno.EPERM: "permission denied",
        errno.ENOSPC: "the volume is full",
        errno.ENOENT: "it does not exist",
        errno.EDQUOT: "the disk quota is exhausted",
    }.get(error.errno or 0, error.strerror or str(error))
    fix = MORE_SPACE if error.errno in (errno.ENOSPC, errno.EDQUOT) else WRITABLE_VOLUME
    return Finding(name, Status.FAIL, f"cannot write a file in CKPT_DIR {ckpt_dir}: {why} ({error.strerror})", fix)


def memory_need(meminfo_text: str | None, cgroup_limit_texts: Sequence[str | None]) -> tuple[int | None, str]:
    """How much memory the app could fill (so a checkpoint could take): the cgroup limit, else the machine's."""
    total = None
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo_text or "", re.MULTILINE)
    if match:
        total = int(match.group(1)) * 1024
    for text in cgroup_limit_texts:  # cgroup v2 memory.max ("max" = none), v1 memory.limit_in_bytes (huge = none)
        value = (text or "").strip()
        if value.isdigit() and (total is None or int(value) < total):
            return int(value), f"the container's memory limit, {_size(int(value))}"
    if total is None:
        return None, "unknown"
    return total, f"the machine's memory, {_size(total)}, as the container has no memory limit"


def check_free_space(ckpt_dir: str, free: int | None, need: int | None, need_source: str, compress: str) -> Finding:
    name = "ckpt-dir:space"
    if free is None or need is None:
        return Finding(name, Status.WARN, f"cannot tell the free space of CKPT_DIR {ckpt_dir} or the app's memory "
                                          f"({need_source})", MORE_SPACE)
    squeeze = "" if compress == "none" else f" before CKPT_COMPRESS={compress}"
    if free < need:
        return Finding(name, Status.WARN,
                       f"{_size(free)} free on CKPT_DIR {ckpt_dir}, but a checkpoint can be as large as the app's "
                       f"memory{squeeze}: up to {need_source}", MORE_SPACE)
    return _ok(name, f"{_size(free)} free on CKPT_DIR {ckpt_dir}; a checkpoint takes at most {need_source}")


# --- process -------------------------------------------------------------------------------------------
def check_init(pid: int, pid1_cmdline: str | None) -> Finding:
    """The supervisor should be PID 1: it gets the stop signal and reaps orphans (else it is a subreaper)."""
    if pid == 1:
        return _ok("init", "running as PID 1, as the supervisor does from the image's ENTRYPOINT")
    command = (pid1_cmdline or "").replace("\x00", " ").strip()
    if "criu-supervisor" in command:
        return _ok("init", "PID 1 is criu-supervisor")
    return Finding(
        "init", Status.WARN,
        f"PID 1 is {command or 'unknown'!r}, not criu-supervisor: the supervisor then makes itself a child subreaper, "
        "which works, but the stop signal reaches it only if PID 1 passes it on (tini and docker-init do; a shell "
        "does not)", KEEP_ENTRYPOINT)


_TERMINAL = re.compile(r"^/dev/(pts/\d+|tty\w*|console)$")


def check_cpu(cpuinfo_text: str | None, baseline: str) -> Finding:
    """Always OK: this CPU's x86-64 level, and what the app's checkpoints will need of a replacement's CPU."""
    from supervisor_pkg import cpu

    if not cpuinfo_text:
        return _ok("cpu", "/proc/cpuinfo unreadable: the CPU is not recorded")
    here = cpu.record(cpuinfo_text, baseline)
    needs = sorted(cpu.required(here))
    if baseline == "native":
        detail = (f"this CPU is {cpu.describe(here)}; with CKPT_CPU_BASELINE=native the app's checkpoints need a "
                  f"CPU with its {len(needs)} instruction-set features (set a baseline, e.g. x86-64-v3, for a fleet "
                  "of mixed instance types)")
    else:
        detail = (f"this CPU is {cpu.describe(here)}; CKPT_CPU_BASELINE={baseline} keeps a fresh app's glibc to "
                  f"{baseline}, so its checkpoints need a CPU with: {', '.join(needs)}")
    return _ok("cpu", detail)


def check_terminal(stdio_targets: Sequence[str | None]) -> Finding:
    """The container's stdin/stdout/stderr (PID 1's fds 0-2): pipes, or the runtime's terminal.

    A terminal (docker run -t) is carried: the supervisor hands it to CRIU as an
    external tty and reconnects the app to the new container's. Only a
    replacement with a terminal too can restore such a checkpoint.
    """
    terminals = sorted({target for target in stdio_targets if target and _TERMINAL.match(target)})
    if not terminals:
        return _ok("terminal", "no terminal attached (the app's output goes to pipes)")
    return _ok("terminal", f"a terminal is attached ({', '.join(terminals)}; docker run -t / tty: true): it is "
                           "carried, but its checkpoints restore only in a container with a terminal too")


# --- the real system ---------------------------------------------------------------------------------------
def _read_text(path: str) -> str | None:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def _run(argv: Sequence[str]) -> tuple[int, str]:
    """Exit status and combined output; 127 when the program does not exist."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return 127, f"{argv[0]}: not found"
    except (OSError, subprocess.TimeoutExpired) as error:
        return 126, str(error)
    return result.returncode, result.stdout + result.stderr


def _try_write(directory: str) -> OSError | None:
    """Create, fsync and delete a uniquely named file, as the store will (O_EXCL)."""
    try:
        fd, path = tempfile.mkstemp(prefix=".doctor-", dir=directory)
    except OSError as error:
        return error
    try:
        os.write(fd, b"criu-supervisor doctor\n")
        os.fsync(fd)
    except OSError as error:
        return error
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
    return None


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclasses.dataclass
class Host:
    """Everything doctor reads from the system; unit tests replace these with fakes."""

    read: Callable[[str], str | None] = _read_text
    run: Callable[[Sequence[str]], tuple[int, str]] = _run
    free_bytes: Callable[[str], int | None] = free_bytes
    try_write: Callable[[str], OSError | None] = _try_write
    readlink: Callable[[str], str | None] = _readlink
    exists: Callable[[str], bool] = os.path.isdir
    realpath: Callable[[str], str] = os.path.realpath
    has_module: Callable[[str], bool] = _has_module
    pid: Callable[[], int] = os.getpid
    kernel_release: Callable[[], str] = lambda: os.uname().release


def run_checks(config: Any, host: Host | None = None) -> list[Finding]:
    """Every check, in the order a reader fixes things: CRIU, permissions, storage, process.

    `config` is a supervisor_pkg.config.Config (only .dir, .lazy and .compress are read).
    """
    host = host or Host()
    findings: list[Finding] = []

    criu = criu_command()
    criu_finding, version = check_criu(*host.run([*criu, "--version"]))
    findings += [criu_finding, check_criu_for_kernel(version, host.kernel_release()),
                 check_pycriu(host.has_module("pycriu"))]
    if version is not None:
        probes = {name: host.run([*criu, "check", "--feature", name]) for name in FEATURES}
        supported = {name: returncode == 0 for name, (returncode, _output) in probes.items()}
        findings.append(check_criu_check(*host.run([*criu, "check"]), supported["clone3_set_tid"]))
        refused = next((line.strip().rstrip(":") for _code, output in probes.values() for line in output.splitlines()
                        if _REFUSED.search(line)), None)
        findings += check_features(supported, lazy=getattr(config, "lazy", "auto"), refused=refused)

    status = host.read("/proc/self/status") or ""
    last_cap = (host.read("/proc/sys/kernel/cap_last_cap") or "").strip()
    findings += check_capabilities(status, int(last_cap) if last_cap.isdigit() else None)
    from supervisor_pkg import engine

    running = engine.detect(cgroup=host.read("/proc/self/cgroup"), mountinfo=host.read("/proc/self/mountinfo"),
                            containerenv=host.read(engine.CONTAINERENV),
                            dockerenv=host.read(engine.DOCKERENV) is not None)
    findings.append(check_seccomp(status, running))
    label = host.read("/proc/self/attr/apparmor/current")
    findings.append(check_apparmor(label if label is not None else host.read("/proc/self/attr/current")))

    mounts = parse_mountinfo(host.read("/proc/self/mountinfo") or "")
    findings.append(check_root_storage(mounts))
    ckpt_dir = host.realpath(config.dir) if host.exists(config.dir) else config.dir
    exists = host.exists(ckpt_dir)
    findings.append(check_ckpt_mount(ckpt_dir, exists, mounts))
    if exists:
        findings.append(check_ckpt_writable(ckpt_dir, host.try_write(ckpt_dir)))
        need, need_source = memory_need(host.read("/proc/meminfo"), [
            host.read("/sys/fs/cgroup/memory.max"), host.read("/sys/fs/cgroup/memory/memory.limit_in_bytes")])
        findings.append(check_free_space(ckpt_dir, host.free_bytes(ckpt_dir), need, need_source,
                                         getattr(config, "compress", "none")))

    findings.append(check_cpu(host.read("/proc/cpuinfo"), getattr(config, "cpu_baseline", "native")))
    findings.append(check_init(host.pid(), host.read("/proc/1/cmdline")))
    findings.append(check_terminal([host.readlink(f"/proc/1/fd/{fd}") for fd in (0, 1, 2)]))
    return findings


def exit_code(findings: Sequence[Finding]) -> int:
    """0 when a checkpoint can work here (WARNs allowed), 1 when anything FAILs."""
    return 1 if any(finding.status is Status.FAIL for finding in findings) else 0


def _fix_lines(fix: Fix) -> list[str]:
    """The fix per way of running, once for several ways that need the same change."""
    labels: dict[str, list[str]] = {}
    for label, text in (("docker run", fix.docker_run), ("compose", fix.compose), ("kubernetes", fix.kubernetes)):
        labels.setdefault(text, []).append(label)
    return [f"      {', '.join(names) + ':':12} {text}" for text, names in labels.items()]


def render(findings: Sequence[Finding], as_json: bool = False) -> str:
    counts = {status: sum(1 for f in findings if f.status is status) for status in Status}
    if as_json:
        return json.dumps({"ok": exit_code(findings) == 0,
                           "counts": {status.value: count for status, count in counts.items()},
                           "findings": [finding.to_dict() for finding in findings]}, indent=2)
    lines = []
    for finding in findings:
        lines.append(f"{finding.status.value:4}  {finding.name}: {finding.detail}")
        if finding.fix is not None:
            lines += _fix_lines(finding.fix)
    verdict = ("a checkpoint cannot work here: fix the FAIL lines" if counts[Status.FAIL]
               else "checkpoints can work here" + (" (see the WARN lines)" if counts[Status.WARN] else ""))
    lines.append(f"doctor: {counts[Status.FAIL]} FAIL, {counts[Status.WARN]} WARN, {counts[Status.OK]} OK: {verdict}; "
                 f"every finding is explained in "
                 f"{TROUBLESHOOTING} of the criu-supervisor repository")
    return "\n".join(lines)
