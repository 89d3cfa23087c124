"""Console-script entry point.

The supervisor is PID 1 of its container, and the kernel silently drops any
signal sent to a namespace's init for which no handler is installed
(pid_namespaces(7)). A `docker stop` that arrives while Python is still
importing click would be lost. So the very first thing we do, before importing
anything heavy, is install the signal receiver; `run` picks up whatever it
recorded in the meantime.
"""

from supervisor_pkg.signals import SignalReceiver


def main() -> None:
    SignalReceiver.install_early()
    from supervisor_pkg.cli import main as cli_main

    cli_main()
