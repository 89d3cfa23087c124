"""The CRIU adapter without CRIU: explain() on fake logs, dump/restore over CRIU's RPC with a fake swrk, version()."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor_pkg import criu
from supervisor_pkg.errors import (
    CHECKPOINT_AT_FAULT,
    CONTAINER_AT_FAULT,
    DumpFailed,
    EnvironmentProblem,
    RestoreFailed,
    RestoreInterrupted,
    RestoreStalled,
)


def write_log(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "dump-20250101T000000Z-1.log"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


NOISE = [
    "(00.000000) Version: 4.2.1 (gitid 0)",
    "(00.000100) Running on host Linux 6.8.0 x86_64",
    "(00.001000) Seized task 42, state 1",
]


# --- explain: one line naming the cause and the fix ----------------------------------------------
KNOWN = [
    (
        "(00.012345) Error (criu/sockets.c:123): sockets: Can't get 1:16 opt: Operation not supported",
        "too old for the kernel's socket options",
        "CRIU >= 4.2",
    ),
    (
        "(00.020000) Error (criu/fsnotify.c:1): fsnotify: Can't dump that handle",
        "inotify/fanotify watches",
        "--cap-add DAC_READ_SEARCH",
    ),
    (
        "(00.003000) Error (criu/cr-dump.c:412): Can't get rlimit 0: Operation not permitted",
        "CAP_SYS_RESOURCE",
        "--cap-add SYS_RESOURCE",
    ),
    (
        "(01.500000) Error (criu/page-xfer.c:345): Unable to write pages: No space left on device",
        "the checkpoint volume is full",
        "larger volume",
    ),
    (
        "(00.400000) Error (criu/image.c:190): Unable to open pstree.img: Read-only file system",
        "read-only",
        "mount CKPT_DIR read-write",
    ),
    (
        "(00.100000) Error (criu/sk-inet.c:199): inet: Connected TCP socket, consider using --tcp-established option.",
        "established TCP connections",
        "CKPT_TCP",
    ),
    (
        "(00.050000) Error (criu/cr-restore.c:1480): Can't fork for 42: File exists",
        "a PID the app needs is already taken",
        "fresh container",
    ),
    (
        "(00.030000) Error (criu/tty.c:1234): tty: Can't dump pty 3 with an external peer",
        "attached to a terminal",
        "run without a TTY",
    ),
    (
        "(00.001000) Error (criu/namespaces.c:999): Can't open ns: Operation not permitted",
        "CRIU lacks a permission",
        "--cap-add SYS_ADMIN",
    ),
]


@pytest.mark.parametrize(("line", "cause", "fix"), KNOWN, ids=[k[1] for k in KNOWN])
def test_a_known_criu_error_becomes_one_line_with_its_cause_and_fix(
    tmp_path: Path, line: str, cause: str, fix: str
) -> None:
    log = write_log(tmp_path, *NOISE, line, "(01.600000) Error (criu/cr-dump.c:2093): Dumping FAILED.")
    # A container granting none of the fixes (advice never names a setting already in effect: test_failure_advice.py).
    explained = criu.explain(log, RuntimeError("DUMP failed with -1"), granted=criu.NOTHING_GRANTED)
    assert "\n" not in explained
    quoted, _, advice = explained.partition(" -> ")
    assert quoted == line.split(") ", 1)[1], "the first error line, without CRIU's timestamp"
    assert cause in advice
    assert fix in advice


def test_the_line_with_a_known_cause_is_quoted_even_when_a_generic_error_comes_first(tmp_path: Path) -> None:
    log = write_log(
        tmp_path,
        *NOISE,
        "(00.010000) Error (criu/files.c:500): Dump files (pid: 42) failed with -1",
        "(00.010001) Error (criu/fsnotify.c:1): fsnotify: Can't dump that handle",
    )
    assert criu.explain(log, granted=criu.NOTHING_GRANTED) == (
        "Error (criu/fsnotify.c:1): fsnotify: Can't dump that handle -> "
        "the app holds inotify/fanotify watches; add --cap-add DAC_READ_SEARCH"
    )


def test_errors_criu_logs_on_every_run_are_not_taken_for_the_cause(tmp_path: Path) -> None:
    log = write_log(
        tmp_path,
        "(00.000500) Error (criu/tun.c:80): tun: Unable to create tun: No such file or directory",
        "(00.000600) Error (criu/kerndat.c:1): Can't setup RLIMIT_NOFILE: Operation not permitted",
        "(00.5) Error (criu/foo.c:1): something nobody has seen before",
    )
    assert criu.explain(log) == "Error (criu/foo.c:1): something nobody has seen before"


def test_a_log_with_only_harmless_errors_falls_back_to_the_exception_text(tmp_path: Path) -> None:
    log = write_log(tmp_path, "(00.000500) Error (criu/tun.c:80): tun: Unable to create tun: No such file or directory")
    assert criu.explain(log, RuntimeError("DUMP failed with -1")) == "DUMP failed with -1"


def test_an_unknown_error_is_quoted_without_advice(tmp_path: Path) -> None:
    log = write_log(tmp_path, *NOISE, "(00.5) Error (criu/foo.c:1): something nobody has seen before")
    assert criu.explain(log) == "Error (criu/foo.c:1): something nobody has seen before"


def test_a_log_cut_short_on_a_full_volume_still_says_the_volume_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = write_log(tmp_path, *NOISE, "(00.5) Error (criu")  # the ENOSPC line itself could not be written

    class Full:
        f_bavail, f_frsize = 3, 4096

    monkeypatch.setattr(criu.os, "statvfs", lambda path: Full())
    assert criu.explain(log) == ("Error (criu -> the checkpoint volume is full (CRIU's log may be cut short); free "
                                 "space or give CKPT_DIR a larger volume")


def test_a_missing_log_falls_back_to_the_exception_text(tmp_path: Path) -> None:
    assert criu.explain(str(tmp_path / "absent.log"), RuntimeError("DUMP failed with -52")) == "DUMP failed with -52"


def test_a_missing_log_still_gets_advice_from_the_exception_text(tmp_path: Path) -> None:
    explained = criu.explain(str(tmp_path / "absent.log"), OSError(errno.ENOSPC, "No space left on device"))
    assert explained.startswith("[Errno 28] No space left on device -> ")
    assert "the checkpoint volume is full" in explained


def test_a_log_without_error_lines_falls_back_to_the_exception_text(tmp_path: Path) -> None:
    log = write_log(tmp_path, *NOISE)
    assert criu.explain(log, RuntimeError("RESTORE failed with -1")) == "RESTORE failed with -1"


def test_with_neither_log_nor_exception_it_says_so(tmp_path: Path) -> None:
    assert criu.explain(str(tmp_path / "absent.log")) == "CRIU gave no reason"


def test_directory_not_empty_is_not_mistaken_for_a_terminal(tmp_path: Path) -> None:
    log = write_log(tmp_path,
                    "(00.2) Error (criu/cr-restore.c:2000): Can't remove /tmp/.criu.mntns: Directory not empty")
    assert "terminal" not in criu.explain(log)


# --- dump/restore over CRIU's RPC, with a fake criu swrk ----------------------------------------------
# The adapter speaks CRIU's RPC itself (a SOCK_SEQPACKET socket pair with a spawned `criu swrk FD`). Here the
# protobuf classes are replaced by JSON-encoding stand-ins, and `criu` by a script that answers as swrk does:
# it writes a log into the work dir fd it was given, sends the notifications its script lists and waits for
# each go-ahead, then answers, or hangs, or dies. What it saw is written to a file for the test to read.
FAKE_SWRK = r"""
import json, os, socket, sys, time
script = json.loads(os.environ["FAKE_SWRK_SCRIPT"])
sk = socket.socket(fileno=int(sys.argv[2]))
request = json.loads(sk.recv(1 << 20))
opts = request["opts"]
handed = [opts["images_dir_fd"], opts.get("work_dir_fd", -1)] + [i["fd"] for i in opts.get("inherit_fd", [])]
seen = {"argv": sys.argv[1:], "request": request,
        "closed_0_2": [not os.path.exists(f"/proc/self/fd/{n}") for n in range(3)],
        "inheritable": {str(fd): os.path.exists(f"/proc/self/fd/{fd}") for fd in handed}}
