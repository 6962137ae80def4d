//! The real binary, as an operator runs it: `simulate` on port 0, signals, config errors.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use wxpay_reconciler::wxpay::{OrderRef, QueryAnswer, WxPayError};

use crate::helpers::{client_for, md5_merchant, merchant, unique_otn};
use crate::process::{self, Ran, signal, wait_exit};

/// Starts `simulate --listen 127.0.0.1:0` (after `extra`, then `after`) and returns the child
/// and its base URL.
fn spawn_simulator(extra: &[&str], after: &[&str], envs: &[(&str, &str)]) -> (Child, String) {
    let mut child = process::command(None)
        .args(extra)
        .args(["simulate", "--listen", "127.0.0.1:0"])
        .args(after)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (child, url)
}

#[tokio::test]
async fn simulate_serves_until_sigterm_and_exits_zero() {
    for sig in ["TERM", "INT"] {
        let (mut child, url) = spawn_simulator(&[], &[], &[]);
        let answer = client_for(&url)
            .order_query(&md5_merchant(), &OrderRef::OutTradeNo(unique_otn("cli")))
            .await;
        assert_eq!(answer, Ok(QueryAnswer::NotExist));
        signal(child.id(), sig);
        let status = wait_exit(&mut child, Duration::from_secs(5));
        assert!(status.success(), "SIG{sig}: {status:?}");
    }
}

#[tokio::test]
async fn simulate_serves_the_merchants_of_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), "0123456789abcdef0123456789ABCDEF\n").unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        "[[merchants]]\nmch_id = \"1230000109\"\nappid = \"wxa1b2c3d4e5f6a7b8\"\nsign_type = \"HMAC-SHA256\"\napi_key_file = \"key\"\n",
    )
    .unwrap();
    // --config is accepted after the subcommand as well as before it.
    let (mut child, url) = spawn_simulator(&[], &["--config", cfg.to_str().unwrap()], &[]);

    let configured = merchant(
        "1230000109",
        "wxa1b2c3d4e5f6a7b8",
        wxpay_reconciler::wxpay::SignType::HmacSha256,
        "0123456789abcdef0123456789ABCDEF",
    );
    let client = client_for(&url);
    let n = OrderRef::OutTradeNo(unique_otn("cfg"));
    assert_eq!(
        client.order_query(&configured, &n).await,
        Ok(QueryAnswer::NotExist)
    );
    assert_eq!(
        client.order_query(&md5_merchant(), &n).await,
        Err(WxPayError::ReturnFail("mch_id参数错误".into())),
        "the default merchants are not served when a config names others"
    );
    signal(child.id(), "TERM");
    assert!(wait_exit(&mut child, Duration::from_secs(5)).success());
}

