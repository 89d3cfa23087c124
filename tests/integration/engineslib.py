"""Run the same app container under Docker, Podman or containerd (ctr), alike.

The cross-engine tests start an app under one engine and its replacement
under another on the same host directory. Each engine here turns the same
request (a name, the checkpoint directory, environment, capabilities) into its
own command line, and each `App` answers the same questions (exec, logs, exit
code) however its engine spells them. Every container is made with the
settings CRIU needs (README "Container settings") and no network: loopback
only.

What differs between engines, verified on this machine:
- Podman's default capability set lacks NET_RAW, MKNOD and AUDIT_WRITE
  (Docker's and containerd's have them); `podman_default_caps=False` adds them.
- Podman's runc here cannot raise rlimits (no CAP_SYS_RESOURCE in this
  machine's bounding set): PODMAN_ULIMITS keeps them at what it has.
- ctr applies no seccomp profile and no AppArmor profile unless asked; it has
  no network unless --net-host or --cni; its ids are names; it has no `wait`
  and no exit status but a warning of `ctr task rm`; with --log-uri file://
  the container's stdout and stderr are pipes whose other end the shim copies
  to that file (without it: pipes to FIFOs that nobody reads once ctr -d left).
"""

from __future__ import annotations

import abc
import re
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

from dockerlib import HTTP_CLIENT, sleep_until

CRIU_CAPABILITIES = ("SYS_ADMIN", "SYS_PTRACE", "SYS_TIME", "NET_ADMIN")
# Docker's default set has these, Podman's does not (containers.conf default_capabilities); bits 13, 27, 29.
DOCKER_ONLY_CAPABILITIES = ("NET_RAW", "MKNOD", "AUDIT_WRITE")
DOCKER_ONLY_CAPABILITIES_MASK = 1 << 13 | 1 << 27 | 1 << 29
PODMAN_ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
SECURITY_UNCONFINED = ["--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"]

# The kv app's processes (tini and python3 -u /app/kv.py), seen from beside them in the container: not PID 1
# (the supervisor, whose command line names the app too) and not the process looking.
APP_PIDS = (
    "import os\n"
    "def app_pids():\n"
    "    for pid in filter(str.isdigit, os.listdir('/proc')):\n"
    "        try:\n"
    "            argv = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')\n"
    "        except OSError:\n"
    "            continue\n"
    "        if b'/app/kv.py' in argv and int(pid) not in (1, os.getpid()):\n"
    "            yield pid\n"
)
# For each app process: whether its stdout and stderr are the container's (PID 1's). After a restore they
# are only if CRIU's inherit-fd reconnected them to this engine's stdio.
APP_STDIO = APP_PIDS + (
    "def fds(pid):\n"
    "    return [os.readlink(f'/proc/{pid}/fd/{fd}') for fd in (1, 2)]\n"
    "for pid in app_pids():\n"
    "    print(pid, fds(pid) == fds(1), *fds(pid), *fds(1))\n"
)
# The permitted capabilities of the app's processes, one hex number per process.
APP_CAPABILITIES = APP_PIDS + (
    "for pid in app_pids():\n"
    "    print([line for line in open(f'/proc/{pid}/status') if line.startswith('CapPrm')][0].split()[1])\n"
)


def command(argv: Sequence[str], *, check: bool = True, timeout: float = 120,
            stdin: int | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=stdin)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


