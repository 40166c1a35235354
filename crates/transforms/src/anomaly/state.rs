//! Snapshots of the `anomaly` stage's long-lived state, so that a restart neither re-warms every
//! series nor forgets a device that was already silent.
//!
//! One file, `<state_dir>/anomaly.json`, written every `state_interval` from the timer (on a
//! background thread, at most one write at a time) and at every orderly stop: the per-series
//! detector state (zscore / mad windows, ewma moments, stuck runs, threshold excursions, the last
//! rate sample), the `missing` detector's last-seen table with each group's "offline already
//! reported" flag, and the alerts not yet known to be delivered (so a lost one comes back when
//! its reading is redelivered, or from the timer for "offline"). Writes are atomic: a temporary
//! file is written and fsynced, then renamed over the snapshot and the directory fsynced.
//!
//! The format is JSON with a `version` and the options the state was computed with (`group_by`
//! and `detectors`): a snapshot of another version or other options, or one that cannot be read,
//! is ignored with a WARN naming the file, and the stage starts empty. It holds at most what the
//! stage holds in memory (`max_series` series and groups).

use std::fs::{self, File};
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_core::ack::{self, BatchStatus, Watch};
use sluice_core::record::{intern, Record, Value};
use sluice_core::topology::now_ns;
use smallvec::SmallVec;

use super::{
    AnomalyConfig, Calib, Clock, Detector, DetectorConfig, Heartbeat, Moments, Raised, Ring,
    Series, State,
};
use crate::group::GroupKey;

/// The snapshot's file name inside the component's state directory.
pub const FILE: &str = "anomaly.json";
/// The format written; a file of another version is ignored.
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    /// `group_by` and `detectors` the state was computed with.
    config: serde_json::Value,
    /// Wall clock at the snapshot (ns): the `wall` clock's last-seen times are shifted by the
    /// downtime, which is not the devices' silence.
    saved_at: i64,
    /// Newest event time seen (the `event` clock's "now").
    max_event: i64,
    /// Most recently seen first.
    series: Vec<SeriesSnap>,
    /// Most recently seen first.
    heartbeats: Vec<HeartbeatSnap>,
    /// Readings whose alerts were not all known to be delivered.
    raised: Vec<RaisedSnap>,
}