/// `simulate --config` with a v3 merchant and `[simulator]` keys: WeChat's side signs with the
/// configured key under the configured public key id, so a daemon holding that public key (the
/// same config file, loaded as `run` loads it) verifies the answers, and one holding the
/// embedded test key does not.
#[tokio::test]
async fn simulate_serves_v3_merchants_with_the_wechat_keys_of_a_config_file() {
    use wxpay_reconciler::wxpay::v3::{V3Client, V3Error};
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/wxpay-v3/keys");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("apiv3_key"),
        "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb\n",
    )
    .unwrap();
    let id = "PUB_KEY_ID_0000000000000000000000000000000042";
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[merchants]]\nmch_id = \"1900000100\"\nappid = \"wxd678efh567hg6787\"\napi = \"v3\"\n\
             private_key_file = \"{keys}/java_sdk_merchant_private_key.pem\"\n\
             cert_serial_no = \"5F1C72E2A8931B72A2E13AF8DEE92471EB397115\"\n\
             apiv3_key_file = \"apiv3_key\"\n\
             wechatpay_public_key_file = \"{keys}/java_sdk_wechat_pay_public_key.pem\"\n\
             wechatpay_public_key_id = \"{id}\"\n\n\
             [simulator]\nwechatpay_private_key_file = \"{keys}/java_sdk_wechat_pay_private_key.pem\"\n\
             wechatpay_public_key_id = \"{id}\"\n"
        ),
    )
    .unwrap();
    let (mut child, url) = spawn_simulator(&["--config", cfg.to_str().unwrap()], &[], &[]);

    let otn = unique_otn("v3cfg");
    let http = wxpay_reconciler::wxpay::client::http_client_builder()
        .build()
        .unwrap();
    let paid = http
        .post(format!("{url}/_sim/orders/1900000100/{}/pay", otn.as_str()))
        .header("Content-Type", "application/json")
        .body(r#"{"notify":"drop","total_fee":1234}"#)
        .send()
        .await
        .unwrap();
    assert!(paid.status().is_success(), "{:?}", paid.text().await);

    let settings = wxpay_reconciler::config::load(&cfg).unwrap();
    let configured = &settings.merchants[0];
    let client = V3Client::new(wxpay_reconciler::wxpay::ClientConfig::new(&url)).unwrap();
    let order = OrderRef::OutTradeNo(otn.clone());
    match client.order_query(configured, &order).await {
        Ok(QueryAnswer::Order(report)) => {
            assert_eq!(report.out_trade_no, otn);
            assert_eq!(
                report.trade_state,
                wxpay_reconciler::domain::TradeState::Success
            );
            assert_eq!(report.amount.map(|a| a.get()), Some(1234));
        }
        other => panic!("expected a verified SUCCESS, got {other:?}"),
    }
    // The embedded test keys are not WeChat's here: their answers do not verify.
    let embedded = wxpay_reconciler::sim::v3::test_v3_merchant().unwrap();
    match client.order_query(&embedded, &order).await {
        Err(V3Error::Unverified(..)) => {}
        other => panic!("an answer under another WeChat key must not verify, got {other:?}"),
    }
    signal(child.id(), "TERM");
    assert!(wait_exit(&mut child, Duration::from_secs(5)).success());
}

fn run_expecting_failure(args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut command = process::command(None);
    command.args(args).envs(envs.iter().copied());
    let ran = Ran::of(command);
    assert!(!ran.success(), "{args:?} must fail");
    ran.stderr
}

#[test]
fn a_bad_config_fails_fast_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    let cfg_s = cfg.to_str().unwrap();

    std::fs::write(&cfg, "[wechat]\ntimeout_ms = \"soon\"\n").unwrap();
    let err = run_expecting_failure(&["--config", cfg_s, "simulate"], &[]);
    assert!(
        err.contains(cfg_s) && err.contains("wechat.timeout_ms"),
        "{err}"
    );

    std::fs::write(&cfg, "[wechat]\nbase_url = \"http://127.0.0.1:1\"\n").unwrap();
    let err = run_expecting_failure(
        &["--config", cfg_s, "simulate"],
        &[("WXPAY_RECONCILER__WECHAT__CONCURRENCY", "0")],
    );
    assert!(
        err.contains("WXPAY_RECONCILER__WECHAT__CONCURRENCY") && err.contains("wechat.concurrency"),
        "{err}"
    );

    let err = run_expecting_failure(&["--config", cfg_s, "simulate"], &[]);
    assert!(err.contains("no [[merchants]]"), "{err}");

    let missing = dir.path().join("absent.toml");
    let err = run_expecting_failure(&["--config", missing.to_str().unwrap(), "simulate"], &[]);
    assert!(
        err.contains("absent.toml") && err.contains("not found"),
        "{err}"
    );

    std::fs::write(dir.path().join("key"), "not-a-key-but-a-secret\n").unwrap();
    std::fs::write(
        &cfg,
        "[[merchants]]\nmch_id = \"1\"\nappid = \"wx1\"\napi_key_file = \"key\"\n",
    )
    .unwrap();
    let err = run_expecting_failure(&["--config", cfg_s, "simulate"], &[]);
    assert!(err.contains("merchants[0].api_key_file"), "{err}");
    assert!(
        !err.contains("not-a-key-but-a-secret"),
        "the key's text never prints: {err}"
    );
}

