"""engine.detect() and engine.seccomp_fix() on the texts each engine leaves in its containers.

The Docker, Podman and containerd texts below were copied from containers on
this project's machine (Docker 20.10, Podman 4.3.1 rootful with runc,
containerd 1.6.20 driven by ctr; cgroup v1), trimmed to the lines that matter.
Kubernetes cannot run here: its cgroup paths are the layouts kubelets make
(cgroupfs and systemd drivers) around containerd, CRI-O and dockershim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest

from supervisor_pkg import engine
from supervisor_pkg.engine import Engine, detect, seccomp_fix

DOCKER_ID = "90409ef3ba6b11feb2b61b4b68062cee90ce4739ee5c37f277656b190de60ef6"
PODMAN_ID = "9db18d4f017b3a07109991fb1113ef9195c17b21aaf10c6ec3c9a7b46f8f1a8d"
KUBE_ID = "41d9415818af30b8aad339c6e202912ca1555520f5a1f363d99dfb1010f27db0"
POD_UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def cgroup_v1(path: str) -> str:
    controllers = ("name=systemd", "pids", "blkio", "freezer", "devices", "memory", "cpuset", "cpuacct", "cpu")
    return "".join(f"{9 - number}:{name}:{path}\n" for number, name in enumerate(controllers)) + f"0::{path}\n"


CGROUP_NAMESPACED = "0::/\n"  # cgroup v2 with a private cgroup namespace: no path at all

# --- docker run --network none -v VOL:/checkpoints ... ------------------------------------------------
DOCKER_MOUNTINFO = (
    "126 77 0:51 / / rw,relatime master:3 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/TM44QN7PDYZE:"
    "/var/lib/docker/overlay2/l/3YBHHC3RE4O7,upperdir=/var/lib/docker/overlay2/0b84780b75e2/diff,"
    "workdir=/var/lib/docker/overlay2/0b84780b75e2/work\n"
    "127 126 0:55 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw\n"
    "143 126 254:0 /var/lib/docker/volumes/94bea8c101bd/_data /checkpoints rw,relatime master:1 - ext4 /dev/vda rw\n"
    f"144 126 254:0 /var/lib/docker/containers/{DOCKER_ID}/resolv.conf /etc/resolv.conf rw,relatime - ext4 /dev/vda "
    "rw\n"
    f"145 126 254:0 /var/lib/docker/containers/{DOCKER_ID}/hostname /etc/hostname rw,relatime - ext4 /dev/vda rw\n"
    f"146 126 254:0 /var/lib/docker/containers/{DOCKER_ID}/hosts /etc/hosts rw,relatime - ext4 /dev/vda rw\n"
)
DOCKER_CGROUP = cgroup_v1(f"/docker/{DOCKER_ID}")

# --- podman run --network none --ulimit ... (rootful) --------------------------------------------------
PODMAN_MOUNTINFO = (
    "129 78 0:53 / / rw,relatime - overlay overlay rw,lowerdir=/var/lib/containers/storage/overlay/l/NZTQFR7FEGVX:"
    "/var/lib/containers/storage/overlay/l/TXFMN6FDWVPA,upperdir=/var/lib/containers/storage/overlay/e376785adb48/"
    "diff,workdir=/var/lib/containers/storage/overlay/e376785adb48/work,uuid=on,fsync=volatile\n"
    "130 129 0:56 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw\n"
    "133 129 254:0 /tmp/cs-engines-x/ckpt /checkpoints rw,nosuid,nodev,relatime - ext4 /dev/vda rw\n"
    f"136 129 254:0 /run/containers/storage/overlay-containers/{PODMAN_ID}/userdata/hosts /etc/hosts rw,relatime - "
    "ext4 /dev/vda rw\n"
    f"138 129 254:0 /run/containers/storage/overlay-containers/{PODMAN_ID}/userdata/.containerenv /run/.containerenv "
    "rw,relatime - ext4 /dev/vda rw\n"
    f"139 129 254:0 /run/containers/storage/overlay-containers/{PODMAN_ID}/userdata/hostname /etc/hostname "
    "rw,relatime - ext4 /dev/vda rw\n"
)
PODMAN_CGROUP = cgroup_v1(f"/libpod_parent/libpod-{PODMAN_ID}")
PODMAN_ENVIRON = {"HOSTNAME": PODMAN_ID[:12], "container": "podman", "HOME": "/root"}
# Written only for --privileged containers; the file is empty otherwise.
PODMAN_PRIVILEGED_CONTAINERENV = (
    'engine="podman-4.3.1"\nname="cs-engines-probe2"\n'
    'id="ff4da47a0dd2a5e34fc2105b5f303adc4f962cfdee854af081b4cdccb3c05b7f"\n'
    'image="localhost/cs-engines-kv:latest"\n'
    'imageid="244668a4e7897411c3dbc795904fba5eedd3bb212220292d9aa8e7d11bd3fd16"\nrootless=0\n'
)

# --- ctr run --mount type=bind,src=DIR,dst=/checkpoints,options=rbind:rw IMAGE cs-engines-probe ------------
CTR_MOUNTINFO = (
    "125 76 0:51 / / rw,relatime - overlay overlay rw,lowerdir=/var/lib/cs-engines-containerd/io.containerd."
    "snapshotter.v1.overlayfs/snapshots/7/fs:/var/lib/cs-engines-containerd/io.containerd.snapshotter.v1.overlayfs/"
    "snapshots/6/fs,upperdir=/var/lib/cs-engines-containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/8/fs,"
    "workdir=/var/lib/cs-engines-containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/8/work\n"
    "126 125 0:55 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw\n"
    "132 125 0:60 / /run rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755\n"
    "133 125 254:0 /tmp/cs-engines-probe /checkpoints rw,relatime - ext4 /dev/vda rw\n"
)
CTR_CGROUP = cgroup_v1("/cs-engines/cs-engines-probe")


@dataclasses.dataclass(frozen=True)
class Seen:
    """What a process sees; the defaults are a process outside any known engine."""

    environ: Mapping[str, str] = dataclasses.field(default_factory=dict)
    cgroup: str = ""
    mountinfo: str = ""
    containerenv: str | None = None
    dockerenv: bool = False
    hostname: str = "box"

    def but(self, **changes: Any) -> Seen:
        return dataclasses.replace(self, **changes)

    def detect(self) -> Engine:
        return detect(self.environ, cgroup=self.cgroup, mountinfo=self.mountinfo, containerenv=self.containerenv,
                      dockerenv=self.dockerenv, hostname=self.hostname)


NOTHING = Seen()
IN_DOCKER = Seen(environ={"HOSTNAME": DOCKER_ID[:12]}, cgroup=DOCKER_CGROUP, mountinfo=DOCKER_MOUNTINFO,
                 dockerenv=True, hostname=DOCKER_ID[:12])
IN_PODMAN = Seen(environ=PODMAN_ENVIRON, cgroup=PODMAN_CGROUP, mountinfo=PODMAN_MOUNTINFO, containerenv="",
                 hostname=PODMAN_ID[:12])
IN_CTR = Seen(cgroup=CTR_CGROUP, mountinfo=CTR_MOUNTINFO, hostname="vm")


# --- Docker -------------------------------------------------------------------------------------------------
def test_docker_is_named_by_dockerenv_and_its_container_by_the_hostname_mount() -> None:
    found = IN_DOCKER.detect()
    assert (found.kind, found.container_id, found.host, found.pod) == ("docker", DOCKER_ID, DOCKER_ID[:12], None)
    assert "/.dockerenv exists" in found.evidence
    assert found.describe() == f"docker container {DOCKER_ID[:12]} on host {DOCKER_ID[:12]}"


def test_docker_on_cgroup_v2_with_a_private_cgroup_namespace_is_still_named_by_its_mounts() -> None:
    found = IN_DOCKER.but(cgroup=CGROUP_NAMESPACED).detect()
    assert (found.kind, found.container_id) == ("docker", DOCKER_ID)


def test_docker_with_the_systemd_cgroup_driver_and_no_bind_mounts_is_named_by_its_scope() -> None:
    found = NOTHING.but(cgroup=f"0::/system.slice/docker-{DOCKER_ID}.scope\n").detect()
    assert (found.kind, found.container_id) == ("docker", DOCKER_ID)


def test_a_docker_data_root_elsewhere_is_recognised() -> None:
    moved = DOCKER_MOUNTINFO.replace("/var/lib/docker/", "/srv/docker-data/")
    found = IN_DOCKER.but(mountinfo=moved, dockerenv=False, cgroup=CGROUP_NAMESPACED).detect()
    assert (found.kind, found.container_id) == ("docker", DOCKER_ID)


# --- Podman -------------------------------------------------------------------------------------------------
def test_podman_is_named_by_its_empty_containerenv_and_its_container_by_containers_storage() -> None:
    found = IN_PODMAN.detect()
    assert (found.kind, found.container_id, found.host) == ("podman", PODMAN_ID, PODMAN_ID[:12])
    assert "/run/.containerenv exists" in found.evidence and "container=podman is set" in found.evidence


def test_a_privileged_podman_containers_containerenv_id_wins() -> None:
    found = IN_PODMAN.but(containerenv=PODMAN_PRIVILEGED_CONTAINERENV).detect()
    assert found.container_id == "ff4da47a0dd2a5e34fc2105b5f303adc4f962cfdee854af081b4cdccb3c05b7f"


def test_podman_on_cgroup_v2_is_still_named_by_its_mounts() -> None:
    found = IN_PODMAN.but(cgroup=CGROUP_NAMESPACED).detect()
    assert (found.kind, found.container_id) == ("podman", PODMAN_ID)


def test_podman_is_not_taken_for_docker_even_with_a_dockerenv() -> None:
    # /.dockerenv can come from an image built by docker and then run by Podman.
    found = IN_PODMAN.but(dockerenv=True).detect()
    assert found.kind == "podman"


def test_the_containers_storage_layout_alone_names_podman() -> None:
    found = NOTHING.but(mountinfo=PODMAN_MOUNTINFO).detect()
    assert (found.kind, found.container_id) == ("podman", PODMAN_ID)


# --- containerd (ctr) -----------------------------------------------------------------------------------------
def test_ctr_is_named_by_its_snapshot_root_and_its_container_by_the_cgroup() -> None:
    found = IN_CTR.detect()
    assert (found.kind, found.container_id, found.host) == ("containerd", "cs-engines-probe", "vm")
    assert found.describe() == "containerd container cs-engines-probe on host vm", "ctr's ids are names: not cut"


def test_a_bind_mount_from_containerds_task_directory_names_the_container() -> None:
    task = ("140 125 254:0 /run/cs-engines-containerd/io.containerd.runtime.v2.task/cs-engines/kv-a/rootfs/etc "
            "/etc/x ro,relatime - ext4 /dev/vda rw\n")
    found = NOTHING.but(mountinfo=task, cgroup=CGROUP_NAMESPACED).detect()
    assert (found.kind, found.container_id) == ("containerd", "kv-a")


def test_containerd_on_cgroup_v2_with_a_private_namespace_has_no_visible_id() -> None:
    found = IN_CTR.but(cgroup=CGROUP_NAMESPACED).detect()
    assert (found.kind, found.container_id) == ("containerd", None)
    assert found.describe() == "containerd container ? on host vm"


# --- Kubernetes -----------------------------------------------------------------------------------------------
KUBE_ENVIRON = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443", "HOSTNAME": "kv-5d9c7b-x2x7q"}


@pytest.mark.parametrize("path", [
    f"/kubepods/burstable/pod{POD_UID}/{KUBE_ID}",  # cgroupfs driver (seen here: docker --cgroup-parent)
    f"/kubepods/pod{POD_UID}/{KUBE_ID}",  # Guaranteed QoS
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice/"
    f"cri-containerd-{KUBE_ID}.scope",  # systemd driver, containerd
    f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_UID.replace('-', '_')}.slice/"
    f"crio-{KUBE_ID}.scope",  # systemd driver, CRI-O
])
def test_kubernetes_names_the_container_from_its_kubepods_cgroup(path: str) -> None:
    found = NOTHING.but(environ=KUBE_ENVIRON, cgroup=cgroup_v1(path), hostname="kv-5d9c7b-x2x7q").detect()
    assert (found.kind, found.container_id, found.pod) == ("kubernetes", KUBE_ID, "kv-5d9c7b-x2x7q")


def test_kubernetes_takes_the_node_from_the_downward_api_and_the_pod_from_pod_name() -> None:
    environ = {**KUBE_ENVIRON, "NODE_NAME": "spot-node-7", "POD_NAME": "kv-0"}
    found = NOTHING.but(environ=environ, hostname="kv-0").detect()
    assert (found.kind, found.host, found.pod, found.container_id) == ("kubernetes", "spot-node-7", "kv-0", None)
    assert found.describe() == "kubernetes pod kv-0 (container ?) on host spot-node-7"


def test_ckpt_host_name_wins_over_node_name_and_the_hostname() -> None:
    environ = {**KUBE_ENVIRON, "NODE_NAME": "spot-node-7", "CKPT_HOST_NAME": "rack-3"}
    assert NOTHING.but(environ=environ).detect().host == "rack-3"
    assert IN_DOCKER.but(environ={"CKPT_HOST_NAME": "rack-3"}).detect().host == "rack-3"


def test_cri_o_under_kubernetes_is_kubernetes_although_it_writes_a_containerenv() -> None:
    found = IN_PODMAN.but(environ={**PODMAN_ENVIRON, **KUBE_ENVIRON}).detect()
    assert found.kind == "kubernetes"


def test_kubelet_pod_mounts_alone_name_kubernetes() -> None:
    termination_log = (f"700 690 259:1 /var/lib/kubelet/pods/{POD_UID}/containers/kv/0a1b2c3d /dev/termination-log "
                       "rw,relatime - ext4 /dev/nvme0n1p1 rw\n")
    assert NOTHING.but(mountinfo=termination_log).detect().kind == "kubernetes"


# --- unknown and the real system ------------------------------------------------------------------------------
def test_nothing_known_is_unknown_with_the_hostname_as_host() -> None:
    found = NOTHING.detect()
    assert found == Engine("unknown", None, "box")
    assert found.describe() == "an unknown engine's container ? on host box"


def test_detect_reads_this_process_without_failing() -> None:
    found = detect()
    assert found.kind in engine.KINDS and isinstance(found.evidence, tuple)
    assert engine.current() is engine.current()


# --- seccomp_fix ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "must_say"), [
    ("docker", ["--security-opt seccomp=unconfined", "security_opt: [seccomp=unconfined]",
                '"seccomp-profile": "unconfined"', "daemon.json", "Swarm"]),
    ("podman", ["podman run --security-opt seccomp=unconfined"]),
    ("kubernetes", ["seccompProfile: {type: Unconfined}"]),
    ("containerd", ["ctr run", "--seccomp"]),
])
def test_seccomp_fix_names_the_setting_of_the_engine_detected(kind: str, must_say: list[str]) -> None:
    line = seccomp_fix(Engine(kind))
    assert "\n" not in line
    for words in must_say:
        assert words in line, (words, line)


def test_seccomp_fix_for_one_engine_does_not_name_the_others() -> None:
    assert "Kubernetes" not in seccomp_fix(Engine("podman")) and "docker" not in seccomp_fix(Engine("kubernetes"))


def test_seccomp_fix_for_an_unknown_engine_lists_every_engines_setting() -> None:
    line = seccomp_fix(Engine("unknown"))
    assert "\n" not in line
    for kind in ("docker", "podman", "kubernetes", "containerd"):
        assert seccomp_fix(Engine(kind)) in line
