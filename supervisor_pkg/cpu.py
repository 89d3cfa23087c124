"""The CPU a checkpoint needs, and the one this container has (x86-64).

A process picks its code paths once, at start: glibc chooses memcpy, strlen
and friends by CPUID (AVX2, AVX-512...), and so do JITs and crypto libraries.
Restored on a CPU without an instruction it chose, it dies with SIGILL the
first time it runs that path. So every checkpoint records the source CPU, and
a restore compares before CRIU runs:

- `record()`: vendor, model, the instruction-set features an app can use
  (ISA_FLAGS of /proc/cpuinfo's flags) and its x86-64 micro-architecture level.
- `missing(recorded, here)`: what the checkpoint's CPU had that this one lacks.
  Only instructions and register state count: a destination with *more*
  features is always fine, whatever the vendor (Intel to AMD and back);
  performance hints (ERMS, FSRM) and kernel-only instructions (XSAVES) never
  refuse a move.

Fleet portability (CKPT_CPU_BASELINE=x86-64-v2|v3|v4): a freshly started app
gets `glibc.cpu.hwcaps` tunables that hide from glibc the features above the
level (`baseline_tunables`), and compatibility is then judged against the
level, so its checkpoints restore on every instance type at or above it.
What a baseline cannot bound: code that reads CPUID itself (the JVM's JIT, V8,
OpenSSL, hand-written assembly). See docs/cpu.md for their own settings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# The x86-64 psABI micro-architecture levels, as /proc/cpuinfo names their features (each includes the
# ones before it). pni is SSE3; abm is LZCNT.
LEVEL_FLAGS: dict[str, frozenset[str]] = {}
_LEVELS = (
    ("x86-64", {"cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse", "sse2"}),
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
)
_accumulated: set[str] = set()
for _name, _flags in _LEVELS:
    _accumulated |= _flags
    LEVEL_FLAGS[_name] = frozenset(_accumulated)
BASELINES = ("native", "x86-64-v2", "x86-64-v3", "x86-64-v4")

# Features whose absence makes an instruction the app may already have chosen fault, or register state
# it holds unrestorable. Not here on purpose: erms, fsrm, rep_good (how fast rep movsb is, not whether it
# runs), xsaves (privileged: the kernel's), hypervisor and the like (facts about the machine).
ISA_FLAGS = frozenset(LEVEL_FLAGS["x86-64-v4"] | {
    "aes", "pclmulqdq", "sha_ni", "sha512", "sm3", "sm4", "vaes", "vpclmulqdq", "gfni", "rdrand", "rdseed", "adx",
    "clflushopt", "clwb", "fsgsbase", "rdpid", "movdiri", "movdir64b", "serialize", "xsaveopt", "xsavec", "pku",
    "ospke", "sse4a", "xop", "fma4", "tbm", "clzero", "prefetchwt1", "waitpkg", "avx512ifma", "avx512vbmi",
    "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_bf16", "avx512_fp16",
    "avx512_vp2intersect", "avx512er", "avx512pf", "avx_vnni", "avx_vnni_int8", "avx_ifma", "avx_ne_convert",
    "amx_tile", "amx_int8", "amx_bf16", "amx_fp16", "cmpccxadd", "avx10",
})

# glibc.cpu.hwcaps names (sysdeps/x86/cpu-tunables.c) to disable so that glibc stays within a level.
# XSAVEC goes too below v4: ld.so saves registers with it in lazy binding, and Haswell (v3) and Sandy
# Bridge (v2) lack it; plain XSAVE, which they have, saves the same state.
_ABOVE_V3 = ("AVX512F", "AVX512CD", "AVX512BW", "AVX512DQ", "AVX512ER", "AVX512PF", "AVX512VL", "XSAVEC")
_GLIBC_MASKS = {
    "x86-64-v4": (),
    "x86-64-v3": _ABOVE_V3,
    "x86-64-v2": (*_ABOVE_V3, "AVX", "AVX2", "FMA", "FMA4", "BMI1", "BMI2", "LZCNT", "MOVBE"),
}


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """The first processor's vendor, model and flags from /proc/cpuinfo's text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # one processor is enough: a container's CPUs are alike
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return {"vendor": fields.get("vendor_id", "?"), "model": fields.get("model name", "?"),
            "flags": set(fields.get("flags", "").split())}


def level_of(flags: Iterable[str]) -> str:
    """The highest x86-64 level whose every feature is in `flags` ("x86-64" at least, "none" if not even that)."""
    have, level = set(flags), "none"
    for name, _ in _LEVELS:
        if LEVEL_FLAGS[name] <= have:
            level = name
    return level


def record(cpuinfo_text: str | None = None, baseline: str = "native") -> dict[str, Any]:
    """What a manifest records of this CPU: vendor, model, ISA features, level, and the app's baseline."""
    if cpuinfo_text is None:
        with open("/proc/cpuinfo") as handle:
            cpuinfo_text = handle.read()
    parsed = parse_cpuinfo(cpuinfo_text)
    return {"vendor": parsed["vendor"], "model": parsed["model"], "flags": sorted(parsed["flags"] & ISA_FLAGS),
            "level": level_of(parsed["flags"]), "baseline": baseline}


def required(recorded: Mapping[str, Any]) -> set[str]:
    """The features a checkpoint needs: its CPU's, or only its baseline's share of them."""
    flags = {flag for flag in recorded.get("flags") or [] if isinstance(flag, str)} & ISA_FLAGS
    baseline = recorded.get("baseline")
    if baseline in LEVEL_FLAGS:
        # glibc was kept within the level; ld.so's register saving still uses XSAVE where it was there.
        return flags & (LEVEL_FLAGS[baseline] | {"xsave"})
    return flags


def missing(recorded: Any, here: Mapping[str, Any]) -> list[str]:
    """The features the checkpoint needs that this CPU lacks, sorted ([] for a checkpoint that records no CPU)."""
    if not isinstance(recorded, Mapping):
        return []
    return sorted(required(recorded) - set(here.get("flags") or []))


def describe(recorded: Mapping[str, Any]) -> str:
    model = re.sub(r"\s+", " ", str(recorded.get("model") or "?"))[:60]
    return f"{model} ({recorded.get('vendor') or '?'}, {recorded.get('level') or '?'})"


def baseline_tunables(baseline: str, existing: str | None) -> str | None:
    """GLIBC_TUNABLES for an app started with `baseline`, keeping tunables already set; None: leave it as it is."""
    masks = _GLIBC_MASKS.get(baseline, ())
    if not masks:
        return None
    ours = ",".join(f"-{name}" for name in masks)
    if not existing:
        return f"glibc.cpu.hwcaps={ours}"
    parts = existing.split(":")
    for index, part in enumerate(parts):
        if part.startswith("glibc.cpu.hwcaps="):
            parts[index] = f"{part},{ours}"
            return ":".join(parts)
    return f"{existing}:glibc.cpu.hwcaps={ours}"
