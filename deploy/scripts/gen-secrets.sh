#!/usr/bin/env bash
# Make every secret deploy/compose needs, in deploy/compose/secrets/ (git-ignored):
#   api-key, grafana-admin-password                       (docker-compose.yml)
#   etcd-root-password, etcd-dynrt-password, TLS certs,
#   NATS operator/account JWTs and dynrt.creds            (docker-compose.ha.yml)
# Existing password files are kept (rotate by deleting them); certificates and NATS
# keys are made only if missing (FORCE=1 makes new ones).
# Needs openssl, and python3 with the nkeys package for the NATS credentials
# (pip install nkeys); without nkeys only the HA file's NATS part is left out.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-$HERE/../compose/secrets}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"

password() {  # file: 32 random URL-safe characters, readable by the containers' users
  if [ ! -s "$OUT/$1" ]; then
    openssl rand -base64 48 | tr -d '/+=\n' | cut -c1-32 > "$OUT/$1"
    chmod 0644 "$OUT/$1"
    echo "made $1"
  fi
}
password api-key
password grafana-admin-password
password etcd-root-password
password etcd-dynrt-password

if [ "${FORCE:-0}" = 1 ] || [ ! -s "$OUT/ca.crt" ]; then
  "$HERE/gen-certs.sh" "$OUT"
fi
if [ "${FORCE:-0}" = 1 ] || [ ! -s "$OUT/dynrt.creds" ]; then
  if "$PYTHON" -c "import nkeys" 2>/dev/null; then
    "$PYTHON" "$HERE/gen-nats-creds.py" "$OUT"
  else
    echo "skipped NATS credentials: $PYTHON has no nkeys (pip install nkeys), needed by docker-compose.ha.yml" >&2
  fi
fi
echo "secrets in $OUT"
