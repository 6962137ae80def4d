//! Third-party SDKs against the simulator: Python's wechatpy creates, pays, queries and closes
//! orders with both v2 sign types and verifies every reply, and downloads the daily bill
//! (tests/interop/wechatpy_interop.py); Python's wechatpayv3 queries and closes v3 orders in
//! both key modes with its own signing and verification, verifies and decrypts the
//! notifications the simulator delivers, and fetches a bill with `trade_bill` /
//! `download_bill`, checking its SHA-1 (tests/interop/wechatpayv3_interop.py).
//!
//! Runs when `WXPAY_TEST_WECHATPY_PYTHON` names a Python with the pinned
//! tests/interop/requirements.txt installed (`.ci/run` makes one); `WXPAY_TEST_REQUIRE_INTEROP=1`
//! turns a missing interpreter into a failure instead of a skip, so CI can never pass without it.

use std::path::Path;

use crate::helpers::TestSim;

/// Runs `tests/interop/{script}` against a fresh simulator; skips without the interpreter.
async fn run_interop_script(script: &str) {
    let Some(python) = std::env::var_os("WXPAY_TEST_WECHATPY_PYTHON") else {
        assert!(
            std::env::var_os("WXPAY_TEST_REQUIRE_INTEROP").is_none(),
            "WXPAY_TEST_REQUIRE_INTEROP is set but WXPAY_TEST_WECHATPY_PYTHON is not"
        );
        eprintln!("skipped: set WXPAY_TEST_WECHATPY_PYTHON to run {script}");
        return;
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interop")
        .join(script);
    let sim = TestSim::start().await;
    let out = tokio::process::Command::new(python)
        .arg("-B")
        .arg(&path)
        .arg("--base-url")
        .arg(format!("{}/", sim.url()))
        .output()
        .await
        .expect("cannot run the interop script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.ends_with(" passed, 0 failed") && !summary.starts_with("0 passed"),
        "unexpected summary {summary:?}\n{stdout}"
    );
    sim.stop().await;
}

#[tokio::test]
async fn wechatpy_creates_pays_queries_and_closes_orders_with_both_sign_types() {
    run_interop_script("wechatpy_interop.py").await;
}

#[tokio::test]
async fn wechatpayv3_queries_closes_and_verifies_notifications_in_both_key_modes() {
    run_interop_script("wechatpayv3_interop.py").await;
}
