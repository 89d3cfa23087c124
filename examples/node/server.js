// An HTTP server whose whole state is in memory.
//
//   POST /count   -> add 1 to the counter, return the new value
//   GET  /count   -> the counter
//   GET  /stats   -> {"pid", "started", "requests", "count"} as JSON
//   GET  /health  -> ok
//
// After a migration the counter, the request count, the start time and the
// PID (inside the app's namespace) are all still the same. On SIGTERM (sent
// by the supervisor when a checkpoint fails) it stops gracefully and says so.
"use strict";

const http = require("http");

const port = Number(process.env.PORT || 8080);
const state = { pid: process.pid, started: Date.now() / 1000, requests: 0, count: 0 };

const server = http.createServer((request, response) => {
  state.requests += 1;
  const reply = (code, body, type = "text/plain") => {
    response.writeHead(code, { "Content-Type": type, "Content-Length": Buffer.byteLength(body) });
    response.end(body);
  };
  if (request.url === "/count" && request.method === "POST") {
    state.count += 1;
    reply(200, String(state.count));
  } else if (request.url === "/count" && request.method === "GET") {
    reply(200, String(state.count));
  } else if (request.url === "/stats") {
    reply(200, JSON.stringify(state), "application/json");
  } else if (request.url === "/health") {
    reply(200, "ok");
  } else {
    reply(404, "not found");
  }
});

server.listen(port, "127.0.0.1", () => {
  console.log(`node ${process.version} listening on 127.0.0.1:${port}, pid ${process.pid}`);
});

process.on("SIGTERM", () => {
  console.log(`graceful stop at count ${state.count}`);
  server.close(() => process.exit(0));
  // Keep-alive connections would hold close() open; don't wait for them forever.
  setTimeout(() => process.exit(0), 2000).unref();
});
