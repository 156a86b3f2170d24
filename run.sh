#!/usr/bin/env bash
# Set up and start policyd on its embedded SQLite default (./policyd.sqlite3).
# Creates .venv, installs the package, then runs `policyd serve` in the foreground.
# The master token is generated into ./master.token on the first start.
set -euo pipefail
cd "$(dirname "$0")"
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
    else
        echo "python3-venv is missing: sudo apt-get install python3-venv" >&2; exit 1
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q .
exec .venv/bin/policyd serve "$@"
