#!/usr/bin/env bash
# stop-superlink.sh — COORDINATOR: stop the SuperLink started by start-superlink.sh.
#
# Usage: deploy/stop-superlink.sh [--deploy-dir DIR]
#
#   --deploy-dir DIR  deployment dir (default: $SITEBRIDGE_DEPLOY_DIR, else .)
#
# Sends SIGTERM to the PID in DIR/state/superlink.pid (only if that process is still a
# flower-superlink), waits up to STOP_TIMEOUT_S seconds (default 10), then SIGKILLs it.
# Registrations and run history stay in the database; SuperNodes keep retrying and
# reconnect when the SuperLink is back.
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

deploy_dir=""
while (($#)); do
    case "$1" in
        -d | --deploy-dir) deploy_dir="${2:?--deploy-dir needs a value}"; shift 2 ;;
        -h | --help) print_usage; exit 0 ;;
        *) die "unexpected argument '$1' (see --help)" ;;
    esac
done
resolve_deploy_dir "$deploy_dir"
stop_pid_file "$STATE_DIR/superlink.pid" flower-superlink "the SuperLink"
