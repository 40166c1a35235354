//! Issue 12, item 3 (dedupe): the keys `dedupe` has seen survive a restart, so that a message
//! redelivered after a crash (MQTT redelivers a message whose PUBACK was never sent) is still
//! recognised as a duplicate. Only keys whose first copy was delivered or rejected count as
//! seen: the copies of a key still pending (or errored) when the state was saved must pass
//! after the restart, or data no sink has would be acknowledged.
//!
//! Each instance is built through the registry's `TransformConfig::build` with a real state
//! directory, as the topology builds it; "restart" is a new instance on the same directory.

use std::path::Path;
use std::time::{Duration, Instant};

use sluice_core::ack::{self, BatchStatus, StatusReceiver};
use sluice_core::record::{Batch, Record, Value};
use sluice_core::registry::{BuildContext, TransformConfig};
use sluice_core::transform::{Transform, TransformOutput};
use sluice_transforms::dedupe::DedupeConfig;

/// 2024-01-01T00:00:00Z, in ns: event times well in the past of the wall clock.
const BASE: i64 = 1_704_067_200_000_000_000;
const S: i64 = 1_000_000_000;

/// The snapshot's file name (the test looks for it to know a periodic write landed).
const SNAPSHOT: &str = "dedupe-keys.json";

async fn dedupe(state_dir: &Path, extra: &str) -> Box<dyn Transform> {
    let config: DedupeConfig = toml::from_str(&format!(
        "key = [\"tags.device_id\", \"seq\"]\nwindow = \"10m\"\n{extra}"
    ))
    .expect("valid config");
    let cx = BuildContext {
        name: "dedupe".into(),
        pipeline_id: "test".into(),
        state_dir: Some(state_dir.to_path_buf()),
    };
    config.build(&cx).await.expect("builds")
}

/// A message from `device` with sequence number `seq` at `secs`, carrying a finalizer back to
/// its (one-record) source batch.
fn message(secs: i64, device: &str, seq: i64) -> (Record, StatusReceiver) {
    let (finalizer, status) = ack::batch();
    let mut r = Record::new(BASE + secs * S);
    r.set_tag("device_id", device);
    r.set_field("seq", Value::I64(seq));
    r.finalizers.push(finalizer);
    (r, status)
}

/// Processes `records`; returns what passed on the default output (dead letters fail the test).
fn pass(d: &mut dyn Transform, records: Vec<Record>) -> Vec<Record> {
    let mut out = TransformOutput::default();
    d.process(Batch::new(records), &mut out);
    let mut passed = Vec::new();
    for (name, records) in out.take() {
        assert_eq!(name, "default", "nothing is dead-lettered here");
        passed.extend(records);
    }
    passed
}

/// The source's view: the status of its batch, within a generous bound.
async fn status(s: StatusReceiver) -> BatchStatus {
    tokio::time::timeout(Duration::from_secs(30), s)
        .await
        .expect("the source learns the outcome")
}

#[tokio::test]
async fn a_delivered_key_is_still_a_duplicate_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("test").join("dedupe");

    let mut d = dedupe(&state, "").await;
    let (first, first_status) = message(1, "a", 1);
    let mut passed = pass(d.as_mut(), vec![first]);
    assert_eq!(passed.len(), 1);
    passed.remove(0).finalize(BatchStatus::Delivered);
    assert_eq!(status(first_status).await, BatchStatus::Delivered);
    d.save_state();
    drop(d);

    // The broker redelivers the message (its PUBACK was not sent before the restart).
    let mut d = dedupe(&state, "").await;
    let (again, again_status) = message(1, "a", 1);
    assert!(
        pass(d.as_mut(), vec![again]).is_empty(),
        "the redelivery is a duplicate of a delivered message"
    );
    assert_eq!(
        status(again_status).await,
        BatchStatus::Delivered,
        "and it is acknowledged at once"
    );
    // Another key is not affected.
    let (other, _other_status) = message(2, "a", 2);
    assert_eq!(pass(d.as_mut(), vec![other]).len(), 1);

    // Without the saved state (a fresh directory) the same redelivery passes: the state made
    // the difference.
    let fresh = tempfile::tempdir().expect("tempdir");
    let mut d = dedupe(fresh.path(), "").await;
    let (again, _again_status) = message(1, "a", 1);
    assert_eq!(pass(d.as_mut(), vec![again]).len(), 1);
}

