"""Kubernetes nodes as far as a container sees them: containerd's CRI plugin, driven as a kubelet drives it.

No kubelet or API server can run here (ENVIRONMENT.md), but the kubelet's part
of a drain is a short list of CRI calls, and containerd's CRI plugin is what
runs pods on most clusters. A `KubeLab` has two such "nodes": each a containerd
with its CRI plugin (its own root, state, socket and runc root) in a network
namespace of the test's own (nslab.py), with pod networking by the standard
CNI bridge and host-local plugins (containernetworking-plugins, as packaged)
and no route out. `CriNode` makes the calls the kubelet would for a pod of a
Deployment manifest (`PodSpec`): RunPodSandbox, CreateContainer (env with the
downward API and service links as the kubelet computes them, mounts,
securityContext, resources, the kubelet's default masked and read-only /proc
paths), StartContainer, the preStop sleep, then StopContainer with what is
left of the grace period. Its probes are those of the manifest, run from the
node's namespace (where a kubelet's prober runs) against the pod's IP on the
kubelet's schedule (PROBER).

What is not replayed: the API server, scheduler, controllers and kube-proxy
(their part is reduced to "the replacement pod is created when the old one is
deleted, on the other node", which is what a ReplicaSet and a cordoned node
give); image pulls (the image is imported; the manifest's placeholder digest is
replaced by the local image); service-account tokens (the manifest turns them
off); the Secret volume's content (it is optional and absent, so an empty
directory, as the kubelet mounts it).

The CRI messages are declared here, only the fields used, from the published
CRI API (k8s.io/cri-api, runtime.v1): protobuf needs names, numbers and types,
not the .proto file, which is not packaged here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dockerlib import sleep_until
from nslab import LabNode, NamespaceLab, cannot_run_here, in_namespace, run, stop_process

TOOLS = ("containerd", "ctr", "runc", "catatonit")
CNI_BIN = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
POD_SUBNET = "10.244.{}.0/24"  # node N's pods; routed from the hub through node N
PAUSE_IMAGE = "docker.io/library/cs-k8s-pause:1"
K8S_NAMESPACE = "k8s.io"  # containerd namespace of the CRI plugin

# --- the CRI API, the part a kubelet uses for one pod ---------------------------------------------------------
# "Message: field=NUMBER TYPE" (a trailing * marks a repeated field). Numbers and types as in runtime.v1.
ENUMS = {
    "NamespaceMode": ["POD", "CONTAINER", "NODE", "TARGET"],
    "ProfileType": ["RuntimeDefault", "Unconfined", "Localhost"],  # SecurityProfile.ProfileType
    "MountPropagation": ["PROPAGATION_PRIVATE", "PROPAGATION_HOST_TO_CONTAINER", "PROPAGATION_BIDIRECTIONAL"],
    "ContainerState": ["CONTAINER_CREATED", "CONTAINER_RUNNING", "CONTAINER_EXITED", "CONTAINER_UNKNOWN"],
    "PodSandboxState": ["SANDBOX_READY", "SANDBOX_NOTREADY"],
}
MESSAGES = """
VersionRequest: version=1 string
VersionResponse: version=1 string; runtime_name=2 string; runtime_version=3 string; runtime_api_version=4 string
PodSandboxMetadata: name=1 string; uid=2 string; namespace=3 string; attempt=4 uint32
DNSConfig: servers=1 string*; searches=2 string*; options=3 string*
NamespaceOption: network=1 NamespaceMode; pid=2 NamespaceMode; ipc=3 NamespaceMode; target_id=4 string
SecurityProfile: profile_type=1 ProfileType; localhost_ref=2 string
LinuxSandboxSecurityContext: namespace_options=1 NamespaceOption; privileged=6 bool; seccomp=9 SecurityProfile; \
apparmor=10 SecurityProfile
LinuxPodSandboxConfig: cgroup_parent=1 string; security_context=2 LinuxSandboxSecurityContext
PodSandboxConfig: metadata=1 PodSandboxMetadata; hostname=2 string; log_directory=3 string; \
dns_config=4 DNSConfig; linux=8 LinuxPodSandboxConfig
RunPodSandboxRequest: config=1 PodSandboxConfig; runtime_handler=2 string
RunPodSandboxResponse: pod_sandbox_id=1 string
StopPodSandboxRequest: pod_sandbox_id=1 string
StopPodSandboxResponse:
RemovePodSandboxRequest: pod_sandbox_id=1 string
RemovePodSandboxResponse:
PodSandboxNetworkStatus: ip=1 string
PodSandboxStatus: id=1 string; state=3 PodSandboxState; network=5 PodSandboxNetworkStatus
PodSandboxStatusRequest: pod_sandbox_id=1 string; verbose=2 bool
PodSandboxStatusResponse: status=1 PodSandboxStatus
ImageSpec: image=1 string
KeyValue: key=1 string; value=2 string
Mount: container_path=1 string; host_path=2 string; readonly=3 bool; selinux_relabel=4 bool; \
propagation=5 MountPropagation
ContainerMetadata: name=1 string; attempt=2 uint32
LinuxContainerResources: cpu_period=1 int64; cpu_quota=2 int64; cpu_shares=3 int64; \
memory_limit_in_bytes=4 int64; oom_score_adj=5 int64
Capability: add_capabilities=1 string*; drop_capabilities=2 string*
LinuxContainerSecurityContext: capabilities=1 Capability; privileged=2 bool; namespace_options=3 NamespaceOption; \
readonly_rootfs=7 bool; no_new_privs=11 bool; masked_paths=13 string*; readonly_paths=14 string*; \
seccomp=15 SecurityProfile; apparmor=16 SecurityProfile
LinuxContainerConfig: resources=1 LinuxContainerResources; security_context=2 LinuxContainerSecurityContext
ContainerConfig: metadata=1 ContainerMetadata; image=2 ImageSpec; command=3 string*; args=4 string*; \
working_dir=5 string; envs=6 KeyValue*; mounts=7 Mount*; log_path=11 string; stdin=12 bool; tty=14 bool; \
linux=15 LinuxContainerConfig
CreateContainerRequest: pod_sandbox_id=1 string; config=2 ContainerConfig; sandbox_config=3 PodSandboxConfig
CreateContainerResponse: container_id=1 string
StartContainerRequest: container_id=1 string
StartContainerResponse:
StopContainerRequest: container_id=1 string; timeout=2 int64
StopContainerResponse:
RemoveContainerRequest: container_id=1 string
RemoveContainerResponse:
ContainerStatus: id=1 string; state=3 ContainerState; created_at=4 int64; started_at=5 int64; \
finished_at=6 int64; exit_code=7 int32; image_ref=9 string; reason=10 string; message=11 string; log_path=15 string
ContainerStatusRequest: container_id=1 string; verbose=2 bool
ContainerStatusResponse: status=1 ContainerStatus
ExecSyncRequest: container_id=1 string; cmd=2 string*; timeout=3 int64
ExecSyncResponse: stdout=1 bytes; stderr=2 bytes; exit_code=3 int32
"""
RUNTIME_METHODS = ("Version", "RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "PodSandboxStatus",
                   "CreateContainer", "StartContainer", "StopContainer", "RemoveContainer", "ContainerStatus",
                   "ExecSync")
_SCALARS = {"string": 9, "bool": 8, "int64": 3, "int32": 5, "uint32": 13, "bytes": 12}  # FieldDescriptorProto


def _message_classes() -> dict[str, Any]:
    """Message classes built from MESSAGES at run time: no protoc, no generated code."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FileDescriptorProto(name="cs_cri_subset.proto", package="runtime.v1", syntax="proto3")
    for name, values in ENUMS.items():
        enum = proto.enum_type.add(name=name)
        for number, value in enumerate(values):
            enum.value.add(name=f"{name}_{value}", number=number)  # proto3 enum values share one scope
    for line in MESSAGES.replace("\\\n", "").strip().splitlines():
        name, _, fields = line.partition(":")
        message = proto.message_type.add(name=name.strip())
        for spec in filter(None, (part.strip() for part in fields.split(";"))):
            field_name, _, rest = spec.partition("=")
            field_number, kind = rest.split()
            repeated = kind.endswith("*")
            kind = kind.rstrip("*")
            entry = message.field.add(name=field_name, number=int(field_number), label=3 if repeated else 1)
            if kind in _SCALARS:
                entry.type = _SCALARS[kind]  # type: ignore[assignment]
            else:
                entry.type = 14 if kind in ENUMS else 11  # type: ignore[assignment]
                entry.type_name = f".runtime.v1.{kind}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    # GetMessageClass since protobuf 4.21; GetPrototype before (removed in 5.x).
    make = getattr(message_factory, "GetMessageClass", None) or message_factory.MessageFactory(pool).GetPrototype
    return {message.name: make(pool.FindMessageTypeByName(f"runtime.v1.{message.name}"))
            for message in proto.message_type}