log = os.open(opts["log_file"], os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=opts["work_dir_fd"])
os.fchmod(log, 0o644)  # what CRIU leaves
os.write(log, ("\n".join(script.get("log", [])) + "\n").encode())
def record():
    with open(os.environ["FAKE_SWRK_SEEN"] + ".tmp", "w") as handle:
        json.dump(seen, handle)
    os.replace(os.environ["FAKE_SWRK_SEEN"] + ".tmp", os.environ["FAKE_SWRK_SEEN"])
seen["acks"] = []
record()
for name in script.get("notify", []):
    sk.send(json.dumps({"type": 6, "notify": {"script": name, "pid": script.get("root_pid", 0)}}).encode())
    reply = sk.recv(1 << 20)
    seen["acks"].append(json.loads(reply) if reply else None)
    record()
if script.get("hang"):
    time.sleep(3600)
if script.get("die"):
    os._exit(9)
answer = {"type": request["type"], "success": script.get("success", True), "cr_errno": script.get("errno", 0),
          "cr_errmsg": script.get("errmsg", ""), "restore": {"pid": script.get("root_pid", 4242)}}
sk.send(json.dumps(answer).encode())
"""


class _Message:
    """A JSON-serialising stand-in for a protobuf message (only what the adapter uses)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def SerializeToString(self) -> bytes:  # noqa: N802 - protobuf's name
        def plain(value: Any) -> Any:
            return {k: plain(v) for k, v in vars(value).items()} if isinstance(value, _Message) else value
        return json.dumps(plain(self)).encode()