/// Just the version, to name it when the rest does not parse.
#[derive(Deserialize)]
struct Header {
    version: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct SeriesSnap {
    group: Vec<String>,
    field: String,
    samples: u64,
    last: f64,
    shift: f64,
    states: Vec<StateSnap>,
    /// Per detector: the calibration of its raw scores (absent in older snapshots: the
    /// calibration then re-warms).
    #[serde(default)]
    calib: Vec<Calib>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StateSnap {
    Threshold {
        alerting: bool,
    },
    Zscore {
        values: Vec<f64>,
    },
    Ewma {
        mean: f64,
        var: f64,
        n: u64,
        m2: f64,
    },
    Mad {
        values: Vec<f64>,
    },
    RateOfChange {
        prev: Option<(i64, f64)>,
        #[serde(default)]
        moments: Moments,
    },
    Seasonal {
        buckets: Vec<Moments>,
    },
    Stuck {
        value: f64,
        run: usize,
        since: i64,
        alerted: bool,
    },
    Missing,
}

#[derive(Debug, Serialize, Deserialize)]
struct HeartbeatSnap {
    group: Vec<String>,
    last_seen: i64,
    /// The silence was reported ("offline" raised).
    offline: bool,
    /// Time of that "offline" alert when it was not known to be delivered: raised again.
    #[serde(default)]
    unconfirmed_alert: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RaisedSnap {
    group: Vec<String>,
    time: i64,
    values: Vec<Option<u64>>,
    top_score: f64,
    /// A detector flagged the reading.
    #[serde(default = "flagged_default")]
    flagged: bool,
    /// Only the alerts not known to be delivered.
    alerts: Vec<AlertSnap>,
}

#[derive(Debug, Serialize, Deserialize)]
struct AlertSnap {
    time: i64,
    fields: Vec<(String, serde_json::Value)>,
}

/// Where and how often the stage saves its state, and the write in progress.
#[derive(Debug)]
pub(super) struct Persist {
    path: PathBuf,
    pub(super) interval: Duration,
    config: serde_json::Value,
    /// Tick time (`on_tick`'s `now`) of the last periodic save.
    last_save: i64,
    writer: Option<JoinHandle<Result<(), String>>>,
}

/// The options a snapshot must have been taken with to be applied.
fn fingerprint(config: &AnomalyConfig) -> serde_json::Value {
    serde_json::json!({
        "group_by": config.group_tags(),
        "detectors": config.detectors,
    })
}

impl Persist {
    pub(super) fn new(dir: &Path, config: &AnomalyConfig) -> Self {
        Persist {
            path: dir.join(FILE),
            interval: config.state_interval.0,
            config: fingerprint(config),
            last_save: now_ns(),
            writer: None,
        }
    }

    /// Whether a periodic save is due at tick time `now`, and no write is still running.
    fn due(&mut self, now: i64) -> bool {
        let interval = i64::try_from(self.interval.as_nanos()).unwrap_or(i64::MAX);
        if now.saturating_sub(self.last_save) < interval {
            return false;
        }
        if let Some(w) = &self.writer {
            if !w.is_finished() {
                // A slow disk: skip this round rather than queue snapshots.
                tracing::debug!(file = %self.path.display(), "previous anomaly snapshot still being written");
                return false;
            }
        }
        self.reap();
        self.last_save = now;
        true
    }

    /// Joins the previous write, logging how it ended.
    fn reap(&mut self) {
        if let Some(w) = self.writer.take() {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("{e}"),
                Err(_) => tracing::warn!(
                    file = %self.path.display(),
                    "anomaly state snapshot writer panicked; the previous snapshot is kept"
                ),
            }
        }
    }

    /// Writes `snapshot` on a background thread (synchronously if none can be started).
    fn save_in_background(&mut self, snapshot: Snapshot) {
        let path = self.path.clone();
        let spawned = std::thread::Builder::new()
            .name("anomaly-state".into())
            .spawn(move || write(&path, &snapshot));
        match spawned {
            Ok(h) => self.writer = Some(h),
            Err(e) => tracing::warn!(
                file = %self.path.display(),
                "cannot start the anomaly state writer ({e}); snapshot skipped this round"
            ),
        }
    }

    /// Writes `snapshot` now, after any write in progress.
    fn save_now(&mut self, snapshot: Snapshot) {
        self.reap();
        match write(&self.path, &snapshot) {
            Ok(()) => tracing::debug!(
                file = %self.path.display(),
                series = snapshot.series.len(),
                groups = snapshot.heartbeats.len(),
                "anomaly state saved"
            ),
            Err(e) => tracing::warn!("{e}"),
        }
    }

    /// The snapshot to restore, or `None` (nothing saved yet, or logged why it is ignored).
    fn load(&self) -> Option<Snapshot> {
        let path = &self.path;
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(file = %path.display(), "cannot read the anomaly state snapshot ({e}); starting with empty baselines");
                return None;
            }
        };
        let snapshot: Snapshot = match serde_json::from_reader(BufReader::new(file)) {
            Ok(s) => s,
            Err(e) => {
                let version = fs::read(path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Header>(&b).ok())
                    .map(|h| h.version);
                match version {
                    Some(v) if v != VERSION => tracing::warn!(
                        file = %path.display(),
                        "anomaly state snapshot has format version {v}, this sluice reads {VERSION}; ignoring it, starting with empty baselines"
                    ),
                    _ => tracing::warn!(
                        file = %path.display(),
                        "anomaly state snapshot is corrupt ({e}); ignoring it, starting with empty baselines"
                    ),
                }
                return None;
            }
        };
        if snapshot.version != VERSION {
            tracing::warn!(
                file = %path.display(),
                "anomaly state snapshot has format version {}, this sluice reads {VERSION}; ignoring it, starting with empty baselines",
                snapshot.version
            );
            return None;
        }
        if snapshot.config != self.config {
            tracing::warn!(
                file = %path.display(),
                saved = %snapshot.config,
                now = %self.config,
                "anomaly state snapshot was taken with other `group_by` / `detectors` options; ignoring it, starting with empty baselines"
            );
            return None;
        }
        Some(snapshot)
    }
}

