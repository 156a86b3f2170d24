#!/usr/bin/env bash
# Install (or upgrade) policyd on a Debian 12 mail host from this checkout, as root:
#
#   deploy/install.sh              install, or upgrade to this checkout; safe to run again
#   deploy/install.sh --uninstall  remove the program and its units; keep config and data
#
# What it puts where (nothing else is touched):
#   /opt/policyd/venv-<hash>/        a Python venv with this checkout installed, named after a
#                                    hash of the source: a newer checkout gets a new venv,
#                                    the same checkout finds its venv and changes nothing
#   /opt/policyd/current             symlink to the venv in use (switched atomically)
#   /usr/local/bin/policyd           symlink to /opt/policyd/current/bin/policyd
#   /usr/local/lib/sysusers.d/policyd.conf   the policyd system user (systemd-sysusers)
#   /usr/local/lib/systemd/system/policyd*   the service and its timers, enabled
#   /etc/policyd/policyd.ini         written once (0640 root:policyd, with a new master token),
#                                    never overwritten afterwards
#   /var/lib/policyd/                the database (policyd:postfix 0750); `policyd serve`
#                                    creates and migrates it on start
#
# Under a running systemd the service is (re)started and the timers started; otherwise (a
# container, a chroot) everything is enabled for the next boot and the commands to start
# by hand are printed.
set -euo pipefail
umask 022

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=/usr/bin/python3
PREFIX=/opt/policyd
BIN=/usr/local/bin/policyd
UNIT_DIR=/usr/local/lib/systemd/system
SYSUSERS=/usr/local/lib/sysusers.d/policyd.conf
ETC=/etc/policyd
CONFIG=$ETC/policyd.ini
STATE=/var/lib/policyd
SERVICE=policyd.service
TIMERS=(policyd-reset-daily.timer policyd-reset-monthly.timer policyd-purge-retention.timer)
UNITS=("$SERVICE" policyd-reset-daily.service policyd-reset-monthly.service
       policyd-purge-retention.service "${TIMERS[@]}")
# The files the installed package is built from: their hash names the venv.
SOURCES=(pyproject.toml setup.cfg README.md schema.sql policyd api)

say() { printf 'policyd install: %s\n' "$*"; }
die() { printf 'policyd install: error: %s\n' "$*" >&2; exit 1; }
systemd_running() { [ -d /run/systemd/system ]; }

# Copy $1 to $2 with mode $3 unless $2 already has that content; say whether it changed.
put() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        chmod "$3" "$2"
        return 1
    fi
    install -D -m "$3" -o root -g root "$1" "$2"
    say "wrote $2"
}

usage() {
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
}

# ------------------------------------------------------------------------------- checks

