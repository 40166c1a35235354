//! Per-component metrics: plain atomic counters, rendered as Prometheus text and as the
//! compact rate line the CLI prints while a pipeline runs.
//!
//! Every component gets a [`ComponentMetrics`] with the standard counters (records in/out,
//! bytes, errors, dropped, dead-lettered, buffer fill, write latency). Connectors add their own
//! with [`ComponentMetrics::gauge`] / [`ComponentMetrics::counter`] (MQTT `connected`, Kafka
//! `lag`, …).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What kind of component a metrics set belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Source,
    Transform,
    Sink,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Source => "source",
            Kind::Transform => "transform",
            Kind::Sink => "sink",
        }
    }
}

/// Counters of one component. All updates are relaxed atomics: cheap on the hot path.
#[derive(Debug)]
pub struct ComponentMetrics {
    pub name: String,
    pub kind: Kind,
    /// Records received from upstream (or read, for a source).
    pub records_in: AtomicU64,
    /// Records sent downstream (or written, for a sink).
    pub records_out: AtomicU64,
    /// Payload bytes received (sources) or written (sinks), as the component measures them.
    pub bytes: AtomicU64,
    /// Errors (decode failures, failed writes, …).
    pub errors: AtomicU64,
    /// Records dropped on purpose (buffer `drop_newest`, filters do not count here).
    pub dropped: AtomicU64,
    /// Records sent to a `dead_letter` output.
    pub dead_lettered: AtomicU64,
    /// Batches waiting in this component's input buffer.
    pub buffered: AtomicUsize,
    /// Capacity of the input buffer, in batches (0 for sources).
    pub buffer_capacity: AtomicUsize,
    latency_ns_sum: AtomicU64,
    latency_count: AtomicU64,
    extra: Mutex<BTreeMap<&'static str, Arc<AtomicI64>>>,
    /// Gauges with labels beyond the component (e.g. per Kafka partition), keyed by name and
    /// the rendered label list.
    labeled: Mutex<BTreeMap<(&'static str, String), Arc<AtomicI64>>>,
}

impl ComponentMetrics {
    pub fn new(name: &str, kind: Kind) -> Self {
        ComponentMetrics {
            name: name.to_string(),
            kind,
            records_in: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            buffered: AtomicUsize::new(0),
            buffer_capacity: AtomicUsize::new(0),
            latency_ns_sum: AtomicU64::new(0),
            latency_count: AtomicU64::new(0),
            extra: Mutex::new(BTreeMap::new()),
            labeled: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn add_in(&self, n: usize) {
        self.records_in.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn add_out(&self, n: usize) {
        self.records_out.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn add_bytes(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn add_errors(&self, n: usize) {
        self.errors.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn add_dropped(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn add_dead_lettered(&self, n: usize) {
        self.dead_lettered.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records the duration of one write (sinks) or one processing step.
    pub fn observe_latency(&self, d: Duration) {
        self.latency_ns_sum
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    /// A named component-specific gauge (created on first use), e.g. `connected`, `inflight`.
    pub fn gauge(&self, name: &'static str) -> Arc<AtomicI64> {
        let mut extra = self.extra.lock().unwrap_or_else(|p| p.into_inner());
        extra.entry(name).or_default().clone()
    }

    /// A named component-specific counter; same storage as [`gauge`](Self::gauge), only
    /// incremented. Rendered with a `_total` suffix when its name ends with `_total`.
    pub fn counter(&self, name: &'static str) -> Arc<AtomicI64> {
        self.gauge(name)
    }

    /// A gauge with extra labels, e.g. `consumer_lag` per `topic` and `partition`; rendered as
    /// `sluice_source_consumer_lag{component="…",topic="…",partition="3"}`.
    pub fn labeled_gauge(&self, name: &'static str, labels: &[(&str, &str)]) -> Arc<AtomicI64> {
        let rendered = render_labels(labels);
        let mut labeled = self.labeled.lock().unwrap_or_else(|p| p.into_inner());
        labeled.entry((name, rendered)).or_default().clone()
    }

    /// Unregisters a [`labeled_gauge`](Self::labeled_gauge), so that it is no longer
    /// rendered (e.g. the lag of a Kafka partition this member no longer owns). Returns
    /// whether it existed; clones of the gauge still work but are no longer shown.
    pub fn remove_labeled_gauge(&self, name: &'static str, labels: &[(&str, &str)]) -> bool {
        let rendered = render_labels(labels);
        let mut labeled = self.labeled.lock().unwrap_or_else(|p| p.into_inner());
        labeled.remove(&(name, rendered)).is_some()
    }

    /// A point-in-time copy of the counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            records_in: self.records_in.load(Ordering::Relaxed),
            records_out: self.records_out.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            buffered: self.buffered.load(Ordering::Relaxed),
            buffer_capacity: self.buffer_capacity.load(Ordering::Relaxed),
        }
    }
}

/// Prometheus label text (`,k="v"` per label, escaped), the key of a labeled gauge.
fn render_labels(labels: &[(&str, &str)]) -> String {
    let mut rendered = String::new();
    for (k, v) in labels {
        let v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(rendered, ",{k}=\"{v}\"");
    }
    rendered
}

/// Counter values at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub records_in: u64,
    pub records_out: u64,
    pub errors: u64,
    pub dropped: u64,
    pub dead_lettered: u64,
    pub buffered: usize,
    pub buffer_capacity: usize,
}

type Getter = fn(&ComponentMetrics) -> u64;

/// All components' metrics of one running pipeline.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    components: Arc<Mutex<Vec<Arc<ComponentMetrics>>>>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or returns the existing) metrics of component `name`.
    pub fn component(&self, name: &str, kind: Kind) -> Arc<ComponentMetrics> {
        let mut all = self.components.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = all.iter().find(|m| m.name == name) {
            return m.clone();
        }
        let m = Arc::new(ComponentMetrics::new(name, kind));
        all.push(m.clone());
        m
    }

    /// Every registered component, in registration order.
    pub fn all(&self) -> Vec<Arc<ComponentMetrics>> {
        self.components
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        let comps = self.all();
        let mut out = String::new();
        let std_counters: [(&str, &str, Getter); 6] = [
            (
                "records_in_total",
                "Records received by the component.",
                |m| m.records_in.load(Ordering::Relaxed),
            ),
            (
                "records_out_total",
                "Records emitted or written by the component.",
                |m| m.records_out.load(Ordering::Relaxed),
            ),
            (
                "bytes_total",
                "Payload bytes read (sources) or written (sinks).",
                |m| m.bytes.load(Ordering::Relaxed),
            ),
            ("errors_total", "Errors seen by the component.", |m| {
                m.errors.load(Ordering::Relaxed)
            }),
            (
                "dropped_total",
                "Records dropped by a full drop_newest buffer.",
                |m| m.dropped.load(Ordering::Relaxed),
            ),
            (
                "dead_lettered_total",
                "Records sent to a dead_letter output.",
                |m| m.dead_lettered.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, get) in std_counters {
            let _ = writeln!(out, "# HELP sluice_component_{name} {help}");
            let _ = writeln!(out, "# TYPE sluice_component_{name} counter");
            for m in &comps {
                let _ = writeln!(
                    out,
                    "sluice_component_{name}{{component=\"{}\",kind=\"{}\"}} {}",
                    m.name,
                    m.kind.as_str(),
                    get(m)
                );
            }
        }
        let _ = writeln!(out, "# TYPE sluice_component_buffer_batches gauge");
        for m in &comps {
            let _ = writeln!(
                out,
                "sluice_component_buffer_batches{{component=\"{}\",kind=\"{}\"}} {}",
                m.name,
                m.kind.as_str(),
                m.buffered.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# TYPE sluice_component_latency_seconds summary");
        for m in &comps {
            let labels = format!("component=\"{}\",kind=\"{}\"", m.name, m.kind.as_str());
            let sum = m.latency_ns_sum.load(Ordering::Relaxed) as f64 / 1e9;
            let count = m.latency_count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "sluice_component_latency_seconds_sum{{{labels}}} {sum}"
            );
            let _ = writeln!(
                out,
                "sluice_component_latency_seconds_count{{{labels}}} {count}"
            );
        }
        for m in &comps {
            let extra = m.extra.lock().unwrap_or_else(|p| p.into_inner());
            for (name, v) in extra.iter() {
                let _ = writeln!(
                    out,
                    "sluice_{}_{name}{{component=\"{}\"}} {}",
                    m.kind.as_str(),
                    m.name,
                    v.load(Ordering::Relaxed)
                );
            }
            let labeled = m.labeled.lock().unwrap_or_else(|p| p.into_inner());
            for ((name, labels), v) in labeled.iter() {
                let _ = writeln!(
                    out,
                    "sluice_{}_{name}{{component=\"{}\"{labels}}} {}",
                    m.kind.as_str(),
                    m.name,
                    v.load(Ordering::Relaxed)
                );
            }
        }
        out
    }
}

/// Formats the compact progress line from two snapshots taken `elapsed` apart.
///
/// Example: `sim out 10.0k/s | console in 10.0k/s buf 1/16 | dlq in 3/s err 3`.
pub fn rate_line(
    comps: &[Arc<ComponentMetrics>],
    previous: &[Snapshot],
    elapsed: Duration,
) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let mut parts = Vec::with_capacity(comps.len());
    for (i, m) in comps.iter().enumerate() {
        let now = m.snapshot();
        let before = previous.get(i).copied().unwrap_or_default();
        let rin = (now.records_in - before.records_in) as f64 / secs;
        let rout = (now.records_out - before.records_out) as f64 / secs;
        let mut s = m.name.clone();
        match m.kind {
            Kind::Source => {
                let _ = write!(s, " out {}/s", human_rate(rout));
            }
            Kind::Transform => {
                let _ = write!(s, " in {}/s out {}/s", human_rate(rin), human_rate(rout));
            }
            Kind::Sink => {
                let _ = write!(s, " in {}/s", human_rate(rin));
            }
        }
        if now.buffer_capacity > 0 {
            let _ = write!(s, " buf {}/{}", now.buffered, now.buffer_capacity);
        }
        if now.errors > 0 {
            let _ = write!(s, " err {}", now.errors);
        }
        if now.dead_lettered > 0 {
            let _ = write!(s, " dlq {}", now.dead_lettered);
        }
        if now.dropped > 0 {
            let _ = write!(s, " dropped {}", now.dropped);
        }
        parts.push(s);
    }
    parts.join(" | ")
}

/// Formats the totals since start: `sim out 30 err 1 dlq 1 | out in 29`.
pub fn totals_line(comps: &[Arc<ComponentMetrics>]) -> String {
    comps
        .iter()
        .map(|m| {
            let s = m.snapshot();
            let mut line = match m.kind {
                Kind::Source => format!("{} out {}", m.name, s.records_out),
                Kind::Transform => format!("{} in {} out {}", m.name, s.records_in, s.records_out),
                Kind::Sink => format!("{} in {} written {}", m.name, s.records_in, s.records_out),
            };
            for (label, v) in [
                ("err", s.errors),
                ("dlq", s.dead_lettered),
                ("dropped", s.dropped),
            ] {
                if v > 0 {
                    let _ = write!(line, " {label} {v}");
                }
            }
            line
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

fn human_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

/// Connections the metrics server answers at once; further ones wait in the listen backlog,
/// so a flood of clients costs no tasks or memory here.
const MAX_CONNECTIONS: usize = 64;
/// Time a client gets to send its request, and again to take the answer, before it is cut
/// off (and its connection slot freed).
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept()`: errors such as EMFILE (no file descriptors left) fail
/// again at once, and retrying without a pause spins a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one accept warning per this interval; the others are counted in the next one.
const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Serves `GET /metrics` (Prometheus text) and `GET /health` on `listener` until the task is
/// dropped. A deliberately small HTTP/1.1 responder: two read-only endpoints do not justify an
/// HTTP framework in the core crate. At most 64 connections are served at once, each with a
/// 5 s read and write timeout.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    serve_with(listener, metrics, MAX_CONNECTIONS, IO_TIMEOUT).await
}

async fn serve_with(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    max_connections: usize,
    io_timeout: Duration,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let mut last_warning: Option<std::time::Instant> = None;
    let mut unreported = 0u64;
    loop {
        // A slot is taken before accepting, so beyond the limit clients wait in the backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if last_warning.is_none_or(|t| t.elapsed() >= ACCEPT_WARNING_INTERVAL) {
                    tracing::warn!(
                        error = %e,
                        failures_since_last_warning = unreported,
                        "metrics server: accept failed; retrying every {ACCEPT_BACKOFF:?}"
                    );
                    last_warning = Some(std::time::Instant::now());
                    unreported = 0;
                } else {
                    unreported += 1;
                }
                drop(slot);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            answer(stream, &metrics, io_timeout).await;
            drop(slot);
        });
    }
}

/// Reads one request and writes the answer, each within `io_timeout`.
async fn answer(mut stream: tokio::net::TcpStream, metrics: &Metrics, io_timeout: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 2048];
    let n = match tokio::time::timeout(io_timeout, stream.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => n,
        _ => return,
    };
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/metrics" => ("200 OK", metrics.render_prometheus()),
        "/health" => ("200 OK", "ok\n".to_string()),
        _ => ("404 Not Found", "try /metrics or /health\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(io_timeout, stream.write_all(response.as_bytes())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_components() {
        let metrics = Metrics::new();
        let m = metrics.component("mqtt_in", Kind::Source);
        m.add_out(42);
        m.gauge("connected").store(1, Ordering::Relaxed);
        let text = metrics.render_prometheus();
        assert!(text.contains(
            "sluice_component_records_out_total{component=\"mqtt_in\",kind=\"source\"} 42"
        ));
        assert!(text.contains("sluice_source_connected{component=\"mqtt_in\"} 1"));
    }

    #[test]
    fn labeled_gauges_can_be_removed() {
        let metrics = Metrics::new();
        let m = metrics.component("bus", Kind::Source);
        m.labeled_gauge("consumer_lag", &[("topic", "t"), ("partition", "0")])
            .store(5, Ordering::Relaxed);
        m.labeled_gauge("consumer_lag", &[("topic", "t"), ("partition", "1")])
            .store(7, Ordering::Relaxed);
        assert!(m.remove_labeled_gauge("consumer_lag", &[("topic", "t"), ("partition", "1")]));
        assert!(!m.remove_labeled_gauge("consumer_lag", &[("topic", "t"), ("partition", "1")]));
        let text = metrics.render_prometheus();
        assert!(text.contains("partition=\"0\"} 5"), "{text}");
        assert!(!text.contains("partition=\"1\""), "{text}");
    }

    #[test]
    fn rate_line_shows_rates_and_problems() {
        let metrics = Metrics::new();
        let sink = metrics.component("out", Kind::Sink);
        sink.buffer_capacity.store(16, Ordering::Relaxed);
        let before = vec![sink.snapshot()];
        sink.add_in(20_000);
        sink.add_errors(2);
        let line = rate_line(&metrics.all(), &before, Duration::from_secs(2));
        assert_eq!(line, "out in 10.0k/s buf 0/16 err 2");
    }

    async fn server(max_connections: usize, io_timeout: Duration) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        tokio::spawn(serve_with(
            listener,
            Metrics::new(),
            max_connections,
            io_timeout,
        ));
        addr
    }

    /// Sends a request and reads the answer until the server closes, within `wait`.
    async fn get(
        stream: &mut tokio::net::TcpStream,
        wait: Duration,
    ) -> Result<String, tokio::time::error::Elapsed> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = stream.write_all(b"GET /health HTTP/1.1\r\n\r\n").await;
        let mut out = Vec::new();
        tokio::time::timeout(wait, stream.read_to_end(&mut out))
            .await?
            .ok();
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    #[tokio::test]
    async fn metrics_server_bounds_its_connections() {
        use tokio::net::TcpStream;
        let addr = server(2, Duration::from_secs(30)).await;
        let idle1 = TcpStream::connect(addr).await.expect("connect");
        let idle2 = TcpStream::connect(addr).await.expect("connect");
        // Let the server accept both idle clients: they now hold the two slots.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut third = TcpStream::connect(addr).await.expect("connect (backlog)");
        assert!(
            get(&mut third, Duration::from_millis(300)).await.is_err(),
            "a third connection is not served while two are open"
        );
        drop(idle1);
        let answer = get(&mut third, Duration::from_secs(5))
            .await
            .expect("served once a slot is free");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        drop(idle2);
    }

    #[tokio::test]
    async fn metrics_server_drops_silent_clients() {
        use tokio::io::AsyncReadExt;
        let addr = server(1, Duration::from_millis(200)).await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed after the read timeout"
        );
        // Its slot is free again.
        let mut next = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let answer = get(&mut next, Duration::from_secs(5))
            .await
            .expect("served");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    }
}
