-- no-transaction
-- The gauges of quarantined (AMOUNT_MISMATCH) and set-aside orders read only these rows.
-- Built CONCURRENTLY (outside a transaction, hence the first line), as 0002.
CREATE INDEX CONCURRENTLY IF NOT EXISTS wxpay_orders_attention ON wxpay_orders (mch_id)
    WHERE state = 'AMOUNT_MISMATCH' OR set_aside_at IS NOT NULL;
