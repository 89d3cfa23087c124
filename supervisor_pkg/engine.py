"""What a container can see of the engine that runs it: Docker, Podman, containerd, Kubernetes.

A container has no handle on its engine; it can only read what the engine left
in it. `detect` reads that evidence (every input can be passed in, for tests)
and names the engine, the container and the host, so that leases, manifests
and claims say which container under which engine holds or made what.

What each engine leaves, as seen on this project's machine (Docker 20.10,
Podman 4.3 rootful with runc, containerd 1.6 driven by ctr; cgroup v1, no
cgroup namespace) and, for Kubernetes, as kubelets lay out cgroups:

| engine     | evidence                                                     | container id from                   |
|------------|--------------------------------------------------------------|-------------------------------------|
| Docker     | /.dockerenv (empty); /etc/hostname, /etc/hosts,              | those mounts' source paths, else    |
|            | /etc/resolv.conf bind-mounted from                           | the cgroup /docker/<id>             |
|            | <data-root>/containers/<64 hex>/                             | (docker-<id>.scope with systemd)    |
| Podman     | /run/.containerenv (EMPTY unless --privileged: only then     | .containerenv id= (privileged),     |
|            | engine="podman-4.3.1", name=, id=, image=, imageid=,         | else those mounts, else the cgroup  |
|            | rootless=); the environment variable container=podman;       | /libpod_parent/libpod-<id>          |
|            | /etc/hostname, /etc/hosts, /run/.containerenv bind-mounted   |                                     |
|            | from <runroot>/overlay-containers/<64 hex>/userdata/         |                                     |
| containerd | nothing of its own: no marker file, no variable, no bind     | the cgroup /<namespace>/<id>, which |
| (ctr)      | mount; the root is an overlay of                             | ctr sets (its ids are any name); a  |
|            | <root>/io.containerd.snapshotter.v1.overlayfs/snapshots/N/fs | mount from <state>/io.containerd.   |
|            |                                                              | runtime.v2.task/<namespace>/<id>/   |
| Kubernetes | KUBERNETES_SERVICE_HOST (set in every pod, even with         | the cgroup .../kubepods.../<id> or  |
|            | enableServiceLinks: false); kubepods in the cgroup; mounts   | ...-<id>.scope (cri-containerd-,    |
|            | from /var/lib/kubelet/pods/<pod uid>/                        | crio-, docker-)                     |

Kubernetes cannot run here: its rows are the layouts kubelets make (the
cgroupfs one was reproduced with `docker run --cgroup-parent /kubepods/...`).
The most specific is checked first: Kubernetes, Podman, Docker, containerd.
CRI-O under Kubernetes also writes /run/.containerenv, and an image built by
Docker may carry a /.dockerenv into Podman. On cgroup v2 with a private cgroup
namespace (Docker's default there, and containerd's CRI) /proc/self/cgroup
says only "0::/": Docker and Podman are still named by their bind mounts, a
bare containerd container then has no visible id.

The host: CKPT_HOST_NAME, then NODE_NAME (Kubernetes' downward API,
`fieldRef: spec.nodeName`), then the hostname. Only ctr leaves the host's own
hostname in the container (its UTS namespace starts as a copy of the host's);
Docker and Podman set it to the container's short id, Kubernetes to the pod's
name, unless the deployment passes CKPT_HOST_NAME or NODE_NAME.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import re
import socket
from collections.abc import Mapping

_HEX64 = r"[0-9a-f]{64}"
KINDS = ("docker", "podman", "containerd", "kubernetes", "unknown")

DOCKERENV = "/.dockerenv"
CONTAINERENV = "/run/.containerenv"


class _Default(enum.Enum):
    READ = "read the real one"


READ = _Default.READ
"""Default of every input of `detect`: read it from this container. None means absent or unreadable."""


@dataclasses.dataclass(frozen=True)
class Engine:
    kind: str  # one of KINDS
    container_id: str | None = None
    host: str | None = None
    pod: str | None = None  # the pod's name, under Kubernetes
    evidence: tuple[str, ...] = ()  # what gave the engine away, in words, for logs and doctor

    def describe(self) -> str:
        """'podman container 9db18d4f017b on host vm', 'kubernetes pod kv-0 (container 0123456789ab) on host n1'."""
        container = f"container {short_id(self.container_id)}"
        what = f"pod {self.pod} ({container})" if self.pod else container
        engine = "an unknown engine's" if self.kind == "unknown" else self.kind
        return f"{engine} {what} on host {self.host or '?'}"


def short_id(container_id: str | None) -> str:
    """The 12 characters engines show for a 64-hex id (docker ps, podman ps); other ids (ctr's names) whole."""
    if not container_id:
        return "?"
    return container_id[:12] if re.fullmatch(_HEX64, container_id) else container_id


# --- evidence ---------------------------------------------------------------------------------------------
# Docker bind-mounts these three from <data-root>/containers/<id>/ (its "network mounts").
_DOCKER_MOUNT = re.compile(rf"(?:^|/)containers/(?P<id>{_HEX64})/(?:hostname|hosts|resolv\.conf)$")
# containers/storage keeps a container's run files in <runroot>/<driver>-containers/<id>/userdata/.
_PODMAN_MOUNT = re.compile(rf"/[a-z0-9]+-containers/(?P<id>{_HEX64})/userdata(?:/|$)")
# containerd's runc shim v2 bundle: <state>/io.containerd.runtime.v2.task/<namespace>/<id>/.
_CONTAINERD_TASK = re.compile(r"/io\.containerd\.runtime\.v2\.task/(?P<namespace>[^/]+)/(?P<id>[^/]+)(?:/|$)")
_CONTAINERD_SNAPSHOT = "/io.containerd.snapshotter.v1."
_KUBELET_POD = re.compile(r"/kubelet/pods/[0-9a-f-]{36}/")

_DOCKER_CGROUP = re.compile(rf"(?:/docker/|/docker-)(?P<id>{_HEX64})(?:\.scope)?(?:/|$)")
_PODMAN_CGROUP = re.compile(rf"/libpod-(?P<id>{_HEX64})(?:\.scope)?(?:/|$)")
# The container's own cgroup under kubepods: <id> (cgroupfs driver) or <runtime>-<id>.scope (systemd driver).
_KUBEPODS_CGROUP = re.compile(rf"kubepods.*/(?:[a-z-]+-)?(?P<id>{_HEX64})(?:\.scope)?$")


def _cgroup_paths(text: str) -> list[str]:
    """The distinct cgroup paths in /proc/self/cgroup ("ID:CONTROLLERS:PATH"), in order, "/" left out."""
    paths: list[str] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[2] not in ("", "/") and parts[2] not in paths:
            paths.append(parts[2])
    return paths


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \040 etc. (proc(5)).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


@dataclasses.dataclass(frozen=True)
class _Mount:
    root: str  # the source path inside the mounted filesystem (a bind mount's source)
    mount_point: str
    fs_type: str
    super_options: str  # overlayfs: lowerdir=...,upperdir=...


def _mounts(text: str) -> list[_Mount]:
    mounts = []
    for line in text.splitlines():
        before, separator, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if separator and len(fields) >= 5 and tail:
            mounts.append(_Mount(_unescape(fields[3]), _unescape(fields[4]), tail[0],
                                 _unescape(tail[2]) if len(tail) > 2 else ""))
    return mounts


def _first(pattern: re.Pattern[str], texts: list[str], group: str = "id") -> str | None:
    for text in texts:
        match = pattern.search(text)
        if match:
            return match.group(group)
    return None


def _containerenv(text: str) -> dict[str, str]:
    """/run/.containerenv's key="value" lines (written only for --privileged containers)."""
    fields = {}
    for line in text.splitlines():
        key, separator, value = line.partition("=")
        if separator:
            fields[key.strip()] = value.strip().strip('"')
    return fields


# --- the real system ---------------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def detect(
    environ: Mapping[str, str] | None = None,
    *,
    cgroup: str | None | _Default = READ,
    mountinfo: str | None | _Default = READ,
    containerenv: str | None | _Default = READ,
    dockerenv: bool | _Default = READ,
    hostname: str | None | _Default = READ,
) -> Engine:
    """The engine running this container, from what it left here.

    `cgroup` and `mountinfo` are the texts of /proc/self/cgroup and
    /proc/self/mountinfo; `containerenv` the text of /run/.containerenv (None:
    no such file); `dockerenv` whether /.dockerenv exists; `hostname` this
    UTS namespace's name. Each defaults to reading the real one.
    """
    environ = os.environ if environ is None else environ
    cgroup_text = (_read("/proc/self/cgroup") if cgroup is READ else cgroup) or ""
    mountinfo_text = (_read("/proc/self/mountinfo") if mountinfo is READ else mountinfo) or ""
    containerenv_text = _read(CONTAINERENV) if containerenv is READ else containerenv
    has_dockerenv = os.path.exists(DOCKERENV) if dockerenv is READ else dockerenv
    own_name = socket.gethostname() if hostname is READ else hostname

    paths = _cgroup_paths(cgroup_text)
    mounts = _mounts(mountinfo_text)
    sources = [mount.root for mount in mounts]
    host = environ.get("CKPT_HOST_NAME") or environ.get("NODE_NAME") or own_name or None

    kubernetes = [what for what, seen in (
        ("KUBERNETES_SERVICE_HOST is set", bool(environ.get("KUBERNETES_SERVICE_HOST"))),
        ("the cgroup is under kubepods", any("kubepods" in path for path in paths)),
        ("mounts come from the kubelet's pod directory", any(_KUBELET_POD.search(source) for source in sources)),
    ) if seen]
    if kubernetes:
        # Only the cgroup names the container: CRI bind mounts come from the pod's sandbox, not the container.
        return Engine("kubernetes", _first(_KUBEPODS_CGROUP, paths), host,
                      pod=environ.get("POD_NAME") or own_name or None, evidence=tuple(kubernetes))

    fields = _containerenv(containerenv_text or "")
    podman_mount = _first(_PODMAN_MOUNT, sources)
    podman_cgroup = _first(_PODMAN_CGROUP, paths)
    podman = [what for what, seen in (
        (f"{CONTAINERENV} exists", containerenv_text is not None),
        ("container=podman is set", environ.get("container") == "podman"),
        ("mounts come from containers/storage", podman_mount is not None),
        ("the cgroup is libpod-<id>", podman_cgroup is not None),
    ) if seen]
    if podman:
        container_id = fields.get("id") or podman_mount or podman_cgroup
        return Engine("podman", container_id, host, evidence=tuple(podman))

    docker_mount = _first(_DOCKER_MOUNT, sources)
    docker_cgroup = _first(_DOCKER_CGROUP, paths)
    docker = [what for what, seen in (
        (f"{DOCKERENV} exists", has_dockerenv),
        ("/etc/hostname comes from Docker's containers directory", docker_mount is not None),
        ("the cgroup is docker's", docker_cgroup is not None),
    ) if seen]
    if docker:
        return Engine("docker", docker_mount or docker_cgroup, host, evidence=tuple(docker))

    task = next((match for match in (_CONTAINERD_TASK.search(text) for text in sources) if match), None)
    root = next((mount for mount in mounts if mount.mount_point == "/"), None)
    snapshot = root is not None and _CONTAINERD_SNAPSHOT in root.super_options + root.root
    if task is not None or snapshot:
        # containerd's default spec puts a container in the cgroup /<namespace>/<id> (ctr's ids are any name).
        container_id = task.group("id") if task else (paths[0].rstrip("/").rsplit("/", 1)[-1] if paths else None)
        evidence = ("a bind mount comes from containerd's task directory",) if task else (
            "the root is a containerd snapshot",)
        return Engine("containerd", container_id or None, host, evidence=evidence)

    return Engine("unknown", None, host)


