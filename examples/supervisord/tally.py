"""A small HTTP service holding its state in memory, on 127.0.0.1:TALLY_PORT (8080).

    POST /incr/KEY   -> add 1 to KEY's count, return the new count
    GET  /stats      -> {"pid", "started", "requests", "counts"} as JSON
    GET  /health     -> ok

Bound to loopback: it is reached from inside the container (docker exec).
"""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

counts: dict[str, int] = {}
lock = threading.Lock()
stats = {"pid": os.getpid(), "started": time.time(), "requests": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *_args):
        pass

    def _reply(self, code, body, content_type="text/plain"):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        with lock:
            stats["requests"] += 1
            if self.path == "/health":
                return self._reply(200, "ok")
            if self.path == "/stats":
                return self._reply(200, json.dumps({**stats, "counts": counts}), "application/json")
        self._reply(404, "no such path")

    def do_POST(self):
        with lock:
            stats["requests"] += 1
            if not self.path.startswith("/incr/"):
                return self._reply(404, "no such path")
            key = self.path[len("/incr/"):]
            counts[key] = counts.get(key, 0) + 1
            value = counts[key]
        self._reply(200, str(value))


port = int(os.environ.get("TALLY_PORT", "8080"))
server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = True
print(f"tally listening on 127.0.0.1:{port}, pid {os.getpid()}", flush=True)
server.serve_forever()
