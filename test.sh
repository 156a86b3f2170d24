#!/usr/bin/env bash
# Set up and run the whole test suite: system packages the integration tests use (Postfix
# with sqlite maps, swaks with TLS, sqlite3, Dovecot with its SQLite driver and LMTP server,
# systemd's tools for deploy/install.sh and systemd-analyze) and the vmail user when
# run as root, a venv with the package and its test extras, then pytest. This is the command
# .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")"
missing=0
for tool in postmap swaks sqlite3 doveadm; do command -v "$tool" >/dev/null || missing=1; done
dpkg -s postfix-sqlite >/dev/null 2>&1 || missing=1
for pkg in dovecot-sqlite dovecot-lmtpd libnet-ssleay-perl systemd; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing=1
done
python3 -c 'import ensurepip, venv' 2>/dev/null || missing=1
if [ "$missing" = 1 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            postfix postfix-sqlite swaks sqlite3 python3-venv dovecot-core dovecot-sqlite \
            dovecot-lmtpd libnet-ssleay-perl systemd
    else
        echo "not root: tests needing Postfix, swaks or Dovecot are skipped where they are" \
            "missing" >&2
    fi
fi
# The mail user conf/dovecot and conf/postfix name (uid/gid of /var/vmail), as on a mail host.
if [ "$(id -u)" = 0 ] && ! getent passwd vmail >/dev/null; then
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin vmail
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q ".[test,replication]"
exec .venv/bin/python -m pytest "$@"
