use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;
use crate::ack;
use crate::channel::{BufferType, Output};
use crate::metrics::Kind;
use crate::record::Record;

fn config(max_size: u64) -> BufferConfig {
    BufferConfig {
        kind: BufferType::Disk,
        max_size: crate::config::ByteSize(max_size),
        ..BufferConfig::default()
    }
}

async fn start(dir: &Path, cfg: BufferConfig) -> (Output, Input, Arc<ComponentMetrics>) {
    let m = Arc::new(ComponentMetrics::new("agg", Kind::Transform));
    let (edge, input) = open(dir.to_path_buf(), cfg, m.clone(), CancellationToken::new())
        .await
        .expect("open");
    (Output::new(vec![edge]), input, m)
}

/// A batch of `n` records numbered from `first`, with a source finalizer.
fn batch(first: i64, n: i64) -> (Batch, ack::StatusReceiver) {
    let (f, status) = ack::batch();
    let records = (first..first + n)
        .map(|t| {
            let mut r = Record::new(t);
            r.set_tag("device_id", "d1");
            r.finalizers = Finalizers::one(f.clone());
            r
        })
        .collect();
    f.finish(BatchStatus::Delivered);
    (Batch::new(records), status)
}

async fn recv(input: &mut Input) -> Batch {
    tokio::time::timeout(Duration::from_secs(20), input.recv())
        .await
        .expect("a batch within 20 s")
        .expect("input open")
}

fn times(b: &Batch) -> Vec<i64> {
    b.records.iter().map(|r| r.time).collect()
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn acknowledges_upstream_once_appended_and_replays_errored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, mut input, m) = start(dir.path(), config(1 << 30)).await;
    let (b, status) = batch(0, 3);
    out.send(b).await.expect("send");
    // Upstream is acknowledged before the consumer did anything with the records.
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(20), status)
            .await
            .expect("acked"),
        BatchStatus::Delivered
    );
    let mut got = recv(&mut input).await;
    assert_eq!(times(&got), [0, 1, 2]);
    // The consumer fails: the same records come again (in two halves: had one record been
    // poison, the other half would pass).
    got.finalize(BatchStatus::Errored);
    let mut first_half = recv(&mut input).await;
    let mut second_half = recv(&mut input).await;
    assert_eq!(times(&first_half), [0]);
    assert_eq!(times(&second_half), [1, 2]);
    assert_eq!(
        m.gauge("disk_buffer_replays_total").load(Ordering::Relaxed),
        2
    );
    first_half.finalize(BatchStatus::Delivered);
    second_half.finalize(BatchStatus::Delivered);
    let released = |d: &Path| read_released(d);
    eventually("the released position to be saved", || {
        released(dir.path()) > 0
    })
    .await;
    assert_eq!(m.gauge("disk_buffer_records").load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn unreleased_records_come_back_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (out, mut input, _) = start(dir.path(), config(1 << 30)).await;
        let (b, status) = batch(0, 10);
        out.send(b).await.expect("send");
        assert_eq!(status.await, BatchStatus::Delivered);
        // The consumer delivers the first batch...
        let mut first = recv(&mut input).await;
        assert_eq!(times(&first), (0..10).collect::<Vec<_>>());
        first.finalize(BatchStatus::Delivered);
        eventually("the first batch's release to be saved", || {
            read_released(dir.path()) > 0
        })
        .await;
        // ...and holds the next four when the process dies, with them unreleased.
        for i in 1..5 {
            let (b, status) = batch(i * 10, 10);
            out.send(b).await.expect("send");
            assert_eq!(status.await, BatchStatus::Delivered);
        }
        let mut rest = Vec::new();
        while rest.len() < 40 {
            rest.extend(recv(&mut input).await.records);
        }
        // The "process dies": the consumer's input goes away with these in flight; whatever
        // happens to them later can no longer release them.
        drop(input);
        drop(out);
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(rest);
    }
    let (out, mut input, _) = start(dir.path(), config(1 << 30)).await;
    let mut seen = Vec::new();
    while seen.len() < 40 {
        let mut b = recv(&mut input).await;
        seen.extend(times(&b));
        b.finalize(BatchStatus::Delivered);
    }
    seen.sort_unstable();
    // Exactly what was not released before the "crash" comes back.
    assert_eq!(seen, (10..50).collect::<Vec<_>>());
    drop(out);
}