def enum_value(enum: str, value: str) -> int:
    return ENUMS[enum].index(value)


class Cri:
    """A CRI client on one containerd socket: `cri.call("RunPodSandbox", config=...)` returns the response."""

    def __init__(self, socket: str) -> None:
        import grpc

        self.messages = _message_classes()
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self._methods = {
            method: self.channel.unary_unary(
                f"/runtime.v1.RuntimeService/{method}",
                request_serializer=self.messages[f"{method}Request"].SerializeToString,
                response_deserializer=self.messages[f"{method}Response"].FromString)
            for method in RUNTIME_METHODS
        }

    def message(self, message_type: str, /, **fields: Any) -> Any:
        return self.messages[message_type](**fields)

    def call(self, method: str, deadline: float = 120, **fields: Any) -> Any:
        """One RPC; `deadline` is gRPC's (seconds), the fields are the request's."""
        return self._methods[method](self.message(f"{method}Request", **fields), timeout=deadline)

    def close(self) -> None:
        self.channel.close()


# --- the pause image -----------------------------------------------------------------------------------------
def pause_image_archive(destination: Path) -> Path:
    """A docker-archive image whose only file is /pause, catatonit in pause mode (Podman's own pause process).

    The CRI plugin starts each pod's sandbox from its sandbox_image; registry.k8s.io/pause cannot be pulled here.
    catatonit is statically linked, so one file is the whole image.
    """
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as archive:
        archive.add(os.path.realpath("/usr/bin/catatonit"), arcname="pause")
    layer_bytes = layer.getvalue()
    import hashlib

    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Entrypoint": ["/pause", "-P"]},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": [PAUSE_IMAGE.split("/", 2)[2]],
                            "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(destination, "w") as archive:
        for name, data in (("layer.tar", layer_bytes), ("config.json", config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return destination


# --- a pod, as the kubelet turns a PodSpec into CRI requests ----------------------------------------------------
# pkg/kubelet/kuberuntime's defaults for a container that is not privileged (procMount Default).
DEFAULT_MASKED_PATHS = ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                        "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                        "/sys/devices/virtual/powercap"]
DEFAULT_READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
# The `kubernetes` Service of the default namespace: its variables are set in every container.
KUBERNETES_SERVICE = {"metadata": {"name": "kubernetes"}, "spec": {"clusterIP": "10.96.0.1",
                                                                   "ports": [{"name": "https", "port": 443}]}}
CLUSTER_IPS = "10.96.0.{}"


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    """The variables the kubelet sets for one Service (pkg/kubelet/envvars.FromServices)."""
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    ip = service["spec"]["clusterIP"]
    ports = service["spec"]["ports"]
    env = {f"{prefix}_SERVICE_HOST": ip, f"{prefix}_SERVICE_PORT": str(ports[0]["port"])}
    for port in ports:
        if port.get("name"):
            env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
    first = ports[0]
    env[f"{prefix}_PORT"] = f"{first.get('protocol', 'TCP').lower()}://{ip}:{first['port']}"
    for port in ports:
        protocol = port.get("protocol", "TCP")
        base = f"{prefix}_PORT_{port['port']}_{protocol}"
        env.update({base: f"{protocol.lower()}://{ip}:{port['port']}", f"{base}_PROTO": protocol.lower(),
                    f"{base}_PORT": str(port["port"]), f"{base}_ADDR": ip})
    return env


def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("512Mi", "1", "100m") as a number."""
    text = str(value)
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("m", 1e-3)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@dataclass
class PodSpec:
    """The Deployment's pod template, with what a test node substitutes for the cluster."""

    template: dict[str, Any]
    services: list[dict[str, Any]]  # the Services of the namespace, for service links
    image: str  # the local image standing in for the manifest's digest
    claim_directory: Path  # what the PersistentVolumeClaim mounts

    @property
    def spec(self) -> dict[str, Any]:
        return self.template["spec"]

    @property
    def container(self) -> dict[str, Any]:
        [container] = self.spec["containers"]
        return container

    def port(self, name_or_number: str | int) -> int:
        if isinstance(name_or_number, int):
            return name_or_number
        [number] = [p["containerPort"] for p in self.container["ports"] if p.get("name") == name_or_number]
        return int(number)

    def environment(self, node_name: str, pod_name: str) -> dict[str, str]:
        """The container's environment as the kubelet makes it: service links first, then the container's env."""
        env: dict[str, str] = {}
        services = [KUBERNETES_SERVICE]
        if self.spec.get("enableServiceLinks", True):
            services += [{**s, "spec": {**s["spec"], "clusterIP": CLUSTER_IPS.format(10 + i)}}
                         for i, s in enumerate(self.services)]
        for service in services:
            env.update(service_environment(service))
        fields = {"spec.nodeName": node_name, "metadata.name": pod_name, "metadata.namespace": "kv"}
        for variable in self.container.get("env", []):
            if "value" in variable:
                env[variable["name"]] = variable["value"]
            elif "fieldRef" in variable.get("valueFrom", {}):
                env[variable["name"]] = fields[variable["valueFrom"]["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in variable.get("valueFrom", {}):
                # The Secret does not exist: the kubelet omits an optional key and refuses a required one.
                assert variable["valueFrom"]["secretKeyRef"].get("optional"), f"{variable['name']} needs a Secret"
        return env

    def mounts(self, pod_directory: Path) -> list[dict[str, Any]]:
        volumes = {volume["name"]: volume for volume in self.spec["volumes"]}
        mounts = []
        for mount in self.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                host = self.claim_directory
            else:  # the optional, absent Secret: an empty directory
                host = pod_directory / "volumes" / mount["name"]
                host.mkdir(parents=True, exist_ok=True)
            mounts.append({"container_path": mount["mountPath"], "host_path": str(host),
                           "readonly": bool(mount.get("readOnly"))})
        return mounts

    def resources(self) -> dict[str, int]:
        """The kubelet's cgroup settings for the container's limits and requests (Guaranteed QoS)."""
        limits = self.container["resources"]["limits"]
        requests = self.container["resources"].get("requests", limits)
        guaranteed = requests == limits
        return {"cpu_period": 100000, "cpu_quota": int(quantity(limits["cpu"]) * 100000),
                "cpu_shares": int(quantity(requests["cpu"]) * 1024),
                "memory_limit_in_bytes": int(quantity(limits["memory"])),
                "oom_score_adj": -997 if guaranteed else 0}

    def probes(self) -> dict[str, dict[str, Any]]:
        """The container's probes with their ports as numbers, for PROBER."""
        probes = {}
        for kind in ("startup", "readiness", "liveness"):
            probe = self.container.get(f"{kind}Probe")
            if probe:
                probes[kind] = {**probe, "httpGet": {**probe["httpGet"], "port": self.port(probe["httpGet"]["port"])}}
        return probes


# Runs in a node's namespace, where the kubelet's prober runs, against the pod's IP. Each probe on its own
# schedule from the container's start (pkg/kubelet/prober/worker.go): every periodSeconds after
# initialDelaySeconds; readiness and liveness are skipped until the startup probe has succeeded, which then
# stops. One JSON line per result: {"t" (CLOCK_MONOTONIC), "probe", "ok"}. Bounded by its deadline.
PROBER = r'''
import json, sys, threading, time, urllib.request
probes, ip, deadline = json.loads(sys.argv[1]), sys.argv[2], time.monotonic() + float(sys.argv[3])
started = threading.Event()
if "startup" not in probes:
    started.set()
lock = threading.Lock()
def run(kind, probe):
    period, timeout = probe.get("periodSeconds", 10), probe.get("timeoutSeconds", 1)
    url = f"http://{ip}:{probe['httpGet']['port']}{probe['httpGet'].get('path', '/')}"
    due = time.monotonic() + probe.get("initialDelaySeconds", 0)
    while time.monotonic() < deadline:
        time.sleep(max(0.0, due - time.monotonic()))
        due += period
        if kind != "startup" and not started.is_set():
            continue
        try:
            ok = 200 <= urllib.request.urlopen(url, timeout=timeout).status < 400
        except Exception:
            ok = False
        with lock:
            print(json.dumps({"t": time.monotonic(), "probe": kind, "ok": ok}), flush=True)
        if kind == "startup" and ok:
            started.set()
            return
threads = [threading.Thread(target=run, args=item, daemon=True) for item in probes.items()]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(max(0.0, deadline - time.monotonic()))
'''


@dataclass
class Pod:
    node: CriNode
    name: str
    uid: str
    sandbox_id: str
    sandbox_config: Any
    ip: str
    directory: Path
    container_id: str = ""
    started: float = 0.0  # CLOCK_MONOTONIC of StartContainer's return
    prober: subprocess.Popen[bytes] | None = None
    probe_log: Path | None = None

    def status(self) -> Any:
        return self.node.cri.call("ContainerStatus", container_id=self.container_id).status

    def running(self) -> bool:
        return self.status().state == enum_value("ContainerState", "CONTAINER_RUNNING")

    def exec(self, *argv: str, timeout: int = 30) -> tuple[int, str, str]:
        response = self.node.cri.call("ExecSync", deadline=timeout + 10, container_id=self.container_id,
                                      cmd=list(argv), timeout=timeout)
        return response.exit_code, response.stdout.decode(errors="replace"), response.stderr.decode(errors="replace")

    def logs(self) -> str:
        """The container's output, from its CRI log file ("TIME STREAM TAG TEXT" lines)."""
        path = self.directory / "logs" / "kv" / "0.log"
        with contextlib.suppress(OSError):
            return "\n".join(line.split(" ", 3)[-1] for line in path.read_text(errors="replace").splitlines())
        return ""

    def probe_results(self) -> list[dict[str, Any]]:
        if self.probe_log is None or not self.probe_log.exists():
            return []
        return [json.loads(line) for line in self.probe_log.read_text().splitlines() if line.endswith("}")]

    def first(self, probe: str, ok: bool = True) -> dict[str, Any] | None:
        return next((r for r in self.probe_results() if r["probe"] == probe and r["ok"] is ok), None)

    def stop_probing(self) -> None:
        stop_process(self.prober, 5)


class CriNode(LabNode):
    cri: Cri
    pods: list[Pod]  # the pods it runs, removed at teardown

    @property
    def socket(self) -> str:
        return str(self.run_dir / "containerd.sock")

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(["ctr", "--address", self.socket, "-n", K8S_NAMESPACE, *args], timeout=timeout)

    def start(self, number: int) -> None:
        cni = self.root / "cni"
        cni.mkdir()
        (cni / "10-pods.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "cs-pods",
            "plugins": [{"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET.format(number)}]],
                                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.root / "cni-ipam")}}],
        }))
        config = self.root / "containerd.toml"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config.write_text(
            "version = 2\n"
            f'root = "{self.root}/containerd"\n'
            f'state = "{self.run_dir}/containerd-state"\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
            '[debug]\n  address = ""\n'
            '[metrics]\n  address = ""\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{self.root}/containerd-opt"\n'
            f"[{cri}]\n"
            f'  sandbox_image = "{PAUSE_IMAGE}"\n'
            "  disable_apparmor = true\n"  # this host has no AppArmor
            # This machine cannot lower oom_score_adj (no CAP_SYS_RESOURCE in its bounding set): the kubelet's
            # -998 (sandbox) and -997 (Guaranteed) become containerd's own value, as on rootless nodes.
            "  restrict_oom_score_adj = true\n"
            '  stream_server_address = "127.0.0.1"\n'
            f"[{cri}.containerd]\n"
            '  snapshotter = "overlayfs"\n'
            '  default_runtime_name = "runc"\n'
            f"[{cri}.containerd.runtimes.runc]\n"
            '  runtime_type = "io.containerd.runc.v2"\n'
            f"[{cri}.containerd.runtimes.runc.options]\n"
            f'  Root = "{self.run_dir}/runc"\n'
            "  SystemdCgroup = false\n"
            f"[{cri}.cni]\n"
            f'  bin_dir = "{CNI_BIN}"\n'
            f'  conf_dir = "{cni}"\n'
            "  max_conf_num = 1\n"
        )
        # Pods reach the hub through the node: forward between cni0 and eth0 in this namespace only.
        run(in_namespace(self.namespace, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))
        self.start_process("containerd", ["containerd", "--config", str(config)])
        sleep_until(lambda: Path(self.socket).is_socket() or self.died("containerd"), 30,
                    what=f"{self.name}'s containerd socket")
        self.assert_alive("containerd")
        self.cri = Cri(self.socket)
        sleep_until(lambda: self._answers(), 30, interval=0.2, what=f"{self.name}'s CRI plugin")

    def _answers(self) -> bool:
        self.assert_alive("containerd")
        try:
            return bool(self.cri.call("Version", deadline=5, version="v1").runtime_api_version)
        except Exception:
            return False

    # --- the kubelet's calls -------------------------------------------------------------------------------
    def run_pod(self, pod: PodSpec, name: str, cgroup_parent: str) -> Pod:
        """RunPodSandbox, CreateContainer, StartContainer; then the prober."""
        uid = str(uuid.uuid4())
        directory = self.root / "pods" / uid
        (directory / "logs").mkdir(parents=True)
        message = self.cri.message
        namespaces = message("NamespaceOption", network=enum_value("NamespaceMode", "POD"),
                             pid=enum_value("NamespaceMode", "CONTAINER"), ipc=enum_value("NamespaceMode", "POD"))
        sandbox_config = message(
            "PodSandboxConfig",
            metadata=message("PodSandboxMetadata", name=name, uid=uid, namespace="kv", attempt=0),
            hostname=name, log_directory=str(directory / "logs"),
            # dnsPolicy ClusterFirst gives pods the cluster's DNS service; there is none here. The node's own
            # address stands in: nothing listens there, so every lookup fails at once, inside the lab (the
            # host's resolv.conf names a server outside it, which must never be asked).
            dns_config=message("DNSConfig", servers=[self.address],
                               searches=["kv.svc.cluster.local", "svc.cluster.local", "cluster.local"],
                               options=["ndots:5"]),
            linux=message("LinuxPodSandboxConfig", cgroup_parent=f"{cgroup_parent}/kubepods/pod{uid}",
                          security_context=message("LinuxSandboxSecurityContext", namespace_options=namespaces,
                                                   seccomp=message("SecurityProfile", profile_type=0))))
        sandbox_id = self.cri.call("RunPodSandbox", config=sandbox_config).pod_sandbox_id
        status = self.cri.call("PodSandboxStatus", pod_sandbox_id=sandbox_id).status
        running = Pod(self, name, uid, sandbox_id, sandbox_config, status.network.ip, directory)
        self.pods.append(running)

        container = pod.container
        security = container.get("securityContext", {})
        profile = {"Unconfined": 1, "RuntimeDefault": 0, "Localhost": 2}
        config = message(
            "ContainerConfig",
            metadata=message("ContainerMetadata", name=container["name"], attempt=0),
            image=message("ImageSpec", image=pod.image),
            envs=[message("KeyValue", key=k, value=v) for k, v in pod.environment(self.name, name).items()],
            mounts=[message("Mount", **mount) for mount in pod.mounts(directory)],
            log_path=f"{container['name']}/0.log",
            linux=message("LinuxContainerConfig",
                          resources=message("LinuxContainerResources", **pod.resources()),
                          security_context=message(
                              "LinuxContainerSecurityContext",
                              capabilities=message("Capability", add_capabilities=security["capabilities"]["add"]),
                              privileged=bool(security.get("privileged")), namespace_options=namespaces,
                              masked_paths=DEFAULT_MASKED_PATHS, readonly_paths=DEFAULT_READONLY_PATHS,
                              seccomp=message("SecurityProfile",
                                              profile_type=profile[security["seccompProfile"]["type"]]),
                              apparmor=message("SecurityProfile",
                                               profile_type=profile[security["appArmorProfile"]["type"]]))))
        running.container_id = self.cri.call("CreateContainer", pod_sandbox_id=sandbox_id, config=config,
                                             sandbox_config=sandbox_config).container_id
        self.cri.call("StartContainer", container_id=running.container_id)
        running.started = time.monotonic()
        running.probe_log = directory / "probes.jsonl"
        with open(running.probe_log, "wb") as out:
            running.prober = subprocess.Popen(
                in_namespace(self.namespace, [sys.executable, "-c", PROBER, json.dumps(pod.probes()), running.ip,
                                              "600"]),
                stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        return running

    def kill_pod(self, pod: Pod, spec: PodSpec) -> float:
        """The kubelet's pod deletion: preStop, then StopContainer with what is left of the grace period.

        Returns CLOCK_MONOTONIC of the SIGTERM (StopContainer's call)."""
        deleted = time.monotonic()
        grace = spec.spec.get("terminationGracePeriodSeconds", 30)
        pre_stop = spec.container.get("lifecycle", {}).get("preStop", {})
        if "sleep" in pre_stop:
            time.sleep(pre_stop["sleep"]["seconds"])  # the kubelet sleeps itself: no process in the container
        # pkg/kubelet/kuberuntime killContainer: at least 2 s are left for the stop, whatever preStop took.
        remaining = max(2, int(grace - (time.monotonic() - deleted)))
        terminated = time.monotonic()
        self.cri.call("StopContainer", deadline=remaining + 30, container_id=pod.container_id, timeout=remaining)
        pod.stop_probing()
        return terminated

    def remove_pod(self, pod: Pod) -> None:
        pod.stop_probing()
        with contextlib.suppress(Exception):
            self.cri.call("StopPodSandbox", pod_sandbox_id=pod.sandbox_id)
        with contextlib.suppress(Exception):
            self.cri.call("RemovePodSandbox", pod_sandbox_id=pod.sandbox_id)
        if pod in self.pods:
            self.pods.remove(pod)


class KubeLab(NamespaceLab):
    kind = "k8s"
    nodes: list[CriNode]  # type: ignore[assignment]

    @classmethod
    def create(cls, images: Iterable[Path], nodes: int = 2) -> KubeLab:
        lab = cls(nodes)
        try:
            lab.make_network()
            lab.nodes = [CriNode(**vars(node)) for node in lab.nodes]
            for number, node in enumerate(lab.nodes, start=1):
                node.pods = []
                node.start(number)
                run(["ip", "-n", lab.hub, "route", "add", POD_SUBNET.format(number), "via", node.address])
            pause = pause_image_archive(lab.directory / "pause.tar")
            with ThreadPoolExecutor(len(lab.nodes)) as pool:
                for done in [pool.submit(node.ctr, "images", "import", str(image))
                             for node in lab.nodes for image in [pause, *images]]:
                    done.result()
        except BaseException:
            lab.destroy()
            raise
        return lab

    def stop_engines(self) -> None:
        for node in self.nodes:
            for pod in list(getattr(node, "pods", [])):
                node.remove_pod(pod)
        for node in self.nodes:
            stop_process(node.processes.get("containerd"), 15)
            self.kill_processes_naming(node.socket)  # the shims
            with contextlib.suppress(Exception):
                node.cri.close()


def kube_cannot_run_here() -> str | None:
    reason = cannot_run_here(TOOLS)
    if reason is None and not (CNI_BIN / "bridge").exists():
        reason = f"no CNI plugins in {CNI_BIN} (Debian's containernetworking-plugins, a dependency of docker.io)"
    return reason


def in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls at once, as two kubelets would; their results in order (the first error is raised)."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def wrap(index: int, call: Callable[[], Any]) -> None:
        try:
            results[index] = call()
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    threads = [threading.Thread(target=wrap, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results

