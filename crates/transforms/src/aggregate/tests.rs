use std::time::Duration;

use indexmap::IndexMap;
use sluice_core::ack::{self, BatchStatus};
use sluice_core::config::HumanDuration;

use super::*;
use crate::testing::{cx, f64_field, rec, take};

fn config(f: impl FnOnce(&mut AggregateConfig)) -> AggregateConfig {
    let mut fields = IndexMap::new();
    fields.insert(
        "temp".to_string(),
        vec![
            AggFn::Count,
            AggFn::Sum,
            AggFn::Min,
            AggFn::Max,
            AggFn::Mean,
            AggFn::First,
            AggFn::Last,
            AggFn::Stddev,
            AggFn::P50,
            AggFn::P99,
        ],
    );
    let mut c = AggregateConfig {
        window: Some(HumanDuration(Duration::from_secs(60))),
        hop: None,
        gap: None,
        group_by: vec!["device_id".into()],
        fields,
        allowed_lateness: HumanDuration(Duration::from_secs(10)),
        idle_timeout: HumanDuration(Duration::from_secs(10)),
        max_groups: 100,
        when_full: WhenFull::FlushOldest,
        watermark: WatermarkMode::Global,
        max_future_skew: HumanDuration(Duration::from_secs(300)),
        max_pending_rollups: 1000,
    };
    f(&mut c);
    c
}

fn agg(f: impl FnOnce(&mut AggregateConfig)) -> Aggregator {
    Aggregator::new(&config(f), &cx()).expect("valid config")
}

fn temp(secs: f64, dev: &str, t: f64) -> Record {
    rec(secs, dev, &[("temp", Value::F64(t))])
}

fn run(a: &mut Aggregator, records: Vec<Record>) -> TransformOutput {
    let mut out = TransformOutput::default();
    a.process(Batch::new(records), &mut out);
    out
}

const S: i64 = 1_000_000_000;

#[test]
fn tumbling_window_computes_every_function() {
    let mut a = agg(|_| {});
    let values = [3.0, 1.0, 4.0, 1.0, 5.0];
    let recs = values
        .iter()
        .enumerate()
        .map(|(i, v)| temp(i as f64, "d1", *v))
        .collect();
    let mut out = run(&mut a, recs);
    assert!(take(&mut out, "default").is_empty(), "window still open");
    // An event at 75s moves the watermark to 65s ≥ 60s: the first window closes.
    let mut out = run(&mut a, vec![temp(75.0, "d1", 9.0)]);
    let rolled = take(&mut out, "default");
    assert_eq!(rolled.len(), 1);
    let r = &rolled[0];
    assert_eq!(r.time, 0);
    assert_eq!(r.tag("device_id"), Some("d1"));
    assert_eq!(r.field("window_start"), Some(&Value::I64(0)));
    assert_eq!(r.field("window_end"), Some(&Value::I64(60 * S)));
    assert_eq!(r.field("partial"), Some(&Value::Bool(false)));
    assert_eq!(r.field("temp_count"), Some(&Value::I64(5)));
    assert_eq!(f64_field(r, "temp_sum"), 14.0);
    assert_eq!(f64_field(r, "temp_min"), 1.0);
    assert_eq!(f64_field(r, "temp_max"), 5.0);
    assert!((f64_field(r, "temp_mean") - 2.8).abs() < 1e-12);
    assert_eq!(f64_field(r, "temp_first"), 3.0);
    assert_eq!(f64_field(r, "temp_last"), 5.0);
    // Sample stddev of 3,1,4,1,5 = sqrt(3.2).
    let sd = f64_field(r, "temp_stddev");
    assert!((sd - 3.2f64.sqrt()).abs() < 1e-12, "{sd}");
    // DDSketch: the value of rank floor(q·(n−1)) within 1% relative error; sorted values
    // are 1,1,3,4,5, so p50 is rank 2 (3) and p99 is rank 3 (4).
    assert!((f64_field(r, "temp_p50") - 3.0).abs() <= 0.03);
    assert!((f64_field(r, "temp_p99") - 4.0).abs() <= 0.04);
}

