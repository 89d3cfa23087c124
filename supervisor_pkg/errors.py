"""Every error criu-supervisor raises on purpose, in one hierarchy.

    SupervisorError                 base; .message is one readable line
    ├── ConfigError                 a bad setting (exit 2)
    ├── CommandNotFound             CMD does not exist (exit 127)
    ├── CommandNotExecutable        CMD exists but cannot be run (exit 126)
    ├── EnvironmentProblem          CRIU/pycriu missing, volume unusable (exit 4)
    ├── RestoreRequired             CKPT_RESTORE=require and nothing restorable (exit 3)
    ├── LeaseHeld                   another live instance owns the lineage (exit 5)
    │   └── StoppedWhileWaiting     asked to stop while waiting for it (exit 0)
    ├── LeaseLost                   our lease was taken over: we are fenced
    ├── CriuError                   CRIU said no; carries errno and log path
    │   ├── DumpFailed
    │   └── RestoreFailed
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


class RestoreFailed(CriuError):
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
