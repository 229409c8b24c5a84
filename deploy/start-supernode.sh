#!/usr/bin/env bash
# start-supernode.sh — SITE: start this site's Flower SuperNode and the site's own
# SiteBridge app process beside it. The SuperNode dials the coordinator's Fleet API over
# TLS and authenticates with the site's registered key; it runs no code of its own
# (--isolation process). The app process (sitebridge-serve) answers its messages with
# the SiteBridge installed here, and only for app bundles the site approved
# (sitebridge site approve): a coordinator's edited code never runs at the site.
#
# Usage: deploy/start-supernode.sh [--deploy-dir DIR] [--foreground | --app-foreground]
#                                  [--site-dir DIR] [--policy FILE] [--state-dir DIR]
#                                  [--port PORT] SITE
#
#   SITE              the site's name (its key is DIR/keys/SITE, see make-site-key.sh)
#   --site-dir DIR    the site folder (imagesTr/, labelsTr/, ...); or SITE_DIR
#   --policy FILE     the site's policy.toml (optional; default: <site-dir>/policy.toml
#                     if present, else the safe defaults); or SITE_POLICY
#   --state-dir DIR   where the site keeps its ledger, privacy accountant and approved
#                     bundles (optional; default <site-dir>/.sitebridge); or SITE_STATE_DIR
#   --port PORT       this SuperNode's local runtime API port (loopback, plain HTTP;
#                     unique per SuperNode on one host); or SUPERNODE_PORT, default 9094
#   --foreground      exec the SuperNode alone in the foreground, logging to stdout
#                     (systemd: sitebridge-supernode@SITE)
#   --app-foreground  exec the site's app process alone in the foreground (systemd:
#                     sitebridge-app@SITE); needs only SITE and --port
#   --deploy-dir DIR  deployment dir (default: $SITEBRIDGE_DEPLOY_DIR, else .)
#
# Without --foreground/--app-foreground it starts both in the background and waits (up
# to SUPERNODE_START_TIMEOUT_S) until the coordinator accepted or refused the node,
# then until the app process serves it. It exits 0 only then; otherwise it stops what
# it started and exits 1 with a reason the site can act on: key not registered or
# revoked, a TLS problem (wrong CA, name not in the certificate), or the coordinator
# unreachable.
#
# Needs DIR/certs/ca.crt (from the coordinator) and DIR/keys/SITE. Writes
# DIR/state/supernode-SITE.pid and DIR/logs/supernode-SITE.log (the SuperNode),
# DIR/state/sitebridge-app-SITE.pid and DIR/logs/sitebridge-app-SITE.log (the app
# process), the secret that lets only the app process take the node's tasks
# (DIR/state/supernode-SITE.secret, mode 600) and the node's own FLWR_HOME
# DIR/state/supernode-SITE-home.
#
# Environment:
#   SUPERLINK_FLEET_ADDRESS  the coordinator's Fleet API, default 127.0.0.1:9092; the
#                            host part must match the coordinator certificate's SAN
#   SUPERNODE_HOST           runtime API host, default 127.0.0.1 (never expose it)
#   SUPERNODE_KEY            private key, default DIR/keys/SITE
#   SITEBRIDGE_CA_CERT       CA certificate, default DIR/certs/ca.crt
#   SUPERNODE_FLWR_HOME      default DIR/state/supernode-SITE-home (any FLWR_HOME
#                            already set is ignored: one home per SuperNode)
#   SUPERNODE_START_TIMEOUT_S  how long to wait for the coordinator's answer, and
#                            then for the app process, default 60 (seconds, each)
#   SUPERNODE_MAX_RETRIES / SUPERNODE_MAX_WAIT_TIME
#                            give up connecting after that many tries / seconds;
#                            unset = retry forever (keep it so in production: the
#                            node then survives a SuperLink restart)
#   SITEBRIDGE_VENV          virtualenv holding flower-supernode and sitebridge-serve
#                            (else PATH is used)
#   SITEBRIDGE_LOG_LEVEL     the app process's --log-level: debug, info (default),
#                            warning or error (the site's own; no run config changes it)
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

