"""Network namespaces of a test's own, standing in for the machines of a cluster, and their clean-up.

A `NamespaceLab` has one "hub" namespace with a bridge, and one namespace per
node joined to it by a veth pair: nodes are SUBNET.1, .2, ...; the hub is
SUBNET.254, where the test's own HTTP clients run. Every link is created
inside those namespaces (never on the host), and there is no default route:
nothing can leave them. The engines a lab starts (swarmlib.py: dockerds;
crilib.py: containerds with their CRI plugin) run with `nsenter --net` only, so
they keep the host's mounts, cgroups and /sys, unlike `ip netns exec`.

`destroy()` undoes everything whatever state the test left: it stops the
processes the lab started (by their pid), SIGKILLs whatever is left in the
lab's cgroup parent and network namespaces, unmounts what is mounted under the
lab's directories, removes its cgroups and namespaces and deletes its files.
Nothing outside what the lab made is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUBNET = "10.247.0"  # nodes are .1, .2, ...; the hub's bridge is .254. Only inside our namespaces.
HUB_ADDRESS = f"{SUBNET}.254"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 120, input_file: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    stdin = open(input_file, "rb") if input_file else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=stdin,
                                env={**os.environ, **env} if env else None)
    finally:
        if input_file:
            stdin.close()  # type: ignore[union-attr]
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def cannot_run_here(tools: Sequence[str]) -> str | None:
    """Why a lab cannot be made on this machine, or None. Only missing tools or privileges count."""
    if os.geteuid() != 0:
        return "network namespaces and extra engines need root"
    for tool in ("ip", "nsenter", *tools):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/bootstrap.sh installs it)"
    probe = f"cs-probe-{uuid.uuid4().hex[:6]}"
    made = run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    run(["ip", "netns", "del", probe], check=False)
    return None


def in_namespace(namespace: str, argv: Sequence[str]) -> list[str]:
    """argv run in a network namespace only: mounts, cgroups and /sys stay the host's (unlike `ip netns exec`)."""
    return ["nsenter", f"--net=/run/netns/{namespace}", *argv]


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


@dataclass
class LabNode:
    name: str  # unique on this machine: the lab's prefix and the node's number
    address: str
    namespace: str
    root: Path  # on disk: data roots, logs, configuration
    run_dir: Path  # in /run: sockets, state
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_process(self, which: str, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        """`argv` in this node's namespace, its output in ROOT/WHICH.log."""
        with open(self.root / f"{which}.log", "wb") as log:
            self.processes[which] = subprocess.Popen(
                in_namespace(self.namespace, argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})})

    def died(self, which: str) -> bool:
        return self.processes[which].poll() is not None

    def assert_alive(self, which: str) -> None:
        if self.died(which):
            raise AssertionError(f"{self.name}'s {which} exited {self.processes[which].returncode}:\n"
                                 f"{self.log(which, 60)}")

    def log(self, which: str, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.root / f"{which}.log").read_text(errors="replace").splitlines()[-lines:])
        return ""


