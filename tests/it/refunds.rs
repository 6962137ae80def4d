//! Refunds (issue 15): the schema contract the merchant's application relies on, on every
//! backend.

use crate::db::{Kind, backends};
use crate::helpers::unique_otn;

const MCH: &str = "10000100";
const APPID: &str = "wxd930ea5d5a258f4f";

/// As text on every backend (PostgreSQL and MySQL need an explicit cast of an integer).
fn as_text(kind: Kind, column: &str) -> String {
    match kind {
        Kind::Mysql => format!("CAST({column} AS CHAR)"),
        _ => format!("CAST({column} AS TEXT)"),
    }
}

#[tokio::test]
async fn the_merchant_registers_a_refund_with_four_columns_and_the_schema_keeps_it_sound() {
    for db in backends().await {
        let kind = db.kind;
        let otn = unique_otn("rf").to_string();
        let order = format!(
            "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee) VALUES ('{MCH}', '{APPID}', $1, 1000)"
        );
        assert_eq!(db.exec(&order, &[&otn]).await, 1);
        let refund = "INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) \
                      VALUES ($1, $2, $3, 300)";
        let orn = format!("R{otn}");
        // The contract: these four columns, nothing else.
        assert_eq!(db.exec(refund, &[MCH, &otn, &orn]).await, 1, "{kind:?}");
        let row = format!(
            "SELECT {} FROM wxpay_refunds WHERE out_refund_no = '{orn}'",
            [
                "state".to_owned(),
                as_text(kind, "query_count"),
                as_text(kind, "lease"),
                as_text(kind, "refund_fee"),
            ]
            .join(" || '/' || ")
        );
        let row = match kind {
            // MySQL's || is OR: CONCAT_WS instead.
            Kind::Mysql => format!(
                "SELECT CONCAT_WS('/', state, query_count, lease, refund_fee) FROM wxpay_refunds WHERE out_refund_no = '{orn}'"
            ),
            _ => row,
        };
        assert_eq!(
            db.text(&row).await.as_deref(),
            Some("PROCESSING/0/0/300"),
            "{kind:?}"
        );
        for column in [
            "next_query_at",
            "refund_id",
            "success_time",
            "refund_recv_accout",
            "gave_up_at",
        ] {
            assert_eq!(
                db.text(&format!(
                    "SELECT {} FROM wxpay_refunds WHERE out_refund_no = '{orn}'",
                    as_text(kind, column)
                ))
                .await,
                None,
                "{kind:?}: {column} is the daemon's and starts empty"
            );
        }

        // Unique per merchant and out_refund_no.
        assert!(
            db.try_exec(refund, &[MCH, &otn, &orn]).await.is_err(),
            "{kind:?}: duplicate"
        );
        // The order must exist (the same out_trade_no at another merchant is another order).
        let stray = format!("S{otn}");
        assert!(
            db.try_exec(refund, &[MCH, &format!("x{otn}"), &stray])
                .await
                .is_err(),
            "{kind:?}: a refund of an unknown order"
        );
        assert!(
            db.try_exec(refund, &["1900000109", &otn, &stray])
                .await
                .is_err(),
            "{kind:?}: a refund of another merchant's order"
        );
        // Integer fen, positive; a known state only.
        for fee in ["0", "-1"] {
            let bad = format!(
                "INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) VALUES ($1, $2, $3, {fee})"
            );
            assert!(
                db.try_exec(&bad, &[MCH, &otn, &stray]).await.is_err(),
                "{kind:?}: fee {fee}"
            );
        }
        assert!(
            db.try_exec(
                "UPDATE wxpay_refunds SET state = 'REFUNDED' WHERE out_refund_no = $1",
                &[&orn]
            )
            .await
            .is_err(),
            "{kind:?}: an unknown state"
        );

        // The outbox: one event per refund and state, a known source.
        let id = db
            .text(&format!(
                "SELECT {} FROM wxpay_refunds WHERE out_refund_no = '{orn}'",
                as_text(kind, "id")
            ))
            .await
            .unwrap();
        let event = |to: &str, source: &str| {
            format!(
                "INSERT INTO wxpay_refund_events (refund_row_id, mch_id, out_trade_no, out_refund_no, from_state, to_state, source) \
                 VALUES ({id}, '{MCH}', '{otn}', '{orn}', 'PROCESSING', '{to}', '{source}')"
            )
        };
        assert_eq!(db.exec(&event("SUCCESS", "poll"), &[]).await, 1);
        assert!(
            db.try_exec(&event("SUCCESS", "notify"), &[]).await.is_err(),
            "{kind:?}: twice"
        );
        assert_eq!(db.exec(&event("CLOSED", "bill"), &[]).await, 1);
        assert!(
            db.try_exec(&event("ABNORMAL", "guess"), &[]).await.is_err(),
            "{kind:?}: source"
        );
        db.cleanup().await;
    }
}