#[tokio::test]
async fn keys_pending_or_errored_at_save_time_pass_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = dedupe(dir.path(), "").await;
    let (pending, _pending_status) = message(1, "p", 1);
    let (errored, errored_status) = message(1, "e", 1);
    let (delivered, _delivered_status) = message(1, "d", 1);
    // One batch each: first copies of one batch share their outcome (the batch's worst).
    let mut passed = Vec::new();
    for first in [pending, errored, delivered] {
        passed.extend(pass(d.as_mut(), vec![first]));
    }
    assert_eq!(passed.len(), 3);
    let still_in_flight = passed.remove(0);
    passed.remove(0).finalize(BatchStatus::Errored);
    passed.remove(0).finalize(BatchStatus::Delivered);
    assert_eq!(status(errored_status).await, BatchStatus::Errored);
    d.save_state();
    drop(d);
    // The process dies with the first copy of `p` unwritten: it is never delivered.
    drop(still_in_flight);

    let mut d = dedupe(dir.path(), "").await;
    let (p, p_status) = message(1, "p", 1);
    let (e, e_status) = message(1, "e", 1);
    let (dup, dup_status) = message(1, "d", 1);
    let passed = pass(d.as_mut(), vec![p, e, dup]);
    let devices: Vec<_> = passed
        .iter()
        .map(|r| r.tag("device_id").map(|v| v.to_string()))
        .collect();
    assert_eq!(
        devices,
        vec![Some("p".to_string()), Some("e".to_string())],
        "the redeliveries of undelivered first copies pass; the delivered one is dropped"
    );
    assert_eq!(status(dup_status).await, BatchStatus::Delivered);
    for mut r in passed {
        r.finalize(BatchStatus::Delivered);
    }
    assert_eq!(status(p_status).await, BatchStatus::Delivered);
    assert_eq!(status(e_status).await, BatchStatus::Delivered);
}

#[tokio::test]
async fn a_periodic_snapshot_survives_a_crash_without_save_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = dedupe(dir.path(), "state_interval = \"1s\"").await;
    assert_eq!(d.tick_interval(), Some(Duration::from_secs(1)));
    let (first, _first_status) = message(1, "a", 1);
    for mut r in pass(d.as_mut(), vec![first]) {
        r.finalize(BatchStatus::Delivered);
    }
    let mut out = TransformOutput::default();
    d.on_tick(0, &mut out);
    assert!(out.is_empty(), "a snapshot emits nothing");
    // Written off the pipeline's threads: wait for it to land (the rename is atomic).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.path().join(SNAPSHOT).exists() {
        assert!(Instant::now() < deadline, "no snapshot written after 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the writer thread finish its directory fsync before the "crash".
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Crash: no save_state.
    drop(d);

    let mut d = dedupe(dir.path(), "").await;
    let (again, again_status) = message(1, "a", 1);
    assert!(pass(d.as_mut(), vec![again]).is_empty());
    assert_eq!(status(again_status).await, BatchStatus::Delivered);
}

#[tokio::test]
async fn a_corrupt_snapshot_is_ignored_and_the_stage_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join(SNAPSHOT),
        b"{\"format\":\"sluice-dedupe-k\x00\xff",
    )
    .expect("written");
    let mut d = dedupe(dir.path(), "").await;
    let (first, first_status) = message(1, "a", 1);
    let (dup, dup_status) = message(1, "a", 1);
    let passed = pass(d.as_mut(), vec![first, dup]);
    assert_eq!(passed.len(), 1, "deduplicates as usual");
    for mut r in passed {
        r.finalize(BatchStatus::Delivered);
    }
    assert_eq!(status(first_status).await, BatchStatus::Delivered);
    assert_eq!(status(dup_status).await, BatchStatus::Delivered);
    // The next orderly end replaces the corrupt file with a good snapshot.
    d.save_state();
    drop(d);
    let mut d = dedupe(dir.path(), "").await;
    let (again, _again_status) = message(1, "a", 1);
    assert!(pass(d.as_mut(), vec![again]).is_empty());
}