#[tokio::test]
async fn damage_is_counted_and_skipped_and_the_rest_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (out, input, _) = start(dir.path(), config(1 << 30)).await;
        drop(input); // nothing is consumed: everything stays on disk
        for i in 0..6 {
            let (b, status) = batch(i * 10, 10);
            out.send(b).await.expect("send");
            assert_eq!(status.await, BatchStatus::Delivered);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let segs = segment::list(dir.path()).expect("list");
    let (&seg, &len) = segs
        .iter()
        .find(|(_, &l)| l > 0)
        .expect("a segment with data");
    let path = segment::segment_path(dir.path(), seg);
    let mut bytes = fs::read(&path).expect("read");
    let frame = bytes.len() / 6;
    bytes[frame * 2 + frame / 2] ^= 0xff; // inside the third frame
    bytes.truncate(len as usize - 7); // a torn last frame
    fs::write(&path, &bytes).expect("write");

    let (_out, mut input, m) = start(dir.path(), config(1 << 30)).await;
    let mut seen = Vec::new();
    while seen.len() < 40 {
        let mut b = recv(&mut input).await;
        seen.extend(times(&b));
        b.finalize(BatchStatus::Delivered);
    }
    seen.sort_unstable();
    let expected: Vec<i64> = (0..20).chain(30..50).collect();
    assert_eq!(seen, expected);
    assert_eq!(
        m.gauge("disk_buffer_corrupt_total").load(Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn a_full_buffer_blocks_until_records_are_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Room for about two batches of this size.
    let (out, mut input, m) = start(dir.path(), config(1500)).await;
    let mut statuses = Vec::new();
    for i in 0..2 {
        let (b, s) = batch(i * 20, 20);
        out.send(b).await.expect("send");
        statuses.push(s);
    }
    for s in statuses {
        assert_eq!(s.await, BatchStatus::Delivered);
    }
    let (b, mut third) = batch(100, 20);
    out.send(b).await.expect("queued");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(third.try_status(), None, "blocked: the buffer is full");
    assert_eq!(m.gauge("disk_buffer_full").load(Ordering::Relaxed), 1);
    // The consumer delivers what it holds: room again.
    let mut held = Vec::new();
    while held.iter().map(Batch::len).sum::<usize>() < 40 {
        held.push(recv(&mut input).await);
    }
    for mut b in held {
        b.finalize(BatchStatus::Delivered);
    }
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(20), third)
            .await
            .expect("unblocked"),
        BatchStatus::Delivered
    );
    assert_eq!(m.gauge("disk_buffer_full").load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn drop_newest_drops_and_counts_when_full() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = BufferConfig {
        when_full: WhenFull::DropNewest,
        ..config(700)
    };
    let (out, _input, m) = start(dir.path(), cfg).await;
    for i in 0..4 {
        let (b, s) = batch(i * 20, 20);
        out.send(b).await.expect("send");
        assert_eq!(s.await, BatchStatus::Delivered);
    }
    assert!(m.dropped.load(Ordering::Relaxed) >= 20);
}

#[tokio::test]
async fn one_process_per_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_out, _input, _) = start(dir.path(), config(1 << 30)).await;
    let m = Arc::new(ComponentMetrics::new("other", Kind::Sink));
    let err = open(
        dir.path().to_path_buf(),
        config(1 << 30),
        m,
        CancellationToken::new(),
    )
    .await
    .expect_err("locked");
    assert!(
        err.to_string().contains("in use by another sluice process"),
        "{err}"
    );
}

