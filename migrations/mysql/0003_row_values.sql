-- Values the merchant's application may write (issue 12).
--
-- fee_type: the order's currency (optional; CNY unless the order says otherwise). A payment
-- reported in another currency is AMOUNT_MISMATCH, never SUCCESS.
-- set_aside_at / set_aside_reason: an order whose row holds a value the daemon cannot use is
-- set aside: it keeps its state, is not queried (gave_up_at is set with it, so the scan's
-- index leaves it out), is counted in wxpay_reconciler_set_aside_orders and listed by
-- `status`. Fix the value, then clear set_aside_at, set_aside_reason, gave_up_at and
-- next_query_at (README, "Security").
ALTER TABLE wxpay_orders
    ADD COLUMN fee_type VARCHAR(16) NOT NULL DEFAULT 'CNY',
    ADD COLUMN set_aside_at DATETIME(6) NULL,
    ADD COLUMN set_aside_reason TEXT NULL,
    ADD CONSTRAINT wxpay_orders_fee_type_code CHECK (fee_type REGEXP '^[A-Z]{3}$'),
    -- The set-aside gauge; the AMOUNT_MISMATCH one reads wxpay_orders_open (state first).
    ADD INDEX wxpay_orders_set_aside (set_aside_at, mch_id);

-- A zero date ('0000-00-00', or a zero month or day), which a server without NO_ZERO_DATE in
-- its sql_mode lets in, is no time: refused in created_at and expires_at from now on. Triggers,
-- not CHECKs: adding a CHECK would fail on a table that already holds one, and the triggers
-- look only at writes that change these columns. Old rows are read as they are; one the daemon
-- cannot read is set aside.
CREATE TRIGGER wxpay_orders_times_valid_insert BEFORE INSERT ON wxpay_orders FOR EACH ROW
    IF MONTH(NEW.created_at) = 0 OR DAYOFMONTH(NEW.created_at) = 0
       OR (NEW.expires_at IS NOT NULL AND (MONTH(NEW.expires_at) = 0 OR DAYOFMONTH(NEW.expires_at) = 0)) THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'wxpay_orders: created_at and expires_at must be real UTC times, not zero dates';
    END IF;
CREATE TRIGGER wxpay_orders_times_valid_update BEFORE UPDATE ON wxpay_orders FOR EACH ROW
    IF (NOT (NEW.created_at <=> OLD.created_at) AND (MONTH(NEW.created_at) = 0 OR DAYOFMONTH(NEW.created_at) = 0))
       OR (NOT (NEW.expires_at <=> OLD.expires_at) AND NEW.expires_at IS NOT NULL
           AND (MONTH(NEW.expires_at) = 0 OR DAYOFMONTH(NEW.expires_at) = 0)) THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'wxpay_orders: created_at and expires_at must be real UTC times, not zero dates';
    END IF;
