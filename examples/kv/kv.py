"""A small HTTP key-value store that keeps everything in memory.

    GET  /kv/KEY          -> the value (404 if unset)
    PUT  /kv/KEY  body    -> set it
    POST /incr/KEY        -> add 1 to an integer counter, return the new value
    GET  /stats           -> {"pid", "started", "requests", "keys"} as JSON
    GET  /health          -> ok

Its whole state lives in this process's memory: after a migration the keys,
counters, request count and start time must all still be there.
"""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

store: dict[str, str] = {}
lock = threading.Lock()
stats = {"pid": os.getpid(), "started": time.time(), "requests": 0}
# Optional ballast, for benchmarks: KV_BALLAST_MIB of memory, of KV_BALLAST_KIND:
#   random   incompressible bytes (the default)
#   zeros    mostly zero pages with some random ones (1 in 8), like a sparse cache
#   typical  a real Python heap: a million small dicts with strings and numbers


def make_ballast(mib: int, kind: str) -> object:
    if kind == "zeros":
        block = bytearray(8 << 20)
        block[: 1 << 20] = os.urandom(1 << 20)
        return [bytearray(block) for _ in range(mib // 8)]
    if kind == "typical":
        records = []  # about 580 bytes of heap per record, measured
        for number in range(mib * 1800):
            records.append({"id": number, "name": f"user-{number}", "email": f"user{number}@example.com",
                            "tags": ["alpha", "beta", str(number % 97)], "score": number * 0.5})
        return records
    return os.urandom(mib << 20)


ballast = make_ballast(int(os.environ.get("KV_BALLAST_MIB", "0")), os.environ.get("KV_BALLAST_KIND", "random"))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *_args):
        pass

    def _reply(self, code, body, content_type="text/plain"):
        data = body.encode() if isinstance(body, str) else body
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
                return self._reply(200, json.dumps({**stats, "keys": len(store)}), "application/json")
            if self.path.startswith("/kv/"):
                key = self.path[4:]
                if key in store:
                    return self._reply(200, store[key])
                return self._reply(404, "not found")
        self._reply(404, "no such path")

    def do_PUT(self):
        length = int(self.headers.get("Content-Length", "0"))
        value = self.rfile.read(length).decode()
        with lock:
            stats["requests"] += 1
            if not self.path.startswith("/kv/"):
                return self._reply(404, "no such path")
            store[self.path[4:]] = value
        self._reply(200, "stored")

    def do_POST(self):
        with lock:
            stats["requests"] += 1
            if not self.path.startswith("/incr/"):
                return self._reply(404, "no such path")
            key = self.path[6:]
            store[key] = str(int(store.get(key, "0")) + 1)
            value = store[key]
        self._reply(200, value)


port = int(os.environ.get("KV_PORT", "8080"))
server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
server.daemon_threads = True
print(f"kv listening on port {port}, pid {os.getpid()}", flush=True)
server.serve_forever()
