//! The `anomaly` stage's state survives a restart: baselines and the heartbeat table are
//! snapshotted to the component's state directory and restored by the next instance built on
//! it. Each test drives a first instance, ends it as the runtime does (`save_state`, or only the
//! periodic snapshot from `on_tick` for a crash), builds a second one on the same directory and
//! compares with a fresh instance that has no snapshot.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_core::ack::{self, BatchStatus};
use sluice_core::config::HumanDuration;
use sluice_core::record::{Batch, Record, Value};
use sluice_core::registry::{BuildContext, TransformConfig};
use sluice_core::topology::now_ns;
use sluice_core::transform::{Transform, TransformOutput};
use sluice_transforms::anomaly::{
    default_state_interval, AnomalyConfig, Clock, Combine, Detector, DetectorConfig, ANOMALIES,
    STATE_FILE,
};

const S: i64 = 1_000_000_000;

fn cx(dir: &Path) -> BuildContext {
    BuildContext {
        name: "detect".into(),
        pipeline_id: "test".into(),
        state_dir: Some(dir.to_path_buf()),
    }
}

fn config(detectors: Vec<DetectorConfig>) -> AnomalyConfig {
    AnomalyConfig {
        fields: vec!["temp".into()],
        group_by: Some(vec!["device_id".into()]),
        detectors,
        warmup: 20,
        alert_score: 0.5,
        combine: Combine::Mean,
        max_series: 1000,
        annotate: false,
        state_interval: default_state_interval(),
    }
}

/// Built as the runtime builds it: through the config's `build`.
fn build(config: &AnomalyConfig, dir: &Path) -> Box<dyn Transform> {
    futures::executor::block_on(config.build(&cx(dir))).expect("valid config")
}

fn spike_detectors() -> Vec<DetectorConfig> {
    vec![
        DetectorConfig::Zscore {
            window: 30,
            threshold: 4.0,
        },
        DetectorConfig::Ewma {
            alpha: 0.1,
            alpha_variance: None,
            k: 4.0,
        },
        DetectorConfig::Mad {
            window: 30,
            threshold: 5.0,
        },
    ]
}

fn missing(clock: Clock) -> AnomalyConfig {
    let mut c = config(vec![DetectorConfig::Missing {
        timeout: HumanDuration(Duration::from_secs(10)),
        clock,
    }]);
    c.fields = Vec::new();
    c
}

fn temp(secs: i64, dev: &str, t: f64) -> Record {
    let mut r = Record::new(secs * S);
    r.set_tag("device_id", dev);
    r.set_field("temp", Value::F64(t));
    r
}

fn ping(secs: i64, dev: &str) -> Record {
    let mut r = Record::new(secs * S);
    r.set_tag("device_id", dev);
    r
}

/// Processes `records` and returns the alerts (the passthrough copies are acknowledged).
fn process(t: &mut dyn Transform, records: Vec<Record>) -> Vec<Record> {
    let mut out = TransformOutput::default();
    t.process(Batch::new(records), &mut out);
    alerts(&mut out)
}

fn tick(t: &mut dyn Transform, now: i64) -> Vec<Record> {
    let mut out = TransformOutput::default();
    t.on_tick(now, &mut out);
    alerts(&mut out)
}

fn alerts(out: &mut TransformOutput) -> Vec<Record> {
    let mut alerts = Vec::new();
    for (name, records) in out.take() {
        if name == ANOMALIES {
            alerts.extend(records);
        } else {
            for r in records {
                r.finalizers.finish(BatchStatus::Delivered);
            }
        }
    }
    alerts
}

fn deliver(alerts: Vec<Record>) {
    for a in alerts {
        a.finalizers.finish(BatchStatus::Delivered);
    }
}

fn field<'a>(r: &'a Record, name: &str) -> &'a str {
    r.field(name).and_then(Value::as_str).unwrap_or("")
}

fn detectors_of(alerts: &[Record]) -> Vec<&str> {
    let mut d: Vec<&str> = alerts.iter().map(|a| field(a, "detector")).collect();
    d.sort_unstable();
    d
}

