//! `anomaly` transform: streaming anomaly detectors per series, and missing heartbeats.
//!
//! ```toml
//! [transforms.detect]
//! type = "anomaly"
//! inputs = ["sim"]
//! fields = ["temp"]
//! group_by = ["device_id"]
//! detectors = [
//!   { type = "zscore", window = 60, threshold = 4.0 },
//!   { type = "threshold", max = 40.0, hysteresis = 1.0 },
//!   { type = "stuck", samples = 10 },
//!   { type = "missing", timeout = "10s" },
//! ]
//! ```
//!
//! A series is one field of one group (`dev-0001/temp`). Records pass through unchanged on the
//! default output (or annotated with `anomaly` / `anomaly_score` when `annotate = true`); alerts
//! are new records on the `anomalies` output with tags = group tags and fields `series`,
//! `field`, `detector`, `value`, `expected_min`, `expected_max`, `score`, `severity`, `message`
//! (`score`: the calibrated score in [0, 1) for the statistical detectors, the relative excess
//! for `threshold`; `severity` "critical" from twice the detector's threshold).
//!
//! Detectors: `threshold` (fixed limits, one alert per excursion thanks to hysteresis), `zscore`
//! (rolling window mean/stddev), `ewma` (exponentially weighted mean/variance, k-sigma), `mad`
//! (rolling median / median absolute deviation, robust), `rate_of_change` (z-score of the change
//! per second, or an absolute limit), `stuck` (value unchanged for N samples and optionally T
//! time) and `missing` (a group silent for `timeout` raises one "offline" alert from the timer,
//! one "back online" when it reports), and `seasonal` (a baseline per time-of-cycle bucket,
//! e.g. hour of day). Without `detectors`, an ensemble of seasonal and ewma runs: set
//! `type = "anomaly"` and `fields`, nothing else.
//!
//! Scores are calibrated per series: each statistical detector's raw score (a z-like number)
//! is compared with that detector's own recent raw scores on that series (HTM's "anomaly
//! likelihood" idea): the Gaussian tail probability q of a short average of raw scores against
//! their long-run mean and spread becomes a score s / (s + 5), s = −log10 q, in [0, 1). One
//! `alert_score` therefore means the same rarity on every series, whatever its units, noise or
//! routine spikes. An alert needs the detector's own threshold (`k`, `threshold`) and
//! `alert_score`; with `annotate = true` every record carries the highest score of its series
//! (`anomaly_score`), alert or not.
//!
//! The statistical detectors stay silent for the first `warmup` samples of a series (ewma builds
//! an exact mean and variance meanwhile). An out-of-band value enters the zscore, ewma and
//! rate_of_change baselines clamped to the alert boundary only for the first [`PROTECT`]
//! consecutive out-of-band samples: a short spike does not blind the detector to the next one,
//! and a level shift that lasts is learned as it is instead of alerting for a long time. Exact
//! repeats of the previous value (a stuck sensor) are scored but kept out of the baselines, so
//! a stuck period cannot shrink the spread to nothing and make the sensor's recovery look like a
//! spike. State is bounded (O(1) per detector and series, plus the zscore / mad windows): at
//! most `max_series` series (and as many groups for `missing`), least recently seen evicted.
//!
//! Delivery of alerts (at-least-once, like records, with the limits below):
//!
//! * An alert derived from a reading (every detector's alert, and `missing`'s "back online")
//!   carries a clone of that reading's finalizers: the reading is acknowledged only once it
//!   and its alerts have all been delivered (or dead-lettered). A lost alert makes the
//!   reading's batch Errored and the source redelivers the reading; the stage recognises the
//!   redelivery (same group, time and values) and raises the lost alert again instead of
//!   scoring the reading a second time (which would not bring a threshold alert back: the
//!   excursion has already alerted). A redelivery that arrives while the alert is still on its
//!   way takes that alert's outcome. This memory is bounded (the readings whose alerts are not
//!   all delivered yet, at most 16 per group, `max_series` groups) and is part of the state
//!   snapshot (below), so a reading redelivered after a restart raises its lost alerts too.
//! * `missing`'s "offline" alerts come from the timer, with no reading to hold back. While the
//!   pipeline runs and the device stays silent, a lost one is raised again by the timer; one
//!   not known to be delivered at the last snapshot is raised again after a restart (it may
//!   then come twice).
//!
//! State survives a restart when the stage has a state directory (`sluice run`:
//! `<data_dir>/<pipeline id>/<component>/anomaly.json`): every `state_interval` (default 30 s)
//! and at every orderly stop the series baselines, the heartbeat table (last seen, "offline
//! already reported") and the undelivered alerts are snapshotted, atomically, and the next
//! start restores them (module `state`). A crash loses what changed since the last snapshot.
//! With the `wall` clock the downtime is not counted as the devices' silence. A snapshot taken
//! with other `group_by` or `detectors` options, of another format version, or unreadable, is
//! ignored with a WARN naming the file: the stage then starts empty.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lru::LruCache;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::ack::{self, BatchStatus, Finalizers, Watch};
use sluice_core::config::HumanDuration;
use sluice_core::record::{intern, Batch, Name, Record, Value};
use sluice_core::registry::{BuildContext, TransformConfig};
use sluice_core::topology::now_ns;
use sluice_core::transform::{Transform, TransformOutput};
use sluice_core::BoxError;
use smallvec::SmallVec;

use crate::group::{GroupBy, GroupKey};
use crate::Error;

mod state;

pub use state::FILE as STATE_FILE;

/// The output receiving alert records.
pub const ANOMALIES: &str = "anomalies";

/// Which clock the `missing` detector compares last-seen times with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Clock {
    /// Arrival time on the wall clock: a live feed.
    #[default]
    Wall,
    /// Event time: the newest event time of the whole stream is "now" (replays, simulations).
    /// Heartbeats are checked as event time advances (every quarter of the timeout) and at
    /// the end of the input, so a replay faster than the wall clock still reports silences.
    Event,
}

/// One detector run on every series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DetectorConfig {
    /// Fixed limits. Alerts once when a value leaves [min, max]; re-arms only when the value is
    /// back inside by `hysteresis`.
    Threshold {
        /// Lower limit. Default: none.
        #[serde(default)]
        min: Option<f64>,
        /// Upper limit. Default: none.
        #[serde(default)]
        max: Option<f64>,
        /// How far back inside the limits a value must come to re-arm. Default 0.
        #[serde(default)]
        hysteresis: f64,
    },
    /// |x − mean| / stddev over the previous `window` samples above `threshold`.
    Zscore {
        /// Samples in the rolling window. Default 60.
        #[serde(default = "default_window")]
        window: usize,
        /// Alert above this score. Default 4.
        #[serde(default = "default_zscore")]
        threshold: f64,
    },
    /// |x − EWMA mean| / sqrt(EWMA variance) above `k`.
    Ewma {
        /// Smoothing factor in (0, 1]: weight of the newest sample. Default 0.1.
        #[serde(default = "default_alpha")]
        alpha: f64,
        /// Smoothing factor of the variance, usually smaller than `alpha`: a variance estimated
        /// from few samples is noisy, and its low moments are false alarms. Default `alpha` / 4.
        #[serde(default)]
        alpha_variance: Option<f64>,
        /// Alert above this many standard deviations. Default 4.
        #[serde(default = "default_zscore")]
        k: f64,
    },
    /// Modified z-score 0.6745·|x − median| / MAD over the previous `window` samples (when
    /// more than half the window is one value, MAD is 0: 1.2533·mean absolute deviation is
    /// used instead, so quantized data still scores). Costs O(`window`) per sample.
    Mad {
        /// Samples in the rolling window. Default 240.
        #[serde(default = "default_mad_window")]
        window: usize,
        /// Alert above this score. Default 5.
        #[serde(default = "default_mad")]
        threshold: f64,
    },
    /// How unusual the change since the previous sample is: the z-score of Δvalue / Δt
    /// against the series' own exponentially weighted mean and variance of past changes
    /// (unit-free). With `max_per_second` set, an absolute limit instead (a rule, uncalibrated).
    RateOfChange {
        /// Alert above this many standard deviations of the past changes. Default 4.
        #[serde(default = "default_zscore")]
        k: f64,
        /// Smoothing factor of the mean and variance of the changes. Default 0.02.
        #[serde(default = "default_rate_alpha")]
        alpha: f64,
        /// Largest normal change per second, in the data's units: an absolute limit replacing
        /// the z-score. Default: none.
        #[serde(default)]
        max_per_second: Option<f64>,
    },
    /// Seasonal baseline: one exponentially weighted mean and variance per time-of-cycle bucket
    /// (event time, UTC), e.g. per hour of the day (`period = "1d"`, `buckets = 24`) or per
    /// hour of the week (`period = "7d"`, `buckets = 168`); the score is the z-score against
    /// the current bucket, so a daily peak is normal at its hour and anomalous at another.
    /// A bucket scores once it has seen 3 samples (a full period of data).
    Seasonal {
        /// Length of the cycle. Default "1d".
        #[serde(default = "default_period")]
        period: HumanDuration,
        /// Buckets per period (at most 10000). Default 24.
        #[serde(default = "default_buckets")]
        buckets: usize,
        /// Smoothing factor of each bucket's mean and variance. Default 0.1.
        #[serde(default = "default_alpha")]
        alpha: f64,
        /// Alert above this many standard deviations from the bucket's mean. Default 4.
        #[serde(default = "default_zscore")]
        k: f64,
    },
    /// The value stays within `tolerance` of the same value for `samples` samples (and at least
    /// `duration`, when set). One alert per stuck period.
    Stuck {
        /// Consecutive equal samples. Default 10.
        #[serde(default = "default_stuck_samples")]
        samples: usize,
        /// Also require the run to last this long. Default: none.
        #[serde(default)]
        duration: Option<HumanDuration>,
        /// Largest difference still counted as unchanged. Default 0.
        #[serde(default)]
        tolerance: f64,
    },
    /// A group (device) silent for longer than `timeout` raises one "offline" alert (from the
    /// timer, without new input) and one "back online" alert when it reports again.
    Missing {
        /// Silence that makes a device offline. Required.
        timeout: HumanDuration,
        /// "wall" (arrival time) or "event" (newest event time of the stream). Default "wall".
        #[serde(default)]
        clock: Clock,
    },
}

fn default_window() -> usize {
    60
}
fn default_zscore() -> f64 {
    4.0
}
fn default_mad() -> f64 {
    5.0
}
fn default_period() -> HumanDuration {
    HumanDuration(Duration::from_secs(86_400))
}
fn default_buckets() -> usize {
    24
}
fn default_mad_window() -> usize {
    240
}
fn default_rate_alpha() -> f64 {
    0.02
}
fn default_alpha() -> f64 {
    0.1
}
fn default_stuck_samples() -> usize {
    10
}

