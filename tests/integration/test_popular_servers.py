"""Popular servers with the default settings, and the failures they used to hit, each explained (issue 14).

Each app is Debian's own package (or a program built from Debian's golang)
behind `FROM criu-supervisor:latest`, run as root on loopback: examples/mariadb,
redis-aof, go-http, php-jit, zdtm-like. Each migrates three hops, A -> B -> C
-> D, in real containers on one named volume with the supervisor as PID 1 and
real CRIU; after every hop its state and identity are read from outside the
app (a client beside it in the container, /proc, or its own output).

Files the app does not hold open at the dump (MariaDB's other table files,
Redis's append-only manifest and base file) travel with the container's
writable layer, which every checkpoint carries whole: no setting is needed.

The images are the ones scripts/bootstrap.sh builds (criu-supervisor-example-
NAME:latest); CS_APPS_IMAGE_PREFIX=cs-apps- runs the tests on images built
under other tags (e.g. from a working tree, while CI's are rebuilt).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator

import pytest
from dockerlib import Container, Docker, containers_named, need_image, sleep_until

HOPS = 3  # A -> B -> C -> D
PREFIX = os.environ.get("CS_APPS_IMAGE_PREFIX", "criu-supervisor-example-")
MARIADB_IMAGE, REDIS_IMAGE, GO_IMAGE, PHP_IMAGE, ZDTM_IMAGE = (
    f"{PREFIX}{name}:latest" for name in ("mariadb", "redis-aof", "go-http", "php-jit", "zdtm-like"))
# Default settings: what these apps keep on disk but not open comes along with the writable layer.
MARIADB_STATE: dict[str, str] = {}
REDIS_STATE: dict[str, str] = {}

# A request to an HTTP example on 127.0.0.1:8080: METHOD PATH; prints the body.
HTTP_CLIENT = (
    "import sys, urllib.request\n"
    "data = b'' if sys.argv[1] == 'POST' else None\n"
    "request = urllib.request.Request('http://127.0.0.1:8080' + sys.argv[2], data=data, method=sys.argv[1])\n"
    "print(urllib.request.urlopen(request, timeout=5).read().decode())\n"
)


@pytest.fixture(name="apps")
def apps_fixture() -> Iterator[Docker]:
    """Containers and volumes named cs-apps-*, removed at teardown even when the test fails."""
    with containers_named("cs-apps") as engine:
        yield engine


def answers(container: Container, *command: str) -> bool:
    return container.exec(*command, check=False).returncode == 0


def stop_for_migration(container: Container, number: int) -> str:
    """docker stop: the supervisor publishes final checkpoint `number` and exits 0; returns the old container's log."""
    assert container.stop(timeout=60) == 0, container.logs()
    logs = container.logs()
    assert f"final checkpoint gen-{number:08d} published" in logs, logs
    return logs


def hop(apps: Docker, image: str, container: Container, volume: str, number: int,
        ready: Callable[[Container], bool], env: dict[str, str] | None = None) -> Container:
    """Checkpoint `container`, restore a replacement on the same volume; returned once it answers."""
    stop_for_migration(container, number)
    replacement = apps.run(image, volume=volume, env=env)
    replacement.wait_log(rf"restored gen-{number:08d}\b", timeout=120)
    sleep_until(lambda: ready(replacement), 60, interval=0.2, what=f"{replacement.name} to answer")
    return replacement


def one_checkpoint_failure(container: Container) -> tuple[str, str]:
    """docker stop with a dump that fails: (CRIU's quoted line, the advice), the app stopped on its own SIGTERM."""
    code = container.stop(timeout=60)
    logs = container.logs()
    errors = [line for line in logs.splitlines() if "ERROR: checkpoint failed: " in line]
    assert len(errors) == 1, logs
    assert "falling back to the app's own graceful stop" in logs, logs
    assert code in (0, 143), logs  # its own graceful stop, or killed by the SIGTERM it does not handle
    line, _, advice = errors[0].partition(" -> ")
    assert re.search(r"\(full CRIU log: /checkpoints/default/logs/dump-\S+\.log\)\r?$", advice), logs
    return line, advice


# --- MariaDB: InnoDB tables, file locks -----------------------------------------------------------------------


def sql(container: Container, statement: str) -> str:
    return container.exec("mariadb", "-uroot", "--batch", "--skip-column-names", "-e", statement).stdout.strip()


def mariadb_ready(container: Container) -> bool:
    return answers(container, "mariadb", "-uroot", "-e", "SELECT 1")


