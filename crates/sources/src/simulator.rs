//! `simulator` source: a seeded fleet of devices publishing JSON telemetry.
//!
//! Every device reports once per `interval` of *event time*:
//! `{"ts":…,"temp":…,"humidity":…,"voltage":…,"device_status":"online","seq":…}` on topic
//! `devices/{device_id}/data`. Values are mean-reverting random walks with measurement noise.
//! Labelled anomalies can be injected (spikes, drift, stuck sensors, silent devices) along with
//! out-of-order, late and malformed messages, so detectors can be scored against ground truth:
//! with `anomalies.label = true` each affected payload carries `"label":"spike"` (or `drift`,
//! `stuck`), and [`Fleet::silences`] lists every silent period.
//!
//! The same seed always gives the same stream ([`Fleet`] is a pure generator); `rate` only paces
//! it in wall-clock time. Event time starts at `start_time` (default: now) and advances by
//! `interval` per round, so at `rate = devices / interval` it tracks the wall clock.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::config::HumanDuration;
use sluice_core::decode::{DecodeConfig, Decoded, Decoder};
use sluice_core::record::{intern, Meta};
use sluice_core::registry::{BuildContext, SourceConfig};
use sluice_core::source::{Source, SourceContext};
use sluice_core::topology::now_ns;
use sluice_core::BoxError;
use tokio::time::Instant;

/// Pace of the simulator: records per second across the fleet, or `"unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Rate {
    PerSecond(f64),
    Unlimited(Unlimited),
}

/// The literal `"unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Unlimited {
    Unlimited,
}

/// Injected anomalies and faults. Probabilities are per reading unless stated otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AnomalyConfig {
    /// Probability that a reading's `temp` is a spike of 8–15 °C up or down. Default 0.
    #[serde(default)]
    pub spike_probability: f64,
    /// Fraction of devices whose `temp` drifts upward (0.05 °C per reading) from a random
    /// round in the first half of the run. Default 0.
    #[serde(default)]
    pub drift_devices: f64,
    /// Probability that a device's temperature sensor gets stuck (repeats its last value) for
    /// `stuck_readings` readings. Default 0.
    #[serde(default)]
    pub stuck_probability: f64,
    /// Length of a stuck period, in readings. Default 20.
    #[serde(default = "default_stuck_readings")]
    pub stuck_readings: u32,
    /// Probability that a device goes silent for `silent_readings` rounds. Default 0.
    #[serde(default)]
    pub silent_probability: f64,
    /// Length of a silent period, in rounds. Default 30.
    #[serde(default = "default_silent_readings")]
    pub silent_readings: u32,
    /// Probability that a reading is swapped with the next one of the same round. Default 0.
    #[serde(default)]
    pub out_of_order_probability: f64,
    /// Probability that a reading arrives `late_by` after its event time. Default 0.
    #[serde(default)]
    pub late_probability: f64,
    /// How late a late reading is. Default "2m".
    #[serde(default = "default_late_by")]
    pub late_by: HumanDuration,
    /// Probability that a payload is malformed JSON (goes to `dead_letter`). Default 0.
    #[serde(default)]
    pub malformed_probability: f64,
    /// Add `"label":"spike" | "drift" | "stuck"` to affected payloads. Default false.
    #[serde(default)]
    pub label: bool,
}

fn default_stuck_readings() -> u32 {
    20
}
fn default_silent_readings() -> u32 {
    30
}
fn default_late_by() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            spike_probability: 0.0,
            drift_devices: 0.0,
            stuck_probability: 0.0,
            stuck_readings: default_stuck_readings(),
            silent_probability: 0.0,
            silent_readings: default_silent_readings(),
            out_of_order_probability: 0.0,
            late_probability: 0.0,
            late_by: default_late_by(),
            malformed_probability: 0.0,
            label: false,
        }
    }
}

