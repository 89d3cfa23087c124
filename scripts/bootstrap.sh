#!/usr/bin/env bash
# Prepare a fresh Debian machine (no container registry) to build and run
# criu-supervisor: Docker engine, locally made debian:trixie-slim and bookworm-slim, our images.
# Idempotent: every step checks first, so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'bootstrap: %s\n' "$*" >&2; }

MIRROR="${DEBIAN_MIRROR:-}"
if [ -z "$MIRROR" ]; then
    # Reuse the mirror this machine's apt already trusts (deb822 or one-line sources).
    MIRROR=$(grep -hoE '^(URIs:|deb) +[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
             /etc/apt/sources.list.d/*.list 2>/dev/null | grep -v security | grep -i debian \
             | awk '{print $2}' | head -n1 || true)
    MIRROR="${MIRROR:-http://deb.debian.org/debian}"
fi

apt_updated=0
need_pkg() {  # need_pkg COMMAND PACKAGE...
    command -v "$1" >/dev/null 2>&1 && return 0
    shift
    if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

need_pkg dockerd docker.io
need_pkg debootstrap debootstrap
need_pkg docker-compose docker-compose
# The cross-engine tests (tests/integration/test_engines.py) restore under Podman too; containerd and ctr,
# their other engine, come with docker.io.
need_pkg podman podman
# The Kubernetes drain replay (tests/integration/test_kubernetes_cri.py) starts pod sandboxes from a pause image
# made of catatonit (static), and gives pods their network with the standard CNI plugins.
need_pkg catatonit catatonit
need_pkg /usr/lib/cni/bridge containernetworking-plugins

if ! docker info >/dev/null 2>&1; then
    log "starting dockerd (log: /var/log/dockerd.log)"
    nohup dockerd >/var/log/dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { log "dockerd did not start; see /var/log/dockerd.log"; exit 1; }
fi

# debian:trixie-slim: pulled where a registry answers, else made here as Docker's official image is
# (scripts/debian-slim.sh). A local one made otherwise (an earlier bootstrap: no slim configuration,
# 120 MB of apt caches in every layer built on it) is made again.
slim_image_ok() {  # slim_image_ok TAG: pulled from a registry, or made by scripts/debian-slim.sh
    [ -n "$(docker image inspect -f '{{join .RepoDigests ""}}{{index .Config.Labels "org.criu-supervisor.slim"}}' \
            "$1" 2>/dev/null)" ]
}
# debian:bookworm-slim: an older Debian (glibc 2.36) for examples/drop-in-bookworm, an image not built on ours.
for suite in trixie bookworm; do
    if ! slim_image_ok "debian:$suite-slim" && ! docker pull -q "debian:$suite-slim" >/dev/null 2>&1; then
        log "no registry: making debian:$suite-slim with debootstrap from $MIRROR"
        scripts/debian-slim.sh "$suite" "debian:$suite-slim" "$MIRROR"
    fi
done

log "building images (log: /tmp/criu-supervisor-build.log)"
build() {  # build TAG CONTEXT [DOCKERFILE]
    local tag=$1 context=$2 dockerfile=${3:-$2/Dockerfile}
    if ! docker build -t "$tag" -f "$dockerfile" "$context" >>/tmp/criu-supervisor-build.log 2>&1; then
        tail -n 30 /tmp/criu-supervisor-build.log >&2
        log "building $tag failed; full log: /tmp/criu-supervisor-build.log"
        exit 1
    fi
}
: >/tmp/criu-supervisor-build.log
build criu-supervisor:latest . images/base/Dockerfile
for dir in examples/*/; do
    [ -f "$dir/Dockerfile" ] || continue
    build "criu-supervisor-example-$(basename "$dir"):latest" "$dir"
done
log "ready"
