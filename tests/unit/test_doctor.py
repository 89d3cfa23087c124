"""doctor's checks on fake /proc contents, and explain() on the CRIU lines provoked for issue 5.

The /proc texts, `criu check` outputs and CRIU log lines below were copied from
real containers on this project's machine (Docker 20.10, kernel 6.18, CRIU
4.2.1; 4.1.1 for the too-old case), each named after the setting that made it.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from supervisor_pkg import criu, doctor
from supervisor_pkg.config import load
from supervisor_pkg.doctor import Finding, Host, Status


# --- real /proc/self/status capability and seccomp lines -----------------------------------------------
def status(cap_effective: str, seccomp: str = "0", cap_bounding: str | None = None) -> str:
    return (f"Name:\tpython3\nCapInh:\t0000000000000000\nCapPrm:\t{cap_effective}\nCapEff:\t{cap_effective}\n"
            f"CapBnd:\t{cap_bounding or cap_effective}\nCapAmb:\t0000000000000000\nNoNewPrivs:\t0\n"
            f"Seccomp:\t{seccomp}\nSeccomp_filters:\t{'1' if seccomp == '2' else '0'}\n")


# --cap-add SYS_ADMIN SYS_PTRACE SYS_TIME NET_ADMIN (the README's settings)
FULL_CAPS = "00000000aa2c35fb"
FULL_CAPS_NO_PTRACE = "00000000aa2435fb"  # the same without SYS_PTRACE
DOCKER_DEFAULT_CAPS = "00000000a80425fb"  # no --cap-add at all
STATUS_FULL = status(FULL_CAPS)
STATUS_NO_PTRACE = status(FULL_CAPS_NO_PTRACE)
STATUS_DEFAULT_SECCOMP = status(FULL_CAPS, seccomp="2")

# --- real /proc/self/mountinfo lines -------------------------------------------------------------------
ROOT_OVERLAY = ("184 149 0:43 / / rw,relatime master:4 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/VEJG:"
                "/var/lib/docker/overlay2/l/2UFK,upperdir=/var/lib/docker/overlay2/b0a5/diff,"
                "workdir=/var/lib/docker/overlay2/b0a5/work")
PROC = "185 184 0:62 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw"
NAMED_VOLUME = ("201 184 254:0 /var/lib/docker/volumes/dr-doc/_data /checkpoints rw,relatime master:1 - ext4 /dev/vda "
                "rw,discard,resv_strict,resuid=65534,resgid=65534")
ANONYMOUS_VOLUME = ("117 93 254:0 /var/lib/docker/volumes/"
                    "b8126f8230c8002ff70adbd3dc06be4cb9dea4ceab34ed2f3cc1fbb8245b5322/_data /checkpoints "
                    "rw,relatime master:1 - ext4 /dev/vda rw,discard")
TMPFS = "99 82 0:48 / /checkpoints rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw"
# Not seen here (no NFS client, no Kubernetes, no aufs): written from proc(5) and the runtimes' layouts.
NFS = "210 184 0:55 /export/ckpt /checkpoints rw,relatime - nfs4 10.0.0.5:/export/ckpt rw,vers=4.2,addr=10.0.0.5"
EMPTY_DIR = ("700 690 259:1 /var/lib/kubelet/pods/5c1e/volumes/kubernetes.io~empty-dir/ckpt /checkpoints rw,relatime "
             "- ext4 /dev/nvme0n1p1 rw")
ROOT_AUFS = "50 40 0:40 / / rw,relatime - aufs none rw,si=8a3f"
ROOT_BTRFS = "50 40 0:40 /@/docker/btrfs/subvolumes/abc / rw,relatime - btrfs /dev/sda2 rw"


def mountinfo(*lines: str) -> str:
    return "\n".join(lines) + "\n"


# --- real `criu check` outputs (stdout and stderr together) -----------------------------------------
CRIU_CHECK_IN_CONTAINER = (
    "Error (criu/tun.c:85): tun: Unable to create tun: No such file or directory\n"
    "Warn  (criu/kerndat.c:1290): Can't keep kdat cache on non-tempfs\n"
    "Error (criu/cr-check.c:160): sys/kernel/ns_last_pid sysctl is inaccessible: Read-only file system\n"
    "Warn  (criu/cr-check.c:1674): Does not look good.\n"
)
CRIU_WITHOUT_SYS_ADMIN = ("CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability: \n"
                          "setcap cap_checkpoint_restore+eip criu\n")
ALL_FEATURES = {name: True for name in doctor.FEATURES} | {"mem_dirty_track": False}  # as on this machine


class FakeHost:
    """A Host whose /proc, commands and volume are dictionaries."""

    def __init__(
        self,
        *,
        proc_status: str = STATUS_FULL,
        mounts: str = mountinfo(ROOT_OVERLAY, PROC, NAMED_VOLUME),
        criu_version: tuple[int, str] = (0, "Version: 4.2.1\n"),
        criu_check: tuple[int, str] = (1, CRIU_CHECK_IN_CONTAINER),
        features: Mapping[str, bool] = ALL_FEATURES,
        feature_output: str = "",
        directories: Sequence[str] = ("/checkpoints",),
        write_error: OSError | None = None,
        free: int | None = 80 << 30,
        meminfo: str = "MemTotal:       24684084 kB\nMemFree:        21512228 kB\n",
        cgroup_v1_limit: str | None = "9223372036854771712\n",
        pid: int = 1,
        pid1_cmdline: str = "/usr/bin/python3\x00/usr/local/bin/criu-supervisor\x00run\x00--\x00python3\x00",
        stdio: Sequence[str] = ("/dev/null", "pipe:[1089651]", "pipe:[1089652]"),
        apparmor: str | None = None,
        kernel: str = "6.18.44-fc-v669",
        pycriu: bool = True,
    ) -> None:
        self.files = {
            "/proc/self/status": proc_status, "/proc/self/mountinfo": mounts, "/proc/meminfo": meminfo,
            "/proc/sys/kernel/cap_last_cap": "40\n", "/proc/1/cmdline": pid1_cmdline,
            "/sys/fs/cgroup/memory/memory.limit_in_bytes": cgroup_v1_limit,
            "/proc/self/attr/current": apparmor,
        }
        self.commands: dict[tuple[str, ...], tuple[int, str]] = {
            ("criu", "--version"): criu_version, ("criu", "check"): criu_check,
            **{("criu", "check", "--feature", name): (0 if ok else 1, feature_output) for name, ok in features.items()},
        }
        self.ran: list[tuple[str, ...]] = []
        self.directories, self.write_error, self.free = set(directories), write_error, free
        self.links = {f"/proc/1/fd/{fd}": target for fd, target in enumerate(stdio)}
        self.host = Host(
            read=self.files.get, run=self.run, free_bytes=lambda path: self.free,
            try_write=lambda path: self.write_error, readlink=self.links.get,
            exists=lambda path: path in self.directories, realpath=lambda path: path,
            has_module=lambda name: pycriu, pid=lambda: pid, kernel_release=lambda: kernel,
        )

    def run(self, argv: Sequence[str]) -> tuple[int, str]:
        self.ran.append(tuple(argv))
        return self.commands.get(tuple(argv), (127, f"{argv[0]}: not found"))


def checks(fake: FakeHost | None = None, **environment: str) -> dict[str, Finding]:
    findings = doctor.run_checks(load(environment), (fake or FakeHost()).host)
    names = [finding.name for finding in findings]
    assert len(names) == len(set(names)), names
    return {finding.name: finding for finding in findings}


def failed(findings: Mapping[str, Finding]) -> list[str]:
    return [name for name, finding in findings.items() if finding.status is Status.FAIL]


# --- the whole run ----------------------------------------------------------------------------------------
def test_the_readme_settings_on_a_named_volume_pass_with_warnings_only() -> None:
    findings = checks()
    assert failed(findings) == []
    assert doctor.exit_code(list(findings.values())) == 0
    warned = {name for name, finding in findings.items() if finding.status is Status.WARN}
    assert warned == {"feature:mem_dirty_track", "capability:SYS_RESOURCE", "capability:DAC_READ_SEARCH",
                      "ckpt-dir:mount"}


def test_without_sys_ptrace_the_capability_fails_and_the_exit_status_is_non_zero() -> None:
    findings = checks(FakeHost(proc_status=STATUS_NO_PTRACE, features={**ALL_FEATURES, "uffd": False}), CKPT_LAZY="on")
    assert failed(findings) == ["capability:SYS_PTRACE"]
    fix = findings["capability:SYS_PTRACE"].fix
    assert fix is not None and fix.docker_run == "--cap-add SYS_PTRACE" and "SYS_PTRACE" in fix.kubernetes
    assert findings["feature:uffd"].status is Status.WARN  # userfaultfd needs CAP_SYS_PTRACE too
    assert doctor.exit_code(list(findings.values())) == 1


def test_with_dockers_default_seccomp_profile_seccomp_fails() -> None:
    findings = checks(FakeHost(proc_status=STATUS_DEFAULT_SECCOMP))
    assert failed(findings) == ["seccomp"]
    assert "suspending seccomp failed" in findings["seccomp"].detail
    assert findings["seccomp"].fix == doctor.SECCOMP_UNCONFINED


def test_without_a_volume_the_image_volume_is_anonymous_and_fails() -> None:
    findings = checks(FakeHost(mounts=mountinfo(ROOT_OVERLAY, PROC, ANONYMOUS_VOLUME)))
    assert failed(findings) == ["ckpt-dir:mount"]
    assert "anonymous Docker volume" in findings["ckpt-dir:mount"].detail


def test_a_missing_ckpt_dir_fails_and_skips_the_volume_checks() -> None:
    findings = checks(FakeHost(directories=()), CKPT_DIR="/var/ckpt")
    assert failed(findings) == ["ckpt-dir:mount"]
    assert "/var/ckpt does not exist" in findings["ckpt-dir:mount"].detail
    assert "ckpt-dir:writable" not in findings and "ckpt-dir:space" not in findings


def test_no_criu_fails_without_running_any_criu_check() -> None:
    fake = FakeHost(criu_version=(127, "criu: not found"))
    findings = checks(fake)
    assert {"criu", "criu-vs-kernel"} <= set(failed(findings))
    assert fake.ran == [("criu", "--version")]
    assert "criu-check" not in findings


def test_without_sys_admin_criu_refuses_to_probe_features_and_one_finding_says_so() -> None:
    fake = FakeHost(proc_status=status(DOCKER_DEFAULT_CAPS, seccomp="2"), criu_check=(1, CRIU_WITHOUT_SYS_ADMIN),
                    features={name: False for name in doctor.FEATURES}, feature_output=CRIU_WITHOUT_SYS_ADMIN)
    findings = checks(fake)
    assert "features" in failed(findings) and not any(name.startswith("feature:") for name in findings)
    assert "CRIU needs to have the CAP_SYS_ADMIN" in findings["features"].detail
    assert {"criu-check", "capability:SYS_ADMIN", "capability:SYS_PTRACE", "capability:SYS_TIME",
            "capability:NET_ADMIN", "seccomp"} <= set(failed(findings))


# --- CRIU ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("version", "kernel", "criu_status", "kernel_status"),
    [
        ("4.2.1", "6.18.44-fc-v669", Status.OK, Status.OK),
        ("4.1.1", "6.18.44-fc-v669", Status.WARN, Status.FAIL),  # "sockets: Can't get 1:16 opt"
        ("4.1.1", "6.16.0", Status.WARN, Status.FAIL),
        ("4.1.1", "6.15.9", Status.WARN, Status.OK),
        ("4.2", "6.1.0-27-amd64", Status.OK, Status.OK),
    ],
)
def test_criu_version_against_the_kernel(version: str, kernel: str, criu_status: Status, kernel_status: Status) -> None:
    finding, parsed = doctor.check_criu(0, f"Version: {version}\n")
    assert (finding.status, parsed) == (criu_status, version)
    too_old = doctor.check_criu_for_kernel(parsed, kernel)
    assert too_old.status is kernel_status
    if kernel_status is Status.FAIL:
        assert "too old for kernel" in too_old.detail and "TCP or UDP socket" in too_old.detail


def test_criu_that_cannot_run_is_named() -> None:
    finding, version = doctor.check_criu(1, "criu: error while loading shared libraries: libnet.so.9")
    assert finding.status is Status.FAIL and version is None and "libnet.so.9" in finding.detail


def test_pycriu_missing_fails() -> None:
    assert doctor.check_pycriu(False).status is Status.FAIL
    assert doctor.check_pycriu(True).status is Status.OK


def test_criu_check_in_a_container_passes_despite_tun_and_ns_last_pid() -> None:
    finding = doctor.check_criu_check(1, CRIU_CHECK_IN_CONTAINER, clone3_set_tid=True)
    assert finding.status is Status.OK and "do not matter" in finding.detail


def test_a_read_only_ns_last_pid_matters_without_clone3_set_tid() -> None:
    finding = doctor.check_criu_check(1, CRIU_CHECK_IN_CONTAINER, clone3_set_tid=False)
    assert finding.status is Status.FAIL and "ns_last_pid" in finding.detail


def test_criu_check_without_sys_admin_fails_with_criu_s_own_words() -> None:
    finding = doctor.check_criu_check(1, CRIU_WITHOUT_SYS_ADMIN, clone3_set_tid=False)
    assert finding.status is Status.FAIL
    assert finding.detail == ("`criu check` fails: CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE "
                              "capability (and 1 more line(s))")


def test_criu_check_success_is_ok() -> None:
    assert doctor.check_criu_check(0, "Looks good.\n", clone3_set_tid=True).status is Status.OK


def test_features_as_on_this_machine() -> None:
    findings = {f.name: f for f in doctor.check_features(ALL_FEATURES)}
    assert {name: f.status for name, f in findings.items()} == {
        "feature:uffd": Status.OK, "feature:mem_dirty_track": Status.WARN,
        "feature:timens": Status.OK, "feature:clone3_set_tid": Status.OK,
    }
    assert "CONFIG_MEM_SOFT_DIRTY" in findings["feature:mem_dirty_track"].fix.docker_run  # type: ignore[union-attr]


def test_without_userfaultfd_lazy_restore_is_lost_unless_it_is_off() -> None:
    without = {**ALL_FEATURES, "uffd-noncoop": False}
    assert doctor.check_features(without, lazy="auto")[0].status is Status.WARN
    assert doctor.check_features(without, lazy="off")[0].status is Status.OK


def test_without_timens_clocks_jump_and_without_clone3_set_tid_nothing_restores() -> None:
    findings = {f.name: f for f in doctor.check_features({**ALL_FEATURES, "timens": False, "clone3_set_tid": False})}
    assert findings["feature:timens"].status is Status.WARN
    assert findings["feature:clone3_set_tid"].status is Status.FAIL


# --- capabilities, seccomp, AppArmor ---------------------------------------------------------------------
def test_each_missing_capability_names_its_fix_for_every_way_of_running() -> None:
    findings = {f.name: f for f in doctor.check_capabilities(status(DOCKER_DEFAULT_CAPS), cap_last_cap=40)}
    for name in ("SYS_ADMIN", "SYS_PTRACE", "SYS_TIME", "NET_ADMIN"):
        finding = findings[f"capability:{name}"]
        assert finding.status is Status.FAIL
        assert finding.fix == doctor.Fix(f"--cap-add {name}", f"cap_add: [{name}]",
                                         f"securityContext: {{capabilities: {{add: [{name}]}}}}")
    for name in ("SYS_RESOURCE", "DAC_READ_SEARCH"):
        assert findings[f"capability:{name}"].status is Status.WARN


def test_capabilities_granted_but_not_effective_mean_the_supervisor_is_not_root() -> None:
    findings = {f.name: f for f in doctor.check_capabilities(status("0" * 16, cap_bounding=FULL_CAPS), 40)}
    assert findings["capability:SYS_PTRACE"].status is Status.FAIL
    assert findings["capability:SYS_PTRACE"].fix == doctor.RUN_AS_ROOT


def test_all_capabilities_including_the_optional_ones() -> None:
    everything = f"{(1 << 41) - 1:016x}"
    findings = doctor.check_capabilities(status(everything), 40)
    assert all(f.status is Status.OK for f in findings)


@pytest.mark.parametrize(
    ("cap_effective", "cap_last_cap", "expected", "words"),
    [
        (FULL_CAPS, 40, Status.OK, "CAP_SYS_ADMIN covers it"),
        (FULL_CAPS, 39, Status.OK, "no CAP_CHECKPOINT_RESTORE"),
        (f"{(1 << 40) | int(FULL_CAPS_NO_PTRACE, 16) & ~(1 << 21):016x}", 40, Status.WARN, "not enough alone"),
        (DOCKER_DEFAULT_CAPS, 40, Status.OK, "see capability:SYS_ADMIN"),
    ],
)
def test_checkpoint_restore_is_optional_when_sys_admin_is_present(
    cap_effective: str, cap_last_cap: int, expected: Status, words: str
) -> None:
    finding = doctor.check_capabilities(status(cap_effective), cap_last_cap)[-1]
    assert finding.name == "capability:CHECKPOINT_RESTORE"
    assert finding.status is expected and words in finding.detail


@pytest.mark.parametrize(("mode", "expected"), [("0", Status.OK), ("2", Status.FAIL), ("1", Status.FAIL)])
def test_seccomp_mode(mode: str, expected: Status) -> None:
    assert doctor.check_seccomp(status(FULL_CAPS, seccomp=mode)).status is expected


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        (None, Status.OK),  # no AppArmor: reading attr/current fails (EINVAL), as on this machine
        ("unconfined\n", Status.OK),
        ("docker-default (enforce)\n", Status.FAIL),
        ("cri-containerd.apparmor.d (enforce)\n", Status.FAIL),
        ("my-app-profile (enforce)\n", Status.WARN),
        ("docker-default (complain)\n", Status.OK),
        ("system_u:system_r:container_t:s0:c123,c456\x00", Status.WARN),
    ],
)
def test_apparmor_profile(label: str | None, expected: Status) -> None:
    finding = doctor.check_apparmor(label)
    assert finding.status is expected
    if expected is Status.FAIL:
        assert finding.fix == doctor.APPARMOR_UNCONFINED


def test_the_newer_apparmor_attribute_is_read_first() -> None:
    fake = FakeHost(apparmor="system_u:system_r:container_t:s0")
    fake.files["/proc/self/attr/apparmor/current"] = "docker-default (enforce)\n"
    assert checks(fake)["apparmor"].status is Status.FAIL


# --- storage -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("root", "expected"),
    [(ROOT_OVERLAY, Status.OK), (ROOT_AUFS, Status.FAIL), (ROOT_BTRFS, Status.WARN)],
)
def test_root_storage_driver(root: str, expected: Status) -> None:
    finding = doctor.check_root_storage(doctor.parse_mountinfo(mountinfo(root, PROC)))
    assert finding.status is expected
    if expected is Status.FAIL:
        assert "branch paths" in finding.detail and "overlay2" in finding.fix.docker_run  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("line", "expected", "words"),
    [
        (NAMED_VOLUME, Status.WARN, "local Docker volume 'dr-doc'"),
        (ANONYMOUS_VOLUME, Status.FAIL, "anonymous Docker volume"),
        (TMPFS, Status.FAIL, "in memory"),
        (NFS, Status.OK, "shared filesystem (nfs4 from 10.0.0.5:/export/ckpt)"),
        (EMPTY_DIR, Status.FAIL, "emptyDir"),
        (PROC, Status.FAIL, "is not a mount point"),
    ],
)
def test_ckpt_dir_mount(line: str, expected: Status, words: str) -> None:
    finding = doctor.check_ckpt_mount("/checkpoints", True, doctor.parse_mountinfo(mountinfo(ROOT_OVERLAY, line)))
    assert finding.status is expected
    assert words in finding.detail
    if expected is not Status.OK:
        assert finding.fix == doctor.SHARED_VOLUME


def test_a_ckpt_dir_below_a_mount_is_on_that_mount() -> None:
    mounts = doctor.parse_mountinfo(mountinfo(ROOT_OVERLAY, NFS.replace(" /checkpoints ", " /data ")))
    finding = doctor.check_ckpt_mount("/data/ckpt", True, mounts)
    assert finding.status is Status.OK and "at /data" in finding.detail


def test_mountinfo_escapes_and_stacked_mounts() -> None:
    mounts = doctor.parse_mountinfo(mountinfo(
        ROOT_OVERLAY,
        "300 184 0:70 / /my\\040checkpoints rw - tmpfs tmpfs rw",
        "301 300 0:55 /export /my\\040checkpoints rw - nfs4 server:/export rw",
    ))
    mount = doctor.mount_of("/my checkpoints", mounts)
    assert mount is not None and mount.fs_type == "nfs4"  # the last mounted of two on one point


@pytest.mark.parametrize(
    ("error", "words", "fix"),
    [
        (OSError(errno.EROFS, "Read-only file system"), "mounted read-only", doctor.WRITABLE_VOLUME),
        (OSError(errno.EACCES, "Permission denied"), "root_squash", doctor.WRITABLE_VOLUME),
        (OSError(errno.ENOSPC, "No space left on device"), "full", doctor.MORE_SPACE),
    ],
)
def test_ckpt_dir_not_writable(error: OSError, words: str, fix: doctor.Fix) -> None:
    finding = doctor.check_ckpt_writable("/checkpoints", error)
    assert finding.status is Status.FAIL and words in finding.detail and finding.fix == fix


def test_ckpt_dir_writable_through_the_real_host(tmp_path: Path) -> None:
    assert Host().try_write(str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    error = Host().try_write(str(tmp_path / "absent"))
    assert error is not None and error.errno == errno.ENOENT


@pytest.mark.parametrize(
    ("meminfo", "limits", "need", "words"),
    [
        ("MemTotal: 1048576 kB\n", ["268435456\n"], 256 << 20, "the container's memory limit, 256.0 MiB"),
        ("MemTotal: 1048576 kB\n", ["9223372036854771712\n"], 1 << 30, "the machine's memory, 1.0 GiB"),
        ("MemTotal: 1048576 kB\n", ["max\n", None], 1 << 30, "no memory limit"),  # cgroup v2 without a limit
        ("MemTotal: 1048576 kB\n", [None, "536870912\n"], 512 << 20, "512.0 MiB"),
        (None, [None], None, "unknown"),
    ],
)
def test_memory_the_app_could_need(meminfo: str | None, limits: list[str | None], need: int | None, words: str) -> None:
    found, source = doctor.memory_need(meminfo, limits)
    assert found == need and words in source


def test_free_space_below_the_memory_warns() -> None:
    assert doctor.check_free_space("/c", 1 << 30, 2 << 30, "x", "none").status is Status.WARN
    assert doctor.check_free_space("/c", 3 << 30, 2 << 30, "x", "none").status is Status.OK
    assert "before CKPT_COMPRESS=zstd" in doctor.check_free_space("/c", 1, 2, "x", "zstd").detail


def test_free_space_check_uses_the_cgroup_limit() -> None:
    small = FakeHost(free=1 << 30, cgroup_v1_limit="268435456\n")
    assert checks(small)["ckpt-dir:space"].status is Status.OK
    assert checks(FakeHost(free=1 << 30))["ckpt-dir:space"].status is Status.WARN  # 24 GiB machine, no limit


# --- process -------------------------------------------------------------------------------------------
def test_init() -> None:
    assert doctor.check_init(1, None).status is Status.OK
    assert doctor.check_init(42, "/usr/bin/python3\x00/usr/local/bin/criu-supervisor\x00run\x00").status is Status.OK
    finding = doctor.check_init(42, "/sbin/docker-init\x00--\x00/bin/sh\x00-c\x00/app/start.sh\x00")
    assert finding.status is Status.WARN and finding.fix == doctor.KEEP_ENTRYPOINT


def test_a_terminal_on_the_containers_stdio_is_carried_and_said() -> None:
    finding = doctor.check_terminal(["/dev/pts/0", "/dev/pts/0", "/dev/pts/0"])  # docker run -t
    assert finding.status is Status.OK and "/dev/pts/0" in finding.detail
    assert "restore only in a container with a terminal too" in finding.detail
    assert doctor.check_terminal(["/dev/null", "pipe:[1]", "pipe:[2]"]).detail.startswith("no terminal")
    assert doctor.check_terminal([None, None, None]).status is Status.OK


# --- output --------------------------------------------------------------------------------------------
def test_a_warning_or_failure_without_a_fix_cannot_be_made() -> None:
    with pytest.raises(ValueError, match="must say how to fix it"):
        Finding("x", Status.WARN, "something")


def test_text_output_names_each_failure_with_its_fixes_and_a_verdict() -> None:
    text = doctor.render(list(checks(FakeHost(proc_status=STATUS_NO_PTRACE)).values()))
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("FAIL  capability:SYS_PTRACE: "))
    assert lines[index + 1:index + 4] == [
        "      docker run:  --cap-add SYS_PTRACE",
        "      compose:     cap_add: [SYS_PTRACE]",
        "      kubernetes:  securityContext: {capabilities: {add: [SYS_PTRACE]}}",
    ]
    assert lines[-1].startswith("doctor: 1 FAIL, ") and "a checkpoint cannot work here" in lines[-1]
    assert "OK    criu: CRIU 4.2.1" in lines


def test_identical_fixes_are_printed_once() -> None:
    text = doctor.render(doctor.check_features({**ALL_FEATURES}))
    assert "      docker run, compose: run on a host whose kernel has soft-dirty tracking" in text


def test_json_output() -> None:
    data = json.loads(doctor.render(list(checks(FakeHost(proc_status=STATUS_DEFAULT_SECCOMP)).values()), as_json=True))
    assert data["ok"] is False and data["counts"]["FAIL"] == 1
    [seccomp] = [f for f in data["findings"] if f["name"] == "seccomp"]
    assert seccomp["status"] == "FAIL"
    assert seccomp["fix"] == {"docker_run": "--security-opt seccomp=unconfined",
                              "compose": "security_opt: [seccomp=unconfined]",
                              "kubernetes": "securityContext: {seccompProfile: {type: Unconfined}}"}
    assert all(f["fix"] is None for f in data["findings"] if f["status"] == "OK")


def test_every_finding_is_explained_in_the_troubleshooting_guide() -> None:
    guide = (Path(__file__).parents[2] / "docs" / "troubleshooting.md").read_text()
    nothing_granted = FakeHost(
        proc_status=status(DOCKER_DEFAULT_CAPS, seccomp="2"), criu_check=(1, CRIU_WITHOUT_SYS_ADMIN),
        features={name: False for name in doctor.FEATURES}, feature_output=CRIU_WITHOUT_SYS_ADMIN,
    )
    scenarios = [FakeHost(), nothing_granted]
    names = {name for fake in scenarios for name in checks(fake)}
    missing = sorted(name for name in names if f"`{name}`" not in guide)
    assert not missing, f"docs/troubleshooting.md does not explain {missing}"


def test_the_real_host_runs_every_check_without_raising(tmp_path: Path) -> None:
    # Real /proc, mounts and volume; no CRIU (never run CRIU on the host: see ENVIRONMENT.md).
    findings = doctor.run_checks(load({"CKPT_DIR": str(tmp_path)}), Host(run=lambda argv: (127, "not found")))
    names = {finding.name for finding in findings}
    assert {"criu", "capability:SYS_ADMIN", "seccomp", "ckpt-dir:mount", "init", "terminal"} <= names
    assert doctor.render(findings) and json.loads(doctor.render(findings, as_json=True))


def test_a_missing_program_is_exit_status_127() -> None:
    assert Host().run(["/no/such/criu", "--version"])[0] == 127


# --- readable failures: explain() on the CRIU log lines provoked in real containers ----------------------
PROVOKED = {
    "docker's default seccomp profile": (
        ["(00.047077) Error (compel/src/lib/ptrace.c:27): suspending seccomp failed: Operation not permitted",
         "(00.047096) Error (compel/src/lib/infect.c:417): Unable to detach from 9: No such process"],
        "Error (compel/src/lib/ptrace.c:27): suspending seccomp failed: Operation not permitted",
        "--security-opt seccomp=unconfined"),
    "no SYS_PTRACE, the app running as another user": (
        ["(00.040548) Warn  (compel/src/lib/infect.c:132): Unable to interrupt task: 10 (Operation not permitted)",
         "(00.040576) Error (compel/src/lib/infect.c:262): Unseizable non-zombie 10 found, state S, err -1/10"],
        "Error (compel/src/lib/infect.c:262): Unseizable non-zombie 10 found, state S, err -1/10",
        "--cap-add SYS_PTRACE"),
    "the app running as another user (no SYS_RESOURCE)": (
        ["(00.049914) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted",
         "(00.049917) Error (criu/cr-dump.c:1584): Dump core (pid: 10) failed with -1"],
        "Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted",
        "--cap-add SYS_RESOURCE"),
    "an inotify watch without DAC_READ_SEARCH (CRIU logs a tab)": (
        ["(00.048741) Warn  (criu/fsnotify.c:281): fsnotify: \tHandle 0xfe00000:0x16650d cannot be opened",
         "(00.053703) Error (criu/fsnotify.c:284): fsnotify: \tCan't dump that handle",
         "(00.053718) Error (criu/cr-dump.c:1545): Dump files (pid: 10) failed with -1"],
        "Error (criu/fsnotify.c:284): fsnotify: Can't dump that handle",
        "--cap-add DAC_READ_SEARCH"),
    "a pty whose master a process outside the app holds": (
        ["(00.034596) Error (criu/tty.c:410): tty: Found slave peer index 0 without correspond master peer"],
        "Error (criu/tty.c:410): tty: Found slave peer index 0 without correspond master peer",
        "start the process that owns it from the app's command"),
    "a mapped io_uring ring (CKPT_IO_URING=allow)": (
        ["(00.030177) Error (criu/proc_parse.c:502): Unknown shit 600 (anon_inode:[io_uring])",
         "(00.030180) Error (criu/proc_parse.c:738): Can't open 10's mapfile link 7f5b2c928000: No such device or "
         "address"],
        "Error (criu/proc_parse.c:502): Unknown shit 600 (anon_inode:[io_uring])",
        "CKPT_IO_URING=deny"),
    "an unmapped io_uring fd (CKPT_IO_URING=allow)": (
        ["pie: 2: Error (criu/pie/parasite.c:588): send_fds failed (-22)",
         "(00.028891) Error (criu/parasite-syscall.c:280): Can't retrieve FDs from socket"],
        "Error (criu/pie/parasite.c:588): send_fds failed (-22)",
        "CKPT_IO_URING=deny"),
    "a perf event fd (a file CRIU does not know)": (
        ["(00.078644) Error (criu/files-ext.c:94): Can't dump file 3 of that type [600] "
         "(anon anon_inode:[perf_event])"],
        "Error (criu/files-ext.c:94): Can't dump file 3 of that type [600] (anon anon_inode:[perf_event])",
        "cannot checkpoint"),
    "a Unix socket connected to a process outside the app": (
        ["(00.124515) Error (criu/sk-unix.c:874): unix: External socket is used. Consider using --ext-unix-sk option."],
        "Error (criu/sk-unix.c:874): unix: External socket is used. Consider using --ext-unix-sk option.",
        "start that peer from the app's command"),
    "CKPT_TCP=established without iptables in the image": (
        ["(00.035837) Error (criu/util.c:657): exited, status=127",
         "(00.035847) Error (criu/netfilter.c:105): Iptables configuration failed",
         "(00.035849) Error (criu/sk-tcp.c:81): tcp: Failed to lock TCP connection d354f"],
        "Error (criu/netfilter.c:105): Iptables configuration failed",
        "install iptables"),
    "CKPT_TCP=established without NET_ADMIN (kernel probes fail first)": (
        ["(00.004355) Error (criu/libnetlink.c:54): -1 reported by netlink: Operation not permitted",
         "(00.004361) Error (criu/net.c:4151): net: Unable to create a veth pair: -1",
         "(00.012769) Error (criu/net.c:1253): net: Unexpected error: -1(Operation not permitted)",
         "(00.023868) Error (criu/util.c:657): exited, status=4",
         "(00.023885) Error (criu/netfilter.c:105): Iptables configuration failed"],
        "Error (criu/netfilter.c:105): Iptables configuration failed",
        "--cap-add NET_ADMIN"),
    "a restore of a socket without NET_ADMIN": (
        ["(00.003699) Error (criu/libnetlink.c:54): -1 reported by netlink: Operation not permitted",
         "(00.003704) Error (criu/net.c:4151): net: Unable to create a veth pair: -1",
         "(00.013066) Error (criu/net.c:1253): net: Unexpected error: -1(Operation not permitted)",
         "(00.014979) Error (criu/sockets.c:495): sockets: Unable to set socket SO_SNDBUFFORCE/SO_RCVBUFFORCE: "
         "Operation not permitted"],
        "Error (criu/sockets.c:495): sockets: Unable to set socket SO_SNDBUFFORCE/SO_RCVBUFFORCE: Operation not "
        "permitted",
        "--cap-add NET_ADMIN"),
    "a restore without SYS_TIME": (
        ["(00.026505)      1: Error (criu/timens.c:101): Unable to set a monotonic clock offset: Operation not "
         "permitted", "(00.026760) Error (criu/cr-restore.c:2331): Restoring FAILED."],
        "Error (criu/timens.c:101): Unable to set a monotonic clock offset: Operation not permitted",
        "--cap-add SYS_TIME"),
    "a restore without the volume the app had a file open on": (
        ["(00.029265)      2: Error (criu/files-reg.c:2353): Can't open file data/app.log on restore: No such file "
         "or directory", "(00.029267)      2: Error (criu/files-reg.c:2267): Can't open file data/app.log: No such "
         "file or directory"],
        "Error (criu/files-reg.c:2353): Can't open file data/app.log on restore: No such file or directory",
        "mount the same volumes"),
    "a restore after the app's open file was changed": (
        ["(00.038644)      2: Error (criu/files-reg.c:2175): File data/app.log has bad size 11 (expect 6)"],
        "Error (criu/files-reg.c:2175): File data/app.log has bad size 11 (expect 6)",
        "keep other writers off"),
    "CRIU 4.1.1 on kernel 6.18 with a TCP socket": (
        ["(00.078452) Error (criu/sockets.c:628): sockets: Can't get 1:16 opt: Operation not supported",
         "(00.078455) Error (criu/sockets.c:628): sockets: Can't get 1:34 opt: Operation not supported"],
        "Error (criu/sockets.c:628): sockets: Can't get 1:16 opt: Operation not supported",
        "CRIU >= 4.2"),
    "a PID already in use (bare CRIU restoring beside the original)": (
        ["(00.027435) Error (criu/cr-restore.c:1237): Can't fork for 7: File exists"],
        "Error (criu/cr-restore.c:1237): Can't fork for 7: File exists",
        "fresh container"),
}
NOISE = [
    "(00.002164) Error (criu/tun.c:85): tun: Unable to create tun: No such file or directory",
    "(00.037493) Warn  (criu/kerndat.c:1290): Can't keep kdat cache on non-tempfs",
    "(00.037566) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted",
]


@pytest.mark.parametrize(("lines", "quoted", "fix"), PROVOKED.values(), ids=list(PROVOKED))
def test_a_provoked_criu_failure_becomes_one_line_with_cause_and_fix(
    tmp_path: Path, lines: list[str], quoted: str, fix: str
) -> None:
    log = tmp_path / "dump.log"
    log.write_text("\n".join([*NOISE, *lines, "(00.1) Error (criu/cr-dump.c:1975): Dumping FAILED."]) + "\n")
    # Each case was provoked in a container lacking its fix; advice never names a setting already in effect.
    explained = criu.explain(str(log), RuntimeError("DUMP failed with -1"), granted=criu.NOTHING_GRANTED)
    assert "\n" not in explained and "\t" not in explained
    line, _, advice = explained.partition(" -> ")
    assert line == quoted
    assert fix in advice


def test_a_file_name_is_not_taken_for_a_cause(tmp_path: Path) -> None:
    # compel/src/lib/ptrace.c logs more than ptrace failures.
    log = tmp_path / "dump.log"
    log.write_text("(00.1) Error (compel/src/lib/ptrace.c:99): something new: Invalid argument\n")
    assert criu.explain(str(log)) == "Error (compel/src/lib/ptrace.c:99): something new: Invalid argument"

