#!/usr/bin/env bash
# stop-supernode.sh — SITE: stop the SuperNode and the site's app process that
# start-supernode.sh SITE started.
#
# Usage: deploy/stop-supernode.sh [--deploy-dir DIR] SITE
#
#   --deploy-dir DIR  deployment dir (default: $SITEBRIDGE_DEPLOY_DIR, else .)
#
# Stops the app process first (DIR/state/sitebridge-app-SITE.pid; a message it is
# answering gets an error reply saying the site stopped), then the SuperNode
# (DIR/state/supernode-SITE.pid). Each: SIGTERM, only if that process is still a
# sitebridge-serve / flower-supernode, a wait of up to STOP_TIMEOUT_S seconds (default
# 10), then SIGKILL. A graceful stop tells the SuperLink at once that the node left;
# the coordinator's current phase then proceeds without this site (if enough sites
# remain).
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
stop_pid_file "$STATE_DIR/sitebridge-app-$site.pid" sitebridge-serve "the app process of $site"
stop_pid_file "$STATE_DIR/supernode-$site.pid" flower-supernode "the SuperNode of $site"
