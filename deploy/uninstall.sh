#!/usr/bin/env bash
# deploy/uninstall.sh - remove what deploy/install.sh installed (DEPLOYMENT.md).
#
# Before anything is removed the timer and a running experiment are stopped: the service under
# systemd, and a run started by hand or by cron (the pid in var/lock) by SIGTERM; a stopped run
# reverts what it applied, and uninstall waits for it (--wait S, default 90 s, as the unit's
# TimeoutStopSec).  A run that does not end in that time stops the uninstall, --force or not: the
# helper is never removed under a live run.  Then `smart.py recover` reverts what an interrupted
# run left applied; if that fails, nothing is removed (--force removes anyway).  A variant that an
# experiment *kept* stays applied: it was an improvement.  What the helpers need to reset it
# (/var/lib/smart-nginx with the nginx.conf from before it, /var/lib/smart-php) is kept unless
# --purge.  The probes' snippet goes, and nginx.conf's access_log loses its if=$smart_visitor.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: deploy/uninstall.sh [--dry-run] [--purge] [--force] [--wait S] [--prefix DIR]

Remove what deploy/install.sh installed: the units, the sudoers drop-in, the helpers, the nginx
site, the probes' snippet (and nginx.conf's if=$smart_visitor) and the code in /opt/smart.  Kept:
/opt/smart/var, smart.conf, your own experiments and the helpers' state (the nginx.conf from before
a kept variant).  A live run is stopped first (SIGTERM: it reverts) and waited for.

options:
  --dry-run      print each action; change nothing (no root needed)
  --purge        also remove /opt/smart/var, smart.conf, the helpers' state and the smart user
  --force        remove even when `smart.py recover` fails (then check nginx.conf yourself);
                 never while a run still holds the lock
  --wait S       seconds to wait for a stopped run to revert and exit (default 90)
  --prefix DIR   the install made with install.sh --prefix DIR
  -h, --help     this help
EOF
}

die() { echo "uninstall.sh: error: $*" >&2; exit 1; }
warn() { echo "uninstall.sh: warning: $*" >&2; }
say() { echo "  $*"; }

PREFIX="" DRY=0 PURGE=0 FORCE=0 WAIT=90
while (($#)); do
    case "$1" in
        --prefix) PREFIX=${2:?--prefix needs a folder}; shift ;;
        --dry-run) DRY=1 ;;
        --purge) PURGE=1 ;;
        --force) FORCE=1 ;;
        --wait) WAIT=${2:?--wait needs a number of seconds}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
