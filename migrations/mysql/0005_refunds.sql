-- Refunds (issue 15; see the PostgreSQL migration). The merchant's application registers each
-- refund with only
--   INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) VALUES (...)
-- and reads wxpay_refund_events as an outbox (ORDER BY id). Timestamps are UTC DATETIME(6).

CREATE TABLE wxpay_refunds (
    id                 BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    mch_id             VARCHAR(32)  NOT NULL,
    out_trade_no       VARCHAR(32)  NOT NULL,
    out_refund_no      VARCHAR(64)  NOT NULL,
    -- integer fen
    refund_fee         BIGINT       NOT NULL,
    state              VARCHAR(16)  NOT NULL DEFAULT 'PROCESSING',
    refund_id          VARCHAR(32)  NULL,
    success_time       DATETIME(6)  NULL,
    refund_recv_accout VARCHAR(64)  NULL,
    created_at         DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    query_count        INT          NOT NULL DEFAULT 0,
    -- NULL means created_at + the refund schedule's first delay
    next_query_at      DATETIME(6)  NULL,
    last_queried_at    DATETIME(6)  NULL,
    last_error         TEXT         NULL,
    -- fencing token: bumped by every claim; a write carrying an older value is refused
    lease              BIGINT       NOT NULL DEFAULT 0,
    -- set when polling stopped (the refund horizon passed)
    gave_up_at         DATETIME(6)  NULL,
    updated_at         DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    CONSTRAINT wxpay_refunds_refund_fee_positive CHECK (refund_fee > 0),
    CONSTRAINT wxpay_refunds_state_known CHECK (state IN
        ('PROCESSING', 'SUCCESS', 'CLOSED', 'ABNORMAL', 'NOT_FOUND', 'AMOUNT_MISMATCH')),
    CONSTRAINT wxpay_refunds_mch_id_out_refund_no_key UNIQUE (mch_id, out_refund_no),
    CONSTRAINT wxpay_refunds_order_fk FOREIGN KEY (mch_id, out_trade_no)
        REFERENCES wxpay_orders (mch_id, out_trade_no),
    -- No partial indexes: the refund scan's index leads with the state, as the orders' does.
    INDEX wxpay_refunds_due (state, gave_up_at, next_query_at, created_at),
    INDEX wxpay_refunds_open (state, mch_id, created_at),
    INDEX wxpay_refunds_order (mch_id, out_trade_no)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE wxpay_refund_events (
    id             BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    -- wxpay_refunds.id (refund_id is WeChat's refund number)
    refund_row_id  BIGINT       NOT NULL,
    mch_id         VARCHAR(32)  NOT NULL,
    out_trade_no   VARCHAR(32)  NOT NULL,
    out_refund_no  VARCHAR(64)  NOT NULL,
    from_state     VARCHAR(16)  NOT NULL,
    to_state       VARCHAR(16)  NOT NULL,
    source         VARCHAR(8)   NOT NULL,
    refund_id      VARCHAR(32)  NULL,
    -- what WeChat reported, integer fen
    refund_fee     BIGINT       NULL,
    detail         TEXT         NULL,
    created_at     DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    CONSTRAINT wxpay_refund_events_source_known CHECK (source IN ('poll', 'notify', 'manual', 'bill')),
    -- no transition is recorded twice
    CONSTRAINT wxpay_refund_events_refund_row_id_to_state_key UNIQUE (refund_row_id, to_state),
    CONSTRAINT wxpay_refund_events_refund_fk FOREIGN KEY (refund_row_id) REFERENCES wxpay_refunds (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
