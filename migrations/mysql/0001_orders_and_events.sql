-- wxpay-reconciler schema, MySQL 8.0.16+ / MariaDB 10.6+ (both have FOR UPDATE SKIP LOCKED and
-- enforce CHECK constraints). The column names and types are a contract with the merchant's
-- application (../shared/DESIGN.md): it registers an order with only
--   INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee) VALUES (...)
-- and reads wxpay_order_events as an outbox (ORDER BY id). Timestamps are UTC DATETIME(6): the
-- defaults use UTC_TIMESTAMP(6), whatever the session's time zone.

CREATE TABLE wxpay_orders (
    id              BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    mch_id          VARCHAR(32)  NOT NULL,
    appid           VARCHAR(32)  NOT NULL,
    out_trade_no    VARCHAR(32)  NOT NULL,
    -- integer fen
    total_fee       BIGINT       NOT NULL,
    state           VARCHAR(16)  NOT NULL DEFAULT 'NOTPAY',
    transaction_id  VARCHAR(32)  NULL,
    paid_at         DATETIME(6)  NULL,
    created_at      DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    -- optional, set by the app: when the order stops being payable (default: created_at + 2h)
    expires_at      DATETIME(6)  NULL,
    query_count     INT          NOT NULL DEFAULT 0,
    -- NULL means created_at + schedule.grace_seconds
    next_query_at   DATETIME(6)  NULL,
    last_queried_at DATETIME(6)  NULL,
    last_error      TEXT         NULL,
    -- fencing token: bumped by every claim; a write carrying an older value is refused
    lease           BIGINT       NOT NULL DEFAULT 0,
    -- set when polling stopped (give_up_after_hours or the schedule ran out)
    gave_up_at      DATETIME(6)  NULL,
    updated_at      DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    CONSTRAINT wxpay_orders_total_fee_positive CHECK (total_fee > 0),
    CONSTRAINT wxpay_orders_state_known CHECK (state IN
        ('NOTPAY', 'USERPAYING', 'SUCCESS', 'REFUND', 'CLOSED', 'REVOKED', 'PAYERROR',
         'AMOUNT_MISMATCH')),
    CONSTRAINT wxpay_orders_mch_id_out_trade_no_key UNIQUE (mch_id, out_trade_no),
    -- MySQL has no partial indexes: the scan's index leads with the state, so settled orders
    -- sit in other ranges of it and the scan never reads them.
    INDEX wxpay_orders_due (state, gave_up_at, next_query_at, created_at),
    -- The stuck-order gauges and `status`.
    INDEX wxpay_orders_open (state, mch_id, created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE wxpay_order_events (
    id             BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    order_id       BIGINT       NOT NULL,
    mch_id         VARCHAR(32)  NOT NULL,
    out_trade_no   VARCHAR(32)  NOT NULL,
    from_state     VARCHAR(16)  NOT NULL,
    -- a state, or an anomaly that changes no state (PAID_AFTER_CLOSE)
    to_state       VARCHAR(16)  NOT NULL,
    source         VARCHAR(8)   NOT NULL,
    transaction_id VARCHAR(32)  NULL,
    -- what WeChat reported, integer fen
    total_fee      BIGINT       NULL,
    detail         TEXT         NULL,
    created_at     DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    CONSTRAINT wxpay_order_events_source_known CHECK (source IN ('poll', 'notify', 'expire', 'manual')),
    -- no transition is recorded twice
    CONSTRAINT wxpay_order_events_order_id_to_state_key UNIQUE (order_id, to_state),
    CONSTRAINT wxpay_order_events_order_fk FOREIGN KEY (order_id) REFERENCES wxpay_orders (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
