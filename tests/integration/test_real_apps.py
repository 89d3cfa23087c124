"""Popular servers migrate unchanged (issue 6).

Each app is Debian's own package behind `FROM criu-supervisor:latest` with its
usual command line (examples/nginx, memcached, node, sysv-shm). Each makes
three hops, A -> B -> C -> D, in real containers on one named volume with the
supervisor as PID 1 and real CRIU; after every hop its state is read from
outside the app: over loopback from a process beside it in the container
(`docker exec`), from /proc, or from its own output in `docker logs`.

PIDs are compared inside the app's PID namespace (the last field of NSpid in
/proc/PID/status, or what the app itself reports): `docker exec ps` shows the
container's PIDs, which differ from one container to the next.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from dockerlib import Container, Docker, docker, sleep_until

NGINX_IMAGE = "criu-supervisor-example-nginx:latest"
MEMCACHED_IMAGE = "criu-supervisor-example-memcached:latest"
NODE_IMAGE = "criu-supervisor-example-node:latest"
SYSV_SHM_IMAGE = "criu-supervisor-example-sysv-shm:latest"
HOPS = 3  # A -> B -> C -> D

# Every process in the container, as JSON: its PID here and in the app's
# namespace (last NSpid field), its name, command line and open fd targets.
PROCESSES = (
    "import json, os\n"
    "found = []\n"
    "for entry in filter(str.isdigit, os.listdir('/proc')):\n"
    "    try:\n"
    "        fields = dict(line.split(':', 1) for line in open(f'/proc/{entry}/status') if ':' in line)\n"
    "        cmdline = open(f'/proc/{entry}/cmdline', 'rb').read().replace(b'\\0', b' ').decode().strip()\n"
    "        fds = []\n"
    "        for fd in os.listdir(f'/proc/{entry}/fd'):\n"
    "            try:\n"
    "                fds.append(os.readlink(f'/proc/{entry}/fd/{fd}'))\n"
    "            except OSError:\n"
    "                pass\n"
    "    except OSError:\n"
    "        continue  # exited meanwhile\n"
    "    found.append({'pid': int(entry), 'nspid': int(fields['NSpid'].split()[-1]),\n"
    "                  'name': fields['Name'].strip(), 'cmdline': cmdline, 'fds': fds})\n"
    "print(json.dumps(found))\n"
)

# GETs a URL on loopback COUNT times (a new connection each), as JSON.
NGINX_CLIENT = (
    "import json, sys, urllib.request\n"
    "replies = []\n"
    "for _ in range(int(sys.argv[2])):\n"
    "    with urllib.request.urlopen('http://127.0.0.1:8080' + sys.argv[1], timeout=5) as reply:\n"
    "        replies.append({'status': reply.status, 'body': reply.read().decode(),\n"
    "                        'worker': int(reply.headers['X-Worker-Pid']),\n"
    "                        'connection': int(reply.headers['X-Connection'])})\n"
    "print(json.dumps(replies))\n"
)

# Sends memcached text-protocol commands (argv[1], with \\r\\n escapes) and
# prints everything it answers until it closes the connection.
MEMCACHED_CLIENT = (
    "import socket, sys\n"
    "with socket.create_connection(('127.0.0.1', 11211), timeout=5) as connection:\n"
    "    connection.sendall(sys.argv[1].replace('\\\\r\\\\n', '\\r\\n').encode())\n"
    "    connection.shutdown(socket.SHUT_WR)  # memcached answers everything, then closes\n"
    "    answer = b''\n"
    "    while chunk := connection.recv(65536):\n"
    "        answer += chunk\n"
    "print(answer.decode(), end='')\n"
)

# A request to the node example: METHOD PATH; prints the body.
NODE_CLIENT = (
    "import sys, urllib.request\n"
    "data = b'' if sys.argv[1] == 'POST' else None\n"
    "request = urllib.request.Request('http://127.0.0.1:8080' + sys.argv[2], data=data, method=sys.argv[1])\n"
    "print(urllib.request.urlopen(request, timeout=5).read().decode())\n"
)


@pytest.fixture(scope="module", autouse=True)
def _example_images_exist() -> None:
    for image in (NGINX_IMAGE, MEMCACHED_IMAGE, NODE_IMAGE, SYSV_SHM_IMAGE):
        if docker("image", "inspect", image, check=False).returncode != 0:
            pytest.fail(f"image {image} missing: run scripts/bootstrap.sh")


def processes(container: Container) -> list[dict[str, Any]]:
    return json.loads(container.exec("python3", "-c", PROCESSES).stdout)


def app_processes(container: Container, name: str) -> list[dict[str, Any]]:
    """The app's processes called `name`: those in a PID namespace of their own (NSpid differs)."""
    return [p for p in processes(container) if p["name"] == name and p["nspid"] != p["pid"]]


