#!/usr/bin/env bash
# Start a throwaway PyKMIP server on 127.0.0.1 with mutual TLS, for nbdcrypt's KMIP tests.
#
# Usage: scripts/kms/start-pykmip.sh DIR PORT
#
# DIR receives everything: certs/ (throwaway ECDSA P-256 CA, server and client certificates),
# server.conf, policies/, the SQLite object store pykmip.db, server.log, stdout.log and
# pykmip.pid (the server runs in its own session, so the PID is also its process group).
#
# The certificates come from make-certs.sh beside this script. PyKMIP 0.10 speaks TLS 1.2
# only.
#
# Environment:
#   KMIP_DB=PATH     object store (default DIR/pykmip.db); two servers given the same store
#                    and the same certs/ hold the same keys, standing in for a cluster
#   KMIP_CERTS=DIR   reuse the certificates in DIR instead of making new ones
#   PYKMIP_PYTHON    interpreter with the kmip package (default /usr/bin/python3, which imports
#                    Debian's python3-pykmip)
#
# Stop with scripts/kms/stop-pykmip.sh DIR.
set -euo pipefail

DIR=${1:?usage: $0 DIR PORT}
PORT=${2:?usage: $0 DIR PORT}
PY=${PYKMIP_PYTHON:-/usr/bin/python3}

if ! "$PY" -c 'import kmip' 2>/dev/null; then
  echo "error: $PY cannot import kmip; install it with: apt-get install -y python3-pykmip" >&2
  exit 1
fi

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CERTS="$DIR/certs"
mkdir -p "$DIR/policies"

if [[ -f "$DIR/pykmip.pid" ]] && kill -0 "$(cat "$DIR/pykmip.pid")" 2>/dev/null; then
  echo "error: a PyKMIP server already runs for $DIR (pid $(cat "$DIR/pykmip.pid"))" >&2
  exit 1
fi

if [[ -n ${KMIP_CERTS:-} ]]; then
  mkdir -p "$CERTS"
  cp "$KMIP_CERTS"/* "$CERTS"/
fi

if [[ ! -f "$CERTS/client.crt" ]]; then
  "$(dirname "${BASH_SOURCE[0]}")/make-certs.sh" "$CERTS"
fi

# PyKMIP rejects unknown keys. Without database_path every instance would share
# /tmp/pykmip.database. tls_cipher_suites can only narrow PyKMIP's built-in list.
cat >"$DIR/server.conf" <<CONF
[server]
hostname=127.0.0.1
port=$PORT
certificate_path=$CERTS/server.crt
key_path=$CERTS/server.key
ca_path=$CERTS/ca.crt
auth_suite=TLS1.2
policy_path=$DIR/policies
enable_tls_client_auth=True
tls_cipher_suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
logging_level=INFO
database_path=${KMIP_DB:-$DIR/pykmip.db}
CONF

setsid "$PY" -W ignore -m kmip.services.server.server -f "$DIR/server.conf" -l "$DIR/server.log" \
  >"$DIR/stdout.log" 2>&1 </dev/null &
PID=$!
echo "$PID" >"$DIR/pykmip.pid"

# Ready when the port accepts a TCP connection (PyKMIP logs one failed handshake for it).
for _ in $(seq 1 300); do
  if "$PY" -c 'import socket,sys; s=socket.socket(); s.settimeout(0.2); sys.exit(s.connect_ex(("127.0.0.1", int(sys.argv[1]))))' "$PORT"; then
    echo "pykmip: pid $PID listening on 127.0.0.1:$PORT"
    exit 0
  fi
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "error: PyKMIP exited during start; see $DIR/stdout.log and $DIR/server.log" >&2
    tail -20 "$DIR/stdout.log" >&2 || true
    exit 1
  fi
  sleep 0.1
done
echo "error: PyKMIP is not listening on 127.0.0.1:$PORT after 30 s" >&2
kill -KILL -- "-$PID" 2>/dev/null || true
exit 1
