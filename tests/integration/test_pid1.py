"""The supervisor as PID 1: exit codes, signal forwarding, reaping, bad input."""

from __future__ import annotations

import re

import pytest
from dockerlib import BASE_IMAGE, TICKER_IMAGE, Docker, sleep_until


def test_a_read_only_volume_at_start_exits_4_before_starting_anything(engine: Docker) -> None:
    volume = engine.volume()
    app = engine.run(TICKER_IMAGE, volume=volume, read_only_volume=True, env={"TICK_INTERVAL": "0.1"})
    assert app.wait_exit(timeout=60) == 4
    logs = app.logs()
    assert re.search(r"ERROR: the checkpoint volume /checkpoints cannot be used: .*read-only.*mount CKPT_DIR "
                     r"read-write.*Nothing was started", logs), logs
    assert "tick" not in app.stdout()


@pytest.mark.parametrize("signal_name", ["INT", "HUP", "QUIT", "USR1", "USR2", "WINCH"])
def test_forwarded_signal_reaches_the_app(engine: Docker, signal_name: str) -> None:
    app = engine.run(TICKER_IMAGE, volume=engine.volume(), env={"TICK_INTERVAL": "0.1"})
    app.wait_log(r"tick 2\n")
    app.kill(signal_name)
    app.wait_log(rf"got SIG{signal_name} at tick")
    assert app.running()


def test_orphans_reparented_to_pid1_are_reaped(engine: Docker) -> None:
    app = engine.run(TICKER_IMAGE, volume=engine.volume())
    app.wait_log(r"tick 1\n")
    # The exec'd shell exits at once; its background children are re-parented
    # to the container's PID 1, the supervisor, which must reap them.
    app.exec("sh", "-c", "for i in 1 2 3 4 5; do sleep 3 & done; sleep 0.5")

    def orphans() -> list[str]:
        table = app.exec("ps", "-eo", "stat=,ppid=,comm=").stdout.splitlines()
        return [row for row in table if row.split()[1] == "1" and row.split()[2] == "sleep"]

    running = orphans()
    assert len(running) == 5, running  # re-parented to the supervisor
    # Once they exit, none may linger as a zombie ("Z" state) under PID 1.
    sleep_until(lambda: not orphans(), 15, what="the orphans to be reaped")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CKPT_RESTORE", "maybe"), ("CKPT_SIGNAL", "SIGKILL"), ("CKPT_TCP", "keep"), ("CKPT_NAME", "../escape")],
)
def test_bad_configuration_exits_2_naming_the_variable(engine: Docker, variable: str, value: str) -> None:
    app = engine.run(TICKER_IMAGE, volume=engine.volume(), env={variable: value})
    assert app.wait_exit() == 2
    assert variable in app.logs()


def test_exit_codes_pass_through(engine: Docker) -> None:
    cases = {
        ("python3", "-c", "import sys; sys.exit(5)"): 5,
        ("sh", "-c", "kill -KILL $$"): 137,
        ("/no/such/program",): 127,
        ("/etc/hostname",): 126,
    }
    for command, expected in cases.items():
        app = engine.run(BASE_IMAGE, *command, volume=engine.volume())
        assert app.wait_exit() == expected, (command, app.logs())


def test_restore_require_exits_3_on_an_empty_volume(engine: Docker) -> None:
    app = engine.run(TICKER_IMAGE, volume=engine.volume(), env={"CKPT_RESTORE": "require"})
    assert app.wait_exit() == 3
    assert "CKPT_RESTORE=require" in app.logs()


def test_an_app_on_a_terminal_migrates_to_a_replacement_with_a_terminal(engine: Docker) -> None:
    volume = engine.volume()
    first = engine.run(TICKER_IMAGE, volume=volume, env={"TICK_INTERVAL": "0.1"}, extra=["-t"])
    first.wait_log(r"tick 5")
    assert first.stop() == 0, first.logs()
    last = int(re.findall(r"tick (\d+)", first.logs())[-1])
    second = engine.run(TICKER_IMAGE, volume=volume, env={"TICK_INTERVAL": "0.1"}, extra=["-t"])
    second.wait_log(rf"tick {last + 3}")
    assert "restored gen-00000001" in second.logs()
    assert second.stop() == 0
    # Without a terminal the checkpoint cannot be restored here: one readable line, exit 6, the checkpoint kept.
    third = engine.run(TICKER_IMAGE, volume=volume, env={"TICK_INTERVAL": "0.1"})
    assert third.wait_exit(timeout=60) == 6
    assert re.search(r"cannot restore gen-00000002: it was made on a terminal .* start the replacement with -t",
                     third.logs()), third.logs()
    fourth = engine.run(TICKER_IMAGE, volume=volume, env={"TICK_INTERVAL": "0.1"}, extra=["-t"])
    fourth.wait_log(r"restored gen-00000002")


def test_sigterm_at_any_moment_of_start_up_is_never_lost(engine: Docker) -> None:
    # The entrypoint shim blocks the supervisor's signals before Python starts; without it, a SIGTERM in
    # the first tens of milliseconds was dropped by the kernel (PID 1 without a handler) and docker stop
    # waited out its timeout (exit 137).
    import time

    from dockerlib import docker as run_docker

    for delay_ms in range(0, 220, 20):
        volume = engine.volume()
        app = engine.run(TICKER_IMAGE, volume=volume, env={"TICK_INTERVAL": "0.1"})
        time.sleep(delay_ms / 1000)
        run_docker("kill", "-s", "TERM", app.name)
        code = app.wait_exit(timeout=60)
        assert code == 0, f"SIGTERM {delay_ms} ms after start: exit {code}\n{app.logs()}"