def locks_held(container: Container) -> list[str]:
    """The kinds of lock held in the container (/proc/locks), sorted: 'POSIX WRITE', 'FLOCK WRITE'..."""
    return sorted(" ".join(line.split()[1:4:2]) for line in container.exec("cat", "/proc/locks").stdout.splitlines()
                  if "->" not in line)


def test_mariadb_keeps_a_growing_table_its_locks_and_runtime_settings_over_three_hops(apps: Docker) -> None:
    need_image(MARIADB_IMAGE)
    volume = apps.volume()
    container = apps.run(MARIADB_IMAGE, volume=volume, env=MARIADB_STATE)
    sleep_until(lambda: mariadb_ready(container), 90, interval=0.5, what="mariadb to answer")
    sql(container, "CREATE DATABASE hops; CREATE TABLE hops.rows (id INT AUTO_INCREMENT PRIMARY KEY, hop INT, "
        "note VARCHAR(64)) ENGINE=InnoDB; SET GLOBAL max_connections = 77")  # a runtime setting: gone if restarted
    locks = locks_held(container)
    assert locks, "mariadbd holds no file lock: this test no longer shows that locks are carried"
    uptime = 0
    for number in range(1, HOPS + 1):
        values = ", ".join(f"({number}, 'row {row} before hop {number}')" for row in range(10))
        sql(container, f"INSERT INTO hops.rows (hop, note) VALUES {values}; FLUSH TABLES")
        connections = int(sql(container, "SHOW GLOBAL STATUS LIKE 'Connections'").split()[1])
        old, container = container, hop(apps, MARIADB_IMAGE, container, volume, number, mariadb_ready,
                                        env=MARIADB_STATE)
        # MariaDB locks ibdata1, its redo log, aria_log_control...: found and carried, said once per container.
        assert old.logs().count("CRIU's file_locks is on") == 1, old.logs()
        assert locks_held(container) == locks, f"hop {number}"
        rows = sql(container, "SELECT hop, COUNT(*) FROM hops.rows GROUP BY hop ORDER BY hop").splitlines()
        assert rows == [f"{hop_number}\t10" for hop_number in range(1, number + 1)], (number, rows)
        assert sql(container, "SELECT @@GLOBAL.max_connections") == "77"  # the same server, not a fresh start
        new_uptime = int(sql(container, "SHOW GLOBAL STATUS LIKE 'Uptime'").split()[1])
        assert new_uptime >= uptime
        uptime = new_uptime
        assert int(sql(container, "SHOW GLOBAL STATUS LIKE 'Connections'").split()[1]) > connections
        assert "ready for connections" not in container.logs()  # no start-up of a fresh server
        assert sql(container, "CHECK TABLE hops.rows").endswith("status\tOK")


# --- Redis with its append-only file ----------------------------------------------------------------------------


def redis(container: Container, *command: str, port: int = 6379) -> str:
    return container.exec("redis-cli", "-p", str(port), *command).stdout.strip()


def redis_ready(container: Container) -> bool:
    return container.exec("redis-cli", "PING", check=False).stdout.strip() == "PONG"


def redis_info(container: Container) -> dict[str, str]:
    return dict(re.findall(r"^(\w+):(.*?)\r?$", redis(container, "INFO", "server"), re.MULTILINE))


def aof_loaded_by_a_fresh_redis(container: Container) -> dict[str, str]:
    """A copy of the append-only directory, loaded by a new redis-server beside the app: its keys."""
    container.exec("sh", "-c", "rm -rf /tmp/aof-check && mkdir /tmp/aof-check && cp -a /data/appendonlydir "
                   "/tmp/aof-check/ && redis-server --port 6380 --bind 127.0.0.1 --dir /tmp/aof-check --appendonly yes "
                   "--save '' --daemonize yes --logfile /tmp/aof-check/redis.log")
    try:
        sleep_until(lambda: container.exec("redis-cli", "-p", "6380", "PING", check=False).stdout.strip() == "PONG",
                    30, what="the fresh redis to load the append-only files")
        keys = redis(container, "KEYS", "*", port=6380).split()
        return {key: redis(container, "GET", key, port=6380) for key in keys}
    finally:
        container.exec("redis-cli", "-p", "6380", "SHUTDOWN", "NOSAVE", check=False)


