#!/usr/bin/env bash
# deploy/install.sh - install or upgrade smart.py on a Debian/Ubuntu box (DEPLOYMENT.md).
#
#   sudo deploy/install.sh [--server-name NAME] [--port N]      install, or upgrade in place
#   deploy/install.sh --dry-run                                  print each action, change nothing
#   deploy/install.sh --prefix DIR [--nginx-conf FILE]           everything under DIR (tests)
#   sudo deploy/install.sh --firewall [--ssh-port N]             also: ufw allows only SSH, 80, 443
#
# Idempotent: a second run changes nothing and says so; an upgrade replaces the code (smart.py,
# www/, the shipped experiments, units, helpers, sudoers, site) and keeps what is yours:
# smart.conf is written once and never overwritten, var/ is never touched, a shipped experiment
# file you edited is kept (the new version lands beside it as FILE.dist), and the helpers' configs
# /etc/smart/nginx-helper.conf and php-helper.conf are kept unless one of their options is given.
# The sudoers drop-in is generated from what the installed experiments declare (meta.json
# "helper" and "set"): run install.sh again after adding an experiment.
#
# With --prefix DIR every path lives under DIR (DIR/opt/smart, DIR/etc/..., DIR/usr/local/sbin)
# and the installed files name those paths (the helper's fixed config path included); no user is
# created, nothing is chowned to smart, systemctl and the real nginx are left alone.
set -euo pipefail
umask 022

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'
options:
  --prefix DIR        install under DIR (no user, no systemctl, no chown; for tests)
  --dry-run           print what would be done; change nothing
  --server-name NAME  the dashboard's nginx server_name (default: hostname -f)
  --port N            the dashboard's port (default 80)
  --python PATH       the python3 (3.11+) the service runs (default /usr/bin/python3)
  --nginx-conf FILE   the nginx.conf the helper edits (default /etc/nginx/nginx.conf)
  --nginx-bin FILE    the nginx binary the helper runs (default: nginx on PATH, else /usr/sbin/nginx)
  --reload MODE       how the helper reloads nginx: auto (systemctl when systemd runs nginx,
                      else nginx -s reload), systemd or signal (default auto)
  --nginx-dropin FILE the helper's http-context drop-in (default: conf.d/zz-smart-tuning.conf
                      beside nginx.conf)
  --nginx-cache-dir DIR  the micro-cache's folder (default /var/cache/nginx/smart-micro)
  --php-fpm-conf FILE the php-fpm.conf smart-php tests (default /etc/php/8.2/fpm/php-fpm.conf)
  --php-fpm-bin FILE  the php-fpm binary (default /usr/sbin/php-fpm8.2)
  --php-pool NAME     the pool smart-php tunes (default www)
  --php-pool-dropin FILE  its pool drop-in (default pool.d/zz-smart.conf beside php-fpm.conf)
  --php-ini-dropin FILE   its ini drop-in (default conf.d/99-smart.ini beside php-fpm.conf)
  --php-pid-file FILE the master's pid file (default: php-fpm.conf's pid =)
  --php-reload MODE   how smart-php reloads: auto (systemctl reload php8.2-fpm when systemd
                      runs it, else SIGUSR2 to the master), systemd or signal (default auto)
  --no-start          install but do not enable the timer
  --firewall          also apply the firewall with ufw: allow the SSH port in use, 80/tcp and
                      443/tcp (and --port N), deny all other incoming, allow outgoing, enable
  --ssh-port N        the SSH port to keep open (repeatable); default: detected from sshd -T,
                      else /etc/ssh/sshd_config, else $SSH_CONNECTION; refused when unknown
EOF
}

die() { echo "install.sh: error: $*" >&2; exit 1; }
warn() { echo "install.sh: warning: $*" >&2; WARNINGS=$((WARNINGS + 1)); }
say() { echo "  $*"; }

PREFIX="" DRY=0 SERVER_NAME="" PORT=80 PYTHON=/usr/bin/python3 NO_START=0
NGINX_CONF="" NGINX_BIN="" RELOAD="" NGINX_DROPIN="" CACHE_DIR="" NGINX_CONF_GIVEN=0 WARNINGS=0 PORT_FLAG=0
FPM_CONF="" FPM_BIN="" POOL="" POOL_DROPIN="" INI_DROPIN="" PID_FILE="" PHP_RELOAD="" PHP_CONF_GIVEN=0
FIREWALL=0 SSH_PORTS=()
while (($#)); do
    case "$1" in
        --prefix) PREFIX=${2:?--prefix needs a folder}; shift ;;
        --dry-run) DRY=1 ;;
        --server-name) SERVER_NAME=${2:?--server-name needs a name}; shift ;;
        --port) PORT=${2:?--port needs a number}; PORT_FLAG=1; shift ;;
        --python) PYTHON=${2:?--python needs a path}; shift ;;
        --nginx-conf) NGINX_CONF=${2:?--nginx-conf needs a file}; NGINX_CONF_GIVEN=1; shift ;;
        --nginx-bin) NGINX_BIN=${2:?--nginx-bin needs a file}; NGINX_CONF_GIVEN=1; shift ;;
        --reload) RELOAD=${2:?--reload needs auto, systemd or signal}; NGINX_CONF_GIVEN=1; shift ;;
        --nginx-dropin) NGINX_DROPIN=${2:?--nginx-dropin needs a file}; NGINX_CONF_GIVEN=1; shift ;;
        --nginx-cache-dir) CACHE_DIR=${2:?--nginx-cache-dir needs a folder}; NGINX_CONF_GIVEN=1; shift ;;
        --php-fpm-conf) FPM_CONF=${2:?--php-fpm-conf needs a file}; PHP_CONF_GIVEN=1; shift ;;
        --php-fpm-bin) FPM_BIN=${2:?--php-fpm-bin needs a file}; PHP_CONF_GIVEN=1; shift ;;
        --php-pool) POOL=${2:?--php-pool needs a name}; PHP_CONF_GIVEN=1; shift ;;
        --php-pool-dropin) POOL_DROPIN=${2:?--php-pool-dropin needs a file}; PHP_CONF_GIVEN=1; shift ;;
        --php-ini-dropin) INI_DROPIN=${2:?--php-ini-dropin needs a file}; PHP_CONF_GIVEN=1; shift ;;
        --php-pid-file) PID_FILE=${2:?--php-pid-file needs a file}; PHP_CONF_GIVEN=1; shift ;;
        --php-reload) PHP_RELOAD=${2:?--php-reload needs auto, systemd or signal}; PHP_CONF_GIVEN=1; shift ;;
        --no-start) NO_START=1 ;;
        --firewall) FIREWALL=1 ;;
        --ssh-port) SSH_PORTS+=("${2:?--ssh-port needs a port number}"); shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
    shift
