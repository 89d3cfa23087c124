"""Small helpers to drive the real Docker engine from tests.

Every container and volume made through `Docker` is removed at teardown, even
when the test fails. Waits poll with a deadline (`sleep_until`), never fixed
sleeps.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

BASE_IMAGE = "criu-supervisor:latest"
TICKER_IMAGE = "criu-supervisor-example-ticker:latest"
KV_IMAGE = "criu-supervisor-example-kv:latest"

# What CRIU needs here; see README "Container settings". --privileged fails on
# this machine (its bounding set lacks CAP_SYS_RESOURCE), and is worse practice.
CRIU_SETTINGS = [
    "--cap-add", "SYS_ADMIN", "--cap-add", "SYS_PTRACE", "--cap-add", "SYS_TIME", "--cap-add", "NET_ADMIN",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
]

# Talks to the kv example over loopback from a process beside it in the container.
HTTP_CLIENT = (
    "import sys, urllib.request as u, urllib.error as e\n"
    "m, p = sys.argv[1], sys.argv[2]\n"
    "d = sys.argv[3].encode() if len(sys.argv) > 3 else (None if m == 'GET' else b'')\n"
    "try:\n"
    "    print(u.urlopen(u.Request('http://127.0.0.1:8080' + p, data=d, method=m), timeout=5).read().decode())\n"
    "except e.HTTPError as x:\n"
    "    print('HTTP', x.code); sys.exit(1)\n"
)


def sleep_until(condition: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


class Container:
    def __init__(self, name: str) -> None:
        self.name = name

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def stdout(self) -> str:
        return docker("logs", self.name, check=False).stdout

    def exec(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *command, check=check)

    def http(self, method: str, path: str, body: str | None = None) -> str:
        args = [method, path] + ([body] if body is not None else [])
        return self.exec("python3", "-c", HTTP_CLIENT, *args).stdout.strip()

    def wait_healthy(self, timeout: float = 30) -> None:
        sleep_until(lambda: self.exec("python3", "-c", HTTP_CLIENT, "GET", "/health", check=False).returncode == 0,
                    timeout, what=f"{self.name} to answer HTTP")

    def wait_log(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        return sleep_until(lambda: re.search(pattern, self.logs()), timeout, what=f"{pattern!r} in {self.name}'s log")

    def stop(self, timeout: int = 60) -> int:
        docker("stop", "-t", str(timeout), self.name, timeout=timeout + 30)
        return self.exit_code()

    def kill(self, signal: str) -> None:
        docker("kill", "-s", signal, self.name)

    def wait_exit(self, timeout: float = 60) -> int:
        result = docker("wait", self.name, timeout=timeout)
        return int(result.stdout.strip())

    def exit_code(self) -> int:
        return int(docker("inspect", "-f", "{{.State.ExitCode}}", self.name).stdout.strip())

    def running(self) -> bool:
        return docker("inspect", "-f", "{{.State.Running}}", self.name).stdout.strip() == "true"

    def signals_caught_by_pid1(self) -> int:
        status = self.exec("cat", "/proc/1/status").stdout
        return int(re.search(r"SigCgt:\s*([0-9a-f]+)", status).group(1), 16)  # type: ignore[union-attr]


class Docker:
    """Factory for containers and volumes that cleans up after itself."""

    def __init__(self, prefix: str = "cs-test") -> None:
        self.prefix = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.containers: list[str] = []
        self.volumes: list[str] = []
        self._count = 0

    def volume(self, driver_opts: list[str] | None = None) -> str:
        self._count += 1
        name = f"{self.prefix}-vol{self._count}"
        docker("volume", "create", *(driver_opts or []), name)
        self.volumes.append(name)
        return name

    def run(
        self,
        image: str,
        *command: str,
        volume: str | None = None,
        env: dict[str, str] | None = None,
        extra: list[str] | None = None,
        criu_settings: bool = True,
        read_only_volume: bool = False,
        detach: bool = True,
    ) -> Container:
        self._count += 1
        name = f"{self.prefix}-c{self._count}"
        args = ["run", "--name", name, "--network", "none"]
        if detach:
            args.append("-d")
        if criu_settings:
            args += CRIU_SETTINGS
        if volume:
            args += ["-v", f"{volume}:/checkpoints" + (":ro" if read_only_volume else "")]
        for key, value in (env or {}).items():
            args += ["-e", f"{key}={value}"]
        args += extra or []
        self.containers.append(name)
        docker(*args, image, *command, check=detach)
        return Container(name)

    def generations(self, volume: str, name: str = "default") -> list[dict[str, Any]]:
        result = docker("run", "--rm", "--network", "none", "-v", f"{volume}:/checkpoints",
                        "--entrypoint", "criu-supervisor", BASE_IMAGE, "list", "--json", "--name", name)
        return json.loads(result.stdout)

    def print_logs(self, lines: int = 60) -> None:
        for name in self.containers:
            result = docker("logs", "--timestamps", "--tail", str(lines), name, check=False)
            print(f"----- docker logs {name} (last {lines} lines) -----\n{result.stdout}{result.stderr}")

    def cleanup(self) -> None:
        for name in self.containers:
            docker("rm", "-f", name, check=False)
        for name in self.volumes:
            docker("volume", "rm", "-f", name, check=False)


@contextlib.contextmanager
def containers_named(prefix: str) -> Iterator[Docker]:
    """A Docker factory whose containers and volumes are called PREFIX-*: logs printed and all removed at the end."""
    engine = Docker(prefix)
    try:
        yield engine
    finally:
        engine.print_logs()
        engine.cleanup()


def need_image(image: str) -> None:
    """Fail (not skip) a test whose image the bootstrap should have built."""
    if docker("image", "inspect", image, check=False).returncode != 0:
        pytest.fail(f"image {image} missing: run scripts/bootstrap.sh")