class App(abc.ABC):
    """One container running the app, under some engine."""

    engine: str

    def __init__(self, name: str) -> None:
        self.name = name

    @abc.abstractmethod
    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]: ...

    @abc.abstractmethod
    def logs(self) -> str: ...

    @abc.abstractmethod
    def send_sigterm(self) -> None: ...

    @abc.abstractmethod
    def exit_code(self) -> int | None:
        """None while it runs."""

    @abc.abstractmethod
    def remove(self) -> None: ...

    @abc.abstractmethod
    def container_id(self) -> str:
        """The id the engine knows the container by."""

    def http(self, method: str, path: str, body: str | None = None) -> str:
        return self.exec("python3", "-c", HTTP_CLIENT, method, path, *([body] if body is not None else [])
                         ).stdout.strip()

    def wait_healthy(self, timeout: float = 90) -> None:
        def answers() -> bool:
            if self.exit_code() is not None:
                raise AssertionError(f"{self.name} exited {self.exit_code()} before answering:\n{self.logs()}")
            return self.exec("python3", "-c", HTTP_CLIENT, "GET", "/health", check=False).returncode == 0

        sleep_until(answers, timeout, interval=0.2, what=f"{self.name} ({self.engine}) to answer HTTP")

    def wait_exit(self, timeout: float = 90) -> int:
        sleep_until(lambda: self.exit_code() is not None, timeout, interval=0.1,
                    what=f"{self.name} ({self.engine}) to exit")
        code = self.exit_code()
        assert code is not None
        return code

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM to PID 1, as the engine's own stop does first: the final checkpoint, then exit."""
        self.send_sigterm()
        return self.wait_exit(timeout)

    def app_stdio(self) -> list[str]:
        """One line per app process: 'PID True|False its-fd1 its-fd2 pid1-fd1 pid1-fd2'."""
        return self.exec("python3", "-c", APP_STDIO).stdout.splitlines()

    def app_capabilities(self) -> int:
        """Every capability any of the app's processes may use (CapPrm)."""
        held = 0
        for line in self.exec("python3", "-c", APP_CAPABILITIES).stdout.split():
            held |= int(line, 16)
        return held


class ContainerEngine(abc.ABC):
    kind: str

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.apps: list[App] = []
        self._count = 0

    def run(self, directory: Path, env: dict[str, str] | None = None, *, podman_default_caps: bool = False,
            extra: Sequence[str] = ()) -> App:
        """The app with the CRIU settings and `directory` at /checkpoints."""
        self._count += 1
        app = self._run(f"{self.prefix}-{self.kind}{self._count}", directory, env or {}, podman_default_caps,
                        list(extra))
        return app

    @abc.abstractmethod
    def _run(self, name: str, directory: Path, env: dict[str, str], podman_default_caps: bool,
             extra: list[str]) -> App: ...

    def print_logs(self) -> None:
        for app in self.apps:
            print(f"----- {self.kind} logs of {app.name} -----\n{app.logs()}")

    def cleanup(self) -> None:
        for app in self.apps:
            app.remove()
        self.apps.clear()