/// A seeded fleet of simulated devices publishing JSON telemetry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SimulatorConfig {
    /// Number of devices. Default 10.
    #[serde(default = "default_devices")]
    pub devices: usize,
    /// Records per second across the fleet, or "unlimited". Default: `devices / interval`
    /// (one reading per device per `interval` of wall clock, so event time keeps pace with it;
    /// faster rates run ahead of the clock and meet `max_future_skew` in `aggregate` and
    /// `dedupe` unless `start_time` lies far enough in the past).
    #[serde(default)]
    pub rate: Option<Rate>,
    /// Stop after this many records (then the pipeline drains and exits). Default: never.
    #[serde(default)]
    pub count: Option<u64>,
    /// Random seed: the same seed gives the same stream. Default 1.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Event time between two readings of one device. Default "1s".
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
    /// Event time of the first round, RFC 3339. Default: the time the source starts.
    #[serde(default)]
    pub start_time: Option<String>,
    /// Topic of each device; `{device_id}` is replaced. Default "devices/{device_id}/data".
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Records per batch sent downstream. Default 256.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Injected anomalies and faults. Default: none.
    #[serde(default)]
    pub anomalies: AnomalyConfig,
    /// Decoding of the generated payloads. Default: JSON with `ts` in ms and `topic` as the
    /// topic pattern (so `device_id` becomes a tag).
    #[serde(default)]
    pub decode: Option<DecodeConfig>,
}

fn default_devices() -> usize {
    10
}
fn default_seed() -> u64 {
    1
}
fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_topic() -> String {
    "devices/{device_id}/data".into()
}
fn default_batch_size() -> usize {
    256
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            devices: default_devices(),
            rate: None,
            count: None,
            seed: default_seed(),
            interval: default_interval(),
            start_time: None,
            topic: default_topic(),
            batch_size: default_batch_size(),
            anomalies: AnomalyConfig::default(),
            decode: None,
        }
    }
}

impl SimulatorConfig {
    /// The decoding the source applies: `decode`, or JSON with `topic` as the topic pattern.
    pub fn decode_config(&self) -> DecodeConfig {
        self.decode.clone().unwrap_or_else(|| DecodeConfig {
            topic_pattern: Some(self.topic.clone()),
            ..DecodeConfig::default()
        })
    }

    /// `rate`, or by default one reading per device per `interval` of wall clock.
    fn effective_rate(&self) -> Rate {
        self.rate.unwrap_or_else(|| {
            Rate::PerSecond(self.devices as f64 / self.interval.0.as_secs_f64().max(1e-9))
        })
    }

    fn validate(&self) -> Result<(), String> {
        if self.devices == 0 {
            return Err("`devices` must be at least 1".into());
        }
        if let Some(Rate::PerSecond(r)) = self.rate {
            if !(r > 0.0 && r.is_finite()) {
                return Err(format!(
                    "`rate` must be a positive number or \"unlimited\", got {r}"
                ));
            }
        }
        if self.interval.0.is_zero() {
            return Err("`interval` must be positive".into());
        }
        let a = &self.anomalies;
        for (name, p) in [
            ("spike_probability", a.spike_probability),
            ("drift_devices", a.drift_devices),
            ("stuck_probability", a.stuck_probability),
            ("silent_probability", a.silent_probability),
            ("out_of_order_probability", a.out_of_order_probability),
            ("late_probability", a.late_probability),
            ("malformed_probability", a.malformed_probability),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!(
                    "`anomalies.{name}` must be between 0 and 1, got {p}"
                ));
            }
        }
        Ok(())
    }
}

/// Ground-truth label of a generated reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Label {
    Spike,
    Drift,
    Stuck,
}

impl Label {
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Spike => "spike",
            Label::Drift => "drift",
            Label::Stuck => "stuck",
        }
    }
}

/// One generated message.
#[derive(Debug, Clone)]
pub struct Reading {
    /// Index of the device (its id is [`Fleet::device_id`]).
    pub device: usize,
    /// Event time, ms since epoch (already shifted for late readings).
    pub ts_ms: i64,
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub label: Option<Label>,
    pub malformed: bool,
    pub late: bool,
}

/// A silent period of one device: no readings with event time in `[start_ms, end_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Silence {
    pub device: usize,
    pub start_ms: i64,
    pub end_ms: i64,
}