/// Streaming anomaly detection per series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AnomalyConfig {
    /// Numeric fields to watch; each (group, field) is a series. A record with none of them
    /// goes to `dead_letter`. Default [] (only `missing` then makes sense).
    #[serde(default)]
    pub fields: Vec<String>,
    /// Tags identifying a group (device); a record without one of them goes to `dead_letter`.
    /// Default: ["device_id"], except that a record without a `device_id` tag is not
    /// dead-lettered but joins the group of its MQTT / Kafka topic (one group for all
    /// untagged records without a topic); its alerts carry that topic as `device_id`.
    #[serde(default)]
    pub group_by: Option<Vec<String>>,
    /// Detectors run on every series, e.g. `[{ type = "zscore" }, { type = "stuck" }]`; each
    /// entry is a table with `type` and that detector's options. Detectors and their options
    /// (default): `threshold` min, max (none; one required), hysteresis (0) · `zscore`
    /// window (60), threshold (4) · `ewma` alpha (0.1), alpha_variance (alpha / 4), k (4) ·
    /// `mad` window (240), threshold (5) · `rate_of_change` k (4), alpha (0.02),
    /// max_per_second (none: z-score of the change; set: absolute limit) · `seasonal`
    /// period ("1d"), buckets (24), alpha (0.1), k (4) · `stuck` samples
    /// (10), duration (none), tolerance (0) · `missing` timeout (required), clock ("wall" or
    /// "event"). Default: the ensemble `[{ type = "seasonal" }, { type = "ewma" }]`
    /// (calibrated scores combined as `combine` says).
    #[serde(default = "default_detectors")]
    pub detectors: Vec<DetectorConfig>,
    /// Samples a series needs before zscore, ewma, mad and rate_of_change may fire. Default 30.
    #[serde(default = "default_warmup")]
    pub warmup: u64,
    /// Calibrated score in [0, 1] a statistical detector (zscore, ewma, mad, rate_of_change
    /// without `max_per_second`) must also reach to alert, on top of its own threshold. The
    /// score is the surprise of the detector's raw score against that series' own recent raw
    /// scores: s / (s + 5) with s = −log10(Gaussian tail probability), so 0.5 is a 1-in-100000 event for
    /// this series, whatever its units or noise. Default 0.5.
    #[serde(default = "default_alert_score")]
    pub alert_score: f64,
    /// How the calibrated scores of several statistical detectors on one series combine into
    /// the record's score and the alert decision: "mean" (an alert needs the mean score to
    /// reach `alert_score`: one detector's outlier needs the others' support) or "max" (each
    /// detector alerts on its own score). Default "mean".
    #[serde(default)]
    pub combine: Combine,
    /// Most series (and groups) held; the least recently seen is forgotten. Default 100000.
    #[serde(default = "default_max_series")]
    pub max_series: usize,
    /// Set `anomaly` (bool: an alert was raised) and `anomaly_score` (continuous, in [0, 1]:
    /// the highest calibrated score of the record's series, 1 for a rule's alert; computed on
    /// every record, independent of the alert thresholds) on passing records. Default false.
    #[serde(default)]
    pub annotate: bool,
    /// How often the baselines and the heartbeat table are snapshotted to
    /// `<data_dir>/<pipeline id>/<component>/anomaly.json` (also at every orderly stop), to be
    /// restored at the next start. Default "30s".
    #[serde(default = "default_state_interval")]
    pub state_interval: HumanDuration,
}

impl AnomalyConfig {
    /// A configuration watching `fields` with every other option at its default (the
    /// default detector ensemble).
    pub fn for_fields(fields: &[&str]) -> Self {
        AnomalyConfig {
            fields: fields.iter().map(|f| f.to_string()).collect(),
            group_by: None,
            detectors: default_detectors(),
            warmup: default_warmup(),
            alert_score: default_alert_score(),
            combine: Combine::default(),
            max_series: default_max_series(),
            annotate: false,
            state_interval: default_state_interval(),
        }
    }

    /// The `group_by` tags in effect.
    pub fn group_tags(&self) -> Vec<String> {
        self.group_by.clone().unwrap_or_else(default_group_by)
    }
}

/// The default `state_interval`: 30 s.
pub fn default_state_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// The default detectors: an ensemble of a time-of-day baseline (seasonal, hourly buckets)
/// and a fast level baseline (ewma), combined by the mean of their calibrated scores.
pub fn default_detectors() -> Vec<DetectorConfig> {
    vec![
        DetectorConfig::Seasonal {
            period: default_period(),
            buckets: default_buckets(),
            alpha: default_alpha(),
            k: default_zscore(),
        },
        DetectorConfig::Ewma {
            alpha: default_alpha(),
            alpha_variance: None,
            k: default_zscore(),
        },
    ]
}

fn default_group_by() -> Vec<String> {
    vec!["device_id".into()]
}
fn default_warmup() -> u64 {
    30
}
fn default_alert_score() -> f64 {
    0.5
}
fn default_max_series() -> usize {
    100_000
}

#[async_trait]
impl TransformConfig for AnomalyConfig {
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Transform>, BoxError> {
        Ok(Box::new(Detector::new(self, cx)?))
    }

    fn outputs(&self) -> Vec<String> {
        vec![ANOMALIES.to_string()]
    }
}

/// A detector's verdict on one sample.
#[derive(Debug, Clone, PartialEq)]
struct Finding {
    detector: &'static str,
    score: f64,
    lo: Option<f64>,
    hi: Option<f64>,
    /// Severity "critical" rather than "warning".
    critical: bool,
    message: String,
}

/// A ring of the last `cap` samples with running sums (of values shifted by the series'
/// first value, to keep the sums well conditioned).
#[derive(Debug, Clone)]
struct Ring {
    cap: usize,
    values: VecDeque<f64>,
    sum: f64,
    sumsq: f64,
    /// Pushes since the sums were last recomputed (bounds rounding drift).
    since_exact: usize,
}

impl Ring {
    fn new(cap: usize) -> Self {
        Ring {
            cap,
            values: VecDeque::with_capacity(cap),
            sum: 0.0,
            sumsq: 0.0,
            since_exact: 0,
        }
    }

    fn push(&mut self, v: f64) {
        if self.values.len() == self.cap {
            if let Some(old) = self.values.pop_front() {
                self.sum -= old;
                self.sumsq -= old * old;
            }
        }
        self.values.push_back(v);
        self.sum += v;
        self.sumsq += v * v;
        self.since_exact += 1;
        if self.since_exact >= self.cap {
            self.sum = self.values.iter().sum();
            self.sumsq = self.values.iter().map(|x| x * x).sum();
            self.since_exact = 0;
        }
    }

    /// Mean and sample standard deviation.
    fn mean_std(&self) -> Option<(f64, f64)> {
        let n = self.values.len() as f64;
        if n < 2.0 {
            return None;
        }
        let mean = self.sum / n;
        let var = ((self.sumsq - self.sum * mean) / (n - 1.0)).max(0.0);
        Some((mean, var.sqrt()))
    }
}

/// Per-series state of one detector.
#[derive(Debug, Clone)]
enum State {
    Threshold {
        alerting: bool,
    },
    Zscore(Ring),
    Ewma {
        mean: f64,
        var: f64,
        /// Samples absorbed: the first `warmup` build an exact mean and variance (Welford),
        /// so the EWMA starts from a sound baseline instead of a variance of zero.
        n: u64,
        m2: f64,
    },
    Mad(Ring),
    Rate {
        prev: Option<(i64, f64)>,
        /// Moments of the past changes per second (the z-score mode).
        moments: Moments,
    },
    /// Per bucket of the cycle.
    Seasonal(Vec<Moments>),
    Stuck {
        value: f64,
        run: usize,
        since: i64,
        alerted: bool,
    },
    /// `missing` is tracked per group, not per series.
    None,
}

#[derive(Debug, Clone)]
struct Series {
    samples: u64,
    /// The previous value: an exact repeat is scored but kept out of the baselines.
    last: f64,
    /// The series' first value: statistics are kept on `x − shift`.
    shift: f64,
    states: Vec<State>,
    /// Per detector: the calibration of its raw scores (unused by the rules).
    calib: Vec<Calib>,
}

/// Samples a `seasonal` bucket needs before it scores.
const SEASONAL_MIN: u64 = 3;

/// Consecutive out-of-band samples that enter the zscore / ewma baselines clamped to the
/// alert boundary: a spike of up to this many samples does not inflate the spread (and blind
/// the detector to the next one); a level shift that lasts longer is learned as it is.
pub const PROTECT: u32 = 3;

/// Exponentially weighted mean and variance that start exact: the weight of a new sample is
/// max(1/n, alpha), so the first 1/alpha samples give the plain mean and (population)
/// variance and later ones forget the past at rate alpha.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Moments {
    pub(crate) n: u64,
    pub(crate) mean: f64,
    pub(crate) var: f64,
}

impl Moments {
    fn push(&mut self, x: f64, alpha: f64) {
        self.n += 1;
        let a = (1.0 / self.n as f64).max(alpha);
        let d = x - self.mean;
        self.mean += a * d;
        self.var = (1.0 - a) * (self.var + a * d * d);
    }

    fn is_finite(&self) -> bool {
        self.mean.is_finite() && self.var.is_finite() && self.var >= 0.0
    }

    /// Like [`Moments::push`], the starting mean and variance counting as `prior` samples.
    fn push_prior(&mut self, x: f64, alpha: f64, prior: f64) {
        self.n += 1;
        let a = (1.0 / (self.n as f64 + prior)).max(alpha);
        let d = x - self.mean;
        self.mean += a * d;
        self.var = (1.0 - a) * (self.var + a * d * d);
    }
}

/// Smoothing of the long-run moments of a detector's raw scores (≈ the last 300 scores).
const CALIB_ALPHA: f64 = 0.003;
/// Smoothing of the short-run average of raw scores compared with them.
const CALIB_SHORT: f64 = 0.5;
/// Weight of the prior distribution of raw scores, in samples (see [`Calib::default`]).
const CALIB_PRIOR: f64 = 100.0;
/// Smallest spread of raw scores assumed (raw scores are z-like, in standard deviations).
const CALIB_MIN_STD: f64 = 0.1;

/// Calibration of one detector's raw scores on one series, in the spirit of HTM's "anomaly
/// likelihood": a short average of the raw scores is compared with the long-run mean and
/// spread of that series' raw scores, and the Gaussian tail probability q of the difference
/// becomes the score s / (s + 5) with s = −log10(q) (see [`surprise`]). A series whose large raw scores are
/// routine (recurring spikes) learns them; a calm series' first spike scores 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Calib {
    pub(crate) long: Moments,
    pub(crate) short: f64,
    /// Consecutive out-of-band samples (the protection window of zscore / ewma).
    #[serde(default)]
    pub(crate) out_run: u32,
}

impl Default for Calib {
    /// Starts from the distribution of |z| for Gaussian noise (mean √(2/π) ≈ 0.8, variance
    /// 1 − 2/π ≈ 0.36), worth [`CALIB_PRIOR`] scores: one early spike does not make the
    /// next one look routine.
    fn default() -> Self {
        Calib {
            long: Moments {
                n: 0,
                mean: 0.8,
                var: 0.36,
            },
            short: 0.8,
            out_run: 0,
        }
    }
}

impl Calib {
    fn is_finite(&self) -> bool {
        self.long.is_finite() && self.short.is_finite()
    }

    /// The standardized deviation of raw score `raw` (its short average) from this series'
    /// past raw scores, then learns `raw`. [`surprise`] turns it into the calibrated score.
    fn deviation(&mut self, raw: f64) -> f64 {
        self.short += CALIB_SHORT * (raw - self.short);
        let std = self.long.var.sqrt().max(CALIB_MIN_STD);
        let u = (self.short - self.long.mean) / std;
        self.long.push_prior(raw, CALIB_ALPHA, CALIB_PRIOR);
        u
    }
}

