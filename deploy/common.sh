# shellcheck shell=bash
# common.sh — helpers sourced by the deploy/*.sh scripts; not run on its own.
#
# Every script accepts `-d DIR` / `--deploy-dir DIR` (else $SITEBRIDGE_DEPLOY_DIR, else
# the current directory) and resolves every path below that deployment dir to an
# absolute path, because Flower passes some paths verbatim to the processes it spawns
# (docs/deployment.md#flower-139-behaviours-the-scripts-rely-on). Layout of a deployment dir:
#
#   certs/ca.crt  certs/ca.key  certs/superlink.crt  certs/superlink.key
#   keys/<SITE>   keys/<SITE>.pub      a site's SuperNode key pair (site side)
#   state/        PID files, the SuperLink database, per-daemon FLWR_HOMEs
#   logs/         one log file per daemon

SCRIPT_NAME="$(basename "$0")"

die() {
    echo "$SCRIPT_NAME: error: $*" >&2
    exit 1
}

note() {
    echo "$SCRIPT_NAME: $*" >&2
}

# Print the usage header (the comment lines after the shebang) of the running script.
print_usage() {
    sed -n '2,${/^#/!q;s/^# \{0,1\}//;p;}' "$0"
}

# Resolve DEPLOY_DIR (absolute, must exist) from the flag value or the environment.
resolve_deploy_dir() {
    local requested="${1:-${SITEBRIDGE_DEPLOY_DIR:-.}}"
    [[ -d "$requested" ]] || die "deployment dir '$requested' does not exist (set SITEBRIDGE_DEPLOY_DIR or pass --deploy-dir)"
    DEPLOY_DIR="$(cd "$requested" && pwd -P)"
    # shellcheck disable=SC2034  # used by the scripts that source this file
    CERTS_DIR="$DEPLOY_DIR/certs"
    # shellcheck disable=SC2034
    KEYS_DIR="$DEPLOY_DIR/keys"
    # shellcheck disable=SC2034
    STATE_DIR="$DEPLOY_DIR/state"
    # shellcheck disable=SC2034
    LOGS_DIR="$DEPLOY_DIR/logs"
}

# require_file PATH HINT: fail with a clear message when a prerequisite is missing.
require_file() {
    [[ -f "$1" ]] || die "missing $1 — $2"
}

# require_command NAME HINT
require_command() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH — $2"
}

# Put the SiteBridge virtualenv's bin dir first on PATH when SITEBRIDGE_VENV is set.
# The SuperLink/SuperNode start their helper processes (flower-superexec,
# flwr-serverapp, flwr-clientapp) by name, so PATH must reach them.
use_sitebridge_venv() {
    if [[ -n "${SITEBRIDGE_VENV:-}" ]]; then
        [[ -x "$SITEBRIDGE_VENV/bin/python" ]] || die "SITEBRIDGE_VENV=$SITEBRIDGE_VENV is not a virtualenv (no bin/python)"
        PATH="$SITEBRIDGE_VENV/bin:$PATH"
        export PATH
    fi
}

# No update checks or telemetry (air-gapped sites); never `uv sync` at run time
# (docs/deployment.md#operating-notes).
export_flower_safety_env() {
    export FLWR_DISABLE_UPDATE_CHECK=1
    export FLWR_TELEMETRY_ENABLED=0
    export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
}

# check_site_name NAME: site names become file names (here and at the coordinator,
# which checks the same pattern: server/coordinator.py SITE_NAME_PATTERN).
check_site_name() {
    [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] || die "site name '$1' must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
}

# check_toml_safe VALUE WHAT: values written into TOML/--node-config double quotes.
check_toml_safe() {
    [[ "$1" != *'"'* && "$1" != *\\* ]] || die "$2 '$1' must not contain a double quote or a backslash"
}

