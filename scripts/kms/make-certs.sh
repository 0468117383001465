#!/usr/bin/env bash
# Make throwaway test certificates for a KMIP server on 127.0.0.1 and its clients.
#
# Usage: scripts/kms/make-certs.sh DIR
#
# DIR receives (keys mode 0600, valid 30 days):
#   ca.{crt,key}                  test CA
#   server.{crt,key}              server certificate, SAN IP:127.0.0.1 and DNS:localhost
#   client.{crt,key}              client certificate with EKU clientAuth, CN nbdcrypt
#   client-noeku.{crt,key}        the same without clientAuth, which PyKMIP rejects
#   other-ca.crt, other-client.*  an unrelated CA and a client certificate it issued
#
# All keys are ECDSA P-256: with RSA certificates PyKMIP 0.10 offers no AES-GCM cipher
# suite, and rustls offers only AEAD suites.
set -euo pipefail

CERTS=${1:?usage: $0 DIR}
command -v openssl >/dev/null || { echo "error: openssl is missing; apt-get install -y openssl" >&2; exit 1; }
mkdir -p "$CERTS"

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
