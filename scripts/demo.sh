#!/usr/bin/env bash
# The main job, end to end on a fresh machine: an in-memory key-value service
# survives its container being stopped the way a spot termination stops it,
# and the replacement container on the same volume carries on where it was.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/bootstrap.sh

IMAGE=criu-supervisor-example-kv:latest
VOLUME=criu-supervisor-demo
CRIU_SETTINGS=(--cap-add SYS_ADMIN --cap-add SYS_PTRACE --cap-add SYS_TIME --cap-add NET_ADMIN
               --security-opt seccomp=unconfined --security-opt apparmor=unconfined)
HTTP='import sys, urllib.request as u
r = u.Request("http://127.0.0.1:8080" + sys.argv[2], method=sys.argv[1],
              data=None if sys.argv[1] == "GET" else (sys.argv[3] if len(sys.argv) > 3 else "").encode())
print(u.urlopen(r, timeout=5).read().decode())'

say()  { printf '\n\033[1m== %s\033[0m\n' "$*"; }
http() { docker exec "$1" python3 -c "$HTTP" "${@:2}"; }
wait_healthy() {
    for _ in $(seq 100); do http "$1" GET /health >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "demo: $1 did not answer" >&2; docker logs "$1" >&2; return 1
}
cleanup() { docker rm -f demo-a demo-b >/dev/null 2>&1 || true; docker volume rm -f "$VOLUME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup

say "Container A starts the app on a fresh volume"
docker volume create "$VOLUME" >/dev/null
docker run -d --name demo-a --network none "${CRIU_SETTINGS[@]}" -v "$VOLUME:/checkpoints" "$IMAGE" >/dev/null
wait_healthy demo-a
http demo-a PUT /kv/session "user=alice; cart=3 items" >/dev/null
for _ in 1 2 3 4 5; do counter=$(http demo-a POST /incr/counter); done
echo "A: counter=$counter, session=$(http demo-a GET /kv/session)"
echo "A: stats $(http demo-a GET /stats)"

say "The machine is being reclaimed: SIGTERM to A (docker stop, as a spot termination)"
docker stop -t 60 demo-a >/dev/null
echo "A exited with code $(docker inspect -f '{{.State.ExitCode}}' demo-a). Its log:"
docker logs demo-a 2>&1 | sed 's/^/  A| /'

say "Container B starts elsewhere with the same volume"
docker run -d --name demo-b --network none "${CRIU_SETTINGS[@]}" -v "$VOLUME:/checkpoints" "$IMAGE" >/dev/null
wait_healthy demo-b
docker logs demo-b 2>&1 | sed 's/^/  B| /'
after=$(http demo-b POST /incr/counter)
echo "B: counter=$after (was $counter in A), session=$(http demo-b GET /kv/session)"
echo "B: stats $(http demo-b GET /stats)"

if [ "$after" = "$((counter + 1))" ]; then
    say "State carried over: the counter went on from $counter to $after instead of starting again at 1"
else
    say "FAILED: the counter is $after after migration, expected $((counter + 1))"; exit 1
fi