# absolute_path PATH: PATH made absolute against the current directory (need not exist).
absolute_path() {
    if [[ "$1" == /* ]]; then
        printf '%s\n' "$1"
    else
        printf '%s\n' "$PWD/$1"
    fi
}

# started_before PID FILE: the process started no later than FILE was last written
# (a PID file is written just after its process started; a recycled PID is younger).
started_before() {
    local pid="$1" file="$2" stat boot_s hz fields
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    read -r -a fields <<<"${stat##*) }"
    boot_s="$(awk '/^btime/ {print $2}' /proc/stat)"
    hz="$(getconf CLK_TCK)"
    ((boot_s + fields[19] / hz <= $(stat -c %Y "$file") + 1))
}

# pid_matches PID NAME [PID_FILE]: PID is alive, its command line mentions NAME and
# it is not younger than PID_FILE (guards against a recycled PID in a stale file).
pid_matches() {
    local pid="$1" name="$2" pid_file="${3:-}"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 0  # no /proc: trust kill -0
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name" || return 1
    [[ -z "$pid_file" || ! -f "$pid_file" ]] || started_before "$pid" "$pid_file"
}

# running_pid PID_FILE NAME: print the PID recorded in PID_FILE if that process is
# alive and is NAME; remove a stale PID file. Returns 1 when nothing runs.
running_pid() {
    local pid_file="$1" name="$2" pid
    [[ -f "$pid_file" ]] || return 1
    pid="$(tr -d '[:space:]' <"$pid_file")"
    if pid_matches "$pid" "$name" "$pid_file"; then
        printf '%s\n' "$pid"
        return 0
    fi
    rm -f "$pid_file"
    return 1
}

# stop_pid_file PID_FILE NAME LABEL: SIGTERM the recorded process, wait up to
# $STOP_TIMEOUT_S (default 10) seconds, then SIGKILL. Touches only that one PID.
stop_pid_file() {
    local pid_file="$1" name="$2" label="$3" pid waited=0 timeout="${STOP_TIMEOUT_S:-10}"
    if ! pid="$(running_pid "$pid_file" "$name")"; then
        note "$label is not running (no live process in $pid_file)"
        return 0
    fi
    note "stopping $label (PID $pid, SIGTERM)"
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && pid_matches "$pid" "$name" "$pid_file"; do
        if ((waited >= timeout * 10)); then
            note "$label did not exit within ${timeout} s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    # After SIGKILL the process is gone as soon as it is reaped; wait for that.
    waited=0
    while pid_matches "$pid" "$name" "$pid_file" && ((waited < 50)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    pid_matches "$pid" "$name" "$pid_file" && die "$label (PID $pid) is still running"
    rm -f "$pid_file"
    note "$label stopped"
}

# ensure_secret_file FILE: a random shared secret (mode 600) that lets only this site's
# app process take its SuperNode's tasks (flower-supernode --superexec-auth-secret-file).
# Made once; kept across restarts; two starts at once agree on one file.
ensure_secret_file() {
    local file="$1" temporary
    [[ -s "$file" ]] && return 0
    temporary="$file.$$.tmp"
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$temporary")
    mv -n "$temporary" "$file"
    rm -f "$temporary"
    [[ -s "$file" ]] || die "could not write the secret $file"
}

# log_size FILE: its size in bytes (0 when missing): where this start's lines begin.
log_size() {
    stat -c %s "$1" 2>/dev/null || echo 0
}

# log_since FILE OFFSET: what FILE got after OFFSET bytes, without colour codes.
log_since() {
    tail -c "+$(($2 + 1))" "$1" 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g'
}

# is_alive PID: the process runs (a zombie, exited but not yet reaped, does not).
is_alive() {
    local stat fields
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    read -r -a fields <<<"${stat##*) }"
    [[ "${fields[0]}" != Z && "${fields[0]}" != X ]]
}

# log_error FILE OFFSET: Flower's exit message (from "Exit Code:" to the blank line
# after it) on one line.
log_error() {
    log_since "$1" "$2" |
        awk '/Exit Code:/ {on = 1; sub(/^.*Exit Code:/, "Exit Code:")} on && /^[[:space:]]*$/ {exit} on {print}' |
        tr '\n' ' ' | sed 's/ *$//'
}

# wait_for_supernode PID LOG OFFSET TIMEOUT_S: wait until the SuperNode PID (a child of
# this shell) is accepted by the coordinator ("SuperNode ID:" in its log), exits, or the
# time is up. Sets SUPERNODE_OUTCOME to accepted, refused-key (Flower's ApiError 2004:
# the key is not registered or was revoked), refused-tls (TLS handshake failed),
# exited:<status>, or timeout.
wait_for_supernode() {
    local pid="$1" log="$2" offset="$3" deadline=$((SECONDS + $4)) text status
    while :; do
        if log_since "$log" "$offset" | grep -q "SuperNode ID:"; then
            SUPERNODE_OUTCOME=accepted
            return 0
        fi
        if ! is_alive "$pid"; then
            status=0
            wait "$pid" 2>/dev/null || status=$?
            text="$(log_since "$log" "$offset")"
            if grep -q "SuperNode ID:" <<<"$text"; then
                SUPERNODE_OUTCOME="exited:$status"
            elif grep -q "\[code: 2004\]" <<<"$text"; then
                SUPERNODE_OUTCOME=refused-key
            elif grep -qiE "handshake failed|certificate_verify_failed|peer name|ssl_error" <<<"$text"; then
                SUPERNODE_OUTCOME=refused-tls
            else
                SUPERNODE_OUTCOME="exited:$status"
            fi
            return 0
        fi
        if ((SECONDS >= deadline)); then
            SUPERNODE_OUTCOME=timeout
            return 0
        fi
        sleep 0.2
    done
}

# wait_for_log_line PID LOG OFFSET TEXT TIMEOUT_S: wait until LOG shows TEXT after
# OFFSET; fail when PID exits first or the time is up.
wait_for_log_line() {
    local pid="$1" log="$2" offset="$3" text="$4" deadline=$((SECONDS + $5))
    while ! log_since "$log" "$offset" | grep -qF -- "$text"; do
        is_alive "$pid" || return 1
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# probe_tcp HOST:PORT: something accepts a TCP connection there (within 3 s).
probe_tcp() {
    local host="${1%:*}" port="${1##*:}"
    host="${host#[}"
    host="${host%]}"
    timeout 3 bash -c ': <"/dev/tcp/$0/$1"' "$host" "$port" 2>/dev/null
}