#[test]
fn quantiles_of_a_large_window_are_within_one_percent() {
    let mut a = agg(|_| {});
    // 1..=1000 in a scrambled order.
    let recs = (0..1000)
        .map(|i| temp(f64::from(i % 60), "d1", f64::from((i * 7919) % 1000 + 1)))
        .collect();
    run(&mut a, recs);
    let mut out = TransformOutput::default();
    a.flush(&mut out);
    let r = &take(&mut out, "default")[0];
    for (name, exact) in [("temp_p50", 500.0), ("temp_p99", 990.0)] {
        let got = f64_field(r, name);
        assert!(
            (got - exact).abs() / exact < 0.02,
            "{name}: {got} vs {exact}"
        );
    }
}

#[test]
fn one_record_window_and_first_last_by_event_time() {
    let mut a = agg(|_| {});
    // Out of order inside the window: first/last follow event time, not arrival.
    run(&mut a, vec![temp(20.0, "d1", 2.0), temp(10.0, "d1", 1.0)]);
    run(&mut a, vec![temp(30.0, "d2", 7.0)]);
    let mut out = TransformOutput::default();
    a.flush(&mut out);
    let rolled = take(&mut out, "default");
    assert_eq!(rolled.len(), 2);
    let d1 = &rolled[0];
    assert_eq!(f64_field(d1, "temp_first"), 1.0);
    assert_eq!(f64_field(d1, "temp_last"), 2.0);
    let d2 = &rolled[1];
    assert_eq!(d2.field("temp_count"), Some(&Value::I64(1)));
    assert_eq!(f64_field(d2, "temp_mean"), 7.0);
    assert_eq!(d2.field("temp_stddev"), Some(&Value::Null), "one value");
    assert_eq!(f64_field(d2, "temp_p99"), 7.0);
    assert_eq!(
        d2.field("partial"),
        Some(&Value::Bool(true)),
        "flushed early"
    );
}

#[test]
fn empty_input_and_empty_flush_emit_nothing() {
    let mut a = agg(|_| {});
    let mut out = run(&mut a, Vec::new());
    a.on_tick(0, &mut out);
    a.on_tick(100 * S, &mut out);
    a.flush(&mut out);
    assert!(out.is_empty());
}

#[test]
fn field_absent_from_some_records_is_null_not_zero() {
    let mut c = config(|_| {});
    c.fields
        .insert("humidity".into(), vec![AggFn::Mean, AggFn::Count]);
    let mut a = Aggregator::new(&c, &cx()).expect("valid");
    run(&mut a, vec![temp(1.0, "d1", 20.0)]);
    let mut out = TransformOutput::default();
    a.flush(&mut out);
    let r = &take(&mut out, "default")[0];
    assert_eq!(r.field("humidity_mean"), Some(&Value::Null));
    assert_eq!(r.field("humidity_count"), Some(&Value::I64(0)));
    assert_eq!(f64_field(r, "temp_mean"), 20.0);
}

#[test]
fn late_records_go_to_the_late_output() {
    let mut a = agg(|_| {});
    run(&mut a, vec![temp(5.0, "d1", 1.0), temp(75.0, "d1", 2.0)]);
    // 55s is before the watermark (65s) passed its window's end (60s): late.
    // 62s is behind the newest event but within allowed lateness: accepted.
    let mut out = run(&mut a, vec![temp(55.0, "d1", 3.0), temp(62.0, "d1", 4.0)]);
    let late = take(&mut out, LATE);
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].time, 55 * S);
    assert_eq!(a.stats().late, 1);
    let mut out = TransformOutput::default();
    a.flush(&mut out);
    let r = &take(&mut out, "default")[0];
    assert_eq!(r.field("temp_count"), Some(&Value::I64(2)), "75s and 62s");
}

