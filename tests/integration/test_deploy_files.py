"""The deployment files in compose/ work as shipped.

(a) docker-compose accepts every compose file, with the CRIU settings intact;
    rancher-compose.yml (read by Rancher, not docker-compose) has the keys and
    values Rancher 1.6 needs for a handoff.
(b) The Kubernetes manifests pass strict schema validation, offline, against
    every Kubernetes release kubernetes-validate bundles from 1.30 on (the
    first with securityContext.appArmorProfile); their CKPT_* settings parse
    with the supervisor's own config parser; every choice the handoff depends
    on (issue 17: rollout strategy, probes, service links, image digest,
    preStop, QoS, token, reclaim policy, placement) is pinned down.
(c) compose/docker-compose.local-test.yml runs a real migration through
    docker-compose: up, store state, stop (final checkpoint), rm, up (restore).
(d) compose/swarm/docker-stack.yml passes `docker stack config` with the
    settings a Swarm handoff needs; tests/integration/test_swarm.py deploys it.

docker-compose and `docker stack config` need no engine; (c) needs the engine
and the images (conftest.py checks both).
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerlib import HTTP_CLIENT, KV_IMAGE, docker, sleep_until

from supervisor_pkg import config as supervisor_config

try:
    from kubernetes_validate import utils as kubernetes_validate
except ImportError:  # pragma: no cover - a virtualenv made before this test existed
    pytest.fail("kubernetes-validate is missing: run .venv/bin/pip install -e '.[test]'", pytrace=False)

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose"
LOCAL_TEST_FILE = COMPOSE / "docker-compose.local-test.yml"
NFS_FILE = COMPOSE / "docker-compose.nfs.yml"
RANCHER_COMPOSE_FILE = COMPOSE / "rancher" / "docker-compose.yml"
RANCHER_SETTINGS_FILE = COMPOSE / "rancher" / "rancher-compose.yml"
KUBERNETES_DIR = COMPOSE / "kubernetes"
SWARM_STACK_FILE = COMPOSE / "swarm" / "docker-stack.yml"
KV_APP = REPO / "examples" / "kv" / "kv.py"

# What every deployment must give the container (README, "Container settings").
CRIU_CAPABILITIES = {"SYS_ADMIN", "SYS_PTRACE", "SYS_TIME", "NET_ADMIN"}
CRIU_SECURITY_OPTS = {"seccomp=unconfined", "apparmor=unconfined"}

# Variables the NFS and Rancher files need; given so `config` can interpolate.
NFS_ENV = {"NFS_SERVER": "192.0.2.10", "NFS_EXPORT": "/srv/checkpoints"}

# The first Kubernetes release with securityContext.appArmorProfile.
OLDEST_KUBERNETES = (1, 30)


def compose_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without anything that would steer docker-compose."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "NFS_", "DOCKER_HOST"))}
    env.update(extra or {})
    return env


def compose(*args: str, env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker-compose", *args], capture_output=True, text=True, timeout=timeout,
                            env=compose_env(env), check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"docker-compose {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def resolved(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`docker-compose -f FILE config`, which must succeed, as a dict."""
    return yaml.safe_load(compose("-f", str(path), "config", env=env).stdout)


def assert_criu_settings(service: dict[str, Any]) -> None:
    assert set(service.get("cap_add", [])) >= CRIU_CAPABILITIES, service.get("cap_add")
    assert set(service.get("security_opt", [])) >= CRIU_SECURITY_OPTS, service.get("security_opt")
    assert "privileged" not in service
    assert service.get("stop_grace_period"), "SIGTERM must leave the dump time before SIGKILL"
    assert service["environment"].get("CKPT_NAME")
    assert any(str(v).startswith("checkpoints:/checkpoints") for v in service["volumes"]), service["volumes"]
    assert service.get("restart") in (None, "no", "on-failure"), "always/unless-stopped could restore on a doomed host"
    # Every CKPT_* setting is a real one and parses as the supervisor would.
    settings = {k: str(v) for k, v in service["environment"].items() if k.startswith("CKPT_")}
    known = {setting.variable for setting in supervisor_config.SETTINGS}
    assert set(settings) <= known, f"unknown settings: {set(settings) - known}"
    supervisor_config.load(settings)


