//! Secrets in error paths: the real binary, given a database password or an API key in a place
//! where it cannot be used, says which file (or variable) and which key is wrong, and never
//! prints the secret.

use std::path::Path;

use crate::process::{self, Ran};

/// The database password of every URL below.
const PASSWORD: &str = "Pw4s3cretZq";
/// An API key put where its file, variable or credential name belongs.
const KEY: &str = "Qk7Vb2Xn9Lm4Rt6Wy8Za1Sd3Fg5Hj0Pe";

const MERCHANT: &str = "[[merchants]]\nmch_id = \"10000100\"\nappid = \"wxd930ea5d5a258f4f\"\napi_key_file = \"md5.key\"\n";

/// Runs `command` with `config` and `envs`; it must fail. Returns its stderr.
fn fails(config: &Path, command: &str, envs: &[(&str, &str)]) -> String {
    let mut binary = process::command(Some(config));
    binary
        .arg(command)
        .env_remove("CREDENTIALS_DIRECTORY")
        .envs(envs.iter().copied())
        .env("RUST_LOG", "info");
    let Ran {
        status,
        stdout,
        stderr,
    } = Ran::of(binary);
    assert!(!status.success(), "{command} must fail: {stdout}{stderr}");
    assert!(
        !stdout.contains(PASSWORD) && !stdout.contains(KEY),
        "{stdout}"
    );
    stderr
}

fn dir_with_key() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("md5.key"), crate::helpers::MD5_KEY).unwrap();
    dir
}

/// URLs the drivers refuse before connecting, each with the password in its userinfo.
fn unparseable_urls() -> Vec<String> {
    let p = PASSWORD;
    vec![
        format!("postgres://app:{p}@db:99999/shop"),
        format!("postgres://app:{p}@[::1/shop"),
        format!("postgres://app:{p}@db host/shop"),
        format!("postgresql://app:{p}@db:5432:1/shop"),
        format!("mysql://app:{p}@db:70000/shop"),
        format!("mariadb://app:{p}@[fe80::1%/shop"),
        // An unencoded '/' in the password ends the authority early.
        format!("mysql://app:{p}/x@db/shop"),
        // The password as a query parameter.
        format!("postgres://app@db:99999/shop?password={p}"),
    ]
}

#[test]
fn an_unparseable_database_url_in_the_file_never_prints_its_password() {
    let dir = dir_with_key();
    let cfg = dir.path().join("config.toml");
    let cfg_s = cfg.display().to_string();
    for url in unparseable_urls() {
        std::fs::write(&cfg, format!("[database]\nurl = \"{url}\"\n{MERCHANT}")).unwrap();
        for command in ["check-config", "migrate", "run"] {
            let err = fails(&cfg, command, &[]);
            assert!(!err.contains(PASSWORD), "{url} {command}: {err}");
            assert!(
                err.contains(&cfg_s) && err.contains("database.url"),
                "{url} {command}: names the file and the key: {err}"
            );
            assert!(err.contains("***"), "{url} {command}: {err}");
        }
    }
}

#[test]
fn an_unparseable_database_url_from_the_environment_never_prints_its_password() {
    let dir = dir_with_key();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, MERCHANT).unwrap();
    for url in unparseable_urls() {
        for command in ["check-config", "migrate", "run"] {
            let err = fails(
                &cfg,
                command,
                &[("WXPAY_RECONCILER__DATABASE__URL", url.as_str())],
            );
            assert!(!err.contains(PASSWORD), "{url} {command}: {err}");
            assert!(
                err.contains("WXPAY_RECONCILER__DATABASE__URL") && err.contains("database.url"),
                "{url} {command}: names the variable and the key: {err}"
            );
        }
    }
    // The URL in a variable that expects a table.
    let url = format!("postgres://app:{PASSWORD}@db/shop");
    let err = fails(
        &cfg,
        "check-config",
        &[("WXPAY_RECONCILER__DATABASE", url.as_str())],
    );
    assert!(!err.contains(PASSWORD), "{err}");
    assert!(err.contains("WXPAY_RECONCILER__DATABASE"), "{err}");
}

#[test]
fn a_toml_syntax_error_on_the_url_line_does_not_quote_the_line() {
    let dir = dir_with_key();
    let cfg = dir.path().join("config.toml");
    let cfg_s = cfg.display().to_string();
    let p = PASSWORD;
    let cases = [
        // The closing quote forgotten.
        (
            format!("[database]\nurl = \"postgres://app:{p}@db/shop\n{MERCHANT}"),
            "line 2",
        ),
        // No quotes at all.
        (
            format!("[database]\nurl = postgres://app:{p}@db/shop\n{MERCHANT}"),
            "line 2",
        ),
        // A stray character after the value.
        (
            format!(
                "{MERCHANT}\n[database]\nmax_connections = 4\nurl = 'mysql://app:{p}@db/shop' x\n"
            ),
            "line 8",
        ),
        // An API key on a line with a syntax error.
        (
            format!("[[merchants]]\nmch_id = \"1\"\nappid = \"wx1\"\napi_key_file = \"{KEY}\n"),
            "line 4",
        ),
    ];
    for (text, line) in cases {
        std::fs::write(&cfg, &text).unwrap();
        for command in ["check-config", "migrate", "run"] {
            let err = fails(&cfg, command, &[]);
            assert!(!err.contains(p) && !err.contains(KEY), "{command}: {err}");
            assert!(
                err.contains(&cfg_s) && err.contains(line),
                "{command}: names the file and the line: {err}"
            );
        }
    }
    // The key is named when the line sets one.
    std::fs::write(
        &cfg,
        format!("[database]\nurl = \"postgres://app:{p}@db/shop\n{MERCHANT}"),
    )
    .unwrap();
    let err = fails(&cfg, "check-config", &[]);
    assert!(err.contains("database.url"), "{err}");
}