def test_redis_with_appendonly_keeps_its_keys_and_loadable_append_only_files_over_three_hops(apps: Docker) -> None:
    need_image(REDIS_IMAGE)
    volume = apps.volume()
    container = apps.run(REDIS_IMAGE, volume=volume, env=REDIS_STATE)
    sleep_until(lambda: redis_ready(container), 60, interval=0.2, what="redis to answer")
    run_id = redis_info(container)["run_id"]
    expected: dict[str, str] = {}
    for number in range(1, HOPS + 1):
        for key in range(20):
            expected[f"hop{number}:key{key}"] = f"value {key} set before hop {number}"
            assert redis(container, "SET", f"hop{number}:key{key}", expected[f"hop{number}:key{key}"]) == "OK"
        if number == 2:  # a rewrite makes a new base file and manifest, neither held open at the dump
            assert redis(container, "BGREWRITEAOF").startswith("Background append only file rewriting")
            sleep_until(lambda c=container: "aof_rewrite_in_progress:0" in redis(c, "INFO", "persistence"), 30)
        container = hop(apps, REDIS_IMAGE, container, volume, number, redis_ready, env=REDIS_STATE)
        assert redis_info(container)["run_id"] == run_id, f"hop {number}: another redis"
        assert int(redis(container, "DBSIZE")) == len(expected)
        assert {key: redis(container, "GET", key) for key in expected} == expected
        # The files on disk came along and still describe the data: a fresh Redis loads them.
        assert aof_loaded_by_a_fresh_redis(container) == expected, f"hop {number}"
    assert redis(container, "SET", "after", "the last hop") == "OK"


# --- Go 1.24 net/http: MPTCP denied by default ------------------------------------------------------------------


def http(container: Container, method: str, path: str) -> str:
    return container.exec("python3", "-c", HTTP_CLIENT, method, path).stdout.strip()


def http_ready(container: Container) -> bool:
    return answers(container, "python3", "-c", HTTP_CLIENT, "GET", "/health")


def counts_over_three_hops(apps: Docker, image: str, env: dict[str, str] | None = None) -> Container:
    """The HTTP counter example goes on counting, in the same process, after each hop."""
    volume = apps.volume()
    container = apps.run(image, volume=volume, env=env)
    sleep_until(lambda: http_ready(container), 60, interval=0.2, what=f"{image} to answer")
    started = json.loads(http(container, "GET", "/stats"))
    count = 0
    for number in range(1, HOPS + 1):
        for _ in range(3):
            count += 1
            assert http(container, "POST", "/count") == str(count)
        container = hop(apps, image, container, volume, number, http_ready, env=env)
        assert http(container, "GET", "/count") == str(count), f"hop {number}"
        stats = json.loads(http(container, "GET", "/stats"))
        assert (stats["pid"], stats["started"]) == (started["pid"], started["started"]), f"hop {number}"
    assert http(container, "POST", "/count") == str(count + 1)
    return container


def test_a_go_net_http_server_migrates_over_three_hops_with_default_settings(apps: Docker) -> None:
    need_image(GO_IMAGE)
    container = counts_over_three_hops(apps, GO_IMAGE)  # no CKPT_* setting at all
    assert json.loads(http(container, "GET", "/stats"))["go"] >= "go1.24"
    assert "listening on" not in container.logs()  # the same process, not a fresh start


def test_a_go_server_with_mptcp_allowed_fails_to_checkpoint_and_says_why(apps: Docker) -> None:
    # The counterpart: without the default CKPT_MPTCP=deny, Go 1.24 listens with MPTCP, which CRIU cannot dump.
    need_image(GO_IMAGE)
    container = apps.run(GO_IMAGE, volume=apps.volume(), env={"CKPT_MPTCP": "allow"})
    sleep_until(lambda: http_ready(container), 60, interval=0.2, what="go to answer")
    line, advice = one_checkpoint_failure(container)
    assert re.search(r"inet: Unsupported proto 262 for socket \w+; CRIU adds: inet: For Go programs, consider using "
                     r"\"GODEBUG=multipathtcp=0\" to disable MPTCP$", line), line
    assert "Multipath TCP" in advice and "keep CKPT_MPTCP=deny" in advice and "GODEBUG=multipathtcp=0" in advice


# --- PHP 8.4's built-in server with opcache's JIT ---------------------------------------------------------------

PHP_WITH_JIT = ("php", "-d", "opcache.jit_buffer_size=64M", "-S", "127.0.0.1:8080", "/app/index.php")


def test_php_with_opcache_jit_fails_naming_the_jit_buffer_and_its_setting(apps: Docker) -> None:
    need_image(PHP_IMAGE)
    container = apps.run(PHP_IMAGE, *PHP_WITH_JIT, volume=apps.volume())
    sleep_until(lambda: http_ready(container), 60, interval=0.2, what="php to answer")
    assert json.loads(http(container, "GET", "/stats"))["jit_enabled"], "the JIT is off: this test shows nothing"
    line, advice = one_checkpoint_failure(container)
    assert line.endswith("POKEDATA failed: Input/output error"), line
    # The mapping CRIU could not write, named from CRIU's log, and the PHP setting that avoids it.
    assert re.search(r"[0-9a-f]+-[0-9a-f]+ r-xs \(64 MiB, /dev/zero \(deleted\)\)", advice), advice
    assert "opcache.jit_buffer_size=0" in advice
    assert "SYS_PTRACE" not in advice and "seccomp" not in advice  # both are set: naming them would mislead