class _InheritFds(list):
    def add(self, **entry: Any) -> None:
        self.append(entry)


class _Response:
    def ParseFromString(self, data: bytes) -> None:  # noqa: N802
        fields = json.loads(data)
        self.type, self.success = fields["type"], fields.get("success", True)
        self.cr_errno, self.cr_errmsg = fields.get("cr_errno", 0), fields.get("cr_errmsg", "")
        self.notify = types.SimpleNamespace(**fields.get("notify", {"script": "", "pid": 0}))
        self.restore = types.SimpleNamespace(**fields.get("restore", {"pid": 0}))


def _fake_rpc_pb2() -> types.ModuleType:
    module = types.ModuleType("rpc_pb2")
    module.DUMP, module.RESTORE, module.NOTIFY = 1, 2, 6  # type: ignore[attr-defined]
    module.criu_opts = (  # type: ignore[attr-defined]
        lambda **fields: _Message(inherit_fd=_InheritFds(), external=[], **fields))
    module.criu_req = _Message  # type: ignore[attr-defined]
    module.criu_resp = _Response  # type: ignore[attr-defined]
    return module


@dataclasses.dataclass
class FakeSwrk:
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch

    def script(self, **behaviour: Any) -> None:
        self.monkeypatch.setenv("FAKE_SWRK_SCRIPT", json.dumps(behaviour))

    @property
    def seen(self) -> dict[str, Any]:
        return json.loads((self.tmp_path / "seen.json").read_text())

    @property
    def options(self) -> dict[str, Any]:
        return self.seen["request"]["opts"]


@pytest.fixture
def swrk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeSwrk:
    module = types.ModuleType("pycriu")
    module.rpc_pb2 = _fake_rpc_pb2()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pycriu", module)
    binary = tmp_path / "criu"
    binary.write_text(f"#!{sys.executable}\n{FAKE_SWRK}")
    binary.chmod(0o755)
    monkeypatch.setattr(criu, "CRIU_BINARY", str(binary))
    monkeypatch.setenv("FAKE_SWRK_SEEN", str(tmp_path / "seen.json"))
    for name in ("images", "logs"):
        (tmp_path / name).mkdir()
    fake = FakeSwrk(tmp_path, monkeypatch)
    fake.script()
    return fake


def _dump(tmp_path: Path, **options: Any) -> criu.DumpResult:
    return criu.dump(42, str(tmp_path / "images"), str(tmp_path / "logs"), "dump.log", **{"tcp": "close", **options})


def _restore(tmp_path: Path, **options: Any) -> int:
    return criu.restore(str(tmp_path / "images"), str(tmp_path / "logs"), "restore.log",
                        **{"inherit": {}, "tcp": "close", **options})


def test_a_failed_dump_is_one_readable_line_with_the_fix_errno_and_log_path(swrk: FakeSwrk, tmp_path: Path) -> None:
    swrk.script(log=[*NOISE, "(00.02) Error (criu/fsnotify.c:1): fsnotify: Can't dump that handle"],
                success=False, errno=errno.EPERM)
    # This container lacks DAC_READ_SEARCH (the advice is read against the supervisor's own capabilities).
    swrk.monkeypatch.setattr(criu.Granted, "of_this_process",
                             classmethod(lambda cls, proc="/proc": criu.NOTHING_GRANTED))
    log_path = str(tmp_path / "logs" / "dump.log")
    with pytest.raises(DumpFailed) as caught:
        _dump(tmp_path)
    failure = caught.value
    assert failure.message == (
        "checkpoint failed: Error (criu/fsnotify.c:1): fsnotify: Can't dump that handle -> the app holds "
        f"inotify/fanotify watches; add --cap-add DAC_READ_SEARCH (full CRIU log: {log_path})"
    )
    assert failure.errno == errno.EPERM
    assert failure.log_path == log_path