#[derive(Debug, Clone)]
struct Device {
    id: Arc<str>,
    topic: Arc<str>,
    temp: f64,
    temp_base: f64,
    humidity: f64,
    voltage: f64,
    seq: u64,
    drift_from: Option<u64>,
    stuck_left: u32,
    stuck_value: f64,
    silent_left: u32,
}

/// The deterministic generator behind the `simulator` source.
#[derive(Debug, Clone)]
pub struct Fleet {
    cfg: SimulatorConfig,
    rng: ChaCha8Rng,
    devices: Vec<Device>,
    round: u64,
    start_ms: i64,
    interval_ms: i64,
    silences: Vec<Silence>,
    noise: Normal<f64>,
    step: Normal<f64>,
}

impl Fleet {
    /// A fleet starting at `start_ms` (event time of the first round).
    pub fn new(cfg: &SimulatorConfig, start_ms: i64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let n = cfg.devices.max(1);
        let devices = (0..n)
            .map(|i| {
                let id: Arc<str> = Arc::from(format!("dev-{:04}", i + 1));
                let topic: Arc<str> = Arc::from(cfg.topic.replace("{device_id}", &id));
                let base = 18.0 + rng.random::<f64>() * 8.0;
                let drift = rng.random::<f64>() < cfg.anomalies.drift_devices;
                Device {
                    id,
                    topic,
                    temp: base,
                    temp_base: base,
                    humidity: 35.0 + rng.random::<f64>() * 20.0,
                    voltage: 3.6 + rng.random::<f64>() * 0.5,
                    seq: 0,
                    drift_from: drift.then(|| rng.random_range(10..200)),
                    stuck_left: 0,
                    stuck_value: base,
                    silent_left: 0,
                }
            })
            .collect();
        Fleet {
            interval_ms: (cfg.interval.0.as_millis() as i64).max(1),
            cfg: cfg.clone(),
            rng,
            devices,
            round: 0,
            start_ms,
            silences: Vec::new(),
            noise: Normal::new(0.0, 0.2).unwrap_or_else(|_| unreachable!("constant parameters")),
            step: Normal::new(0.0, 0.05).unwrap_or_else(|_| unreachable!("constant parameters")),
        }
    }

