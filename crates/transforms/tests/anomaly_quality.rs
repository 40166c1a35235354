//! Precision and recall of the anomaly detectors against the simulator's labelled anomalies.
//!
//! One fixed seed, 100 devices × 1500 one-second rounds, with spikes, stuck sensors and silent
//! devices injected (no drift: it is a slow trend, which none of these detectors targets; its
//! figures are printed by `drift_is_reported_not_asserted`). Each detector runs in its own stage
//! so every alert is attributed.
//!
//! * spikes (zscore, ewma, mad): an alert is a true positive when the reading it flags is
//!   labelled `spike`; recall = labelled spike readings flagged / all spike readings (including
//!   those inside a device's warm-up, which cannot be flagged);
//! * stuck: an alert is a true positive when it flags a `stuck` reading; recall = stuck periods
//!   (runs of consecutive stuck readings of one device) with at least one alert / all periods
//!   that reached `samples` readings before the run ended;
//! * missing: an "offline" alert is a true positive when it falls inside a silence of that
//!   device; recall = silences longer than the timeout that ended before the run did and got an
//!   alert / all such silences.
//!
//! Run with `--nocapture` to see the figures.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sluice_core::config::HumanDuration;
use sluice_core::decode::{DecodeConfig, Decoder};
use sluice_core::record::{Batch, Meta, Record, Value};
use sluice_core::registry::BuildContext;
use sluice_core::transform::{Transform, TransformOutput};
use sluice_sources::simulator::{AnomalyConfig as Faults, Fleet, Label, Reading, SimulatorConfig};
use sluice_transforms::anomaly::{
    AnomalyConfig, Clock, Combine, Detector, DetectorConfig, ANOMALIES,
};

const ROUNDS: usize = 1500;
const START_MS: i64 = 1_700_000_000_000;
const MISSING_TIMEOUT_S: u64 = 10;
const STUCK_SAMPLES: usize = 10;

fn fleet_config(drift: f64) -> SimulatorConfig {
    SimulatorConfig {
        devices: 100,
        seed: 42,
        anomalies: Faults {
            spike_probability: 0.004,
            drift_devices: drift,
            stuck_probability: 0.001,
            stuck_readings: 20,
            silent_probability: 0.0005,
            silent_readings: 30,
            label: true,
            ..Faults::default()
        },
        ..SimulatorConfig::default()
    }
}

struct Run {
    readings: Vec<Reading>,
    records: Vec<Vec<Record>>,
    device_ids: Vec<String>,
    silences: Vec<sluice_sources::simulator::Silence>,
}

/// Generates the stream once; every detector sees the same records.
fn generate(cfg: &SimulatorConfig) -> Run {
    let mut fleet = Fleet::new(cfg, START_MS);
    let mut decoder = Decoder::new(DecodeConfig {
        topic_pattern: Some(cfg.topic.clone()),
        ..DecodeConfig::default()
    })
    .expect("decoder");
    let mut readings = Vec::new();
    let mut records = Vec::new();
    for _ in 0..ROUNDS {
        let mut round = Vec::new();
        fleet.round(&mut round);
        let batch: Vec<Record> = round
            .iter()
            .map(|r| {
                decoder
                    .decode(r.payload.clone(), Some(&r.topic), 0, Meta::default())
                    .expect("simulated payloads decode")
            })
            .collect();
        records.push(batch);
        readings.extend(round);
    }
    Run {
        device_ids: (0..fleet.len())
            .map(|i| fleet.device_id(i).to_string())
            .collect(),
        silences: fleet.silences().to_vec(),
        readings,
        records,
    }
}

/// Alerts of one detector: (device id, event time ms, detector, message).
fn alerts_of(run: &Run, detector: DetectorConfig) -> Vec<(String, i64, String)> {
    alerts_of_all(run, vec![detector])
}