/// A deterministic wiggle around 20 (±0.3).
fn noisy(i: i64) -> f64 {
    20.0 + 0.3 * ((i as f64) * 1.7).sin()
}

/// Feeds d1 `n` normal readings from second `from`; asserts they raise nothing.
fn warm(t: &mut dyn Transform, from: i64, n: i64) {
    for i in from..from + n {
        let a = process(t, vec![temp(i, "d1", noisy(i))]);
        assert!(a.is_empty(), "normal reading {i} flagged: {a:?}");
    }
}

fn snapshot_json(dir: &Path) -> serde_json::Value {
    let bytes = std::fs::read(dir.join(STATE_FILE)).expect("snapshot written");
    serde_json::from_slice(&bytes).expect("snapshot is JSON")
}

#[test]
fn a_series_warmed_before_a_restart_flags_a_spike_right_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = config(spike_detectors());
    let mut first = build(&c, dir.path());
    warm(first.as_mut(), 0, 60);
    first.save_state();
    drop(first);
    let snap = snapshot_json(dir.path());
    assert_eq!(snap["version"], 1);
    assert!(
        !dir.path().join("anomaly.json.tmp").exists(),
        "temporary file renamed"
    );

    // The restarted stage flags the very first reading after the restart that is a spike.
    let mut second = build(&c, dir.path());
    let flagged = process(second.as_mut(), vec![temp(60, "d1", noisy(60) + 10.0)]);
    assert_eq!(
        detectors_of(&flagged),
        ["ewma", "mad", "zscore"],
        "{flagged:?}"
    );

    // Without the snapshot the same spike meets a cold series (still in warm-up): not flagged.
    let empty = tempfile::tempdir().expect("tempdir");
    let mut fresh = build(&c, empty.path());
    let a = process(fresh.as_mut(), vec![temp(60, "d1", noisy(60) + 10.0)]);
    assert!(a.is_empty(), "a fresh detector flagged {a:?}");
    // ... and it stays blind for its whole warm-up.
    for i in 61..61 + i64::try_from(c.warmup).expect("small") - 1 {
        let a = process(fresh.as_mut(), vec![temp(i, "d1", noisy(i) + 10.0)]);
        assert!(
            a.is_empty(),
            "a fresh detector flagged {a:?} during warm-up"
        );
    }
}

/// A crash (no `save_state`) keeps what the last periodic snapshot from the timer saved.
#[test]
fn the_periodic_snapshot_survives_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(spike_detectors());
    c.state_interval = HumanDuration(Duration::from_secs(5));
    let mut first = build(&c, dir.path());
    assert_eq!(
        first.tick_interval(),
        Some(Duration::from_secs(5)),
        "the timer runs for the snapshots"
    );
    warm(first.as_mut(), 0, 60);
    assert!(tick(first.as_mut(), now_ns()).is_empty());
    assert!(
        !dir.path().join(STATE_FILE).exists(),
        "not due before state_interval"
    );
    assert!(tick(first.as_mut(), now_ns() + 6 * S).is_empty());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.path().join(STATE_FILE).exists() {
        assert!(
            Instant::now() < deadline,
            "no periodic snapshot within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The file appears complete or not at all (renamed into place once written and synced).
    assert_eq!(
        snapshot_json(dir.path())["series"].as_array().map(Vec::len),
        Some(1)
    );
    std::mem::forget(first); // crash: no save_state, no destructor

    let mut second = build(&c, dir.path());
    let flagged = process(second.as_mut(), vec![temp(60, "d1", noisy(60) + 10.0)]);
    assert_eq!(detectors_of(&flagged), ["ewma", "mad", "zscore"]);
}

#[test]
fn a_device_silent_before_the_restart_is_reported_offline_once_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = missing(Clock::Event);
    let mut first = build(&c, dir.path());
    // d1 and d2 report until 5 s; d1 goes on until 8 s: d2 is silent but not yet past the
    // 10 s timeout when the pipeline stops.
    for s in 0..=8 {
        let mut batch = vec![ping(s, "d1")];
        if s <= 5 {
            batch.push(ping(s, "d2"));
        }
        assert!(process(first.as_mut(), batch).is_empty());
        assert!(tick(first.as_mut(), 0).is_empty());
    }
    first.save_state();
    drop(first);

    let after = |t: &mut dyn Transform| {
        let mut alerts = Vec::new();
        for s in 9..=30 {
            process(t, vec![ping(s, "d1")]);
            alerts.extend(tick(t, 0).into_iter().map(|a| (s, a)));
        }
        alerts
    };
    let mut second = build(&c, dir.path());
    let alerts = after(second.as_mut());
    assert_eq!(alerts.len(), 1, "offline once: {alerts:?}");
    let (at, alert) = &alerts[0];
    assert_eq!(alert.tag("device_id"), Some("d2"));
    assert!(field(alert, "message").contains("offline"));
    assert_eq!(
        *at, 16,
        "first tick with more than 10 s of silence since 5 s"
    );

    // Without the snapshot, d2 is unknown after the restart: never reported.
    let empty = tempfile::tempdir().expect("tempdir");
    let mut fresh = build(&c, empty.path());
    let alerts = after(fresh.as_mut());
    assert!(alerts.is_empty(), "{alerts:?}");
}

