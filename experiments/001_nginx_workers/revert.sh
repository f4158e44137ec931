#!/bin/sh
# Revert 001_nginx_workers: worker_processes back to what nginx.conf said before the helper changed
# it (byte for byte), nginx -t, reload.  Safe to run when nothing is applied (the helper then says
# so and exits 0).  See apply.sh.
set -eu
helper=${SMART_NGINX_HELPER:-"sudo -n /usr/local/sbin/smart-nginx"}
exec $helper reset worker_processes