/// Alerts of a set of detectors run together.
fn alerts_of_all(run: &Run, detectors: Vec<DetectorConfig>) -> Vec<(String, i64, String)> {
    let config = AnomalyConfig {
        fields: vec!["temp".into()],
        group_by: Some(vec!["device_id".into()]),
        detectors,
        warmup: 30,
        alert_score: 0.5,
        combine: Combine::Mean,
        max_series: 10_000,
        annotate: false,
        state_interval: sluice_transforms::anomaly::default_state_interval(),
    };
    let cx = BuildContext {
        name: "quality".into(),
        pipeline_id: "test".into(),
        state_dir: None,
    };
    let mut stage = Detector::new(&config, &cx).expect("valid config");
    let mut alerts = Vec::new();
    for batch in &run.records {
        let mut out = TransformOutput::default();
        stage.process(Batch::new(batch.clone()), &mut out);
        stage.on_tick(0, &mut out); // event clock: "now" is the newest event time
        for (name, records) in out.take() {
            assert_ne!(name, "dead_letter", "simulated records are valid");
            if name != ANOMALIES {
                continue;
            }
            for a in records {
                let device = a.tag("device_id").expect("alerts carry the group tags");
                let message = a.field("message").and_then(Value::as_str).unwrap_or("");
                alerts.push((device.to_string(), a.time / 1_000_000, message.to_string()));
            }
        }
    }
    alerts
}

fn labels(run: &Run) -> HashMap<(String, i64), Label> {
    run.readings
        .iter()
        .filter_map(|r| {
            r.label
                .map(|l| ((run.device_ids[r.device].clone(), r.ts_ms), l))
        })
        .collect()
}