/// The score of a standardized deviation `u`: with s = −log10 of its upper Gaussian tail
/// probability (the "decades of surprise"), s / (s + 5), in [0, 1): 0.5 is a 1-in-100000
/// event, 0.67 one in 10^10; never saturates, so even extreme scores keep their ranking.
fn surprise(u: f64) -> f64 {
    if u <= 0.0 {
        return 0.0;
    }
    // For large u the tail underflows; its logarithm is asymptotically −u²/2 − ln(u√(2π)).
    let s = if u < 30.0 {
        -(0.5 * erfc(u / std::f64::consts::SQRT_2)).log10()
    } else {
        (u * u / 2.0 + (u * (2.0 * std::f64::consts::PI).sqrt()).ln()) / std::f64::consts::LN_10
    };
    s / (s + 5.0)
}

/// Complementary error function (Numerical Recipes' Chebyshev fit, relative error < 1.2e-7
/// everywhere, including far in the tail).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

#[derive(Debug)]
struct Heartbeat {
    last_seen: i64,
    offline: bool,
    /// The "offline" alert of the current silence and its outcome: raised again by the timer
    /// if it was lost (there is no reading whose redelivery could bring it back).
    offline_alert: Option<(Record, Watch)>,
}

/// Most alerting readings remembered per group (see [`Raised`]). Beyond it the oldest is
/// forgotten; should it be redelivered after its alert was lost, it is scored anew.
const RAISED_PER_GROUP: usize = 16;

/// The alerts one reading raised, kept until they are all delivered (or dead-lettered).
///
/// A lost alert makes its reading's batch Errored and the source redelivers the reading, but
/// the detectors have already taken it in (a threshold excursion alerts only once), so scoring
/// it anew would not bring the alert back. A redelivered reading is recognised by group, time
/// and values: it raises again the alerts that were lost and follows the outcome of those
/// still on their way, and is not scored a second time.
#[derive(Debug)]
struct Raised {
    time: i64,
    values: SmallVec<[Option<u64>; 4]>,
    top_score: f64,
    /// A detector flagged the reading (its `anomaly` annotation).
    flagged: bool,
    /// Each alert as emitted (without finalizers) and the outcome of its last emission.
    alerts: SmallVec<[(Record, Watch); 1]>,
}

impl Raised {
    /// Every alert delivered or dead-lettered: nothing left to raise again.
    fn settled(&self) -> bool {
        self.alerts
            .iter()
            .all(|(_, w)| w.status().is_some_and(BatchStatus::is_ackable))
    }
}

/// Emits `alert` on the anomalies output holding `reading` (the finalizers of the reading it
/// was derived from; empty for the timer's alerts) and a watched finalizer of its own.
/// Returns the alert as emitted, without finalizers, and the watch of its outcome.
fn emit_alert(
    mut alert: Record,
    reading: &Finalizers,
    out: &mut TransformOutput,
) -> (Record, Watch) {
    let kept = alert.clone();
    let (own, watch) = ack::watched();
    alert.finalizers = reading.clone();
    alert.finalizers.push(own);
    out.push_to(ANOMALIES, alert);
    (kept, watch)
}

/// Counters of the stage (logged at shutdown).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Alerts emitted.
    pub alerts: u64,
    /// Series forgotten because `max_series` was reached.
    pub evicted_series: u64,
    /// Records sent to `dead_letter`.
    pub invalid: u64,
}

/// The running `anomaly` stage.
pub struct Detector {
    name: String,
    fields: Vec<Name>,
    group_by: GroupBy,
    detectors: Vec<DetectorConfig>,
    missing: Option<(i64, Clock)>,
    limits: Limits,
    /// `group_by` is the default: a record without `device_id` joins its topic's group.
    fallback_group: bool,
    annotate: bool,
    series: LruCache<(GroupKey, u16), Series>,
    heartbeats: LruCache<GroupKey, Heartbeat>,
    /// Alerting readings whose alerts are not all delivered yet, per group.
    raised: LruCache<GroupKey, VecDeque<Raised>>,
    /// Newest event time seen (the `event` clock).
    max_event: i64,
    /// Event time of the last heartbeat check done while processing (the `event` clock).
    event_checked: i64,
    scratch: Vec<f64>,
    stats: Stats,
    names: Names,
    /// Where the state is snapshotted (`None` without a state directory).
    persist: Option<state::Persist>,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("name", &self.name)
            .field("series", &self.series.len())
            .field("stats", &self.stats)
            .finish()
    }
}

#[derive(Debug)]
struct Names {
    series: Name,
    field: Name,
    detector: Name,
    value: Name,
    expected_min: Name,
    expected_max: Name,
    score: Name,
    severity: Name,
    message: Name,
    anomaly: Name,
    anomaly_score: Name,
}

impl Detector {
    /// Validates `config` and builds the stage.
    pub fn new(config: &AnomalyConfig, cx: &BuildContext) -> Result<Self, Error> {
        if config.detectors.is_empty() {
            return Err(Error::option(
                cx,
                "detectors",
                "list at least one detector, e.g. [{ type = \"zscore\" }]",
            ));
        }
        let mut missing = None;
        for (i, d) in config.detectors.iter().enumerate() {
            let opt = |name: &str| format!("detectors[{i}].{name}");
            match d {
                DetectorConfig::Threshold {
                    min,
                    max,
                    hysteresis,
                } => {
                    if min.is_none() && max.is_none() {
                        return Err(Error::option(cx, opt("max"), "set `min`, `max` or both"));
                    }
                    if let (Some(lo), Some(hi)) = (min, max) {
                        if lo >= hi {
                            return Err(Error::option(cx, opt("min"), "`min` must be below `max`"));
                        }
                    }
                    if !(hysteresis.is_finite() && *hysteresis >= 0.0) {
                        return Err(Error::option(cx, opt("hysteresis"), "must be ≥ 0"));
                    }
                }
                DetectorConfig::Zscore { window, threshold }
                | DetectorConfig::Mad { window, threshold } => {
                    if *window < 3 {
                        return Err(Error::option(cx, opt("window"), "must be at least 3"));
                    }
                    if !(threshold.is_finite() && *threshold > 0.0) {
                        return Err(Error::option(cx, opt("threshold"), "must be positive"));
                    }
                }
                DetectorConfig::Ewma {
                    alpha,
                    alpha_variance,
                    k,
                } => {
                    if !(*alpha > 0.0 && *alpha <= 1.0) {
                        return Err(Error::option(cx, opt("alpha"), "must be in (0, 1]"));
                    }
                    if alpha_variance.is_some_and(|a| !(a > 0.0 && a <= 1.0)) {
                        return Err(Error::option(
                            cx,
                            opt("alpha_variance"),
                            "must be in (0, 1]",
                        ));
                    }
                    if !(k.is_finite() && *k > 0.0) {
                        return Err(Error::option(cx, opt("k"), "must be positive"));
                    }
                }
                DetectorConfig::RateOfChange {
                    k,
                    alpha,
                    max_per_second,
                } => {
                    if max_per_second.is_some_and(|m| !(m.is_finite() && m > 0.0)) {
                        return Err(Error::option(cx, opt("max_per_second"), "must be positive"));
                    }
                    if !(*alpha > 0.0 && *alpha <= 1.0) {
                        return Err(Error::option(cx, opt("alpha"), "must be in (0, 1]"));
                    }
                    if !(k.is_finite() && *k > 0.0) {
                        return Err(Error::option(cx, opt("k"), "must be positive"));
                    }
                }
                DetectorConfig::Seasonal {
                    period,
                    buckets,
                    alpha,
                    k,
                } => {
                    if period.0 < Duration::from_secs(1) {
                        return Err(Error::option(cx, opt("period"), "must be at least 1s"));
                    }
                    if !(1..=10_000).contains(buckets) {
                        return Err(Error::option(cx, opt("buckets"), "must be in 1..=10000"));
                    }
                    if !(*alpha > 0.0 && *alpha <= 1.0) {
                        return Err(Error::option(cx, opt("alpha"), "must be in (0, 1]"));
                    }
                    if !(k.is_finite() && *k > 0.0) {
                        return Err(Error::option(cx, opt("k"), "must be positive"));
                    }
                }
                DetectorConfig::Stuck {
                    samples, tolerance, ..
                } => {
                    if *samples < 2 {
                        return Err(Error::option(cx, opt("samples"), "must be at least 2"));
                    }
                    if !(tolerance.is_finite() && *tolerance >= 0.0) {
                        return Err(Error::option(cx, opt("tolerance"), "must be ≥ 0"));
                    }
                }
                DetectorConfig::Missing { timeout, clock } => {
                    if timeout.0.is_zero() {
                        return Err(Error::option(cx, opt("timeout"), "must be positive"));
                    }
                    if missing.is_some() {
                        return Err(Error::option(
                            cx,
                            opt("type"),
                            "only one `missing` detector",
                        ));
                    }
                    let t = i64::try_from(timeout.0.as_nanos()).unwrap_or(i64::MAX);
                    missing = Some((t, *clock));
                }
            }
        }
        let has_series_detector = config
            .detectors
            .iter()
            .any(|d| !matches!(d, DetectorConfig::Missing { .. }));
        if has_series_detector && config.fields.is_empty() {
            return Err(Error::option(
                cx,
                "fields",
                "list the numeric fields to watch, e.g. fields = [\"temp\"]",
            ));
        }
        if config.fields.len() > usize::from(u16::MAX) {
            return Err(Error::option(cx, "fields", "too many fields"));
        }
        let cap = NonZeroUsize::new(config.max_series)
            .ok_or_else(|| Error::option(cx, "max_series", "must be at least 1"))?;
        if !(config.alert_score >= 0.0 && config.alert_score <= 1.0) {
            return Err(Error::option(cx, "alert_score", "must be in [0, 1]"));
        }
        if config.state_interval.0 < Duration::from_secs(1) {
            return Err(Error::option(cx, "state_interval", "must be at least 1s"));
        }
        let mut detector = Detector {
            name: cx.name.clone(),
            fields: config.fields.iter().map(|f| intern(f)).collect(),
            group_by: GroupBy::new(&config.group_tags()),
            detectors: config.detectors.clone(),
            missing,
            limits: Limits {
                warmup: config.warmup,
                alert_score: config.alert_score,
                combine: config.combine,
                annotate: config.annotate,
            },
            fallback_group: config.group_by.is_none(),
            annotate: config.annotate,
            series: LruCache::new(cap),
            heartbeats: LruCache::new(cap),
            raised: LruCache::new(cap),
            max_event: i64::MIN,
            event_checked: i64::MIN,
            scratch: Vec::new(),
            stats: Stats::default(),
            names: Names {
                series: intern("series"),
                field: intern("field"),
                detector: intern("detector"),
                value: intern("value"),
                expected_min: intern("expected_min"),
                expected_max: intern("expected_max"),
                score: intern("score"),
                severity: intern("severity"),
                message: intern("message"),
                anomaly: intern("anomaly"),
                anomaly_score: intern("anomaly_score"),
            },
            persist: cx
                .state_dir
                .as_deref()
                .map(|dir| state::Persist::new(dir, config)),
        };
        detector.restore();
        Ok(detector)
    }

    /// What the stage counted so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Number of series held.
    pub fn series_len(&self) -> usize {
        self.series.len()
    }

    fn new_series(&self, first: f64) -> Series {
        let states = self
            .detectors
            .iter()
            .map(|d| match d {
                DetectorConfig::Threshold { .. } => State::Threshold { alerting: false },
                DetectorConfig::Zscore { window, .. } => State::Zscore(Ring::new(*window)),
                DetectorConfig::Ewma { .. } => State::Ewma {
                    mean: 0.0,
                    var: 0.0,
                    n: 0,
                    m2: 0.0,
                },
                DetectorConfig::Mad { window, .. } => State::Mad(Ring::new(*window)),
                DetectorConfig::RateOfChange { .. } => State::Rate {
                    prev: None,
                    moments: Moments::default(),
                },
                DetectorConfig::Seasonal { buckets, .. } => {
                    State::Seasonal(vec![Moments::default(); *buckets])
                }
                DetectorConfig::Stuck { .. } => State::Stuck {
                    value: f64::NAN,
                    run: 0,
                    since: 0,
                    alerted: false,
                },
                DetectorConfig::Missing { .. } => State::None,
            })
            .collect();
        Series {
            samples: 0,
            last: f64::NAN,
            shift: first,
            states,
            calib: vec![Calib::default(); self.detectors.len()],
        }
    }