def test_a_failure_criu_logs_nothing_about_quotes_criu_own_message(swrk: FakeSwrk, tmp_path: Path) -> None:
    swrk.script(success=False, errno=errno.EINVAL, errmsg="Bad options")
    with pytest.raises(DumpFailed, match=r"^checkpoint failed: Bad options \(full CRIU log"):
        _dump(tmp_path)


def test_after_a_dump_criu_logs_are_private(swrk: FakeSwrk, tmp_path: Path) -> None:
    result = _dump(tmp_path)
    assert os.stat(result.log_path).st_mode & 0o777 == 0o600


def test_after_a_failed_restore_criu_logs_are_private(swrk: FakeSwrk, tmp_path: Path) -> None:
    swrk.script(success=False, errno=errno.EEXIST)
    with pytest.raises(RestoreFailed):
        _restore(tmp_path)
    assert os.stat(tmp_path / "logs" / "restore.log").st_mode & 0o777 == 0o600


def test_after_a_failed_dump_criu_logs_are_private(swrk: FakeSwrk, tmp_path: Path) -> None:
    swrk.script(success=False, errno=errno.EPERM)
    with pytest.raises(DumpFailed):
        _dump(tmp_path)
    assert os.stat(tmp_path / "logs" / "dump.log").st_mode & 0o777 == 0o600


def test_dump_passes_the_pid_leave_stopped_and_tcp_choice_and_inheritable_directory_fds(
    swrk: FakeSwrk, tmp_path: Path
) -> None:
    result = _dump(tmp_path, tcp="established", log_level=2)
    options = swrk.options
    assert swrk.seen["argv"][0] == "swrk"
    assert (options["pid"], options["log_level"]) == (42, 2)
    # The caller kills the tree only once the checkpoint is published, or resumes it on failure.
    assert options["leave_stopped"] is True
    assert "leave_running" not in options, "CRIU must neither resume nor kill the tree itself"
    assert options.get("tcp_established") is True and "tcp_close" not in options
    assert all(swrk.seen["inheritable"].values()), "criu swrk is spawned: the directory fds must be inheritable"
    assert swrk.seen["closed_0_2"] == [True, True, True], "swrk runs with fds 0-2 closed, as under pycriu"
    assert result.log_path == str(tmp_path / "logs" / "dump.log")


def test_restore_hands_over_stdio_as_inheritable_fds_above_2_and_closes_them_after(
    swrk: FakeSwrk, tmp_path: Path
) -> None:
    swrk.script(root_pid=4242)
    pid = _restore(tmp_path, inherit={"pipe:[1234]": 1, "pipe:[5678]": 2})
    options = swrk.options
    assert pid == 4242
    assert options["rst_sibling"] is True, "the restored tree must become our child"
    assert options["notify_scripts"] is True, "so that the tree can be held at pre-resume"
    assert options["tcp_close"] is True
    handed = options["inherit_fd"]
    assert [entry["key"] for entry in handed] == ["pipe:[1234]", "pipe:[5678]"]
    for entry in handed:
        assert entry["fd"] > 2, "swrk runs with fds 0-2 closed"
        assert swrk.seen["inheritable"][str(entry["fd"])]
        with pytest.raises(OSError):
            os.fstat(entry["fd"])  # our duplicates are closed again


def test_a_failed_restore_is_restore_failed_with_the_log_path_and_this_containers_fault(
    swrk: FakeSwrk, tmp_path: Path
) -> None:
    swrk.script(log=["(00.05) Error (criu/cr-restore.c:1480): Can't fork for 42: File exists"], success=False,
                errno=errno.EEXIST)
    expected = r"^restore failed: .*already taken.*\(full CRIU log: .*restore.log\)$"
    with pytest.raises(RestoreFailed, match=expected) as caught:
        _restore(tmp_path)
    assert caught.value.fault == CONTAINER_AT_FAULT


def test_a_restore_failing_on_unusable_images_is_the_checkpoints_fault(swrk: FakeSwrk, tmp_path: Path) -> None:
    swrk.script(log=["(00.05) Error (criu/protobuf.c:72): Unexpected EOF on (empty-image) mm-27.img"], success=False)
    with pytest.raises(RestoreFailed) as caught:
        _restore(tmp_path)
    assert caught.value.fault == CHECKPOINT_AT_FAULT


