-- no-transaction
-- `status` lists the latest PAID_AFTER_CLOSE events (payments the merchant must refund or
-- fulfil) without reading the whole events table: a partial index holds only those rows.
-- Built CONCURRENTLY (outside a transaction, hence the first line): the merchant's application
-- and running daemons keep writing events while a large outbox is indexed.
CREATE INDEX CONCURRENTLY IF NOT EXISTS wxpay_order_events_paid_after_close
    ON wxpay_order_events (id) WHERE to_state = 'PAID_AFTER_CLOSE';
