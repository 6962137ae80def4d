-- `status` lists the latest PAID_AFTER_CLOSE events (payments the merchant must refund or
-- fulfil) without reading the whole events table. MySQL has no partial indexes: this one leads
-- with to_state, so the anomalies are one short range of it.
CREATE INDEX wxpay_order_events_to_state ON wxpay_order_events (to_state, id);
