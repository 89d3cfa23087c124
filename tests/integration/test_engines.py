"""Heterogeneous replacements: a checkpoint made under one engine restores under another.

Real engines, real CRIU, the supervisor as PID 1: Docker (the main dockerd),
Podman (rootful, `docker save | podman load`) and containerd driven by ctr
(our own containerd, never Docker's). Every container of a test mounts one
host directory at /checkpoints. The kv app's state (a key and a counter) is
put and checked from inside the containers, over loopback; no container has a
network.

Set-up: `CS_ENGINES_IMAGE` names the kv image to use (default: the suite's
KV_IMAGE). A test skips only when its engine cannot be installed or started
here; scripts/bootstrap.sh installs Podman, and containerd and ctr come with
docker.io.

test_the_lease_and_the_manifest_name_the_engine_and_the_container pins down
what store.identity() records once it asks supervisor_pkg.engine: the engine
and the id each engine itself knows the container by.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dockerlib import KV_IMAGE, docker, sleep_until
from engineslib import (
    DOCKER_ONLY_CAPABILITIES_MASK,
    App,
    ContainerdEngine,
    ContainerEngine,
    Ctr,
    DockerEngine,
    PodmanEngine,
    command,
)

IMAGE = os.environ.get("CS_ENGINES_IMAGE") or KV_IMAGE
FAST_LEASE = {"CKPT_LEASE_INTERVAL": "0.5", "CKPT_LEASE_TIMEOUT": "3", "CKPT_HANDOFF_TIMEOUT": "60"}

# Our own containerd: its own socket, root and state, so Docker's (in /var/run/docker/containerd) is never touched.
CONTAINERD_RUN = Path("/run/cs-engines")
CONTAINERD_ADDRESS = str(CONTAINERD_RUN / "containerd.sock")
CONTAINERD_ROOT = Path("/var/lib/cs-engines-containerd")
CONTAINERD_STATE = Path("/run/cs-engines-containerd")
CONTAINERD_NAMESPACE = "cs-engines"
# Without --config, containerd reads /etc/containerd/config.toml: its CRI plugin (a kubelet's endpoint, with a
# streaming server and CNI) and an "opt" directory in /var/lib/containerd. Neither is wanted here.
CONTAINERD_CONFIG = f"""version = 2
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[plugins."io.containerd.internal.v1.opt"]
  path = "{CONTAINERD_ROOT}/opt"