def test_php_with_the_jit_buffer_at_zero_migrates_over_three_hops(apps: Docker) -> None:
    need_image(PHP_IMAGE)
    container = counts_over_three_hops(apps, PHP_IMAGE)  # the image's app.ini: opcache.jit_buffer_size=0
    stats = json.loads(http(container, "GET", "/stats"))
    assert stats["php"].startswith("8.") and not stats["jit_enabled"]
    assert "Development Server" not in container.logs()  # the same server, not a fresh start


# --- zdtm-like programs: locks, a stopped task, a traced task, a linked remap ------------------------------------

TICK = re.compile(r"^tick (\d+) ", re.MULTILINE)


def last_tick(container: Container) -> int:
    ticks = TICK.findall(container.stdout())
    return int(ticks[-1]) if ticks else 0


def ticking_on(container: Container, after: int) -> bool:
    return last_tick(container) > after + 2


def zdtm_hops(apps: Docker, command: tuple[str, ...], check: Callable[[Container, int], None],
              extra: list[str] | None = None) -> tuple[Container, list[str]]:
    """Three hops of a zdtm-like program, `check`ed before and after each; the last container and the old logs."""
    volume = apps.volume()
    container = apps.run(ZDTM_IMAGE, *command, volume=volume, extra=extra)
    container.wait_log(r"tick 3 ")
    check(container, 0)
    old_logs = []
    for number in range(1, HOPS + 1):
        old_logs.append(stop_for_migration(container, number))
        last = last_tick(container)
        container = apps.run(ZDTM_IMAGE, *command, volume=volume, extra=extra)
        container.wait_log(rf"restored gen-{number:08d}\b", timeout=90)
        sleep_until(lambda c=container, last=last: ticking_on(c, last), 30, what="the restored program to tick")
        assert TICK.findall(container.stdout())[0] == str(last + 1), f"hop {number}: not the same program"
        check(container, number)
    return container, old_logs


def test_file_locks_of_every_kind_are_carried_over_three_hops(apps: Docker) -> None:
    need_image(ZDTM_IMAGE)

    def all_held(container: Container, number: int) -> None:
        held = json.loads(container.exec("python3", "/app/zdtm_like.py", "locks", "--check").stdout)
        assert held == {"posix": "held", "ofd": "held", "flock": "held", "child-posix": "held"}, (number, held)

    _, old_logs = zdtm_hops(apps, ("python3", "-u", "/app/zdtm_like.py", "locks"), all_held)
    for logs in old_logs:  # said once by each supervisor, at the dump that turned it on
        assert logs.count("CRIU's file_locks is on") == 1 and "the app holds 4 file lock(s)" in logs, logs


def test_a_stopped_child_is_carried_still_stopped_over_three_hops(apps: Docker) -> None:
    need_image(ZDTM_IMAGE)

    def child_stopped(container: Container, number: int) -> None:
        child = int(re.findall(r"child (\d+) stopped", container.stdout())[-1])
        states = container.exec("sh", "-c", "for s in /proc/[0-9]*/status; do awk '/^State|^NSpid/' $s | "
                                "tr '\\n' ' '; echo; done").stdout
        stopped = [line for line in states.splitlines() if re.search(rf"NSpid:.*\b{child}\s*$", line)]
        assert stopped and "T (stopped)" in stopped[0], (number, states)

    zdtm_hops(apps, ("python3", "-u", "/app/zdtm_like.py", "stopped"), child_stopped)


def test_a_traced_child_cannot_be_checkpointed_and_the_reason_names_its_tracer(apps: Docker) -> None:
    need_image(ZDTM_IMAGE)
    container = apps.run(ZDTM_IMAGE, "python3", "-u", "/app/zdtm_like.py", "traced", volume=apps.volume())
    container.wait_log(r"tick 2 ")
    line, advice = one_checkpoint_failure(container)
    assert re.search(r"Unseizable non-zombie \d+ found, state t, err -1/10$", line), line
    assert re.search(r"pid \d+ \(python3\) of the app is traced by pid \d+ \(python3\)", advice), advice
    assert "detach the tracer" in advice
    assert "--cap-add SYS_PTRACE" not in advice  # the container has it: the old advice was wrong
    assert "graceful stop at tick" in container.logs()