#[tokio::test]
async fn demo_runs_with_no_config_and_no_service_and_prints_a_summary() {
    let mut command = process::command(None);
    command
        .args(["demo", "--orders", "200"])
        .env_remove("WXPAY_RECONCILER_CONFIG");
    let Ran {
        status,
        stdout,
        stderr,
    } = Ran::of_async(command).await;
    assert!(status.success(), "{stdout}\n{stderr}");
    for line in [
        "orders",
        "paid",
        "  notification delivered",
        "  notification lost",
        "settled as SUCCESS",
        "  settled by notification",
        "still open (never paid)",
        "WeChat queries spent",
        "payment -> settlement",
    ] {
        assert!(stdout.contains(line), "summary lacks {line:?}:\n{stdout}");
    }
    let number = |label: &str| -> i64 {
        stdout
            .lines()
            .find(|l| l.starts_with(label))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or(-1)
    };
    assert_eq!(number("orders"), 200);
    let paid = number("paid");
    assert_eq!(
        number("  notification delivered") + number("  notification lost"),
        paid
    );
    // Every delivered notification settles its order through the notify endpoint (a wrong
    // amount among them is quarantined instead).
    let notified = number("  notification delivered");
    let by_notify = number("  settled by notification");
    assert!(
        by_notify <= notified && by_notify >= notified - number("  of which a wrong amount"),
        "{stdout}"
    );
    assert_eq!(
        number("settled as SUCCESS") + number("quarantined AMOUNT_MISMATCH"),
        paid
    );
    assert_eq!(number("still open (never paid)"), 200 - paid);
    // Some settled orders are refunded, every refund answer lost: polling finds each one.
    assert_eq!(
        number("  refunded (by polling)") + number("  ABNORMAL (person acts)"),
        number("refunds requested"),
        "{stdout}"
    );
    assert_eq!(
        number("  orders now REFUND"),
        number("  refunded (by polling)"),
        "{stdout}"
    );
    // The day's bills, after the daemon stopped: one planted discrepancy of each kind found
    // (amount_diff also re-reports the orders quarantined for a wrong amount earlier).
    assert!(number("daily bills (rows)") > paid, "{stdout}");
    for kind in [
        "remote_only",
        "local_only",
        "state_diff",
        "settled_by_bill",
        "paid_after_close",
    ] {
        assert_eq!(number(&format!("  {kind} ")), 1, "{kind}: {stdout}");
    }
    assert_eq!(
        number("  amount_diff "),
        1 + number("quarantined AMOUNT_MISMATCH"),
        "{stdout}"
    );
    assert!(
        stderr.contains("reconciling:"),
        "plain progress lines in a pipe: {stderr}"
    );
}