def answers(container: Container, *command: str) -> bool:
    return container.exec(*command, check=False).returncode == 0


def stop_for_migration(container: Container, number: int) -> None:
    """docker stop: the supervisor publishes final checkpoint `number` and exits 0."""
    assert container.stop(timeout=60) == 0, container.logs()
    assert f"final checkpoint gen-{number:08d} published" in container.logs(), container.logs()


def restore(engine: Docker, image: str, volume: str, number: int, ready: Callable[[Container], bool]) -> Container:
    """A replacement container on the same volume; returned once it restored `number` and is `ready`."""
    replacement = engine.run(image, volume=volume)
    replacement.wait_log(rf"restored gen-{number:08d}\b", timeout=90)
    sleep_until(lambda: ready(replacement), 60, interval=0.2, what=f"{replacement.name} to answer")
    return replacement


def hop(engine: Docker, image: str, container: Container, volume: str, number: int,
        ready: Callable[[Container], bool]) -> Container:
    stop_for_migration(container, number)
    return restore(engine, image, volume, number, ready)


# --- nginx: a master and two workers ----------------------------------------


def nginx_tree(container: Container) -> tuple[int, list[int]]:
    """(master, sorted workers) as PIDs inside the app's namespace."""
    nginx = app_processes(container, "nginx")
    masters = [p["nspid"] for p in nginx if p["cmdline"].startswith("nginx: master process")]
    workers = sorted(p["nspid"] for p in nginx if p["cmdline"].startswith("nginx: worker process"))
    assert len(masters) == 1 and len(workers) == 2, nginx
    return masters[0], workers


def nginx_get(container: Container, count: int = 6) -> list[dict[str, Any]]:
    return json.loads(container.exec("python3", "-c", NGINX_CLIENT, "/", str(count)).stdout)


def nginx_ready(container: Container) -> bool:
    return answers(container, "python3", "-c", NGINX_CLIENT, "/health", "1")


def test_nginx_keeps_its_master_workers_and_shared_memory_over_three_hops(engine: Docker) -> None:
    volume = engine.volume()
    container = engine.run(NGINX_IMAGE, volume=volume)
    sleep_until(lambda: nginx_ready(container), 60, interval=0.2, what="nginx to answer")
    master, workers = nginx_tree(container)
    assert len(re.findall(r"start worker process \d+", container.logs())) == 2
    last_connection = 0
    for number in range(1, HOPS + 1):
        replies = nginx_get(container)
        for reply in replies:
            assert reply["status"] == 200 and "criu-supervisor nginx example" in reply["body"], reply
            assert reply["worker"] in workers, (reply, workers)
        # nginx's connection serial number lives in memory shared by master and
        # workers: it goes on from where it was instead of starting at 1 again.
        connections = [reply["connection"] for reply in replies]
        assert connections == sorted(connections) and connections[0] > last_connection, (connections, number)
        last_connection = connections[-1]

        container = hop(engine, NGINX_IMAGE, container, volume, number, nginx_ready)
        assert nginx_tree(container) == (master, workers), f"hop {number}"
        logs = container.logs()
        assert "start worker process" not in logs, logs  # the same nginx, not a fresh start
    replies = nginx_get(container)
    assert all(reply["worker"] in workers for reply in replies), (replies, workers)
    assert replies[0]["connection"] > last_connection


# --- memcached ----------------------------------------------------------------


def memcached(container: Container, commands: str) -> str:
    """The answer, with memcached's \\r\\n line ends read as \\n (docker() decodes text with universal newlines)."""
    return container.exec("python3", "-c", MEMCACHED_CLIENT, commands).stdout