    /// The watched values of `r`, or why it cannot be scored.
    fn values(&self, r: &Record) -> Result<SmallVec<[Option<f64>; 4]>, String> {
        let mut values = SmallVec::new();
        for name in &self.fields {
            let v = match r.field(name) {
                None | Some(Value::Null) => None,
                Some(v @ Value::Str(_)) => {
                    return Err(format!(
                        "field `{name}` is a {}, not a number",
                        v.type_name()
                    ))
                }
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() => Some(x),
                    Some(x) => return Err(format!("field `{name}` is {x}")),
                    None => return Err(format!("field `{name}` is not a number")),
                },
            };
            values.push(v);
        }
        if !self.fields.is_empty() && values.iter().all(Option::is_none) {
            let names: Vec<&str> = self.fields.iter().map(|f| &**f).collect();
            return Err(format!("none of the watched fields {names:?} is present"));
        }
        Ok(values)
    }

    fn accept(&mut self, mut r: Record, wall: i64, out: &mut TransformOutput) {
        let key = match self.group_by.key(&r) {
            Ok(k) => k,
            Err(_) if self.fallback_group => {
                let group = r
                    .meta
                    .topic()
                    .map(Arc::<str>::from)
                    .unwrap_or_else(|| Arc::from(""));
                GroupKey::from_iter([group])
            }
            Err(e) => return self.invalid(r, e, out),
        };
        let values = match self.values(&r) {
            Ok(v) => v,
            Err(e) => return self.invalid(r, e, out),
        };
        let fingerprint: SmallVec<[Option<u64>; 4]> =
            values.iter().map(|v| v.map(f64::to_bits)).collect();
        if let Some((top_score, flagged)) =
            self.redelivered(&key, r.time, &fingerprint, &r.finalizers, out)
        {
            self.annotate(&mut r, top_score, flagged);
            out.push(r);
            return;
        }
        self.max_event = self.max_event.max(r.time);
        let mut top_score: f64 = 0.0;
        let mut flagged = false;
        // Alerts derived from this reading hold (clones of) its finalizers: the reading is
        // acknowledged only once its alerts are delivered too (see the module docs).
        let mut raised: SmallVec<[(Record, Watch); 1]> = SmallVec::new();
        if let Some((_, clock)) = self.missing {
            let seen = match clock {
                Clock::Wall => wall,
                Clock::Event => r.time,
            };
            let back = match self.heartbeats.get_mut(&key) {
                Some(hb) => {
                    hb.last_seen = hb.last_seen.max(seen);
                    // The silence is over: a lost "offline" alert is not raised any more.
                    hb.offline_alert = None;
                    std::mem::replace(&mut hb.offline, false)
                }
                None => {
                    self.heartbeats.put(
                        key.clone(),
                        Heartbeat {
                            last_seen: seen,
                            offline: false,
                            offline_alert: None,
                        },
                    );
                    false
                }
            };
            if back {
                self.stats.alerts += 1;
                let alert = self.missing_alert(&key, r.time, false);
                raised.push(emit_alert(alert, &r.finalizers, out));
            }
        }
        for (idx, v) in values.iter().enumerate() {
            let Some(x) = *v else { continue };
            let skey = (key.clone(), idx as u16);
            if !self.series.contains(&skey) {
                let fresh = self.new_series(x);
                if self.series.push(skey.clone(), fresh).is_some() {
                    self.stats.evicted_series += 1;
                }
            }
            let Some(series) = self.series.get_mut(&skey) else {
                continue;
            };
            let (sample_score, findings) = score(
                &self.detectors,
                series,
                &self.limits,
                r.time,
                x,
                &mut self.scratch,
            );
            top_score = top_score.max(sample_score);
            flagged |= !findings.is_empty();
            for finding in findings {
                let alert = self.alert(&key, idx, r.time, x, finding);
                raised.push(emit_alert(alert, &r.finalizers, out));
            }
        }
        if !raised.is_empty() {
            self.remember(
                key,
                Raised {
                    time: r.time,
                    values: fingerprint,
                    top_score,
                    flagged,
                    alerts: raised,
                },
            );
        }
        self.annotate(&mut r, top_score, flagged);
        out.push(r);
    }

    fn annotate(&self, r: &mut Record, top_score: f64, flagged: bool) {
        if self.annotate {
            r.set_field_named(&self.names.anomaly, Value::Bool(flagged));
            r.set_field_named(&self.names.anomaly_score, Value::F64(top_score));
        }
    }

    /// If `time` / `values` is a redelivery of a reading of group `key` that raised alerts:
    /// raises the lost ones again (holding `reading`), makes `reading` follow the outcome of
    /// those still on their way, and returns the reading's score. `None` for a new reading.
    fn redelivered(
        &mut self,
        key: &GroupKey,
        time: i64,
        values: &SmallVec<[Option<u64>; 4]>,
        reading: &Finalizers,
        out: &mut TransformOutput,
    ) -> Option<(f64, bool)> {
        let list = self.raised.get_mut(key)?;
        let Some(entry) = list
            .iter_mut()
            .find(|e| e.time == time && e.values == *values)
        else {
            // Not a redelivery; forget what is settled while here, to keep the state small.
            list.retain(|e| !e.settled());
            if list.is_empty() {
                self.raised.pop(key);
            }
            return None;
        };
        for (alert, watch) in entry.alerts.iter_mut() {
            match watch.status() {
                None => watch.follow(reading.clone()),
                Some(BatchStatus::Errored) => {
                    self.stats.alerts += 1;
                    let (_, w) = emit_alert(alert.clone(), reading, out);
                    *watch = w;
                }
                Some(_) => {}
            }
        }
        Some((entry.top_score, entry.flagged))
    }

    fn remember(&mut self, key: GroupKey, raised: Raised) {
        if let Some(list) = self.raised.get_mut(&key) {
            list.retain(|e| !e.settled());
            if list.len() >= RAISED_PER_GROUP {
                list.pop_front();
            }
            list.push_back(raised);
        } else {
            self.raised.put(key, VecDeque::from([raised]));
        }
    }

    fn invalid(&mut self, r: Record, reason: String, out: &mut TransformOutput) {
        self.stats.invalid += 1;
        out.dead_letter(r, format!("anomaly `{}`: {reason}", self.name));
    }

    fn alert(&mut self, key: &GroupKey, field: usize, time: i64, x: f64, f: Finding) -> Record {
        self.stats.alerts += 1;
        let field_name = self
            .fields
            .get(field)
            .cloned()
            .unwrap_or_else(|| intern(""));
        let mut r = Record::new(time);
        r.tags = self.group_by.tags_of(key);
        let series = format!("{}/{}", GroupBy::display(key), field_name);
        let severity = if f.critical { "critical" } else { "warning" };
        let n = &self.names;
        let opt = |v: Option<f64>| v.map_or(Value::Null, Value::F64);
        r.fields = vec![
            (n.series.clone(), Value::Str(Arc::from(series))),
            (n.field.clone(), Value::Str(Arc::from(&*field_name))),
            (n.detector.clone(), Value::from(f.detector)),
            (n.value.clone(), Value::F64(x)),
            (n.expected_min.clone(), opt(f.lo)),
            (n.expected_max.clone(), opt(f.hi)),
            (n.score.clone(), Value::F64(f.score)),
            (n.severity.clone(), Value::from(severity)),
            (n.message.clone(), Value::Str(Arc::from(f.message))),
        ];
        r
    }

    /// The "offline" / "back online" alert of group `key` (not counted: the caller does).
    fn missing_alert(&self, key: &GroupKey, time: i64, offline: bool) -> Record {
        let n = &self.names;
        let group = GroupBy::display(key);
        let (severity, message) = if offline {
            ("critical", format!("{group} offline: no data"))
        } else {
            ("info", format!("{group} back online"))
        };
        let mut r = Record::new(time);
        r.tags = self.group_by.tags_of(key);
        r.fields = vec![
            (n.series.clone(), Value::Str(Arc::from(group))),
            (n.detector.clone(), Value::from("missing")),
            (n.value.clone(), Value::Null),
            (n.expected_min.clone(), Value::Null),
            (n.expected_max.clone(), Value::Null),
            (n.score.clone(), Value::F64(if offline { 1.0 } else { 0.0 })),
            (n.severity.clone(), Value::from(severity)),
            (n.message.clone(), Value::Str(Arc::from(message))),
        ];
        r
    }
}

/// Where an out-of-band sample enters a zscore / ewma baseline: clamped to the band for the
/// first [`PROTECT`] consecutive out-of-band samples, as it is afterwards (a level shift).
fn protect(calib: &mut Calib, out_of_band: bool, x: f64, lo: f64, hi: f64) -> f64 {
    if !out_of_band {
        calib.out_run = 0;
        return x;
    }
    calib.out_run = calib.out_run.saturating_add(1);
    if calib.out_run <= PROTECT {
        x.clamp(lo, hi)
    } else {
        x
    }
}

/// What the detectors made of one sample.
#[derive(Debug, Default)]
struct Verdict {
    /// 1 when a rule alerted, else 0.
    rule: f64,
    /// Largest standardized deviation of the statistical detectors (the `max` combination:
    /// [`surprise`] is monotonic, so it is computed once, from the largest).
    max_dev: f64,
    /// Their standardized deviations (the `mean` combination), turned into scores only when
    /// needed: [`surprise`] costs a few transcendental functions.
    devs: SmallVec<[f64; 4]>,
    findings: SmallVec<[Finding; 1]>,
    /// Statistical findings, kept or not depending on the combined score; `score` holds the
    /// standardized deviation until [`Verdict::finish`].
    candidates: SmallVec<[Finding; 1]>,
}

/// How the calibrated scores of several statistical detectors on one series combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// The highest score; each detector alerts on its own score.
    Max,
    /// The mean score; a detector alerts only when the mean reaches `alert_score`, so one
    /// detector's outlier needs the others' support.
    #[default]
    Mean,
}

/// A statistical detector's raw score `raw` (above `threshold` is out of band): calibrates
/// it, records the score, and keeps a candidate finding when the raw score is out of band.
/// Returns whether the sample is out of band.
#[allow(clippy::too_many_arguments)]
fn judge(
    verdict: &mut Verdict,
    calib: &mut Calib,
    limits: &Limits,
    detector: &'static str,
    raw: f64,
    threshold: f64,
    band: (f64, f64),
    message: impl FnOnce() -> String,
) -> bool {
    let u = calib.deviation(raw);
    verdict.max_dev = verdict.max_dev.max(u);
    verdict.devs.push(u);
    if raw > threshold && (limits.combine == Combine::Mean || surprise(u) >= limits.alert_score) {
        verdict.candidates.push(Finding {
            detector,
            score: u,
            lo: Some(band.0),
            hi: Some(band.1),
            critical: raw >= 2.0 * threshold,
            message: message(),
        });
    }
    raw > threshold
}