deploy_dir=""
mode=both
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
        --foreground) mode=node; shift ;;
        --app-foreground) mode=app; shift ;;
        -h | --help) print_usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) [[ -z "$site" ]] || die "unexpected argument '$1' (see --help)"; site="$1"; shift ;;
    esac
done
[[ -n "$site" ]] || die "missing SITE (see --help)"
check_site_name "$site"
[[ "$port" =~ ^[0-9]+$ ]] || die "runtime API port '$port' is not a port number"
timeout_s="${SUPERNODE_START_TIMEOUT_S:-60}"
[[ "$timeout_s" =~ ^[0-9]+$ ]] || die "SUPERNODE_START_TIMEOUT_S '$timeout_s' is not a number of seconds"
resolve_deploy_dir "$deploy_dir"
use_sitebridge_venv
export_flower_safety_env

host="${SUPERNODE_HOST:-127.0.0.1}"
node_pid_file="$STATE_DIR/supernode-$site.pid"
node_log="$LOGS_DIR/supernode-$site.log"
app_pid_file="$STATE_DIR/sitebridge-app-$site.pid"
app_log="$LOGS_DIR/sitebridge-app-$site.log"
secret_file="$STATE_DIR/supernode-$site.secret"
mkdir -p "$STATE_DIR" "$LOGS_DIR"
ensure_secret_file "$secret_file"
app_command=(
    sitebridge-serve
    --runtime-api "$host:$port"
    --superexec-auth-secret-file "$secret_file"
)
if [[ -n "${SITEBRIDGE_LOG_LEVEL:-}" ]]; then
    app_command+=(--log-level "$SITEBRIDGE_LOG_LEVEL")
fi

if [[ "$mode" == app ]]; then
    require_command sitebridge-serve "activate the SiteBridge virtualenv or set SITEBRIDGE_VENV"
    if pid="$(running_pid "$app_pid_file" sitebridge-serve)"; then
        die "the app process of $site is already running (PID $pid, $app_pid_file)"
    fi
    cd "$DEPLOY_DIR"
    echo "$$" >"$app_pid_file"
    exec "${app_command[@]}"
fi

require_command flower-supernode "activate the SiteBridge virtualenv or set SITEBRIDGE_VENV"
[[ "$mode" == node ]] || require_command sitebridge-serve "activate the SiteBridge virtualenv or set SITEBRIDGE_VENV"
[[ -n "$site_dir" ]] || die "missing --site-dir (or SITE_DIR): the site folder this SuperNode serves"
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
export FLWR_HOME="${SUPERNODE_FLWR_HOME:-$STATE_DIR/supernode-$site-home}"
mkdir -p "$FLWR_HOME"

if pid="$(running_pid "$node_pid_file" flower-supernode)"; then
    die "the SuperNode of $site is already running (PID $pid, $node_pid_file); stop it with deploy/stop-supernode.sh $site"
fi
# After a SuperNode crash the app process is still up, waiting for the Runtime API
# at its address: it serves the new SuperNode if that listens on the same address.
app_pid=""
if [[ "$mode" == both ]] && app_pid="$(running_pid "$app_pid_file" sitebridge-serve)"; then
    tr '\0' ' ' <"/proc/$app_pid/cmdline" | grep -qF -- "--runtime-api $host:$port " ||
        die "the app process of $site (PID $app_pid, $app_pid_file) serves another runtime API address than $host:$port; stop it with deploy/stop-supernode.sh $site"
fi

node_command=(
    flower-supernode
    --grpc-rere
    --superlink "$fleet_address"
    --root-certificates "$ca_crt"
    --auth-supernode-private-key "$key"
    --node-config "$node_config"
    --isolation process
    --superexec-auth-secret-file "$secret_file"
    --host "$host"
    --port "$port"
)
[[ -n "${SUPERNODE_MAX_RETRIES:-}" ]] && node_command+=(--max-retries "$SUPERNODE_MAX_RETRIES")
[[ -n "${SUPERNODE_MAX_WAIT_TIME:-}" ]] && node_command+=(--max-wait-time "$SUPERNODE_MAX_WAIT_TIME")