class NamespaceLab:
    """The hub and the node namespaces; subclasses start their engines in the nodes."""

    kind = "lab"

    def __init__(self, nodes: int) -> None:
        self.prefix = f"cs-{self.kind}-{uuid.uuid4().hex[:6]}"
        self.directory = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir="/var/tmp"))
        self.run_dir = Path("/run") / self.prefix
        self.hub = f"{self.prefix}-hub"
        self.nodes: list[LabNode] = []
        self._node_count = nodes
        self.extra_paths: list[Path] = []  # more paths to unmount and delete (e.g. sockets in /run)

    @property
    def cgroup_parent(self) -> str:
        """Every container the lab's engines make lives under this cgroup, in every hierarchy."""
        return f"/{self.prefix}"

    def make_network(self) -> None:
        tag = self.prefix.rsplit("-", 1)[1]
        run(["ip", "netns", "add", self.hub])
        hub = ["ip", "-n", self.hub]
        run([*hub, "link", "add", "br0", "type", "bridge"])
        run([*hub, "addr", "add", f"{HUB_ADDRESS}/24", "dev", "br0"])
        run([*hub, "link", "set", "br0", "up"])
        run([*hub, "link", "set", "lo", "up"])
        for number in range(1, self._node_count + 1):
            node = LabNode(name=f"{self.prefix}-n{number}", address=f"{SUBNET}.{number}",
                           namespace=f"{self.prefix}-n{number}", root=self.directory / f"n{number}",
                           run_dir=self.run_dir / f"n{number}")
            node.root.mkdir(parents=True)
            node.run_dir.mkdir(parents=True)
            self.nodes.append(node)
            run(["ip", "netns", "add", node.namespace])
            inside = ["ip", "-n", node.namespace]
            # Both ends are created inside the hub namespace, then one is moved: no link ever exists on the host.
            run([*hub, "link", "add", f"cs{tag}h{number}", "type", "veth", "peer", "name", "eth0",
                 "netns", node.namespace])
            run([*hub, "link", "set", f"cs{tag}h{number}", "master", "br0", "up"])
            run([*inside, "addr", "add", f"{node.address}/24", "dev", "eth0"])
            run([*inside, "link", "set", "eth0", "up"])
            run([*inside, "link", "set", "lo", "up"])

    def in_hub(self, argv: Sequence[str]) -> list[str]:
        return in_namespace(self.hub, argv)

    def node_named(self, name: str) -> LabNode:
        [node] = [node for node in self.nodes if node.name == name]
        return node

    # --- teardown -------------------------------------------------------------------------------------------
    def stop_engines(self) -> None:
        """Subclasses: stop what runs in the nodes, gracefully where it matters. Errors are ignored."""

    def destroy(self) -> None:
        """Everything the lab made, in order; each step runs even if an earlier one failed."""
        with contextlib.suppress(Exception):
            self.stop_engines()
        for node in self.nodes:
            for process in node.processes.values():
                stop_process(process, 30)
        self._kill_cgroup()
        self._kill_namespace_members()
        self._unmount_everything_under([self.directory, self.run_dir, *self.extra_paths])
        self._remove_cgroup()
        for node in self.nodes:
            run(["ip", "netns", "del", node.namespace], check=False)
        run(["ip", "netns", "del", self.hub], check=False)
        for path in self.extra_paths:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                path.unlink()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.directory, ignore_errors=True)

    def kill_processes_naming(self, needle: str) -> None:
        """SIGKILL processes whose command line contains `needle` (e.g. our containerd's socket, in its shims)."""
        for pid in pids():
            with contextlib.suppress(OSError):
                if needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                    os.kill(pid, signal.SIGKILL)

    def _kill_cgroup(self) -> None:
        """SIGKILL every process left in the lab's cgroup parent (the containers), in any hierarchy."""
        for _ in range(50):
            found = set()
            for procs in CGROUP_ROOT.glob(f"*{self.cgroup_parent}/**/cgroup.procs"):
                with contextlib.suppress(OSError):
                    found |= {int(pid) for pid in procs.read_text().split()}
            if not found:
                return
            for pid in found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def _kill_namespace_members(self) -> None:
        """Any process still in one of our network namespaces (a shim, docker-proxy, a prober)."""
        ours = set()
        for namespace in [self.hub, *(node.namespace for node in self.nodes)]:
            with contextlib.suppress(OSError):
                ours.add(os.stat(f"/run/netns/{namespace}").st_ino)
        for pid in pids():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/ns/net").st_ino in ours and pid != os.getpid():
                    os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _unmount_everything_under(paths: list[Path]) -> None:
        prefixes = [str(path) for path in paths]
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if any(point == prefix or point.startswith(prefix + "/") for prefix in prefixes):
                mounts.append(point)
        for point in sorted(mounts, key=len, reverse=True):
            run(["umount", "-l", point], check=False)

    def _remove_cgroup(self) -> None:
        for hierarchy in CGROUP_ROOT.iterdir():
            top = hierarchy / self.cgroup_parent.lstrip("/")
            if not top.is_dir():
                continue
            for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                    reverse=True):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


# --- an HTTP client that watches a service from the hub ---------------------------------------------------------
# Runs inside the hub namespace: asks every target in turn (host:port, from the command line or, when it starts
# with @, re-read from that file each round), until its deadline, and prints one JSON line per answer:
# {"t": CLOCK_MONOTONIC (the same clock in every process), "target", "body"}. Failures print nothing: downtime
# is the gap between answers. Bounded: it stops by itself after SECONDS.
POLLER = r'''
import json, sys, time, urllib.request
spec, path, seconds, interval = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    targets = (open(spec[1:]).read() if spec.startswith("@") else spec).replace(",", " ").split()
    for target in targets:
        try:
            body = urllib.request.urlopen(f"http://{target}{path}", timeout=0.5).read().decode()
        except Exception:
            continue
        print(json.dumps({"t": time.monotonic(), "target": target, "body": body}), flush=True)
    time.sleep(interval)
'''


class Poller:
    """POLLER as a background process in `namespace`; `answers()` parses what it printed so far."""

    def __init__(self, namespace: str, targets: Sequence[str] | Path, directory: Path, path: str,
                 seconds: float = 240, interval: float = 0.05) -> None:
        self.output = directory / f"poller-{uuid.uuid4().hex[:6]}.jsonl"
        spec = f"@{targets}" if isinstance(targets, Path) else ",".join(targets)
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(
                in_namespace(namespace, [sys.executable, "-c", POLLER, spec, path, str(seconds), str(interval)]),
                stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def answers(self) -> list[dict[str, Any]]:
        lines = self.output.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def stop(self) -> None:
        stop_process(self.process, 5)


@dataclass(frozen=True)
class Outage:
    last_before: dict[str, Any]  # the old target's last answer
    first_after: dict[str, Any]  # the new target's first answer

    @property
    def seconds(self) -> float:
        return float(self.first_after["t"] - self.last_before["t"])


def outage(answers: list[dict[str, Any]], old_target: str, new_target: str) -> Outage:
    """The gap between the old target's last answer and the new target's first one after it."""
    old = [answer for answer in answers if answer["target"] == old_target]
    assert old, f"no answer from {old_target} at all"
    last_before = old[-1]
    new = [answer for answer in answers if answer["target"] == new_target and answer["t"] > last_before["t"]]
    assert new, f"no answer from {new_target} after the last one from {old_target}"
    return Outage(last_before, new[0])