@functools.lru_cache(maxsize=1)
def current() -> Engine:
    """This container's engine, detected once: it does not change during a container's life."""
    return detect()


# --- running unconfined ---------------------------------------------------------------------------------------
_SECCOMP_DOCKER = "docker run --security-opt seccomp=unconfined (compose: security_opt: [seccomp=unconfined])"
# Docker 20.10's Swarm has no per-service seccomp setting (`service create` has no --security-opt,
# `stack deploy` ignores security_opt), and its daemon refuses `--seccomp-profile unconfined`; the
# daemon-wide "unconfined" came with Docker 23.0 (moby#42481).
_SECCOMP_SWARM = ('Docker Swarm: no per-service setting; make it the default of the spot nodes\' daemons, '
                  '"seccomp-profile": "unconfined" in /etc/docker/daemon.json (Docker >= 23.0; 20.10 refuses it: '
                  'there, a runc wrapper as the default runtime that removes linux.seccomp from the bundle)')
_SECCOMP_PODMAN = "podman run --security-opt seccomp=unconfined"
_SECCOMP_KUBERNETES = ("Kubernetes: securityContext: {seccompProfile: {type: Unconfined}} on the container (a kubelet "
                       "with --seccomp-default applies RuntimeDefault otherwise)")
_SECCOMP_CONTAINERD = ("containerd: ctr run applies no seccomp profile unless given --seccomp or --seccomp-profile: "
                       "drop them (nerdctl: --security-opt seccomp=unconfined)")


def seccomp_fix(engine: Engine) -> str:
    """One line: how to run this container without a seccomp filter, for the engine that runs it."""
    if engine.kind == "docker":
        return f"{_SECCOMP_DOCKER}; {_SECCOMP_SWARM}"
    if engine.kind == "podman":
        return _SECCOMP_PODMAN
    if engine.kind == "kubernetes":
        return _SECCOMP_KUBERNETES
    if engine.kind == "containerd":
        return _SECCOMP_CONTAINERD
    return "; ".join((_SECCOMP_DOCKER, _SECCOMP_SWARM, _SECCOMP_PODMAN, _SECCOMP_KUBERNETES, _SECCOMP_CONTAINERD))
