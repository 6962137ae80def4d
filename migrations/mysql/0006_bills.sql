-- T+1 bill reconciliation (issue 16; see the PostgreSQL migration): wxpay_bills, one row per
-- merchant and bill day, claimed under a lease; wxpay_bill_findings, replaced on every run of
-- the day; the indexes the run reads on wxpay_orders and wxpay_refunds. Timestamps are UTC
-- DATETIME(6).

-- A payment or refund the bill settles is recorded with the source `bill` (DROP CONSTRAINT:
-- MariaDB 10.6+, MySQL 8.0.19+).
ALTER TABLE wxpay_order_events
    DROP CONSTRAINT wxpay_order_events_source_known,
    ADD CONSTRAINT wxpay_order_events_source_known
        CHECK (source IN ('poll', 'notify', 'expire', 'manual', 'bill'));

CREATE TABLE wxpay_bills (
    id              BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    mch_id          VARCHAR(32)  NOT NULL,
    -- the Beijing calendar day the bill covers
    bill_date       DATE         NOT NULL,
    state           VARCHAR(16)  NOT NULL,
    -- fencing token: bumped by every claim; a write carrying an older value is refused
    lease           BIGINT       NOT NULL DEFAULT 0,
    lease_until     DATETIME(6)  NULL,
    attempts        INT          NOT NULL DEFAULT 0,
    -- NOT_READY / FAILED / REFUSED: when the day is due again (NULL: now)
    next_attempt_at DATETIME(6)  NULL,
    origin          VARCHAR(16)  NULL,
    -- SHA-1 of the decompressed bill text, BOM included (hex)
    sha1            CHAR(40)     NULL,
    row_count       BIGINT       NULL,
    payment_count   BIGINT       NULL,
    refund_count    BIGINT       NULL,
    -- integer fen
    total_fee       BIGINT       NULL,
    refund_fee      BIGINT       NULL,
    -- the day's fees, exact: thousandths of a fen, may be negative
    fee_milli_fen   BIGINT       NULL,
    summary_check   VARCHAR(16)  NULL,
    last_error      TEXT         NULL,
    started_at      DATETIME(6)  NULL,
    reconciled_at   DATETIME(6)  NULL,
    created_at      DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    updated_at      DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    CONSTRAINT wxpay_bills_state_known CHECK (state IN
        ('RUNNING', 'RECONCILED', 'NOT_READY', 'REFUSED', 'FAILED')),
    CONSTRAINT wxpay_bills_origin_known CHECK (origin IN ('download', 'file')),
    CONSTRAINT wxpay_bills_mch_id_bill_date_key UNIQUE (mch_id, bill_date)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE wxpay_bill_findings (
    id             BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    bill_id        BIGINT       NOT NULL,
    mch_id         VARCHAR(32)  NOT NULL,
    bill_date      DATE         NOT NULL,
    kind           VARCHAR(16)  NOT NULL,
    object         VARCHAR(8)   NOT NULL,
    out_trade_no   VARCHAR(64)  NOT NULL,
    out_refund_no  VARCHAR(64)  NULL,
    transaction_id VARCHAR(64)  NULL,
    -- integer fen: the shop's amount and the bill's
    local_fee      BIGINT       NULL,
    remote_fee     BIGINT       NULL,
    local_state    VARCHAR(32)  NULL,
    remote_state   VARCHAR(32)  NULL,
    action         VARCHAR(16)  NOT NULL,
    -- the bill's line (1 = the header)
    line           BIGINT       NULL,
    detail         TEXT         NULL,
    created_at     DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    CONSTRAINT wxpay_bill_findings_kind_known CHECK (kind IN ('remote_only', 'local_only',
        'amount_diff', 'state_diff', 'settled_by_bill', 'paid_after_close')),
    CONSTRAINT wxpay_bill_findings_object_known CHECK (object IN ('payment', 'refund')),
    CONSTRAINT wxpay_bill_findings_action_known CHECK (action IN
        ('reported', 'settled', 'quarantined', 'recorded')),
    CONSTRAINT wxpay_bill_findings_bill_fk FOREIGN KEY (bill_id) REFERENCES wxpay_bills (id)
        ON DELETE CASCADE,
    -- A bill's findings by kind (`bills status`, the metrics), and its re-run's DELETE.
    INDEX wxpay_bill_findings_bill_kind (bill_id, kind)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The local side of a bill day: a merchant's orders paid, and refunds succeeded, in [from, to)
-- (no partial indexes: the state is filtered on the rows of the range; an unpaid order has no
-- paid_at, a refund not succeeded no success_time, so the range holds almost only those).
-- Built online (InnoDB's in-place index build lets the application keep writing).
CREATE INDEX wxpay_orders_paid ON wxpay_orders (mch_id, paid_at);
CREATE INDEX wxpay_refunds_succeeded ON wxpay_refunds (mch_id, success_time);
