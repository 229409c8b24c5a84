#!/usr/bin/env bash
# start-supernode.sh — SITE: start this site's Flower SuperNode: it dials the
# coordinator's Fleet API over TLS, authenticates with the site's registered key, and
# serves the site folder to the SiteBridge ClientApp.
#
# Usage: deploy/start-supernode.sh [--deploy-dir DIR] [--foreground] [--site-dir DIR]
#                                  [--policy FILE] [--state-dir DIR] [--port PORT] SITE
#
#   SITE              the site's name (its key is DIR/keys/SITE, see make-site-key.sh)
#   --site-dir DIR    the site folder (imagesTr/, labelsTr/, ...); or SITE_DIR
#   --policy FILE     the site's policy.toml (optional; default: <site-dir>/policy.toml
#                     if present, else the safe defaults); or SITE_POLICY
#   --state-dir DIR   where the site keeps its ledger and privacy accountant (optional;
#                     default <site-dir>/.sitebridge); or SITE_STATE_DIR
#   --port PORT       this SuperNode's local runtime API port (loopback, plain HTTP;
#                     unique per SuperNode on one host); or SUPERNODE_PORT, default 9094
#   --foreground      exec the SuperNode in the foreground, logging to stdout (systemd)
#   --deploy-dir DIR  deployment dir (default: $SITEBRIDGE_DEPLOY_DIR, else .)
#
# Needs DIR/certs/ca.crt (from the coordinator) and DIR/keys/SITE. Writes
# DIR/state/supernode-SITE.pid, DIR/logs/supernode-SITE.log and the node's own
# FLWR_HOME DIR/state/supernode-SITE-home (installed app bundles).
#
# Environment:
#   SUPERLINK_FLEET_ADDRESS  the coordinator's Fleet API, default 127.0.0.1:9092; the
#                            host part must match the coordinator certificate's SAN
#   SUPERNODE_HOST           runtime API host, default 127.0.0.1 (never expose it)
#   SUPERNODE_KEY            private key, default DIR/keys/SITE
#   SITEBRIDGE_CA_CERT       CA certificate, default DIR/certs/ca.crt
#   SUPERNODE_FLWR_HOME      default DIR/state/supernode-SITE-home (any FLWR_HOME
#                            already set is ignored: one home per SuperNode)
#   SUPERNODE_MAX_RETRIES / SUPERNODE_MAX_WAIT_TIME
#                            give up connecting after that many tries / seconds;
#                            unset = retry forever (keep it so in production: the
#                            node then survives a SuperLink restart)
#   SITEBRIDGE_VENV          virtualenv holding flower-supernode (else PATH is used)
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

deploy_dir=""
foreground=0
site=""
site_dir="${SITE_DIR:-}"
policy="${SITE_POLICY:-}"
state_dir="${SITE_STATE_DIR:-}"
port="${SUPERNODE_PORT:-9094}"
while (($#)); do
    case "$1" in
        -d | --deploy-dir) deploy_dir="${2:?--deploy-dir needs a value}"; shift 2 ;;
        --site-dir) site_dir="${2:?--site-dir needs a value}"; shift 2 ;;
        --policy) policy="${2:?--policy needs a value}"; shift 2 ;;
        --state-dir) state_dir="${2:?--state-dir needs a value}"; shift 2 ;;
        --port) port="${2:?--port needs a value}"; shift 2 ;;
        --foreground) foreground=1; shift ;;
        -h | --help) print_usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) [[ -z "$site" ]] || die "unexpected argument '$1' (see --help)"; site="$1"; shift ;;
    esac
done
[[ -n "$site" ]] || die "missing SITE (see --help)"
check_site_name "$site"
[[ -n "$site_dir" ]] || die "missing --site-dir (or SITE_DIR): the site folder this SuperNode serves"
[[ "$port" =~ ^[0-9]+$ ]] || die "runtime API port '$port' is not a port number"
resolve_deploy_dir "$deploy_dir"
use_sitebridge_venv
export_flower_safety_env
require_command flower-supernode "activate the SiteBridge virtualenv or set SITEBRIDGE_VENV"

ca_crt="$(absolute_path "${SITEBRIDGE_CA_CERT:-$CERTS_DIR/ca.crt}")"
key="$(absolute_path "${SUPERNODE_KEY:-$KEYS_DIR/$site}")"
require_file "$ca_crt" "copy the coordinator's certs/ca.crt here"
require_file "$key" "make the site key with deploy/make-site-key.sh $site (and have the coordinator register $site.pub)"
grep -q "PRIVATE KEY" "$key" || die "$key is not a private key"
if [[ "$(stat -c '%a' "$key")" != 600 && "$(stat -c '%a' "$key")" != 400 ]]; then
    note "WARNING: $key is readable by others (mode $(stat -c '%a' "$key")); chmod 600 it"
fi

site_dir="$(absolute_path "$site_dir")"
[[ -d "$site_dir" ]] || die "site folder $site_dir not found"
check_toml_safe "$site_dir" "site folder"
node_config="site-dir=\"$site_dir\""
if [[ -n "$policy" ]]; then
    policy="$(absolute_path "$policy")"
    require_file "$policy" "the site policy named by --policy (start from deploy/policy.template.toml)"
    check_toml_safe "$policy" "policy file"
    node_config+=" policy=\"$policy\""
fi
if [[ -n "$state_dir" ]]; then
    state_dir="$(absolute_path "$state_dir")"
    check_toml_safe "$state_dir" "state dir"
    mkdir -p "$state_dir"
    node_config+=" state-dir=\"$state_dir\""
fi

fleet_address="${SUPERLINK_FLEET_ADDRESS:-127.0.0.1:9092}"
host="${SUPERNODE_HOST:-127.0.0.1}"
export FLWR_HOME="${SUPERNODE_FLWR_HOME:-$STATE_DIR/supernode-$site-home}"
pid_file="$STATE_DIR/supernode-$site.pid"
log_file="$LOGS_DIR/supernode-$site.log"
mkdir -p "$STATE_DIR" "$LOGS_DIR" "$FLWR_HOME"

if pid="$(running_pid "$pid_file" flower-supernode)"; then
    die "the SuperNode of $site is already running (PID $pid, $pid_file); stop it with deploy/stop-supernode.sh $site"
fi

command=(
    flower-supernode
    --grpc-rere
    --superlink "$fleet_address"
    --root-certificates "$ca_crt"
    --auth-supernode-private-key "$key"
    --node-config "$node_config"
    --host "$host"
    --port "$port"
)
[[ -n "${SUPERNODE_MAX_RETRIES:-}" ]] && command+=(--max-retries "$SUPERNODE_MAX_RETRIES")
[[ -n "${SUPERNODE_MAX_WAIT_TIME:-}" ]] && command+=(--max-wait-time "$SUPERNODE_MAX_WAIT_TIME")

cd "$DEPLOY_DIR"
if ((foreground)); then
    echo "$$" >"$pid_file"
    exec "${command[@]}"
fi

nohup "${command[@]}" </dev/null >>"$log_file" 2>&1 &
pid=$!
echo "$pid" >"$pid_file"
kill -0 "$pid" 2>/dev/null || die "flower-supernode exited at once; see $log_file"
note "started the SuperNode of $site (PID $pid) -> $fleet_address; site folder $site_dir; log $log_file"
note "check it is online on the coordinator: flwr supernode list <connection>"
