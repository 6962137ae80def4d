//! The real binary, the one way the tests run it: [`command`] for a command that runs to its
//! end ([`Ran`] is what it printed), [`RealDaemon`] for `run` (started, its stderr collected
//! byte for byte and line by line, killed when dropped), [`signal`] and [`wait_exit`].

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_wxpay-reconciler");

/// The binary with `--config CONFIG` first when given; the caller adds the rest.
pub(crate) fn command(config: Option<&Path>) -> Command {
    let mut command = Command::new(BIN);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command
}

/// What a command that ran to its end printed.
pub(crate) struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Runs `command` to its end, blocking.
    pub(crate) fn of(mut command: Command) -> Ran {
        Ran::from(command.output().unwrap())
    }

    /// Runs `command` to its end without blocking the test's runtime (a simulator may live
    /// there).
    pub(crate) async fn of_async(command: Command) -> Ran {
        Ran::from(
            tokio::process::Command::from(command)
                .output()
                .await
                .unwrap(),
        )
    }

    pub(crate) fn success(&self) -> bool {
        self.status.success()
    }
}

impl From<std::process::Output> for Ran {
    fn from(out: std::process::Output) -> Ran {
        Ran {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Sends `SIGNAME` to the process `pid` (`name` without the `SIG`).
pub(crate) fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the child to exit, at most `bound` (then kills it and fails).
pub(crate) fn wait_exit(child: &mut Child, bound: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > bound {
            let _ = child.kill();
            panic!("did not exit within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A daemon's stderr: every byte, and each complete line with when it arrived.
#[derive(Default)]
pub(crate) struct Log {
    pub bytes: Vec<u8>,
    pub lines: Vec<(Instant, String)>,
}

/// The real `run`, killed when dropped (a failing test leaves nothing running).
pub(crate) struct RealDaemon {
    pub child: Child,
    pub metrics: SocketAddr,
    pub notify: Option<SocketAddr>,
    pub log: Arc<Mutex<Log>>,
}

impl Drop for RealDaemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl RealDaemon {
    /// Starts `run` with `config`, `RUST_LOG=info` and `env`, at most `max_fds` open files when
    /// given; returns once it logged "reconciler running".
    pub(crate) async fn start(
        config: &Path,
        env: &[(&str, &str)],
        max_fds: Option<u64>,
    ) -> RealDaemon {
        let mut command = command(Some(config));
        command.env("RUST_LOG", "info").envs(env.iter().copied());
        if let Some(max) = max_fds {
            // SAFETY: setrlimit is async-signal-safe and touches only the child's limits.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: max,
                        rlim_max: max,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        RealDaemon::spawn(command).await
    }

    /// Runs `command` (the binary with its config and environment) as `run`, and returns once
    /// it logged "reconciler running", with the metrics and notify addresses it names.
    pub(crate) async fn spawn(mut command: Command) -> RealDaemon {
        let mut child = command
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let started = collect(stderr, log.clone());
        let line = tokio::time::timeout(Duration::from_secs(20), started)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("run did not start:\n{}", joined(&log)));
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
        };
        let metrics = field("metrics=").unwrap().parse().unwrap();
        let notify = field("notify=Some(").map(|a| a.trim_end_matches(')').parse().unwrap());
        RealDaemon {
            child,
            metrics,
            notify,
            log,
        }
    }

    /// The complete lines logged so far, joined by newlines.
    pub(crate) fn log_text(&self) -> String {
        joined(&self.log)
    }

    /// Every byte logged so far.
    pub(crate) fn log_bytes(&self) -> Vec<u8> {
        self.log.lock().unwrap().bytes.clone()
    }

    /// SIGTERM, and the exit status within the drain deadline.
    pub(crate) async fn terminate(&mut self) -> ExitStatus {
        signal(self.child.id(), "TERM");
        self.exit_within(Duration::from_secs(12)).await
    }

    /// The exit status, once it exits by itself within `bound`.
    pub(crate) async fn exit_within(&mut self, bound: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < bound,
                "did not exit within {bound:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Reads `stderr` into `log` on a thread of its own; the answer is the start line.
fn collect(
    mut stderr: std::process::ChildStderr,
    log: Arc<Mutex<Log>>,
) -> tokio::sync::oneshot::Receiver<String> {
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut started = Some(started_tx);
        let mut buf = [0u8; 8192];
        let mut partial: Vec<u8> = Vec::new();
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut log = log.lock().unwrap();
            log.bytes.extend_from_slice(&buf[..n]);
            partial.extend_from_slice(&buf[..n]);
            while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                let text = partial[..end]
                    .strip_suffix(b"\r")
                    .unwrap_or(&partial[..end]);
                let line = String::from_utf8_lossy(text).into_owned();
                partial.drain(..=end);
                if line.contains("reconciler running")
                    && let Some(tx) = started.take()
                {
                    let _ = tx.send(line.clone());
                }
                log.lines.push((Instant::now(), line));
            }
        }
    });
    started_rx
}

fn joined(log: &Mutex<Log>) -> String {
    log.lock()
        .unwrap()
        .lines
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}
