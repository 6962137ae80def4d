-- T+1 bill reconciliation (issue 16; see the PostgreSQL migration): wxpay_bills, one row per
-- merchant and bill day, claimed under a lease; wxpay_bill_findings, replaced on every run of
-- the day; the indexes the run reads on wxpay_orders and wxpay_refunds.

-- A payment or refund the bill settles is recorded with the source `bill`. SQLite cannot alter
-- a CHECK: wxpay_order_events is rebuilt as 0001 made it, with the wider CHECK, keeping every
-- row and its id, and the AUTOINCREMENT counter (an outbox reader's position stays valid;
-- no id is ever given twice). No table references it; its indexes (the UNIQUE of 0001, the
-- partial index of 0002) are made again below; it has no triggers. A trigger or view the
-- merchant added on this table is dropped with it and must be created again.
-- Foreign keys are checked at the commit (an event of an order deleted while enforcement was
-- off, SQLite's default, is copied as it was: the rebuild adds no violation).
PRAGMA defer_foreign_keys = ON;

CREATE TABLE wxpay_order_events_new (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id       INTEGER NOT NULL REFERENCES wxpay_orders (id),
    mch_id         TEXT    NOT NULL,
    out_trade_no   TEXT    NOT NULL,
    from_state     TEXT    NOT NULL,
    -- a state, or an anomaly that changes no state (PAID_AFTER_CLOSE)
    to_state       TEXT    NOT NULL,
    source         TEXT    NOT NULL CHECK (source IN ('poll', 'notify', 'expire', 'manual', 'bill')),
    transaction_id TEXT,
    -- what WeChat reported, integer fen
    total_fee      INTEGER,
    detail         TEXT,
    created_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    -- no transition is recorded twice
    UNIQUE (order_id, to_state)
) STRICT;
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'wxpay_order_events_new', seq FROM sqlite_sequence WHERE name = 'wxpay_order_events';
INSERT INTO wxpay_order_events_new (id, order_id, mch_id, out_trade_no, from_state, to_state,
        source, transaction_id, total_fee, detail, created_at)
    SELECT id, order_id, mch_id, out_trade_no, from_state, to_state, source, transaction_id,
        total_fee, detail, created_at
    FROM wxpay_order_events ORDER BY id;
DROP TABLE wxpay_order_events;
ALTER TABLE wxpay_order_events_new RENAME TO wxpay_order_events;
CREATE INDEX wxpay_order_events_paid_after_close ON wxpay_order_events (id)
    WHERE to_state = 'PAID_AFTER_CLOSE';

CREATE TABLE wxpay_bills (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    mch_id          TEXT    NOT NULL CHECK (length(mch_id) BETWEEN 1 AND 32),
    -- the Beijing calendar day the bill covers, 'YYYY-MM-DD'
    bill_date       TEXT    NOT NULL
                    CHECK (bill_date GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]'
                           AND date(bill_date) IS bill_date),
    state           TEXT    NOT NULL CHECK (state IN
                        ('RUNNING', 'RECONCILED', 'NOT_READY', 'REFUSED', 'FAILED')),
    -- fencing token: bumped by every claim; a write carrying an older value is refused
    lease           INTEGER NOT NULL DEFAULT 0,
    lease_until     TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- NOT_READY / FAILED / REFUSED: when the day is due again (NULL: now)
    next_attempt_at TEXT,
    origin          TEXT    CHECK (origin IN ('download', 'file')),
    -- SHA-1 of the decompressed bill text, BOM included (hex)
    sha1            TEXT    CHECK (length(sha1) = 40),
    row_count       INTEGER,
    payment_count   INTEGER,
    refund_count    INTEGER,
    -- integer fen
    total_fee       INTEGER,
    refund_fee      INTEGER,
    -- the day's fees, exact: thousandths of a fen, may be negative
    fee_milli_fen   INTEGER,
    summary_check   TEXT,
    last_error      TEXT,
    started_at      TEXT,
    reconciled_at   TEXT,
    created_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    updated_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    UNIQUE (mch_id, bill_date)
) STRICT;

CREATE TABLE wxpay_bill_findings (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    bill_id        INTEGER NOT NULL REFERENCES wxpay_bills (id) ON DELETE CASCADE,
    mch_id         TEXT    NOT NULL,
    bill_date      TEXT    NOT NULL,
    kind           TEXT    NOT NULL CHECK (kind IN ('remote_only', 'local_only',
                       'amount_diff', 'state_diff', 'settled_by_bill', 'paid_after_close')),
    object         TEXT    NOT NULL CHECK (object IN ('payment', 'refund')),
    out_trade_no   TEXT    NOT NULL,
    out_refund_no  TEXT,
    transaction_id TEXT,
    -- integer fen: the shop's amount and the bill's
    local_fee      INTEGER,
    remote_fee     INTEGER,
    local_state    TEXT,
    remote_state   TEXT,
    action         TEXT    NOT NULL CHECK (action IN
                       ('reported', 'settled', 'quarantined', 'recorded')),
    -- the bill's line (1 = the header)
    line           INTEGER,
    detail         TEXT,
    created_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
) STRICT;
CREATE INDEX wxpay_bill_findings_bill_kind ON wxpay_bill_findings (bill_id, kind);

-- The local side of a bill day: a merchant's orders paid, and refunds succeeded, in [from, to).
CREATE INDEX wxpay_orders_paid ON wxpay_orders (mch_id, paid_at)
    WHERE state IN ('SUCCESS', 'REFUND');
CREATE INDEX wxpay_refunds_succeeded ON wxpay_refunds (mch_id, success_time)
    WHERE state = 'SUCCESS';