done

SAFE_PATH='^/[A-Za-z0-9._/+-]*$'
if [[ -n $PREFIX ]]; then
    [[ $PREFIX == /* ]] || PREFIX="$(pwd)/$PREFIX"
    PREFIX=${PREFIX%/}
    [[ $PREFIX =~ $SAFE_PATH ]] || die "--prefix '$PREFIX': use a path of letters, digits and ._/+- only"
fi
for path in "$PYTHON" "${NGINX_CONF:-/x}" "${NGINX_BIN:-/x}" "${NGINX_DROPIN:-/x}" "${CACHE_DIR:-/x}" \
            "${FPM_CONF:-/x}" "${FPM_BIN:-/x}" "${POOL_DROPIN:-/x}" "${INI_DROPIN:-/x}" "${PID_FILE:-/x}"; do
    [[ $path =~ $SAFE_PATH ]] || die "'$path': use an absolute path of letters, digits and ._/+- only"
done
[[ $PORT =~ ^[1-9][0-9]{0,4}$ ]] && ((PORT <= 65535)) || die "--port '$PORT' is not a port number"
[[ -z $RELOAD || $RELOAD =~ ^(auto|systemd|signal)$ ]] || die "--reload must be auto, systemd or signal"
[[ -z $PHP_RELOAD || $PHP_RELOAD =~ ^(auto|systemd|signal)$ ]] || die "--php-reload must be auto, systemd or signal"
[[ -z $POOL || $POOL =~ ^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$ ]] || die "--php-pool '$POOL': letters, digits and ._@- only"
for port in ${SSH_PORTS[@]+"${SSH_PORTS[@]}"}; do
    [[ $port =~ ^[1-9][0-9]{0,4}$ ]] && ((port <= 65535)) || die "--ssh-port '$port' is not a port number"
done
((${#SSH_PORTS[@]} == 0 || FIREWALL)) || die "--ssh-port only matters with --firewall"

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ -f $SRC/smart.py && -d $SRC/deploy && -d $SRC/experiments ]] ||
    die "$SRC does not look like the smart.py repository (smart.py, deploy/, experiments/)"

# Where everything goes (the real paths are the ones the units, sudoers and site name).
# shellcheck source=deploy/layout.sh
source "$(dirname "${BASH_SOURCE[0]}")/layout.sh"
[[ -n $NGINX_CONF ]] || NGINX_CONF=$NGINX_DIR/nginx.conf
[[ -n $NGINX_BIN ]] || NGINX_BIN=$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)
[[ -n $RELOAD ]] || RELOAD=auto
[[ -n $NGINX_DROPIN ]] || NGINX_DROPIN=$(dirname "$NGINX_CONF")/conf.d/zz-smart-tuning.conf
[[ -n $CACHE_DIR ]] || CACHE_DIR=$NGINX_CACHE_DIR
[[ -n $FPM_CONF ]] || FPM_CONF=$PHP_DIR/php-fpm.conf
[[ -n $FPM_BIN ]] || FPM_BIN=$(command -v php-fpm8.2 2>/dev/null || echo /usr/sbin/php-fpm8.2)
[[ -n $POOL ]] || POOL=www
[[ -n $POOL_DROPIN ]] || POOL_DROPIN=$(dirname "$FPM_CONF")/pool.d/zz-smart.conf
[[ -n $INI_DROPIN ]] || INI_DROPIN=$(dirname "$FPM_CONF")/conf.d/99-smart.ini
[[ -n $PHP_RELOAD ]] || PHP_RELOAD=auto
if [[ -z $PREFIX && ! -d $NGINX_DIR/sites-available && -d $NGINX_DIR/conf.d ]]; then
    SITE=$NGINX_DIR/conf.d/smart.conf SITE_LINK=""            # upstream nginx packages: conf.d only
else
    SITE=$NGINX_DIR/sites-available/smart SITE_LINK=$NGINX_DIR/sites-enabled/smart
fi
# An upgrade keeps the server name and port the installed site has, unless told otherwise.
if [[ -f $SITE ]]; then
    [[ -n $SERVER_NAME ]] || SERVER_NAME=$(awk '$1 == "server_name" { sub(";", "", $2); print $2; exit }' "$SITE")
    if [[ $PORT_FLAG == 0 ]]; then
        old_port=$(awk '$1 == "listen" && $2 ~ /^[0-9]+;$/ { sub(";", "", $2); print $2; exit }' "$SITE")
        [[ -z $old_port ]] || PORT=$old_port
    fi
fi
[[ -n $SERVER_NAME ]] || SERVER_NAME=$(hostname -f 2>/dev/null || hostname 2>/dev/null || echo _)
[[ $SERVER_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "server name '$SERVER_NAME': letters, digits, . _ - only"
REAL=1; [[ -n $PREFIX ]] && REAL=0
HAVE_SYSTEMD=0; [[ $REAL == 1 && -d /run/systemd/system ]] && HAVE_SYSTEMD=1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/smart-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- checks before anything changes ---------------------------------------------------------
if ((REAL)) && ((!DRY)) && [[ $(id -u) != 0 ]]; then
    die "run as root (sudo $0 ...), or use --dry-run to see what it would do, or --prefix DIR"
fi
if [[ -x $PYTHON ]]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        { ((REAL)) && die "$PYTHON is older than 3.11; install python3.11+ and pass --python PATH"; warn "$PYTHON is older than 3.11"; }
else
    ((REAL)) && die "$PYTHON not found; apt-get install -y python3 (3.11+), or pass --python PATH"
    warn "$PYTHON not found"
fi
NGINX_OK=1
[[ -x $NGINX_BIN ]] || NGINX_OK=0
if ((REAL)) && ((!NGINX_OK)); then die "nginx not found; apt-get install -y nginx"; fi
VISUDO=$(command -v visudo 2>/dev/null || true)
TOOL_PYTHON=$PYTHON; [[ -x $TOOL_PYTHON ]] || TOOL_PYTHON=$(command -v python3 || echo /usr/bin/python3)
if ((REAL)) && [[ -z $VISUDO ]]; then die "visudo not found (package sudo); apt-get install -y sudo"; fi

# The firewall (--firewall): which SSH port(s) must stay open, decided before anything changes.
# Under --prefix the box is simulated: sshd_config is read from DIR/etc/ssh, sshd -T is not asked
# (it reads the real config), and no ufw command runs.
port_list() { tr -s ' ' '\n' | grep -E '^[1-9][0-9]{0,4}$' | sort -nu | tr '\n' ' ' | sed 's/ $//'; }
sshd_config_ports() {   # sshd_config_ports FILE: its Port lines (and Include'd files'), or "22" when none
    local file=$1 found="" line word value inc pattern patterns
    [[ -r $file ]] || return 1
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%%#*}
        read -r word value _ <<<"$line" || true
        case ${word,,} in
            port) found+=" $value" ;;
            listenaddress) [[ $value =~ :([0-9]+)$ ]] && found+=" ${BASH_REMATCH[1]}" ;;
            include)     # Include PATTERN...: relative to /etc/ssh; the ports of every file add up
                read -ra patterns <<<"$line"
                for pattern in "${patterns[@]:1}"; do
                    [[ $pattern == /* ]] || pattern=/etc/ssh/$pattern
                    for inc in $PREFIX$pattern; do      # unquoted: the glob expands here
                        [[ -f $inc ]] && found+=" $(sshd_config_ports "$inc" nodefault || true)"
                    done
                done ;;
            match) break ;;      # Port may not appear in a Match block
        esac
    done <"$file"
    found=$(port_list <<<"$found")
    if [[ -z $found && -z ${2:-} ]]; then found=22; fi    # sshd's default
    echo "$found"
}
detect_ssh_ports() {   # prints "PORTS<TAB>how found", or nothing when it cannot tell
    local sshd out ports
    if [[ -z $PREFIX ]]; then
        sshd=$(command -v sshd 2>/dev/null || true)
        [[ -n $sshd || ! -x /usr/sbin/sshd ]] || sshd=/usr/sbin/sshd
        if [[ -n $sshd ]] && out=$("$sshd" -T 2>/dev/null); then
            ports=$(awk '$1 == "port" { print $2 } $1 == "listenaddress" { n = split($2, a, ":"); print a[n] }' <<<"$out" | port_list)
            [[ -z $ports ]] || { printf '%s\t%s\n' "$ports" "sshd -T"; return 0; }
        fi
    fi
    if ports=$(sshd_config_ports "$PREFIX/etc/ssh/sshd_config") && [[ -n $ports ]]; then
        printf '%s\t%s\n' "$ports" "$PREFIX/etc/ssh/sshd_config"; return 0
    fi
    if [[ -n ${SSH_CONNECTION:-} ]]; then
        read -r _ _ _ ports _ <<<"$SSH_CONNECTION"
        ports=$(port_list <<<"${ports:-}")
        [[ -z $ports ]] || { printf '%s\t%s\n' "$ports" "\$SSH_CONNECTION"; return 0; }
    fi
    return 0
}
UFW_CMDS=()
if ((FIREWALL)); then
    if ((${#SSH_PORTS[@]})); then
        FW_SSH=$(port_list <<<"${SSH_PORTS[*]}") FW_HOW="--ssh-port"
    else
        IFS=$'\t' read -r FW_SSH FW_HOW < <(detect_ssh_ports) || true
        [[ -n ${FW_SSH:-} ]] || die "--firewall: cannot tell which port SSH listens on (no sshd -T, no
    $PREFIX/etc/ssh/sshd_config, no \$SSH_CONNECTION); enabling ufw could lock you out.
    Pass the port you log in on: --firewall --ssh-port 22 (repeat it for several ports)"
    fi
    # The session this runs in must survive, whatever the config says (a changed Port not yet
    # restarted, a port-forward): its server port is kept open too.
    if [[ -n ${SSH_CONNECTION:-} ]]; then
        read -r _ _ _ live _ <<<"$SSH_CONNECTION"
        if [[ ${live:-} =~ ^[1-9][0-9]{0,4}$ && " $FW_SSH " != *" $live "* ]]; then
            FW_SSH=$(port_list <<<"$FW_SSH $live")
            FW_HOW+=", and $live from \$SSH_CONNECTION (this session)"
        fi
    fi
    FW_WEB="80 443"
    [[ " $FW_WEB " == *" $PORT "* ]] || FW_WEB+=" $PORT"       # the dashboard on --port N
    for port in $FW_SSH; do UFW_CMDS+=("ufw allow $port/tcp"); done
    for port in $FW_WEB; do UFW_CMDS+=("ufw allow $port/tcp"); done
    UFW_CMDS+=("ufw default deny incoming" "ufw default allow outgoing" "ufw --force enable")
    UFW=$(command -v ufw 2>/dev/null || true)
    [[ -n $UFW || ! -x /usr/sbin/ufw ]] || UFW=/usr/sbin/ufw
    if ((REAL)) && ((!DRY)); then
        [[ -n $UFW ]] || die "--firewall: ufw is not installed; apt-get install -y ufw (then run this again)"
        # A deny or reject rule (from anywhere) already added for an SSH port would match before
        # the allow added here: ufw takes the first rule that matches.
        added=$("$UFW" show added 2>/dev/null || true)
        for port in $FW_SSH; do
            names="$port|$port/tcp"
            ((port != 22)) || names+="|ssh|ssh/tcp|OpenSSH"
            blocking=$(grep -E "^ufw (deny|reject)( in)? " <<<"$added" | grep -Ev " from " |
                       grep -E " ($names)( |$)" || true)
            blocking+=$(grep -E "^ufw (deny|reject)( in)? .*from any " <<<"$added" | grep -E " ($names)( |$)" || true)
            [[ -z $blocking ]] || die "--firewall: ufw already has a rule that would block SSH port $port:
$blocking
    remove it first (sudo ufw status numbered; sudo ufw delete N), then run this again"
        done
    elif ((REAL)) && [[ -z $UFW ]]; then
        warn "--firewall: ufw is not installed; apt-get install -y ufw before the real run"
    fi
fi

if ((DRY)); then echo "dry run: nothing below is done"; fi
echo "installing smart.py into ${OPT} ($(((REAL)) && echo "this box" || echo "prefix $PREFIX"))"

# --- helpers --------------------------------------------------------------------------------
act() {   # act DESCRIPTION COMMAND...: run it (or, in a dry run, say it would)
    local what=$1; shift
    if ((DRY)); then say "would $what"; else "$@"; say "$what"; fi
}
ensure_dir() {   # ensure_dir DIR MODE: create a system folder when missing (an existing one is left as it is)
    local dir=$1 mode=$2
    if [[ ! -d $dir ]]; then
        act "create $dir" install -d -m "$mode" "$dir"
    fi
}
own_dir() {   # own_dir DIR MODE OWNER:GROUP: one of our folders: create it, and keep its mode and owner right
    local dir=$1 mode=$2 owner=$3
    ensure_dir "$dir" "$mode"
    ((DRY)) && return 0
    chmod "$mode" "$dir"
    if ((REAL)); then chown "$owner" "$dir"; fi
}
put() {   # put SRC DEST MODE [OWNER:GROUP]: install when missing or different
    local src=$1 dest=$2 mode=$3 owner=${4:-root:root}
    if [[ -f $dest && ! -L $dest ]] && cmp -s "$src" "$dest"; then
        say "unchanged $dest"
    else
        act "$([[ -e $dest ]] && echo update || echo install) $dest" install -m "$mode" "$src" "$dest"
    fi
    ((DRY)) && return 0
    chmod "$mode" "$dest"
    if ((REAL)); then chown "$owner" "$dest"; fi
}
sha() { sha256sum "$1" | cut -d' ' -f1; }
MANIFEST=$OPT/.shipped
NEW_MANIFEST=$WORK/shipped
: >"$NEW_MANIFEST"
shipped_hash() { [[ -f $MANIFEST ]] && awk -v f="$1" '$2 == f { print $1 }' "$MANIFEST" || true; }
conffile() {   # conffile SRC DEST MODE REL: update only when you have not edited it since the last install
    local src=$1 dest=$2 mode=$3 rel=$4 old
    old=$(shipped_hash "$rel")
    if [[ -e $dest ]] && ! cmp -s "$src" "$dest" && [[ $(sha "$dest") != "$old" ]]; then
        warn "kept $dest: you changed it; the new version is $dest.dist (compare and merge)"
        put "$src" "$dest.dist" 0644
        echo "${old:-edited} $rel" >>"$NEW_MANIFEST"
    else
        put "$src" "$dest" "$mode"
        echo "$(sha "$src") $rel" >>"$NEW_MANIFEST"
    fi
}
render() {   # render SRC NAME: a copy of SRC in $WORK with the real paths replaced by the prefixed ones
    local out=$WORK/$2
    sed -e "s#/opt/smart#$OPT#g" \
        -e "s#/usr/local/sbin/smart-nginx#$NGINX_HELPER#g" \
        -e "s#/etc/smart/nginx-helper.conf#$NGINX_HELPER_CONF#g" \
        -e "s#/usr/local/sbin/smart-php#$PHP_HELPER#g" \
        -e "s#/etc/smart/php-helper.conf#$PHP_HELPER_CONF#g" \
        "$1" >"$out"
    echo "$out"
}

# --- 1. the smart user ----------------------------------------------------------------------
if ((REAL)); then
    if getent passwd smart >/dev/null; then
        say "unchanged user smart"
    else
        act "create system user smart (home /opt/smart, no login shell)" \
            useradd --system --user-group --home-dir /opt/smart --no-create-home \
            --shell /usr/sbin/nologin --comment "smart.py experiment agent" smart
    fi
fi

# --- 2. /opt/smart: code root-owned and read-only to smart; var/ smart's ------------------------
own_dir "$OPT" 0755 root:root
put "$SRC/smart.py" "$OPT/smart.py" 0755
[[ -f $SRC/DEPLOYMENT.md ]] && put "$SRC/DEPLOYMENT.md" "$OPT/DEPLOYMENT.md" 0644
if [[ -f $SRC/docs/SPEC.md ]]; then            # the contract, beside the code it describes
    own_dir "$OPT/docs" 0755 root:root
    put "$SRC/docs/SPEC.md" "$OPT/docs/SPEC.md" 0644
fi
own_dir "$OPT/www" 0755 root:root
found_www=0
for file in "$SRC"/www/*; do
    [[ -f $file ]] || continue
    found_www=1
    put "$file" "$OPT/www/$(basename "$file")" 0644
done
((found_www)) || warn "$SRC/www/ has no files: the dashboard page (www/index.html) is missing"
own_dir "$OPT/experiments" 0755 root:root
for dir in "$SRC"/experiments/*/; do
    name=$(basename "$dir")
    own_dir "$OPT/experiments/$name" 0755 root:root
    for file in "$dir"*; do
        [[ -f $file ]] || continue
        mode=0644; [[ -x $file ]] && mode=0755
        conffile "$file" "$OPT/experiments/$name/$(basename "$file")" "$mode" "experiments/$name/$(basename "$file")"
    done
done
put "$SRC/deploy/smart.conf.example" "$OPT/smart.conf.example" 0644
if [[ -e $OPT/smart.conf ]]; then
    say "kept $OPT/smart.conf (never overwritten; see smart.conf.example for what is new)"
    if ((REAL)) && ((!DRY)); then chown root:smart "$OPT/smart.conf"; chmod 0640 "$OPT/smart.conf"; fi
else
    put "$SRC/deploy/smart.conf.example" "$OPT/smart.conf" 0640 root:smart
fi
own_dir "$OPT/var" 0755 smart:smart
# a run started by hand as root leaves root-owned files the service cannot replace
((REAL)) && ((!DRY)) && chown -R smart:smart "$OPT/var"

# --- 3. the helpers, their root-owned configs, and their state folders ---------------------
ensure_dir "$(dirname "$NGINX_HELPER")" 0755
own_dir "$(dirname "$NGINX_HELPER_CONF")" 0755 root:root
install_helper() {   # install_helper NAME DEST CONF: the helper with its fixed CONFIG line pointing at CONF
    local name=$1 dest=$2 conf=$3
    sed "s#^CONFIG = \"/etc/smart/$name-helper.conf\"\$#CONFIG = \"$conf\"#" \
        "$SRC/deploy/smart-$name" >"$WORK/smart-$name"
    grep -qx "CONFIG = \"$conf\"" "$WORK/smart-$name" ||
        die "deploy/smart-$name has no line CONFIG = \"/etc/smart/$name-helper.conf\" to point at $conf"
    put "$WORK/smart-$name" "$dest" 0755
}
helper_conf() {   # helper_conf RENDERED DEST GIVEN OPTIONS: write the config, or keep the one there
    local rendered=$1 dest=$2 given=$3 options=$4
    if [[ -e $dest ]] && ((!given)); then
        say "kept $dest (pass $options to rewrite it)"
        ((DRY)) || { chmod 0644 "$dest"; ((REAL)) && chown root:root "$dest"; true; }
    else
        put "$rendered" "$dest" 0644
    fi
}
install_helper nginx "$NGINX_HELPER" "$NGINX_HELPER_CONF"
cat >"$WORK/nginx-helper.conf" <<EOF
# $NGINX_HELPER_CONF - read by $NGINX_HELPER (which runs as root) and by nobody's
# environment: the helper's path to this file is fixed in the helper itself.  Root-owned, not
# writable by anyone else (the helper refuses to run otherwise).  Written by deploy/install.sh.
#
# The nginx.conf whose main and events settings (worker_processes, worker_connections) the helper
# edits in place, and whose nginx -t it runs:
NGINX_CONF=$NGINX_CONF
# The nginx binary that tests (nginx -t) and, with RELOAD=signal, reloads:
NGINX_BIN=$NGINX_BIN
# How to reload: systemd (systemctl reload nginx), signal (nginx -s reload -c NGINX_CONF), or
# auto (systemd when systemd is running and nginx is active under it, else signal):
RELOAD=$RELOAD
# The one http-context file of the helper's own (open_file_cache, microcache, ssl_session_*); it
# must be included by nginx.conf's http block (Debian's include /etc/nginx/conf.d/*.conf is):
DROPIN=$NGINX_DROPIN
# The micro-cache's folder (created root-owned when missing; nginx gives it to its worker user):
CACHE_DIR=$CACHE_DIR
# The helper's state, the nginx.conf from before its first edit, and its lock (root, 0700):
STATE_DIR=$NGINX_HELPER_STATE
EOF
helper_conf "$WORK/nginx-helper.conf" "$NGINX_HELPER_CONF" "$NGINX_CONF_GIVEN" \
    "--nginx-conf/--nginx-bin/--reload/--nginx-dropin/--nginx-cache-dir"
if [[ -e $NGINX_HELPER_CONF ]] && ((!NGINX_CONF_GIVEN)); then
    kept_conf=$(sed -n 's/^NGINX_CONF=//p' "$NGINX_HELPER_CONF" | tail -n 1)
    NGINX_CONF=${kept_conf:-$NGINX_CONF}
fi
own_dir "$NGINX_HELPER_STATE" 0700 root:root
[[ -e $NGINX_CONF ]] || warn "$NGINX_CONF does not exist yet: smart-nginx will fail until it does"

install_helper php "$PHP_HELPER" "$PHP_HELPER_CONF"
cat >"$WORK/php-helper.conf" <<EOF
# $PHP_HELPER_CONF - read by $PHP_HELPER (which runs as root) and by nobody's
# environment: the helper's path to this file is fixed in the helper itself.  Root-owned, not
# writable by anyone else (the helper refuses to run otherwise).  Written by deploy/install.sh.
#
# The php-fpm.conf the helper tests (php-fpm -t --fpm-config) and reads (its include= and pid =):
FPM_CONF=$FPM_CONF
# The php-fpm binary:
FPM_BIN=$FPM_BIN
# The pool whose pm.* settings the helper sets, in its own pool drop-in (read after the others):
POOL=$POOL
POOL_DROPIN=$POOL_DROPIN
# Its ini drop-in (opcache.*, realpath_cache_*), in the folder PHP scans for *.ini:
INI_DROPIN=$INI_DROPIN
# The master's pid file (empty: php-fpm.conf's pid =):
PID_FILE=$PID_FILE
# How to reload: systemd (systemctl reload SERVICE), signal (SIGUSR2 to the master), or auto
# (systemd when systemd is running and SERVICE is active under it, else signal):
RELOAD=$PHP_RELOAD
SERVICE=php8.2-fpm
# The helper's state and its lock (root, 0700):
STATE_DIR=$PHP_HELPER_STATE
EOF
helper_conf "$WORK/php-helper.conf" "$PHP_HELPER_CONF" "$PHP_CONF_GIVEN" "--php-fpm-conf and the other --php-* options"
own_dir "$PHP_HELPER_STATE" 0700 root:root

# PHP-FPM's master applies process_control_timeout of the configuration it runs, so a reload from a
# configuration without it (PHP's default 0) kills the workers' requests in flight.  This drop-in,
# read with the pools, makes every reload after the next one wait for them (DEPLOYMENT.md).
RELOAD_DROPIN=$(dirname "$POOL_DROPIN")/zz-smart-reload.conf
if [[ -d $(dirname "$POOL_DROPIN") ]]; then
    cat >"$WORK/zz-smart-reload.conf" <<EOF
; $RELOAD_DROPIN - installed by deploy/install.sh (smart.py); uninstall.sh removes it.
; On a reload (SIGUSR2, systemctl reload) the master lets its workers finish the requests they
; are serving for up to this long instead of killing them (PHP's default is 0).
[global]
process_control_timeout = 10s
EOF
    put "$WORK/zz-smart-reload.conf" "$RELOAD_DROPIN" 0644
    if ((!DRY)) && [[ -x $FPM_BIN && -f $FPM_CONF ]] && ! out=$("$FPM_BIN" -t --fpm-config "$FPM_CONF" 2>&1); then
        rm -f "$RELOAD_DROPIN"
        warn "php-fpm -t failed with $RELOAD_DROPIN; removed it:
$out"
    fi
else
    say "no $(dirname "$POOL_DROPIN"): PHP-FPM's reload drop-in not installed"
fi

# --- 4. sudoers: only the helpers, only the experiments' exact vectors, checked by visudo first -
ensure_dir "$(dirname "$SUDOERS")" 0755
sudoers_src=$WORK/smart-server
experiments=$OPT/experiments
((DRY)) && [[ ! -d $experiments ]] && experiments=$SRC/experiments    # what would be installed
"$TOOL_PYTHON" "$SRC/deploy/install_tool.py" sudoers smart "$experiments" "$NGINX_HELPER" "$PHP_HELPER" \
    >"$sudoers_src" || die "the sudoers drop-in could not be generated (above); the installed one is unchanged"
if [[ -n $VISUDO ]]; then
    "$VISUDO" -cf "$sudoers_src" >/dev/null || die "visudo rejected the sudoers drop-in; nothing installed"
    say "visudo -cf: sudoers drop-in parsed OK"
else
    warn "visudo not found: the sudoers drop-in was not validated (apt-get install -y sudo)"
fi
put "$sudoers_src" "$SUDOERS" 0440

# --- 5. systemd units ----------------------------------------------------------------------
ensure_dir "$UNITS" 0755
service_src=$(render "$SRC/deploy/systemd/smart-experiment.service" smart-experiment.service)
sed -i "s#^ExecStart=/usr/bin/python3 #ExecStart=$PYTHON #" "$service_src"
put "$service_src" "$UNITS/smart-experiment.service" 0644
put "$(render "$SRC/deploy/systemd/smart-experiment.timer" smart-experiment.timer)" \
    "$UNITS/smart-experiment.timer" 0644

# --- 6. the nginx site ---------------------------------------------------------------------
site_src=$(render "$SRC/deploy/nginx/smart.conf" smart-site)
sed -i -e "s#smart\.example\.org#$SERVER_NAME#g" \
       -e "s#^\(    listen \)80;#\1$PORT;#" -e "s#^\(    listen \[::\]:\)80;#\1$PORT;#" "$site_src"
if [[ ! -e /proc/net/if_inet6 ]]; then
    sed -i '/^    listen \[::\]:/d' "$site_src"     # no IPv6 here: nginx could not bind [::]
fi
ensure_dir "$(dirname "$SITE")" 0755
site_before=""
[[ -f $SITE ]] && { site_before=$WORK/site.before; cp "$SITE" "$site_before"; }
conffile "$site_src" "$SITE" 0644 nginx-site     # certbot edits this file: an upgrade keeps its edits
if [[ -n $SITE_LINK ]]; then
    ensure_dir "$(dirname "$SITE_LINK")" 0755
    if [[ -L $SITE_LINK && $(readlink "$SITE_LINK") == "$SITE" ]]; then
        say "unchanged $SITE_LINK -> $SITE"
    else
        act "link $SITE_LINK -> $SITE" ln -sfn "$SITE" "$SITE_LINK"
    fi
fi

# Probes out of the access log: smart.py's requests carry User-Agent: smart.py/VERSION; a conf.d
# snippet maps them to $smart_visitor = 0, nginx.conf's http-level access_log lines get
# if=$smart_visitor, and real traffic also goes to smart-timing.log for later use.
PROBES=$(dirname "$NGINX_CONF")/conf.d/smart-probes.conf
conf_before=""
[[ -f $NGINX_CONF ]] && { conf_before=$WORK/nginx.conf.before; cp -p "$NGINX_CONF" "$conf_before"; }
probes_before=""
[[ -f $PROBES ]] && { probes_before=$WORK/probes.before; cp -p "$PROBES" "$probes_before"; }
if [[ ! -f $NGINX_CONF ]]; then
    warn "no $NGINX_CONF: probes are not kept out of the access log"
elif ((DRY)); then
    say "would make $NGINX_CONF's http-level access_log conditional (if=\$smart_visitor) and install $PROBES"
elif ensure_dir "$(dirname "$PROBES")" 0755 && out=$("$TOOL_PYTHON" "$SRC/deploy/install_tool.py" access-log add "$NGINX_CONF" "$PROBES"); then
    log_dir=$("$TOOL_PYTHON" "$SRC/deploy/install_tool.py" access-log dir "$NGINX_CONF")
    cat >"$WORK/smart-probes.conf" <<EOF
# $PROBES - installed by deploy/install.sh (smart.py); http context.
#
# smart.py's probes send User-Agent: smart.py/VERSION.  \$smart_visitor is 0 for them and 1 for
# everyone else; install.sh made nginx.conf's http-level access_log conditional on it
# (if=\$smart_visitor), so the probes stay out of access.log.  An access_log of your own in a
# server or location block replaces those and logs the probes too, unless you add if=\$smart_visitor.
map \$http_user_agent \$smart_visitor {
    ~^smart\.py/ 0;
    default 1;
}

# Real traffic only, one line a request, for later use: when (epoch), seconds taken, status, the
# request, and the micro-cache's verdict (HIT, MISS, BYPASS...; - where there is no cache).
log_format smart_timing '\$msec \$request_time \$status "\$request_method \$request_uri" \$upstream_cache_status';
access_log ${log_dir:-$NGINX_LOG_DIR}/smart-timing.log smart_timing if=\$smart_visitor;
EOF
    [[ $out == unchanged ]] && say "unchanged $NGINX_CONF (access_log already conditional)" || say "$out in $NGINX_CONF"
    ensure_dir "${log_dir:-$NGINX_LOG_DIR}" 0755
    put "$WORK/smart-probes.conf" "$PROBES" 0644
elif [[ $? == 3 ]]; then
    warn "$out: probes are not kept out of the access log, and smart-nginx's drop-in would not be read"
else
    die "could not make $NGINX_CONF's access_log conditional: $out"
fi
put_nginx_back() {   # the site, the probes snippet and nginx.conf as they were before this run
    if [[ -n $site_before ]]; then cp "$site_before" "$SITE"; else rm -f "$SITE" ${SITE_LINK:+"$SITE_LINK"}; fi
    if [[ -n $probes_before ]]; then cp -p "$probes_before" "$PROBES"; else rm -f "$PROBES"; fi
    [[ -z $conf_before ]] || cp -p "$conf_before" "$NGINX_CONF"
}
reload_nginx() {   # 0 reloaded, 1 the reload failed, 3 nginx is not running
    local out
    if ((HAVE_SYSTEMD)) && systemctl is-active --quiet nginx; then
        out=$(systemctl reload nginx 2>&1) || { echo "$out" >&2; return 1; }
    elif pgrep -x nginx >/dev/null 2>&1; then
        out=$("$NGINX_BIN" -s reload 2>&1) || { echo "$out" >&2; return 1; }
    else
        return 3
    fi
}
if ((REAL)) && ((!DRY)); then
    if ! out=$("$NGINX_BIN" -t 2>&1); then
        put_nginx_back     # leave nginx as it was
        die "nginx -t failed with the dashboard site and the probes' snippet; nginx.conf, the site and the
    snippet were put back as they were:
$out"
    fi
    say "nginx -t: ok"
    status=0; reload_nginx || status=$?
    case $status in
        0) say "nginx reloaded" ;;
        3) if ((HAVE_SYSTEMD)); then warn "nginx is not running; start it: systemctl enable --now nginx"
           else warn "nginx is not running; start it: $NGINX_BIN"; fi ;;
        *) if ((HAVE_SYSTEMD)); then warn "the nginx reload failed: see systemctl status nginx"
           else warn "the nginx reload failed: see $NGINX_BIN -t and nginx's error.log"; fi ;;
    esac