preflight() {
    [ "$(id -u)" = 0 ] || die "run as root (sudo $0)"
    command -v apt-get >/dev/null || die "this installer is for Debian 12 (apt-get not found)"
    for user in postfix dovecot; do
        getent passwd "$user" >/dev/null || die "the $user user does not exist: install" \
            "Postfix and Dovecot first (apt-get install postfix postfix-sqlite dovecot-core" \
            "dovecot-sqlite dovecot-lmtpd), then run $0 again"
    done
    local need=()
    [ -x "$PYTHON" ] || need+=(python3)
    [ -x "$PYTHON" ] && "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
    command -v systemd-sysusers >/dev/null || need+=(systemd)
    if [ ${#need[@]} -gt 0 ]; then
        say "installing ${need[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
    fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is older than 3.11 (Debian 12 has 3.11)"
}

# A hash of the package sources (paths and contents) and of the Python version.
source_hash() {
    (cd "$SRC" && "$PYTHON" - "${SOURCES[@]}" <<'PY'
import hashlib, os, sys
digest = hashlib.sha256(("python %d.%d\n" % sys.version_info[:2]).encode())
paths = []
for top in sys.argv[1:]:
    if os.path.isdir(top):
        for root, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d != "__pycache__" and not d.endswith(".egg-info")]
            paths += [os.path.join(root, f) for f in files if not f.endswith((".pyc", ".pyo"))]
    else:
        paths.append(top)
for path in sorted(paths):
    with open(path, "rb") as handle:
        content = hashlib.sha256(handle.read()).hexdigest()
    digest.update(f"{path}\0{content}\n".encode())
print(digest.hexdigest()[:16])
PY
    )
}

# ------------------------------------------------------------------------------- install

# Build the venv for this checkout unless it is already there; print its path.
build_venv() {
    local venv=$PREFIX/venv-$1
    if [ -f "$venv/.installed" ]; then
        echo "$venv"
        return
    fi
    rm -rf "$venv"  # left over from an interrupted run
    say "building $venv from $SRC" >&2
    local stage
    stage=$(mktemp -d)
    # Build from a copy: nothing is written into the checkout, and what is built is exactly
    # what was hashed.
    (cd "$SRC" && tar --exclude=__pycache__ --exclude='*.egg-info' --exclude='*.pyc' \
        -cf - "${SOURCES[@]}") | tar -xf - -C "$stage"
    install -d -m 0755 "$PREFIX"
    "$PYTHON" -m venv "$venv"
    if ! "$venv/bin/pip" install -q --disable-pip-version-check "$stage" >&2; then
        rm -rf "$stage" "$venv"
        die "pip could not install policyd into $venv"
    fi
    rm -rf "$stage"
    "$venv/bin/policyd" --help >/dev/null || die "$venv/bin/policyd does not run"
    echo "$1" > "$venv/.installed"
    echo "$venv"
}

# Point /opt/policyd/current and /usr/local/bin/policyd at the venv; say if anything moved.
switch_to() {
    local name changed=1
    name=$(basename "$1")
    if [ "$(readlink "$PREFIX/current" 2>/dev/null)" != "$name" ]; then
        ln -sfn "$name" "$PREFIX/current.new"
        mv -T "$PREFIX/current.new" "$PREFIX/current"
        say "now running $name"
        changed=0
    fi
    if [ "$(readlink "$BIN" 2>/dev/null)" != "$PREFIX/current/bin/policyd" ]; then
        install -d -m 0755 "$(dirname "$BIN")"
        ln -sfn "$PREFIX/current/bin/policyd" "$BIN"
        say "linked $BIN"
        changed=0
    fi
    local old
    for old in "$PREFIX"/venv-*; do
        if [ -e "$old" ] && [ "$old" != "$1" ]; then
            rm -rf "$old"
            say "removed the previous $old"
        fi
    done
    return $changed
}

# /etc/policyd/policyd.ini from conf/policyd.ini: the database under /var/lib/policyd and a
# fresh master token (kept here, not only beside the database). Never overwritten.
write_config() {
    install -d -m 0755 -o root -g root "$ETC"
    if [ -e "$CONFIG" ]; then
        return 1
    fi
    local token tmp
    token=$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')
    tmp=$(mktemp)
    sed -e "s|^path = \./policyd\.sqlite3$|path = $STATE/policyd.sqlite3|" \
        -e "s|^master_token =$|master_token = $token|" "$SRC/conf/policyd.ini" > "$tmp"
    grep -q "^path = $STATE/policyd.sqlite3$" "$tmp" && grep -q "^master_token = ." "$tmp" ||
        { rm -f "$tmp"; die "conf/policyd.ini has no 'path =' or 'master_token =' line"; }
    install -m 0640 -o root -g policyd "$tmp" "$CONFIG"
    rm -f "$tmp"
    say "wrote $CONFIG (master token inside; the file is yours from now on)"
}

install_units() {
    local unit changed=1
    for unit in "${UNITS[@]}"; do
        put "$SRC/systemd/$unit" "$UNIT_DIR/$unit" 0644 && changed=0
    done
    return $changed
}

start_or_explain() {
    local restart=$1
    if systemd_running; then
        systemctl daemon-reload
        systemctl enable -q "$SERVICE" "${TIMERS[@]}"
        if [ "$restart" = 1 ] && systemctl is-active -q "$SERVICE"; then
            systemctl restart "$SERVICE"   # the new program migrates the schema on start
            say "restarted $SERVICE"
        else
            systemctl start "$SERVICE"
        fi
        systemctl start "${TIMERS[@]}"
        say "$SERVICE is $(systemctl is-active "$SERVICE"); logs: journalctl -u $SERVICE"
    else
        systemctl enable -q "$SERVICE" "${TIMERS[@]}" 2>/dev/null ||
            say "could not enable the units (systemctl enable failed)"
        say "systemd is not running here: the units are enabled for the next boot."
        say "to run policyd now, in the foreground:"
        say "  runuser -u policyd -- $BIN serve --config $CONFIG"
        say "and the jobs the timers would run, e.g. daily:"
        say "  runuser -u policyd -- $BIN reset-daily --config $CONFIG"
    fi
}

install_all() {
    preflight
    local hash venv changed=0
    hash=$(source_hash)
    venv=$(build_venv "$hash")
    put "$SRC/systemd/policyd.sysusers" "$SYSUSERS" 0644 || true
    systemd-sysusers "$SYSUSERS"
    # sysusers never changes an existing user: one made before (by hand, or by an older
    # policyd.sysusers) gets the primary group Postfix reads the database with.
    if [ "$(id -gn policyd)" != postfix ]; then
        usermod -g postfix policyd
        say "policyd's primary group is now postfix"
    fi
    install -d -m 0750 -o policyd -g postfix "$STATE"
    write_config || true
    # The new program must accept the config before it replaces the running one.
    "$venv/bin/policyd" check-config --config "$CONFIG" >/dev/null ||
        die "$CONFIG does not validate: $venv/bin/policyd check-config --config $CONFIG"
    switch_to "$venv" && changed=1
    install_units && changed=1
    start_or_explain "$changed"
    if [ "$changed" = 0 ]; then
        say "already installed from this checkout ($hash): nothing changed"
    else
        say "installed policyd from $SRC ($hash)"
    fi
    say "config: $CONFIG; database: $STATE/policyd.sqlite3; master token:" \
        "grep ^master_token $CONFIG"
}

# ------------------------------------------------------------------------------- uninstall

uninstall_all() {
    [ "$(id -u)" = 0 ] || die "run as root (sudo $0 --uninstall)"
    local present=() unit
    for unit in "${UNITS[@]}"; do
        [ -e "$UNIT_DIR/$unit" ] && present+=("$unit")
    done
    if [ ${#present[@]} -gt 0 ]; then
        if systemd_running; then
            systemctl disable -q --now "${present[@]}" || true
        else
            systemctl disable -q "${present[@]}" 2>/dev/null || true
        fi
    fi
    for unit in "${UNITS[@]}"; do
        [ -e "$UNIT_DIR/$unit" ] && rm -f "$UNIT_DIR/$unit" && say "removed $UNIT_DIR/$unit"
    done
    if systemd_running; then
        systemctl daemon-reload
    fi
    if [ -L "$BIN" ] && [ "$(readlink "$BIN")" = "$PREFIX/current/bin/policyd" ]; then
        rm -f "$BIN" && say "removed $BIN"
    fi
    [ -e "$PREFIX" ] && rm -rf "$PREFIX" && say "removed $PREFIX"
    [ -e "$SYSUSERS" ] && rm -f "$SYSUSERS" && say "removed $SYSUSERS"
    say "kept $ETC (config, master token), $STATE (the database) and the policyd user"
}

case "${1:-}" in
    "") install_all ;;
    --uninstall) uninstall_all ;;
    -h|--help) usage ;;
    *) usage >&2; exit 2 ;;
esac