#[test]
fn an_offline_report_before_the_restart_is_not_repeated_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = missing(Clock::Event);
    let mut first = build(&c, dir.path());
    process(first.as_mut(), vec![ping(0, "d1"), ping(0, "d2")]);
    process(first.as_mut(), vec![ping(20, "d1")]);
    let offline = tick(first.as_mut(), 0);
    assert_eq!(offline.len(), 1);
    assert_eq!(offline[0].tag("device_id"), Some("d2"));
    deliver(offline);
    first.save_state();
    drop(first);

    let mut second = build(&c, dir.path());
    for s in 21..40 {
        process(second.as_mut(), vec![ping(s, "d1")]);
        let a = tick(second.as_mut(), 0);
        assert!(a.is_empty(), "reported twice: {a:?}");
    }
    // The restored "offline" flag: d2 reporting again is "back online".
    let back = process(second.as_mut(), vec![ping(40, "d2")]);
    assert_eq!(back.len(), 1);
    assert!(field(&back[0], "message").contains("back online"));
}

/// An "offline" alert that was lost (or still on its way) when the snapshot was taken is raised
/// again after the restart: at-least-once, where it used to be at-most-once.
#[test]
fn an_undelivered_offline_alert_is_raised_again_after_the_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = missing(Clock::Event);
    let mut first = build(&c, dir.path());
    process(first.as_mut(), vec![ping(0, "d1"), ping(0, "d2")]);
    process(first.as_mut(), vec![ping(20, "d1")]);
    let offline = tick(first.as_mut(), 0);
    assert_eq!(offline.len(), 1);
    first.save_state(); // the alert is still on its way
    drop(first);
    drop(offline); // ... and is lost with the process

    let mut second = build(&c, dir.path());
    let again = tick(second.as_mut(), 0);
    assert_eq!(again.len(), 1, "raised again: {again:?}");
    assert_eq!(again[0].tag("device_id"), Some("d2"));
    assert!(field(&again[0], "message").contains("offline"));
    assert_eq!(again[0].time, 20 * S, "the original alert's time");
    deliver(again);
    assert!(
        tick(second.as_mut(), 0).is_empty(),
        "delivered: not repeated"
    );
}

/// With the wall clock, the time the pipeline was down is not the devices' silence.
#[test]
fn the_wall_clock_does_not_count_the_downtime_as_silence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = missing(Clock::Wall);
    let mut first = build(&c, dir.path());
    process(first.as_mut(), vec![ping(0, "d1")]);
    first.save_state();
    drop(first);
    // Pretend the snapshot was taken an hour ago, when d1 last reported.
    let path = dir.path().join(STATE_FILE);
    let mut snap = snapshot_json(dir.path());
    let hour = 3600 * S;
    let saved_at = snap["saved_at"].as_i64().expect("saved_at") - hour;
    snap["saved_at"] = saved_at.into();
    let seen = snap["heartbeats"][0]["last_seen"]
        .as_i64()
        .expect("last_seen")
        - hour;
    snap["heartbeats"][0]["last_seen"] = seen.into();
    std::fs::write(&path, serde_json::to_vec(&snap).expect("json")).expect("write");

    let mut second = build(&c, dir.path());
    assert!(tick(second.as_mut(), now_ns()).is_empty(), "not offline");
    let offline = tick(second.as_mut(), now_ns() + 11 * S);
    assert_eq!(offline.len(), 1, "but still watched: {offline:?}");
    assert_eq!(offline[0].tag("device_id"), Some("d1"));
}

