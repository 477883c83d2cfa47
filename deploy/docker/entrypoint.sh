#!/bin/sh
# dynrt container entrypoint: `docker run IMAGE frontend|worker|router|controller [flags]`.
# Settings come from DYNRT_* variables. Two are read here, not by dynrt:
#   DYNRT_ETCD_PASSWORD_FILE  etcd password from a file (a password in the environment
#                             shows in `docker inspect`)
#   DYNRT_TLS_CA_FILE         a private CA (PEM) trusted in addition to the system's, e.g.
#                             for tls:// NATS URLs (Python's default SSL context reads
#                             SSL_CERT_FILE; certifi users such as HF downloads are unaffected)
set -eu
if [ -n "${DYNRT_ETCD_PASSWORD_FILE:-}" ]; then
  DYNRT_ETCD_PASSWORD="$(cat "$DYNRT_ETCD_PASSWORD_FILE")"
  export DYNRT_ETCD_PASSWORD
fi
if [ -n "${DYNRT_TLS_CA_FILE:-}" ]; then
  bundle="${TMPDIR:-/tmp}/dynrt-ca-bundle.crt"
  { cat /etc/ssl/certs/ca-certificates.crt 2>/dev/null || true; cat "$DYNRT_TLS_CA_FILE"; } > "$bundle"
  SSL_CERT_FILE="$bundle"
  export SSL_CERT_FILE
fi
exec dynrt "$@"