/// Writes `snapshot` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
fn write(path: &Path, snapshot: &Snapshot) -> Result<(), String> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        format!(
            "cannot save the anomaly state snapshot {}: {what}: {e}; the previous snapshot is kept",
            path.display()
        )
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| fail("creating the directory", &e))?;
    let tmp = path.with_extension("json.tmp");
    let written = (|| {
        let file = File::create(&tmp).map_err(|e| fail("creating the temporary file", &e))?;
        let mut w = BufWriter::new(file);
        serde_json::to_writer(&mut w, snapshot).map_err(|e| fail("writing", &e))?;
        let file = w
            .into_inner()
            .map_err(|e| fail("writing", &e.error().to_string()))?;
        file.sync_all().map_err(|e| fail("fsync", &e))?;
        drop(file);
        fs::rename(&tmp, path).map_err(|e| fail("renaming the temporary file", &e))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    // The rename itself survives a power loss only once the directory is synced.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn group_of(key: &GroupKey) -> Vec<String> {
    key.iter().map(|v| v.to_string()).collect()
}

fn key_of(group: &[String]) -> GroupKey {
    group.iter().map(|v| Arc::from(v.as_str())).collect()
}

/// A watch of an alert whose fate is unknown after a restart: counted as lost, so that it is
/// raised again (at-least-once).
fn lost_watch() -> Watch {
    let (f, watch) = ack::watched();
    drop(f);
    watch
}

fn flagged_default() -> bool {
    true
}

fn all_finite(xs: &[f64]) -> bool {
    xs.iter().all(|x| x.is_finite())
}

impl StateSnap {
    fn of(state: &State) -> Option<StateSnap> {
        let s = match state {
            State::Threshold { alerting } => StateSnap::Threshold {
                alerting: *alerting,
            },
            State::Zscore(ring) => StateSnap::Zscore {
                values: ring.values.iter().copied().collect(),
            },
            State::Ewma { mean, var, n, m2 } => StateSnap::Ewma {
                mean: *mean,
                var: *var,
                n: *n,
                m2: *m2,
            },
            State::Mad(ring) => StateSnap::Mad {
                values: ring.values.iter().copied().collect(),
            },
            State::Rate { prev, moments } => StateSnap::RateOfChange {
                prev: *prev,
                moments: *moments,
            },
            State::Seasonal(buckets) => StateSnap::Seasonal {
                buckets: buckets.clone(),
            },
            State::Stuck {
                value,
                run,
                since,
                alerted,
            } => StateSnap::Stuck {
                value: *value,
                run: *run,
                since: *since,
                alerted: *alerted,
            },
            State::None => StateSnap::Missing,
        };
        // JSON has no NaN or infinity (an overflowing sum of squares): such a series re-warms.
        s.is_finite().then_some(s)
    }

    fn is_finite(&self) -> bool {
        match self {
            StateSnap::Zscore { values } | StateSnap::Mad { values } => all_finite(values),
            StateSnap::Ewma { mean, var, m2, .. } => all_finite(&[*mean, *var, *m2]),
            StateSnap::RateOfChange { prev, moments } => {
                prev.is_none_or(|(_, x)| x.is_finite()) && moments.is_finite()
            }
            StateSnap::Seasonal { buckets } => buckets.iter().all(Moments::is_finite),
            StateSnap::Stuck { value, .. } => value.is_finite(),
            StateSnap::Threshold { .. } | StateSnap::Missing => true,
        }
    }

    /// The state for detector `d`, or `None` if this is not its kind (a damaged file).
    fn into_state(self, d: &DetectorConfig) -> Option<State> {
        if !self.is_finite() {
            return None;
        }
        let ring = |window: usize, values: Vec<f64>| {
            let mut ring = Ring::new(window);
            let skip = values.len().saturating_sub(window);
            for v in values.into_iter().skip(skip) {
                ring.push(v);
            }
            ring
        };
        Some(match (d, self) {
            (DetectorConfig::Threshold { .. }, StateSnap::Threshold { alerting }) => {
                State::Threshold { alerting }
            }
            (DetectorConfig::Zscore { window, .. }, StateSnap::Zscore { values }) => {
                State::Zscore(ring(*window, values))
            }
            (DetectorConfig::Ewma { .. }, StateSnap::Ewma { mean, var, n, m2 }) if var >= 0.0 => {
                State::Ewma { mean, var, n, m2 }
            }
            (DetectorConfig::Mad { window, .. }, StateSnap::Mad { values }) => {
                State::Mad(ring(*window, values))
            }
            (DetectorConfig::RateOfChange { .. }, StateSnap::RateOfChange { prev, moments }) => {
                State::Rate { prev, moments }
            }
            (
                DetectorConfig::Stuck { .. },
                StateSnap::Stuck {
                    value,
                    run,
                    since,
                    alerted,
                },
            ) => State::Stuck {
                value,
                run,
                since,
                alerted,
            },
            (DetectorConfig::Seasonal { buckets: n, .. }, StateSnap::Seasonal { buckets })
                if buckets.len() == *n =>
            {
                State::Seasonal(buckets)
            }
            (DetectorConfig::Missing { .. }, StateSnap::Missing) => State::None,
            _ => return None,
        })
    }
}

fn json_of(v: &Value) -> serde_json::Value {
    match v {
        Value::F64(x) => {
            serde_json::Number::from_f64(*x).map_or(serde_json::Value::Null, Into::into)
        }
        Value::I64(x) => (*x).into(),
        Value::Bool(b) => (*b).into(),
        Value::Str(s) => serde_json::Value::String(s.to_string()),
        Value::Null => serde_json::Value::Null,
    }
}

fn value_of(v: serde_json::Value) -> Value {
    match v {
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) if !n.is_f64() => Value::I64(i),
            _ => n.as_f64().map_or(Value::Null, Value::F64),
        },
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::String(s) => Value::Str(Arc::from(s)),
        _ => Value::Null,
    }
}

