#!/usr/bin/env bash
# make-site-key.sh — SITE: create this site's SuperNode key pair (ECDSA P-384, OpenSSH
# format, as Flower 1.39 expects).
#
# Usage: deploy/make-site-key.sh [--deploy-dir DIR] SITE
#
#   --deploy-dir DIR  deployment dir (default: $SITEBRIDGE_DEPLOY_DIR, else .)
#   SITE              the site's name ([A-Za-z0-9._-]), e.g. hospital-a
#
# Writes DIR/keys/SITE (private key, mode 600: it never leaves this machine) and
# DIR/keys/SITE.pub (public key: send ONLY this file to the coordinator, who registers
# it with register-site.sh). Refuses to overwrite an existing key: a new key means a
# new registration.
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

deploy_dir=""
site=""
while (($#)); do
    case "$1" in
        -d | --deploy-dir) deploy_dir="${2:?--deploy-dir needs a value}"; shift 2 ;;
        -h | --help) print_usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) [[ -z "$site" ]] || die "unexpected argument '$1' (see --help)"; site="$1"; shift ;;
    esac
done
[[ -n "$site" ]] || die "missing SITE (see --help)"
check_site_name "$site"
resolve_deploy_dir "$deploy_dir"
require_command ssh-keygen "install the OpenSSH client"

key="$KEYS_DIR/$site"
[[ -e "$key" || -e "$key.pub" ]] && die "$key or $key.pub already exists; refusing to overwrite a site key (unregister the old one first if it is to be replaced)"
mkdir -p "$KEYS_DIR"
chmod 700 "$KEYS_DIR"
umask 077
ssh-keygen -q -t ecdsa -b 384 -N "" -C "sitebridge-supernode-$site" -f "$key"
chmod 600 "$key"
chmod 644 "$key.pub"
note "private key: $key (keep it here, mode 600)"
note "public key:  $key.pub (send only this file to the coordinator)"
