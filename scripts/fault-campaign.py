#!/usr/bin/env python3
"""A fault campaign: SIGKILL containers at random moments of checkpoints, restores and lazy fills.

Run on demand, not in CI (about 8 s per trial here):

    python3 scripts/fault-campaign.py --trials 45 [--seed N] [--ballast-mib 256] [--markdown FILE]

Needs the Docker engine and the images (scripts/bootstrap.sh). One chain of
kv containers shares a named volume, as replacements on a shared volume do.
Every trial starts from a live app whose state (a counter, and a session key)
is known, does one thing, and kills a container at a random moment of it:

    checkpoint  the live app gets one more increment, then SIGTERM (its final
                checkpoint), then SIGKILL after a random delay: the dump, the
                hashing, the publication or after it.
    restore     the live app is stopped cleanly (a checkpoint), a replacement
                starts, and is SIGKILLed at a random moment of its start:
                waiting for the lease, verifying, inside CRIU, just resumed.
    lazy        the same with CKPT_LAZY=on: killed while pages still arrive.

Then a correctly configured replacement starts, and the campaign reads the
app's state from outside and sorts the trial into one outcome:

    newest      it restored the newest published generation's state exactly
    older       it restored an older generation's state
    fresh       it started fresh although a valid checkpoint was published
    wrong       its state matches no generation (partial or corrupt)
    hung        it did not answer within the time limit
    two         the killed container's app was still running next to it

The target: every trial "newest".
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import random
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from dockerlib import BASE_IMAGE, KV_IMAGE, Container, Docker, docker  # noqa: E402

FAST_LEASE = {"CKPT_LEASE_INTERVAL": "0.5", "CKPT_LEASE_TIMEOUT": "3", "CKPT_HANDOFF_TIMEOUT": "120"}
OUTCOMES = ("newest", "older", "fresh", "wrong", "hung", "two")
KINDS = ("checkpoint", "restore", "lazy")


@dataclasses.dataclass
class Trial:
    number: int
    kind: str
    delay: float
    outcome: str = ""
    detail: str = ""


class Chain:
    """The live app, the volume, and the state each published generation holds."""

    def __init__(self, engine: Docker, ballast_mib: int) -> None:
        self.engine = engine
        self.env = {**FAST_LEASE, "KV_BALLAST_MIB": str(ballast_mib)}
        self.volume = engine.volume()
        self.states: dict[int, int] = {}  # generation number -> counter value it holds
        self.counter = 0
        self.live = self.start()

    def start(self, extra_env: dict[str, str] | None = None) -> Container:
        return self.engine.run(KV_IMAGE, volume=self.volume, env={**self.env, **(extra_env or {})})

    def published(self) -> list[int]:
        """Generations that are complete on the volume (published, not rejected), newest first."""
        rows = json.loads(docker("run", "--rm", "--network", "none", "-v", f"{self.volume}:/checkpoints",
                                 "--entrypoint", "criu-supervisor", BASE_IMAGE, "list", "--json").stdout)
        return [row["generation"] for row in rows if row.get("state") != "rejected" and row.get("state") != "corrupt"]

    def increment(self) -> None:
        self.counter = int(self.live.http("POST", "/incr/counter"))

    def clean_stop(self) -> None:
        """SIGTERM the live app; its final checkpoint holds the current counter."""
        before = set(self.published())
        assert self.live.stop() == 0, self.live.logs()
        [new] = set(self.published()) - before
        self.states[new] = self.counter


def judge(chain: Chain, killed: Container, limit: float = 90.0) -> tuple[str, str, Container | None]:
    """Start a correct replacement; sort what it restored into an outcome."""
    published = chain.published()
    replacement = chain.start()
    deadline = time.monotonic() + limit
    while replacement.exec("python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health',"
                           " timeout=2)", check=False).returncode != 0:
        if time.monotonic() > deadline:
            return "hung", f"no answer in {limit:.0f} s; last log: {replacement.logs()[-300:]}", None
        time.sleep(0.2)
    if killed.running():
        return "two", "the killed container still runs", replacement
    session = replacement.exec("python3", "-c", "import urllib.request as u, sys; sys.stdout.write(u.urlopen("
                               "'http://127.0.0.1:8080/kv/session', timeout=2).read().decode())", check=False).stdout
    value = replacement.exec("python3", "-c", "import urllib.request as u, sys; sys.stdout.write(u.urlopen("
                             "'http://127.0.0.1:8080/kv/counter', timeout=2).read().decode())", check=False).stdout
    newest = published[0] if published else None
    if session != "alice" and not value:
        return ("fresh" if newest else "newest"), f"fresh start; newest published: {newest}", replacement
    try:
        counter = int(value or "0")  # a state from before the first increment holds no counter key
    except ValueError:
        return "wrong", f"counter {value!r}, session {session!r}", replacement
    if newest is not None and counter == chain.states.get(newest) and session == "alice":
        return "newest", f"gen {newest}, counter {counter}", replacement
    if session == "alice" and counter in [chain.states.get(g) for g in published[1:]]:
        return "older", f"counter {counter}; newest gen {newest} holds {chain.states.get(newest)}", replacement
    return "wrong", f"counter {counter}, session {session!r}; newest gen {newest} holds {chain.states.get(newest)}", \
        replacement


def run_trial(chain: Chain, trial: Trial) -> None:
    if trial.kind == "checkpoint":
        chain.increment()
        pending = chain.counter
        before = set(chain.published())
        killed = chain.live
        docker("kill", "-s", "TERM", killed.name)
        time.sleep(trial.delay)
        docker("kill", "-s", "KILL", killed.name, check=False)
        new = set(chain.published()) - before
        for number in new:
            chain.states[number] = pending
    else:
        chain.clean_stop()
        killed = chain.start({"CKPT_LAZY": "on"} if trial.kind == "lazy" else None)
        time.sleep(trial.delay)
        docker("kill", "-s", "KILL", killed.name, check=False)
    trial.outcome, trial.detail, replacement = judge(chain, killed)
    docker("rm", "-f", killed.name, check=False)
    if replacement is None:
        raise SystemExit(f"trial {trial.number} hung: {trial.detail}")
    chain.live = replacement
    if trial.detail.startswith("fresh start"):
        # Also when nothing had been published yet (outcome "newest"): the next trials need a known state.
        chain.live.http("PUT", "/kv/session", "alice")
    value = chain.live.exec("python3", "-c", "import urllib.request as u, sys; sys.stdout.write(u.urlopen("
                            "'http://127.0.0.1:8080/kv/counter', timeout=2).read().decode())", check=False).stdout
    chain.counter = int(value) if value.isdigit() else 0


def table(trials: list[Trial]) -> str:
    counts = collections.Counter((trial.kind, trial.outcome) for trial in trials)
    lines = ["| killed during | trials | " + " | ".join(OUTCOMES) + " |", "|---|---|" + "---|" * len(OUTCOMES)]
    for kind in KINDS:
        total = sum(counts[(kind, outcome)] for outcome in OUTCOMES)
        lines.append(f"| {kind} | {total} | " + " | ".join(str(counts[(kind, o)]) for o in OUTCOMES) + " |")
    lines.append(f"| all | {len(trials)} | " + " | ".join(str(sum(counts[(k, o)] for k in KINDS))
                                                       for o in OUTCOMES) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=45)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ballast-mib", type=int, default=256, help="app memory, so that each phase lasts a while")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table and trials here")
    options = parser.parse_args()
    seed = options.seed if options.seed is not None else uuid.uuid4().int % 10**6
    rng = random.Random(seed)
    engine = Docker()
    trials: list[Trial] = []
    started = time.monotonic()
    try:
        chain = Chain(engine, options.ballast_mib)
        chain.live.wait_healthy(timeout=120)
        chain.live.http("PUT", "/kv/session", "alice")
        for number in range(1, options.trials + 1):
            kind = KINDS[(number - 1) % len(KINDS)]
            # Windows measured here at 256 MiB: a final checkpoint ~0.5-1.5 s, a start with restore ~1-2 s.
            delay = round(rng.uniform(0.0, 1.2 if kind == "checkpoint" else 2.5), 2)
            trial = Trial(number, kind, delay)
            run_trial(chain, trial)
            trials.append(trial)
            print(f"trial {number:3d} {kind:10s} kill after {delay:4.2f} s: {trial.outcome:6s} {trial.detail}",
                  flush=True)
    finally:
        engine.cleanup()
    report = (f"Fault campaign, seed {seed}, {len(trials)} trials, {options.ballast_mib} MiB app, "
              f"{time.monotonic() - started:.0f} s\n\n{table(trials)}\n")
    print("\n" + report)
    if options.markdown:
        details = "\n".join(f"| {t.number} | {t.kind} | {t.delay:.2f} | {t.outcome} | {t.detail} |" for t in trials)
        options.markdown.write_text(report + "\n| # | killed during | after (s) | outcome | detail |\n"
                                    "|---|---|---|---|---|\n" + details + "\n")
    return 0 if all(trial.outcome == "newest" for trial in trials) else 1


if __name__ == "__main__":
    raise SystemExit(main())
