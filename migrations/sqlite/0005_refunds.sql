-- Refunds (issue 15; see the PostgreSQL migration). The merchant's application registers each
-- refund with only
--   INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) VALUES (...)
-- and reads wxpay_refund_events as an outbox (ORDER BY id).

CREATE TABLE wxpay_refunds (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    mch_id             TEXT    NOT NULL CHECK (length(mch_id) BETWEEN 1 AND 32),
    out_trade_no       TEXT    NOT NULL CHECK (length(out_trade_no) BETWEEN 1 AND 32),
    out_refund_no      TEXT    NOT NULL CHECK (length(out_refund_no) BETWEEN 1 AND 64),
    -- integer fen
    refund_fee         INTEGER NOT NULL CHECK (refund_fee > 0),
    state              TEXT    NOT NULL DEFAULT 'PROCESSING' CHECK (state IN
                           ('PROCESSING', 'SUCCESS', 'CLOSED', 'ABNORMAL', 'NOT_FOUND',
                            'AMOUNT_MISMATCH')),
    refund_id          TEXT,
    success_time       TEXT,
    refund_recv_accout TEXT,
    created_at         TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
                       CHECK (datetime(created_at) IS NOT NULL),
    query_count        INTEGER NOT NULL DEFAULT 0,
    -- NULL means created_at + the refund schedule's first delay
    next_query_at      TEXT,
    last_queried_at    TEXT,
    last_error         TEXT,
    -- fencing token: bumped by every claim; a write carrying an older value is refused
    lease              INTEGER NOT NULL DEFAULT 0,
    -- set when polling stopped (the refund horizon passed)
    gave_up_at         TEXT,
    updated_at         TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    UNIQUE (mch_id, out_refund_no),
    FOREIGN KEY (mch_id, out_trade_no) REFERENCES wxpay_orders (mch_id, out_trade_no)
) STRICT;

CREATE INDEX wxpay_refunds_due_first ON wxpay_refunds (created_at)
    WHERE state = 'PROCESSING' AND gave_up_at IS NULL AND next_query_at IS NULL;
CREATE INDEX wxpay_refunds_due_next ON wxpay_refunds (next_query_at)
    WHERE state = 'PROCESSING' AND gave_up_at IS NULL AND next_query_at IS NOT NULL;
CREATE INDEX wxpay_refunds_open ON wxpay_refunds (mch_id, created_at)
    WHERE state = 'PROCESSING';
CREATE INDEX wxpay_refunds_order ON wxpay_refunds (mch_id, out_trade_no);
-- The gauges of ABNORMAL and quarantined refunds read only these rows.
CREATE INDEX wxpay_refunds_attention ON wxpay_refunds (mch_id)
    WHERE state IN ('ABNORMAL', 'AMOUNT_MISMATCH');

CREATE TABLE wxpay_refund_events (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    -- wxpay_refunds.id (refund_id is WeChat's refund number)
    refund_row_id  INTEGER NOT NULL REFERENCES wxpay_refunds (id),
    mch_id         TEXT    NOT NULL,
    out_trade_no   TEXT    NOT NULL,
    out_refund_no  TEXT    NOT NULL,
    from_state     TEXT    NOT NULL,
    to_state       TEXT    NOT NULL,
    source         TEXT    NOT NULL CHECK (source IN ('poll', 'notify', 'manual', 'bill')),
    refund_id      TEXT,
    -- what WeChat reported, integer fen
    refund_fee     INTEGER,
    detail         TEXT,
    created_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    -- no transition is recorded twice
    UNIQUE (refund_row_id, to_state)
) STRICT;
