#!/usr/bin/env bash
# make-ca.sh — COORDINATOR: create the federation's certificate authority (CA) and the
# SuperLink's TLS certificate signed by it.
#
# Usage: deploy/make-ca.sh [--deploy-dir DIR] [--force | --renew]
#
#   --deploy-dir DIR  deployment dir (default: $SITEBRIDGE_DEPLOY_DIR, else .)
#   --force           replace an existing CA and certificate (every site must then get
#                     the new certs/ca.crt)
#   --renew           keep the CA, issue a new SuperLink certificate (new SAN, expiry)
#
# Writes under DIR/certs/:
#   ca.key            the CA's private key (mode 600); keep it off the network
#   ca.crt            the CA certificate: copy it to every site (public)
#   superlink.key     the SuperLink's TLS private key (mode 600)
#   superlink.crt     the SuperLink's certificate, signed by the CA
#
# Environment:
#   SUPERLINK_SAN     subjectAltName of the SuperLink certificate: every name and
#                     address the sites dial, e.g. "DNS:fl.hospital.example,IP:10.0.0.5"
#                     (default "IP:127.0.0.1,DNS:localhost"). IP:127.0.0.1 and
#                     DNS:localhost are always added: the coordinator's own flwr CLI
#                     and ServerApp reach the SuperLink over loopback with this cert.
#   SUPERLINK_CN      certificate common name (default: the first SAN value)
#   CA_SUBJECT        default "/O=SiteBridge/CN=SiteBridge federation CA"
#   CA_DAYS           CA validity in days (default 3650)
#   CERT_DAYS         SuperLink certificate validity in days (default 825)
#   RSA_BITS          RSA key size (default 4096)
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

deploy_dir=""
mode="create"
while (($#)); do
    case "$1" in
        -d | --deploy-dir) deploy_dir="${2:?--deploy-dir needs a value}"; shift 2 ;;
        --force) mode="force"; shift ;;
        --renew) mode="renew"; shift ;;
        -h | --help) print_usage; exit 0 ;;
        *) die "unexpected argument '$1' (see --help)" ;;
    esac
done
resolve_deploy_dir "$deploy_dir"
require_command openssl "install OpenSSL"

san="${SUPERLINK_SAN:-IP:127.0.0.1,DNS:localhost}"
IFS=',' read -r -a san_entries <<<"$san"
for entry in "${san_entries[@]}"; do
    [[ "$entry" =~ ^(IP|DNS):[^[:space:]]+$ ]] || die "SUPERLINK_SAN entry '$entry' must look like DNS:name or IP:address"
done
for required in "IP:127.0.0.1" "DNS:localhost"; do
    [[ ",$san," == *",$required,"* ]] || san="$san,$required"
done
common_name="${SUPERLINK_CN:-${san_entries[0]#*:}}"
ca_subject="${CA_SUBJECT:-/O=SiteBridge/CN=SiteBridge federation CA}"
rsa_bits="${RSA_BITS:-4096}"

ca_key="$CERTS_DIR/ca.key"
ca_crt="$CERTS_DIR/ca.crt"
link_key="$CERTS_DIR/superlink.key"
link_crt="$CERTS_DIR/superlink.crt"

if [[ -e "$ca_key" || -e "$ca_crt" ]]; then
    case "$mode" in
        force) note "--force: replacing the CA in $CERTS_DIR; every site needs the new ca.crt" ;;
        renew)
            require_file "$ca_key" "--renew needs the CA's private key"
            require_file "$ca_crt" "--renew needs the CA certificate"
            ;;
        *)
            [[ -e "$link_crt" ]] && die "a CA and SuperLink certificate already exist in $CERTS_DIR; pass --renew for a new SuperLink certificate or --force for a new CA"
            require_file "$ca_key" "the CA certificate exists without its key; pass --force to start over"
            require_file "$ca_crt" "the CA key exists without its certificate; pass --force to start over"
            ;;
    esac
elif [[ "$mode" == "renew" ]]; then
    die "--renew: no CA in $CERTS_DIR (run without --renew first)"
fi

mkdir -p "$CERTS_DIR"
umask 077  # keys are never readable by others, not even briefly
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [[ "$mode" == "force" || ! -e "$ca_key" ]]; then
    cat >"$work/ca.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
[v3_ca]
basicConstraints = critical,CA:TRUE,pathlen:0
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
EOF
    openssl genrsa -out "$work/ca.key" "$rsa_bits" 2>/dev/null
    openssl req -new -x509 -config "$work/ca.cnf" -extensions v3_ca -key "$work/ca.key" \
        -sha256 -days "${CA_DAYS:-3650}" -subj "$ca_subject" -out "$work/ca.crt"
    mv -f "$work/ca.key" "$ca_key"
    mv -f "$work/ca.crt" "$ca_crt"
    note "created the CA: $ca_crt"
fi

cat >"$work/link.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
EOF
printf '%s\n' \
    "subjectAltName=$san" \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" \
    "subjectKeyIdentifier=hash" \
    "authorityKeyIdentifier=keyid,issuer" >"$work/link.ext"
openssl genrsa -out "$work/superlink.key" "$rsa_bits" 2>/dev/null
openssl req -new -config "$work/link.cnf" -key "$work/superlink.key" \
    -subj "/O=SiteBridge/CN=$common_name" -out "$work/superlink.csr"
openssl x509 -req -in "$work/superlink.csr" -CA "$ca_crt" -CAkey "$ca_key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "${CERT_DAYS:-825}" -sha256 \
    -extfile "$work/link.ext" -out "$work/superlink.crt" 2>/dev/null
mv -f "$work/superlink.key" "$link_key"
mv -f "$work/superlink.crt" "$link_crt"
chmod 600 "$ca_key" "$link_key"
chmod 644 "$ca_crt" "$link_crt"
note "issued the SuperLink certificate for $san: $link_crt"

openssl verify -CAfile "$ca_crt" "$link_crt"