# (a) compose files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, env", [
    (COMPOSE / "docker-compose.yml", None),
    (LOCAL_TEST_FILE, None),
    (NFS_FILE, NFS_ENV),
    (RANCHER_COMPOSE_FILE, NFS_ENV),
], ids=["docker-compose.yml", "local-test", "nfs", "rancher"])
def test_compose_file_passes_docker_compose_config(path: Path, env: dict[str, str] | None) -> None:
    service = resolved(path, env)["services"]["kv"]
    assert service["image"] == KV_IMAGE
    assert_criu_settings(service)


def test_nfs_volume_is_a_real_nfs_mount_with_the_documented_options() -> None:
    volume = resolved(NFS_FILE, {"NFS_SERVER": "192.0.2.10"})["volumes"]["checkpoints"]
    assert volume["driver"] == "local"
    assert volume["driver_opts"] == {
        "type": "nfs",
        "o": "addr=192.0.2.10,nfsvers=4.1,hard,timeo=600,retrans=2,rw",
        "device": ":/exports/checkpoints",
    }
    custom = resolved(NFS_FILE, NFS_ENV)["volumes"]["checkpoints"]["driver_opts"]
    assert custom["device"] == ":/srv/checkpoints"


def test_nfs_file_names_the_missing_server() -> None:
    result = compose("-f", str(NFS_FILE), "config", check=False)
    assert result.returncode != 0
    assert "NFS_SERVER" in result.stderr


def test_local_test_file_keeps_the_nfs_files_service_settings() -> None:
    """The file the migration test runs must stay the NFS file with a local volume and no network."""
    nfs = resolved(NFS_FILE, NFS_ENV)
    local = resolved(LOCAL_TEST_FILE)
    nfs_service, local_service = nfs["services"]["kv"], local["services"]["kv"]
    assert local_service.pop("network_mode") == "none"
    nfs_service.pop("ports")
    assert local_service == nfs_service
    assert local["volumes"]["checkpoints"] in ({}, None)


def test_rancher_stack_uses_rancher_nfs_and_keeps_the_checkpoints() -> None:
    stack = resolved(RANCHER_COMPOSE_FILE, NFS_ENV)
    assert stack["version"] == "2", "Rancher 1.6 reads compose files in the version '2' format"
    volume = stack["volumes"]["checkpoints"]
    assert volume["driver"] == "rancher-nfs"
    assert volume["driver_opts"] == {"host": "192.0.2.10", "export": "/srv/checkpoints", "onRemove": "retain",
                                     "mntOptions": "hard,timeo=600,retrans=2"}
    service = stack["services"]["kv"]
    assert service["labels"]["io.rancher.container.pull_image"] == "always"
    # The replacement avoids a host still listing this service's container, and hosts marked as doomed.
    # $$: not interpolated by compose (`config` prints it escaped again), left to Rancher, which fills them in.
    assert service["labels"]["io.rancher.scheduler.affinity:container_label_soft_ne"] == (
        "io.rancher.stack_service.name=$${stack_name}/$${service_name}")
    assert service["labels"]["io.rancher.scheduler.affinity:host_label_ne"] == "spot.terminating=true"
    assert "restart" not in service, "Rancher's service reconcile restarts containers, not Docker"


def test_rancher_compose_settings_fit_a_handoff() -> None:
    """rancher-compose.yml is not a docker-compose file: check its YAML and the values a handoff needs."""
    settings = yaml.safe_load(RANCHER_SETTINGS_FILE.read_text())
    stack = resolved(RANCHER_COMPOSE_FILE, NFS_ENV)
    assert str(settings["version"]) == "2"
    assert set(settings["services"]) <= set(stack["services"]), "settings for a service the stack does not have"

    kv = settings["services"]["kv"]
    assert kv["scale"] == 1, "two containers would share one lineage"
    assert kv["upgrade_strategy"]["start_first"] is False, "the old container must checkpoint and release first"
    assert kv["upgrade_strategy"]["batch_size"] == 1

    environment = {k: str(v) for k, v in stack["services"]["kv"]["environment"].items()}
    loaded = supervisor_config.load(environment)
    check = kv["health_check"]
    # The check asks the supervisor (alive while idle after a notice), not the app.
    assert check["port"] == loaded.metrics_port != 0
    assert check["request_line"] == "GET /metrics HTTP/1.0"
    assert check["strategy"] == "recreate"
    # A new container answers only after the handoff wait and the restore.
    assert check["initializing_timeout"] >= loaded.handoff_timeout * 1000
    assert set(check) <= {"port", "request_line", "interval", "initializing_timeout", "reinitializing_timeout",
                          "unhealthy_threshold", "healthy_threshold", "response_timeout", "strategy",
                          "recreate_on_quorum_strategy_config"}