impl Verdict {
    /// The sample's score in [0, 1] and its findings, once every detector has run. The score
    /// is computed only when `needed` (annotation) or when a detector is out of band.
    fn finish(mut self, limits: &Limits, needed: bool) -> (f64, SmallVec<[Finding; 1]>) {
        if self.devs.is_empty() || (!needed && self.candidates.is_empty()) {
            return (self.rule, self.findings);
        }
        let combined = match limits.combine {
            Combine::Max => surprise(self.max_dev),
            Combine::Mean => {
                self.devs.iter().map(|u| surprise(*u)).sum::<f64>() / self.devs.len() as f64
            }
        };
        if limits.combine == Combine::Max || combined >= limits.alert_score {
            for mut f in self.candidates {
                f.score = surprise(f.score);
                self.findings.push(f);
            }
        }
        (self.rule.max(combined), self.findings)
    }
}

/// Options shared by every detector of a stage.
#[derive(Debug, Clone, Copy)]
struct Limits {
    warmup: u64,
    alert_score: f64,
    combine: Combine,
    /// Records are annotated: every sample's score is needed.
    annotate: bool,
}

/// Runs every detector of `series` on sample (`t`, `x`) and updates their state. Returns
/// the sample's score in [0, 1] and the findings.
fn score(
    detectors: &[DetectorConfig],
    series: &mut Series,
    limits: &Limits,
    t: i64,
    x: f64,
    scratch: &mut Vec<f64>,
) -> (f64, SmallVec<[Finding; 1]>) {
    let mut v = Verdict::default();
    let warmup = limits.warmup;
    let warmed = series.samples >= warmup;
    let shift = series.shift;
    let xs = x - shift;
    series.samples += 1;
    // A stuck sensor repeats one value; letting the repeats into a baseline would shrink its
    // spread to zero and turn the sensor's recovery into a false spike. Repeats are scored but
    // do not update zscore, ewma, mad or rate_of_change.
    let repeat = x == series.last;
    series.last = x;
    for ((d, state), calib) in detectors
        .iter()
        .zip(series.states.iter_mut())
        .zip(series.calib.iter_mut())
    {
        match (d, state) {
            (
                DetectorConfig::Threshold {
                    min,
                    max,
                    hysteresis,
                },
                State::Threshold { alerting },
            ) => {
                let above = max.is_some_and(|m| x > m);
                let below = min.is_some_and(|m| x < m);
                if *alerting {
                    let back_inside = max.is_none_or(|m| x <= m - hysteresis)
                        && min.is_none_or(|m| x >= m + hysteresis);
                    if back_inside {
                        *alerting = false;
                    }
                } else if above || below {
                    *alerting = true;
                    let (limit, word) = match (above, *max, *min) {
                        (true, Some(m), _) => (m, "above max"),
                        (_, _, Some(m)) => (m, "below min"),
                        _ => (x, "outside"),
                    };
                    let excess = (x - limit).abs();
                    let score = excess / limit.abs().max(1.0);
                    v.rule = 1.0;
                    v.findings.push(Finding {
                        detector: "threshold",
                        score,
                        lo: *min,
                        hi: *max,
                        critical: score >= 0.1,
                        message: format!("{x} {word} {limit}"),
                    });
                }
            }
            (DetectorConfig::Zscore { threshold, .. }, State::Zscore(ring)) => {
                let mut insert = xs;
                if let Some((mean, std)) = ring.mean_std() {
                    if warmed && std > 0.0 {
                        let z = (xs - mean).abs() / std;
                        let (lo, hi) = (mean - threshold * std, mean + threshold * std);
                        let out = judge(
                            &mut v,
                            calib,
                            limits,
                            "zscore",
                            z,
                            *threshold,
                            (lo + shift, hi + shift),
                            || format!("z-score {z:.1} > {threshold}"),
                        );
                        insert = protect(calib, out, xs, lo, hi);
                    }
                }
                if !repeat {
                    ring.push(insert);
                }
            }
            (
                DetectorConfig::Ewma {
                    alpha,
                    alpha_variance,
                    k,
                },
                State::Ewma { mean, var, n, m2 },
            ) => {
                if *n < warmup.max(2) {
                    if !repeat {
                        *n += 1;
                        let delta = xs - *mean;
                        *mean += delta / *n as f64;
                        *m2 += delta * (xs - *mean);
                        if *n >= 2 {
                            *var = *m2 / (*n - 1) as f64;
                        }
                    }
                    continue;
                }
                let std = var.sqrt();
                let mut x_in = xs;
                if warmed && std > 0.0 {
                    let z = (xs - *mean).abs() / std;
                    let (lo, hi) = (*mean - k * std, *mean + k * std);
                    let out = judge(
                        &mut v,
                        calib,
                        limits,
                        "ewma",
                        z,
                        *k,
                        (lo + shift, hi + shift),
                        || format!("{z:.1} sigma from the EWMA > {k}"),
                    );
                    x_in = protect(calib, out, xs, lo, hi);
                }
                if repeat {
                    continue;
                }
                let diff = x_in - *mean;
                *mean += alpha * diff;
                let av = alpha_variance.unwrap_or(alpha / 4.0);
                *var = (1.0 - av) * (*var + av * diff * diff);
            }
            (DetectorConfig::Mad { threshold, .. }, State::Mad(ring)) => {
                if warmed && ring.values.len() >= 3 {
                    if let Some((median, scale)) = median_scale(&ring.values, scratch) {
                        let z = (xs - median).abs() / scale;
                        let half = threshold * scale;
                        judge(
                            &mut v,
                            calib,
                            limits,
                            "mad",
                            z,
                            *threshold,
                            (median - half + shift, median + half + shift),
                            || format!("modified z-score {z:.1} > {threshold}"),
                        );
                    }
                }
                if !repeat {
                    ring.push(xs);
                }
            }
            (
                DetectorConfig::RateOfChange {
                    k,
                    alpha,
                    max_per_second,
                },
                State::Rate { prev, moments },
            ) => match *prev {
                Some((pt, px)) if t > pt => {
                    let dt = (t - pt) as f64 / 1e9;
                    let rate = (x - px) / dt;
                    if let Some(max) = max_per_second {
                        if warmed && rate.abs() > *max {
                            v.rule = 1.0;
                            v.findings.push(Finding {
                                detector: "rate_of_change",
                                score: rate.abs() / max,
                                lo: Some(px - max * dt),
                                hi: Some(px + max * dt),
                                critical: rate.abs() >= 2.0 * max,
                                message: format!("changing {rate:.3}/s, limit {max}/s"),
                            });
                        }
                    } else {
                        let std = moments.var.sqrt();
                        let mut rate_in = rate;
                        if warmed && moments.n >= 2 && std > 0.0 {
                            let mean = moments.mean;
                            let z = (rate - mean).abs() / std;
                            let (lo, hi) = (mean - k * std, mean + k * std);
                            let out = judge(
                                &mut v,
                                calib,
                                limits,
                                "rate_of_change",
                                z,
                                *k,
                                (px + lo * dt, px + hi * dt),
                                || format!("change {rate:.3}/s is {z:.1} sigma from the usual"),
                            );
                            rate_in = protect(calib, out, rate, lo, hi);
                        }
                        if !repeat {
                            moments.push(rate_in, *alpha);
                        }
                    }
                    *prev = Some((t, x));
                }
                Some(_) => {} // out of order or same instant: no rate
                None => *prev = Some((t, x)),
            },
            (
                DetectorConfig::Seasonal {
                    period,
                    buckets,
                    alpha,
                    k,
                },
                State::Seasonal(moments),
            ) => {
                let period = i64::try_from(period.0.as_nanos()).unwrap_or(i64::MAX);
                let phase = t.rem_euclid(period) as f64 / period as f64;
                let b = ((phase * *buckets as f64) as usize).min(buckets - 1);
                let Some(m) = moments.get_mut(b) else {
                    continue;
                };
                let std = m.var.sqrt();
                let mut x_in = xs;
                if warmed && m.n >= SEASONAL_MIN && std > 0.0 {
                    let z = (xs - m.mean).abs() / std;
                    let (lo, hi) = (m.mean - k * std, m.mean + k * std);
                    let out = judge(
                        &mut v,
                        calib,
                        limits,
                        "seasonal",
                        z,
                        *k,
                        (lo + shift, hi + shift),
                        || format!("{z:.1} sigma from the usual at this time of the cycle > {k}"),
                    );
                    x_in = protect(calib, out, xs, lo, hi);
                }
                if !repeat {
                    m.push(x_in, *alpha);
                }
            }
            (
                DetectorConfig::Stuck {
                    samples,
                    duration,
                    tolerance,
                },
                State::Stuck {
                    value,
                    run,
                    since,
                    alerted,
                },
            ) => {
                if (x - *value).abs() <= *tolerance {
                    *run += 1;
                } else {
                    *value = x;
                    *run = 1;
                    *since = t;
                    *alerted = false;
                }
                let long_enough = duration.is_none_or(|d| {
                    t.saturating_sub(*since) >= i64::try_from(d.0.as_nanos()).unwrap_or(i64::MAX)
                });
                if !*alerted && *run >= *samples && long_enough {
                    *alerted = true;
                    v.rule = 1.0;
                    v.findings.push(Finding {
                        detector: "stuck",
                        score: *run as f64 / *samples as f64,
                        lo: None,
                        hi: None,
                        critical: false,
                        message: format!("value {x} unchanged for {run} samples"),
                    });
                }
            }
            _ => {}
        }
    }
    v.finish(limits, limits.annotate)
}

/// Median of `values` and the scale of the modified z-score: MAD / 0.6745, or, when more
/// than half the values are equal (MAD = 0, common on quantized data), 1.2533 × the mean
/// absolute deviation. `None` when every value is the same.
fn median_scale(values: &VecDeque<f64>, scratch: &mut Vec<f64>) -> Option<(f64, f64)> {
    let (median, mad) = median_mad(values, scratch)?;
    if mad > 0.0 {
        return Some((median, mad / 0.6745));
    }
    // `scratch` holds the absolute deviations (reordered).
    let mean_ad = scratch.iter().sum::<f64>() / scratch.len() as f64;
    (mean_ad > 0.0).then_some((median, 1.253_314 * mean_ad))
}

/// Median and median absolute deviation of `values` (no allocation after warm-up).
fn median_mad(values: &VecDeque<f64>, scratch: &mut Vec<f64>) -> Option<(f64, f64)> {
    scratch.clear();
    scratch.extend(values.iter().copied());
    let median = median_of(scratch)?;
    for v in scratch.iter_mut() {
        *v = (*v - median).abs();
    }
    let mad = median_of(scratch)?;
    Some((median, mad))
}