def test_each_notification_is_answered_and_pre_resume_is_handed_the_root_pid(swrk: FakeSwrk, tmp_path: Path) -> None:
    swrk.script(notify=["setup-namespaces", "post-restore", "pre-resume", "post-resume"], root_pid=4242)
    held: list[int | None] = []
    assert _restore(tmp_path, before_resume=held.append) == 4242
    assert held == [4242]
    assert [ack["notify_success"] for ack in swrk.seen["acks"]] == [True] * 4


def test_a_failure_before_resume_aborts_the_restore_and_kills_swrk(swrk: FakeSwrk, tmp_path: Path) -> None:
    swrk.script(notify=["pre-resume"], hang=True)

    def refuse(_root: int | None) -> None:
        raise RestoreFailed("the pages did not match")

    started = time.monotonic()
    with pytest.raises(RestoreFailed, match="the pages did not match"):
        _restore(tmp_path, before_resume=refuse)
    assert time.monotonic() - started < 5, "swrk was killed, not waited for"
    assert swrk.seen["acks"] == [], "no go-ahead was given: the tree never ran"


def test_a_restore_that_makes_no_progress_is_killed_after_the_stall_timeout(swrk: FakeSwrk, tmp_path: Path) -> None:
    swrk.script(hang=True, log=["(00.01) Error (criu/pie/restorer.c:1): BUG at criu/pie/restorer.c:1"])
    started = time.monotonic()
    with pytest.raises(RestoreStalled, match=r"no progress for 1 s \(CKPT_RESTORE_STALL\)") as caught:
        _restore(tmp_path, stall_timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 5
    assert caught.value.fault == CONTAINER_AT_FAULT


def test_a_stop_asked_for_during_a_restore_interrupts_it_at_once(swrk: FakeSwrk, tmp_path: Path) -> None:
    swrk.script(hang=True)
    asked = time.monotonic() + 0.3
    with pytest.raises(RestoreInterrupted):
        _restore(tmp_path, stall_timeout=60.0, should_stop=lambda: time.monotonic() > asked)
    assert time.monotonic() - asked < 2


def test_criu_dying_without_an_answer_is_a_failed_restore(swrk: FakeSwrk, tmp_path: Path) -> None:
    swrk.script(die=True)
    with pytest.raises(RestoreFailed, match="CRIU died"):
        _restore(tmp_path)


def test_leftover_processes_of_a_failed_restore_are_killed_and_reaped() -> None:
    leftovers = criu._Leftovers(tcp="close")
    child = subprocess.Popen(["sleep", "60"])  # born during the "restore": one of its processes
    leftovers.remove()
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)  # killed and reaped already
    child.returncode = -9  # so that Popen's own bookkeeping does not wait for it again


def test_without_pycriu_dump_is_an_environment_problem(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pycriu", None)  # makes `import pycriu` raise ImportError
    with pytest.raises(EnvironmentProblem, match="pycriu is not installed"):
        criu.dump(42, str(tmp_path), str(tmp_path), "dump.log", tcp="close")


# --- version ------------------------------------------------------------------------------------
@pytest.fixture
def fake_criu_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    binary = tmp_path / "criu"
    monkeypatch.setattr(criu, "CRIU_BINARY", str(binary))
    criu.version.cache_clear()
    yield binary
    criu.version.cache_clear()


def test_version_is_read_from_criu_itself(fake_criu_binary: Path) -> None:
    fake_criu_binary.write_text("#!/bin/sh\necho 'Version: 4.2.1'\necho 'GitID: v4.2.1'\n")
    fake_criu_binary.chmod(0o755)
    assert criu.version() == "4.2.1"


def test_a_missing_criu_is_an_environment_problem(fake_criu_binary: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="cannot run"):
        criu.version()


def test_unreadable_version_output_is_an_environment_problem(fake_criu_binary: Path) -> None:
    fake_criu_binary.write_text("#!/bin/sh\necho 'criu: unknown option'\n")
    fake_criu_binary.chmod(0o755)
    with pytest.raises(EnvironmentProblem, match="cannot read CRIU's version"):
        criu.version()


@pytest.mark.parametrize(("text", "parsed"), [("4.2.1", (4, 2, 1)), ("3.19", (3, 19))])
def test_version_tuple(text: str, parsed: tuple[int, ...]) -> None:
    assert criu.version_tuple(text) == parsed
