"""The command line. click only: every error becomes one line and an exit code.

Exit codes (the contract, also in the README):
    N       the app exited with code N
    128+N   the app was killed by signal N
    0       a final checkpoint was published and the app stopped for migration
    2       a configuration error (a bad CKPT_* value, no command)
    3       CKPT_RESTORE=require and no checkpoint could be restored
    4       the environment cannot work (pycriu missing, volume unusable at start)
    5       another live instance holds this app's lease (CKPT_HANDOFF_TIMEOUT passed)
            (0 if stopped while still waiting for it: nothing ran, nothing is lost)
    6       this container cannot restore the newest checkpoint, which is kept (CKPT_CANNOT_RESTORE=exit)
    7       a lazily restored app's pages failed their check after it ran (CKPT_LAZY=on/auto)
    126     the command exists but cannot be executed
    127     the command was not found
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from typing import Any

import click

from supervisor_pkg import __version__
from supervisor_pkg.config import SETTINGS, load, unknown_variables
from supervisor_pkg.errors import (
    CannotRestoreHere,
    CommandNotExecutable,
    CommandNotFound,
    ConfigError,
    EnvironmentProblem,
    LazyRestoreCorrupt,
    LeaseHeld,
    LeaseLost,
    RestoreRequired,
    StoppedDuringRestore,
    StoppedWhileWaiting,
    SupervisorError,
)

EXIT_CODES: dict[type[SupervisorError], int] = {
    ConfigError: 2,
    RestoreRequired: 3,
    EnvironmentProblem: 4,
    LeaseHeld: 5,
    LeaseLost: 5,
    StoppedWhileWaiting: 0,
    StoppedDuringRestore: 0,
    CannotRestoreHere: 6,
    LazyRestoreCorrupt: 7,
    CommandNotExecutable: 126,
    CommandNotFound: 127,
}
EXIT_OTHER_ERROR = 1

log = logging.getLogger("criu-supervisor")


def exit_code_for_error(error: SupervisorError) -> int:
    for kind in type(error).__mro__:
        if kind in EXIT_CODES:
            return EXIT_CODES[kind]
    return EXIT_OTHER_ERROR


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="criu-supervisor: %(levelname)s: %(message)s",
        force=True,
    )


def _setting_options(function: Any) -> Any:
    for setting in reversed(SETTINGS):
        function = click.option(
            setting.flag, setting.field, default=None, metavar="VALUE",
            help=f"{setting.help} [env {setting.variable}; default {setting.default}]",
        )(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="criu-supervisor")
def main() -> None:
    """PID-1 supervisor that checkpoints its app into a shared volume and restores it elsewhere."""


@main.command(context_settings={"allow_interspersed_args": False})
@_setting_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(command: tuple[str, ...], **flags: str | None) -> None:
    """Run COMMAND as the app: restore it from the newest checkpoint, or start it fresh."""
    from supervisor_pkg.signals import SignalReceiver
    from supervisor_pkg.supervisor import Supervisor

    receiver = SignalReceiver.install_early()
    setup_logging("info")  # until the configuration, with its CKPT_LOG_LEVEL, is known to be valid
    try:
        config = load(os.environ, flags)
        setup_logging(config.log_level)
        for warning in unknown_variables(os.environ):
            log.warning("%s", warning)
        if not command:
            raise ConfigError("no command given: use `criu-supervisor run -- CMD [ARGS...]` or set the image's CMD")
        if command[0] == "doctor" and shutil.which("doctor") is None:
            # `docker run --rm IMAGE doctor [--json]`: the ENTRYPOINT hands "doctor" over as the app.
            main.main(args=list(command), prog_name="criu-supervisor")
        if "control" in config.triggers:
            from supervisor_pkg import control

            control.check_socket_path(config.control_socket)  # a wrong path is exit 2 now, not a warning later
        code = Supervisor(config, list(command), receiver).run()
    except SupervisorError as error:
        stopped = isinstance(error, (StoppedWhileWaiting, StoppedDuringRestore))
        (log.info if stopped else log.error)("%s", error.message)
        code = exit_code_for_error(error)
    sys.exit(code)


def _open_store_or_exit(flags: dict[str, str | None]) -> Any:
    """The lineage named by flags/environment, with the signing key; one line and exit 2 if misconfigured."""
    from supervisor_pkg.store import Store, read_signing_key

    try:
        config = load(os.environ, flags)
        return Store(config.dir, config.name, keep=config.keep, signing_key=read_signing_key(config.signing_key_file))
    except SupervisorError as error:
        click.echo(f"criu-supervisor: {error.message}", err=True)
        sys.exit(exit_code_for_error(error))


def _echo(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


def _describe(generation: Any) -> dict[str, Any]:
    """One row of `list`: state (complete, claimed, rejected, corrupt), time, size, source, duration."""
    row: dict[str, Any] = {"generation": generation.number, "name": generation.name}
    try:
        manifest = generation.read_json("manifest.json")
        files = manifest.get("files") or {}
        row.update(
            created=manifest.get("created"),
            size=sum(f.get("size", 0) for f in files.values() if isinstance(f, dict)),
            host=(manifest.get("source") or {}).get("host"),
            dump_seconds=(manifest.get("stats") or {}).get("dump_seconds"),
            parent=(manifest.get("parent") or {}).get("generation"),
            state=_state(generation),
        )
    except (OSError, ValueError, AttributeError):
        row["state"] = "corrupt"
    return row


def _state(generation: Any) -> str:
    """rejected; ended (its restored app stopped on its own); restored (its app ran); claimed; complete."""
    from supervisor_pkg.store import Claim

    if generation.rejected:
        return "rejected"
    try:
        claim = Claim.parse(generation.read_json("claim.json"))
    except FileNotFoundError:
        return "complete"
    except (OSError, ValueError):
        return "claimed"
    return "ended" if claim.ended is not None else "restored" if claim.resumed is not None else "claimed"


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--dir", "dir", default=None, help="CKPT_DIR")
@click.option("--name", "name", default=None, help="CKPT_NAME")
def list_command(as_json: bool, **flags: str | None) -> None:
    """List the generations of this app's lineage."""
    rows = [_describe(generation) for generation in _open_store_or_exit(flags).generations()]
    lines = [f"{r['name']}  {r['state']:9} {r.get('created') or '-':21} {r.get('size', 0):>12} B  "
             f"{r.get('host') or '-'}" + (f"  (incremental on {r['parent']})" if r.get("parent") else "")
             for r in rows]
    _echo(rows, as_json, "\n".join(lines) or "no generations")


