"""The file trigger: a request file dropped on the volume asks for a checkpoint.

    CKPT_DIR/<CKPT_NAME>/checkpoint-request

An operator, a host agent or a node-termination handler creates it (from any
host that mounts the volume). Its content chooses the kind:
    "final"            checkpoint, then stop the app (as SIGTERM would)
    anything else      a leave-running checkpoint (the app keeps running)

We watch with watchdog's PollingObserver: inotify does not see files created
by other NFS clients. The request is consumed by renaming it away first, so
when several watchers see it, exactly one acts on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.polling import PollingObserver

from supervisor_pkg.triggers import Notice, Post

REQUEST_FILE = "checkpoint-request"
log = logging.getLogger("criu-supervisor")


class FileTrigger(FileSystemEventHandler):
    source = "file"

    def __init__(self, post: Post, lineage: str, interval: float = 1.0) -> None:
        self.post = post
        self.lineage = lineage
        self.path = os.path.join(lineage, REQUEST_FILE)
        self._observer = PollingObserver(timeout=interval)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._observer.schedule(self, self.lineage, recursive=False)
        self._observer.start()
        self._consume()  # a request left there before we started counts too

    def stop(self) -> None:
        self._observer.stop()

    def on_created(self, event: FileSystemEvent) -> None:
        if os.path.basename(str(event.src_path)) == REQUEST_FILE:
            self._consume()

    on_modified = on_created

    def on_moved(self, event: FileSystemEvent) -> None:
        if os.path.basename(str(event.dest_path)) == REQUEST_FILE:
            self._consume()

    def _consume(self) -> None:
        with self._lock:
            taken = f"{self.path}.taken-{secrets.token_hex(4)}"
            try:
                os.rename(self.path, taken)  # only one consumer's rename succeeds
            except FileNotFoundError:
                return
            except OSError as error:
                log.warning("file trigger: cannot take %s: %s", self.path, error.strerror)
                return
            try:
                with open(taken, errors="replace") as handle:
                    content = handle.read(64).strip().lower()
            except OSError:
                content = ""
            with contextlib.suppress(OSError):
                os.unlink(taken)
        final = content == "final"
        self.post(Notice(source="file", final=final,
                         detail=f"{REQUEST_FILE} asked for a {'final' if final else 'leave-running'} checkpoint"))