#[tokio::test]
async fn the_input_closes_after_the_last_record_when_upstream_finishes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, mut input, _) = start(dir.path(), config(1 << 30)).await;
    for i in 0..3 {
        let (b, _) = batch(i * 5, 5);
        out.send(b).await.expect("send");
    }
    drop(out);
    let mut n = 0;
    while let Some(mut b) = tokio::time::timeout(Duration::from_secs(20), input.recv())
        .await
        .expect("progress")
    {
        n += b.len();
        b.finalize(BatchStatus::Delivered);
    }
    assert_eq!(n, 15);
}

/// Outputs whose `dead_letter` feeds the returned input.
fn dead_letter_outputs() -> (Outputs, Input) {
    use std::collections::HashMap;
    let m = Arc::new(ComponentMetrics::new("agg", Kind::Transform));
    let (edge, input) = crate::channel::buffer(BufferConfig::default(), m.clone());
    let named = HashMap::from([(DEAD_LETTER.to_string(), Output::new(vec![edge]))]);
    (Outputs::new(Output::default(), named, m), input)
}

#[tokio::test]
async fn a_record_that_keeps_failing_while_others_pass_is_dead_lettered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = BufferConfig {
        max_replays: 3,
        ..config(1 << 30)
    };
    let (out, mut input, m) = start(dir.path(), cfg).await;
    let (outputs, mut dead) = dead_letter_outputs();
    input.route_poison_to(&outputs);
    // Telemetry keeps flowing: 40 batches of 10, one record (time 42) fails every time.
    let feeder = tokio::spawn(async move {
        for k in 0..40 {
            let (b, status) = batch(k * 10, 10);
            out.send(b).await.expect("send");
            assert_eq!(status.await, BatchStatus::Delivered);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        out
    });
    let mut delivered = std::collections::BTreeSet::new();
    let mut failures_of_42 = 0;
    let mut dead_records = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while dead_records.is_empty() || delivered.len() < 399 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivered {} of 399, dead-lettered {:?}",
            delivered.len(),
            dead_records
        );
        tokio::select! {
            Some(mut b) = input.recv() => {
                if times(&b).contains(&42) {
                    failures_of_42 += 1;
                    b.finalize(BatchStatus::Errored);
                } else {
                    delivered.extend(times(&b));
                    b.finalize(BatchStatus::Delivered);
                }
            }
            Some(mut b) = dead.recv() => {
                for r in &b.records {
                    dead_records.push((r.time, r.meta.error.as_deref().unwrap_or("").to_string()));
                }
                // Written by the dead-letter sink (the status stays Rejected, set by send_to).
                b.finalize(BatchStatus::Delivered);
            }
        }
    }
    assert_eq!(dead_records.len(), 1, "{dead_records:?}");
    assert_eq!(dead_records[0].0, 42);
    assert!(
        dead_records[0].1.contains("max_replays = 3"),
        "{}",
        dead_records[0].1
    );
    assert!(!delivered.contains(&42));
    assert_eq!(delivered.len(), 399, "every other record is delivered");
    // Bounded: the halving search (at most log2(batch) splits) plus max_replays strikes.
    assert!(
        failures_of_42 <= 3 + 12,
        "record 42 failed {failures_of_42} times"
    );
    assert_eq!(
        m.gauge("disk_buffer_poisoned_total")
            .load(Ordering::Relaxed),
        1
    );
    eventually("everything to be released", || {
        m.gauge("disk_buffer_records").load(Ordering::Relaxed) == 0
    })
    .await;
    drop(feeder.await.expect("feeder"));
}