fn median_of(v: &mut [f64]) -> Option<f64> {
    let n = v.len();
    if n == 0 {
        return None;
    }
    let mid = n / 2;
    let (lower, m, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
    let m = *m;
    if n % 2 == 1 {
        return Some(m);
    }
    let below = lower.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((below + m) / 2.0)
}

impl Transform for Detector {
    fn process(&mut self, batch: Batch, out: &mut TransformOutput) {
        let wall = match self.missing {
            Some((_, Clock::Wall)) => now_ns(),
            _ => 0,
        };
        for r in batch.records {
            self.accept(r, wall, out);
        }
        // The event clock moves with the data, not with the wall clock: check heartbeats as
        // event time advances (every quarter timeout of it), so a file replayed faster than
        // the timer still reports the devices that fell silent.
        if let Some((timeout, Clock::Event)) = self.missing {
            if self.max_event != i64::MIN
                && self.max_event.saturating_sub(self.event_checked) >= (timeout / 4).max(1)
            {
                self.event_checked = self.max_event;
                self.check_heartbeats(0, out);
            }
        }
    }

    fn tick_interval(&self) -> Option<Duration> {
        let missing = self.missing.map(|(timeout, _)| {
            let quarter = Duration::from_nanos(u64::try_from(timeout / 4).unwrap_or(0));
            quarter.clamp(Duration::from_millis(10), Duration::from_secs(1))
        });
        let save = self.persist.as_ref().map(|p| p.interval);
        match (missing, save) {
            (Some(m), Some(s)) => Some(m.min(s)),
            (m, s) => m.or(s),
        }
    }

    fn on_tick(&mut self, now: i64, out: &mut TransformOutput) {
        self.check_heartbeats(now, out);
        self.save_if_due(now);
    }

    fn flush(&mut self, out: &mut TransformOutput) {
        if let Some((_, Clock::Event)) = self.missing {
            // The last event time decides, whatever the wall clock did.
            self.check_heartbeats(0, out);
        }
        let s = self.stats;
        tracing::info!(
            transform = %self.name,
            alerts = s.alerts,
            evicted_series = s.evicted_series,
            invalid = s.invalid,
            "anomaly stopped"
        );
    }

    fn save_state(&mut self) {
        self.save_now();
    }
}

impl Detector {
    /// The `missing` detector's timer: raises "offline" for groups silent past the timeout,
    /// and again those whose "offline" alert was lost.
    fn check_heartbeats(&mut self, now: i64, out: &mut TransformOutput) {
        let Some((timeout, clock)) = self.missing else {
            return;
        };
        let now = match clock {
            Clock::Wall => now,
            Clock::Event if self.max_event == i64::MIN => return,
            Clock::Event => self.max_event,
        };
        let mut offline: Vec<GroupKey> = Vec::new();
        let mut lost: Vec<(GroupKey, Record)> = Vec::new();
        for (key, hb) in self.heartbeats.iter_mut() {
            if !hb.offline && now.saturating_sub(hb.last_seen) > timeout {
                hb.offline = true;
                offline.push(key.clone());
            } else if let Some((alert, watch)) = &hb.offline_alert {
                if watch.status() == Some(BatchStatus::Errored) {
                    lost.push((key.clone(), alert.clone()));
                }
            }
        }
        offline.sort();
        let none = Finalizers::new();
        for key in offline {
            self.stats.alerts += 1;
            let alert = self.missing_alert(&key, now, true);
            let sent = emit_alert(alert, &none, out);
            if let Some(hb) = self.heartbeats.peek_mut(&key) {
                hb.offline_alert = Some(sent);
            }
        }
        lost.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, alert) in lost {
            self.stats.alerts += 1;
            let sent = emit_alert(alert, &none, out);
            if let Some(hb) = self.heartbeats.peek_mut(&key) {
                hb.offline_alert = Some(sent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{cx, f64_field, rec, str_field, take};

    fn detector(detectors: Vec<DetectorConfig>, f: impl FnOnce(&mut AnomalyConfig)) -> Detector {
        let mut c = AnomalyConfig {
            fields: vec!["temp".into()],
            group_by: None,
            detectors,
            warmup: 5,
            alert_score: default_alert_score(),
            combine: Combine::default(),
            max_series: 100,
            annotate: false,
            state_interval: default_state_interval(),
        };
        f(&mut c);
        Detector::new(&c, &cx()).expect("valid config")
    }

    fn temp(secs: f64, dev: &str, t: f64) -> Record {
        rec(secs, dev, &[("temp", Value::F64(t))])
    }

    /// Feeds `values` at 1 s intervals to device d1; returns (index, alert) pairs.
    fn feed(d: &mut Detector, values: &[f64]) -> Vec<(usize, Record)> {
        let mut alerts = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let mut out = TransformOutput::default();
            d.process(Batch::new(vec![temp(i as f64, "d1", *v)]), &mut out);
            assert_eq!(take(&mut out, "default").len(), 1, "records pass through");
            alerts.extend(take(&mut out, ANOMALIES).into_iter().map(|a| (i, a)));
        }
        alerts
    }

    /// A deterministic wiggle around 20 (±0.3), no randomness needed.
    fn noisy(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| 20.0 + 0.3 * ((i as f64) * 1.7).sin())
            .collect()
    }

    #[test]
    fn threshold_with_hysteresis_alerts_once_per_excursion() {
        let mut d = detector(
            vec![DetectorConfig::Threshold {
                min: None,
                max: Some(30.0),
                hysteresis: 2.0,
            }],
            |_| {},
        );
        // Flapping around the limit: one alert. Back below 28 re-arms; the next excursion alerts.
        let alerts = feed(&mut d, &[29.0, 31.0, 29.5, 30.5, 29.9, 31.0, 27.0, 31.0]);
        let at: Vec<usize> = alerts.iter().map(|(i, _)| *i).collect();
        assert_eq!(at, vec![1, 7]);
        let a = &alerts[0].1;
        assert_eq!(str_field(a, "detector"), "threshold");
        assert_eq!(str_field(a, "series"), "d1/temp");
        assert_eq!(f64_field(a, "value"), 31.0);
        assert_eq!(f64_field(a, "expected_max"), 30.0);
        assert_eq!(a.field("expected_min"), Some(&Value::Null));
        assert_eq!(a.tag("device_id"), Some("d1"));
        assert!(f64_field(a, "score") > 0.0);
    }

    #[test]
    fn threshold_min_side() {
        let mut d = detector(
            vec![DetectorConfig::Threshold {
                min: Some(0.0),
                max: None,
                hysteresis: 0.0,
            }],
            |_| {},
        );
        let alerts = feed(&mut d, &[1.0, -1.0, -2.0, 1.0]);
        assert_eq!(alerts.len(), 1);
        assert!(str_field(&alerts[0].1, "message").contains("below min"));
    }

    fn spike_series() -> Vec<f64> {
        let mut v = noisy(80);
        v[50] += 10.0;
        v[53] -= 9.0; // a second spike soon after: the first must not mask it
        v
    }

    #[test]
    fn zscore_finds_spikes_only() {
        let mut d = detector(
            vec![DetectorConfig::Zscore {
                window: 30,
                threshold: 4.0,
            }],
            |_| {},
        );
        let alerts = feed(&mut d, &spike_series());
        let at: Vec<usize> = alerts.iter().map(|(i, _)| *i).collect();
        assert_eq!(at, vec![50, 53]);
        let a = &alerts[0].1;
        assert!(f64_field(a, "score") > 0.8, "a large spike scores near 1");
        assert_eq!(str_field(a, "severity"), "critical");
        assert!(f64_field(a, "expected_min") < 20.0 && f64_field(a, "expected_max") > 20.0);
    }

    #[test]
    fn ewma_finds_spikes_only() {
        let mut d = detector(
            vec![DetectorConfig::Ewma {
                alpha: 0.1,
                alpha_variance: None,
                k: 4.0,
            }],
            |c| c.warmup = 20,
        );
        let at: Vec<usize> = feed(&mut d, &spike_series())
            .iter()
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(at, vec![50, 53]);
    }

    #[test]
    fn mad_finds_spikes_only() {
        let mut d = detector(
            vec![DetectorConfig::Mad {
                window: 30,
                threshold: 5.0,
            }],
            |_| {},
        );
        let at: Vec<usize> = feed(&mut d, &spike_series())
            .iter()
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(at, vec![50, 53]);
    }

    /// A level shift is learned, not fought: once it has lasted longer than the protection
    /// window the new level enters the baseline as it is, so the alerts stop after a few
    /// samples (clamped to the alert boundary, the old baselines kept alerting for dozens).
    #[test]
    fn a_level_shift_is_learned_after_the_protection_window() {
        let mut v = noisy(200);
        for x in &mut v[100..] {
            *x += 10.0;
        }
        for d in [
            DetectorConfig::Zscore {
                window: 30,
                threshold: 4.0,
            },
            DetectorConfig::Ewma {
                alpha: 0.1,
                alpha_variance: None,
                k: 4.0,
            },
        ] {
            let mut det = detector(vec![d.clone()], |c| c.warmup = 20);
            let at: Vec<usize> = feed(&mut det, &v).iter().map(|(i, _)| *i).collect();
            assert!(
                at.first() == Some(&100),
                "{d:?}: the shift is flagged: {at:?}"
            );
            assert!(
                at.len() <= 2 * PROTECT as usize && at.iter().all(|i| *i < 110),
                "{d:?}: alerts stop soon after the shift: {at:?}"
            );
        }
    }

    /// With `annotate`, every record after the warm-up carries a continuous score in [0, 1]
    /// that does not depend on the alert threshold: it ranks a mild deviation above the calm
    /// samples without an alert, and a spike near 1.
    #[test]
    fn annotate_gives_a_continuous_score_on_every_record() {
        let mut d = detector(
            vec![DetectorConfig::Ewma {
                alpha: 0.1,
                alpha_variance: None,
                k: 4.0,
            }],
            |c| {
                c.annotate = true;
                c.warmup = 20;
            },
        );
        let mut v = noisy(120);
        v[100] += 0.6; // ≈ 3 sigma: unusual, below the alert threshold
        v[110] += 10.0;
        let mut scores = Vec::new();
        for (i, x) in v.iter().enumerate() {
            let mut out = TransformOutput::default();
            d.process(Batch::new(vec![temp(i as f64, "d1", *x)]), &mut out);
            let r = take(&mut out, "default").remove(0);
            let s = f64_field(&r, "anomaly_score");
            assert!((0.0..=1.0).contains(&s), "score {s} at {i}");
            scores.push((s, r.field("anomaly") == Some(&Value::Bool(true))));
        }
        let calm = scores[60..100].iter().map(|(s, _)| *s).fold(0.0, f64::max);
        assert!(!scores[100].1, "no alert for the mild deviation");
        assert!(
            scores[100].0 > calm,
            "mild deviation {} ranks above the calm maximum {calm}",
            scores[100].0
        );
        assert!(scores[110].1 && scores[110].0 > 0.8, "{:?}", scores[110]);
        assert!(
            scores[60..100].iter().any(|(s, _)| *s > 0.0),
            "not just 0 / 1"
        );
    }

    /// Scores are calibrated per series: on a sensor whose huge spikes are routine a spike
    /// scores low and stops alerting, while a modest deviation on a calm sensor scores high
    /// and alerts: one `alert_score` fits both (raw z-scores would rank them the other way).
    #[test]
    fn calibrated_scores_rank_a_calm_series_deviation_above_a_routine_spike() {
        let mut d = detector(
            vec![DetectorConfig::Ewma {
                alpha: 0.1,
                alpha_variance: None,
                k: 4.0,
            }],
            |c| {
                c.annotate = true;
                c.warmup = 20;
            },
        );
        let calm = noisy(2000);
        let mut spiky = noisy(2000);
        for (i, x) in spiky.iter_mut().enumerate() {
            if i % 20 == 10 {
                *x += 50.0;
            }
        }
        let mut calm_dev = calm.clone();
        calm_dev[1995] += 3.0;
        let mut score_of = |dev: &str, i: usize, x: f64| {
            let mut out = TransformOutput::default();
            d.process(Batch::new(vec![temp(i as f64, dev, x)]), &mut out);
            let alerts = take(&mut out, ANOMALIES).len();
            (
                f64_field(&take(&mut out, "default")[0], "anomaly_score"),
                alerts,
            )
        };
        let mut late_spike_alerts = 0;
        let mut spike_score: f64 = 0.0;
        let mut calm_score = (0.0, 0);
        for i in 0..2000 {
            let (s, alerts) = score_of("spiky", i, spiky[i]);
            if i >= 1500 && i % 20 == 10 {
                late_spike_alerts += alerts;
                spike_score = spike_score.max(s);
            }
            let r = score_of("calm", i, calm_dev[i]);
            if i == 1995 {
                calm_score = r;
            }
        }
        assert_eq!(late_spike_alerts, 0, "routine spikes stop alerting");
        assert_eq!(calm_score.1, 1, "the calm sensor's deviation alerts");
        assert!(
            calm_score.0 > spike_score,
            "calm deviation {} > routine spike {spike_score}",
            calm_score.0
        );
    }

    /// A daily peak at noon is routine for the seasonal baseline (and not for a plain
    /// z-score), while the same value at 3 am is an anomaly.
    #[test]
    fn seasonal_learns_a_daily_peak_and_flags_it_at_the_wrong_hour() {
        // 12 days of 5-minute samples: about 20 at night, 50 from 12:00 to 13:00.
        let mut values = Vec::new();
        for i in 0..12 * 288 {
            let minute = (i % 288) * 5;
            let wiggle = 0.5 * ((i as f64) * 1.7).sin();
            let peak = if (720..780).contains(&minute) {
                30.0
            } else {
                0.0
            };
            values.push(20.0 + wiggle + peak);
        }
        let odd = 11 * 288 + 36; // day 11, 03:00
        values[odd] += 30.0;
        let run = |d: DetectorConfig| -> Vec<usize> {
            let mut det = detector(vec![d], |c| c.warmup = 30);
            let mut at = Vec::new();
            for (i, x) in values.iter().enumerate() {
                let mut out = TransformOutput::default();
                let t = i as f64 * 300.0;
                det.process(Batch::new(vec![temp(t, "d1", *x)]), &mut out);
                if !take(&mut out, ANOMALIES).is_empty() {
                    at.push(i);
                }
            }
            at
        };
        let seasonal = run(DetectorConfig::Seasonal {
            period: default_period(),
            buckets: 24,
            alpha: 0.1,
            k: 4.0,
        });
        let after_learning: Vec<usize> =
            seasonal.iter().copied().filter(|i| *i >= 4 * 288).collect();
        assert_eq!(after_learning, vec![odd], "seasonal: {seasonal:?}");
        let plain = run(DetectorConfig::Zscore {
            window: 60,
            threshold: 4.0,
        });
        assert!(
            plain
                .iter()
                .filter(|i| **i >= 4 * 288 && **i != odd)
                .count()
                >= 7,
            "a plain z-score alerts at the daily peaks: {plain:?}"
        );
    }

    #[test]
    fn median_and_mad_of_even_and_odd_windows() {
        let mut scratch = Vec::new();
        let odd: VecDeque<f64> = [1.0, 9.0, 2.0, 3.0, 4.0].into_iter().collect();
        assert_eq!(median_mad(&odd, &mut scratch), Some((3.0, 1.0)));
        let even: VecDeque<f64> = [4.0, 1.0, 3.0, 2.0].into_iter().collect();
        assert_eq!(median_mad(&even, &mut scratch), Some((2.5, 1.0)));
        assert_eq!(median_mad(&VecDeque::new(), &mut scratch), None);
    }

    #[test]
    fn warmup_keeps_detectors_quiet() {
        let mut d = detector(
            vec![DetectorConfig::Zscore {
                window: 30,
                threshold: 3.0,
            }],
            |c| c.warmup = 10,
        );
        let mut v = noisy(20);
        v[5] = 100.0; // inside warm-up: no alert
        let at: Vec<usize> = feed(&mut d, &v).iter().map(|(i, _)| *i).collect();
        assert!(!at.contains(&5), "{at:?}");
    }

    #[test]
    fn rate_of_change() {
        let mut d = detector(
            vec![DetectorConfig::RateOfChange {
                k: 4.0,
                alpha: 0.02,
                max_per_second: Some(1.0),
            }],
            |c| c.warmup = 0,
        );
        let alerts = feed(&mut d, &[10.0, 10.5, 11.0, 14.0, 14.5]);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].0, 3);
        assert!((f64_field(&alerts[0].1, "score") - 3.0).abs() < 1e-9);
        assert_eq!(f64_field(&alerts[0].1, "expected_max"), 12.0);
    }

    #[test]
    fn stuck_alerts_once_per_stuck_period() {
        let mut d = detector(
            vec![DetectorConfig::Stuck {
                samples: 4,
                duration: None,
                tolerance: 0.0,
            }],
            |_| {},
        );
        let v = [1.0, 2.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0, 6.0];
        let at: Vec<usize> = feed(&mut d, &v).iter().map(|(i, _)| *i).collect();
        assert_eq!(at, vec![5, 11]);
    }

    #[test]
    fn stuck_with_duration_needs_both() {
        let mut d = detector(
            vec![DetectorConfig::Stuck {
                samples: 2,
                duration: Some(HumanDuration(Duration::from_secs(5))),
                tolerance: 0.01,
            }],
            |_| {},
        );
        let v = [3.0, 3.001, 3.0, 3.0, 3.0, 3.0, 3.0];
        let at: Vec<usize> = feed(&mut d, &v).iter().map(|(i, _)| *i).collect();
        assert_eq!(at, vec![5]);
    }

    #[test]
    fn missing_heartbeat_offline_once_then_back_online() {
        let mut d = detector(
            vec![DetectorConfig::Missing {
                timeout: HumanDuration(Duration::from_secs(10)),
                clock: Clock::Event,
            }],
            |_| {},
        );
        let mut out = TransformOutput::default();
        for s in 0..20 {
            // d1 reports throughout; d2 stops after 5 s.
            let mut batch = vec![temp(f64::from(s), "d1", 1.0)];
            if s <= 5 {
                batch.push(temp(f64::from(s), "d2", 1.0));
            }
            d.process(Batch::new(batch), &mut out);
            d.on_tick(0, &mut out);
        }
        let alerts = take(&mut out, ANOMALIES);
        assert_eq!(alerts.len(), 1, "one offline alert, not one per tick");
        assert_eq!(alerts[0].tag("device_id"), Some("d2"));
        assert_eq!(str_field(&alerts[0], "detector"), "missing");
        assert_eq!(str_field(&alerts[0], "severity"), "critical");
        assert_eq!(
            alerts[0].time, 16_000_000_000,
            "first tick with > 10 s of silence"
        );
        d.process(Batch::new(vec![temp(21.0, "d2", 1.0)]), &mut out);
        d.on_tick(0, &mut out);
        let alerts = take(&mut out, ANOMALIES);
        assert_eq!(alerts.len(), 1);
        assert!(str_field(&alerts[0], "message").contains("back online"));
    }

    #[test]
    fn event_clock_missing_reports_without_a_timer_and_at_flush() {
        let missing = || {
            vec![DetectorConfig::Missing {
                timeout: HumanDuration(Duration::from_secs(10)),
                clock: Clock::Event,
            }]
        };
        // A replay faster than the timer: no tick at all, d2 falls silent after 5 s.
        let mut d = detector(missing(), |_| {});
        let mut out = TransformOutput::default();
        for s in 0..20 {
            let mut batch = vec![temp(f64::from(s), "d1", 1.0)];
            if s <= 5 {
                batch.push(temp(f64::from(s), "d2", 1.0));
            }
            d.process(Batch::new(batch), &mut out);
        }
        let alerts = take(&mut out, ANOMALIES);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].tag("device_id"), Some("d2"));

        // Silence that crosses the timeout only with the last records is reported at flush.
        let mut d = detector(missing(), |_| {});
        let mut out = TransformOutput::default();
        d.process(
            Batch::new(vec![temp(0.0, "d1", 1.0), temp(0.0, "d2", 1.0)]),
            &mut out,
        );
        d.process(Batch::new(vec![temp(9.0, "d1", 1.0)]), &mut out);
        d.process(Batch::new(vec![temp(10.5, "d1", 1.0)]), &mut out);
        assert!(take(&mut out, ANOMALIES).is_empty());
        d.flush(&mut out);
        let alerts = take(&mut out, ANOMALIES);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].tag("device_id"), Some("d2"));
    }

    /// Feeds d1 a normal reading and then `spike` (an acknowledgeable batch of one) through a
    /// threshold detector; returns the spike's passthrough copy, its alert and the status.
    fn alert_of_acked_reading(
        d: &mut Detector,
        spike: f64,
    ) -> (Record, Vec<Record>, sluice_core::ack::StatusReceiver) {
        let mut out = TransformOutput::default();
        d.process(Batch::new(vec![temp(0.0, "d1", 20.0)]), &mut out);
        take(&mut out, "default");
        let (f, status) = sluice_core::ack::batch();
        let mut r = temp(1.0, "d1", spike);
        r.finalizers.push(f);
        d.process(Batch::new(vec![r]), &mut out);
        let mut passed = take(&mut out, "default");
        assert_eq!(passed.len(), 1);
        (passed.remove(0), take(&mut out, ANOMALIES), status)
    }

    fn threshold_30() -> Detector {
        detector(
            vec![DetectorConfig::Threshold {
                min: None,
                max: Some(30.0),
                hysteresis: 0.0,
            }],
            |_| {},
        )
    }

    #[test]
    fn an_alert_keeps_its_reading_pending_until_the_alert_is_finalized() {
        use sluice_core::ack::BatchStatus;
        let (reading, mut alerts, mut status) = alert_of_acked_reading(&mut threshold_30(), 35.0);
        assert_eq!(alerts.len(), 1);
        reading.finalizers.finish(BatchStatus::Delivered);
        assert_eq!(
            status.try_status(),
            None,
            "the reading is not acknowledged while its alert is on its way"
        );
        alerts.remove(0).finalizers.finish(BatchStatus::Delivered);
        assert_eq!(status.try_status(), Some(BatchStatus::Delivered));

        // An alert lost on its way (dropped without a status) makes the reading's batch
        // Errored: the source redelivers the reading, and the alert is raised again.
        let (reading, alerts, mut status) = alert_of_acked_reading(&mut threshold_30(), 35.0);
        assert_eq!(alerts.len(), 1);
        reading.finalizers.finish(BatchStatus::Delivered);
        drop(alerts);
        assert_eq!(status.try_status(), Some(BatchStatus::Errored));

        // No alert: the reading alone decides.
        let (reading, alerts, mut status) = alert_of_acked_reading(&mut threshold_30(), 25.0);
        assert!(alerts.is_empty());
        reading.finalizers.finish(BatchStatus::Delivered);
        assert_eq!(status.try_status(), Some(BatchStatus::Delivered));
    }

    /// A lost alert makes its reading's batch Errored; the source redelivers the reading. The
    /// detector has already moved on (a threshold excursion alerts once), so the redelivered
    /// reading must raise the lost alert again rather than be scored anew.
    #[test]
    fn a_redelivered_reading_raises_its_lost_alert_again() {
        use sluice_core::ack::{self, BatchStatus};
        let mut d = threshold_30();
        let (reading, alerts, mut status) = alert_of_acked_reading(&mut d, 35.0);
        assert_eq!(alerts.len(), 1);
        reading.finalizers.finish(BatchStatus::Delivered);
        drop(alerts);
        assert_eq!(status.try_status(), Some(BatchStatus::Errored));

        // The redelivery: the same reading in a new source batch.
        let mut out = TransformOutput::default();
        let (f, mut again) = ack::batch();
        let mut r = temp(1.0, "d1", 35.0);
        r.finalizers.push(f);
        d.process(Batch::new(vec![r]), &mut out);
        let passed = take(&mut out, "default");
        let mut alerts = take(&mut out, ANOMALIES);
        assert_eq!(alerts.len(), 1, "the lost alert is raised again");
        assert!(str_field(&alerts[0], "message").contains("above max"));
        for p in passed {
            p.finalizers.finish(BatchStatus::Delivered);
        }
        assert_eq!(
            again.try_status(),
            None,
            "held until the alert is delivered"
        );
        alerts.remove(0).finalizers.finish(BatchStatus::Delivered);
        assert_eq!(again.try_status(), Some(BatchStatus::Delivered));

        // Redelivered once more (say its other sink failed): the alert was delivered, so no
        // duplicate.
        let (f, mut third) = ack::batch();
        let mut r = temp(1.0, "d1", 35.0);
        r.finalizers.push(f);
        d.process(Batch::new(vec![r]), &mut out);
        assert!(take(&mut out, ANOMALIES).is_empty());
        for p in take(&mut out, "default") {
            p.finalizers.finish(BatchStatus::Delivered);
        }
        assert_eq!(third.try_status(), Some(BatchStatus::Delivered));
    }

    /// A redelivery that arrives while the first alert is still on its way takes that alert's
    /// outcome instead of raising a duplicate.
    #[test]
    fn a_redelivery_while_the_alert_is_pending_follows_it() {
        use sluice_core::ack::{self, BatchStatus};
        let mut d = threshold_30();
        let (reading, mut alerts, _status) = alert_of_acked_reading(&mut d, 35.0);
        reading.finalizers.finish(BatchStatus::Delivered);
        let mut out = TransformOutput::default();
        let (f, mut dup) = ack::batch();
        let mut r = temp(1.0, "d1", 35.0);
        r.finalizers.push(f);
        d.process(Batch::new(vec![r]), &mut out);
        assert!(take(&mut out, ANOMALIES).is_empty(), "no duplicate alert");
        for p in take(&mut out, "default") {
            p.finalizers.finish(BatchStatus::Delivered);
        }
        assert_eq!(dup.try_status(), None);
        alerts.remove(0).finalizers.finish(BatchStatus::Errored);
        assert_eq!(dup.try_status(), Some(BatchStatus::Errored));
    }

    /// The timer's "offline" alert has no reading to hold back; a lost one is raised again
    /// by the timer while the device stays silent.
    #[test]
    fn a_lost_offline_alert_is_raised_again_by_the_timer() {
        use sluice_core::ack::BatchStatus;
        let mut d = detector(
            vec![DetectorConfig::Missing {
                timeout: HumanDuration(Duration::from_secs(10)),
                clock: Clock::Event,
            }],
            |_| {},
        );
        let mut out = TransformOutput::default();
        d.process(
            Batch::new(vec![temp(0.0, "d1", 1.0), temp(0.0, "d2", 1.0)]),
            &mut out,
        );
        d.process(Batch::new(vec![temp(20.0, "d1", 1.0)]), &mut out);
        d.on_tick(0, &mut out);
        let offline = take(&mut out, ANOMALIES);
        assert_eq!(offline.len(), 1);
        drop(offline); // lost on its way
        d.on_tick(0, &mut out);
        let mut again = take(&mut out, ANOMALIES);
        assert_eq!(again.len(), 1, "raised again");
        assert_eq!(again[0].tag("device_id"), Some("d2"));
        assert!(str_field(&again[0], "message").contains("offline"));
        again.remove(0).finalizers.finish(BatchStatus::Delivered);
        d.on_tick(0, &mut out);
        assert!(
            take(&mut out, ANOMALIES).is_empty(),
            "delivered: not repeated"
        );
    }

    #[test]
    fn back_online_alert_carries_the_readings_finalizers_the_offline_one_its_own() {
        use sluice_core::ack::BatchStatus;
        let mut d = detector(
            vec![DetectorConfig::Missing {
                timeout: HumanDuration(Duration::from_secs(10)),
                clock: Clock::Event,
            }],
            |_| {},
        );
        let mut out = TransformOutput::default();
        d.process(
            Batch::new(vec![temp(0.0, "d1", 1.0), temp(0.0, "d2", 1.0)]),
            &mut out,
        );
        d.process(Batch::new(vec![temp(20.0, "d1", 1.0)]), &mut out);
        d.on_tick(0, &mut out);
        let offline = take(&mut out, ANOMALIES);
        assert_eq!(offline.len(), 1);
        // Timer-driven: no reading to hold back (only the alert's own watched finalizer).
        assert_eq!(offline[0].finalizers.len(), 1);
        take(&mut out, "default");
        let (f, mut status) = sluice_core::ack::batch();
        let mut r = temp(21.0, "d2", 1.0);
        r.finalizers.push(f);
        d.process(Batch::new(vec![r]), &mut out);
        let back = take(&mut out, ANOMALIES);
        assert_eq!(back.len(), 1);
        assert!(str_field(&back[0], "message").contains("back online"));
        for r in take(&mut out, "default") {
            r.finalizers.finish(BatchStatus::Delivered);
        }
        assert_eq!(status.try_status(), None);
        drop(back);
        assert_eq!(status.try_status(), Some(BatchStatus::Errored));
    }

    #[test]
    fn missing_with_the_wall_clock_fires_from_the_timer() {
        let mut d = detector(
            vec![DetectorConfig::Missing {
                timeout: HumanDuration(Duration::from_secs(10)),
                clock: Clock::Wall,
            }],
            |_| {},
        );
        let mut out = TransformOutput::default();
        d.process(Batch::new(vec![temp(0.0, "d1", 1.0)]), &mut out);
        d.on_tick(now_ns(), &mut out);
        assert!(take(&mut out, ANOMALIES).is_empty());
        d.on_tick(now_ns() + 11_000_000_000, &mut out);
        assert_eq!(take(&mut out, ANOMALIES).len(), 1);
        assert!(d.tick_interval().is_some());
    }

    #[test]
    fn bad_input_goes_to_dead_letter_and_state_stays_bounded() {
        let mut d = detector(
            vec![DetectorConfig::Zscore {
                window: 10,
                threshold: 4.0,
            }],
            |c| {
                c.max_series = 2;
                c.group_by = Some(vec!["device_id".into()]);
            },
        );
        let mut no_tag = temp(0.0, "x", 1.0);
        no_tag.remove_tag("device_id");
        let mut out = TransformOutput::default();
        d.process(
            Batch::new(vec![
                temp(0.0, "a", f64::NAN),
                temp(0.0, "a", f64::NEG_INFINITY),
                rec(0.0, "a", &[("temp", Value::from("x"))]),
                rec(0.0, "a", &[("humidity", Value::F64(1.0))]),
                no_tag,
                temp(0.0, "a", 1.0),
                temp(0.0, "b", 1.0),
                temp(0.0, "c", 1.0),
            ]),
            &mut out,
        );
        let dead = take(&mut out, "dead_letter");
        assert_eq!(dead.len(), 5);
        assert!(dead.iter().all(|r| r
            .meta
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("anomaly `t`"))));
        assert_eq!(take(&mut out, "default").len(), 3);
        assert_eq!(d.series_len(), 2);
        assert_eq!(d.stats().evicted_series, 1);
        assert_eq!(d.stats().invalid, 5);
    }

    /// With `group_by` left at its default, a record without `device_id` is scored in its
    /// topic's group (one series per topic and field) instead of being dead-lettered; an
    /// explicit `group_by` still dead-letters it.
    #[test]
    fn default_group_by_falls_back_to_the_topic() {
        let untagged = |secs: f64, topic: &str, t: f64| {
            let mut r = temp(secs, "x", t);
            r.remove_tag("device_id");
            r.meta.origin = sluice_core::record::Origin::Mqtt {
                topic: Arc::from(topic),
            };
            r
        };
        let mut d = detector(
            vec![DetectorConfig::Threshold {
                min: None,
                max: Some(30.0),
                hysteresis: 0.0,
            }],
            |_| {},
        );
        let mut out = TransformOutput::default();
        d.process(
            Batch::new(vec![
                untagged(0.0, "plant/a", 20.0),
                untagged(1.0, "plant/b", 20.0),
                untagged(2.0, "plant/a", 35.0),
                temp(3.0, "d1", 20.0),
            ]),
            &mut out,
        );
        assert!(take(&mut out, "dead_letter").is_empty());
        assert_eq!(take(&mut out, "default").len(), 4);
        assert_eq!(d.series_len(), 3, "plant/a, plant/b and d1");
        let alerts = take(&mut out, ANOMALIES);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].tag("device_id"), Some("plant/a"));

        let mut strict = detector(
            vec![DetectorConfig::Threshold {
                min: None,
                max: Some(30.0),
                hysteresis: 0.0,
            }],
            |c| c.group_by = Some(vec!["device_id".into()]),
        );
        strict.process(Batch::new(vec![untagged(0.0, "plant/a", 20.0)]), &mut out);
        assert_eq!(take(&mut out, "dead_letter").len(), 1);
    }

    #[test]
    fn annotation_marks_passing_records() {
        let mut d = detector(
            vec![DetectorConfig::Threshold {
                min: None,
                max: Some(10.0),
                hysteresis: 0.0,
            }],
            |c| c.annotate = true,
        );
        let mut out = TransformOutput::default();
        d.process(
            Batch::new(vec![temp(0.0, "a", 5.0), temp(1.0, "a", 50.0)]),
            &mut out,
        );
        let passed = take(&mut out, "default");
        assert_eq!(passed[0].field("anomaly"), Some(&Value::Bool(false)));
        assert_eq!(passed[1].field("anomaly"), Some(&Value::Bool(true)));
        assert!(f64_field(&passed[1], "anomaly_score") > 0.0);
    }

    #[test]
    fn ring_statistics_stay_exact() {
        let mut r = Ring::new(4);
        for v in [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] {
            r.push(v);
        }
        let (mean, std) = r.mean_std().expect("4 values");
        assert!((mean - 4.5).abs() < 1e-12);
        assert!((std - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!(Ring::new(4).mean_std().is_none());
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let bad = |d: DetectorConfig| {
            let c = AnomalyConfig {
                fields: vec!["temp".into()],
                group_by: Some(vec![]),
                detectors: vec![d],
                warmup: 0,
                alert_score: 0.5,
                combine: Combine::Max,
                max_series: 10,
                annotate: false,
                state_interval: default_state_interval(),
            };
            Detector::new(&c, &cx()).is_err()
        };
        assert!(bad(DetectorConfig::Threshold {
            min: None,
            max: None,
            hysteresis: 0.0
        }));
        assert!(bad(DetectorConfig::Ewma {
            alpha: 0.0,
            alpha_variance: None,
            k: 3.0,
        }));
        assert!(bad(DetectorConfig::Zscore {
            window: 1,
            threshold: 3.0
        }));
        assert!(bad(DetectorConfig::RateOfChange {
            k: 4.0,
            alpha: 0.02,
            max_per_second: Some(f64::NAN)
        }));
        assert!(bad(DetectorConfig::RateOfChange {
            k: 4.0,
            alpha: 0.0,
            max_per_second: None
        }));
        let parsed: AnomalyConfig = toml::from_str(
            r#"
            fields = ["temp"]
            detectors = [{ type = "zscore" }, { type = "missing", timeout = "30s" }]
            "#,
        )
        .expect("parses");
        assert_eq!(
            parsed.detectors[0],
            DetectorConfig::Zscore {
                window: 60,
                threshold: 4.0
            }
        );
        assert!(
            toml::from_str::<AnomalyConfig>("detectors = [{ type = \"zscore\", windw = 3 }]")
                .is_err()
        );
    }
}
