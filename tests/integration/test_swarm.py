"""A real Docker Swarm moves the app, state and all: a node drain and a start-first update.

Two Docker engines, each in a network namespace of this test's own with its own
data root (swarmlib.py), form a swarm; one host directory, bind-mounted on both
nodes, stands in for the NFS export. compose/swarm/docker-stack.yml is deployed
as shipped, with only its volume swapped for that directory (this kernel has no
NFS client). The kv example's state (a key and a counter) is put and read over
HTTP from the hub namespace, through the port each node publishes.

- A drain: Swarm stops the task (SIGTERM, final checkpoint, exit 0) and starts
  its replacement on the other node only after that (swarmkit's restart
  supervisor waits for the old task to stop), so the lease is free when the
  replacement starts.
- A start-first update: the new task starts while the old one runs, finds the
  lease held, waits; Swarm then stops the old one, and the new one restores
  its final checkpoint. This is the handoff the lease wait exists for.

Both measure downtime as the clients see it: from the old node's last answer to
the new node's first, polled every 50 ms (docs/spot-nodes.md reports the
figures). Seccomp: each dockerd runs every container through swarmlib's
UNCONFINED_RUNC (see there), which reproduces the `"seccomp-profile":
"unconfined"` daemon default of Docker >= 23; the first test checks that the
task has no seccomp filter and that a container run with plain runc on the
same engine does (Docker's default profile), so the setting is what makes the
difference.

The lab takes about 20 s to make and 5 s to unmake; each test about 10 s.
Skipped only when this machine cannot make network namespaces or lacks the
engines (swarmlib.swarm_cannot_run_here).
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dockerlib import KV_IMAGE, docker, sleep_until
from nslab import Outage, Poller, outage
from swarmlib import SwarmLab, SwarmNode, swarm_cannot_run_here

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
STACK_FILE = REPO / "compose" / "swarm" / "docker-stack.yml"
PORT = 8080


@pytest.fixture(scope="module")
def lab() -> Iterator[SwarmLab]:
    reason = swarm_cannot_run_here()
    if reason:
        pytest.skip(f"no multi-node swarm on this machine: {reason}")
    # One snapshot of the image, taken now: other work may rebuild it in the main engine meanwhile.
    with tempfile.TemporaryDirectory(prefix="cs-swarm-image-", dir="/var/tmp") as scratch:
        image = Path(scratch) / "kv.tar"
        docker("save", "-o", str(image), KV_IMAGE, timeout=300)
        made = SwarmLab.create(nodes=2, images=[image])
    try:
        for node in made.nodes:
            # The stack runs only where the daemon has the unconfined seccomp default (see its placement).
            made.manager.docker("node", "update", "--label-add", "criu=true", node.name)
        yield made
    finally:
        made.destroy()


@dataclass
class Stack:
    """One deployment of STACK_FILE on the lab, with its own checkpoint directory."""

    lab: SwarmLab
    name: str
    checkpoints: Path

    @property
    def service(self) -> str:
        return f"{self.name}_kv"

    def deploy(self) -> None:
        override = self.lab.directory / f"{self.name}-volume.yml"
        # The shipped file with one change: a bind mount of the shared directory instead of NFS.
        override.write_text(yaml.safe_dump({"version": "3.9", "volumes": {"checkpoints": {"driver_opts": {
            "type": "none", "o": "bind", "device": str(self.checkpoints)}}}}))
        result = self.lab.manager.docker("stack", "deploy", "--resolve-image", "never", "--detach=true",
                                         "-c", str(STACK_FILE), "-c", str(override), self.name,
                                         env={"NFS_SERVER": "192.0.2.10"})
        # The stack file must not rely on what Swarm silently drops.
        assert "Ignoring unsupported options" not in result.stdout + result.stderr, result.stderr

    def task_node(self, timeout: float = 90) -> SwarmNode:
        """The node whose task is running and answers HTTP."""
        def running() -> str | None:
            listing = self.lab.manager.docker("service", "ps", "--filter", "desired-state=running", "--format",
                                              "{{.Node}}\t{{.CurrentState}}", self.service).stdout.splitlines()
            for line in listing:
                node, state = line.split("\t")
                if state.startswith("Running") and self.answers(self.lab.swarm_node(node)):
                    return node
            return None

        return self.lab.swarm_node(sleep_until(running, timeout, interval=0.3, what=f"{self.service} to answer"))

    def answers(self, node: SwarmNode) -> bool:
        return self.http(node, "GET", "/health", check=False) == "ok"

    def http(self, node: SwarmNode, method: str, path: str, body: str | None = None, check: bool = True) -> str:
        """One request from the hub to `node`'s published port."""
        client = (
            "import sys, urllib.request as u\n"
            "method, path, target = sys.argv[1:4]\n"
            "data = sys.argv[4].encode() if len(sys.argv) > 4 else (None if method == 'GET' else b'')\n"
            "request = u.Request(f'http://{target}{path}', data=data, method=method)\n"
            "print(u.urlopen(request, timeout=5).read().decode())\n"
        )
        argv = ["python3", "-c", client, method, path, f"{node.address}:{PORT}", *([body] if body is not None else [])]
        result = subprocess.run(self.lab.in_hub(argv), capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise AssertionError(f"{method} {path} on {node.name} failed: {result.stderr.strip()[-500:]}")
        return result.stdout.strip()

    def containers(self, node: SwarmNode) -> list[str]:
        """This service's containers on `node`, oldest first."""
        ids = node.docker("ps", "-aq", "--filter", f"label=com.docker.swarm.service.name={self.service}").stdout
        return list(reversed(ids.split()))

    def logs(self, node: SwarmNode, container: str) -> str:
        result = node.docker("logs", container, check=False)
        return result.stdout + result.stderr

    def lease(self) -> dict[str, object]:
        return json.loads((self.checkpoints / "kv" / "lease.json").read_text())

    def print_logs(self) -> None:
        for node in self.lab.nodes:
            for container in self.containers(node):
                print(f"----- {node.name} container {container[:12]} -----\n{self.logs(node, container)}")
        print(self.lab.manager.docker("service", "ps", "--no-trunc", self.service, check=False).stdout)


@pytest.fixture
def stack(lab: SwarmLab, request: pytest.FixtureRequest) -> Iterator[Stack]:
    name = f"kv{uuid.uuid4().hex[:6]}"
    checkpoints = lab.directory / f"{name}-checkpoints"
    checkpoints.mkdir(mode=0o700)
    for node in lab.nodes:
        lab.manager.docker("node", "update", "--availability", "active", node.name)
    deployed = Stack(lab, name, checkpoints)
    try:
        deployed.deploy()
        yield deployed
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            deployed.print_logs()
            lab.print_logs()
        lab.manager.docker("stack", "rm", name, check=False)
        for node in lab.nodes:
            leftovers = deployed.containers(node)
            if leftovers:
                node.docker("rm", "-f", *leftovers, check=False)


def target(node: SwarmNode) -> str:
    return f"{node.address}:{PORT}"


def start_poller(stack: Stack) -> Poller:
    """Every node's published port, every 50 ms, from the hub."""
    return Poller(stack.lab.hub, [target(node) for node in stack.lab.nodes], stack.lab.directory, "/kv/counter")


def put_state(stack: Stack, node: SwarmNode) -> dict[str, object]:
    stack.http(node, "PUT", "/kv/session", "user=alice; cart=3 items")
    for _ in range(3):
        counter = stack.http(node, "POST", "/incr/counter")
    assert counter == "3"
    return json.loads(stack.http(node, "GET", "/stats"))


def assert_state_carried(stack: Stack, node: SwarmNode, before: dict[str, object]) -> None:
    assert stack.http(node, "GET", "/kv/session") == "user=alice; cart=3 items"
    assert stack.http(node, "POST", "/incr/counter") == "4"
    after = json.loads(stack.http(node, "GET", "/stats"))
    assert after["started"] == before["started"], "a fresh start, not a restore"
    assert after["pid"] == before["pid"]


def measured_outage(stack: Stack, old: SwarmNode, new: SwarmNode, poller: Poller) -> Outage:
    sleep_until(lambda: any(answer["target"] == target(new) for answer in poller.answers()), 120, interval=0.2,
                what=f"an answer from {new.name}")
    poller.stop()
    gap = outage(poller.answers(), target(old), target(new))
    # The counter the clients read was the checkpointed one on both sides of the gap.
    assert gap.last_before["body"] == gap.first_after["body"] == "3", gap
    return gap


def test_a_drained_nodes_task_moves_to_the_other_node_with_its_state(
    stack: Stack, record_property: Callable[[str, object], None]
) -> None:
    old = stack.task_node()
    [new] = [node for node in stack.lab.nodes if node is not old]
    [container] = stack.containers(old)

    # Seccomp: none on the task (the daemon default under test), Docker's default profile with plain runc.
    assert old.docker("inspect", "-f", "{{.HostConfig.Runtime}}", container).stdout.strip() == "unconfined-runc"
    status = old.docker("exec", container, "cat", "/proc/1/status").stdout
    assert re.search(r"^Seccomp:\s+0$", status, re.M), "the task runs under a seccomp filter: CRIU cannot dump"
    plain = old.docker("run", "--rm", "--runtime", "runc", "--network", "none", "--entrypoint", "cat", KV_IMAGE,
                       "/proc/self/status").stdout
    assert re.search(r"^Seccomp:\s+2$", plain, re.M), "without the wrapper Docker's default profile applies"

    before = put_state(stack, old)
    poller = start_poller(stack)
    try:
        sleep_until(lambda: poller.answers(), 10, what="the poller's first answer")
        stack.lab.manager.docker("node", "update", "--availability", "drain", old.name)
        gap = measured_outage(stack, old, new, poller)
    finally:
        poller.stop()
    record_property("drain_downtime_seconds", round(gap.seconds, 3))
    print(f"swarm drain: downtime {gap.seconds:.2f} s (last answer from {old.name}, first from {new.name})")

    assert stack.task_node() is new
    old_log = stack.logs(old, container)
    assert re.search(r"final checkpoint gen-\d+ published", old_log), old_log
    assert old.docker("inspect", "-f", "{{.State.ExitCode}}", container).stdout.strip() == "0"
    [replacement] = stack.containers(new)
    new_log = stack.logs(new, replacement)
    # Swarm started the replacement only once the old task had stopped: the lease was already free.
    assert "took the lease on /checkpoints/kv (free)" in new_log, new_log
    assert re.search(rf"restored gen-\d+ \(made \S+ on {re.escape(old.name)}\)", new_log), new_log
    assert_state_carried(stack, new, before)
    # CKPT_HOST_NAME={{.Node.Hostname}} from the stack file: the lease names the node.
    assert stack.lease()["host"] == new.name


def test_a_start_first_update_waits_for_the_lease_and_restores_the_final_checkpoint(
    stack: Stack, record_property: Callable[[str, object], None]
) -> None:
    inspected = json.loads(stack.lab.manager.docker("service", "inspect", stack.service).stdout)[0]
    assert inspected["Spec"]["UpdateConfig"]["Order"] == "start-first", "the stack file's update order"
    old = stack.task_node()
    [new] = [node for node in stack.lab.nodes if node is not old]  # host-mode port 8080 is taken on `old`
    [container] = stack.containers(old)
    before = put_state(stack, old)

    poller = start_poller(stack)
    try:
        sleep_until(lambda: poller.answers(), 10, what="the poller's first answer")
        # A new task of the same spec, as a deploy of a new image would start.
        stack.lab.manager.docker("service", "update", "--detach", "--force", stack.service)
        gap = measured_outage(stack, old, new, poller)
    finally:
        poller.stop()
    record_property("start_first_downtime_seconds", round(gap.seconds, 3))
    print(f"swarm start-first update: downtime {gap.seconds:.2f} s")

    [replacement] = stack.containers(new)
    new_log = stack.logs(new, replacement)
    waited = re.search(rf"another instance holds the lease \(host {re.escape(old.name)}, container "
                       rf"{container[:12]}\); waiting", new_log)
    assert waited, f"the new task did not wait for the old one's lease:\n{new_log}"
    assert "took the lease on /checkpoints/kv (released by its previous holder)" in new_log, new_log
    assert re.search(r"final checkpoint gen-\d+ published", stack.logs(old, container))
    assert_state_carried(stack, new, before)
    assert stack.lease()["host"] == new.name