#[tokio::test]
async fn an_outage_is_replayed_without_limit_and_dead_letters_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = BufferConfig {
        max_replays: 2,
        ..config(1 << 30)
    };
    let (out, mut input, m) = start(dir.path(), cfg).await;
    let (outputs, mut dead) = dead_letter_outputs();
    input.route_poison_to(&outputs);
    let (b, status) = batch(0, 4);
    out.send(b).await.expect("send");
    assert_eq!(status.await, BatchStatus::Delivered);
    // The consumer fails everything (its server is down) for 5 rounds, more than max_replays:
    // the batch is split once (its halves would show a poison record), then the halves are
    // retried as they are.
    let mut b = recv(&mut input).await;
    assert_eq!(times(&b), [0, 1, 2, 3]);
    b.finalize(BatchStatus::Errored);
    for _ in 0..5 {
        for half in [[0, 1], [2, 3]] {
            let mut b = recv(&mut input).await;
            assert_eq!(times(&b), half, "halves, not split further");
            b.finalize(BatchStatus::Errored);
        }
    }
    // The server is back.
    for half in [[0, 1], [2, 3]] {
        let mut b = recv(&mut input).await;
        assert_eq!(times(&b), half);
        b.finalize(BatchStatus::Delivered);
    }
    eventually("everything to be released", || {
        m.gauge("disk_buffer_records").load(Ordering::Relaxed) == 0
    })
    .await;
    let nothing = tokio::time::timeout(Duration::from_millis(300), dead.recv()).await;
    assert!(nothing.is_err(), "nothing dead-lettered during an outage");
    assert_eq!(
        m.gauge("disk_buffer_poisoned_total")
            .load(Ordering::Relaxed),
        0
    );
    drop(out);
}

/// A small tmpfs, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a {size} tmpfs to fill a real file system and needs root (CI runs \
             as root): mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// `Done when: Disk full … blocks (default) with a clear log line and metric; nothing lost.`
/// A real full file system (a 4 MiB tmpfs filled by another file): appends fail with ENOSPC,
/// the writer blocks upstream (no batch acknowledged, none failed: `disk_buffer_full` = 1)
/// instead of erroring the batches, and once space is freed every record is appended once
/// and delivered in order.
#[tokio::test]
async fn a_full_file_system_blocks_upstream_and_loses_nothing() {
    use crate::record::Value;
    let fs_ = SmallFs::mount("4m");
    // Leave ~256 KiB free: room for a few of the 64 KiB batches below, not for all 40.
    let filler = fs_.path().join("filler");
    std::fs::write(&filler, vec![7u8; (4 << 20) - (256 << 10)]).expect("filler");
    let (out, mut input, m) = start(&fs_.path().join("buffer"), config(1 << 30)).await;
    let blob: Arc<str> = Arc::from("x".repeat(16 << 10).as_str());
    let sender = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for k in 0..40 {
            let (mut b, status) = batch(k * 4, 4);
            for r in &mut b.records {
                r.set_field("blob", Value::Str(blob.clone()));
            }
            out.send(b).await.expect("send");
            statuses.push(status);
        }
        let mut results = Vec::new();
        for s in statuses {
            results.push(s.await);
        }
        results
    });
    eventually("the writer to report a full file system", || {
        m.gauge("disk_buffer_full").load(Ordering::Relaxed) == 1
    })
    .await;
    // Blocked, not failed: upstream waits for as long as the disk is full.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !sender.is_finished(),
        "upstream is held while the disk is full"
    );
    assert_eq!(m.errors.load(Ordering::Relaxed), 0, "no batch errored");
    std::fs::remove_file(&filler).expect("free the space");
    let results = tokio::time::timeout(Duration::from_secs(60), sender)
        .await
        .expect("upstream acknowledged once space is back")
        .expect("sender");
    assert!(
        results.iter().all(|s| *s == BatchStatus::Delivered),
        "{results:?}"
    );
    assert_eq!(m.gauge("disk_buffer_full").load(Ordering::Relaxed), 0);
    let mut seen = Vec::new();
    while seen.len() < 160 {
        let mut b = recv(&mut input).await;
        seen.extend(times(&b));
        b.finalize(BatchStatus::Delivered);
    }
    assert_eq!(
        seen,
        (0..160).collect::<Vec<_>>(),
        "every record once, in order"
    );
    assert_eq!(
        m.gauge("disk_buffer_corrupt_total").load(Ordering::Relaxed),
        0
    );
}

#[test]
fn a_slot_costs_at_most_80_bytes() {
    // The figure the module docs and the README give per read batch in flight.
    assert!(
        std::mem::size_of::<Slot>() <= 80,
        "{}",
        std::mem::size_of::<Slot>()
    );
}
