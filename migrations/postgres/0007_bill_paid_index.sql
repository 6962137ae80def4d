-- no-transaction
-- The local side of a bill day: the orders of a merchant paid in [from, to). Only paid orders
-- are in it. Built CONCURRENTLY (outside a transaction, hence the first line), as 0002: the
-- merchant's application keeps writing orders while a large table is indexed.
CREATE INDEX CONCURRENTLY IF NOT EXISTS wxpay_orders_paid ON wxpay_orders (mch_id, paid_at)
    WHERE state IN ('SUCCESS', 'REFUND');