@main.command()
@click.argument("generation", required=False, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--dir", "dir", default=None, help="CKPT_DIR")
@click.option("--name", "name", default=None, help="CKPT_NAME")
def verify(generation: int | None, as_json: bool, **flags: str | None) -> None:
    """Check the integrity of GENERATION (default: every published one)."""
    from supervisor_pkg import criu
    from supervisor_pkg.errors import VerificationFailed

    store = _open_store_or_exit(flags)
    try:
        local: str | None = criu.version()
    except SupervisorError:
        local = None  # outside the image: integrity and signature only
    results = []
    for candidate in store.generations():
        if generation is not None and candidate.number != generation:
            continue
        try:
            store.verify(candidate, local)
            results.append({"generation": candidate.number, "ok": True})
        except VerificationFailed as error:
            results.append({"generation": candidate.number, "ok": False, "reason": error.message})
    _echo(results, as_json, "\n".join(
        f"gen-{r['generation']:08d}: " + ("OK" if r["ok"] else f"FAIL {r['reason']}") for r in results
    ) or "no generations")
    sys.exit(0 if results and all(r["ok"] for r in results) else 1)


@main.command()
@click.option("--keep", type=click.IntRange(min=1), required=True, help="Complete generations to keep.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--dir", "dir", default=None, help="CKPT_DIR")
@click.option("--name", "name", default=None, help="CKPT_NAME")
def prune(keep: int, as_json: bool, **flags: str | None) -> None:
    """Delete all but the newest KEEP complete generations."""
    removed = _open_store_or_exit(flags).prune(keep=keep)
    _echo({"removed": removed}, as_json, "\n".join(f"removed {name}" for name in removed) or "nothing to remove")


def _control_call(request: dict[str, Any], socket_path: str | None) -> dict[str, Any]:
    from supervisor_pkg import control

    path = socket_path or os.environ.get("CKPT_CONTROL_SOCKET") or control.DEFAULT_SOCKET
    try:
        return control.call(path, request)
    except SupervisorError as error:
        click.echo(f"criu-supervisor: {error.message}", err=True)
        sys.exit(EXIT_OTHER_ERROR)


@main.command()
@click.option("--leave-running", is_flag=True, help="Keep the app running (default: checkpoint, then stop it).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--socket", "socket_path", default=None, help="CKPT_CONTROL_SOCKET")
def checkpoint(leave_running: bool, as_json: bool, socket_path: str | None) -> None:
    """Ask the running supervisor for a checkpoint now (use with docker exec)."""
    reply = _control_call({"command": "checkpoint", "leave_running": leave_running}, socket_path)
    if reply.get("ok"):
        text = (f"checkpoint {reply.get('generation')} published in {reply.get('seconds', 0):.2f} s "
                f"({reply.get('bytes', 0) / 1048576:.1f} MiB; CRIU {reply.get('criu_seconds', 0):.2f} s)"
                + ("; the app keeps running" if leave_running else "; the app is stopped"))
    else:
        text = f"checkpoint failed: {reply.get('error')}"
    _echo(reply, as_json, text)
    sys.exit(0 if reply.get("ok") else EXIT_OTHER_ERROR)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--socket", "socket_path", default=None, help="CKPT_CONTROL_SOCKET")
def status(as_json: bool, socket_path: str | None) -> None:
    """Show the running supervisor's state, app, lease, triggers and last checkpoint/restore."""
    reply = _control_call({"command": "status"}, socket_path)
    state = reply.get("status") or {}
    if not reply.get("ok"):
        click.echo(f"criu-supervisor: {reply.get('error')}", err=True)
        sys.exit(EXIT_OTHER_ERROR)
    lines = [
        f"state:            {state.get('state')}",
        f"app pids:         {' '.join(map(str, state.get('app_pids') or [])) or '-'} (root {state.get('app_pid')})",
        f"lineage:          {state.get('lineage')}",
        f"lease:            {'held' if (state.get('lease') or {}).get('held') else 'not held'}"
        f" (beat {(state.get('lease') or {}).get('beat', '-')})",
        f"triggers:         {', '.join(state.get('triggers') or []) or '-'}",
        f"next periodic in: {state.get('next_periodic_in') if state.get('next_periodic_in') is not None else '-'}",
    ]
    for label, key in (("last checkpoint", "last_checkpoint"), ("last restore", "last_restore")):
        item = state.get(key)
        lines.append(f"{label + ':':17} " + (
            f"{item['generation']} at {item['time']}, {item['seconds']} s, {item['bytes'] / 1048576:.1f} MiB"
            if item else "-"))
    _echo(state, as_json, "\n".join(lines))


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--dir", "dir", default=None, help="CKPT_DIR")
def doctor_command(as_json: bool, **flags: str | None) -> None:
    """Check that checkpoints can work in this container; exit 1 if any check FAILs."""
    from supervisor_pkg import doctor

    try:
        config = load(os.environ, flags)
    except SupervisorError as error:
        click.echo(f"criu-supervisor: {error.message}", err=True)
        sys.exit(exit_code_for_error(error))
    findings = doctor.run_checks(config)
    click.echo(doctor.render(findings, as_json))
    sys.exit(doctor.exit_code(findings))
