-- Refunds (issue 15). The merchant's application registers each refund it requests, before or
-- right after calling WeChat, with only
--   INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) VALUES (...)
-- (integer fen; out_trade_no names an order of wxpay_orders) and reads wxpay_refund_events as
-- an outbox (ORDER BY id). Every other column has a default or is the daemon's.

CREATE TABLE wxpay_refunds (
    id                 BIGSERIAL    PRIMARY KEY,
    mch_id             VARCHAR(32)  NOT NULL,
    out_trade_no       VARCHAR(32)  NOT NULL,
    out_refund_no      VARCHAR(64)  NOT NULL,
    -- integer fen
    refund_fee         BIGINT       NOT NULL CHECK (refund_fee > 0),
    state              VARCHAR(16)  NOT NULL DEFAULT 'PROCESSING' CHECK (state IN
                           ('PROCESSING', 'SUCCESS', 'CLOSED', 'ABNORMAL', 'NOT_FOUND',
                            'AMOUNT_MISMATCH')),
    -- WeChat's refund number, when and where the money went (kept by the daemon)
    refund_id          VARCHAR(32),
    success_time       TIMESTAMPTZ,
    refund_recv_accout VARCHAR(64),
    created_at         TIMESTAMPTZ  NOT NULL DEFAULT now(),
    query_count        INTEGER      NOT NULL DEFAULT 0,
    -- NULL means created_at + the refund schedule's first delay
    next_query_at      TIMESTAMPTZ,
    last_queried_at    TIMESTAMPTZ,
    last_error         TEXT,
    -- fencing token: bumped by every claim; a write carrying an older value is refused
    lease              BIGINT       NOT NULL DEFAULT 0,
    -- set when polling stopped (the refund horizon passed)
    gave_up_at         TIMESTAMPTZ,
    updated_at         TIMESTAMPTZ  NOT NULL DEFAULT now(),
    CONSTRAINT wxpay_refunds_mch_id_out_refund_no_key UNIQUE (mch_id, out_refund_no),
    CONSTRAINT wxpay_refunds_order_fk FOREIGN KEY (mch_id, out_trade_no)
        REFERENCES wxpay_orders (mch_id, out_trade_no)
);

-- The refund scan reads only these two partial indexes, as the order scan does: refunds in
-- PROCESSING, never queried (due at created_at + the first delay) or due at next_query_at.
CREATE INDEX wxpay_refunds_due_first ON wxpay_refunds (created_at)
    WHERE state = 'PROCESSING' AND gave_up_at IS NULL AND next_query_at IS NULL;
CREATE INDEX wxpay_refunds_due_next ON wxpay_refunds (next_query_at)
    WHERE state = 'PROCESSING' AND gave_up_at IS NULL AND next_query_at IS NOT NULL;
-- The stuck-refund gauges and `status`: open refunds per merchant, oldest first.
CREATE INDEX wxpay_refunds_open ON wxpay_refunds (mch_id, created_at)
    WHERE state = 'PROCESSING';
-- The refunds of one order (their sum never exceeds the order's total_fee), and the foreign key.
CREATE INDEX wxpay_refunds_order ON wxpay_refunds (mch_id, out_trade_no);
-- The gauges of ABNORMAL and quarantined refunds read only these rows.
CREATE INDEX wxpay_refunds_attention ON wxpay_refunds (mch_id)
    WHERE state IN ('ABNORMAL', 'AMOUNT_MISMATCH');

CREATE TABLE wxpay_refund_events (
    id             BIGSERIAL    PRIMARY KEY,
    -- wxpay_refunds.id (refund_id is WeChat's refund number)
    refund_row_id  BIGINT       NOT NULL REFERENCES wxpay_refunds (id),
    mch_id         VARCHAR(32)  NOT NULL,
    out_trade_no   VARCHAR(32)  NOT NULL,
    out_refund_no  VARCHAR(64)  NOT NULL,
    from_state     VARCHAR(16)  NOT NULL,
    to_state       VARCHAR(16)  NOT NULL,
    source         VARCHAR(8)   NOT NULL CHECK (source IN ('poll', 'notify', 'manual', 'bill')),
    refund_id      VARCHAR(32),
    -- what WeChat reported, integer fen
    refund_fee     BIGINT,
    detail         TEXT,
    created_at     TIMESTAMPTZ  NOT NULL DEFAULT now(),
    -- no transition is recorded twice
    CONSTRAINT wxpay_refund_events_refund_row_id_to_state_key UNIQUE (refund_row_id, to_state)
);
