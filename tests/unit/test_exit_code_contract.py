"""The published exit-code contract: the app's code, 128+N for signal N, 2/3/4/126/127 for our errors."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from supervisor_pkg import cli, errors
from supervisor_pkg.cli import exit_code_for_error
from supervisor_pkg.supervisor import exit_code_for


# --- wait statuses of real children -----------------------------------------------------
def _wait_status_of_child_exiting_with(code: int) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def _wait_status_of_child_killed_by(signum: signal.Signals) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: die of the signal itself, so there is no race
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            if signum is not signal.SIGKILL:  # SIGKILL's disposition cannot be changed
                signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        finally:
            os._exit(99)  # only reached if the signal did not kill us
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("code", [0, 7, 255])
def test_the_apps_exit_code_passes_through(code: int) -> None:
    status = _wait_status_of_child_exiting_with(code)
    assert exit_code_for(status) == code


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGSEGV])
def test_an_app_killed_by_signal_n_gives_128_plus_n(signum: signal.Signals) -> None:
    status = _wait_status_of_child_killed_by(signum)
    assert os.WIFSIGNALED(status), "the child must really have died of the signal"
    assert exit_code_for(status) == 128 + signum


# --- our own errors -------------------------------------------------------------------------
class _NarrowerConfigError(errors.ConfigError):
    pass


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.ConfigError("x"), 2),
        (_NarrowerConfigError("x"), 2),
        (errors.RestoreRequired("x"), 3),
        (errors.EnvironmentProblem("x"), 4),
        (errors.LeaseHeld("x"), 5),
        (errors.StoppedWhileWaiting("x"), 0),
        (errors.LeaseLost("x"), 5),
        (errors.CannotRestoreHere("x"), 6),
        (errors.LazyRestoreCorrupt("x"), 7),
        (errors.StoppedDuringRestore("x"), 0),
        (errors.RestoreStalled("x"), 1),
        (errors.CommandNotExecutable("x"), 126),
        (errors.CommandNotFound("x"), 127),
        (errors.SupervisorError("x"), 1),
        (errors.StoreError("x"), 1),
        (errors.VerificationFailed("x"), 1),
        (errors.CriuError("x"), 1),
        (errors.DumpFailed("x"), 1),
        (errors.RestoreFailed("x"), 1),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_each_error_class_maps_to_its_exit_code(error: errors.SupervisorError, code: int) -> None:
    assert exit_code_for_error(error) == code


# --- the CLI, in-process ----------------------------------------------------------------------
@pytest.fixture
def invoke(restore_signal_state: None, restore_logging: None, tmp_path: Path) -> Iterator:
    """Run the CLI in-process with a private CKPT_DIR; `run` installs real signal handlers."""
    checkpoint_dir = tmp_path / "checkpoints"

    def invoke_cli(args: list[str], env: dict[str, str] | None = None) -> Result:
        runner = CliRunner()
        return runner.invoke(cli.main, args, env={"CKPT_DIR": str(checkpoint_dir), **(env or {})})

    yield invoke_cli


def test_run_without_a_command_exits_2(invoke) -> None:
    result = invoke(["run"])
    assert result.exit_code == 2, result.output
    assert "no command given" in result.output


def test_run_with_a_bad_variable_exits_2_naming_it(invoke) -> None:
    result = invoke(["run", "--", "true"], env={"CKPT_RESTORE": "bogus"})
    assert result.exit_code == 2, result.output
    assert "CKPT_RESTORE='bogus' is not valid" in result.output
    assert "auto, never, require" in result.output


def test_run_with_a_bad_flag_exits_2_naming_the_flag(invoke) -> None:
    result = invoke(["run", "--keep", "0", "--", "true"])
    assert result.exit_code == 2, result.output
    assert "--keep (CKPT_KEEP)='0' is not valid" in result.output


def test_run_of_a_missing_program_exits_127(invoke) -> None:
    result = invoke(["run", "--restore", "never", "--", "/nonexistent/prog"])
    assert result.exit_code == 127, result.output
    assert "command not found: /nonexistent/prog" in result.output


def test_run_of_a_program_not_in_path_exits_127(invoke) -> None:
    result = invoke(["run", "--restore", "never", "--", "no-such-program-for-criu-supervisor"])
    assert result.exit_code == 127, result.output
    assert "not found in PATH" in result.output


def test_run_of_a_file_without_execute_permission_exits_126(invoke, tmp_path: Path) -> None:
    program = tmp_path / "not-executable.sh"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o644)
    assert not program.stat().st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    result = invoke(["run", "--restore", "never", "--", str(program)])
    assert result.exit_code == 126, result.output
    assert "not executable" in result.output


def test_run_of_a_directory_exits_126(invoke, tmp_path: Path) -> None:
    result = invoke(["run", "--restore", "never", "--", str(tmp_path)])
    assert result.exit_code == 126, result.output


def test_run_with_restore_require_and_an_empty_volume_exits_3(invoke) -> None:
    result = invoke(["run", "--restore", "require", "--", "true"])
    assert result.exit_code == 3, result.output
    assert "CKPT_RESTORE=require but nothing can be restored" in result.output


def test_run_help_lists_every_settings_flag(invoke) -> None:
    result = invoke(["run", "--help"])
    assert result.exit_code == 0
    for setting in cli.SETTINGS:
        assert setting.flag in result.output


def test_list_with_a_bad_name_exits_2(invoke) -> None:
    result = invoke(["list", "--name", ".bad"])
    assert result.exit_code == 2, result.output
    assert "--name (CKPT_NAME)='.bad' is not valid" in result.output


@pytest.mark.parametrize("command", [["verify"], ["prune", "--keep", "1"]], ids=["verify", "prune"])
def test_maintenance_commands_with_a_bad_name_exit_2_with_one_line(invoke, command: list[str]) -> None:
    result = invoke([*command, "--name", ".bad"])
    assert result.exit_code == 2, result.output
    assert "--name (CKPT_NAME)='.bad' is not valid" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), "no exception may escape"


@pytest.mark.parametrize("command", [["list"], ["verify"], ["prune", "--keep", "1"]], ids=["list", "verify", "prune"])
def test_maintenance_commands_with_an_unreadable_signing_key_exit_2(invoke, command: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-key"
    result = invoke(command, env={"CKPT_SIGNING_KEY_FILE": str(missing)})
    assert result.exit_code == 2, result.output
    assert f"CKPT_SIGNING_KEY_FILE={str(missing)!r} cannot be read" in result.output


def test_run_with_a_too_short_signing_key_exits_2_before_starting_anything(invoke, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"short\n")
    marker = tmp_path / "the-app-ran"
    result = invoke(["run", "--signing-key-file", str(key), "--", "touch", str(marker)])
    assert result.exit_code == 2, result.output
    assert "holds 5 bytes: use a key of at least 16 bytes" in result.output
    assert not marker.exists()