#[test]
fn an_api_key_where_its_file_variable_or_credential_name_belongs_is_never_echoed() {
    let dir = dir_with_key();
    let cfg = dir.path().join("config.toml");
    let cfg_s = cfg.display().to_string();
    let creds = tempfile::tempdir().unwrap();
    let creds_s = creds.path().display().to_string();
    for setting in ["api_key_file", "api_key_env", "api_key_credential"] {
        for value in [
            KEY.to_owned(),
            // With the spaces and newline of a careless paste.
            format!(" {KEY}\\n"),
            // As `NAME=value`, copied from an environment file.
            format!("WXPAY_KEY={KEY}"),
        ] {
            std::fs::write(
                &cfg,
                format!(
                    "[[merchants]]\nmch_id = \"1\"\nappid = \"wx1\"\n{setting} = \"{value}\"\n"
                ),
            )
            .unwrap();
            for envs in [vec![], vec![("CREDENTIALS_DIRECTORY", creds_s.as_str())]] {
                for command in ["check-config", "run"] {
                    let err = fails(&cfg, command, &envs);
                    assert!(!err.contains(KEY), "{setting} = {value:?} {command}: {err}");
                    let key = format!("merchants[0].{setting}");
                    assert!(
                        err.contains(&cfg_s) && err.contains(&key),
                        "{setting} {command}: names the file and the key: {err}"
                    );
                }
            }
        }
    }
    // A plain name is still shown: it helps, and it is no secret.
    std::fs::write(
        &cfg,
        "[[merchants]]\nmch_id = \"1\"\nappid = \"wx1\"\napi_key_env = \"WXPAY_MD5_KEY\"\n",
    )
    .unwrap();
    let err = fails(&cfg, "check-config", &[]);
    assert!(err.contains("WXPAY_MD5_KEY"), "{err}");
}

#[test]
fn a_mistyped_password_parameter_is_named_but_its_value_never_logged() {
    let dir = dir_with_key();
    let cfg = dir.path().join("config.toml");
    // sqlx warns about a parameter it does not know with its value; `sslmode=bogus` then makes
    // the URL fail before any connection is tried.
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"postgres://app@db/shop?pasword={PASSWORD}&sslmode=bogus\"\n{MERCHANT}"
        ),
    )
    .unwrap();
    for command in ["check-config", "migrate", "run"] {
        let err = fails(&cfg, command, &[]);
        assert!(!err.contains(PASSWORD), "{command}: {err}");
        assert!(
            err.contains("pasword"),
            "{command}: the parameter is named: {err}"
        );
    }
}

/// A FAIL answer to a notification tells an unauthenticated caller nothing about the
/// merchants: not which exist, not which sign type each uses, nothing it sent.
#[tokio::test]
async fn fail_answers_reveal_neither_merchants_nor_sign_types() {
    use super::logs::{
        RunningDaemon, forged_notification, http, notification, post, stranger_notification,
    };
    use crate::helpers::{hmac_merchant, md5_merchant};
    use wxpay_reconciler::wxpay::SignType;
    use wxpay_reconciler::wxpay::xml;

    let daemon = RunningDaemon::start(&crate::helpers::closed_port_url().await).await;
    let http = http();
    let other_key = "0123456789abcdef0123456789abcdef";
    let (md5, hmac) = (md5_merchant(), hmac_merchant());
    let mut unsigned = notification(&md5, other_key, SignType::Md5);
    unsigned.remove("sign");
    let cases = [
        ("unknown merchant", stranger_notification()),
        ("MD5 merchant, another key", forged_notification()),
        (
            "HMAC merchant, another key",
            notification(&hmac, other_key, SignType::HmacSha256),
        ),
        // A probe for the sign type: the other one declared, with a key the prober does not have.
        (
            "MD5 merchant, HMAC-SHA256 declared",
            notification(&md5, other_key, SignType::HmacSha256),
        ),
        (
            "HMAC merchant, MD5 declared",
            notification(&hmac, other_key, SignType::Md5),
        ),
        ("MD5 merchant, unsigned", unsigned),
    ];
    let mut answers = Vec::new();
    for (what, fields) in &cases {
        let (status, answer) = post(&http, &daemon.notify_url, xml::encode(fields).unwrap()).await;
        assert_eq!(
            (status, answer.get("return_code")),
            (200, Some("FAIL")),
            "{what}"
        );
        let msg = answer.get("return_msg").unwrap_or_default().to_owned();
        for secret in [
            "10000100",
            "1900000109",
            "1234567890",
            "MD5",
            "HMAC",
            "SHA",
            "configured",
            "sign_type",
            "signed with",
        ] {
            assert!(
                !msg.to_ascii_uppercase()
                    .contains(&secret.to_ascii_uppercase()),
                "{what}: the answer {msg:?} tells {secret:?}"
            );
        }
        answers.push((what, msg));
    }
    assert!(
        answers.iter().all(|(_, m)| *m == answers[0].1),
        "one answer for an unknown merchant and a bad signature: {answers:?}"
    );
    // The operator still sees the precise reasons.
    daemon.settle_log().await;
    let log = String::from_utf8_lossy(&daemon.log()).into_owned();
    assert!(
        log.contains("1234567890") && log.contains("not configured"),
        "{log}"
    );
    assert!(log.contains("signature"), "{log}");
    daemon.stop().await;
}