"""

TIMINGS: list[str] = []


def pipe(producer: list[str], consumer: list[str], timeout: float = 600) -> None:
    """`producer | consumer`, both checked: e.g. docker save IMAGE | podman load."""
    with subprocess.Popen(producer, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as source:
        assert source.stdout is not None
        sink = subprocess.run(consumer, stdin=source.stdout, capture_output=True, text=True, timeout=timeout)
        source.stdout.close()
        _, source_errors = source.communicate(timeout=timeout)
    if source.returncode != 0 or sink.returncode != 0:
        raise AssertionError(f"{' '.join(producer)} | {' '.join(consumer)} failed: {source_errors.decode().strip()} "
                             f"{sink.stderr.strip()}")


# --- set-up, once per module --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """Checkpoint directories and logs of this module's containers, removed at the end."""
    path = Path(tempfile.mkdtemp(prefix="cs-engines-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"cs-engines-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def image_id() -> str:
    return docker("image", "inspect", "-f", "{{.Id}}", IMAGE).stdout.strip().removeprefix("sha256:")


@pytest.fixture(scope="module")
def podman_image(image_id: str) -> Iterator[str]:
    """The kv image in Podman's store (rootful), loaded from Docker's; removed at the end if we loaded it."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install -y podman; scripts/bootstrap.sh installs it)")
    info = command(["podman", "info"], check=False)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-300:]}")
    present = command(["podman", "image", "inspect", "--format", "{{.Id}}", IMAGE], check=False)
    loaded = present.returncode != 0 or present.stdout.strip() != image_id
    if loaded:
        pipe(["docker", "save", IMAGE], ["podman", "load", "-q"])
    try:
        yield IMAGE
    finally:
        if loaded:
            command(["podman", "rmi", "-f", image_id], check=False)


@pytest.fixture(scope="module")
def containerd(scratch: Path) -> Iterator[tuple[Ctr, str]]:
    """Our own containerd, started once, with the kv image imported: (ctr, the image's reference)."""
    for program in ("containerd", "ctr"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (it comes with docker.io)")
    ctr = Ctr(CONTAINERD_ADDRESS, CONTAINERD_NAMESPACE, CONTAINERD_STATE)
    if ctr("version", check=False).returncode == 0:
        pytest.fail(f"a containerd already serves {CONTAINERD_ADDRESS} (left by an earlier run?): stop it first")
    CONTAINERD_RUN.mkdir(mode=0o700, parents=True, exist_ok=True)
    config = CONTAINERD_RUN / "config.toml"
    config.write_text(CONTAINERD_CONFIG)
    log_path = scratch / "containerd.log"
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(["containerd", "--config", str(config), "--address", CONTAINERD_ADDRESS,
                                   "--root", str(CONTAINERD_ROOT), "--state", str(CONTAINERD_STATE)],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        sleep_until(lambda: daemon.poll() is not None or ctr("version", check=False).returncode == 0, 30,
                    what="our containerd to answer")
        if daemon.poll() is not None:
            pytest.skip(f"containerd cannot start here (exit {daemon.returncode}): "
                        f"{log_path.read_text()[-500:]}")
        pipe(["docker", "save", IMAGE], ["ctr", "--address", CONTAINERD_ADDRESS, "-n", CONTAINERD_NAMESPACE,
                                         "images", "import", "-"])
        references = ctr("images", "ls", "-q").stdout.split()
        wanted = IMAGE if ":" in IMAGE.rsplit("/", 1)[-1] else f"{IMAGE}:latest"
        reference = next(ref for ref in references if ref == wanted or ref.endswith("/" + wanted))
        yield ctr, reference
    finally:
        # Tasks first: their shims outlive containerd, and would keep runc containers running.
        for line in ctr("task", "ls", "-q", check=False).stdout.split():
            ctr("task", "kill", "--signal", "SIGKILL", line, check=False)
            ctr("task", "rm", "--force", line, check=False)
        for line in ctr("containers", "ls", "-q", check=False).stdout.split():
            ctr("containers", "rm", line, check=False)
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=30)
        for path in (CONTAINERD_ROOT, CONTAINERD_STATE, CONTAINERD_RUN):
            shutil.rmtree(path, ignore_errors=True)


# --- engines, per test ---------------------------------------------------------------------------------------
def _cleanup(request: pytest.FixtureRequest, engine: ContainerEngine) -> None:
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        engine.print_logs()  # shown under the failure: the containers are gone afterwards
    engine.cleanup()


@pytest.fixture
def docker_engine(request: pytest.FixtureRequest, prefix: str) -> Iterator[ContainerEngine]:
    engine = DockerEngine(f"{prefix}-{uuid.uuid4().hex[:6]}", IMAGE)
    try:
        yield engine
    finally:
        _cleanup(request, engine)


@pytest.fixture
def podman_engine(request: pytest.FixtureRequest, prefix: str, podman_image: str) -> Iterator[ContainerEngine]:
    engine = PodmanEngine(f"{prefix}-{uuid.uuid4().hex[:6]}", podman_image)
    try:
        yield engine
    finally:
        _cleanup(request, engine)


@pytest.fixture
def containerd_engine(request: pytest.FixtureRequest, prefix: str, scratch: Path,
                      containerd: tuple[Ctr, str]) -> Iterator[ContainerEngine]:
    ctr, reference = containerd
    engine = ContainerdEngine(f"{prefix}-{uuid.uuid4().hex[:6]}", ctr, reference, scratch)
    try:
        yield engine
    finally:
        _cleanup(request, engine)


@pytest.fixture
def checkpoints(request: pytest.FixtureRequest, scratch: Path) -> Iterator[Path]:
    """The host directory every engine's containers mount at /checkpoints."""
    directory = Path(tempfile.mkdtemp(prefix="ckpt-", dir=scratch))
    try:
        yield directory
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            for log in sorted((directory / "default" / "logs").glob("*.log")):
                lines = log.read_text(errors="replace").splitlines()
                errors = [line for line in lines if "Error" in line or "error" in line][-15:]
                print(f"----- CRIU log {log.name}: {len(lines)} lines, last errors -----\n" + "\n".join(errors))
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _print_timings() -> Iterator[None]:
    yield
    if TIMINGS:
        print("\n" + "\n".join(TIMINGS))


# --- the app's state, put under one engine and checked under another ---------------------------------------------
def kv_with_state(engine: ContainerEngine, directory: Path, env: dict[str, str] | None = None,
                  podman_default_caps: bool = False, count: int = 5) -> App:
    """A kv app with a session and a counter at `count`."""
    app = engine.run(directory, {**FAST_LEASE, **(env or {})}, podman_default_caps=podman_default_caps)
    app.wait_healthy()
    app.http("PUT", "/kv/session", "alice")
    for _ in range(count):
        app.http("POST", "/incr/counter")
    return app


def final_checkpoint(app: App) -> None:
    """SIGTERM: the final checkpoint, then exit 0."""
    started = time.monotonic()
    assert app.stop() == 0, app.logs()
    TIMINGS.append(f"{app.engine}: SIGTERM to exit 0 (final checkpoint) {time.monotonic() - started:.2f} s")
    assert "final checkpoint gen-00000001 published" in app.logs(), app.logs()


def checkpointed_kv(engine: ContainerEngine, directory: Path, env: dict[str, str] | None = None,
                    podman_default_caps: bool = False) -> App:
    app = kv_with_state(engine, directory, env, podman_default_caps)
    final_checkpoint(app)
    return app


def restored_kv(engine: ContainerEngine, directory: Path, podman_default_caps: bool = False,
                count: int = 5) -> App:
    """The replacement: it restores gen-00000001, with the state and the container's stdout and stderr."""
    started = time.monotonic()
    app = engine.run(directory, FAST_LEASE, podman_default_caps=podman_default_caps)
    app.wait_healthy()
    TIMINGS.append(f"{engine.kind}: run to answering HTTP, restored {time.monotonic() - started:.2f} s")
    logs = app.logs()
    assert "restored gen-00000001" in logs, logs
    assert app.http("GET", "/kv/session") == "alice"
    assert app.http("POST", "/incr/counter") == str(count + 1)
    stdio = app.app_stdio()  # CRIU's inherit-fd reconnected them to this engine's stdio
    assert stdio and all(line.split()[1] == "True" for line in stdio), stdio
    return app


def assert_checkpoints_again(app: App) -> None:
    """The restored app checkpoints under its new engine too: the next hop would work."""
    assert app.stop() == 0, app.logs()
    assert "final checkpoint gen-00000002 published" in app.logs(), app.logs()


def generation_files(directory: Path, generation: str = "gen-00000001") -> list[str]:
    return sorted(os.listdir(directory / "default" / generation))


# --- the moves -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("source", "target"), [
    ("podman", "docker"),
    ("docker", "containerd"),
    ("containerd", "docker"),
])
def test_a_checkpoint_made_under_one_engine_restores_under_another(
    request: pytest.FixtureRequest, checkpoints: Path, source: str, target: str
) -> None:
    # Podman's containers have its own default capability set; Docker's and containerd's are supersets of it.
    checkpointed_kv(request.getfixturevalue(f"{source}_engine"), checkpoints, podman_default_caps=source == "podman")
    replacement = restored_kv(request.getfixturevalue(f"{target}_engine"), checkpoints)
    assert_checkpoints_again(replacement)
    made = json.loads((checkpoints / "default" / "gen-00000001" / "manifest.json").read_text())
    TIMINGS.append(f"{source} -> {target}: gen-00000001 made by {made.get('source')}")


def test_docker_to_podman_with_podmans_default_capabilities_exits_6_and_with_them_added_restores(
    docker_engine: ContainerEngine, podman_engine: ContainerEngine, checkpoints: Path
) -> None:
    checkpointed_kv(docker_engine, checkpoints)
    started = time.monotonic()
    refused = podman_engine.run(checkpoints, FAST_LEASE, podman_default_caps=True)
    assert refused.wait_exit() == 6, refused.logs()
    TIMINGS.append(f"podman (default capabilities): run to exit 6 {time.monotonic() - started:.2f} s")
    logs = refused.logs()
    assert ("this container cannot restore gen-00000001: the app held CAP_NET_RAW, CAP_MKNOD, CAP_AUDIT_WRITE, "
            "which this container lacks") in logs, logs
    assert "add --cap-add NET_RAW --cap-add MKNOD --cap-add AUDIT_WRITE" in logs, logs
    assert "The checkpoint is kept for a replacement that can" in logs, logs
    files = generation_files(checkpoints)
    assert "incompatible.json" in files and "rejected.json" not in files, files

    replacement = restored_kv(podman_engine, checkpoints)  # --cap-add NET_RAW --cap-add MKNOD --cap-add AUDIT_WRITE
    assert_checkpoints_again(replacement)


def test_docker_to_podman_with_ckpt_portable_caps_restores_with_podmans_default_capabilities(
    docker_engine: ContainerEngine, podman_engine: ContainerEngine, checkpoints: Path
) -> None:
    app = kv_with_state(docker_engine, checkpoints, env={"CKPT_PORTABLE_CAPS": "1"})
    if "CKPT_PORTABLE_CAPS is not a criu-supervisor setting" in app.logs():
        pytest.fail(f"the supervisor in {IMAGE} does not know CKPT_PORTABLE_CAPS yet: {app.logs()}")
    held = app.app_capabilities()
    assert not held & DOCKER_ONLY_CAPABILITIES_MASK, f"the app holds CapPrm {held:x} (NET_RAW, MKNOD or AUDIT_WRITE)"
    final_checkpoint(app)
    replacement = restored_kv(podman_engine, checkpoints, podman_default_caps=True)
    assert_checkpoints_again(replacement)


@pytest.mark.parametrize("kind", ["docker", "podman", "containerd"])
def test_the_lease_and_the_manifest_name_the_engine_and_the_container(
    request: pytest.FixtureRequest, checkpoints: Path, kind: str
) -> None:
    app = kv_with_state(request.getfixturevalue(f"{kind}_engine"), checkpoints, podman_default_caps=kind == "podman")
    lease = json.loads((checkpoints / "default" / "lease.json").read_text())
    assert (lease.get("engine"), lease.get("container_id")) == (kind, app.container_id()), lease
    assert lease.get("host"), lease
    final_checkpoint(app)
    source = json.loads((checkpoints / "default" / "gen-00000001" / "manifest.json").read_text())["source"]
    assert (source.get("engine"), source.get("container_id")) == (kind, app.container_id()), source
    TIMINGS.append(f"{kind}: lease {lease.get('engine')} {lease.get('container_id')} on {lease.get('host')}")
