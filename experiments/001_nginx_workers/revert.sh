#!/bin/sh
# Revert 001_nginx_workers: put back the nginx.conf the helper saved before its edit, test, reload.
# Safe to run when nothing is applied (the helper then says so and exits 0).  See apply.sh.
set -eu
helper=${SMART_NGINX_HELPER:-"sudo -n /usr/local/sbin/smart-nginx"}
exec $helper restore
