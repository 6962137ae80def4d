//! A third-party SDK against the simulator: Python's wechatpy creates, pays, queries and closes
//! orders with both sign types and verifies every reply (tests/interop/wechatpy_interop.py).
//!
//! Runs when `WXPAY_TEST_WECHATPY_PYTHON` names a Python with the pinned wechatpy installed
//! (`.ci/run` makes one); `WXPAY_TEST_REQUIRE_INTEROP=1` turns a missing interpreter into a
//! failure instead of a skip, so CI can never pass without it.

use std::path::Path;

use crate::helpers::TestSim;

#[tokio::test]
async fn wechatpy_creates_pays_queries_and_closes_orders_with_both_sign_types() {
    let Some(python) = std::env::var_os("WXPAY_TEST_WECHATPY_PYTHON") else {
        assert!(
            std::env::var_os("WXPAY_TEST_REQUIRE_INTEROP").is_none(),
            "WXPAY_TEST_REQUIRE_INTEROP is set but WXPAY_TEST_WECHATPY_PYTHON is not"
        );
        eprintln!("skipped: set WXPAY_TEST_WECHATPY_PYTHON to run the wechatpy interop test");
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/wechatpy_interop.py");
    let sim = TestSim::start().await;
    let out = tokio::process::Command::new(python)
        .arg("-B")
        .arg(&script)
        .arg("--base-url")
        .arg(format!("{}/", sim.url()))
        .output()
        .await
        .expect("cannot run the interop script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "wechatpy interop failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.ends_with(" passed, 0 failed") && !summary.starts_with("0 passed"),
        "unexpected summary {summary:?}\n{stdout}"
    );
    sim.stop().await;
}