#[test]
fn bad_values_are_dead_lettered_with_a_reason() {
    let mut a = agg(|_| {});
    let mut no_tag = temp(1.0, "d1", 1.0);
    no_tag.remove_tag("device_id");
    let mut out = run(
        &mut a,
        vec![
            temp(1.0, "d1", f64::NAN),
            temp(1.0, "d1", f64::INFINITY),
            rec(1.0, "d1", &[("temp", Value::from("warm"))]),
            rec(1.0, "d1", &[("humidity", Value::F64(3.0))]),
            no_tag,
            rec(1.0, "d1", &[("temp", Value::I64(3))]),
        ],
    );
    let dead = take(&mut out, "dead_letter");
    let reasons: Vec<&str> = dead
        .iter()
        .map(|r| r.meta.error.as_deref().unwrap_or(""))
        .collect();
    assert_eq!(dead.len(), 5, "{reasons:?}");
    assert!(reasons[0].contains("`temp` is NaN"), "{}", reasons[0]);
    assert!(reasons[1].contains("`temp` is inf"), "{}", reasons[1]);
    assert!(
        reasons[2].contains("string, not a number"),
        "{}",
        reasons[2]
    );
    assert!(
        reasons[3].contains("none of the aggregated fields"),
        "{}",
        reasons[3]
    );
    assert!(
        reasons[4].contains("group_by tag `device_id`"),
        "{}",
        reasons[4]
    );
    assert_eq!(a.stats().invalid, 5);
    // The integer was accepted.
    a.flush(&mut out);
    assert_eq!(
        take(&mut out, "default")[0].field("temp_sum"),
        Some(&Value::F64(3.0))
    );
}

#[test]
fn hopping_windows_count_each_record_in_every_window() {
    let mut a = agg(|c| {
        c.window = Some(HumanDuration(Duration::from_secs(60)));
        c.hop = Some(HumanDuration(Duration::from_secs(20)));
        c.allowed_lateness = HumanDuration(Duration::ZERO);
    });
    run(&mut a, vec![temp(45.0, "d1", 1.0)]);
    let mut out = run(&mut a, vec![temp(200.0, "d1", 2.0)]);
    let rolled = take(&mut out, "default");
    let starts: Vec<i64> = rolled.iter().map(|r| r.time / S).collect();
    // 45s is in [0,60), [20,80), [40,100).
    assert_eq!(starts, vec![0, 20, 40]);
    assert!(rolled
        .iter()
        .all(|r| r.field("temp_count") == Some(&Value::I64(1))));
}

