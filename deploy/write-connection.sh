#!/usr/bin/env bash
# write-connection.sh — COORDINATOR: write the flwr CLI's connection to the SuperLink
# ($FLWR_HOME/config.toml) from deploy/config.toml.template.
#
# Usage: deploy/write-connection.sh [--deploy-dir DIR] [--force]
#
#   --deploy-dir DIR  deployment dir (default: $SITEBRIDGE_DEPLOY_DIR, else .)
#   --force           replace an existing config.toml (kept as config.toml.bak)
#
# Environment:
#   FLWR_HOME              the flwr CLI's home (default ~/.flwr, as Flower's)
#   SITEBRIDGE_CONNECTION  connection name (default "sitebridge")
#   CONTROL_HOST           SuperLink Control API host (default 127.0.0.1)
#   CONTROL_PORT           SuperLink Control API port (default 9093)
#   SITEBRIDGE_CA_CERT     CA certificate (default DIR/certs/ca.crt), written as an
#                          absolute path
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

deploy_dir=""
force=0
while (($#)); do
    case "$1" in
        -d | --deploy-dir) deploy_dir="${2:?--deploy-dir needs a value}"; shift 2 ;;
        --force) force=1; shift ;;
        -h | --help) print_usage; exit 0 ;;
        *) die "unexpected argument '$1' (see --help)" ;;
    esac
done
resolve_deploy_dir "$deploy_dir"

template="$(dirname "${BASH_SOURCE[0]}")/config.toml.template"
require_file "$template" "the template ships with SiteBridge in deploy/"
connection="${SITEBRIDGE_CONNECTION:-sitebridge}"
[[ "$connection" =~ ^[A-Za-z0-9_-]+$ ]] || die "SITEBRIDGE_CONNECTION '$connection' must match [A-Za-z0-9_-]+"
address="${CONTROL_HOST:-127.0.0.1}:${CONTROL_PORT:-9093}"
ca_crt="$(absolute_path "${SITEBRIDGE_CA_CERT:-$CERTS_DIR/ca.crt}")"
require_file "$ca_crt" "run deploy/make-ca.sh first"
check_toml_safe "$ca_crt" "CA certificate path"

flwr_home="${FLWR_HOME:-$HOME/.flwr}"
config="$flwr_home/config.toml"
if [[ -e "$config" ]]; then
    ((force)) || die "$config already exists; pass --force to replace it (the old one is kept as config.toml.bak), or add the [superlink.$connection] table of $template by hand"
    cp -f "$config" "$config.bak"
fi
mkdir -p "$flwr_home"

shopt -u patsub_replacement 2>/dev/null || true  # bash 5.2: '&' stays literal
text="$(<"$template")"
text="${text//@CONNECTION@/$connection}"
text="${text//@CONTROL_ADDRESS@/$address}"
text="${text//@ROOT_CERTIFICATES@/$ca_crt}"
printf '%s\n' "$text" >"$config"
note "wrote connection '$connection' ($address, CA $ca_crt) to $config"
