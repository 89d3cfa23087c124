"""CPU compatibility (issue 13): what a checkpoint needs of the replacement's CPU, and the fleet baseline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor_pkg import compat, config, cpu
from supervisor_pkg.signals import SignalReceiver
from supervisor_pkg.supervisor import Supervisor

V2 = "fpu cx8 cmov mmx fxsr sse sse2 syscall lm cx16 lahf_lm popcnt pni sse4_1 sse4_2 ssse3 aes pclmulqdq"
V3 = V2 + " avx avx2 bmi1 bmi2 f16c fma abm movbe xsave xsaveopt"
V4 = V3 + " avx512f avx512bw avx512cd avx512dq avx512vl xsavec"


def cpuinfo(flags: str, vendor: str = "GenuineIntel", model: str = "Intel(R) Xeon(R) Test CPU") -> str:
    return (f"processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
            f"processor\t: 1\nvendor_id\t: {vendor}\nflags\t\t: {flags} extra_on_cpu_1\n")


@pytest.mark.parametrize(("flags", "level"), [("fpu sse", "none"), (V2, "x86-64-v2"), (V3, "x86-64-v3"),
                                             (V4, "x86-64-v4"), (V4.replace("avx512vl", ""), "x86-64-v3")])
def test_the_level_is_the_highest_whose_every_feature_is_there(flags: str, level: str) -> None:
    assert cpu.level_of(flags.split()) == level


def test_a_record_keeps_only_instruction_set_features_of_the_first_processor() -> None:
    record = cpu.record(cpuinfo(V3 + " erms fsrm hypervisor constant_tsc xsaves"))
    assert record["vendor"] == "GenuineIntel" and record["level"] == "x86-64-v3"
    assert "avx2" in record["flags"] and "xsaveopt" in record["flags"]
    for hint in ("erms", "fsrm", "hypervisor", "constant_tsc", "xsaves", "extra_on_cpu_1"):
        assert hint not in record["flags"], hint


def test_a_richer_destination_is_accepted_whatever_its_vendor() -> None:
    source = cpu.record(cpuinfo(V3))
    assert cpu.missing(source, cpu.record(cpuinfo(V4, vendor="AuthenticAMD", model="AMD EPYC"))) == []


def test_a_destination_without_an_instruction_the_app_may_use_is_refused() -> None:
    source = cpu.record(cpuinfo(V4))
    here = cpu.record(cpuinfo(V3, vendor="AuthenticAMD", model="AMD EPYC 7002"))
    assert cpu.missing(source, here) == ["avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl", "xsavec"]
    problem = compat.check_cpu(source, here)
    assert problem is not None
    assert "this CPU, AMD EPYC 7002 (AuthenticAMD, x86-64-v3), lacks avx512bw" in problem.cause
    assert "the app's CPU, Intel(R) Xeon(R) Test CPU (GenuineIntel, x86-64-v4)" in problem.cause
    assert "CKPT_CPU_BASELINE" in problem.fix


def test_a_destination_missing_only_speed_hints_is_accepted() -> None:
    # beta9#1792: ERMS hidden by firmware made CRIU's instruction check refuse a move that is safe.
    source = cpu.record(cpuinfo(V4 + " erms fsrm"))
    assert cpu.missing(source, cpu.record(cpuinfo(V4))) == []


def test_with_a_baseline_only_the_levels_features_are_needed() -> None:
    source = cpu.record(cpuinfo(V4 + " sha_ni vaes"), baseline="x86-64-v3")
    here = cpu.record(cpuinfo(V3))  # a Haswell-class replacement
    assert cpu.missing(source, here) == []
    assert cpu.required(source) == set(cpu.LEVEL_FLAGS["x86-64-v3"]) & set(source["flags"])


def test_a_baseline_never_asks_for_more_than_the_source_had() -> None:
    source = cpu.record(cpuinfo(V2), baseline="x86-64-v4")
    assert cpu.missing(source, cpu.record(cpuinfo(V2))) == []


def test_a_checkpoint_without_a_cpu_record_or_with_junk_needs_nothing() -> None:
    here = cpu.record(cpuinfo(V2))
    assert cpu.missing(None, here) == []
    assert cpu.missing({"flags": ["avx2", 5, None], "baseline": 7}, here) == ["avx2"]


@pytest.mark.parametrize(("baseline", "existing", "expected"), [
    ("native", None, None),
    ("x86-64-v4", None, None),
    ("x86-64-v3", None, "glibc.cpu.hwcaps=-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512ER,-AVX512PF,-AVX512VL,"
                        "-XSAVEC"),
    ("x86-64-v3", "glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.cpu.hwcaps=-AVX512F,"),
    ("x86-64-v2", "glibc.cpu.hwcaps=-ERMS", "glibc.cpu.hwcaps=-ERMS,-AVX512F,"),
])
def test_baseline_tunables_keep_what_is_set_and_hide_what_is_above_the_level(
    baseline: str, existing: str | None, expected: str | None
) -> None:
    tunables = cpu.baseline_tunables(baseline, existing)
    if expected is None:
        assert tunables is None
    else:
        assert tunables is not None and tunables.startswith(expected)
    if baseline == "x86-64-v2":
        assert tunables is not None and all(f"-{name}" in tunables for name in ("AVX", "AVX2", "FMA", "BMI2"))


def test_the_baseline_is_in_a_fresh_apps_environment_and_never_in_the_supervisors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    loaded = config.load({"CKPT_DIR": str(tmp_path), "CKPT_CPU_BASELINE": "x86-64-v3"})
    supervisor = Supervisor(loaded, ["app"], receiver=SignalReceiver())
    environment = supervisor._fresh_environment()
    assert environment["GLIBC_TUNABLES"].startswith("glibc.cpu.hwcaps=-AVX512F")
    assert "GLIBC_TUNABLES" not in os.environ
