#!/usr/bin/env bash
# A throw-away certificate authority and a server certificate signed by it, for local use only
# (the local stack, a compose stack on your own machine). Real deployments mount their own
# certificate and key instead (docs/deploy.md, "TLS").
#
#   deploy/tls/make_self_signed.sh [OUT_DIR] [EXTRA_SAN ...]
#     OUT_DIR    default deploy/tls/local (git-ignored); EXTRA_SAN e.g. DNS:api.example.test IP:10.0.0.5
#
# Writes OUT_DIR/ca.pem (give it to clients: curl --cacert, requests verify=), OUT_DIR/server.crt
# (server certificate + CA: nginx ssl_certificate) and OUT_DIR/server.key (mode 600: nginx
# ssl_certificate_key). The CA's private key is deleted once the server certificate is signed,
# so nothing else can ever be issued under this CA. Needs only the `openssl` command.
set -euo pipefail

out="${1:-$(dirname "$0")/local}"
shift || true
days="${SERVABLE_TLS_DAYS:-30}"
san="DNS:localhost,DNS:nginx,IP:127.0.0.1,IP:::1"
for extra in "$@"; do san="$san,$extra"; done

mkdir -p "$out"
umask 077
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
  -subj "/CN=Servable local CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -subj "/CN=localhost" -keyout "$tmp/server.key" -out "$tmp/server.csr" 2>/dev/null
cat > "$tmp/ext.cnf" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EXT
openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
  -days "$days" -sha256 -extfile "$tmp/ext.cnf" -out "$tmp/server-only.crt" 2>/dev/null

cat "$tmp/server-only.crt" "$tmp/ca.pem" > "$out/server.crt"
cp "$tmp/server.key" "$out/server.key"
cp "$tmp/ca.pem" "$out/ca.pem"
chmod 600 "$out/server.key"
chmod 644 "$out/server.crt" "$out/ca.pem"
echo "wrote $out/server.crt, $out/server.key (nginx) and $out/ca.pem (clients); SAN $san; valid $days days"
