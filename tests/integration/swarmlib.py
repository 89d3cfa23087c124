"""A multi-node Docker Swarm on this one machine, made and unmade by a test.

Each node is a `dockerd` with a containerd of its own, both inside a network
namespace of the test's own (nslab.py), with their own data roots, sockets and
cgroup parent. The test's HTTP clients run in the hub namespace: every address
is inside those namespaces, nothing is added to the host's network, and the
main dockerd, its containers and its networks are never touched
(ENVIRONMENT.md, "Other engines and orchestrators").

    lab = SwarmLab.create(nodes=2, images=[tar])   # namespaces, engines, a swarm
    try:
        lab.manager.docker("service", "ls")
    finally:
        lab.destroy()                  # processes, mounts, cgroups, namespaces: all gone

What differs from a real cluster, and why:
- The kernel has no IPVS: no routing mesh, no virtual IPs. Services publish in
  `mode: host` and use `endpoint_mode: dnsrr`.
- Docker 20.10's Swarm has no per-service seccomp setting (`docker service
  create` has no --security-opt; `stack deploy` prints "Ignoring unsupported
  options: security_opt"), so every task would get Docker's default profile,
  under which CRIU cannot dump. Newer engines (23.0+) take
  `"seccomp-profile": "unconfined"` in daemon.json; 20.10 refuses that value.
  What reproduces it here: each dockerd's default runtime is UNCONFINED_RUNC,
  a wrapper around runc that deletes `linux.seccomp` from the OCI bundle of
  every container it creates, then runs runc. Containers that ask for a profile
  explicitly (`docker run --security-opt seccomp=...`) would lose theirs too;
  none does here.
- Every engine has the host's hostname unless told otherwise: each dockerd
  runs in a UTS namespace of its own with its node's name, so Swarm's node
  names (and the supervisor's CKPT_HOST_NAME={{.Node.Hostname}}) tell the
  nodes apart.
- Image pulls are impossible: dockerd runs with
  DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 (the variable moby's own integration
  daemons use), so tasks start from the image loaded into each engine without
  trying a registry; the namespaces have no default route either.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dockerlib import sleep_until
from nslab import LabNode, NamespaceLab, cannot_run_here, run

# runc with linux.seccomp removed from each new container's bundle: the daemon-level "unconfined" seccomp
# default of Docker >= 23 ("seccomp-profile": "unconfined" in daemon.json), which Docker 20.10 refuses.
# containerd's shim runs it as `RUNTIME [global options] create --bundle DIR ... ID` (and `run`); every
# other subcommand goes to runc unchanged.
UNCONFINED_RUNC = r'''#!/usr/bin/python3 -S
import json, os, sys
args = sys.argv[1:]
bundle = None
for index, arg in enumerate(args):
    if arg in ("--bundle", "-b") and index + 1 < len(args):
        bundle = args[index + 1]
    elif arg.startswith("--bundle="):
        bundle = arg.split("=", 1)[1]
if bundle and ("create" in args or "run" in args):
    path = os.path.join(bundle, "config.json")
    with open(path) as handle:
        spec = json.load(handle)
    if spec.get("linux", {}).pop("seccomp", None) is not None:
        with open(path + ".unconfined", "w") as handle:
            json.dump(spec, handle)
        os.rename(path + ".unconfined", path)
os.execvp("runc", ["runc"] + args)
'''
TOOLS = ("unshare", "dockerd", "containerd", "runc", "docker")


def swarm_cannot_run_here() -> str | None:
    return cannot_run_here(TOOLS)


class SwarmNode(LabNode):
    """One Swarm node: a dockerd and its containerd in the node's network namespace."""

    @property
    def socket(self) -> str:
        return f"/run/{self.name}.sock"

    @property
    def containerd_socket(self) -> str:
        return str(self.run_dir / "containerd.sock")

    def docker(self, *args: str, check: bool = True, timeout: float = 120, input_file: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """The docker CLI against this node's engine (never the main one: -H wins over DOCKER_HOST)."""
        return run(["docker", "-H", f"unix://{self.socket}", *args], check=check, timeout=timeout,
                   input_file=input_file, env=env)

    def start(self, runtime: Path, cgroup_parent: str) -> None:
        containerd_config = self.root / "containerd.toml"
        # The CRI plugin (a kubelet's endpoint) is not wanted; without `opt` set it would use /opt/containerd.
        containerd_config.write_text(
            "version = 2\n"
            f'root = "{self.root}/containerd"\n'
            f'state = "{self.run_dir}/containerd-state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.containerd_socket}"\n'
            "[ttrpc]\n"
            f'  address = "{self.containerd_socket}.ttrpc"\n'
            '[debug]\n  address = ""\n'
            '[metrics]\n  address = ""\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{self.root}/containerd-opt"\n'
        )
        daemon_config = self.root / "daemon.json"
        daemon_config.write_text(json.dumps({
            "data-root": str(self.root / "docker"),
            "exec-root": str(self.run_dir / "docker"),
            "pidfile": str(self.run_dir / "docker.pid"),
            "hosts": [f"unix://{self.socket}"],
            "containerd": self.containerd_socket,
            "cgroup-parent": f"{cgroup_parent}/{self.name}",
            # Docker's own networks inside this node's namespace, at addresses we chose.
            "bip": f"10.248.{self.address.rsplit('.', 1)[1]}.1/24",
            # Containers' (and the embedded DNS server's) resolver: this node's own address, where nothing
            # listens, so a lookup fails at once inside the lab instead of trying the host's resolvers.
            "dns": [self.address],
            "default-address-pools": [{"base": "10.249.0.0/16", "size": 24}],
            "default-runtime": "unconfined-runc",
            "runtimes": {"unconfined-runc": {"path": str(runtime)}},
            "storage-driver": "overlay2",
            "log-level": "warn",
            "features": {"buildkit": False},
        }))
        self.start_process("containerd", ["containerd", "--config", str(containerd_config)])
        sleep_until(lambda: Path(self.containerd_socket).is_socket() or self.died("containerd"), 30,
                    what=f"{self.name}'s containerd socket")
        self.assert_alive("containerd")
        # nsenter -> unshare -> sh -> exec dockerd: the Popen's pid is dockerd's own. Its own UTS namespace
        # gives the node its own hostname (Swarm's node name).
        self.start_process("dockerd", ["unshare", "--uts", "sh", "-c",
                                       'hostname "$0" && exec dockerd --config-file "$1"',
                                       self.name, str(daemon_config)],
                           env={"DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"})

    def wait_ready(self) -> None:
        sleep_until(lambda: self.died("dockerd") or self.docker("info", check=False).returncode == 0, 60,
                    interval=0.2, what=f"{self.name}'s dockerd to answer")
        self.assert_alive("dockerd")


class SwarmLab(NamespaceLab):
    kind = "swarm"
    nodes: list[SwarmNode]  # type: ignore[assignment]

    @property
    def manager(self) -> SwarmNode:
        return self.nodes[0]

    @classmethod
    def create(cls, nodes: int = 2, images: Iterable[Path] = ()) -> SwarmLab:
        """Namespaces, engines, a swarm with the first node as manager; each image tar loaded into every node."""
        lab = cls(nodes)
        try:
            lab.make_network()
            lab.nodes = [SwarmNode(**vars(node)) for node in lab.nodes]
            lab.extra_paths = [Path(node.socket) for node in lab.nodes]
            runtime = lab.directory / "unconfined-runc"
            runtime.write_text(UNCONFINED_RUNC)
            runtime.chmod(0o755)
            for node in lab.nodes:
                node.start(runtime, lab.cgroup_parent)
            for node in lab.nodes:
                node.wait_ready()
            with ThreadPoolExecutor(len(lab.nodes)) as pool:
                loads = [pool.submit(node.docker, "load", "-q", input_file=image, timeout=300)
                         for node in lab.nodes for image in images]
                for load in loads:
                    load.result()
            lab._form_swarm()
        except BaseException:
            lab.destroy()
            raise
        return lab

    def _form_swarm(self) -> None:
        manager = self.manager
        # Overlay subnets (ingress, the stack's network) from a pool of our choosing, inside the namespaces.
        manager.docker("swarm", "init", "--advertise-addr", manager.address, "--listen-addr",
                       f"{manager.address}:2377", "--default-addr-pool", "10.250.0.0/16")
        token = manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        for node in self.nodes[1:]:
            node.docker("swarm", "join", "--token", token, "--advertise-addr", node.address, "--listen-addr",
                        f"{node.address}:2377", f"{manager.address}:2377")
        sleep_until(lambda: len(self.ready_nodes()) == len(self.nodes), 60, interval=0.3,
                    what="every node to be Ready in the swarm")

    def ready_nodes(self) -> list[str]:
        listing = self.manager.docker("node", "ls", "--format", "{{.Hostname}} {{.Status}} {{.Availability}}")
        return [line.split()[0] for line in listing.stdout.splitlines() if line.split()[1:] == ["Ready", "Active"]]

    def swarm_node(self, hostname: str) -> SwarmNode:
        [node] = [node for node in self.nodes if node.name == hostname]
        return node

    def print_logs(self) -> None:
        for node in self.nodes:
            print(f"----- {node.name} dockerd log (last lines) -----\n{node.log('dockerd')}")

    def stop_engines(self) -> None:
        for node in self.nodes:
            if "dockerd" in node.processes and not node.died("dockerd"):
                # Containers first, with SIGKILL: their checkpoints are of no interest now, and a daemon
                # stopping them gracefully would wait out each one's stop grace period.
                with contextlib.suppress(Exception):
                    ids = node.docker("ps", "-aq", check=False, timeout=30).stdout.split()
                    if ids:
                        node.docker("rm", "-f", *ids, check=False, timeout=60)
        with ThreadPoolExecutor(max(1, len(self.nodes))) as pool:
            for node in self.nodes:
                pool.submit(_stop_node, self, node)


def _stop_node(lab: SwarmLab, node: SwarmNode) -> None:
    from nslab import stop_process

    stop_process(node.processes.get("dockerd"), 30)
    lab.kill_processes_naming(node.containerd_socket)  # its shims
    stop_process(node.processes.get("containerd"), 15)
