-- policyd schema: the one source of truth. The daemon creates or migrates the database from
-- this file on start; PRAGMA user_version holds the schema version (see policyd/store/schema.py).
-- Times are ISO-8601 UTC text ('2026-11-24T12:00:00Z'); booleans are 0/1 integers.

CREATE TABLE IF NOT EXISTS partners (
    -- AUTOINCREMENT: a deleted partner's id is never handed to a new one (audit targets,
    -- change feed and logs keep meaning one partner)
    id                       INTEGER PRIMARY KEY AUTOINCREMENT,
    name                     TEXT NOT NULL,
    max_domains              INTEGER CHECK (max_domains >= 0),
    max_mailboxes_per_domain INTEGER CHECK (max_mailboxes_per_domain >= 0),
    max_aliases_per_mailbox  INTEGER CHECK (max_aliases_per_mailbox >= 0),
    notify_url               TEXT,
    -- shared HMAC secret for notifications: must be usable, so it is stored as given
    notify_secret            TEXT NOT NULL,
    created_at               TEXT NOT NULL,
    updated_at               TEXT NOT NULL
) STRICT;

CREATE TABLE IF NOT EXISTS api_keys (
    id            TEXT PRIMARY KEY,                -- public id, 'key_...'
    partner_id    INTEGER NOT NULL REFERENCES partners(id) ON DELETE CASCADE,
    name          TEXT,
    token_hash    TEXT NOT NULL UNIQUE,            -- sha256 hex of the token; the token is never stored
    expires_at    TEXT,
    revoked_at    TEXT,
    created_at    TEXT NOT NULL,
    last_used_at  TEXT,
    request_count INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX IF NOT EXISTS api_keys_partner ON api_keys(partner_id);

CREATE TABLE IF NOT EXISTS domains (
    id                   INTEGER PRIMARY KEY,
    name                 TEXT NOT NULL UNIQUE,      -- lowercase A-label, no trailing dot
    partner_id           INTEGER REFERENCES partners(id),
    status               TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    suspended_by         TEXT CHECK (suspended_by IN ('master', 'client')),
    parent_id            INTEGER REFERENCES domains(id) ON DELETE SET NULL,
    wildcard             INTEGER NOT NULL DEFAULT 0 CHECK (wildcard IN (0, 1)),
    ses_status           TEXT NOT NULL DEFAULT 'not_started' CHECK (ses_status IN
                             ('not_started', 'pending', 'success', 'failed',
                              'temporary_failure', 'inherited')),
    ses_dkim_status      TEXT,
    ses_token            TEXT,
    ses_dkim_tokens      TEXT NOT NULL DEFAULT '[]', -- JSON array of the 3 DKIM tokens
    ses_checked_at       TEXT,
    out_tier             TEXT NOT NULL,
    out_daily_limit      INTEGER CHECK (out_daily_limit >= 0),     -- NULL = unlimited
    out_monthly_limit    INTEGER CHECK (out_monthly_limit >= 0),   -- NULL = unlimited
    out_enforcement      TEXT NOT NULL DEFAULT 'hard' CHECK (out_enforcement IN ('hard', 'soft', 'off')),
    out_status           TEXT NOT NULL DEFAULT 'active' CHECK (out_status IN ('active', 'blocked', 'suspended')),
    retention_days       INTEGER CHECK (retention_days > 0),
    transfer_limit_bytes INTEGER CHECK (transfer_limit_bytes >= 0),
    created_at           TEXT NOT NULL,
    updated_at           TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS domains_partner ON domains(partner_id);
CREATE INDEX IF NOT EXISTS domains_parent ON domains(parent_id);
CREATE INDEX IF NOT EXISTS domains_ses_status ON domains(ses_status);

CREATE TABLE IF NOT EXISTS mailboxes (
    id            INTEGER PRIMARY KEY,
    domain_id     INTEGER NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
    local_part    TEXT NOT NULL,
    email         TEXT NOT NULL UNIQUE,             -- local_part@domain, lowercase
    password_hash TEXT NOT NULL,                    -- '{BLF-CRYPT}$2b$...', Dovecot verifies it
    name          TEXT,
    quota_bytes   INTEGER CHECK (quota_bytes >= 0), -- NULL = unlimited
    used_bytes    INTEGER,
    active        INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS mailboxes_domain ON mailboxes(domain_id);

CREATE TABLE IF NOT EXISTS aliases (
    id         INTEGER PRIMARY KEY,
    domain_id  INTEGER NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
    source     TEXT NOT NULL UNIQUE,                -- 'a@example.com', or '@example.com' (catch-all)
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS aliases_domain ON aliases(domain_id);

CREATE TABLE IF NOT EXISTS alias_destinations (
    alias_id INTEGER NOT NULL REFERENCES aliases(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    address  TEXT NOT NULL,
    PRIMARY KEY (alias_id, position)
) STRICT, WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS alias_destinations_address ON alias_destinations(address);

-- Period-keyed counters: a new day or month starts at zero by itself, so a missed or doubled
-- reset timer can never block or free a domain wrongly. kind 'day' has period 'YYYY-MM-DD',
-- kind 'month' has 'YYYY-MM', both in [outbound] timezone.
CREATE TABLE IF NOT EXISTS counters (
    domain_id  INTEGER NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
    kind       TEXT NOT NULL CHECK (kind IN ('day', 'month')),
    period     TEXT NOT NULL,
    sent       INTEGER NOT NULL DEFAULT 0,
    bytes      INTEGER NOT NULL DEFAULT 0,          -- transfer: outbound and inbound bytes
    bounces    INTEGER NOT NULL DEFAULT 0,
    complaints INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (domain_id, kind, period)
) STRICT, WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS monthly_history (
    domain_id  INTEGER NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
    period     TEXT NOT NULL,                       -- 'YYYY-MM'
    sent       INTEGER NOT NULL,
    bytes      INTEGER NOT NULL,
    bounces    INTEGER NOT NULL,
    complaints INTEGER NOT NULL,
    frozen_at  TEXT NOT NULL,
    PRIMARY KEY (domain_id, period)
) STRICT, WITHOUT ROWID;

-- The change feed for delta sync. seq is the cursor: strictly increasing, never reused
-- (AUTOINCREMENT), so changes sharing a timestamp are still ordered and never repeated.
CREATE TABLE IF NOT EXISTS changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    partner_id INTEGER,                             -- owner at the time; NULL = master-owned
    op         TEXT NOT NULL CHECK (op IN ('created', 'updated', 'deleted')),
    kind       TEXT NOT NULL CHECK (kind IN ('domain', 'mailbox', 'alias')),
    key        TEXT NOT NULL,
    at         TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS changes_partner ON changes(partner_id, seq);
CREATE INDEX IF NOT EXISTS changes_at ON changes(at);

CREATE TABLE IF NOT EXISTS audit_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     TEXT NOT NULL,
    actor  TEXT NOT NULL,                           -- 'master' or a key id
    action TEXT NOT NULL,
    target TEXT,
    before TEXT,                                    -- JSON
    after  TEXT                                     -- JSON
) STRICT;
CREATE INDEX IF NOT EXISTS audit_log_target ON audit_log(target, id);

-- SNS delivers at least once: a MessageId seen here is answered 2xx and not counted again.
CREATE TABLE IF NOT EXISTS sns_messages (
    message_id  TEXT PRIMARY KEY,
    received_at TEXT NOT NULL
) STRICT;

-- Outbox of partner notifications, written in the transaction that causes them and delivered
-- (signed, retried with backoff) by the notifier, so none is lost across restarts.
CREATE TABLE IF NOT EXISTS notifications (
    id              INTEGER PRIMARY KEY,
    partner_id      INTEGER NOT NULL REFERENCES partners(id) ON DELETE CASCADE,
    event           TEXT NOT NULL,
    body            TEXT NOT NULL,                  -- the exact JSON bytes that are signed
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    delivered_at    TEXT,
    last_error      TEXT,
    created_at      TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS notifications_due ON notifications(delivered_at, next_attempt_at);

-- Views read by Postfix (sqlite: maps) and Dovecot (driver sqlite); see conf/.
-- Suspended domains stay listed so their mail is accepted into HOLD/DEFER, never bounced.
CREATE VIEW IF NOT EXISTS postfix_domains AS
    SELECT name AS domain FROM domains;
CREATE VIEW IF NOT EXISTS postfix_mailboxes AS
    SELECT m.email AS email, d.name || '/' || m.local_part || '/Maildir/' AS maildir
    FROM mailboxes m JOIN domains d ON d.id = m.domain_id WHERE m.active = 1;
-- A mailbox maps to itself first, so a catch-all '@domain' never swallows an existing mailbox
-- (Postfix looks up user@domain before @domain).
CREATE VIEW IF NOT EXISTS postfix_aliases AS
    SELECT a.source AS source, group_concat(t.address, ',') AS destinations
    FROM aliases a JOIN alias_destinations t ON t.alias_id = a.id
    WHERE a.source NOT IN (SELECT email FROM mailboxes WHERE active = 1)
    GROUP BY a.id
    UNION ALL
    SELECT m.email, m.email || coalesce(',' || (
        SELECT group_concat(t.address, ',') FROM aliases a
        JOIN alias_destinations t ON t.alias_id = a.id WHERE a.source = m.email), '')
    FROM mailboxes m WHERE m.active = 1;
-- Dovecot's userdb reads every active mailbox; its passdb (login) also needs
-- domain_status = 'active' (conf/dovecot/dovecot-policyd-sql.conf.ext).
CREATE VIEW IF NOT EXISTS dovecot_users AS
    SELECT m.email AS user, m.password_hash AS password,
           CASE WHEN m.quota_bytes IS NULL THEN '*:storage=0'
                ELSE '*:bytes=' || m.quota_bytes END AS quota_rule,
           d.name AS domain, m.local_part AS local_part, d.status AS domain_status
    FROM mailboxes m JOIN domains d ON d.id = m.domain_id
    WHERE m.active = 1;