/// A lost alert makes its reading Errored; the reading redelivered after a restart raises the
/// alert again, although the restored threshold state is already in its excursion.
#[test]
fn a_reading_redelivered_after_the_restart_raises_its_lost_alert_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = config(vec![DetectorConfig::Threshold {
        min: None,
        max: Some(30.0),
        hysteresis: 0.0,
    }]);
    let mut first = build(&c, dir.path());
    process(first.as_mut(), vec![temp(0, "d1", 20.0)]);
    let (f, mut status) = ack::batch();
    let mut r = temp(1, "d1", 35.0);
    r.finalizers.push(f);
    let alerts = process(first.as_mut(), vec![r]);
    assert_eq!(alerts.len(), 1);
    first.save_state();
    drop(first);
    drop(alerts); // lost
    assert_eq!(status.try_status(), Some(BatchStatus::Errored));

    let mut second = build(&c, dir.path());
    let again = process(second.as_mut(), vec![temp(1, "d1", 35.0)]);
    assert_eq!(again.len(), 1, "the lost alert is raised again");
    assert_eq!(field(&again[0], "detector"), "threshold");
    assert!(field(&again[0], "message").contains("above max"));
    assert_eq!(again[0].tag("device_id"), Some("d1"));
    // A new reading in the same excursion: the restored state knows it already alerted.
    let a = process(second.as_mut(), vec![temp(2, "d1", 36.0)]);
    assert!(a.is_empty(), "{a:?}");
}

#[test]
fn the_snapshot_holds_at_most_max_series() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(vec![
        DetectorConfig::Zscore {
            window: 10,
            threshold: 4.0,
        },
        DetectorConfig::Missing {
            timeout: HumanDuration(Duration::from_secs(10)),
            clock: Clock::Event,
        },
    ]);
    c.max_series = 3;
    let mut first = build(&c, dir.path());
    for i in 0..50 {
        for d in 0..10 {
            process(
                first.as_mut(),
                vec![temp(i, &format!("d{d}"), noisy(i + d))],
            );
        }
    }
    first.save_state();
    let snap = snapshot_json(dir.path());
    assert_eq!(snap["series"].as_array().map(Vec::len), Some(3));
    assert_eq!(snap["heartbeats"].as_array().map(Vec::len), Some(3));
    for s in snap["series"].as_array().into_iter().flatten() {
        let ring = &s["states"][0]["values"];
        assert!(ring.as_array().is_some_and(|v| v.len() <= 10), "{ring}");
    }
    // The most recently seen series are the ones kept.
    let mut groups: Vec<&str> = snap["series"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["group"][0].as_str())
        .collect();
    groups.sort_unstable();
    assert_eq!(groups, ["d7", "d8", "d9"]);
    let second = Detector::new(&c, &cx(dir.path())).expect("valid");
    assert_eq!(second.series_len(), 3);
}

