"""Console-script entry point.

The supervisor is PID 1 of its container, and the kernel silently drops any
signal sent to a namespace's init for which no handler is installed
(pid_namespaces(7)). A `docker stop` that arrives while Python is still
importing click would be lost. So the very first thing we do, before importing
anything heavy, is install the signal receiver; `run` picks up whatever it
recorded in the meantime.

The imports then run with the garbage collector off: they create ~100k
objects that live as long as the process, and collecting them while a
restore waits was 15-25 ms of its start (docs/performance.md). They are
frozen afterwards (gc.freeze), so that later collections skip them too.
"""

import gc
import sys

from supervisor_pkg.signals import SignalReceiver


def main() -> None:
    SignalReceiver.install_early()
    gc.disable()
    from supervisor_pkg.cli import main as cli_main

    if sys.argv[1:2] == ["run"]:
        import supervisor_pkg.supervisor  # noqa: F401  (what `run` imports, while the collector is off)
    gc.freeze()
    gc.enable()
    cli_main()
