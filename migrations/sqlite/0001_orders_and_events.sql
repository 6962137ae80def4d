-- wxpay-reconciler schema, SQLite (STRICT tables: types are enforced). The column names and
-- types are a contract with the merchant's application (../shared/DESIGN.md): it registers an
-- order with only
--   INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee) VALUES (...)
-- and reads wxpay_order_events as an outbox (ORDER BY id). Timestamps are UTC text in SQLite's
-- own 'YYYY-MM-DD HH:MM:SS[.SSS]' form, so datetime('now', '+2 hours') sets expires_at.

CREATE TABLE wxpay_orders (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    mch_id          TEXT    NOT NULL CHECK (length(mch_id) BETWEEN 1 AND 32),
    appid           TEXT    NOT NULL CHECK (length(appid) BETWEEN 1 AND 32),
    out_trade_no    TEXT    NOT NULL CHECK (length(out_trade_no) BETWEEN 1 AND 32),
    -- integer fen
    total_fee       INTEGER NOT NULL CHECK (total_fee > 0),
    state           TEXT    NOT NULL DEFAULT 'NOTPAY' CHECK (state IN
                        ('NOTPAY', 'USERPAYING', 'SUCCESS', 'REFUND', 'CLOSED', 'REVOKED',
                         'PAYERROR', 'AMOUNT_MISMATCH')),
    transaction_id  TEXT,
    paid_at         TEXT,
    created_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
                    CHECK (created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9]*'),
    -- optional, set by the app: when the order stops being payable (default: created_at + 2h)
    expires_at      TEXT
                    CHECK (expires_at IS NULL OR expires_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9]*'),
    query_count     INTEGER NOT NULL DEFAULT 0,
    -- NULL means created_at + schedule.grace_seconds
    next_query_at   TEXT,
    last_queried_at TEXT,
    last_error      TEXT,
    -- fencing token: bumped by every claim; a write carrying an older value is refused
    lease           INTEGER NOT NULL DEFAULT 0,
    -- set when polling stopped (give_up_after_hours or the schedule ran out)
    gave_up_at      TEXT,
    updated_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    UNIQUE (mch_id, out_trade_no)
) STRICT;

-- The scan reads only these two partial indexes (see the PostgreSQL migration).
CREATE INDEX wxpay_orders_due_first ON wxpay_orders (created_at)
    WHERE state IN ('NOTPAY', 'USERPAYING') AND gave_up_at IS NULL AND next_query_at IS NULL;
CREATE INDEX wxpay_orders_due_next ON wxpay_orders (next_query_at)
    WHERE state IN ('NOTPAY', 'USERPAYING') AND gave_up_at IS NULL AND next_query_at IS NOT NULL;
CREATE INDEX wxpay_orders_open ON wxpay_orders (mch_id, created_at)
    WHERE state IN ('NOTPAY', 'USERPAYING');

CREATE TABLE wxpay_order_events (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id       INTEGER NOT NULL REFERENCES wxpay_orders (id),
    mch_id         TEXT    NOT NULL,
    out_trade_no   TEXT    NOT NULL,
    from_state     TEXT    NOT NULL,
    -- a state, or an anomaly that changes no state (PAID_AFTER_CLOSE)
    to_state       TEXT    NOT NULL,
    source         TEXT    NOT NULL CHECK (source IN ('poll', 'notify', 'expire', 'manual')),
    transaction_id TEXT,
    -- what WeChat reported, integer fen
    total_fee      INTEGER,
    detail         TEXT,
    created_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    -- no transition is recorded twice
    UNIQUE (order_id, to_state)
) STRICT;