[[ $WAIT =~ ^[0-9]{1,5}$ ]] || die "--wait '$WAIT' is not a number of seconds"
if [[ -n $PREFIX ]]; then
    [[ $PREFIX == /* ]] || PREFIX="$(pwd)/$PREFIX"
    PREFIX=${PREFIX%/}
fi
REAL=1; [[ -n $PREFIX ]] && REAL=0
HAVE_SYSTEMD=0; [[ $REAL == 1 && -d /run/systemd/system ]] && HAVE_SYSTEMD=1
if ((REAL)) && ((!DRY)) && [[ $(id -u) != 0 ]]; then
    die "run as root (sudo $0), or --dry-run to see what it would do"
fi

# shellcheck source=deploy/layout.sh
source "$(dirname "${BASH_SOURCE[0]}")/layout.sh"
PYTHON=/usr/bin/python3
if [[ -f $UNITS/smart-experiment.service ]]; then
    PYTHON=$(sed -n 's/^ExecStart=\([^ ]*\) .*/\1/p' "$UNITS/smart-experiment.service" | head -n 1)
fi

act() {   # act DESCRIPTION COMMAND...
    local what=$1; shift
    if ((DRY)); then say "would $what"; else "$@"; say "$what"; fi
}
remove() {   # remove PATH...: each file or link that exists
    local path
    for path in "$@"; do
        if [[ -e $path || -L $path ]]; then act "remove $path" rm -f "$path"; fi
    done
}
remove_dir_if_empty() {
    local dir=$1
    if [[ -d $dir ]] && [[ -z $(ls -A "$dir") ]]; then act "remove $dir" rmdir "$dir"; fi
}

((DRY)) && echo "dry run: nothing below is done"
echo "removing smart.py from ${OPT} ($(((REAL)) && echo "this box" || echo "prefix $PREFIX"))"

# --- 1. stop: the timer, a running experiment (SIGTERM reverts), then recover ------------------
LOCK=$OPT/var/lock
lock_held() {   # a run holds var/lock: smart.py keeps it locked (flock) for as long as it runs
    [[ -f $LOCK ]] && ! flock -n "$LOCK" true 2>/dev/null
}
stop_live_run() {   # a run by hand or by cron: SIGTERM the pid in var/lock, wait until the lock is free
    local pid ends
    pid=$(head -n 1 "$LOCK" | tr -cd '0-9')
    if [[ -z $pid || ! -d /proc/$pid ]]; then
        die "something holds $LOCK but it names no live pid ('$pid'); nothing was removed.
    Find it (fuser -v $LOCK), stop it, and run this again"
    fi
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'smart\.py' ||
        die "pid $pid in $LOCK is not smart.py; nothing was removed.
    Stop the run yourself, then run this again"
    if ((DRY)); then
        say "would stop the live run (pid $pid) with SIGTERM and wait up to $WAIT s for it to revert and exit"
        return 0
    fi
    kill -TERM "$pid"
    say "sent SIGTERM to the live run (pid $pid); waiting up to $WAIT s for it to revert and exit"
    ends=$((SECONDS + WAIT))
    while lock_held && ((SECONDS < ends)); do sleep 0.2; done
    if lock_held; then
        die "the run (pid $pid) still holds $LOCK after $WAIT s; nothing was removed, not even with --force.
    Wait longer (--wait S), or kill it (kill -9 $pid; smart.py recover then reverts), and run this again"
    fi
    say "the run (pid $pid) ended"
}
if ((HAVE_SYSTEMD)); then
    if systemctl list-unit-files smart-experiment.timer >/dev/null 2>&1; then
        act "disable and stop smart-experiment.timer" systemctl disable --now smart-experiment.timer || true
        act "stop smart-experiment.service (a running experiment reverts)" systemctl stop smart-experiment.service || true
    fi
fi
if lock_held; then stop_live_run; fi
if [[ -f $OPT/var/applied.json && -f $OPT/smart.py ]]; then
    recover=("$PYTHON" "$OPT/smart.py" --home "$OPT" recover)
    ((REAL)) && recover=(runuser -u smart -- "${recover[@]}")
    if ((DRY)); then
        say "would revert what an interrupted run left applied: ${recover[*]}"
    elif "${recover[@]}"; then
        say "reverted what an interrupted run left applied"
    elif ((FORCE)); then
        warn "smart.py recover failed; removing anyway (--force): check nginx.conf against $NGINX_HELPER_STATE/nginx.conf.original and the helpers' drop-ins"
    else
        die "smart.py recover failed: a variant may still be applied.  Fix it first (python3 $OPT/smart.py doctor), or rerun with --force"
    fi
fi
# From here on this script holds the lock: a run that cron starts now ends at once (the lock is
# held) instead of applying a variant while the helper goes.
if [[ -f $LOCK ]] && ((!DRY)); then
    exec 9<"$LOCK"
    flock -n 9 || die "a new run took $LOCK meanwhile (cron?); nothing was removed: run this again"
fi

# --- 2. units, sudoers, helper -----------------------------------------------------------------
remove "$UNITS/smart-experiment.timer" "$UNITS/smart-experiment.service"
if ((HAVE_SYSTEMD)); then act "systemctl daemon-reload" systemctl daemon-reload; fi
# The nginx.conf the helper was given (its config says), for the access_log and the probes below.
NGINX_CONF=$NGINX_DIR/nginx.conf
if [[ -f $NGINX_HELPER_CONF ]]; then
    kept_conf=$(sed -n 's/^NGINX_CONF=//p' "$NGINX_HELPER_CONF" | tail -n 1)
    NGINX_CONF=${kept_conf:-$NGINX_CONF}
fi
# The pool drop-in's folder the PHP helper was given, where install.sh put the reload drop-in.
POOL_DIR=$PHP_DIR/pool.d
if [[ -f $PHP_HELPER_CONF ]]; then
    kept_pool=$(sed -n 's/^POOL_DROPIN=//p' "$PHP_HELPER_CONF" | tail -n 1)
    [[ -n $kept_pool ]] && POOL_DIR=$(dirname "$kept_pool")
fi
remove "$POOL_DIR/zz-smart-reload.conf"
remove "$SUDOERS" "$NGINX_HELPER" "$NGINX_HELPER_CONF" "$PHP_HELPER" "$PHP_HELPER_CONF"
remove_dir_if_empty "$(dirname "$NGINX_HELPER_CONF")"
for state in "$NGINX_HELPER_STATE" "$PHP_HELPER_STATE"; do
    if ((PURGE)); then
        if [[ -d $state ]]; then act "remove $state (the helper's state)" rm -rf "$state"; fi
    elif [[ -d $state ]]; then
        say "kept $state (what the helper needs to reset a kept variant; --purge removes it)"
    fi
done

# --- 3. the nginx site and the probes' snippet -------------------------------------------------
site_removed=0
PROBES=$(dirname "$NGINX_CONF")/conf.d/smart-probes.conf
if [[ -f $NGINX_CONF ]] && grep -q 'if=\$smart_visitor' "$NGINX_CONF"; then
    if ((DRY)); then
        say "would take if=\$smart_visitor off $NGINX_CONF's access_log lines"
    else
        out=$(python3 "$(dirname "${BASH_SOURCE[0]}")/install_tool.py" access-log remove "$NGINX_CONF" "$PROBES") ||
            warn "could not take if=\$smart_visitor off $NGINX_CONF's access_log: $out (do it by hand before nginx -t)"
        say "$out in $NGINX_CONF"
    fi
    site_removed=1
fi
if [[ -e $PROBES ]]; then remove "$PROBES"; site_removed=1; fi
for path in "$NGINX_DIR/sites-enabled/smart" "$NGINX_DIR/sites-available/smart" "$NGINX_DIR/conf.d/smart.conf" \
            "$NGINX_DIR/sites-available/smart.dist" "$NGINX_DIR/conf.d/smart.conf.dist"; do
    if [[ -e $path || -L $path ]]; then remove "$path"; site_removed=1; fi
done
if ((REAL)) && ((site_removed)) && ((!DRY)); then
    if nginx -t >/dev/null 2>&1; then
        if ((HAVE_SYSTEMD)) && systemctl is-active --quiet nginx; then
            systemctl reload nginx && say "nginx reloaded"
        elif pgrep -x nginx >/dev/null 2>&1; then
            nginx -s reload 2>/dev/null && say "nginx reloaded"
        fi
    else
        warn "nginx -t fails after removing the site; see: nginx -t"
    fi
fi

# --- 4. /opt/smart: the code goes; var/, smart.conf and your own experiments stay -----------------
if [[ -d $OPT ]]; then
    if ((PURGE)); then
        act "remove $OPT (with var/ and smart.conf)" rm -rf "$OPT"
    else
        remove "$OPT/smart.py" "$OPT/smart.conf.example" "$OPT/DEPLOYMENT.md"
        if [[ -d $OPT/www ]]; then act "remove $OPT/www" rm -rf "$OPT/www"; fi
        remove "$OPT/docs/SPEC.md"
        [[ -d $OPT/docs ]] && remove_dir_if_empty "$OPT/docs"
        # Shipped experiment files go unless you edited them (the manifest has their hashes).
        if [[ -f $OPT/.shipped ]]; then
            while read -r hash rel; do
                case "$rel" in experiments/*) ;; *) continue ;; esac
                file=$OPT/$rel
                [[ -f $file ]] || continue
                if [[ $(sha256sum "$file" | cut -d' ' -f1) == "$hash" ]]; then
                    remove "$file"
                else
                    say "kept $file (you changed it)"
                fi
                remove "$file.dist"
            done <"$OPT/.shipped"
            remove "$OPT/.shipped"
        fi
        if [[ -d $OPT/experiments ]]; then
            for dir in "$OPT"/experiments/*/; do [[ -d $dir ]] && remove_dir_if_empty "${dir%/}"; done
            remove_dir_if_empty "$OPT/experiments"
        fi
        say "kept $OPT/var and $OPT/smart.conf (--purge removes them)"
    fi
fi

# --- 5. the user -------------------------------------------------------------------------------
if ((REAL)) && ((PURGE)) && getent passwd smart >/dev/null; then
    act "remove user smart" userdel smart
fi

echo
if ((DRY)); then echo "dry run: nothing was changed"; else echo "smart.py is removed"; fi
exit 0
