"""The drop-in bundle in images that are not ours (issue 16).

Each image copies /opt/criu-supervisor out of criu-supervisor:latest and sets
the supervisor as its ENTRYPOINT, nothing else (examples/drop-in-*):

- drop-in-bookworm: Debian bookworm (glibc 2.36, made with debootstrap by
  scripts/bootstrap.sh) with its own Python 3.11, a counter in memory;
- drop-in-memcached: Debian's memcached on debian:trixie-slim, no Python at all;
- drop-in-static: a static counter binary FROM scratch: no libc, no shell, no /tmp.

Each migrates three hops, A -> B -> C -> D, with the supervisor as PID 1 and
real CRIU on one volume; its state is asked after every hop (through the
bundle's own Python: the images have no client of their own). The app's
environment must be the one the engine gave PID 1, and nothing of the bundle
may be loaded into the app or change the image's files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from dockerlib import BASE_IMAGE, Container, Docker, containers_named, docker, need_image, sleep_until

HOPS = 3
BUNDLED_PYTHON = "/opt/criu-supervisor/bin/python3"

# One request on a TCP port of 127.0.0.1, run with the bundle's Python inside the container: PORT REQUEST;
# prints the first line of the answer.
ASK = (
    "import socket, sys\n"
    "connection = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)\n"
    "connection.sendall(sys.argv[2].encode().decode('unicode_escape').encode())\n"
    "print(connection.makefile().readline().strip())\n"
)

# The app's process (the oldest named `comm`, other than this inspector): its environment, whether anything
# of the bundle is mapped into it, and PID 1's environment as the engine gave it. JSON on stdout.
INSPECT = (
    "import json, os, sys\n"
    "def environ(pid):\n"
    "    entries = open(f'/proc/{pid}/environ', 'rb').read().split(b'\\0')\n"
    "    return sorted(entry.decode() for entry in entries if entry)\n"
    "pids = [p for p in os.listdir('/proc') if p.isdigit() and p != str(os.getpid())\n"
    "        and open(f'/proc/{p}/comm').read().strip() == sys.argv[1]]\n"
    "app = min(pids, key=int)\n"
    "maps = open(f'/proc/{app}/maps').read()\n"
    "print(json.dumps({'app': environ(app), 'pid1': environ(1), 'bundle_mapped': '/opt/criu-supervisor' in maps,\n"
    "                  'pid1_comm': open('/proc/1/comm').read().strip()}))\n"
)


@dataclass(frozen=True)
class App:
    image: str
    comm: str  # the app's process name
    port: int
    first: str  # the request that starts its state
    incr: str  # the request that adds one, answered with the new state
    state: Callable[[str], int]  # the count in an answer to `incr`


def counter_state(answer: str) -> int:
    """'count=N born=T ...' -> N."""
    return int(dict(field.split("=", 1) for field in answer.split())["count"])


APPS = {
    "bookworm": App("criu-supervisor-example-drop-in-bookworm:latest", "python3", 7000, "get\\n", "incr\\n",
                    counter_state),
    "memcached": App("criu-supervisor-example-drop-in-memcached:latest", "memcached", 11211,
                     "set hops 0 0 1\\r\\n0\\r\\n", "incr hops 1\\r\\n", int),
    "static": App("criu-supervisor-example-drop-in-static:latest", "counter", 7000, "get\\n", "incr\\n",
                  counter_state),
}


@pytest.fixture(name="engine")
def engine_fixture() -> Iterator[Docker]:
    with containers_named("cs-dropin") as engine:
        yield engine


def ask(container: Container, app: App, request: str, check: bool = True) -> str:
    result = container.exec(BUNDLED_PYTHON, "-c", ASK, str(app.port), request, check=check)
    return result.stdout.strip() if result.returncode == 0 else ""


def inspect(container: Container, app: App) -> dict[str, Any]:
    return json.loads(container.exec(BUNDLED_PYTHON, "-c", INSPECT, app.comm).stdout)


def assert_the_app_is_left_alone(container: Container, app: App, started_with: list[str] | None = None) -> list[str]:
    """Its environment is PID 1's as the engine started it; no bundle library is in it; no image file changed.

    `started_with`: for a restored app, the environment it had when it started fresh (CRIU restores it as it
    was, HOSTNAME of the first container included). Returns the app's environment.
    """
    seen = inspect(container, app)
    assert seen["pid1_comm"] == "criu-supervisor", seen
    # No LC_CTYPE, LD_LIBRARY_PATH, PYTHONPATH or PATH of ours:
    assert seen["app"] == (seen["pid1"] if started_with is None else started_with), seen
    assert not any(entry.split("=", 1)[0].startswith(("LD_", "PYTHON")) for entry in seen["app"]), seen
    assert seen["bundle_mapped"] is False, seen
    changes = docker("diff", container.name).stdout.split("\n")
    # Only additions: the control socket and CRIU's kernel cache in /run, CRIU's probe in /tmp (made if none).
    touched = [line for line in changes if line and not line.startswith("A ") and line not in ("C /run", "C /tmp")]
    assert touched == [], changes
    return list(seen["app"])


@pytest.mark.parametrize("name", sorted(APPS))
def test_an_image_that_is_not_ours_migrates_three_hops_with_its_state(engine: Docker, name: str) -> None:
    app = APPS[name]
    need_image(app.image)
    volume = engine.volume()
    environment = {"APP_SETTING": "kept as given"}
    container = engine.run(app.image, volume=volume, env=environment)
    sleep_until(lambda: ask(container, app, app.first, check=False), 60, interval=0.2, what=f"{name} to answer")
    assert app.state(ask(container, app, app.incr)) == 1
    started_with = assert_the_app_is_left_alone(container, app)
    identity = ask(container, app, app.first) if app.comm != "memcached" else ""
    for number in range(1, HOPS + 1):
        assert container.stop(timeout=60) == 0, container.logs()
        assert f"final checkpoint gen-{number:08d} published" in container.logs(), container.logs()
        container = engine.run(app.image, volume=volume, env=environment)
        container.wait_log(rf"restored gen-{number:08d}\b", timeout=120)
        sleep_until(lambda c=container: ask(c, app, app.incr, check=False), 60, interval=0.2,
                    what=f"{name} to answer after hop {number}")
        # Asked once by the wait above, once here: the count went on from where it was.
        assert app.state(ask(container, app, app.incr)) == number * 2 + 1, f"hop {number}"
        if identity:  # the same process, not a fresh one that happens to count alike
            assert ask(container, app, app.first).split()[1] == identity.split()[1]
    assert_the_app_is_left_alone(container, app, started_with)
    logs = container.logs()
    assert "Traceback" not in logs and "ERROR" not in logs, logs


def test_the_bundle_is_small_and_the_base_image_is_the_bundle_on_trixie_slim() -> None:
    """Issue 16's sizes: the bundle at most 80 MB, the base image at most 160 MB (docker image inspect)."""
    base = json.loads(docker("image", "inspect", BASE_IMAGE).stdout)[0]["Size"]
    bundle = int(docker("run", "--rm", "--entrypoint", "du", BASE_IMAGE, "-sb", "/opt/criu-supervisor")
                 .stdout.split()[0])
    print(f"base image {base / 1e6:.1f} MB, bundle {bundle / 1e6:.1f} MB")
    assert bundle <= 80e6, bundle
    assert base <= 160e6, base
