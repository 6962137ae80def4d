-- T+1 bill reconciliation (issue 16): WeChat's daily trade bill against the shop's tables.
-- One row per merchant and bill day (a Beijing calendar day) in wxpay_bills, claimed under a
-- lease as the orders are; what the comparison found in wxpay_bill_findings, replaced on every
-- run of the day. Both tables are the daemon's: the merchant's application only reads them.
-- (The index the run reads on wxpay_orders is built CONCURRENTLY by 0007.)

-- A payment or refund the bill settles is recorded with the source `bill`. The constraint is
-- the one 0001 declared inline (PostgreSQL named it), widened under the same name.
ALTER TABLE wxpay_order_events
    DROP CONSTRAINT wxpay_order_events_source_check,
    ADD CONSTRAINT wxpay_order_events_source_check
        CHECK (source IN ('poll', 'notify', 'expire', 'manual', 'bill'));

CREATE TABLE wxpay_bills (
    id              BIGSERIAL    PRIMARY KEY,
    mch_id          VARCHAR(32)  NOT NULL,
    -- the Beijing calendar day the bill covers
    bill_date       DATE         NOT NULL,
    state           VARCHAR(16)  NOT NULL CHECK (state IN
                        ('RUNNING', 'RECONCILED', 'NOT_READY', 'REFUSED', 'FAILED')),
    -- fencing token: bumped by every claim; a write carrying an older value is refused
    lease           BIGINT       NOT NULL DEFAULT 0,
    -- a RUNNING day whose lease_until has passed may be claimed by another instance
    lease_until     TIMESTAMPTZ,
    attempts        INTEGER      NOT NULL DEFAULT 0,
    -- NOT_READY / FAILED / REFUSED: when the day is due again (NULL: now)
    next_attempt_at TIMESTAMPTZ,
    -- where the bill came from: downloaded from WeChat, or a file a person gave
    origin          VARCHAR(16)  CHECK (origin IN ('download', 'file')),
    -- SHA-1 of the decompressed bill text, BOM included (hex)
    sha1            CHAR(40),
    -- the bill's data lines, refunds included
    row_count       BIGINT,
    payment_count   BIGINT,
    refund_count    BIGINT,
    -- integer fen: the payments' order amounts, the refunds' amounts
    total_fee       BIGINT,
    refund_fee      BIGINT,
    -- the day's fees, exact: thousandths of a fen, may be negative
    fee_milli_fen   BIGINT,
    -- the bill's summary line against its rows: adds_up, differs or missing
    summary_check   VARCHAR(16),
    last_error      TEXT,
    started_at      TIMESTAMPTZ,
    reconciled_at   TIMESTAMPTZ,
    created_at      TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ  NOT NULL DEFAULT now(),
    CONSTRAINT wxpay_bills_mch_id_bill_date_key UNIQUE (mch_id, bill_date)
);

CREATE TABLE wxpay_bill_findings (
    id             BIGSERIAL    PRIMARY KEY,
    bill_id        BIGINT       NOT NULL REFERENCES wxpay_bills (id) ON DELETE CASCADE,
    mch_id         VARCHAR(32)  NOT NULL,
    bill_date      DATE         NOT NULL,
    kind           VARCHAR(16)  NOT NULL CHECK (kind IN ('remote_only', 'local_only',
                       'amount_diff', 'state_diff', 'settled_by_bill', 'paid_after_close')),
    object         VARCHAR(8)   NOT NULL CHECK (object IN ('payment', 'refund')),
    out_trade_no   VARCHAR(64)  NOT NULL,
    out_refund_no  VARCHAR(64),
    transaction_id VARCHAR(64),
    -- integer fen: the shop's amount and the bill's
    local_fee      BIGINT,
    remote_fee     BIGINT,
    local_state    VARCHAR(32),
    remote_state   VARCHAR(32),
    -- what the daemon did about it
    action         VARCHAR(16)  NOT NULL CHECK (action IN
                       ('reported', 'settled', 'quarantined', 'recorded')),
    -- the bill's line (1 = the header)
    line           BIGINT,
    detail         TEXT,
    created_at     TIMESTAMPTZ  NOT NULL DEFAULT now()
);
-- A bill's findings by kind (`bills status`, the metrics), and its re-run's DELETE.
CREATE INDEX wxpay_bill_findings_bill_kind ON wxpay_bill_findings (bill_id, kind);

-- The local side of a bill day: the refunds of a merchant that succeeded in [from, to). Built in
-- this transaction (it holds off the application's writes of wxpay_refunds while it is built:
-- a refund table is a small part of the orders'; the orders' index is built CONCURRENTLY, by
-- 0007).
CREATE INDEX wxpay_refunds_succeeded ON wxpay_refunds (mch_id, success_time)
    WHERE state = 'SUCCESS';
