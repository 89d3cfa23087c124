"""The CRIU adapter without CRIU: explain() on fake logs, dump/restore over a fake pycriu, version()."""

from __future__ import annotations

import errno
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from supervisor_pkg import criu
from supervisor_pkg.errors import DumpFailed, EnvironmentProblem, RestoreFailed


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
    explained = criu.explain(log, RuntimeError("DUMP failed with -1"))
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
    assert criu.explain(log) == (
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
    log = write_log(tmp_path, "(00.2) Error (criu/cr-restore.c:2000): Can't remove /tmp/.criu.mntns: Directory not empty")
    assert "terminal" not in criu.explain(log)


# --- dump/restore over a fake pycriu ---------------------------------------------------------------
class FakeCRIUException(Exception):
    def __init__(self, number: int) -> None:
        super().__init__(f"CRIU failed with {-number}")
        self.errno = number


class FakeInheritFds(list):
    def add(self, **entry: Any) -> None:
        self.append(entry)


class FakeCriu:
    """Stands in for pycriu.criu: records its options and what it saw when called."""

    instances: ClassVar[list[FakeCriu]] = []
    log_lines: ClassVar[list[str]] = []
    fail_with: ClassVar[int | None] = None
    restored_pid: ClassVar[int] = 4242

    def __init__(self) -> None:
        self.opts = types.SimpleNamespace(inherit_fd=FakeInheritFds(), external=[])
        self.seen: dict[str, Any] = {}
        FakeCriu.instances.append(self)

    def use_binary(self, binary: str) -> None:
        self.binary = binary

    def _run(self) -> None:
        self.seen["dir_fds_inheritable"] = (
            os.get_inheritable(self.opts.images_dir_fd) and os.get_inheritable(self.opts.work_dir_fd)
        )
        self.seen["inherit_fds"] = [
            (entry["key"], entry["fd"], os.get_inheritable(entry["fd"])) for entry in self.opts.inherit_fd
        ]
        fd = os.open(self.opts.log_file, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=self.opts.work_dir_fd)
        os.fchmod(fd, 0o644)  # what CRIU leaves
        with os.fdopen(fd, "w") as log:
            log.write("\n".join(self.log_lines) + "\n")
        if self.fail_with is not None:
            raise FakeCRIUException(self.fail_with)

    def dump(self) -> None:
        self._run()

    def restore(self) -> Any:
        self._run()
        return types.SimpleNamespace(pid=self.restored_pid)


@pytest.fixture
def fake_pycriu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> type[FakeCriu]:
    module = types.ModuleType("pycriu")
    module.criu = FakeCriu  # type: ignore[attr-defined]
    module.CRIUException = FakeCRIUException  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pycriu", module)
    monkeypatch.setattr(FakeCriu, "instances", [])
    monkeypatch.setattr(FakeCriu, "log_lines", [])
    monkeypatch.setattr(FakeCriu, "fail_with", None)
    for name in ("images", "logs"):
        (tmp_path / name).mkdir()
    return FakeCriu


def test_a_failed_dump_is_one_readable_line_with_the_fix_errno_and_log_path(
    fake_pycriu: type[FakeCriu], tmp_path: Path
) -> None:
    fake_pycriu.log_lines = [*NOISE, "(00.02) Error (criu/fsnotify.c:1): fsnotify: Can't dump that handle"]
    fake_pycriu.fail_with = errno.EPERM
    log_path = str(tmp_path / "logs" / "dump.log")
    with pytest.raises(DumpFailed) as caught:
        criu.dump(42, str(tmp_path / "images"), str(tmp_path / "logs"), "dump.log", tcp="close")
    failure = caught.value
    assert failure.message == (
        "checkpoint failed: Error (criu/fsnotify.c:1): fsnotify: Can't dump that handle -> the app holds "
        f"inotify/fanotify watches; add --cap-add DAC_READ_SEARCH (full CRIU log: {log_path})"
    )
    assert failure.errno == errno.EPERM
    assert failure.log_path == log_path
    assert isinstance(failure.__cause__, FakeCRIUException)


def test_after_a_dump_criu_logs_are_private(fake_pycriu: type[FakeCriu], tmp_path: Path) -> None:
    result = criu.dump(42, str(tmp_path / "images"), str(tmp_path / "logs"), "dump.log", tcp="close")
    assert os.stat(result.log_path).st_mode & 0o777 == 0o600


def test_after_a_failed_restore_criu_logs_are_private(fake_pycriu: type[FakeCriu], tmp_path: Path) -> None:
    fake_pycriu.fail_with = errno.EEXIST
    with pytest.raises(RestoreFailed):
        criu.restore(str(tmp_path / "images"), str(tmp_path / "logs"), "restore.log", inherit={}, tcp="close")
    assert os.stat(tmp_path / "logs" / "restore.log").st_mode & 0o777 == 0o600


def test_after_a_failed_dump_criu_logs_are_private(fake_pycriu: type[FakeCriu], tmp_path: Path) -> None:
    fake_pycriu.fail_with = errno.EPERM
    with pytest.raises(DumpFailed):
        criu.dump(42, str(tmp_path / "images"), str(tmp_path / "logs"), "dump.log", tcp="close")
    assert os.stat(tmp_path / "logs" / "dump.log").st_mode & 0o777 == 0o600


def test_dump_passes_the_pid_leave_stopped_and_tcp_choice_and_inheritable_directory_fds(
    fake_pycriu: type[FakeCriu], tmp_path: Path
) -> None:
    result = criu.dump(42, str(tmp_path / "images"), str(tmp_path / "logs"), "dump.log",
                       tcp="established", log_level=2)
    [client] = fake_pycriu.instances
    assert (client.opts.pid, client.opts.log_level) == (42, 2)
    # The caller kills the tree only once the checkpoint is published, or resumes it on failure.
    assert client.opts.leave_stopped is True
    assert not hasattr(client.opts, "leave_running"), "CRIU must neither resume nor kill the tree itself"
    assert getattr(client.opts, "tcp_established", False) is True
    assert not getattr(client.opts, "tcp_close", False)
    assert client.seen["dir_fds_inheritable"], "criu swrk is fork+exec'd: the directory fds must be inheritable"
    assert result.log_path == str(tmp_path / "logs" / "dump.log")


def test_restore_hands_over_stdio_as_inheritable_fds_above_2_and_closes_them_after(
    fake_pycriu: type[FakeCriu], tmp_path: Path
) -> None:
    pid = criu.restore(str(tmp_path / "images"), str(tmp_path / "logs"), "restore.log",
                       inherit={"pipe:[1234]": 1, "pipe:[5678]": 2}, tcp="close")
    [client] = fake_pycriu.instances
    assert pid == fake_pycriu.restored_pid
    assert client.opts.rst_sibling is True, "the restored tree must become our child"
    assert client.opts.tcp_close is True
    handed = client.seen["inherit_fds"]
    assert [key for key, _, _ in handed] == ["pipe:[1234]", "pipe:[5678]"]
    for _, fd, inheritable in handed:
        assert fd > 2, "swrk closes fds 0-2 before exec"
        assert inheritable
        with pytest.raises(OSError):
            os.fstat(fd)  # our duplicates are closed again


def test_a_failed_restore_is_restore_failed_with_the_log_path(fake_pycriu: type[FakeCriu], tmp_path: Path) -> None:
    fake_pycriu.log_lines = ["(00.05) Error (criu/cr-restore.c:1480): Can't fork for 42: File exists"]
    fake_pycriu.fail_with = errno.EEXIST
    with pytest.raises(RestoreFailed, match=r"^restore failed: .*already taken.*\(full CRIU log: .*restore.log\)$"):
        criu.restore(str(tmp_path / "images"), str(tmp_path / "logs"), "restore.log", inherit={}, tcp="close")


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