/// `check-config` of v3 merchants: a bad one fails naming the file and the key (never the
/// secret); a good one is listed with its API and WeChat's keys.
#[test]
fn check_config_of_v3_merchants() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    let cfg_s = cfg.to_str().unwrap();
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let apiv3 = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb";
    std::fs::write(dir.path().join("apiv3_key"), format!("{apiv3}\n")).unwrap();
    let db = dir.path().join("orders.db");
    let config = |private_key: &str, apiv3_key_file: &str, extra: &str| {
        format!(
            "[database]\nurl = \"sqlite://{}\"\n\n[[merchants]]\nmch_id = \"1900000100\"\nappid = \"wxd678efh567hg6787\"\napi = \"v3\"\n\
             private_key_file = \"{fixtures}/{private_key}\"\ncert_serial_no = \"5F1C72E2A8931B72A2E13AF8DEE92471EB397115\"\n\
             apiv3_key_file = \"{apiv3_key_file}\"\n{extra}",
            db.display()
        )
    };
    let public_key = format!(
        "wechatpay_public_key_file = \"{fixtures}/wxpay-v3/keys/go_sdk_test_public_key.pem\"\n\
         wechatpay_public_key_id = \"PUB_KEY_ID_0000000000000024101100397200000006\"\n"
    );
    let merchant_key = "wxpay-v3/keys/java_sdk_merchant_private_key.pem";

    let cases = [
        (
            config("local/rsa1024_test_key.pem", "apiv3_key", &public_key),
            "merchants[0].private_key_file",
            "RSA-1024",
        ),
        (
            config(merchant_key, "absent", &public_key),
            "merchants[0].apiv3_key_file",
            "cannot read",
        ),
        (
            config(
                merchant_key,
                "apiv3_key",
                "platform_certificates = \"off\"\n",
            ),
            "merchants[0].platform_certificates",
            "could not be verified",
        ),
        (
            config(merchant_key, "apiv3_key", "sign_type = \"MD5\"\n"),
            "merchants[0].sign_type",
            "is a v2 key",
        ),
    ];
    for (text, key, what) in cases {
        std::fs::write(&cfg, &text).unwrap();
        let err = run_expecting_failure(&["--config", cfg_s, "check-config"], &[]);
        assert!(
            err.contains(cfg_s) && err.contains(key) && err.contains(what),
            "{text}: {err}"
        );
        assert!(!err.contains(apiv3), "{err}");
    }
    // An APIv3 key of the wrong length: named, never shown.
    std::fs::write(dir.path().join("apiv3_key"), &apiv3[..30]).unwrap();
    std::fs::write(&cfg, config(merchant_key, "apiv3_key", &public_key)).unwrap();
    let err = run_expecting_failure(&["--config", cfg_s, "check-config"], &[]);
    assert!(
        err.contains("merchants[0].apiv3_key_file") && err.contains("30 bytes"),
        "{err}"
    );
    assert!(!err.contains(&apiv3[..30]), "{err}");

    std::fs::write(dir.path().join("apiv3_key"), format!("{apiv3}\n")).unwrap();
    std::fs::write(&cfg, config(merchant_key, "apiv3_key", &public_key)).unwrap();
    for command in ["migrate", "check-config"] {
        let ran = Ran::of({
            let mut c = process::command(Some(&cfg));
            c.arg(command);
            c
        });
        assert!(ran.success(), "{command}: {}", ran.stderr);
        if command == "check-config" {
            assert!(
                ran.stdout.contains(
                    "1900000100 (wxd678efh567hg6787, v3 WECHATPAY2-SHA256-RSA2048, certificate 5F1C72E2A8931B72A2E13AF8DEE92471EB397115, WeChat's keys: public key PUB_KEY_ID_0000000000000024101100397200000006)"
                ),
                "{}",
                ran.stdout
            );
            assert!(!ran.stdout.contains(apiv3), "{}", ran.stdout);
        }
    }
}