impl Detector {
    /// Restores the snapshot in the state directory, if there is a usable one.
    pub(super) fn restore(&mut self) {
        let Some(snapshot) = self.persist.as_ref().and_then(Persist::load) else {
            return;
        };
        let cap = self.series.cap().get();
        self.max_event = self.max_event.max(snapshot.max_event);

        let mut damaged = 0usize;
        let series: Vec<_> = snapshot.series.into_iter().take(cap).collect();
        for s in series.into_iter().rev() {
            let Some(idx) = self.fields.iter().position(|f| **f == *s.field) else {
                continue; // a field no longer watched
            };
            let Some(restored) = self.series_of(s) else {
                damaged += 1;
                continue;
            };
            self.series
                .put((key_of(&restored.0), idx as u16), restored.1);
        }

        // With the wall clock, the downtime is not the devices' silence.
        let shift = match self.missing {
            Some((_, Clock::Wall)) => now_ns().saturating_sub(snapshot.saved_at).max(0),
            _ => 0,
        };
        let heartbeats: Vec<_> = if self.missing.is_some() {
            snapshot.heartbeats.into_iter().take(cap).collect()
        } else {
            Vec::new()
        };
        let groups = heartbeats.len();
        for h in heartbeats.into_iter().rev() {
            let key = key_of(&h.group);
            let offline_alert = match h.unconfirmed_alert {
                Some(time) if h.offline => {
                    Some((self.missing_alert(&key, time, true), lost_watch()))
                }
                _ => None,
            };
            self.heartbeats.put(
                key,
                Heartbeat {
                    last_seen: h.last_seen.saturating_add(shift),
                    offline: h.offline,
                    offline_alert,
                },
            );
        }

        for r in snapshot.raised.into_iter().take(cap) {
            let key = key_of(&r.group);
            let alerts: SmallVec<[(Record, Watch); 1]> = r
                .alerts
                .into_iter()
                .map(|a| {
                    let mut alert = Record::new(a.time);
                    alert.tags = self.group_by.tags_of(&key);
                    alert.fields = a
                        .fields
                        .into_iter()
                        .map(|(name, v)| (intern(&name), value_of(v)))
                        .collect();
                    (alert, lost_watch())
                })
                .collect();
            if alerts.is_empty() {
                continue;
            }
            self.remember(
                key,
                Raised {
                    time: r.time,
                    values: r.values.into_iter().collect(),
                    top_score: r.top_score,
                    flagged: r.flagged,
                    alerts,
                },
            );
        }

        if damaged > 0 {
            tracing::warn!(
                file = %self.persist.as_ref().map(|p| p.path.display().to_string()).unwrap_or_default(),
                damaged,
                "anomaly state snapshot: series with unusable state skipped (they warm up again)"
            );
        }
        tracing::info!(
            transform = %self.name,
            file = %self.persist.as_ref().map(|p| p.path.display().to_string()).unwrap_or_default(),
            series = self.series.len(),
            groups,
            "anomaly state restored"
        );
    }