def memcached_stats(container: Container) -> dict[str, str]:
    return dict(re.findall(r"^STAT (\S+) (\S+)$", memcached(container, "stats\\r\\n"), re.MULTILINE))


def memcached_ready(container: Container) -> bool:
    return answers(container, "python3", "-c", MEMCACHED_CLIENT, "version\\r\\n")


def memcached_values(container: Container, keys: list[str]) -> dict[str, str]:
    answer = memcached(container, f"get {' '.join(keys)}\\r\\n")
    return dict(re.findall(r"^VALUE (\S+) 0 \d+\n(.*)$", answer, re.MULTILINE))


def test_memcached_keeps_every_item_over_three_hops(engine: Docker) -> None:
    volume = engine.volume()
    container = engine.run(MEMCACHED_IMAGE, volume=volume)
    sleep_until(lambda: memcached_ready(container), 60, interval=0.2, what="memcached to answer")
    before = {f"key{n}": f"value {n} set before the first hop" for n in range(50)}
    sets = "".join(f"set {key} 0 0 {len(value)}\\r\\n{value}\\r\\n" for key, value in before.items())
    assert memcached(container, sets).split() == ["STORED"] * len(before)
    expected = dict(before)
    started = memcached_stats(container)
    for number in range(1, HOPS + 1):
        key, value = f"hop{number}", f"set just before hop {number}"
        assert memcached(container, f"set {key} 0 0 {len(value)}\\r\\n{value}\\r\\n") == "STORED\n"
        expected[key] = value
        container = hop(engine, MEMCACHED_IMAGE, container, volume, number, memcached_ready)
        assert memcached_values(container, sorted(expected)) == expected, f"hop {number}"
        stats = memcached_stats(container)
        assert stats["pid"] == started["pid"]  # its PID inside the app's namespace is kept
        assert int(stats["curr_items"]) == len(expected)
        assert int(stats["total_items"]) == len(expected)  # no item was set again behind our back
        assert int(stats["uptime"]) >= int(started["uptime"])
    assert memcached_values(container, sorted(before)) == before  # all there after the third hop


# --- Node.js with the default settings (io_uring denied) -----------------------


def node(container: Container, method: str, path: str) -> str:
    return container.exec("python3", "-c", NODE_CLIENT, method, path).stdout.strip()


def node_ready(container: Container) -> bool:
    return answers(container, "python3", "-c", NODE_CLIENT, "GET", "/health")


def io_uring_fds(container: Container) -> list[str]:
    return [fd for p in app_processes(container, "node") for fd in p["fds"] if "io_uring" in fd]


def test_node_keeps_counting_over_three_hops_with_default_settings(engine: Docker) -> None:
    volume = engine.volume()
    container = engine.run(NODE_IMAGE, volume=volume)  # no CKPT_* settings at all
    sleep_until(lambda: node_ready(container), 60, interval=0.2, what="node to answer")
    assert io_uring_fds(container) == []  # CKPT_IO_URING=deny: libuv fell back to epoll
    started = json.loads(node(container, "GET", "/stats"))
    count = 0
    for number in range(1, HOPS + 1):
        for _ in range(2):
            count += 1
            assert node(container, "POST", "/count") == str(count)
        container = hop(engine, NODE_IMAGE, container, volume, number, node_ready)
        assert node(container, "GET", "/count") == str(count), f"hop {number}"
        stats = json.loads(node(container, "GET", "/stats"))
        assert (stats["pid"], stats["started"]) == (started["pid"], started["started"])
        assert "listening on" not in container.logs()  # the same node, not a fresh start
    assert node(container, "POST", "/count") == str(count + 1)


