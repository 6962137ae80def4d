-- Values the merchant's application may write (issue 12).
--
-- fee_type: the order's currency (optional; CNY unless the order says otherwise). A payment
-- reported in another currency is AMOUNT_MISMATCH, never SUCCESS. (A constant default: no
-- table rewrite.)
ALTER TABLE wxpay_orders ADD COLUMN fee_type VARCHAR(16) NOT NULL DEFAULT 'CNY'
    CONSTRAINT wxpay_orders_fee_type_code CHECK (fee_type ~ '^[A-Z]{3}$');
-- An order whose row holds a value the daemon cannot use is set aside: it keeps its state, is
-- not queried (gave_up_at is set with it, so the scan's indexes leave it out), is counted in
-- wxpay_reconciler_set_aside_orders and listed by `status`. Fix the value, then clear
-- set_aside_at, set_aside_reason, gave_up_at and next_query_at (README, "Security").
ALTER TABLE wxpay_orders ADD COLUMN set_aside_at TIMESTAMPTZ;
ALTER TABLE wxpay_orders ADD COLUMN set_aside_reason TEXT;

-- created_at and expires_at as the application writes them: expires_at may be 'infinity'
-- (PostgreSQL's "never": no expiry); '-infinity' and times outside years 1970 to 9999 have no
-- meaning for an order and are refused from now on. A trigger, not a CHECK: a CHECK would also
-- refuse the daemon's own updates of a row written before this migration; the trigger looks
-- only at writes of these two columns. Old rows are read as they are; one the daemon cannot
-- read is set aside.
CREATE FUNCTION wxpay_orders_times_valid() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT (isfinite(NEW.created_at)
            AND NEW.created_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 23:59:59.999999+00') THEN
        RAISE EXCEPTION 'wxpay_orders.created_at must be a time between 1970 and 9999, not %', NEW.created_at
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.expires_at IS NOT NULL AND NEW.expires_at <> 'infinity'
       AND NOT (isfinite(NEW.expires_at)
                AND NEW.expires_at BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 23:59:59.999999+00') THEN
        RAISE EXCEPTION 'wxpay_orders.expires_at must be NULL, ''infinity'' or a time between 1970 and 9999, not %', NEW.expires_at
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER wxpay_orders_times_valid BEFORE INSERT OR UPDATE OF created_at, expires_at
    ON wxpay_orders FOR EACH ROW EXECUTE FUNCTION wxpay_orders_times_valid();
