"""Where the supervisor's own programs are: the drop-in bundle, or the system's.

The bundle (/opt/criu-supervisor, images/bundle/) carries CRIU, a Python
runtime, tini and every library they load, to be copied into an image that is
not ours. Its executables are run through the bundle's own loader with its
library path, never through the image's: the image may be another
distribution, use musl, or hold no libraries at all. Nothing is put in the
environment for that (no LD_LIBRARY_PATH, PATH or PYTHONPATH), so the app's
environment stays the one its image defines.

Outside the bundle (a system installation, the test venv) programs are looked
up on PATH as before.
"""

from __future__ import annotations

import functools
import os
import sys

LOADER_NAME = "ld-linux-x86-64.so.2"
DEFAULT_ROOT = "/opt/criu-supervisor"  # where the README's COPY --from puts it


@functools.cache
def root() -> str | None:
    """The bundle's directory if this Python runs from one (its loader beside its programs), else None."""
    here = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    if os.path.isfile(os.path.join(here, "lib", LOADER_NAME)) and os.path.isfile(os.path.join(here, "lib", "programs",
                                                                                            "criu")):
        return here
    return None


def program(name: str, static: bool = False) -> list[str]:
    """argv prefix to run the supervisor's own `name` (criu, tini): the bundle's if bundled, else from PATH.

    Dynamically linked programs (lib/programs/NAME) run through the bundle's loader, started by its link
    libexec/NAME, so that the process is called NAME (ps, /proc/PID/comm). `static`: the program needs no
    loader (bin/tini).
    """
    bundle = root()
    if bundle is None:
        return [name]
    if static:
        path = os.path.join(bundle, "bin", name)
        return [path] if os.path.isfile(path) else [name]
    path = os.path.join(bundle, "lib", "programs", name)
    if not os.path.isfile(path):
        return [name]
    return [os.path.join(bundle, "libexec", name), "--library-path", os.path.join(bundle, "lib"),
            "--argv0", name, path]
