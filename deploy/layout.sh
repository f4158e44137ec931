# deploy/layout.sh - where install.sh puts everything and uninstall.sh removes it, below $PREFIX
# (empty on a real box).  Sourced by both, so the two never disagree.
OPT=$PREFIX/opt/smart
UNITS=$PREFIX/etc/systemd/system
SUDOERS=$PREFIX/etc/sudoers.d/smart-server
NGINX_HELPER=$PREFIX/usr/local/sbin/smart-nginx
NGINX_HELPER_CONF=$PREFIX/etc/smart/nginx-helper.conf
NGINX_HELPER_STATE=$PREFIX/var/lib/smart-nginx
PHP_HELPER=$PREFIX/usr/local/sbin/smart-php
PHP_HELPER_CONF=$PREFIX/etc/smart/php-helper.conf
PHP_HELPER_STATE=$PREFIX/var/lib/smart-php
NGINX_DIR=$PREFIX/etc/nginx
NGINX_CACHE_DIR=$PREFIX/var/cache/nginx/smart-micro
NGINX_LOG_DIR=$PREFIX/var/log/nginx
PHP_DIR=$PREFIX/etc/php/8.2/fpm
