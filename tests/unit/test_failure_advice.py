"""Issue 14 without CRIU: what a dump needs (file locks, linked remaps) found in /proc, and advice that fits.

The locks and remaps are real ones, held by this test process and found in the
real /proc; the CRIU log lines are the ones CRIU 4.2.1 wrote when each failure
was provoked in a real container (tests/integration/test_popular_servers.py).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor_pkg import config, criu, dump_needs
from supervisor_pkg.errors import ConfigError

F_OFD_SETLK = 37


@pytest.fixture(name="held")
def held_fixture(tmp_path: Path) -> Iterator[dict[str, int]]:
    """This process holding a POSIX lock, an OFD lock and a flock on three files in tmp_path."""
    fds = {name: os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o600) for name in ("posix", "ofd", "flock")}
    fcntl.lockf(fds["posix"], fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
    fcntl.fcntl(fds["ofd"], F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    fcntl.flock(fds["flock"], fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


# --- file locks -------------------------------------------------------------------------------------------------
def test_every_kind_of_file_lock_the_app_holds_is_found(held: dict[str, int], tmp_path: Path) -> None:
    locks = dump_needs.inspect([os.getpid()]).file_locks
    found = {(lock.kind, os.path.basename(lock.path)) for lock in locks if lock.path.startswith(str(tmp_path))}
    assert found == {("POSIX", "posix"), ("OFDLCK", "ofd"), ("FLOCK", "flock")}
    assert all(lock.pid == os.getpid() and lock.access == "WRITE" for lock in locks if str(tmp_path) in lock.path)


def test_no_lock_means_no_file_locks(tmp_path: Path) -> None:
    handle = os.open(tmp_path / "unlocked", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert [lock for lock in dump_needs.inspect([os.getpid()]).file_locks if str(tmp_path) in lock.path] == []
    finally:
        os.close(handle)


def fake_process(proc: Path, pid: int, fds: dict[int, tuple[str, str]]) -> None:
    """/proc/PID/fd/N -> target and /proc/PID/fdinfo/N with `info`, for each fd."""
    (proc / str(pid) / "fd").mkdir(parents=True)
    (proc / str(pid) / "fdinfo").mkdir()
    for fd, (target, info) in fds.items():
        (proc / str(pid) / "fd" / str(fd)).symlink_to(target)
        (proc / str(pid) / "fdinfo" / str(fd)).write_text(f"pos:\t0\nflags:\t02\nmnt_id:\t30\nino:\t5\n{info}")


def test_a_lock_shared_across_fork_is_one_lock_and_waiters_hold_nothing(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    flock = "lock:\t1: FLOCK  ADVISORY  WRITE 10 00:2f:100 0 EOF\n"
    fake_process(proc, 10, {3: ("/var/lib/app/flock", flock),
                            4: ("/var/lib/app/posix", "lock:\t2: POSIX  ADVISORY  READ 10 00:2f:101 0 9\n")})
    fake_process(proc, 11, {3: ("/var/lib/app/flock", flock),  # the child's copy of the same open file
                            5: ("/var/lib/app/posix", "lock:\t3: POSIX  ADVISORY  READ 11 00:2f:101 0 9\n")})
    (proc / "locks").write_text("1: FLOCK  ADVISORY  WRITE 10 00:2f:100 0 EOF\n"
                                "2: POSIX  ADVISORY  READ 10 00:2f:101 0 9\n"
                                "2: -> POSIX  ADVISORY  WRITE 12 00:2f:101 0 9\n"  # a waiter, outside the app
                                "4: POSIX  ADVISORY  WRITE 99 00:2f:777 0 EOF\n"  # another process's lock
                                "5: POSIX  ADVISORY  WRITE 11 00:2f:555 0 EOF\n")  # fdinfo did not show it
    locks = dump_needs.inspect([10, 11], proc=str(proc)).file_locks
    assert [lock.describe() for lock in locks] == [
        "FLOCK write lock on /var/lib/app/flock (pid 10)",
        "POSIX read lock on /var/lib/app/posix (pid 10)",
        "POSIX read lock on /var/lib/app/posix (pid 11)",
        "POSIX write lock on inode 00:2f:555 (pid 11)",
    ]


# --- linked remaps ----------------------------------------------------------------------------------------------
def test_a_file_open_under_a_removed_name_with_another_link_needs_a_linked_remap(tmp_path: Path) -> None:
    with open(tmp_path / "linked", "w") as handle:
        os.link(tmp_path / "linked", tmp_path / "kept")
        os.unlink(tmp_path / "linked")
        assert dump_needs.inspect([os.getpid()]).link_remaps == (str(tmp_path / "linked"),)
        assert handle.writable()


def test_a_deleted_file_without_links_is_a_ghost_file_not_a_remap(tmp_path: Path) -> None:
    with open(tmp_path / "ghost", "w"):
        os.unlink(tmp_path / "ghost")
        assert dump_needs.inspect([os.getpid()]).link_remaps == ()


def test_an_nfs_silly_renamed_file_needs_a_linked_remap(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_process(proc, 10, {3: ("/checkpoints/data/.nfs000000000000abcd00000001", ""), 4: ("pipe:[123]", "")})
    assert dump_needs.inspect([10], proc=str(proc)).link_remaps == ("/checkpoints/data/.nfs000000000000abcd00000001",)


# --- criu.dump asks CRIU for them, and says so once -------------------------------------------------------------
class Options:
    file_locks = False
    link_remap = False


def test_the_dump_options_follow_what_the_app_holds_and_each_is_logged_once(
    held: dict[str, int], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(criu, "_ANNOUNCED", set())
    monkeypatch.setattr(criu.launcher, "namespace_members", lambda _pid: [os.getpid()])
    caplog.set_level(logging.DEBUG, logger="criu-supervisor")
    for _ in range(2):
        opts: Any = Options()
        criu._ask_for_what_the_app_needs(opts, 1)
        assert opts.file_locks is True and opts.link_remap is False
    infos = [record.message for record in caplog.records if record.levelno == logging.INFO]
    assert len(infos) == 1 and "CRIU's file_locks is on" in infos[0] and "POSIX write lock on" in infos[0], infos


def test_a_restore_takes_the_locks_again_only_when_the_dump_recorded_some(tmp_path: Path) -> None:
    assert criu._has_file_locks(str(tmp_path)) is False
    (tmp_path / "filelocks.img").write_bytes(b"\x10\x22\x11\x54\x4d\x12\x14\x54")  # the two magics: no lock
    assert criu._has_file_locks(str(tmp_path)) is False
    (tmp_path / "filelocks.img").write_bytes(b"\x10\x22\x11\x54\x4d\x12\x14\x54" +
                                             b"\x0c\x00\x00\x00" + b"\x08\x01" * 6)
    assert criu._has_file_locks(str(tmp_path)) is True


# --- CKPT_MPTCP --------------------------------------------------------------------------------------------------
def test_mptcp_is_denied_by_default_and_can_be_allowed() -> None:
    assert config.load({}).mptcp == "deny"
    assert config.load({"CKPT_MPTCP": "allow"}).mptcp == "allow"
    assert config.load({}, {"mptcp": "allow"}).mptcp == "allow"
    with pytest.raises(ConfigError, match=r"CKPT_MPTCP='on' is not valid: accepted values are deny, allow"):
        config.load({"CKPT_MPTCP": "on"})


# --- advice read against what the container grants ---------------------------------------------------------------
ALL_GRANTED = criu.Granted.parse("CapEff:\t000001ffffffffff\nSeccomp:\t0\n")
NO_PTRACE = criu.Granted.parse("CapEff:\t00000000a82425fb\nSeccomp:\t0\n")  # Docker's default set + SYS_ADMIN


def explain(tmp_path: Path, lines: list[str], granted: criu.Granted, proc: str = "/proc") -> tuple[str, str]:
    log = tmp_path / "dump.log"
    log.write_text("\n".join([*lines, "(00.1) Error (criu/cr-dump.c:1975): Dumping FAILED."]) + "\n")
    line, _, advice = criu.explain(str(log), RuntimeError("DUMP failed with -1"), granted=granted,
                                   proc=proc).partition(" -> ")
    return line, advice


def test_granted_is_read_from_proc_self_status() -> None:
    assert ALL_GRANTED.has("SYS_PTRACE") and ALL_GRANTED.has("DAC_READ_SEARCH") and not ALL_GRANTED.seccomp_filter
    assert not NO_PTRACE.has("SYS_PTRACE") and NO_PTRACE.has("SYS_ADMIN") and not NO_PTRACE.has("NET_ADMIN")
    assert criu.Granted.parse("CapEff:\t0\nSeccomp:\t2\n").seccomp_filter
    assert criu.Granted.parse("", "docker-default (enforce)\n").apparmor_profile
    assert not criu.Granted.parse("", "unconfined\n").apparmor_profile
    here = criu.Granted.of_this_process()
    assert isinstance(here.capabilities, frozenset)


MPTCP = ["(00.064295) Error (criu/sk-inet.c:137): inet: Unsupported proto 262 for socket 156d5a",
         '(00.064297) Error (criu/sk-inet.c:139): inet: For Go programs, consider using "GODEBUG=multipathtcp=0" to '
         "disable MPTCP",
         "(00.064314) Error (criu/cr-dump.c:1545): Dump files (pid: 11) failed with -1"]


def test_an_mptcp_socket_is_explained_with_criu_s_own_hint(tmp_path: Path) -> None:
    line, advice = explain(tmp_path, MPTCP, ALL_GRANTED)
    assert line == ("Error (criu/sk-inet.c:137): inet: Unsupported proto 262 for socket 156d5a; CRIU adds: inet: For "
                    'Go programs, consider using "GODEBUG=multipathtcp=0" to disable MPTCP')
    assert "Multipath TCP" in advice and "keep CKPT_MPTCP=deny" in advice and "GODEBUG=multipathtcp=0" in advice


def test_a_hint_naming_a_criu_option_is_not_quoted(tmp_path: Path) -> None:
    line, _ = explain(tmp_path, ["(0.1) Error (criu/sk-unix.c:874): unix: External socket is used.",
                                 "(0.1) Error (criu/sk-unix.c:875): unix: Consider using --ext-unix-sk option."],
                      ALL_GRANTED)
    assert line == "Error (criu/sk-unix.c:874): unix: External socket is used."


def test_file_locks_taken_after_the_look_say_the_next_checkpoint_carries_them(tmp_path: Path) -> None:
    line, advice = explain(tmp_path, ["(00.579076) Error (criu/file-lock.c:110): Some file locks are hold by dumping "
                                      "tasks! You can try --file-locks to dump them."], ALL_GRANTED)
    assert line.endswith("You can try --file-locks to dump them.")
    assert "the next checkpoint carries it" in advice and "--file-locks" not in advice


TRACED = ["(00.052602) Warn  (compel/src/lib/infect.c:132): Unable to interrupt task: 15 (Operation not permitted)",
          "(00.052634) Error (compel/src/lib/infect.c:262): Unseizable non-zombie 15 found, state t, err -1/10"]
UNSEIZABLE = ["(00.040576) Error (compel/src/lib/infect.c:262): Unseizable non-zombie 10 found, state S, err -1/10"]


def test_a_traced_task_is_named_with_its_tracer_and_no_capability_is_asked_for(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid, name, tracer in (("15", "python3", "14"), ("14", "strace", "0")):
        (proc / pid).mkdir(parents=True)
        (proc / pid / "status").write_text(f"Name:\t{name}\nState:\tt (tracing stop)\nTracerPid:\t{tracer}\n")
    for granted in (ALL_GRANTED, NO_PTRACE):
        line, advice = explain(tmp_path, TRACED, granted, proc=str(proc))
        assert line.endswith("Unseizable non-zombie 15 found, state t, err -1/10")
        assert "pid 15 (python3) of the app is traced by pid 14 (strace)" in advice
        assert "detach the tracer" in advice and "SYS_PTRACE" not in advice


def test_sys_ptrace_is_asked_for_only_when_the_container_lacks_it(tmp_path: Path) -> None:
    _, advice = explain(tmp_path, UNSEIZABLE, NO_PTRACE, proc=str(tmp_path))
    assert advice.endswith("add --cap-add SYS_PTRACE")
    _, advice = explain(tmp_path, UNSEIZABLE, ALL_GRANTED, proc=str(tmp_path))
    assert "--cap-add" not in advice and "although this container has CAP_SYS_PTRACE" in advice


def test_seccomp_unconfined_is_asked_for_only_under_a_seccomp_filter(tmp_path: Path) -> None:
    lines = ["(00.047077) Error (compel/src/lib/ptrace.c:27): suspending seccomp failed: Operation not permitted"]
    _, advice = explain(tmp_path, lines, criu.Granted.parse("CapEff:\t000001ffffffffff\nSeccomp:\t2\n"))
    assert "--security-opt seccomp=unconfined" in advice
    _, advice = explain(tmp_path, lines, ALL_GRANTED)
    assert "seccomp=unconfined" not in advice and "user namespace" in advice


def test_dac_read_search_is_asked_for_only_when_missing(tmp_path: Path) -> None:
    lines = ["(00.053703) Error (criu/fsnotify.c:284): fsnotify: \tCan't dump that handle"]
    assert explain(tmp_path, lines, NO_PTRACE)[1].endswith("add --cap-add DAC_READ_SEARCH")
    _, advice = explain(tmp_path, lines, ALL_GRANTED)
    assert "--cap-add" not in advice and "overlayfs" in advice


def test_a_generic_permission_error_names_only_the_missing_settings(tmp_path: Path) -> None:
    lines = ["(00.001000) Error (criu/namespaces.c:999): Can't open ns: Operation not permitted"]
    assert explain(tmp_path, lines, NO_PTRACE)[1] == ("CRIU lacks a permission; add --cap-add SYS_PTRACE --cap-add "
                                                      "SYS_TIME --cap-add NET_ADMIN")
    _, advice = explain(tmp_path, lines, ALL_GRANTED)
    assert "--cap-add" not in advice and "--security-opt" not in advice
    _, advice = explain(tmp_path, ["(0.1) Error (criu/cr-dump.c:1480): Can't infect (pid: 11) with parasite"],
                        ALL_GRANTED)
    assert advice == ""  # ptrace works here: the line speaks for itself, no wrong advice


PHP_JIT = [
    "(00.079169) Handling VMA with the following smaps entry: 55fb58800000-55fb60800000 rw-s 00000000 00:01 6329"
    "                       /dev/zero (deleted)",
    "(00.081427) Handling VMA with the following smaps entry: 55fb60800000-55fb64800000 r-xs 08000000 00:01 6329"
    "                       /dev/zero (deleted)",
    "(00.042617) Parasite syscall_ip at 0x560dd3d53000",
    "(00.087487) Parasite syscall_ip at 0x55fb60800000",
    "(00.087502) Error (compel/src/lib/ptrace.c:73): POKEDATA failed: Input/output error",
    "(00.087503) Error (compel/src/lib/ptrace.c:96): Can't poke 11 @ 0x55fb60800008 from 0x7ffed50f5fc0 sized 8",
    "(00.087508) Error (compel/src/lib/infect.c:826): Can't inject memfd args (pid: 11)",
    "(00.087522) Error (criu/cr-dump.c:1480): Can't infect (pid: 11) with parasite",
]


def test_a_jit_buffer_is_named_from_criu_s_log_with_the_php_setting(tmp_path: Path) -> None:
    line, advice = explain(tmp_path, PHP_JIT, ALL_GRANTED)
    assert line == "Error (compel/src/lib/ptrace.c:73): POKEDATA failed: Input/output error"
    assert "55fb60800000-55fb64800000 r-xs (64 MiB, /dev/zero (deleted))" in advice and "pid 11" in advice
    assert "opcache.jit_buffer_size=0" in advice and "SYS_PTRACE" not in advice
    # Without the poke line, the last syscall_ip before the failure is the failing task's.
    line, advice = explain(tmp_path, [entry for entry in PHP_JIT if "Can't poke" not in entry], ALL_GRANTED)
    assert "55fb60800000-55fb64800000 r-xs" in advice


def test_a_linked_remap_without_dac_read_search_says_to_add_it(tmp_path: Path) -> None:
    lines = ["(00.058503) Warn  (criu/files-reg.c:1881): Can't link  -> ./data/link_remap.18",
             "(00.058508) Error (criu/files-reg.c:1165): trim failed: @link_remap.18@"]
    line, advice = explain(tmp_path, lines, NO_PTRACE)
    assert line == "Error (criu/files-reg.c:1165): trim failed: @link_remap.18@"
    assert "linked remap" in advice and advice.endswith("add --cap-add DAC_READ_SEARCH")
    assert "--cap-add" not in explain(tmp_path, lines, ALL_GRANTED)[1]


def test_unreachable_mount_sharing_points_at_ckpt_own_proc(tmp_path: Path) -> None:
    lines = ["(00.002964) Error (criu/mount.c:1088): mnt: Mount 919 ./boot/efi (master_id: 30 shared_id: 0) has "
             "unreachable sharing. Try --enable-external-masters."]
    _, advice = explain(tmp_path, lines, ALL_GRANTED)
    assert "CKPT_OWN_PROC=1" in advice and "--enable-external" not in advice