    /// The id of device `i` (`dev-0001`, …).
    pub fn device_id(&self, i: usize) -> &str {
        &self.devices[i].id
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Every silent period started so far (the last ones may extend past the last round).
    pub fn silences(&self) -> &[Silence] {
        &self.silences
    }

    /// Event time of the next round, ms.
    pub fn next_round_ms(&self) -> i64 {
        self.start_ms + self.round as i64 * self.interval_ms
    }

    /// Generates one round (one reading per device that is not silent) into `out`.
    pub fn round(&mut self, out: &mut Vec<Reading>) {
        let ts = self.next_round_ms();
        let first = out.len();
        let a = self.cfg.anomalies.clone();
        for i in 0..self.devices.len() {
            if self.devices[i].silent_left > 0 {
                self.devices[i].silent_left -= 1;
                continue;
            }
            if a.silent_probability > 0.0 && self.rng.random::<f64>() < a.silent_probability {
                self.devices[i].silent_left = a.silent_readings.saturating_sub(1);
                self.silences.push(Silence {
                    device: i,
                    start_ms: ts,
                    end_ms: ts + a.silent_readings as i64 * self.interval_ms,
                });
                continue;
            }
            out.push(self.reading(i, ts, &a));
        }
        // Out-of-order: swap with the next reading of the round.
        if a.out_of_order_probability > 0.0 {
            let end = out.len();
            for j in first..end.saturating_sub(1) {
                if self.rng.random::<f64>() < a.out_of_order_probability {
                    out.swap(j, j + 1);
                }
            }
        }
        self.round += 1;
    }

    fn reading(&mut self, i: usize, ts: i64, a: &AnomalyConfig) -> Reading {
        let round = self.round;
        let noise = self.noise.sample(&mut self.rng);
        let step = self.step.sample(&mut self.rng);
        let d = &mut self.devices[i];
        d.seq += 1;
        // Mean-reverting random walk plus measurement noise.
        d.temp += step + 0.05 * (d.temp_base - d.temp);
        d.humidity = (d.humidity + step * 4.0).clamp(5.0, 95.0);
        d.voltage = (d.voltage - 0.00001 + step * 0.01).clamp(3.0, 4.3);
        let mut temp = d.temp + noise;
        let mut label = None;
        if let Some(from) = d.drift_from {
            if round >= from {
                temp += 0.05 * (round - from) as f64;
                label = Some(Label::Drift);
            }
        }
        if d.stuck_left > 0 {
            d.stuck_left -= 1;
            temp = d.stuck_value;
            label = Some(Label::Stuck);
        } else if a.stuck_probability > 0.0 && self.rng.random::<f64>() < a.stuck_probability {
            let d = &mut self.devices[i];
            d.stuck_left = a.stuck_readings.saturating_sub(1);
            d.stuck_value = (temp * 100.0).round() / 100.0;
            temp = d.stuck_value;
            label = Some(Label::Stuck);
        } else if a.spike_probability > 0.0 && self.rng.random::<f64>() < a.spike_probability {
            let magnitude = self.rng.random_range(8.0..15.0);
            temp += if self.rng.random::<bool>() {
                magnitude
            } else {
                -magnitude
            };
            label = Some(Label::Spike);
        }
        let late = a.late_probability > 0.0 && self.rng.random::<f64>() < a.late_probability;
        let malformed =
            a.malformed_probability > 0.0 && self.rng.random::<f64>() < a.malformed_probability;
        let d = &self.devices[i];
        let event_ts = if late {
            ts - a.late_by.0.as_millis() as i64
        } else {
            ts
        };
        let label_part = match (a.label, label) {
            (true, Some(l)) => format!(",\"label\":\"{}\"", l.as_str()),
            _ => String::new(),
        };
        let payload = if malformed {
            format!("{{\"ts\":{event_ts},\"temp\":{temp:.2},\"humidity\":")
        } else {
            format!(
                "{{\"ts\":{event_ts},\"temp\":{temp:.2},\"humidity\":{:.1},\"voltage\":{:.3},\"device_status\":\"online\",\"seq\":{}{label_part}}}",
                d.humidity, d.voltage, d.seq
            )
        };
        Reading {
            device: i,
            ts_ms: event_ts,
            topic: d.topic.clone(),
            payload: Bytes::from(payload),
            label,
            malformed,
            late,
        }
    }
}

#[async_trait]
impl SourceConfig for SimulatorConfig {
    async fn build(&self, _cx: &BuildContext) -> Result<Box<dyn Source>, BoxError> {
        self.validate()?;
        let decoder = Decoder::new(self.decode_config())?;
        let start_ms = match &self.start_time {
            Some(s) => {
                sluice_core::json::parse_time(s).map_err(|e| format!("`start_time`: {e}"))?
                    / 1_000_000
            }
            None => now_ns() / 1_000_000,
        };
        Ok(Box::new(Simulator {
            fleet: Fleet::new(self, start_ms),
            decoder,
            cfg: self.clone(),
        }))
    }
}

struct Simulator {
    fleet: Fleet,
    decoder: Decoder,
    cfg: SimulatorConfig,
}

#[async_trait]
impl Source for Simulator {
    async fn run(mut self: Box<Self>, cx: SourceContext) -> Result<(), BoxError> {
        let source = intern(&cx.name);
        let limit = self.cfg.count.unwrap_or(u64::MAX);
        let rate = match self.cfg.effective_rate() {
            Rate::PerSecond(r) => Some(r),
            Rate::Unlimited(_) => None,
        };
        // Small batches at low rates so records flow smoothly; full batches otherwise.
        let batch_size = match rate {
            Some(r) => ((r / 10.0) as usize).clamp(1, self.cfg.batch_size.max(1)),
            None => self.cfg.batch_size.max(1),
        };
        let started = Instant::now();
        let mut emitted: u64 = 0;
        let mut pending: Vec<Reading> = Vec::new();
        while emitted < limit && !cx.shutdown.is_cancelled() {
            let n = batch_size.min((limit - emitted) as usize);
            while pending.len() < n {
                self.fleet.round(&mut pending);
            }
            let received = now_ns();
            let mut decoded = Decoded::with_capacity(n);
            for reading in pending.drain(..n) {
                cx.metrics.add_bytes(reading.payload.len());
                let meta = Meta {
                    source: Some(source.clone()),
                    ..Meta::default()
                };
                decoded.push(
                    &mut self.decoder,
                    reading.payload,
                    Some(&reading.topic),
                    received,
                    meta,
                );
            }
            emitted += n as u64;
            tokio::select! {
                res = decoded.send(&cx.out) => res?,
                _ = cx.shutdown.cancelled() => break,
            }
            if let Some(r) = rate {
                let due = started + Duration::from_secs_f64(emitted as f64 / r);
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = cx.shutdown.cancelled() => break,
                }
            } else {
                // Let other tasks on this worker run between batches.
                tokio::task::yield_now().await;
            }
        }
        tracing::info!(source = %cx.name, records = emitted, "simulator finished");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(f: impl FnOnce(&mut SimulatorConfig)) -> SimulatorConfig {
        let mut c = SimulatorConfig::default();
        f(&mut c);
        c
    }