#[test]
fn session_windows_split_on_gap_and_merge_when_bridged() {
    let mut a = agg(|c| {
        c.window = None;
        c.gap = Some(HumanDuration(Duration::from_secs(30)));
        c.allowed_lateness = HumanDuration(Duration::from_secs(100));
    });
    // Two sessions: {0, 10} and {50}; then 35 arrives late and bridges them.
    let mut rolled = Vec::new();
    for batch in [
        vec![
            temp(0.0, "d1", 1.0),
            temp(10.0, "d1", 2.0),
            temp(50.0, "d1", 3.0),
        ],
        vec![temp(35.0, "d1", 4.0)],
        // A separate session much later, then an event that closes it.
        vec![temp(200.0, "d1", 5.0)],
        vec![temp(400.0, "d2", 0.0)],
    ] {
        rolled.extend(take(&mut run(&mut a, batch), "default"));
    }
    assert_eq!(rolled.len(), 2, "{rolled:?}");
    let merged = &rolled[0];
    assert_eq!(merged.field("temp_count"), Some(&Value::I64(4)));
    assert_eq!(merged.field("window_start"), Some(&Value::I64(0)));
    assert_eq!(merged.field("window_end"), Some(&Value::I64(80 * S)));
    assert_eq!(f64_field(merged, "temp_first"), 1.0);
    assert_eq!(f64_field(merged, "temp_last"), 3.0);
    assert!((f64_field(merged, "temp_mean") - 2.5).abs() < 1e-12);
    assert!((f64_field(merged, "temp_stddev") - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    assert_eq!(rolled[1].field("temp_count"), Some(&Value::I64(1)));
}

#[test]
fn idle_timeout_closes_windows_without_new_input() {
    let mut a = agg(|_| {});
    run(&mut a, vec![temp(1.0, "d1", 1.0)]);
    let mut out = TransformOutput::default();
    let wall = 1_000 * S;
    a.on_tick(wall, &mut out); // notes the input
    a.on_tick(wall + 5 * S, &mut out); // idle 5s < 10s
    assert!(out.is_empty());
    // Idle 80s: watermark = 1s + 80s - 10s = 71s ≥ 60s.
    a.on_tick(wall + 80 * S, &mut out);
    let rolled = take(&mut out, "default");
    assert_eq!(rolled.len(), 1);
    assert_eq!(rolled[0].field("partial"), Some(&Value::Bool(false)));
    assert_eq!(a.open_groups(), 0);
    // A record for the closed window now counts as late.
    let mut out = run(&mut a, vec![temp(2.0, "d1", 1.0)]);
    assert_eq!(take(&mut out, LATE).len(), 1);
}

#[test]
fn max_groups_policies() {
    // flush_oldest: the least recently updated group is emitted early, as partial.
    let mut a = agg(|c| c.max_groups = 2);
    let mut out = run(
        &mut a,
        vec![
            temp(1.0, "a", 1.0),
            temp(2.0, "b", 1.0),
            temp(3.0, "a", 1.0),
            temp(4.0, "c", 1.0),
        ],
    );
    let flushed = take(&mut out, "default");
    assert_eq!(flushed.len(), 1);
    assert_eq!(flushed[0].tag("device_id"), Some("b"));
    assert_eq!(flushed[0].field("partial"), Some(&Value::Bool(true)));
    assert_eq!(a.stats().evicted_groups, 1);
    assert_eq!(a.open_groups(), 2);

    let mut a = agg(|c| {
        c.max_groups = 1;
        c.when_full = WhenFull::DeadLetter;
    });
    let mut out = run(&mut a, vec![temp(1.0, "a", 1.0), temp(2.0, "b", 1.0)]);
    let dead = take(&mut out, "dead_letter");
    assert_eq!(dead.len(), 1);
    assert!(dead[0]
        .meta
        .error
        .as_deref()
        .is_some_and(|e| e.contains("max_groups (1) reached")));
    assert_eq!(a.stats().refused_full, 1);

    let mut a = agg(|c| {
        c.max_groups = 1;
        c.when_full = WhenFull::Drop;
    });
    let (fin, mut status) = ack::batch();
    let mut b = temp(2.0, "b", 1.0);
    b.finalizers.push(fin);
    let out = run(&mut a, vec![temp(1.0, "a", 1.0), b]);
    assert!(out.is_empty());
    assert_eq!(a.stats().refused_full, 1);
    assert_eq!(status.try_status(), Some(BatchStatus::Delivered));
}

#[tokio::test]
async fn inputs_are_acknowledged_only_with_their_window() {
    let mut a = agg(|_| {});
    let (fin, mut status) = ack::batch();
    let mut recs = vec![temp(1.0, "d1", 1.0), temp(2.0, "d2", 2.0)];
    for r in &mut recs {
        r.finalizers.push(fin.clone());
    }
    fin.finish(BatchStatus::Delivered); // the source's own handle
    let out = run(&mut a, recs);
    assert!(out.is_empty());
    assert_eq!(status.try_status(), None, "held by the open windows");
    let mut out = TransformOutput::default();
    a.flush(&mut out);
    let rolled = take(&mut out, "default");
    assert_eq!(rolled.len(), 2);
    assert!(rolled.iter().all(|r| r.finalizers.len() == 1));
    let mut rolled = rolled.into_iter();
    let first = rolled.next().expect("two windows");
    first.discard();
    assert_eq!(
        status.try_status(),
        None,
        "the other window is not delivered yet"
    );
    for mut r in rolled {
        r.finalize(BatchStatus::Delivered);
    }
    assert_eq!(settled(status).await, BatchStatus::Delivered);
}

#[tokio::test]
async fn hopping_windows_hold_one_finalizer_each() {
    let mut a = agg(|c| c.hop = Some(HumanDuration(Duration::from_secs(30))));
    let (fin, status) = ack::batch();
    let mut r = temp(40.0, "d1", 1.0);
    r.finalizers.push(fin);
    run(&mut a, vec![r]);
    let mut out = TransformOutput::default();
    a.flush(&mut out);
    let rolled = take(&mut out, "default");
    assert_eq!(rolled.len(), 2);
    let mut rolled = rolled.into_iter();
    rolled.next().expect("first").discard();
    // Dropping the second window's record without a status must not ack the input.
    drop(rolled);
    assert_eq!(settled(status).await, BatchStatus::Errored);
}

#[test]
fn invalid_configs_are_rejected() {
    let bad = |f: fn(&mut AggregateConfig)| Aggregator::new(&config(f), &cx()).is_err();
    assert!(bad(|c| c.window = None));
    assert!(bad(|c| c.gap = Some(HumanDuration(Duration::from_secs(1)))));
    assert!(bad(
        |c| c.hop = Some(HumanDuration(Duration::from_secs(120)))
    ));
    assert!(bad(|c| c.window = Some(HumanDuration(Duration::ZERO))));
    assert!(bad(|c| c.fields.clear()));
    assert!(bad(|c| c.max_groups = 0));
    let err = Aggregator::new(&config(|c| c.window = None), &cx()).expect_err("no window");
    assert!(err.to_string().contains("`window`"), "{err}");
}

#[test]
fn parses_from_toml() {
    let c: AggregateConfig = toml::from_str(
        r#"
        window = "1m"
        group_by = ["device_id"]
        fields = { temp = ["mean", "p99"] }
        "#,
    )
    .expect("parses");
    assert_eq!(c.allowed_lateness.0, Duration::from_secs(10));
    assert_eq!(c.when_full, WhenFull::FlushOldest);
    assert!(toml::from_str::<AggregateConfig>("window = \"1m\"\nfields = {}\ntypo = 1").is_err());
    assert!(
        toml::from_str::<AggregateConfig>("window = \"1m\"\nfields = { t = [\"p42\"] }").is_err()
    );
}

#[test]
fn extreme_timestamps_do_not_overflow() {
    let mut a = agg(|c| c.hop = Some(HumanDuration(Duration::from_secs(20))));
    let mut r1 = temp(0.0, "d1", 1.0);
    r1.time = i64::MIN;
    let mut r2 = temp(0.0, "d1", 1.0);
    r2.time = i64::MAX;
    let mut out = run(&mut a, vec![r1, r2]);
    a.flush(&mut out);
    let all: usize = out.take().iter().map(|(_, v)| v.len()).sum();
    assert!(all >= 2);
}

/// Records of window [0, 60) for two devices, all of one source batch, and a record at 75 s
/// (another batch) that closes the window; the receivers of both batches' statuses.
fn window_and_closer() -> (
    Vec<Record>,
    Vec<Record>,
    ack::StatusReceiver,
    ack::StatusReceiver,
) {
    let (fin, status) = ack::batch();
    let mut inputs = vec![
        temp(1.0, "d1", 10.0),
        temp(20.0, "d1", 20.0),
        temp(40.0, "d1", 60.0),
        temp(30.0, "d2", 5.0),
    ];
    for r in &mut inputs {
        r.finalizers.push(fin.clone());
    }
    fin.finish(BatchStatus::Delivered); // the source's own handle
    let (closer_fin, closer_status) = ack::batch();
    let mut closer = temp(75.0, "d1", 0.0);
    closer.finalizers.push(closer_fin);
    (inputs, vec![closer], status, closer_status)
}

/// The status of a source batch, failing the test if it does not resolve within 10 s.
async fn settled(status: ack::StatusReceiver) -> BatchStatus {
    tokio::time::timeout(Duration::from_secs(10), status)
        .await
        .expect("the batch status resolves")
}

/// The rollup's values, without its finalizers.
fn values_of(r: &Record) -> Vec<(String, Value)> {
    r.fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[tokio::test]
async fn errored_rollup_is_emitted_again_and_its_inputs_wait_for_a_delivered_copy() {
    let mut a = agg(|_| {});
    let (inputs, closer, mut status, _closer_status) = window_and_closer();
    run(&mut a, inputs);
    let rolled = take(&mut run(&mut a, closer), "default");
    assert_eq!(rolled.len(), 2, "window [0, 60) of d1 and d2");
    let first: Vec<_> = rolled.iter().map(values_of).collect();
    assert_eq!(rolled[0].field("temp_count"), Some(&Value::I64(3)));
    assert_eq!(f64_field(&rolled[0], "temp_mean"), 30.0);

    // The rollup sink gives up at the end of the window.
    for mut r in rolled {
        r.finalize(BatchStatus::Errored);
    }
    let wall = 1_000 * S;
    let mut out = TransformOutput::default();
    a.on_tick(wall, &mut out);
    assert_eq!(
        status.try_status(),
        None,
        "the inputs are neither acknowledged nor given up while their rollup is retried"
    );
    let again = take(&mut out, "default");
    assert_eq!(again.len(), 2, "both rollups are emitted again");
    let second: Vec<_> = again.iter().map(values_of).collect();
    assert_eq!(second, first, "with the same values");
    assert_eq!(a.stats().reemitted, 2);

    // Failing again: the next copy waits for the backoff (1 s).
    for mut r in again {
        r.finalize(BatchStatus::Errored);
    }
    a.on_tick(wall + S / 2, &mut out);
    assert!(take(&mut out, "default").is_empty(), "backing off");
    a.on_tick(wall + 2 * S, &mut out);
    let third = take(&mut out, "default");
    assert_eq!(third.len(), 2);
    assert_eq!(third.iter().map(values_of).collect::<Vec<_>>(), first);

    // One copy delivered is not enough: every rollup of the inputs' batch must be.
    let mut third = third.into_iter();
    third.next().expect("d1").finalize(BatchStatus::Delivered);
    a.on_tick(wall + 3 * S, &mut out);
    assert_eq!(
        status.try_status(),
        None,
        "d2's rollup is not delivered yet"
    );
    assert_eq!(a.pending_rollups(), 1);
    for mut r in third {
        r.finalize(BatchStatus::Delivered);
    }
    a.on_tick(wall + 4 * S, &mut out);
    assert!(out.is_empty(), "nothing more to emit");
    assert_eq!(a.pending_rollups(), 0);
    assert_eq!(settled(status).await, BatchStatus::Delivered);
}

#[tokio::test]
async fn a_dead_lettered_rollup_finishes_its_inputs_as_rejected() {
    let mut a = agg(|_| {});
    let (inputs, closer, status, _closer_status) = window_and_closer();
    run(&mut a, inputs);
    for r in take(&mut run(&mut a, closer), "default") {
        r.finalizers.mark(BatchStatus::Rejected);
        r.discard();
    }
    let mut out = TransformOutput::default();
    a.on_tick(1_000 * S, &mut out);
    assert!(out.is_empty(), "a rejected rollup is not retried");
    assert_eq!(settled(status).await, BatchStatus::Rejected);
}

#[tokio::test]
async fn past_max_pending_rollups_the_oldest_inputs_take_their_rollup_outcome() {
    let mut a = agg(|c| c.max_pending_rollups = 1);
    let (fin1, status1) = ack::batch();
    let (fin2, mut status2) = ack::batch();
    let mut d1 = temp(1.0, "d1", 1.0);
    d1.finalizers.push(fin1);
    let mut d2 = temp(2.0, "d2", 1.0);
    d2.finalizers.push(fin2);
    run(&mut a, vec![d1, d2]);
    let rolled = take(&mut run(&mut a, vec![temp(75.0, "d3", 1.0)]), "default");
    assert_eq!(rolled.len(), 2);
    assert_eq!(a.pending_rollups(), 1);
    assert_eq!(a.stats().pending_overflow, 1);
    for mut r in rolled {
        r.finalize(BatchStatus::Errored);
    }
    // d1's rollup was let go: its Errored outcome reaches its input (redelivery)...
    assert_eq!(settled(status1).await, BatchStatus::Errored);
    // ...while d2's is still held for another copy.
    assert_eq!(status2.try_status(), None);
    let mut out = TransformOutput::default();
    a.on_tick(1_000 * S, &mut out);
    assert_eq!(take(&mut out, "default").len(), 1);
}

#[tokio::test]
async fn shutdown_hands_pending_inputs_to_their_last_copy() {
    let mut a = agg(|_| {});
    let (inputs, closer, status, closer_status) = window_and_closer();
    run(&mut a, inputs);
    let mut rolled = take(&mut run(&mut a, closer), "default").into_iter();
    // d1's rollup failed before shutdown; d2's is still in flight.
    rolled.next().expect("d1").finalize(BatchStatus::Errored);
    let mut out = TransformOutput::default();
    a.flush(&mut out);
    let last = take(&mut out, "default");
    // The open window of the closer (partial) and d1's rollup once more.
    assert_eq!(last.len(), 2, "{last:?}");
    assert_eq!(a.pending_rollups(), 0);
    let in_flight = rolled.next().expect("d2");
    for mut r in last {
        r.finalize(BatchStatus::Delivered);
    }
    assert_eq!(settled(closer_status).await, BatchStatus::Delivered);
    let mut status = status;
    assert_eq!(status.try_status(), None, "d2's rollup is still in flight");
    in_flight.discard();
    assert_eq!(settled(status).await, BatchStatus::Delivered);
}

#[test]
fn a_record_from_the_far_future_is_dead_lettered_and_moves_nothing() {
    let mut a = agg(|_| {});
    run(&mut a, vec![temp(1.0, "d1", 1.0)]);
    let mut year_2100 = temp(0.0, "d2", 1.0);
    year_2100.time = 4_102_444_800 * S; // 2100-01-01T00:00:00Z
    let mut out = run(&mut a, vec![year_2100]);
    let dead = take(&mut out, "dead_letter");
    assert_eq!(dead.len(), 1);
    let why = dead[0].meta.error.as_deref().unwrap_or("");
    assert!(why.contains("2100-01-01T00:00:00Z"), "{why}");
    assert!(why.contains("max_future_skew = \"5m\""), "{why}");
    assert!(out.is_empty(), "no window closed: {out:?}");
    assert_eq!(a.stats().future, 1);
    // d1's window is still open: a record for it is not late.
    let mut out = run(&mut a, vec![temp(2.0, "d1", 3.0)]);
    assert!(take(&mut out, LATE).is_empty());
    a.flush(&mut out);
    let rolled = take(&mut out, "default");
    assert_eq!(rolled.len(), 1);
    assert_eq!(rolled[0].field("temp_count"), Some(&Value::I64(2)));
}

#[test]
fn per_group_watermark_keeps_one_device_from_making_the_fleet_late() {
    let run_with = |mode: WatermarkMode| {
        let mut a = agg(|c| c.watermark = mode);
        run(&mut a, vec![temp(1.0, "d1", 1.0), temp(2.0, "d2", 1.0)]);
        // d1's clock jumps an hour ahead (within max_future_skew of 1970 event times).
        let mut out = run(&mut a, vec![temp(3600.0, "d1", 9.0)]);
        let closed: Vec<String> = take(&mut out, "default")
            .iter()
            .map(|r| r.tag("device_id").unwrap_or("").to_string())
            .collect();
        let mut out = run(&mut a, vec![temp(30.0, "d2", 3.0)]);
        (closed, take(&mut out, LATE).len(), a)
    };
    let (closed, late, _) = run_with(WatermarkMode::Global);
    assert_eq!(
        closed,
        vec!["d1", "d2"],
        "global: d1 closes everyone's window"
    );
    assert_eq!(late, 1, "global: d2 is now late");

    let (closed, late, mut a) = run_with(WatermarkMode::PerGroup);
    assert_eq!(closed, vec!["d1"], "per_group: only d1's own window closes");
    assert_eq!(late, 0, "per_group: d2 keeps its own pace");
    // d2's window closes on d2's event time...
    let mut out = run(&mut a, vec![temp(75.0, "d2", 5.0)]);
    let rolled = take(&mut out, "default");
    assert_eq!(rolled.len(), 1);
    assert_eq!(rolled[0].tag("device_id"), Some("d2"));
    assert_eq!(rolled[0].field("temp_count"), Some(&Value::I64(2)));
    // ...and d2's late records are judged by d2's watermark.
    let mut out = run(&mut a, vec![temp(50.0, "d2", 1.0), temp(3590.0, "d1", 1.0)]);
    let late = take(&mut out, LATE);
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].tag("device_id"), Some("d2"));
}

#[test]
fn per_group_idle_timeout_closes_a_silent_group_while_others_keep_sending() {
    let mut a = agg(|c| c.watermark = WatermarkMode::PerGroup);
    run(&mut a, vec![temp(1.0, "d1", 1.0), temp(1.0, "d2", 1.0)]);
    let mut out = TransformOutput::default();
    let wall = 1_000 * S;
    a.on_tick(wall, &mut out); // notes the input of both
                               // d1 keeps sending (within its window), d2 goes silent.
    for i in 1..=8 {
        run(&mut a, vec![temp(1.0 + f64::from(i), "d1", 1.0)]);
        a.on_tick(wall + i64::from(i) * 10 * S, &mut out);
    }
    let rolled = take(&mut out, "default");
    assert_eq!(rolled.len(), 1, "{rolled:?}");
    assert_eq!(rolled[0].tag("device_id"), Some("d2"));
    assert_eq!(rolled[0].field("partial"), Some(&Value::Bool(false)));
    assert_eq!(a.open_groups(), 1, "d1's window is still open");
}

#[test]
fn windows_delivered_before_a_restart_stay_closed_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cx_saved = BuildContext {
        state_dir: Some(dir.path().to_path_buf()),
        ..cx()
    };
    let mut a = Aggregator::new(&config(|_| {}), &cx_saved).expect("valid config");
    // Inputs with a finalizer (as they come through a disk buffer): rollups wait for theirs.
    let (f, _status) = ack::batch();
    let mut first = temp(1.0, "d1", 1.0);
    first.finalizers = Finalizers::one(f.clone());
    let mut later = temp(75.0, "d1", 2.0);
    later.finalizers = Finalizers::one(f.clone());
    f.finish(BatchStatus::Delivered);
    let mut out = run(&mut a, vec![first, later]);
    let mut rolled = take(&mut out, "default");
    assert_eq!(rolled.len(), 1, "window [0, 60 s) closed");
    let now = now_ns();
    a.on_tick(now, &mut TransformOutput::default());
    assert!(
        a.delivered_through() < 60 * S,
        "an unsettled rollup holds the saved progress back"
    );
    rolled[0].finalize(BatchStatus::Delivered);
    a.on_tick(now + 2 * S, &mut TransformOutput::default());
    assert_eq!(a.delivered_through(), 65 * S);
    a.save_state(); // a shutdown that left the open window to be replayed (no flush)
    drop(a);

    // After the restart, a replayed record of the delivered window does not reopen it.
    let mut b = Aggregator::new(&config(|_| {}), &cx_saved).expect("valid config");
    let mut out = run(&mut b, vec![temp(2.0, "d1", 5.0), temp(70.0, "d1", 3.0)]);
    assert_eq!(take(&mut out, "late").len(), 1);
    // Without the saved progress the same record would have reopened [0, 60 s).
    let mut fresh = agg(|_| {});
    let mut out = run(
        &mut fresh,
        vec![temp(2.0, "d1", 5.0), temp(70.0, "d1", 3.0)],
    );
    assert!(take(&mut out, "late").is_empty());

    // Once the input ended for good and every window was flushed, the progress is forgotten.
    let mut out = TransformOutput::default();
    b.flush(&mut out);
    b.save_state();
    assert!(!dir.path().join("aggregate.json").exists());
}