elif ((REAL)); then
    say "would run nginx -t, then reload nginx"
fi

# --- 7. first dashboard files, then the timer ----------------------------------------------
if ((!DRY)); then
    if ((REAL)); then
        runuser -u smart -- "$PYTHON" "$OPT/smart.py" --home "$OPT" dashboard >/dev/null ||
            warn "smart.py dashboard failed: run 'python3 $OPT/smart.py doctor'"
    elif [[ -x $PYTHON ]]; then
        "$PYTHON" "$OPT/smart.py" --home "$OPT" dashboard >/dev/null || warn "smart.py dashboard failed"
    fi
    say "published $OPT/var/history.json"
fi
if ((REAL)); then
    if ((HAVE_SYSTEMD)); then
        act "systemctl daemon-reload" systemctl daemon-reload
        if ((NO_START)); then
            say "timer not enabled (--no-start): systemctl enable --now smart-experiment.timer"
        else
            act "enable and start smart-experiment.timer" systemctl enable --now smart-experiment.timer
        fi
    else
        warn "systemd is not running here: the timer cannot start; run '$PYTHON $OPT/smart.py run' as smart from cron every 30 minutes"
    fi
fi

# --- 8. the firewall (--firewall) -----------------------------------------------------------
if ((FIREWALL)); then
    tcp() { local p out=""; for p in $1; do out+="${out:+, }$p/tcp"; done; echo "$out"; }
    say "firewall: SSH stays open on $(tcp "$FW_SSH") (from $FW_HOW); also allowed: $(tcp "$FW_WEB"); other incoming denied"
    if ((DRY)) || ((!REAL)); then
        ((DRY)) || say "firewall: --prefix leaves this box's firewall alone; the commands would be:"
        for cmd in "${UFW_CMDS[@]}"; do say "would run: $cmd"; done
    else
        for cmd in "${UFW_CMDS[@]}"; do
            read -ra argv <<<"$cmd"
            out=$("$UFW" "${argv[@]:1}" 2>&1) || die "'$cmd' failed; the commands after it were not run:
$out"
            say "ran: $cmd"
        done
        status_out=$("$UFW" status 2>&1 || true)
        for port in $FW_SSH; do
            grep -Eq "^$port/tcp +ALLOW" <<<"$status_out" ||
                warn "ufw status does not list $port/tcp as ALLOW; check 'sudo ufw status verbose' before you log out"
        done
    fi
fi

if ((!DRY)); then
    cp "$NEW_MANIFEST" "$MANIFEST"
    chmod 0644 "$MANIFEST"
fi

# --- which helpers can work here -----------------------------------------------------------
if ((!DRY)); then
    for helper in "$NGINX_HELPER" "$PHP_HELPER"; do
        if out=$("$helper" test 2>&1); then
            say "$(basename "$helper"): usable here ($(tail -n 1 <<<"$out"))"
        else
            say "$(basename "$helper"): not usable here: $(grep -v '^$' <<<"$out" | tail -n 1)"
        fi
    done
fi

# --- done ----------------------------------------------------------------------------------
url="http://$SERVER_NAME/"
[[ $PORT == 80 ]] || url="http://$SERVER_NAME:$PORT/"
echo
if ((DRY)); then echo "dry run: nothing was changed"; else echo "smart.py is installed in $OPT"; fi
echo "  dashboard:  $url"
as_smart=""; ((REAL)) && as_smart="sudo -u smart "
echo "  try a run:  $as_smart$PYTHON $OPT/smart.py run --dry-run"
if ((HAVE_SYSTEMD)); then
    echo "  run now:    sudo systemctl start --no-block smart-experiment; journalctl -fu smart-experiment"
else
    # no systemd here (a container, or --prefix): no timer starts the runs; by hand or from cron
    echo "  run now:    $as_smart$PYTHON $OPT/smart.py run"
    if ((REAL)); then
        echo "  from cron:  echo '*/30 * * * * smart $PYTHON $OPT/smart.py run' | sudo tee /etc/cron.d/smart-experiment"
    else
        echo "  from cron:  crontab -e, then the line: */30 * * * * $PYTHON $OPT/smart.py run"
    fi
fi
((REAL)) && echo "  check:      sudo $PYTHON $OPT/smart.py doctor"
((WARNINGS == 0)) || echo "  $WARNINGS warning(s) above"
exit 0