# (b) Kubernetes manifests ------------------------------------------------------------------------------------

def kubernetes_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(KUBERNETES_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                documents.append((path.name, document))
    return documents


def supported_kubernetes_versions() -> list[str]:
    versions = [v for v in kubernetes_validate.all_versions()
                if tuple(int(part) for part in v.split(".")[:2]) >= OLDEST_KUBERNETES]
    assert versions, f"kubernetes-validate {kubernetes_validate.__version__} bundles no schema >= 1.30"
    return versions


def by_kind(kind: str) -> dict[str, Any]:
    [document] = [d for _, d in kubernetes_documents() if d["kind"] == kind]
    return document


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation must need nothing but the installed package."""
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("schema validation tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_kubernetes_manifests_pass_strict_schema_validation_offline(no_network: None) -> None:
    documents = kubernetes_documents()
    assert {d["kind"] for _, d in documents} >= {"Deployment", "PersistentVolumeClaim", "Service", "StorageClass"}
    for name, document in documents:
        assert "namespace" not in document["metadata"], f"{name}: the set is applied with kubectl -n"
        for version in supported_kubernetes_versions():
            # strict: unknown fields (typos, fields of a newer release) fail, as `kubectl apply` does.
            kubernetes_validate.validate(document, version, strict=True)


def test_the_validator_catches_a_misspelt_field(no_network: None) -> None:
    """The validation above must be able to fail."""
    deployment = copy.deepcopy(by_kind("Deployment"))
    pod = deployment["spec"]["template"]["spec"]
    pod["terminationGracePeriodSecond"] = pod.pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriodSecond"):
        kubernetes_validate.validate(deployment, supported_kubernetes_versions()[-1], strict=True)


def test_apparmor_field_is_why_kubernetes_1_30_is_the_floor(no_network: None) -> None:
    older = [v for v in kubernetes_validate.all_versions()
             if tuple(int(part) for part in v.split(".")[:2]) < OLDEST_KUBERNETES]
    if not older:
        pytest.skip("kubernetes-validate bundles no release before 1.30")
    with pytest.raises(kubernetes_validate.ValidationError, match="appArmorProfile"):
        kubernetes_validate.validate(by_kind("Deployment"), older[-1], strict=True)


def test_deployment_hands_over_as_the_supervisor_needs() -> None:
    deployment = by_kind("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    # The old pod terminates first, and the new one is created as it starts terminating (not once it is gone,
    # as with Recreate; not before it, as with maxSurge 1, which stalls on the lease).
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    pod = spec["template"]["spec"]
    # Long enough for a dump, short enough to be honoured on an AWS spot node (2 min notice).
    assert 30 <= pod["terminationGracePeriodSeconds"] <= 110
    [container] = pod["containers"]
    security = container["securityContext"]
    assert set(security["capabilities"]["add"]) == CRIU_CAPABILITIES
    assert security["seccompProfile"] == {"type": "Unconfined"}
    assert security["appArmorProfile"] == {"type": "Unconfined"}
    assert not security.get("privileged")
    assert pod["automountServiceAccountToken"] is False, "no API token beside SYS_ADMIN and no seccomp"
    assert pod.get("restartPolicy", "Always") == "Always"

    # The PVC is shared (RWX) and is the one mounted at /checkpoints; its class keeps the volume.
    claim = by_kind("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    checkpoints = [n for n, v in volumes.items() if "persistentVolumeClaim" in v]
    assert [volumes[n]["persistentVolumeClaim"]["claimName"] for n in checkpoints] == [claim["metadata"]["name"]]
    assert mounts[checkpoints[0]]["mountPath"] == "/checkpoints"
    storage_class = by_kind("StorageClass")
    assert claim["spec"]["storageClassName"] == storage_class["metadata"]["name"]
    assert storage_class["reclaimPolicy"] == "Retain", "Delete would delete the checkpoints with the claim"

    # Service targets the pod's named port.
    service = by_kind("Service")
    assert service["spec"]["selector"] == spec["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def kv_container() -> dict[str, Any]:
    [container] = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def test_probes_let_a_restore_finish_and_never_restart_an_idle_supervisor() -> None:
    container = kv_container()
    env = {e["name"]: e.get("value") for e in container["env"]}
    loaded = supervisor_config.load({k: v for k, v in env.items() if k.startswith("CKPT_") and v is not None})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    startup = container["startupProbe"]
    # The app answers only after the lease wait and the restore: the budget covers both (a stalled restore ends
    # itself after CKPT_RESTORE_STALL); a failing startup probe restarts the container.
    budget = startup["periodSeconds"] * startup["failureThreshold"] + startup.get("initialDelaySeconds", 0)
    assert budget >= loaded.handoff_timeout + 2 * loaded.restore_stall, budget
    assert startup["httpGet"]["port"] == "http"
    # Ready within a second of the app answering: the service's downtime is the app's plus one period.
    readiness = container["readinessProbe"]
    assert readiness["httpGet"] == {"path": "/health", "port": "http"}
    assert startup["periodSeconds"] == readiness["periodSeconds"] == 1
    # Liveness asks the supervisor, which answers while it idles without the app after a cloud notice.
    liveness = container["livenessProbe"]
    assert ports[liveness["httpGet"]["port"]] == loaded.metrics_port != 0
    assert liveness["httpGet"]["path"] == "/metrics"
    # The metrics server starts up to 2 s after a fresh start: liveness tolerates it.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 10


def test_the_pod_is_guaranteed_and_drains_before_sigterm() -> None:
    container = kv_container()
    resources = container["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS: requests equal limits"
    assert set(resources["limits"]) >= {"cpu", "memory"}
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # A short drain of in-flight requests, leaving nearly all of the grace period to the dump.
    assert 0 < pre_stop <= 5 < pod["terminationGracePeriodSeconds"] - pre_stop


def test_the_image_is_pinned_by_digest_and_recorded() -> None:
    container = kv_container()
    match = re.fullmatch(r"[\w.-]+(?::\d+)?(?:/[\w.-]+)+@(sha256:[0-9a-f]{64})", container["image"])
    assert match, f"not pinned by digest: {container['image']}"
    assert container["imagePullPolicy"] == "IfNotPresent"
    env = {e["name"]: e for e in container["env"]}
    assert env["CKPT_IMAGE_ID"]["value"] == match.group(1), "CKPT_IMAGE_ID must be the image's digest"
    # The lease and the manifests name the node (supervisor_pkg/engine.py reads NODE_NAME).
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def service_link_variables(services: list[dict[str, Any]]) -> set[str]:
    """What the kubelet injects per Service when enableServiceLinks is on (pkg/kubelet/envvars)."""
    names = set()
    for service in services:
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        names |= {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
        for port in service["spec"]["ports"]:
            protocol = port.get("protocol", "TCP")
            base = f"{prefix}_PORT_{port['port']}_{protocol}"
            names |= {base, f"{base}_PROTO", f"{base}_PORT", f"{base}_ADDR"}
            if port.get("name"):
                names.add(f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
    return names


def injected_variables_the_app_reads(deployment: dict[str, Any]) -> set[str]:
    pod = deployment["spec"]["template"]["spec"]
    if pod.get("enableServiceLinks", True) is False:
        return set()
    read = set(re.findall(r"os\.environ\.get\(\"(\w+)\"", KV_APP.read_text()))
    assert "KV_PORT" in read, "the example no longer reads KV_PORT: update this test"
    return read & service_link_variables([by_kind("Service")])


def test_no_service_link_variable_reaches_the_app() -> None:
    """With the Service named kv, a service link would set KV_PORT=tcp://IP:8080: the example crash-loops."""
    deployment = by_kind("Deployment")
    assert injected_variables_the_app_reads(deployment) == set()
    # The check can fail: with the links on, KV_PORT is injected.
    linked = copy.deepcopy(deployment)
    linked["spec"]["template"]["spec"]["enableServiceLinks"] = True
    assert "KV_PORT" in injected_variables_the_app_reads(linked)


def test_the_replacement_prefers_another_spot_pool() -> None:
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    terms = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    keys = {term["podAffinityTerm"]["topologyKey"] for term in terms}
    assert keys == {"node.kubernetes.io/instance-type", "topology.kubernetes.io/zone"}
    for term in terms:
        assert term["podAffinityTerm"]["labelSelector"] == {"matchLabels": labels}
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod["affinity"]["podAntiAffinity"], (
        "required anti-affinity against the terminating old pod could leave the replacement unschedulable")


def test_deployment_signing_key_secret_is_optional_and_consistent() -> None:
    """Without the Secret the pod runs unsigned; with it, the key file lands where the env var points."""
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    reference = env["CKPT_SIGNING_KEY_FILE"]["valueFrom"]["secretKeyRef"]
    assert reference["optional"] is True
    [volume] = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == reference["name"]
    assert volume["secret"]["optional"] is True
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True

    # The documented `kubectl create secret` puts the key under that mount, at the path it stores.
    text = (KUBERNETES_DIR / "deployment.yaml").read_text()
    assert f"kubectl create secret generic -n kv {reference['name']}" in text
    key_file = re.search(rf"--from-literal={reference['key']}=(\S+)", text)
    assert key_file, "the header must show how to create the Secret"
    key_name = re.search(r"--from-file=([\w.-]+)=", text)
    assert key_name and key_file.group(1) == f"{mount['mountPath']}/{key_name.group(1)}"

    # Every other CKPT_* value parses, and with the Secret present the whole set does.
    settings = {name: e["value"] for name, e in env.items() if "value" in e and name.startswith("CKPT_")}
    known = {setting.variable for setting in supervisor_config.SETTINGS} | supervisor_config.NOT_SETTINGS
    variables = {name for name in env if name.startswith("CKPT_")}
    assert variables <= known, f"unknown settings: {variables - known}"
    assert set(env) - variables <= {"NODE_NAME"}
    loaded = supervisor_config.load({name: value for name, value in settings.items()
                                     if name not in supervisor_config.NOT_SETTINGS}
                                    | {"CKPT_SIGNING_KEY_FILE": key_file.group(1)})
    assert loaded.signing_key_file == key_file.group(1)
    assert {p["containerPort"] for p in container["ports"]} >= {8080, loaded.metrics_port}


# (d) the Swarm stack -----------------------------------------------------------------------------------------

def stack_config(env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`docker stack config`: the CLI's own loader (interpolation, schema), no engine needed."""
    result = subprocess.run(["docker", "stack", "config", "-c", str(SWARM_STACK_FILE)], capture_output=True,
                            text=True, timeout=60, env=compose_env(env), check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"docker stack config failed ({result.returncode}): {result.stderr.strip()}")
    return result


def test_swarm_stack_passes_docker_stack_config_with_what_a_handoff_needs() -> None:
    stack = yaml.safe_load(stack_config(NFS_ENV).stdout)
    service = stack["services"]["kv"]
    assert service["image"] == KV_IMAGE
    assert set(service["cap_add"]) >= CRIU_CAPABILITIES
    # Swarm drops security_opt (stack deploy says "Ignoring unsupported options"): seccomp is the daemon's.
    assert "security_opt" not in service and "privileged" not in service
    assert service["stop_grace_period"]
    deploy = service["deploy"]
    assert deploy["replicas"] == 1
    # No routing mesh or VIP without IPVS; mode host publishes on the task's node.
    assert deploy["endpoint_mode"] == "dnsrr"
    assert [port["mode"] for port in service["ports"]] == ["host"]
    # A drain restarts under any and on-failure; only any restarts a task stopped (exit 0) by its dockerd.
    assert deploy["restart_policy"]["condition"] == "any"
    # start-first: the new task waits for the old one's lease while it still runs (test_swarm.py).
    assert deploy["update_config"]["order"] == "start-first"
    assert "healthcheck" not in service, "with start-first, a health check on the app deadlocks the update"
    assert "node.labels.criu == true" in deploy["placement"]["constraints"]
    assert service["environment"]["CKPT_HOST_NAME"] == "{{.Node.Hostname}}"
    settings = {k: str(v) for k, v in service["environment"].items()
                if k.startswith("CKPT_") and k not in supervisor_config.NOT_SETTINGS}
    assert set(settings) <= {setting.variable for setting in supervisor_config.SETTINGS}
    supervisor_config.load(settings)
    volume = stack["volumes"]["checkpoints"]["driver_opts"]
    assert volume["type"] == "nfs"
    assert volume["o"] == "addr=192.0.2.10,nfsvers=4.1,hard,timeo=600,retrans=2,rw"
    assert volume["device"] == ":/srv/checkpoints"


def test_swarm_stack_names_the_missing_nfs_server() -> None:
    result = stack_config(check=False)
    assert result.returncode != 0
    assert "NFS_SERVER" in result.stderr


# (c) a migration through docker-compose ----------------------------------------------------------------------

class ComposeProject:
    """One docker-compose project on LOCAL_TEST_FILE with a unique name; `down -v` always."""

    def __init__(self) -> None:
        self.name = f"csdeploy{uuid.uuid4().hex[:10]}"

    def __call__(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return compose("-p", self.name, "-f", str(LOCAL_TEST_FILE), *args, check=check, timeout=timeout)

    def container_id(self) -> str:
        container_id = self("ps", "-q", "kv").stdout.strip()
        assert container_id, "no kv container"
        return container_id

    def http(self, method: str, path: str, body: str | None = None, check: bool = True) -> str:
        args = [method, path] + ([body] if body is not None else [])
        return self("exec", "-T", "kv", "python3", "-c", HTTP_CLIENT, *args, check=check).stdout.strip()

    def wait_healthy(self, timeout: float = 60) -> None:
        sleep_until(lambda: self("exec", "-T", "kv", "python3", "-c", HTTP_CLIENT, "GET", "/health",
                                 check=False).returncode == 0,
                    timeout, interval=0.3, what="kv to answer HTTP inside its compose container")

    def logs(self) -> str:
        result = self("logs", "--no-color", "kv", check=False)
        return result.stdout + result.stderr


@pytest.fixture
def project() -> Iterator[ComposeProject]:
    project = ComposeProject()
    try:
        yield project
    finally:
        project("down", "-v", "--timeout", "10", check=False)
        # Belt and braces: nothing of this project may outlive the test.
        for container_id in docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project.name}",
                                   check=False).stdout.split():
            docker("rm", "-f", container_id, check=False)
        docker("volume", "rm", "-f", f"{project.name}_checkpoints", check=False)


@pytest.mark.docker
def test_local_compose_file_migrates_the_app(project: ComposeProject) -> None:
    project("up", "-d")
    first = project.container_id()
    # stop_grace_period reaches the engine too: dockerd uses it when the host shuts down.
    assert docker("inspect", "-f", "{{.Config.StopTimeout}}", first).stdout.strip() == "60"
    project.wait_healthy()
    project.http("PUT", "/kv/session", "user=alice; cart=3 items")
    for _ in range(3):
        counter = project.http("POST", "/incr/counter")
    assert counter == "3"
    before = json.loads(project.http("GET", "/stats"))

    # `docker-compose stop` is SIGTERM with stop_grace_period: the final checkpoint.
    project("stop", timeout=120)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", first).stdout.strip() == "0", project.logs()
    assert re.search(r"final checkpoint gen-\d+ published", project.logs()), project.logs()

    # A new container on the same volume restores it.
    project("rm", "-f")
    project("up", "-d")
    second = project.container_id()
    assert second != first
    project.wait_healthy()
    assert re.search(r"restored gen-\d+", project.logs()), project.logs()

    assert project.http("GET", "/kv/session") == "user=alice; cart=3 items"
    assert project.http("POST", "/incr/counter") == "4"
    after = json.loads(project.http("GET", "/stats"))
    assert after["started"] == before["started"], "a fresh start, not a restore"
    assert after["pid"] == before["pid"]
    assert after["requests"] > before["requests"]