/// The same with `watermark = "per_group"`: each group's delivered-through time is saved, so
/// after a restart a replayed record of a window d1 already delivered leaves on `late`, while
/// d2 (whose window was never closed) still aggregates its own replay.
#[test]
fn per_group_windows_delivered_before_a_restart_stay_closed_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cx_saved = BuildContext {
        state_dir: Some(dir.path().to_path_buf()),
        ..cx()
    };
    let per_group = || config(|c| c.watermark = WatermarkMode::PerGroup);
    let mut a = Aggregator::new(&per_group(), &cx_saved).expect("valid config");
    let (f, _status) = ack::batch();
    let with_finalizer = |mut r: Record| {
        r.finalizers = Finalizers::one(f.clone());
        r
    };
    let records = vec![
        with_finalizer(temp(1.0, "d1", 1.0)),
        with_finalizer(temp(75.0, "d1", 2.0)),
        with_finalizer(temp(3.0, "d2", 4.0)),
    ];
    f.finish(BatchStatus::Delivered);
    let mut out = run(&mut a, records);
    let mut rolled = take(&mut out, "default");
    assert_eq!(
        rolled.len(),
        1,
        "d1's window [0, 60 s) closed, d2's is open"
    );
    rolled[0].finalize(BatchStatus::Delivered);
    a.on_tick(now_ns(), &mut TransformOutput::default());
    a.save_state(); // a shutdown that left the open windows to be replayed (no flush)
    drop(a);

    let mut b = Aggregator::new(&per_group(), &cx_saved).expect("valid config");
    let mut out = run(
        &mut b,
        vec![
            temp(2.0, "d1", 5.0),
            temp(70.0, "d1", 3.0),
            temp(3.0, "d2", 4.0),
        ],
    );
    let late = take(&mut out, "late");
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0].tag("device_id"), Some("d1"));
    // Without the saved watermarks the d1 record would have reopened [0, 60 s).
    let mut fresh = agg(|c| c.watermark = WatermarkMode::PerGroup);
    let mut out = run(
        &mut fresh,
        vec![temp(2.0, "d1", 5.0), temp(70.0, "d1", 3.0)],
    );
    assert!(take(&mut out, "late").is_empty());
    let mut out = TransformOutput::default();
    b.flush(&mut out);
    b.save_state();
    assert!(!dir.path().join("aggregate.json").exists());
}
