"""Every error criu-supervisor raises on purpose, in one hierarchy.

    SupervisorError                 base; .message is one readable line
    ├── ConfigError                 a bad setting (exit 2)
    ├── CommandNotFound             CMD does not exist (exit 127)
    ├── CommandNotExecutable        CMD exists but cannot be run (exit 126)
    ├── EnvironmentProblem          CRIU/pycriu missing, volume unusable (exit 4)
    ├── RestoreRequired             CKPT_RESTORE=require and nothing restorable (exit 3)
    ├── CannotRestoreHere           the newest checkpoint is good, this container cannot restore it (exit 6)
    ├── LazyRestoreCorrupt          a lazily restored app's pages failed their check after it ran (exit 7)
    ├── StoppedDuringRestore        asked to stop while restoring: aborted, the checkpoint kept (exit 0)
    ├── LeaseHeld                   another live instance owns the lineage (exit 5)
    │   └── StoppedWhileWaiting     asked to stop while waiting for it (exit 0)
    ├── LeaseLost                   our lease was taken over: we are fenced
    ├── CriuError                   CRIU said no; carries errno and log path
    │   ├── DumpFailed
    │   └── RestoreFailed           .fault: "checkpoint" (its images) or "container" (this one's settings)
    │       ├── RestoreStalled      no progress for CKPT_RESTORE_STALL seconds: killed
    │       └── RestoreInterrupted  a stop was asked for while CRIU worked: killed
    └── StoreError                  the volume said no (EROFS, ENOSPC, EIO...)
        └── VerificationFailed      a generation is incomplete, corrupt or incompatible

Only `cli` turns these into exit codes (see EXIT_CODES there).
"""

from __future__ import annotations


class SupervisorError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(SupervisorError):
    pass


class CommandNotFound(SupervisorError):
    pass


class CommandNotExecutable(SupervisorError):
    pass


class EnvironmentProblem(SupervisorError):
    pass


class RestoreRequired(SupervisorError):
    pass


class CannotRestoreHere(SupervisorError):
    """Nothing is wrong with the checkpoint; this container (its settings, CPU, engine, CRIU) cannot restore it."""

    def __init__(self, message: str, generation: str | None = None) -> None:
        super().__init__(message)
        self.generation = generation


class LazyRestoreCorrupt(SupervisorError):
    pass


class StoppedDuringRestore(SupervisorError):
    pass


class LeaseHeld(SupervisorError):
    pass


class StoppedWhileWaiting(LeaseHeld):
    pass


class LeaseLost(SupervisorError):
    pass


class CriuError(SupervisorError):
    def __init__(self, message: str, errno: int | None = None, log_path: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.log_path = log_path


class DumpFailed(CriuError):
    pass


CHECKPOINT_AT_FAULT = "checkpoint"
CONTAINER_AT_FAULT = "container"


class RestoreFailed(CriuError):
    """`fault`: CHECKPOINT_AT_FAULT when the evidence says the images are unusable anywhere (the generation is
    then rejected), else CONTAINER_AT_FAULT: this container could not restore a verified checkpoint."""

    def __init__(
        self, message: str, errno: int | None = None, log_path: str | None = None, fault: str = CONTAINER_AT_FAULT
    ) -> None:
        super().__init__(message, errno, log_path)
        self.fault = fault


class RestoreStalled(RestoreFailed):
    pass


class RestoreInterrupted(RestoreFailed):
    pass


class StoreError(SupervisorError):
    pass


class VerificationFailed(StoreError):
    """A generation must not be restored (here).

    `generation` names the one at fault when it is not the one asked about (an
    incremental checkpoint's parent). `here_only`: nothing is wrong with it,
    but this supervisor cannot restore it (a newer manifest format, a newer
    CRIU, another CPU architecture); it is not marked rejected on the volume,
    so that a supervisor that can restore it still may.
    """

    def __init__(self, message: str, generation: str | None = None, here_only: bool = False) -> None:
        super().__init__(message)
        self.generation = generation
        self.here_only = here_only