LINK_REMAP = ("python3", "-u", "/app/zdtm_like.py", "link-remap", "/data")


def test_a_file_open_under_a_removed_name_is_carried_with_a_linked_remap(apps: Docker) -> None:
    # The file lives on a volume mounted in every container: the link_remap.N link CRIU makes beside it at the
    # dump goes along. (In the writable layer that link would need the writable-layer carry of issue 14.) CRIU
    # makes it from the open fd with linkat(AT_EMPTY_PATH), which the kernel allows only with DAC_READ_SEARCH.
    need_image(ZDTM_IMAGE)
    data = ["-v", f"{apps.volume()}:/data", "--cap-add", "DAC_READ_SEARCH"]

    def reads_its_file(container: Container, number: int) -> None:
        assert "link-remap reads 'written before the name was removed' nlink 1" in container.stdout(), number

    _, old_logs = zdtm_hops(apps, LINK_REMAP, reads_its_file, extra=data)
    for logs in old_logs:
        assert logs.count("CRIU's link_remap is on") == 1 and "(/data/linked)" in logs, logs


def test_a_linked_remap_without_dac_read_search_says_to_add_it(apps: Docker) -> None:
    need_image(ZDTM_IMAGE)
    container = apps.run(ZDTM_IMAGE, *LINK_REMAP, volume=apps.volume(), extra=["-v", f"{apps.volume()}:/data"])
    container.wait_log(r"tick 2 ")
    line, advice = one_checkpoint_failure(container)
    assert line.endswith("trim failed: @link_remap.18@") or "trim failed: @link_remap." in line, line
    assert "--cap-add DAC_READ_SEARCH" in advice and "linked remap" in advice, advice


# --- the seccomp filter, seen from the app; mount sharing ---------------------------------------------------------

MPTCP_PROBE = (
    "import errno, socket, time\n"
    "try:\n"
    "    socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262).close()\n"
    "    print('mptcp socket opened', flush=True)\n"
    "except OSError as error:\n"
    "    print('mptcp socket refused:', errno.errorcode[error.errno], flush=True)\n"
    "socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0).close()\n"
    "print('tcp socket opened', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.mark.parametrize(("setting", "expected"), [("deny", "mptcp socket refused: EPROTONOSUPPORT"),
                                                     ("allow", "mptcp socket opened")])
def test_the_app_s_mptcp_sockets_fail_as_on_a_kernel_without_mptcp_unless_allowed(
    apps: Docker, setting: str, expected: str
) -> None:
    # EPROTONOSUPPORT is what Go's initMPTCPavailable reads as "not supported" (then it uses TCP for good).
    need_image(ZDTM_IMAGE)
    container = apps.run(ZDTM_IMAGE, "python3", "-u", "-c", MPTCP_PROBE, volume=apps.volume(),
                         env={"CKPT_MPTCP": setting})
    container.wait_log("tcp socket opened")
    assert expected in container.stdout(), container.logs()


# The app makes a mount namespace of its own, whose mounts are slaves of the container's.
OWN_MOUNT_NAMESPACE = ("sh", "-c", "unshare -m --propagation slave sleep 1000 & exec python3 -u /app/zdtm_like.py "
                       "stopped")


def test_a_mount_namespace_made_by_the_app_is_explained_and_carried_with_ckpt_own_proc(apps: Docker) -> None:
    need_image(ZDTM_IMAGE)
    container = apps.run(ZDTM_IMAGE, *OWN_MOUNT_NAMESPACE, volume=apps.volume())
    container.wait_log(r"tick 2 ")
    line, advice = one_checkpoint_failure(container)
    assert re.search(r"mnt: Mount \d+ \./checkpoints \(master_id: \d+ shared_id: 0\) has unreachable sharing\. "
                     r"Try --enable-external-masters\.$", line), line
    assert "set CKPT_OWN_PROC=1" in advice and "--enable-external" not in advice
    # The advice works: with CKPT_OWN_PROC=1 the supervisor dumps external masters, and the app moves.
    volume, env = apps.volume(), {"CKPT_OWN_PROC": "1"}
    container = apps.run(ZDTM_IMAGE, *OWN_MOUNT_NAMESPACE, volume=volume, env=env)
    container.wait_log(r"tick 2 ")
    stop_for_migration(container, 1)
    last = last_tick(container)
    replacement = apps.run(ZDTM_IMAGE, *OWN_MOUNT_NAMESPACE, volume=volume, env=env)
    replacement.wait_log(r"restored gen-00000001\b", timeout=90)
    sleep_until(lambda: ticking_on(replacement, last), 30, what="the restored program to tick")