#[derive(Debug)]
struct Score {
    precision: f64,
    recall: f64,
    alerts: usize,
    truth: usize,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn spike_score(run: &Run, detector: DetectorConfig) -> Score {
    spike_score_all(run, vec![detector])
}

fn spike_score_all(run: &Run, detectors: Vec<DetectorConfig>) -> Score {
    let labels = labels(run);
    let alerts = alerts_of_all(run, detectors);
    let hits: HashSet<(String, i64)> = alerts
        .iter()
        .filter(|(d, t, _)| labels.get(&(d.clone(), *t)) == Some(&Label::Spike))
        .map(|(d, t, _)| (d.clone(), *t))
        .collect();
    let true_alerts = alerts
        .iter()
        .filter(|(d, t, _)| labels.get(&(d.clone(), *t)) == Some(&Label::Spike))
        .count();
    let spikes = labels.values().filter(|l| **l == Label::Spike).count();
    Score {
        precision: ratio(true_alerts, alerts.len()),
        recall: ratio(hits.len(), spikes),
        alerts: alerts.len(),
        truth: spikes,
    }
}

/// Runs of consecutive readings labelled `label`, per device: (device, first ms, readings).
fn periods(run: &Run, label: Label) -> Vec<(String, i64, i64, usize)> {
    let mut by_device: HashMap<usize, Vec<&Reading>> = HashMap::new();
    for r in &run.readings {
        by_device.entry(r.device).or_default().push(r);
    }
    let mut out = Vec::new();
    for (device, readings) in by_device {
        let mut current: Option<(i64, i64, usize)> = None;
        for r in readings {
            match (r.label == Some(label), current.as_mut()) {
                (true, Some(p)) => {
                    p.1 = r.ts_ms;
                    p.2 += 1;
                }
                (true, None) => current = Some((r.ts_ms, r.ts_ms, 1)),
                (false, Some(_)) => {
                    if let Some((a, b, n)) = current.take() {
                        out.push((run.device_ids[device].clone(), a, b, n));
                    }
                }
                (false, None) => {}
            }
        }
        if let Some((a, b, n)) = current {
            out.push((run.device_ids[device].clone(), a, b, n));
        }
    }
    out
}

fn stuck_score(run: &Run) -> Score {
    let labels = labels(run);
    let alerts = alerts_of(
        run,
        DetectorConfig::Stuck {
            samples: STUCK_SAMPLES,
            duration: None,
            tolerance: 0.0,
        },
    );
    let true_alerts = alerts
        .iter()
        .filter(|(d, t, _)| labels.get(&(d.clone(), *t)) == Some(&Label::Stuck))
        .count();
    let eligible: Vec<_> = periods(run, Label::Stuck)
        .into_iter()
        .filter(|p| p.3 >= STUCK_SAMPLES)
        .collect();
    let detected = eligible
        .iter()
        .filter(|(dev, a, b, _)| {
            alerts
                .iter()
                .any(|(d, t, _)| d == dev && *t >= *a && *t <= *b)
        })
        .count();
    Score {
        precision: ratio(true_alerts, alerts.len()),
        recall: ratio(detected, eligible.len()),
        alerts: alerts.len(),
        truth: eligible.len(),
    }
}

fn missing_score(run: &Run) -> Score {
    let alerts: Vec<_> = alerts_of(
        run,
        DetectorConfig::Missing {
            timeout: HumanDuration(Duration::from_secs(MISSING_TIMEOUT_S)),
            clock: Clock::Event,
        },
    )
    .into_iter()
    .filter(|(_, _, m)| m.contains("offline"))
    .collect();
    let last_ms = START_MS + (ROUNDS as i64 - 1) * 1000;
    let in_silence = |dev: &str, t: i64| {
        run.silences
            .iter()
            .any(|s| run.device_ids[s.device] == dev && t >= s.start_ms && t <= s.end_ms)
    };
    let true_alerts = alerts.iter().filter(|(d, t, _)| in_silence(d, *t)).count();
    let eligible: Vec<_> = run
        .silences
        .iter()
        .filter(|s| s.end_ms <= last_ms)
        .collect();
    let detected = eligible
        .iter()
        .filter(|s| {
            alerts.iter().any(|(d, t, _)| {
                *d == run.device_ids[s.device] && *t >= s.start_ms && *t <= s.end_ms
            })
        })
        .count();
    Score {
        precision: ratio(true_alerts, alerts.len()),
        recall: ratio(detected, eligible.len()),
        alerts: alerts.len(),
        truth: eligible.len(),
    }
}

fn report(name: &str, s: &Score) {
    println!(
        "{name:<16} precision {:.3}  recall {:.3}  ({} alerts, {} labelled)",
        s.precision, s.recall, s.alerts, s.truth
    );
}

fn assert_quality(name: &str, s: &Score) {
    assert!(
        s.truth >= 20,
        "{name}: too few labelled cases ({}) to judge",
        s.truth
    );
    assert!(
        s.precision >= 0.9,
        "{name}: precision {:.3} < 0.9",
        s.precision
    );
    assert!(s.recall >= 0.9, "{name}: recall {:.3} < 0.9", s.recall);
}

#[test]
fn detectors_meet_the_quality_bar_on_labelled_simulator_data() {
    let run = generate(&fleet_config(0.0));
    let spikes = [
        (
            "spike/zscore",
            DetectorConfig::Zscore {
                window: 60,
                threshold: 4.0,
            },
        ),
        (
            "spike/ewma",
            DetectorConfig::Ewma {
                alpha: 0.1,
                alpha_variance: None,
                k: 4.0,
            },
        ),
        (
            "spike/mad",
            DetectorConfig::Mad {
                window: 60,
                threshold: 5.0,
            },
        ),
    ];
    let mut scores = Vec::new();
    for (name, d) in spikes {
        scores.push((name, spike_score(&run, d)));
    }
    // `detectors` omitted: the default ensemble.
    scores.push((
        "spike/default",
        spike_score_all(&run, sluice_transforms::anomaly::default_detectors()),
    ));
    scores.push(("stuck", stuck_score(&run)));
    scores.push(("missing", missing_score(&run)));
    // Not asserted: other detectors on the same spikes, for the record.
    let extra = [
        (
            "spike/rate",
            spike_score(
                &run,
                DetectorConfig::RateOfChange {
                    k: 4.0,
                    alpha: 0.02,
                    max_per_second: Some(4.0),
                },
            ),
        ),
        (
            "spike/threshold",
            spike_score(
                &run,
                DetectorConfig::Threshold {
                    min: Some(12.0),
                    max: Some(32.0),
                    hysteresis: 1.0,
                },
            ),
        ),
    ];
    for (name, s) in scores.iter().chain(extra.iter()) {
        report(name, s);
    }
    for (name, s) in &scores {
        assert_quality(name, s);
    }
}

#[test]
fn drift_is_reported_not_asserted() {
    // Drifting devices: a slow upward trend. Printed for the record; the statistical detectors
    // are tuned for sudden changes and adapt to trends by design.
    let run = generate(&fleet_config(0.1));
    let labels = labels(&run);
    let drifted = labels.values().filter(|l| **l == Label::Drift).count();
    assert!(drifted > 0, "the drift scenario must contain drift");
    let alerts = alerts_of(
        &run,
        DetectorConfig::Threshold {
            min: None,
            max: Some(32.0),
            hysteresis: 1.0,
        },
    );
    let on_drift = alerts
        .iter()
        .filter(|(d, t, _)| labels.get(&(d.clone(), *t)) == Some(&Label::Drift))
        .count();
    println!(
        "drift/threshold  {} alerts, {} on drifting readings ({} drifting readings)",
        alerts.len(),
        on_drift,
        drifted
    );
}