/// Captures WARN events (message and fields) of the current thread.
#[derive(Default, Clone)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for Warnings {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        struct Text<'a>(&'a mut String);
        impl tracing::field::Visit for Text<'_> {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={v:?} ", f.name()));
            }
        }
        let mut s = String::new();
        e.record(&mut Text(&mut s));
        if let Ok(mut all) = self.0.lock() {
            all.push(s);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Builds `c` on `dir` with WARN events captured; returns the series restored and the warnings.
fn build_watching(c: &AnomalyConfig, dir: &Path) -> (usize, Vec<String>) {
    let warnings = Warnings::default();
    let d = tracing::subscriber::with_default(warnings.clone(), || {
        Detector::new(c, &cx(dir)).expect("a bad snapshot never fails the build")
    });
    let w = warnings.0.lock().map(|w| w.clone()).unwrap_or_default();
    (d.series_len(), w)
}

#[test]
fn a_corrupt_or_foreign_snapshot_is_ignored_with_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = config(spike_detectors());
    let mut first = build(&c, dir.path());
    warm(first.as_mut(), 0, 40);
    first.save_state();
    drop(first);
    let path = dir.path().join(STATE_FILE);
    let good = std::fs::read(&path).expect("snapshot");
    let file = path.display().to_string();
    assert_eq!(build_watching(&c, dir.path()), (1, Vec::new()));

    // Taken with other detector options: ignored, not misapplied.
    let mut other = config(spike_detectors());
    other.detectors[0] = DetectorConfig::Zscore {
        window: 30,
        threshold: 5.0,
    };
    let (series, warnings) = build_watching(&other, dir.path());
    assert_eq!(series, 0);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("other `group_by` / `detectors` options") && w.contains(&file)),
        "{warnings:?}"
    );
    let mut regrouped = config(spike_detectors());
    regrouped.group_by = Some(vec!["site".into()]);
    assert_eq!(build_watching(&regrouped, dir.path()).0, 0);

    // Options that do not change the meaning of the state (warm-up, caps) keep it.
    let mut relaxed = config(spike_detectors());
    relaxed.warmup = 5;
    relaxed.max_series = 10;
    assert_eq!(build_watching(&relaxed, dir.path()), (1, Vec::new()));

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("half-written", good[..good.len() / 2].to_vec()),
        ("garbage", b"\x00\x01not json at all".to_vec()),
        ("empty", Vec::new()),
        (
            "wrong shape",
            br#"{"version":1,"config":null,"series":"x"}"#.to_vec(),
        ),
        (
            "other version",
            String::from_utf8_lossy(&good)
                .replacen("\"version\":1", "\"version\":99", 1)
                .into_bytes(),
        ),
    ];
    for (what, bytes) in cases {
        std::fs::write(&path, bytes).expect("write");
        let (series, warnings) = build_watching(&c, dir.path());
        assert_eq!(series, 0, "{what}: started empty");
        assert!(
            warnings.iter().any(|w| w.contains(&file)),
            "{what}: a WARN naming the file, got {warnings:?}"
        );
        if what == "other version" {
            assert!(
                warnings.iter().any(|w| w.contains("version 99")),
                "{warnings:?}"
            );
        }
    }

    // A snapshot of the right shape with damaged series: those series are skipped.
    let mut snap: serde_json::Value = serde_json::from_slice(&good).expect("json");
    snap["series"][0]["states"][1] = serde_json::json!({ "type": "zscore", "values": [] });
    std::fs::write(&path, serde_json::to_vec(&snap).expect("json")).expect("write");
    let (series, warnings) = build_watching(&c, dir.path());
    assert_eq!(series, 0);
    assert!(
        warnings.iter().any(|w| w.contains("skipped")),
        "{warnings:?}"
    );

    // An unreadable state directory entry (a directory where the file should be).
    std::fs::remove_file(&path).expect("rm");
    std::fs::create_dir(&path).expect("mkdir");
    let (series, warnings) = build_watching(&c, dir.path());
    assert_eq!(series, 0);
    assert!(warnings.iter().any(|w| w.contains(&file)), "{warnings:?}");
    // ... and saving there fails with a WARN, not a panic.
    let mut t = build(&c, dir.path());
    warm(t.as_mut(), 0, 3);
    t.save_state();
}

#[test]
fn without_a_state_dir_nothing_is_written_and_no_timer_runs() {
    let c = config(spike_detectors());
    let cx = BuildContext {
        name: "detect".into(),
        pipeline_id: "test".into(),
        state_dir: None,
    };
    let mut t = futures::executor::block_on(c.build(&cx)).expect("valid");
    assert_eq!(t.tick_interval(), None);
    warm(t.as_mut(), 0, 5);
    t.save_state();
}
