#!/usr/bin/env bash
# register-site.sh — COORDINATOR: register a site's SuperNode public key with the
# SuperLink under the site's name, so that the SuperNode holding the matching private
# key may connect. That name is the site's identity in every run (its folder's name
# is not): one name, one key. A name that is already registered is refused.
#
# Usage: deploy/register-site.sh SITE_PUBLIC_KEY [NAME]
#
#   SITE_PUBLIC_KEY   the .pub file the site sent (made by make-site-key.sh)
#   NAME              the site's name (default: the file name without .pub); 1-64
#                     letters, digits, '.', '_' or '-', starting with a letter or digit
#
# Prints the SuperNode's node id on stdout (messages go to stderr). The registration is
# stored in the SuperLink's database and survives restarts; revoke it with
#   flwr supernode unregister <node-id> <connection>
#
# Environment:
#   FLWR_HOME              the flwr CLI's home holding config.toml (default ~/.flwr);
#                          see write-connection.sh
#   SITEBRIDGE_CONNECTION  connection name in config.toml (default "sitebridge")
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

positional=()
while (($#)); do
    case "$1" in
        -h | --help) print_usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) positional+=("$1"); shift ;;
    esac
done
((${#positional[@]} >= 1 && ${#positional[@]} <= 2)) || die "expected SITE_PUBLIC_KEY [NAME] (see --help)"
public_key="${positional[0]}"
require_file "$public_key" "the site's public key (keys/SITE.pub, made at the site by make-site-key.sh)"
grep -q "PRIVATE KEY" "$public_key" && die "$public_key is a PRIVATE key: it must never leave the site; ask the site for its .pub file"
read -r key_type _ <"$public_key" || true
[[ "$key_type" == ecdsa-sha2-nistp* ]] || die "$public_key is not an OpenSSH ECDSA public key (got '${key_type:-nothing}'); make it with make-site-key.sh"
name="${positional[1]:-$(basename "$public_key" .pub)}"
check_site_name "$name"

use_sitebridge_venv
export_flower_safety_env
require_command flwr "activate the SiteBridge virtualenv or set SITEBRIDGE_VENV"
connection="${SITEBRIDGE_CONNECTION:-sitebridge}"
config="${FLWR_HOME:-$HOME/.flwr}/config.toml"
require_file "$config" "write the coordinator's connection first (deploy/write-connection.sh)"

# Flower lets several keys share a name; SiteBridge does not (the name is the site).
python_bin="$(dirname "$(command -v flwr)")/python"
[[ -x "$python_bin" ]] || python_bin=python3
existing="$("$python_bin" "$(dirname "${BASH_SOURCE[0]}")/registered_names.py" "$connection" --name "$name")" ||
    die "could not check whether the name '$name' is registered already (see above)"
if [[ -n "$existing" ]]; then
    die "a key is already registered as '$name' (node $(cut -d' ' -f1 <<<"$existing" | paste -sd, -)): a site's name is its identity and belongs to one key. To give the site a new key, revoke the old one first: flwr supernode unregister <node-id> $connection"
fi

output="$(flwr supernode register "$(absolute_path "$public_key")" "$connection" --name "$name" --format json 2>&1)" ||
    die "registration of $public_key failed: $output"
node_id="$(sed -n 's/.*"node-id": *"\{0,1\}\([0-9][0-9]*\).*/\1/p' <<<"$output" | head -n 1)"
[[ -n "$node_id" ]] || die "registration of $public_key failed: $output"
note "registered $name as SuperNode $node_id"
printf '%s\n' "$node_id"