def test_node_with_io_uring_allowed_cannot_be_dumped_and_stops_gracefully(engine: Docker) -> None:
    volume = engine.volume()
    container = engine.run(NODE_IMAGE, volume=volume, env={"CKPT_IO_URING": "allow"})
    sleep_until(lambda: node_ready(container), 60, interval=0.2, what="node to answer")
    # Node.js 20 (libuv 1.4x) opens io_uring rings as soon as it may, even with
    # UV_USE_IO_URING=0: this is what the default CKPT_IO_URING=deny prevents.
    assert io_uring_fds(container), "node opened no io_uring ring: this test no longer shows anything"
    assert node(container, "POST", "/count") == "1"
    assert container.stop(timeout=60) == 0  # the app's own graceful stop exits 0
    logs = container.logs()
    failure = re.search(r"ERROR: checkpoint failed: .*", logs)
    assert failure and "io_uring" in failure.group() and "CKPT_IO_URING" in failure.group(), logs
    assert "falling back to the app's own graceful stop" in logs
    assert "graceful stop at count 1" in logs  # node's SIGTERM handler ran
    assert engine.generations(volume) == []  # nothing half-made was published


# --- SysV shared memory and semaphores ----------------------------------------

TICK = re.compile(r"^tick shm_counter=(\d+) sem_ticks=(\d+) shmid=(\d+) semid=(\d+)$", re.MULTILINE)
SEM_WRAP = 10000  # as in examples/sysv-shm/shm_counter.py


def shm_ticks(container: Container) -> list[tuple[int, ...]]:
    return [tuple(map(int, match)) for match in TICK.findall(container.stdout())]


def shm_read_from_outside(container: Container) -> tuple[int, ...]:
    """The IPC objects' values, read by a new process joining the app's IPC namespace.

    It takes the app's lock semaphore first (and fails after 5 s): that it
    gets it shows the lock's value was carried as "free".
    """
    (app,) = app_processes(container, "python3")
    line = container.exec("nsenter", "--ipc", f"--target={app['pid']}",
                          "python3", "/app/shm_counter.py", "--read").stdout
    match = TICK.search(line)
    assert match, line
    return tuple(map(int, match.groups()))


def test_sysv_shared_memory_and_semaphores_are_carried_over_three_hops(engine: Docker) -> None:
    volume = engine.volume()
    container = engine.run(SYSV_SHM_IMAGE, volume=volume)
    sleep_until(lambda: len(shm_ticks(container)) >= 3, 60, what="shm ticks")
    # The objects live in the app's own IPC namespace, not the container's.
    assert "No such file" in container.exec("python3", "/app/shm_counter.py", "--read", check=False).stderr
    identity = shm_ticks(container)[-1][2:]  # (shmid, semid)
    for number in range(1, HOPS + 1):
        seen_from_outside = shm_read_from_outside(container)
        assert seen_from_outside[2:] == identity and seen_from_outside[0] % SEM_WRAP == seen_from_outside[1]
        stop_for_migration(container, number)
        last = shm_ticks(container)[-1]
        container = restore(engine, SYSV_SHM_IMAGE, volume, number,
                            lambda c, last=last: any(t[0] > last[0] + 2 for t in shm_ticks(c)))
        ticks = shm_ticks(container)
        # The counter goes on at exactly the next value, the semaphore with it.
        assert ticks[0][0] == last[0] + 1, (last, ticks[:3])
        for counter, sem_ticks, *ids in ticks:
            assert sem_ticks == counter % SEM_WRAP and tuple(ids) == identity
        assert shm_read_from_outside(container)[0] > last[0]
        assert "shm counter started" not in container.stdout()


PROC_FILES_IMAGE = "criu-supervisor-example-proc-files:latest"


def test_an_app_holding_files_under_its_own_proc_migrates_with_ckpt_own_proc(engine: Docker) -> None:
    volume = engine.volume()
    app = engine.run(PROC_FILES_IMAGE, volume=volume)  # the image sets CKPT_OWN_PROC=1
    app.wait_log(r"tick 3 ")
    for hop in range(1, 4):
        last = int(re.findall(r"tick (\d+) ", app.stdout())[-1])
        assert app.stop() == 0, app.logs()
        app = engine.run(PROC_FILES_IMAGE, volume=volume)
        app.wait_log(rf"tick {last + 2} status-of-pid (\d+) mine \1")  # the fd still reads its own status
        assert f"restored gen-{hop:08d}" in app.logs()
    # The app's mounts from the container are the new container's, not the old one's.
    assert "/checkpoints" in app.exec("cat", "/proc/1/mountinfo").stdout

