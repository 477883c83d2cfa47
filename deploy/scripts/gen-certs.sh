#!/usr/bin/env bash
# Make a private CA and the TLS certificates the HA compose file mounts as secrets:
#   ca.crt                   trust root for every component
#   etcd-server.{crt,key}    etcd members, client and peer traffic (SANs etcd1..3)
#   nats-server.{crt,key}    NATS servers, client and route traffic (SANs nats1..3)
#   client.{crt,key}         dynrt components (etcd --client-cert-auth; NATS verify)
# Usage: deploy/scripts/gen-certs.sh [OUT_DIR]   (default deploy/compose/secrets)
# Needs only openssl. Keys are EC P-256; certificates last DAYS (default 365) days.
# Re-running replaces every file. Keep the CA key offline in a real deployment.
set -euo pipefail

OUT="${1:-$(cd "$(dirname "$0")/.." && pwd)/compose/secrets}"
DAYS="${DAYS:-365}"
# Extra SANs for the servers, e.g. EXTRA_SANS="DNS:etcd.example.com,IP:10.0.0.5"
EXTRA_SANS="${EXTRA_SANS:-}"
mkdir -p "$OUT"
cd "$OUT"
umask 077

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

newkey ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$DAYS" -subj "/CN=dynrt-ca" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt

# sign NAME CN SANS USAGE
sign() {
  local name="$1" cn="$2" sans="$3" usage="$4"
  newkey "$name.key"
  openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    if [ -n "$sans" ]; then echo "subjectAltName=$sans"; fi
  } > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 \
    -days "$DAYS" -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

local_sans="DNS:localhost,IP:127.0.0.1"
extra="${EXTRA_SANS:+,$EXTRA_SANS}"
sign etcd-server etcd "DNS:etcd1,DNS:etcd2,DNS:etcd3,$local_sans$extra" "serverAuth,clientAuth"
sign nats-server nats "DNS:nats1,DNS:nats2,DNS:nats3,DNS:nats,$local_sans$extra" "serverAuth,clientAuth"
sign client dynrt "" "clientAuth"
rm -f ca.srl
# Containers run as non-root users other than the one running this script: the keys
# must be readable by them (compose file secrets are bind mounts). Tighten this where
# the orchestrator sets ownership itself (Kubernetes Secrets with fsGroup).
chmod 0644 ./*.crt etcd-server.key nats-server.key client.key  # ca.key stays 0600
echo "certificates in $OUT"
