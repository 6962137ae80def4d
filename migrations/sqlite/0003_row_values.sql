-- Values the merchant's application may write (issue 12).
--
-- fee_type: the order's currency (optional; CNY unless the order says otherwise). A payment
-- reported in another currency is AMOUNT_MISMATCH, never SUCCESS.
ALTER TABLE wxpay_orders ADD COLUMN fee_type TEXT NOT NULL DEFAULT 'CNY'
    CHECK (fee_type GLOB '[A-Z][A-Z][A-Z]');
-- An order whose row holds a value the daemon cannot use is set aside: it keeps its state, is
-- not queried (gave_up_at is set with it, so the scan's indexes leave it out), is counted in
-- wxpay_reconciler_set_aside_orders and listed by `status`. Fix the value, then clear
-- set_aside_at, set_aside_reason, gave_up_at and next_query_at (README, "Security").
ALTER TABLE wxpay_orders ADD COLUMN set_aside_at TEXT;
ALTER TABLE wxpay_orders ADD COLUMN set_aside_reason TEXT;

-- The gauges of quarantined and set-aside orders read only these rows.
CREATE INDEX wxpay_orders_attention ON wxpay_orders (mch_id)
    WHERE state = 'AMOUNT_MISMATCH' OR set_aside_at IS NOT NULL;

-- The CHECKs of 0001 test only a prefix of the timestamps the application writes. From now on
-- created_at and expires_at must be a real time (no February 31st, no 24:00) that SQLite's
-- own date functions read:
-- 'YYYY-MM-DD HH:MM:SS[.fff]', optionally followed by Z or +HH:MM / -HH:MM (what Python's
-- sqlite3 writes for an aware datetime). Rows written before this migration are read as they
-- are; one the daemon cannot read is set aside.
CREATE TRIGGER wxpay_orders_times_valid_insert BEFORE INSERT ON wxpay_orders
WHEN datetime(NEW.created_at) IS NULL
  OR strftime('%Y-%m-%d %H:%M:%S', julianday(substr(NEW.created_at, 1, 19)))
     IS NOT substr(NEW.created_at, 1, 19)
  OR (NEW.expires_at IS NOT NULL AND (datetime(NEW.expires_at) IS NULL
      OR strftime('%Y-%m-%d %H:%M:%S', julianday(substr(NEW.expires_at, 1, 19)))
         IS NOT substr(NEW.expires_at, 1, 19)))
BEGIN
    SELECT RAISE(ABORT, 'wxpay_orders: created_at and expires_at must be UTC times YYYY-MM-DD HH:MM:SS[.SSS], optionally with Z or +HH:MM');
END;
CREATE TRIGGER wxpay_orders_times_valid_update BEFORE UPDATE OF created_at, expires_at ON wxpay_orders
WHEN datetime(NEW.created_at) IS NULL
  OR strftime('%Y-%m-%d %H:%M:%S', julianday(substr(NEW.created_at, 1, 19)))
     IS NOT substr(NEW.created_at, 1, 19)
  OR (NEW.expires_at IS NOT NULL AND (datetime(NEW.expires_at) IS NULL
      OR strftime('%Y-%m-%d %H:%M:%S', julianday(substr(NEW.expires_at, 1, 19)))
         IS NOT substr(NEW.expires_at, 1, 19)))
BEGIN
    SELECT RAISE(ABORT, 'wxpay_orders: created_at and expires_at must be UTC times YYYY-MM-DD HH:MM:SS[.SSS], optionally with Z or +HH:MM');
END;
-- A time written with an offset is stored as UTC in SQLite's own form, so that the text
-- comparisons of the scan and the gauges (which use the indexes) compare instants.
CREATE TRIGGER wxpay_orders_times_utc_insert AFTER INSERT ON wxpay_orders
WHEN substr(NEW.created_at, 20) GLOB '*[Zz+-]*' OR substr(NEW.expires_at, 20) GLOB '*[Zz+-]*'
BEGIN
    UPDATE wxpay_orders SET
        created_at = CASE WHEN substr(created_at, 20) GLOB '*[Zz+-]*'
            THEN strftime('%Y-%m-%d %H:%M:%f', created_at) ELSE created_at END,
        expires_at = CASE WHEN substr(expires_at, 20) GLOB '*[Zz+-]*'
            THEN strftime('%Y-%m-%d %H:%M:%f', expires_at) ELSE expires_at END
    WHERE id = NEW.id;
END;
CREATE TRIGGER wxpay_orders_times_utc_update AFTER UPDATE OF created_at, expires_at ON wxpay_orders
WHEN substr(NEW.created_at, 20) GLOB '*[Zz+-]*' OR substr(NEW.expires_at, 20) GLOB '*[Zz+-]*'
BEGIN
    UPDATE wxpay_orders SET
        created_at = CASE WHEN substr(created_at, 20) GLOB '*[Zz+-]*'
            THEN strftime('%Y-%m-%d %H:%M:%f', created_at) ELSE created_at END,
        expires_at = CASE WHEN substr(expires_at, 20) GLOB '*[Zz+-]*'
            THEN strftime('%Y-%m-%d %H:%M:%f', expires_at) ELSE expires_at END
    WHERE id = NEW.id;
END;
