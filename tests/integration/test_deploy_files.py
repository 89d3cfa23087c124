"""The deployment files in compose/ work as shipped.

(a) docker-compose accepts every compose file, with the CRIU settings intact;
    rancher-compose.yml (read by Rancher, not docker-compose) has the keys and
    values Rancher 1.6 needs for a handoff.
(b) The Kubernetes manifests pass strict schema validation, offline, against
    every Kubernetes release kubernetes-validate bundles from 1.30 on (the
    first with securityContext.appArmorProfile); their CKPT_* settings parse
    with the supervisor's own config parser.
(c) compose/docker-compose.local-test.yml runs a real migration through
    docker-compose: up, store state, stop (final checkpoint), rm, up (restore).

docker-compose needs no engine for `config`; (c) needs the engine and the
images (conftest.py checks both).
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
    assert CRIU_CAPABILITIES <= set(service.get("cap_add", [])), service.get("cap_add")
    assert CRIU_SECURITY_OPTS <= set(service.get("security_opt", [])), service.get("security_opt")
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
    assert {d["kind"] for _, d in documents} >= {"Deployment", "PersistentVolumeClaim", "Service"}
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
    assert spec["strategy"] == {"type": "Recreate"}, "the old pod must checkpoint and release the lease first"
    pod = spec["template"]["spec"]
    # Long enough for a dump, short enough to be honoured on an AWS spot node (2 min notice).
    assert 30 <= pod["terminationGracePeriodSeconds"] <= 110
    [container] = pod["containers"]
    security = container["securityContext"]
    assert set(security["capabilities"]["add"]) == CRIU_CAPABILITIES
    assert security["seccompProfile"] == {"type": "Unconfined"}
    assert security["appArmorProfile"] == {"type": "Unconfined"}
    assert not security.get("privileged")
    assert "livenessProbe" not in container, "it would restore the app on a doomed node after a notice"

    # The PVC is shared (RWX) and is the one mounted at /checkpoints.
    claim = by_kind("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    checkpoints = [n for n, v in volumes.items() if "persistentVolumeClaim" in v]
    assert [volumes[n]["persistentVolumeClaim"]["claimName"] for n in checkpoints] == [claim["metadata"]["name"]]
    assert mounts[checkpoints[0]]["mountPath"] == "/checkpoints"

    # Service targets the pod's named port.
    service = by_kind("Service")
    assert service["spec"]["selector"] == spec["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


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
    settings = {name: e["value"] for name, e in env.items() if "value" in e}
    known = {setting.variable for setting in supervisor_config.SETTINGS}
    assert set(env) <= known, f"unknown settings: {set(env) - known}"
    loaded = supervisor_config.load({**settings, "CKPT_SIGNING_KEY_FILE": key_file.group(1)})
    assert loaded.signing_key_file == key_file.group(1)
    assert {p["containerPort"] for p in container["ports"]} >= {8080, loaded.metrics_port}


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
