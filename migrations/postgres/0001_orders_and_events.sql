-- wxpay-reconciler schema, PostgreSQL. The column names and types are a contract with the
-- merchant's application (../shared/DESIGN.md): it registers an order with only
--   INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee) VALUES (...)
-- and reads wxpay_order_events as an outbox (ORDER BY id).

CREATE TABLE wxpay_orders (
    id              BIGSERIAL    PRIMARY KEY,
    mch_id          VARCHAR(32)  NOT NULL,
    appid           VARCHAR(32)  NOT NULL,
    out_trade_no    VARCHAR(32)  NOT NULL,
    -- integer fen
    total_fee       BIGINT       NOT NULL CHECK (total_fee > 0),
    state           VARCHAR(16)  NOT NULL DEFAULT 'NOTPAY' CHECK (state IN
                        ('NOTPAY', 'USERPAYING', 'SUCCESS', 'REFUND', 'CLOSED', 'REVOKED',
                         'PAYERROR', 'AMOUNT_MISMATCH')),
    transaction_id  VARCHAR(32),
    paid_at         TIMESTAMPTZ,
    created_at      TIMESTAMPTZ  NOT NULL DEFAULT now(),
    -- optional, set by the app: when the order stops being payable (default: created_at + 2h)
    expires_at      TIMESTAMPTZ,
    query_count     INTEGER      NOT NULL DEFAULT 0,
    -- NULL means created_at + schedule.grace_seconds
    next_query_at   TIMESTAMPTZ,
    last_queried_at TIMESTAMPTZ,
    last_error      TEXT,
    -- fencing token: bumped by every claim; a write carrying an older value is refused
    lease           BIGINT       NOT NULL DEFAULT 0,
    -- set when polling stopped (give_up_after_hours or the schedule ran out)
    gave_up_at      TIMESTAMPTZ,
    updated_at      TIMESTAMPTZ  NOT NULL DEFAULT now(),
    CONSTRAINT wxpay_orders_mch_id_out_trade_no_key UNIQUE (mch_id, out_trade_no)
);

-- The scan reads only these two partial indexes: open, still polled orders, either never queried
-- (due at created_at + grace) or due at next_query_at. Settled orders are not in them, so the
-- scan's cost depends on the number of due orders, not on the size of the table.
CREATE INDEX wxpay_orders_due_first ON wxpay_orders (created_at)
    WHERE state IN ('NOTPAY', 'USERPAYING') AND gave_up_at IS NULL AND next_query_at IS NULL;
CREATE INDEX wxpay_orders_due_next ON wxpay_orders (next_query_at)
    WHERE state IN ('NOTPAY', 'USERPAYING') AND gave_up_at IS NULL AND next_query_at IS NOT NULL;
-- The stuck-order gauges and `status`: open orders per merchant, oldest first.
CREATE INDEX wxpay_orders_open ON wxpay_orders (mch_id, created_at)
    WHERE state IN ('NOTPAY', 'USERPAYING');

CREATE TABLE wxpay_order_events (
    id             BIGSERIAL    PRIMARY KEY,
    order_id       BIGINT       NOT NULL REFERENCES wxpay_orders (id),
    mch_id         VARCHAR(32)  NOT NULL,
    out_trade_no   VARCHAR(32)  NOT NULL,
    from_state     VARCHAR(16)  NOT NULL,
    -- a state, or an anomaly that changes no state (PAID_AFTER_CLOSE)
    to_state       VARCHAR(16)  NOT NULL,
    source         VARCHAR(8)   NOT NULL CHECK (source IN ('poll', 'notify', 'expire', 'manual')),
    transaction_id VARCHAR(32),
    -- what WeChat reported, integer fen
    total_fee      BIGINT,
    detail         TEXT,
    created_at     TIMESTAMPTZ  NOT NULL DEFAULT now(),
    -- no transition is recorded twice
    CONSTRAINT wxpay_order_events_order_id_to_state_key UNIQUE (order_id, to_state)
);