cd "$DEPLOY_DIR"
if [[ "$mode" == node ]]; then
    echo "$$" >"$node_pid_file"
    exec "${node_command[@]}"
fi

# Background: the SuperNode first; the app process once the coordinator accepted it.
node_offset="$(log_size "$node_log")"
nohup "${node_command[@]}" </dev/null >>"$node_log" 2>&1 &
node_pid=$!
echo "$node_pid" >"$node_pid_file"

# give_up REASON: stop what this script started, then fail with REASON.
give_up() {
    (stop_pid_file "$app_pid_file" sitebridge-serve "the app process of $site") >/dev/null 2>&1 || true
    (stop_pid_file "$node_pid_file" flower-supernode "the SuperNode of $site") >/dev/null 2>&1 || true
    die "$1"
}

wait_for_supernode "$node_pid" "$node_log" "$node_offset" "$timeout_s"
case "$SUPERNODE_OUTCOME" in
    accepted) ;;
    refused-key)
        give_up "the coordinator refused this SuperNode: its key is not registered or was revoked. Send keys/$site.pub to the coordinator (and its fingerprint, ssh-keygen -lf keys/$site.pub, by a second channel, e.g. by phone) and ask them to register it: deploy/register-site.sh $site.pub $site. Flower said: $(log_error "$node_log" "$node_offset"); log $node_log" ;;
    refused-tls)
        give_up "TLS to the coordinator failed: its certificate is not signed by $ca_crt (a wrong or outdated ca.crt: get the current certs/ca.crt from the coordinator) or does not name '${fleet_address%:*}' in its SAN (use the name the coordinator's certificate was made for). Flower said: $(log_error "$node_log" "$node_offset"); log $node_log" ;;
    exited:*)
        give_up "the SuperNode exited (status ${SUPERNODE_OUTCOME#exited:}) before the coordinator accepted it. Flower said: $(log_error "$node_log" "$node_offset"); log $node_log" ;;
    timeout)
        if probe_tcp "$fleet_address"; then
            give_up "the coordinator's Fleet API at $fleet_address answers TCP, but did not accept this SuperNode within ${timeout_s} s (SUPERNODE_START_TIMEOUT_S); see $node_log"
        fi
        give_up "the coordinator is unreachable: nothing answered at $fleet_address within ${timeout_s} s. Check SUPERLINK_FLEET_ADDRESS, that the coordinator's SuperLink runs, and that the firewall allows outbound TCP to port ${fleet_address##*:}; log $node_log" ;;
esac
node_id="$(log_since "$node_log" "$node_offset" | sed -n 's/.*SuperNode ID: *\([0-9][0-9]*\).*/\1/p' | head -n 1)"
note "the coordinator accepted the SuperNode of $site (PID $node_pid, node id $node_id) -> $fleet_address; site folder $site_dir; log $node_log"

if [[ -n "$app_pid" ]]; then
    note "the site's app process (PID $app_pid) still runs and serves the new SuperNode; log $app_log"
    exit 0
fi
app_offset="$(log_size "$app_log")"
nohup "${app_command[@]}" </dev/null >>"$app_log" 2>&1 &
app_pid=$!
echo "$app_pid" >"$app_pid_file"
if ! wait_for_log_line "$app_pid" "$app_log" "$app_offset" "serving the SuperNode" "$timeout_s"; then
    give_up "the site's app process (sitebridge-serve) did not start serving within ${timeout_s} s: $(tail -n 3 "$app_log" | tr '\n' ' '); log $app_log"
fi
note "started the site's app process (PID $app_pid): it answers runs of approved bundles with the SiteBridge installed here; log $app_log"
note "approve the release you reviewed: sitebridge site approve --state-dir <state dir> <bundle.fab or SHA-256>"
