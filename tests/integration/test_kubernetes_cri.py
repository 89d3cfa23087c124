"""A node drain replayed through containerd's CRI plugin, as the two kubelets involved would make it.

No Kubernetes control plane can run here, but what moves a pod during a drain
is the kubelets' CRI calls (crilib.py). compose/kubernetes/deployment.yaml's
pod template is run as shipped, on two CRI "nodes" in network namespaces of
the test's own, with one host directory as the ReadWriteMany claim:

1. node 1 runs pod A (sandbox, container with the manifest's env, downward API,
   mounts, securityContext, resources; its probes on the kubelet's schedule);
   the test stores a key and a counter in it over the pod network;
2. the eviction: at the same moment node 1's kubelet runs the preStop sleep
   then StopContainer with the rest of the grace period (SIGTERM: the final
   checkpoint), and node 2's kubelet starts pod B, created by the ReplicaSet as
   soon as A is deleted (RollingUpdate maxSurge 0 and drains both do that);
3. B waits for A's lease if it gets there first, restores, and its startup and
   readiness probes pass.

Checked: the state arrives (key, counter, the app's own start time and pid);
A exits 0 after publishing its final checkpoint; the lease names node 2 and
pod B (NODE_NAME from the downward API); no probe restarted anything. Measured:
the app's downtime (the last answer from A to the first from B, polled every
50 ms from the hub) and the probes' view of it (from A's deletion, when the
endpoints drop it, to B's first successful readiness probe: when a Service
would route to it again). docs/spot-nodes.md reports both.

Needs python's grpcio and protobuf (the test extras) and catatonit (the pause
process; scripts/bootstrap.sh installs it); skipped only when this machine
cannot make network namespaces or lacks containerd, runc, catatonit or the CNI
plugins. About 20 s to make the lab, 15 s for the drain, 5 s to unmake the lab.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerlib import KV_IMAGE, docker, sleep_until
from nslab import Poller, outage

pytestmark = pytest.mark.docker

try:
    import google.protobuf  # noqa: F401
    import grpc  # noqa: F401
except ImportError:  # pragma: no cover - a virtualenv made before this test existed
    pytest.fail("grpcio and protobuf are missing: run .venv/bin/pip install -e '.[test]'", pytrace=False)

from crilib import CriNode, KubeLab, Pod, PodSpec, enum_value, in_threads, kube_cannot_run_here  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KUBERNETES_DIR = REPO / "compose" / "kubernetes"
LOCAL_IMAGE = f"docker.io/library/{KV_IMAGE}"  # what `ctr images import` names the docker-archive's tag


@pytest.fixture(scope="module")
def lab() -> Iterator[KubeLab]:
    reason = kube_cannot_run_here()
    if reason:
        pytest.skip(f"no CRI nodes on this machine: {reason}")
    # One snapshot of the image, taken now: other work may rebuild it in the main engine meanwhile.
    with tempfile.TemporaryDirectory(prefix="cs-k8s-image-", dir="/var/tmp") as scratch:
        image = Path(scratch) / "kv.tar"
        docker("save", "-o", str(image), KV_IMAGE, timeout=300)
        made = KubeLab.create(images=[image])
    try:
        yield made
    finally:
        made.destroy()


def manifest_pod(claim: Path) -> PodSpec:
    documents = [d for path in sorted(KUBERNETES_DIR.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text())
                 if d]
    [deployment] = [d for d in documents if d["kind"] == "Deployment"]
    services = [d for d in documents if d["kind"] == "Service"]
    return PodSpec(deployment["spec"]["template"], services, LOCAL_IMAGE, claim)


def http(lab: KubeLab, pod: Pod, method: str, path: str, body: str | None = None) -> str:
    """One request from the hub to the pod's IP, over the pod network."""
    client = (
        "import sys, urllib.request as u\n"
        "method, url = sys.argv[1:3]\n"
        "data = sys.argv[3].encode() if len(sys.argv) > 3 else (None if method == 'GET' else b'')\n"
        "print(u.urlopen(u.Request(url, data=data, method=method), timeout=5).read().decode())\n"
    )
    argv = ["python3", "-c", client, method, f"http://{pod.ip}:8080{path}", *([body] if body is not None else [])]
    result = subprocess.run(lab.in_hub(argv), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{method} {path} on {pod.name}: {result.stderr.strip()[-400:]}"
    return result.stdout.strip()


def wait_ready(pod: Pod, timeout: float = 120) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        status = pod.status()
        if status.state == enum_value("ContainerState", "CONTAINER_EXITED"):
            raise AssertionError(f"{pod.name} exited {status.exit_code} before it was Ready:\n{pod.logs()}")
        return pod.first("readiness")

    result = sleep_until(ready, timeout, interval=0.1, what=f"{pod.name}'s readiness probe to pass")
    assert isinstance(result, dict)
    return result


def test_a_drain_replayed_through_the_cri_moves_the_pod_with_its_state(
    lab: KubeLab, record_property: Callable[[str, object], None]
) -> None:
    claim = lab.directory / f"claim-{uuid.uuid4().hex[:6]}"
    claim.mkdir(mode=0o700)
    spec = manifest_pod(claim)
    old_node, new_node = lab.nodes
    old = old_node.run_pod(spec, "kv-5d8f7c9b6-a1b2c", lab.cgroup_parent)
    pods: list[tuple[CriNode, Pod]] = [(old_node, old)]
    try:
        wait_ready(old)
        # What the manifest asks for, as the container sees it.
        _, status, _ = old.exec("cat", "/proc/1/status")
        assert re.search(r"^Seccomp:\s+0$", status, re.M), "seccompProfile Unconfined did not reach the container"
        held = int(re.search(r"^CapEff:\s+([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
        assert held & (1 << 21 | 1 << 19 | 1 << 25 | 1 << 12) == 1 << 21 | 1 << 19 | 1 << 25 | 1 << 12, hex(held)

        http(lab, old, "PUT", "/kv/session", "user=alice; cart=3 items")
        for _ in range(3):
            counter = http(lab, old, "POST", "/incr/counter")
        assert counter == "3"
        before = json.loads(http(lab, old, "GET", "/stats"))

        targets = lab.directory / f"targets-{uuid.uuid4().hex[:6]}"
        targets.write_text(f"{old.ip}:8080\n")
        poller = Poller(lab.hub, targets, lab.directory, "/kv/counter")
        try:
            sleep_until(lambda: poller.answers(), 10, what="the poller's first answer")
            deleted = time.monotonic()  # the eviction: the endpoints drop A, the ReplicaSet creates B

            def replacement() -> Pod:
                new = new_node.run_pod(spec, "kv-5d8f7c9b6-d3e4f", lab.cgroup_parent)
                pods.append((new_node, new))
                with targets.open("a") as handle:
                    handle.write(f"{new.ip}:8080\n")
                return new

            sigterm, new = in_threads(lambda: old_node.kill_pod(old, spec), replacement)
            ready = wait_ready(new)
            try:
                sleep_until(lambda: any(a["target"] == f"{new.ip}:8080" for a in poller.answers()), 30,
                            what="an answer from the new pod")
            except AssertionError as error:
                # The poller counts only answers to /kv/counter: a replacement that started fresh answers 404.
                raise AssertionError(f"{error}; last answers: {poller.answers()[-3:]}; /health of the new pod: "
                                     f"{http(lab, new, 'GET', '/health')}") from error
        finally:
            poller.stop()

        gap = outage(poller.answers(), f"{old.ip}:8080", f"{new.ip}:8080")
        assert gap.last_before["body"] == gap.first_after["body"] == "3", gap
        figures = {
            "app_downtime_seconds": round(gap.seconds, 3),
            "deletion_to_ready_seconds": round(float(ready["t"]) - deleted, 3),  # the Service's view
            "last_answer_to_ready_seconds": round(float(ready["t"]) - gap.last_before["t"], 3),
            "prestop_seconds": round(sigterm - deleted, 3),
        }
        for name, value in figures.items():
            record_property(name, value)
        print(f"CRI drain replay: {figures}")
        assert figures["prestop_seconds"] >= spec.container["lifecycle"]["preStop"]["sleep"]["seconds"]

        # The old pod: SIGTERM, final checkpoint, exit 0.
        status_old = old.status()
        assert status_old.state == enum_value("ContainerState", "CONTAINER_EXITED")
        assert status_old.exit_code == 0, old.logs()
        assert re.search(r"final checkpoint gen-\d+ published", old.logs()), old.logs()
        # The new pod restored it (after waiting for the lease, if it started before the old one let go).
        log = new.logs()
        assert re.search(rf"restored gen-\d+ \(made \S+ on {re.escape(old_node.name)}\)", log), log
        assert "took the lease on /checkpoints/kv" in log, log
        assert http(lab, new, "GET", "/kv/session") == "user=alice; cart=3 items"
        assert http(lab, new, "POST", "/incr/counter") == "4"
        after = json.loads(http(lab, new, "GET", "/stats"))
        assert (after["started"], after["pid"]) == (before["started"], before["pid"]), "a fresh start, not a restore"
        lease = json.loads((claim / "kv" / "lease.json").read_text())
        assert lease["host"] == new_node.name, lease  # NODE_NAME: fieldRef spec.nodeName
        # No probe failed in a way that would have restarted a container.
        assert all(r["ok"] for r in new.probe_results() if r["probe"] == "liveness"), new.probe_results()
        assert new.running()
    except BaseException:
        for _, pod in pods:  # shown under the failure: the pods are gone afterwards
            print(f"----- {pod.name} on {pod.node.name} -----\n{pod.logs()}\nprobes: {pod.probe_results()[-5:]}")
        raise
    finally:
        for node, pod in pods:
            node.remove_pod(pod)
