//! Plumbing shared by the binary's integration tests: a `sluice run` child that is killed when
//! the test ends (even by a panic), bounded waits on child processes, and reading the sequence
//! numbers a file sink wrote.
//!
//! Every wait here has a deadline: a test that cannot finish fails with what it saw instead of
//! hanging the suite (CI has a hard time limit for the whole run).

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Default `RUST_LOG` of a started pipeline (the MQTT source logs "subscribed" at debug).
pub const DEFAULT_LOG: &str = "info,sluice_sources::mqtt=debug";

/// A running `sluice run PIPELINE`. Its WARN / ERROR lines are echoed to the test's stderr
/// (prefixed `sluice:`). Dropping it kills the process, so a failed assertion never leaves a
/// pipeline running behind the test.
pub struct Sluice(KillOnDrop);

impl Sluice {
    /// Starts the pipeline with extra environment variables (`RUST_LOG` defaults to
    /// [`DEFAULT_LOG`]); with `ready`, waits up to 60 s for a stderr line containing it.
    pub fn start(pipeline: &Path, envs: &[(&str, &str)], ready: Option<&'static str>) -> Sluice {
        // State (disk buffers, anomaly baselines) goes to a data directory of this test
        // process, shared by its restarts, never to the crate directory (tests may override).
        let data = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("sluice-data-{}", std::process::id()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("run")
            .arg(pipeline)
            .env("RUST_LOG", DEFAULT_LOG)
            .env("SLUICE_DATA_DIR", data)
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sluice");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = ready.map(|r| (r, tx));
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.as_ref().is_some_and(|(r, _)| line.contains(r)) {
                    if let Some((_, tx)) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                // Also the binary's own error exit (`Error: …`, from anyhow at the edge).
                if line.contains("ERROR") || line.contains("WARN") || line.starts_with("Error") {
                    eprintln!("sluice: {line}");
                }
            }
        });
        let sluice = Sluice(KillOnDrop(child));
        if let Some(ready) = ready {
            if rx.recv_timeout(Duration::from_secs(60)).is_err() {
                panic!("sluice did not log {ready:?} within 60 s");
            }
        }
        sluice
    }

    /// Peak resident memory of the process so far (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0 .0.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    }

    /// SIGKILL, and reap the process.
    pub fn kill(self) {
        drop(self);
    }

    /// SIGINT, then waits up to `timeout` for the graceful exit; a process still running
    /// then is killed and the test fails.
    pub fn interrupt(mut self, timeout: Duration) -> ExitStatus {
        let child = &mut self.0 .0;
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        wait_child(child, timeout, "sluice after SIGINT")
    }
}

/// Waits up to `timeout` for `child` to exit; kills it and fails the test when it does not.
pub fn wait_child(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{what} (pid {}) did not exit within {timeout:?}",
                    child.id()
                );
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}

/// Sequence numbers (`fields.seq`) in a file sink's JSON lines, with how often each was
/// written. A SIGKILL can cut a line and the next run's first object is then glued to it:
/// every `{"time":…}` object on a line is parsed separately and cut ones are skipped.
pub fn written(path: &Path) -> BTreeMap<u64, u32> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut seen = BTreeMap::new();
    for line in text.lines() {
        let starts: Vec<usize> = line.match_indices("{\"time\":").map(|(i, _)| i).collect();
        for (k, start) in starts.iter().enumerate() {
            let end = starts.get(k + 1).copied().unwrap_or(line.len());
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line[*start..end]) else {
                continue;
            };
            if let Some(s) = v.pointer("/fields/seq").and_then(|s| s.as_u64()) {
                *seen.entry(s).or_insert(0) += 1;
            }
        }
    }
    seen
}

/// Waits until `path` holds `distinct` sequence numbers or `timeout` passed; returns what it
/// holds (the caller asserts).
pub fn wait_for(path: &Path, distinct: usize, timeout: Duration) -> BTreeMap<u64, u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = written(path);
        if seen.len() >= distinct || Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Fails the test, naming a few, when a sequence number below `messages` is missing.
pub fn assert_all_present(messages: u64, seen: &BTreeMap<u64, u32>) {
    let missing: Vec<u64> = (0..messages).filter(|s| !seen.contains_key(s)).collect();
    assert!(
        missing.is_empty(),
        "lost {} of {messages} messages, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

/// Writes beyond the first of each sequence number.
pub fn duplicates(seen: &BTreeMap<u64, u32>) -> u64 {
    seen.values().map(|n| u64::from(*n).saturating_sub(1)).sum()
}

/// A child process (a pipeline, a feeder) killed and reaped when dropped, so a failed test
/// does not leave it running. Killing one that already exited is a no-op.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fails the test, naming the start command, when mosquitto is not listening on 1883.
pub fn require_broker() {
    if std::net::TcpStream::connect_timeout(
        &"127.0.0.1:1883".parse().expect("address"),
        Duration::from_secs(2),
    )
    .is_err()
    {
        panic!("mosquitto is not listening on 127.0.0.1:1883: run `scripts/services.sh start`");
    }
}
