#!/usr/bin/env bash
# Start a throwaway PyKMIP server on 127.0.0.1 with mutual TLS, for nbdcrypt's KMIP tests.
#
# Usage: scripts/kms/start-pykmip.sh DIR PORT
#
# DIR receives everything: certs/ (throwaway ECDSA P-256 CA, server and client certificates),
# server.conf, policies/, the SQLite object store pykmip.db, server.log, stdout.log and
# pykmip.pid (the server runs in its own session, so the PID is also its process group).
#
# Certificates:
#   certs/ca.crt, server.{crt,key}   server certificate with SAN IP:127.0.0.1 and DNS:localhost
#   certs/client.{crt,key}            client certificate with EKU clientAuth, CN nbdcrypt
#   certs/client-noeku.{crt,key}      same chain without clientAuth: PyKMIP rejects its requests
#   certs/other-ca.crt, other-client.{crt,key}  a second, unrelated CA and a client it issued
#
# ECDSA because PyKMIP offers no AES-GCM cipher suite for RSA certificates, and rustls offers
# only AEAD suites. PyKMIP 0.10 speaks TLS 1.2 only.
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
command -v openssl >/dev/null || { echo "error: openssl is missing; apt-get install -y openssl" >&2; exit 1; }

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

issue() { # NAME SUBJECT EXTENSIONS CA-BASENAME
  local name=$1 subject=$2 extensions=$3 ca=$4
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -subj "$subject" \
    -keyout "$CERTS/$name.key" -out "$CERTS/$name.csr" 2>/dev/null
  printf '%s\n' "$extensions" >"$CERTS/$name.ext"
  openssl x509 -req -in "$CERTS/$name.csr" -CA "$CERTS/$ca.crt" -CAkey "$CERTS/$ca.key" \
    -CAcreateserial -days 30 -sha256 -extfile "$CERTS/$name.ext" -out "$CERTS/$name.crt" 2>/dev/null
  rm -f "$CERTS/$name.csr" "$CERTS/$name.ext"
}

make_ca() { # NAME SUBJECT
  openssl req -x509 -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -days 30 -sha256 \
    -subj "$2" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$CERTS/$1.key" -out "$CERTS/$1.crt" 2>/dev/null
}

if [[ ! -f "$CERTS/client.crt" ]]; then
  mkdir -p "$CERTS"
  make_ca ca "/CN=nbdcrypt test KMIP CA"
  make_ca other-ca "/CN=unrelated test CA"
  # rustls checks only the SAN, never the CN, so the server certificate needs one.
  issue server "/CN=localhost" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost" ca
  # PyKMIP takes the single subject CN as the object owner.
  issue client "/CN=nbdcrypt" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth" ca
  issue client-noeku "/CN=nbdcrypt" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature" ca
  issue other-client "/CN=nbdcrypt" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth" other-ca
  chmod 600 "$CERTS"/*.key
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
