#!/bin/sh
# Apply one variant of 001_nginx_workers: ./apply.sh VARIANT (smart.py runs it in this folder).
#
# nginx.conf is changed only through the root-owned helper deploy/smart-nginx, which sudo lets
# the `smart` user run with exactly these arguments: deploy/install.sh lists in
# /etc/sudoers.d/smart-server the vectors meta.json declares ("helper" and each variant's "set"),
# and these are the same.  The helper edits worker_processes in nginx.conf, runs `nginx -t`,
# reloads, and puts the old file back on any failure; revert.sh resets it.
#
# SMART_NGINX_HELPER replaces the command (tests point it at a helper installed in a temporary
# prefix).  It only chooses what this script, running as the `smart` user, executes: it gives
# no rights that user does not already have.
set -eu
helper=${SMART_NGINX_HELPER:-"sudo -n /usr/local/sbin/smart-nginx"}

case "${1:-}" in
    baseline)     exit 0 ;;                                  # nginx as it is now
    workers_auto) exec $helper set worker_processes auto ;;  # one worker per CPU
    workers_2)    exec $helper set worker_processes 2 ;;
    *)
        echo "apply.sh: unknown variant '${1:-}'; expected baseline, workers_auto or workers_2" >&2
        exit 2 ;;
esac