    #[test]
    fn same_seed_same_stream() {
        let c = config(|c| c.anomalies.spike_probability = 0.1);
        let (mut a, mut b) = (Fleet::new(&c, 0), Fleet::new(&c, 0));
        let (mut ra, mut rb) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            a.round(&mut ra);
            b.round(&mut rb);
        }
        assert_eq!(ra.len(), 50);
        assert!(ra.iter().zip(&rb).all(|(x, y)| x.payload == y.payload));
    }

    #[test]
    fn payloads_decode_with_device_tag() {
        let c = SimulatorConfig::default();
        let mut fleet = Fleet::new(&c, 1_000);
        let mut out = Vec::new();
        fleet.round(&mut out);
        let mut d = Decoder::new(c.decode_config()).expect("decoder");
        let r = d
            .decode(
                out[3].payload.clone(),
                Some(&out[3].topic),
                0,
                Meta::default(),
            )
            .expect("decodes");
        assert_eq!(r.tag("device_id"), Some("dev-0004"));
        assert_eq!(r.time, 1_000_000_000);
        for f in ["temp", "humidity", "voltage", "device_status", "seq"] {
            assert!(r.field(f).is_some(), "missing {f}");
        }
    }

    #[test]
    fn anomalies_are_labelled_and_silences_recorded() {
        let c = config(|c| {
            c.devices = 20;
            c.anomalies = AnomalyConfig {
                spike_probability: 0.01,
                stuck_probability: 0.002,
                silent_probability: 0.002,
                malformed_probability: 0.01,
                label: true,
                ..AnomalyConfig::default()
            };
        });
        let mut fleet = Fleet::new(&c, 0);
        let mut out = Vec::new();
        for _ in 0..500 {
            fleet.round(&mut out);
        }
        let count = |l| out.iter().filter(|r| r.label == Some(l)).count();
        assert!(count(Label::Spike) > 30, "spikes: {}", count(Label::Spike));
        assert!(count(Label::Stuck) > 20, "stuck: {}", count(Label::Stuck));
        assert!(!fleet.silences().is_empty());
        assert!(out.iter().any(|r| r.malformed));
        let labelled = out
            .iter()
            .find(|r| r.label == Some(Label::Spike) && !r.malformed)
            .expect("a spike");
        assert!(std::str::from_utf8(&labelled.payload)
            .expect("utf8")
            .contains("\"label\":\"spike\""));
        // Silent devices emit nothing inside their silence.
        let s = fleet.silences()[0];
        assert!(!out
            .iter()
            .any(|r| r.device == s.device && r.ts_ms >= s.start_ms && r.ts_ms < s.end_ms));
    }

    #[test]
    fn invalid_options_are_rejected() {
        assert!(config(|c| c.devices = 0).validate().is_err());
        assert!(config(|c| c.rate = Some(Rate::PerSecond(-1.0)))
            .validate()
            .is_err());
        assert!(config(|c| c.anomalies.spike_probability = 2.0)
            .validate()
            .is_err());
    }
}