    fn series_of(&self, s: SeriesSnap) -> Option<(Vec<String>, Series)> {
        if s.states.len() != self.detectors.len() || !all_finite(&[s.last, s.shift]) {
            return None;
        }
        let states = s
            .states
            .into_iter()
            .zip(&self.detectors)
            .map(|(st, d)| st.into_state(d))
            .collect::<Option<Vec<State>>>()?;
        // A calibration per detector, or none at all (an older snapshot): it re-warms.
        let calib = if s.calib.len() == self.detectors.len() {
            s.calib
        } else {
            vec![Calib::default(); self.detectors.len()]
        };
        Some((
            s.group,
            Series {
                samples: s.samples,
                last: s.last,
                shift: s.shift,
                states,
                calib,
            },
        ))
    }

    fn snapshot(&self) -> Snapshot {
        let series = self
            .series
            .iter()
            .filter_map(|((key, idx), s)| {
                if !all_finite(&[s.last, s.shift]) {
                    return None;
                }
                Some(SeriesSnap {
                    group: group_of(key),
                    field: self.fields.get(usize::from(*idx))?.to_string(),
                    samples: s.samples,
                    last: s.last,
                    shift: s.shift,
                    states: s
                        .states
                        .iter()
                        .map(StateSnap::of)
                        .collect::<Option<Vec<_>>>()?,
                    calib: s.calib.iter().copied().filter(Calib::is_finite).collect(),
                })
            })
            .collect();
        let heartbeats = self
            .heartbeats
            .iter()
            .map(|(key, hb)| HeartbeatSnap {
                group: group_of(key),
                last_seen: hb.last_seen,
                offline: hb.offline,
                unconfirmed_alert: hb.offline_alert.as_ref().and_then(|(alert, watch)| {
                    (!watch.status().is_some_and(BatchStatus::is_ackable)).then_some(alert.time)
                }),
            })
            .collect();
        let raised = self
            .raised
            .iter()
            .flat_map(|(key, list)| list.iter().map(move |e| (key, e)))
            .filter_map(|(key, e)| {
                let alerts: Vec<AlertSnap> = e
                    .alerts
                    .iter()
                    .filter(|(_, w)| !w.status().is_some_and(BatchStatus::is_ackable))
                    .map(|(a, _)| AlertSnap {
                        time: a.time,
                        fields: a
                            .fields
                            .iter()
                            .map(|(k, v)| (k.to_string(), json_of(v)))
                            .collect(),
                    })
                    .collect();
                (!alerts.is_empty() && e.top_score.is_finite()).then(|| RaisedSnap {
                    group: group_of(key),
                    time: e.time,
                    values: e.values.to_vec(),
                    top_score: e.top_score,
                    flagged: e.flagged,
                    alerts,
                })
            })
            .collect();
        Snapshot {
            version: VERSION,
            config: self
                .persist
                .as_ref()
                .map_or(serde_json::Value::Null, |p| p.config.clone()),
            saved_at: now_ns(),
            max_event: self.max_event,
            series,
            heartbeats,
            raised,
        }
    }

    /// From the timer: starts a periodic save when one is due.
    pub(super) fn save_if_due(&mut self, now: i64) {
        if self.persist.as_mut().is_some_and(|p| p.due(now)) {
            let snapshot = self.snapshot();
            if let Some(p) = self.persist.as_mut() {
                p.save_in_background(snapshot);
            }
        }
    }

    /// At an orderly stop: saves now.
    pub(super) fn save_now(&mut self) {
        if self.persist.is_some() {
            let snapshot = self.snapshot();
            if let Some(p) = self.persist.as_mut() {
                p.save_now(snapshot);
            }
        }
    }
}