# --- Docker and Podman: the same command line, nearly -------------------------------------------------------------
class CliApp(App):
    def __init__(self, program: str, name: str) -> None:
        super().__init__(name)
        self.program = program
        self.engine = program

    def _cli(self, *argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return command([self.program, *argv], check=check, timeout=timeout)

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._cli("exec", self.name, *argv, check=check)

    def logs(self) -> str:
        result = self._cli("logs", self.name, check=False)
        return result.stdout + result.stderr

    def send_sigterm(self) -> None:
        self._cli("kill", "--signal", "TERM", self.name)

    def exit_code(self) -> int | None:
        status, code = self._cli("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", self.name).stdout.split()
        return int(code) if status in ("exited", "stopped") else None

    def remove(self) -> None:
        self._cli("rm", "-f", "-v", self.name, check=False)

    def container_id(self) -> str:
        return self._cli("inspect", "-f", "{{.Id}}", self.name).stdout.strip()


class DockerEngine(ContainerEngine):
    kind = "docker"

    def __init__(self, prefix: str, image: str) -> None:
        super().__init__(prefix)
        self.image = image

    def _run(self, name: str, directory: Path, env: dict[str, str], podman_default_caps: bool,
             extra: list[str]) -> App:
        assert not podman_default_caps, "Docker's default set is what it is"
        app = CliApp("docker", name)
        self.apps.append(app)
        command(["docker", "run", "-d", "--name", name, "--network", "none",
                 *[arg for cap in CRIU_CAPABILITIES for arg in ("--cap-add", cap)], *SECURITY_UNCONFINED,
                 "-v", f"{directory}:/checkpoints", *[f"--env={key}={value}" for key, value in env.items()],
                 *extra, self.image])
        return app


class PodmanEngine(ContainerEngine):
    kind = "podman"

    def __init__(self, prefix: str, image: str) -> None:
        super().__init__(prefix)
        self.image = image

    def _run(self, name: str, directory: Path, env: dict[str, str], podman_default_caps: bool,
             extra: list[str]) -> App:
        capabilities = CRIU_CAPABILITIES + (() if podman_default_caps else DOCKER_ONLY_CAPABILITIES)
        app = CliApp("podman", name)
        self.apps.append(app)
        command(["podman", "run", "-d", "--name", name, "--network", "none",
                 *[arg for cap in capabilities for arg in ("--cap-add", cap)], *SECURITY_UNCONFINED, *PODMAN_ULIMITS,
                 "-v", f"{directory}:/checkpoints", *[f"--env={key}={value}" for key, value in env.items()],
                 *extra, self.image])
        return app


# --- containerd, through ctr ---------------------------------------------------------------------------------
class Ctr:
    """`ctr` against our own containerd, in our own namespace."""

    def __init__(self, address: str, namespace: str, state_dir: Path) -> None:
        self.address = address
        self.namespace = namespace
        self.state_dir = state_dir  # runc's root and exec FIFOs: kept out of /run/containerd

    def __call__(self, *argv: str, check: bool = True, timeout: float = 120,
                 stdin: int | None = None) -> subprocess.CompletedProcess[str]:
        return command(["ctr", "--address", self.address, "-n", self.namespace, *argv], check=check,
                       timeout=timeout, stdin=stdin)


class CtrApp(App):
    engine = "containerd"

    def __init__(self, ctr: Ctr, name: str, log: Path) -> None:
        super().__init__(name)
        self.ctr = ctr
        self.log = log
        self._exit_code: int | None = None

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ctr("task", "exec", "--exec-id", f"exec-{uuid.uuid4().hex[:12]}", "--fifo-dir",
                        str(self.ctr.state_dir / "fifo"), self.name, *argv, check=check)

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def send_sigterm(self) -> None:
        self.ctr("task", "kill", "--signal", "SIGTERM", self.name)

    def _status(self) -> str | None:
        for line in self.ctr("task", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == self.name:
                return fields[-1]
        return None

    def exit_code(self) -> int | None:
        if self._exit_code is not None or self._status() != "STOPPED":
            return self._exit_code
        # ctr has no `wait`; deleting a stopped task is how it tells the exit status: a warning
        # "task NAME exit with non-zero exit code N" (containerd cmd/ctr/commands/tasks/delete.go), else 0.
        result = self.ctr("task", "rm", self.name)
        match = re.search(r"exit with non-zero exit code (\d+)", result.stderr)
        self._exit_code = int(match.group(1)) if match else 0
        return self._exit_code

    def remove(self) -> None:
        if self._status() not in (None, "STOPPED"):
            self.ctr("task", "kill", "--signal", "SIGKILL", self.name, check=False)
            sleep_until(lambda: self._status() in (None, "STOPPED"), 30, what=f"{self.name} to die")
        if self._status() is not None:
            self.ctr("task", "rm", "--force", self.name, check=False)
        self.ctr("containers", "rm", self.name, check=False)  # with its snapshot

    def container_id(self) -> str:
        return self.name  # ctr's ids are the names given to `ctr run`


class ContainerdEngine(ContainerEngine):
    kind = "containerd"

    def __init__(self, prefix: str, ctr: Ctr, image_ref: str, log_dir: Path) -> None:
        super().__init__(prefix)
        self.ctr = ctr
        self.image_ref = image_ref
        self.log_dir = log_dir

    def _run(self, name: str, directory: Path, env: dict[str, str], podman_default_caps: bool,
             extra: list[str]) -> App:
        assert not podman_default_caps, "containerd's default set is Docker's"
        log = self.log_dir / f"{name}.log"
        app = CtrApp(self.ctr, name, log)
        self.apps.append(app)
        # No --seccomp: ctr then applies no profile; no --net-host / --cni: loopback only.
        self.ctr("run", "-d", "--runc-root", str(self.ctr.state_dir / "runc"), "--log-uri", f"file://{log}",
                 *[arg for cap in CRIU_CAPABILITIES for arg in ("--cap-add", f"CAP_{cap}")],
                 "--mount", f"type=bind,src={directory},dst=/checkpoints,options=rbind:rw",
                 *[arg for key, value in env.items() for arg in ("--env", f"{key}={value}")],
                 *extra, self.image_ref, name)
        return app
