#!/usr/bin/env bash
# start-superlink.sh — COORDINATOR: start the Flower SuperLink with TLS, SuperNode
# authentication and a persistent database, and wait until it is healthy.
#
# Usage: deploy/start-superlink.sh [--deploy-dir DIR] [--foreground]
#
#   --deploy-dir DIR  deployment dir (default: $SITEBRIDGE_DEPLOY_DIR, else .)
#   --foreground      exec the SuperLink in the foreground, logging to stdout (systemd)
#
# Needs DIR/certs/{ca.crt,superlink.crt,superlink.key} (make-ca.sh). Writes
# DIR/state/superlink.pid, DIR/state/superlink.db (registrations, runs, in-flight
# messages; grows to the largest round, see docs/deployment.md), DIR/logs/superlink.log, and runs
# ServerApps with DIR as their working directory.
#
# Environment:
#   FLEET_ADDRESS       where SuperNodes connect (gRPC + TLS), default 127.0.0.1:9092;
#                       on a real coordinator the interface the sites reach, e.g.
#                       10.0.0.5:9092 or 0.0.0.0:9092. The ONLY port to open inbound.
#   CONTROL_HOST        Control API host (flwr CLI, HTTPS), default 127.0.0.1. Keep it
#                       on loopback: it has no account authentication (docs/deployment.md).
#   CONTROL_PORT        Control API port, default 9093
#   SUPERLINK_DATABASE  default DIR/state/superlink.db
#   SUPERLINK_FLWR_HOME the SuperLink's FLWR_HOME, default DIR/state/superlink-home
#   SUPERLINK_START_TIMEOUT_S  seconds to wait for /health (default 60)
#   SITEBRIDGE_VENV     virtualenv holding flower-superlink (else PATH is used)
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

deploy_dir=""
foreground=0
while (($#)); do
    case "$1" in
        -d | --deploy-dir) deploy_dir="${2:?--deploy-dir needs a value}"; shift 2 ;;
        --foreground) foreground=1; shift ;;
        -h | --help) print_usage; exit 0 ;;
        *) die "unexpected argument '$1' (see --help)" ;;
    esac
done
resolve_deploy_dir "$deploy_dir"
use_sitebridge_venv
export_flower_safety_env
require_command flower-superlink "activate the SiteBridge virtualenv or set SITEBRIDGE_VENV"
require_command curl "install curl (used to wait for the SuperLink's /health)"

ca_crt="$CERTS_DIR/ca.crt"
link_crt="$CERTS_DIR/superlink.crt"
link_key="$CERTS_DIR/superlink.key"
for file in "$ca_crt" "$link_crt" "$link_key"; do
    require_file "$file" "run deploy/make-ca.sh first"
done

fleet_address="${FLEET_ADDRESS:-127.0.0.1:9092}"
control_host="${CONTROL_HOST:-127.0.0.1}"
control_port="${CONTROL_PORT:-9093}"
[[ "$control_port" =~ ^[0-9]+$ ]] || die "CONTROL_PORT '$control_port' is not a port number"
if [[ "$control_host" != "127.0.0.1" && "$control_host" != "localhost" && "$control_host" != "::1" ]]; then
    note "WARNING: the Control API will listen on $control_host:$control_port. It has no account authentication: anyone who reaches it can run code at every site. Keep it on loopback."
fi
database="$(absolute_path "${SUPERLINK_DATABASE:-$STATE_DIR/superlink.db}")"
export FLWR_HOME="${SUPERLINK_FLWR_HOME:-$STATE_DIR/superlink-home}"
pid_file="$STATE_DIR/superlink.pid"
log_file="$LOGS_DIR/superlink.log"
mkdir -p "$STATE_DIR" "$LOGS_DIR" "$FLWR_HOME" "$(dirname "$database")"

if pid="$(running_pid "$pid_file" flower-superlink)"; then
    die "the SuperLink is already running (PID $pid, $pid_file); stop it with deploy/stop-superlink.sh"
fi

command=(
    flower-superlink
    --ssl-ca-certfile "$ca_crt"
    --ssl-certfile "$link_crt"
    --ssl-keyfile "$link_key"
    --enable-supernode-auth
    --database "$database"
    --disable-runtime-dependency-installation
    --fleet-api-type grpc-rere
    --fleet-api-address "$fleet_address"
    --host "$control_host"
    --port "$control_port"
)

# ServerApps inherit this working directory (relative paths resolve below DIR).
cd "$DEPLOY_DIR"
if ((foreground)); then
    echo "$$" >"$pid_file"
    exec "${command[@]}"
fi

nohup "${command[@]}" </dev/null >>"$log_file" 2>&1 &
pid=$!
echo "$pid" >"$pid_file"
note "started flower-superlink (PID $pid); fleet $fleet_address, control $control_host:$control_port, log $log_file"

health_host="$control_host"
[[ "$health_host" == "0.0.0.0" || "$health_host" == "::" ]] && health_host="127.0.0.1"
[[ "$health_host" == *:* ]] && health_host="[$health_host]"
timeout_s="${SUPERLINK_START_TIMEOUT_S:-60}"
deadline=$((SECONDS + timeout_s))
until curl -sf -m 2 --cacert "$ca_crt" "https://$health_host:$control_port/health" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
        rm -f "$pid_file"
        tail -n 20 "$log_file" >&2 || true
        die "flower-superlink exited during start-up; see $log_file"
    fi
    if ((SECONDS >= deadline)); then
        tail -n 20 "$log_file" >&2 || true
        die "flower-superlink (PID $pid) not healthy after ${timeout_s} s; see $log_file (stop it with deploy/stop-superlink.sh)"
    fi
    sleep 0.5
done
note "SuperLink healthy at https://$health_host:$control_port/health"