/// `bills reconcile --file` of a bill a person downloaded (WeChat's official 45-row sample),
/// offline: the one order the shop holds open is settled from it, the other 44 lines are
/// WeChat's only; `bills status` lists the day. A documentation sample that does not add up is
/// refused (exit 1, nothing applied).
#[tokio::test]
async fn bills_reconcile_a_file_offline_then_bills_status() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    let db = dir.path().join("orders.db");
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/wxpay-bills");
    let key = "192006250b4c09247ec02edce69f6a2d";
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"sqlite://{}\"\n\n\
             [[merchants]]\nmch_id = \"1921000401\"\nappid = \"wxab8acd895ab1638a\"\napi_key_env = \"K\"\n\n\
             [[merchants]]\nmch_id = \"1579507281\"\nappid = \"wxe1696e7c7db8e7f4\"\napi_key_env = \"K\"\n",
            db.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let mut c = process::command(Some(&cfg));
        c.args(args).env("K", key).env("RUST_LOG", "warn");
        Ran::of(c)
    };
    assert!(run(&["migrate"]).success());
    // The shop's row of one payment of the bill (0.03 yuan, paid at 01:51:59 Beijing time).
    let store = wxpay_reconciler::store::Store::connect(&wxpay_reconciler::store::ConnectOptions {
        url: wxpay_reconciler::store::DatabaseUrl::new(&format!("sqlite://{}", db.display())),
        max_connections: 1,
        create_if_missing: false,
        acquire_timeout: Duration::from_secs(5),
    })
    .await
    .unwrap();
    store
        .insert_order(&wxpay_reconciler::store::NewOrder {
            mch_id: "1921000401",
            appid: "wxab8acd895ab1638a",
            out_trade_no: "autotest_20190219015157_13391",
            total_fee: 3,
        })
        .await
        .unwrap();
    let file = format!("{fixtures}/v3_all_official_sample_bom_crlf_45rows.csv");
    let ran = run(&[
        "bills",
        "reconcile",
        "--date",
        "2019-02-19",
        "--mch-id",
        "1921000401",
        "--file",
        &file,
        "--json",
    ]);
    assert!(ran.success(), "{}\n{}", ran.stdout, ran.stderr);
    let out: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
    let day = &out["bills"][0];
    assert_eq!(day["outcome"], "reconciled", "{out}");
    assert_eq!(day["bill"]["rows"], 45);
    assert_eq!(day["bill"]["payments"], 31);
    assert_eq!(day["bill"]["refunds"], 14);
    assert_eq!(
        day["bill"]["sha1"],
        "9bb6cd819be348f17a9cbcedddc8eb62fefbd790"
    );
    assert_eq!(day["bill"]["findings"]["settled_by_bill"], 1, "{out}");
    assert_eq!(day["bill"]["findings"]["remote_only"], 44, "{out}");
    assert_eq!(day["bill"]["findings"]["local_only"], 0);
    let row = store
        .find_order("1921000401", "autotest_20190219015157_13391")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.state, wxpay_reconciler::domain::OrderState::Success);
    assert_eq!(
        row.transaction_id.as_deref(),
        Some("4200000263201902167700136502")
    );

    // A documentation excerpt whose summary is for 29 rows: refused whole, exit 1.
    let excerpt = format!("{fixtures}/v2_all_excerpt_refund_of_older_order_xjryanse.txt");
    let ran = run(&[
        "bills",
        "reconcile",
        "--date",
        "2024-07-09",
        "--mch-id",
        "1579507281",
        "--file",
        &excerpt,
    ]);
    assert!(!ran.success(), "{}", ran.stdout);
    assert!(ran.stdout.contains("refused"), "{}", ran.stdout);
    assert!(ran.stdout.contains("summary_mismatch"), "{}", ran.stdout);
    assert!(ran.stderr.contains("not reconciled"), "{}", ran.stderr);

    let ran = run(&["bills", "status"]);
    assert!(ran.success(), "{}", ran.stderr);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert!(
        lines[0].starts_with("mch_id") && lines[0].contains("local_only"),
        "{}",
        ran.stdout
    );
    let line = |mch: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(mch))
            .copied()
            .unwrap_or("")
    };
    assert!(line("1921000401").contains("RECONCILED"), "{}", ran.stdout);
    assert!(line("1579507281").contains("REFUSED"), "{}", ran.stdout);
    // Aligned: every line puts its state in the header's column.
    let col = lines[0].find("state").unwrap();
    for l in &lines[1..] {
        assert!(
            l[col..].starts_with("RECONCILED") || l[col..].starts_with("REFUSED"),
            "{l}"
        );
    }
    let ran = run(&["bills", "status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(status["bills"].as_array().unwrap().len(), 2, "{status}");
}
