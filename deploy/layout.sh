# deploy/layout.sh - where install.sh puts everything and uninstall.sh removes it, below $PREFIX
# (empty on a real box).  Sourced by both, so the two never disagree.
OPT=$PREFIX/opt/smart
UNITS=$PREFIX/etc/systemd/system
SUDOERS=$PREFIX/etc/sudoers.d/smart-server
HELPER=$PREFIX/usr/local/sbin/smart-nginx
HELPER_CONF=$PREFIX/etc/smart/nginx-helper.conf
HELPER_STATE=$PREFIX/var/lib/smart-nginx
NGINX_DIR=$PREFIX/etc/nginx
