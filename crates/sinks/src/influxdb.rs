//! `influxdb` sink: writes records as line protocol to the InfluxDB 2.x write API
//! (`POST /api/v2/write`), which InfluxDB 2/3, InfluxDB Cloud and VictoriaMetrics all accept.
//!
//! ```toml
//! [sinks.influx]
//! type = "influxdb"
//! inputs = ["devices"]
//! url = "http://127.0.0.1:8086"
//! org = "acme"
//! bucket = "telemetry-{tenant}"      # one bucket per tenant (tag `tenant`)
//! token = "${INFLUX_TOKEN}"
//! measurement = "devices"
//! tags = ["device_id", "tenant"]
//! ```
//!
//! Each batch is grouped by bucket and sent as one gzipped request per bucket, up to
//! `in_flight` requests at once. A batch is acknowledged only after the server answered 2xx.
//! 429/503 are retried after the server's `Retry-After` (other 5xx, timeouts and connection
//! errors with capped exponential backoff); a batch still failing after `retry.max_retries` is
//! reported `Errored` so the source redelivers it. 400/422 name the offending lines: those go to
//! `dead_letter` with the server's message and the rest is delivered (resent when the server
//! wrote nothing). 401/403 stop the pipeline: a wrong token is not something to retry.
//! 404 (bucket not found) and 405 (typically a proxy or a wrong `url` path) say nothing about
//! the records: they are retried like a 503 (someone may create the bucket or fix the route),
//! and when the retries run out the records are `Errored` and the sink stops with an error
//! naming the bucket. Dead-lettering them would acknowledge records no server has.

use std::ops::Range;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::ack::BatchStatus;
use sluice_core::config::{ByteSize, HumanDuration};
use sluice_core::record::Record;
use sluice_core::registry::{BuildContext, SinkConfig};
use sluice_core::sink::{BatchConfig, Sink, SinkContext, SinkInput};
use sluice_core::BoxError;
use tokio::task::JoinSet;

use crate::line_protocol::{Encoder, Precision};
use crate::retry::{parse_retry_after, Backoff, RetryConfig};

/// Writes records to InfluxDB 2.x (or anything speaking its `/api/v2/write`) as line protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InfluxDbConfig {
    /// Base URL of the server, e.g. "http://127.0.0.1:8086". Required.
    pub url: String,
    /// Organization name (the `org` query parameter). Required.
    pub org: String,
    /// Bucket to write to; `{tag}` placeholders are replaced by the record's tag value, e.g.
    /// "telemetry-{tenant}" for one bucket per tenant (a record without the tag goes to
    /// `dead_letter`). Required.
    pub bucket: String,
    /// API token, sent as `Authorization: Token …`; use "${INFLUX_TOKEN}" to read it from the
    /// environment. Default: none (no Authorization header).
    #[serde(default)]
    pub token: Option<sluice_core::config::Secret>,
    /// Measurement name; `{tag}` placeholders as in `bucket`. Default "telemetry".
    #[serde(default = "default_measurement")]
    pub measurement: String,
    /// Record tags written as line-protocol tags (others are left out). Default: all tags.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Timestamp precision: "ns", "us", "ms" or "s" (times are truncated to it). Default "ns".
    #[serde(default)]
    pub precision: Precision,
    /// Compress request bodies with gzip. Default true.
    #[serde(default = "default_true")]
    pub gzip: bool,
    /// Batching: lines per request and linger. Default: 5000 records / 10MiB / 1s.
    #[serde(default = "default_batch")]
    pub batch: BatchConfig,
    /// Write requests in flight at once. Default 4.
    #[serde(default = "default_in_flight")]
    pub in_flight: usize,
    /// Deadline of one HTTP request (connecting: at most 10s of it). A request that times out
    /// is retried like a 5xx (`retry`), logged at WARN with the URL and counted in `timeouts`.
    /// Default "30s".
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Retries of transient failures (429, 5xx, timeouts, connection errors). Default: 8
    /// retries, 100ms doubling up to 30s.
    #[serde(default)]
    pub retry: RetryConfig,
}

fn default_measurement() -> String {
    "telemetry".into()
}
fn default_true() -> bool {
    true
}
fn default_batch() -> BatchConfig {
    BatchConfig {
        max_records: 5000,
        max_bytes: ByteSize(10 * 1024 * 1024),
        max_age: HumanDuration(Duration::from_secs(1)),
    }
}
fn default_in_flight() -> usize {
    4
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// A string with `{tag}` placeholders (bucket, measurement).
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Tag(String),
}

impl Template {
    /// Parses `text`; `{name}` is a tag placeholder.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in {text:?}"))?;
            let name = &after[..close];
            if name.is_empty() || name.contains('{') {
                return Err(format!("bad placeholder `{{{name}}}` in {text:?}"));
            }
            parts.push(Part::Tag(name.to_string()));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The text when it has no placeholder.
    pub fn as_static(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Literal(s)] => Some(s),
            _ => None,
        }
    }

    /// Renders for `record` into `out`; `Err(tag)` names a missing (or empty) tag.
    pub fn render<'a>(&'a self, record: &Record, out: &mut String) -> Result<(), &'a str> {
        out.clear();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Tag(name) => match record.tag(name) {
                    Some(v) if !v.is_empty() => out.push_str(v),
                    _ => return Err(name),
                },
            }
        }
        Ok(())
    }
}

#[async_trait]
impl SinkConfig for InfluxDbConfig {
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Sink>, BoxError> {
        let bucket = Template::parse(&self.bucket).map_err(|e| format!("`bucket`: {e}"))?;
        let measurement =
            Template::parse(&self.measurement).map_err(|e| format!("`measurement`: {e}"))?;
        if self.in_flight == 0 {
            return Err("`in_flight` must be at least 1".into());
        }
        let base = self.url.trim_end_matches('/').to_string();
        let parsed = reqwest::Url::parse(&base).map_err(|e| format!("`url` {base:?}: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("`url` {base:?}: scheme must be http or https").into());
        }
        let client = reqwest::Client::builder()
            .timeout(self.timeout.0)
            .connect_timeout(self.timeout.0.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let writer = Writer {
            client,
            write_url: format!("{base}/api/v2/write"),
            base,
            config: self.clone(),
            name: cx.name.clone(),
        };
        writer.health_check().await?;
        Ok(Box::new(InfluxDbSink {
            writer,
            bucket,
            measurement,
        }))
    }
}

struct InfluxDbSink {
    writer: Writer,
    bucket: Template,
    measurement: Template,
}

/// One write request: the lines for one bucket and the records they came from, in order.
struct Request {
    bucket: String,
    body: Vec<u8>,
    /// Byte range of each line (with its newline) in `body`; line `i` is `records[i]`.
    lines: Vec<Range<usize>>,
    records: Vec<Record>,
}

impl Request {
    /// A request holding only the lines at `keep` (indices into `lines`, ascending).
    fn subset(&mut self, keep: &[usize]) -> Request {
        let mut body = Vec::new();
        let mut lines = Vec::with_capacity(keep.len());
        let mut records = Vec::with_capacity(keep.len());
        for &i in keep {
            let start = body.len();
            body.extend_from_slice(&self.body[self.lines[i].clone()]);
            lines.push(start..body.len());
            records.push(std::mem::take(&mut self.records[i]));
        }
        Request {
            bucket: self.bucket.clone(),
            body,
            lines,
            records,
        }
    }

    fn line(&self, i: usize) -> &str {
        std::str::from_utf8(&self.body[self.lines[i].clone()])
            .unwrap_or("")
            .trim_end_matches('\n')
    }
}

#[async_trait]
impl Sink for InfluxDbSink {
    async fn run(self: Box<Self>, mut input: SinkInput, cx: SinkContext) -> Result<(), BoxError> {
        let InfluxDbSink {
            writer,
            bucket,
            measurement,
        } = *self;
        let writer = Arc::new(writer);
        let cx = Arc::new(cx);
        let batch_config = writer.config.batch;
        let in_flight = writer.config.in_flight;
        let mut encoder =
            Encoder::new(writer.config.precision).with_tags(writer.config.tags.clone());
        let mut tasks: JoinSet<Result<(), BoxError>> = JoinSet::new();
        let mut bucket_buf = String::new();
        let mut measurement_buf = String::new();

        while let Some(batch) = input.next_batch(&batch_config).await {
            let mut requests: Vec<Request> = Vec::new();
            let mut rejected: Vec<(String, Vec<Record>)> = Vec::new();
            for record in batch.records {
                let target = bucket.as_static().map(Ok).unwrap_or_else(|| {
                    bucket
                        .render(&record, &mut bucket_buf)
                        .map(|_| bucket_buf.as_str())
                });
                let bucket_name = match target {
                    Ok(b) => b,
                    Err(tag) => {
                        push_rejected(
                            &mut rejected,
                            format!("influxdb: `bucket` needs tag `{tag}`, which the record lacks"),
                            record,
                        );
                        continue;
                    }
                };
                let m = measurement.as_static().map(Ok).unwrap_or_else(|| {
                    measurement
                        .render(&record, &mut measurement_buf)
                        .map(|_| measurement_buf.as_str())
                });
                let m = match m {
                    Ok(m) => m,
                    Err(tag) => {
                        let reason = format!(
                            "influxdb: `measurement` needs tag `{tag}`, which the record lacks"
                        );
                        push_rejected(&mut rejected, reason, record);
                        continue;
                    }
                };
                let idx = match requests.iter().position(|r| r.bucket == bucket_name) {
                    Some(i) => i,
                    None => {
                        requests.push(Request {
                            bucket: bucket_name.to_string(),
                            body: Vec::with_capacity(128 * batch_config.max_records.min(10_000)),
                            lines: Vec::new(),
                            records: Vec::new(),
                        });
                        requests.len() - 1
                    }
                };
                let req = &mut requests[idx];
                let start = req.body.len();
                match encoder.encode(m, &record, &mut req.body) {
                    Ok(()) => {
                        req.lines.push(start..req.body.len());
                        req.records.push(record);
                    }
                    Err(e) => push_rejected(&mut rejected, e.to_string(), record),
                }
            }
            for (reason, records) in rejected {
                cx.reject(records, &reason).await;
            }
            for req in requests.into_iter().filter(|r| !r.records.is_empty()) {
                while tasks.len() >= in_flight {
                    if let Some(done) = tasks.join_next().await {
                        done.map_err(|e| format!("influxdb write task failed: {e}"))??;
                    }
                }
                let writer = writer.clone();
                let cx = cx.clone();
                tasks.spawn(async move { writer.deliver(req, &cx).await });
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|e| format!("influxdb write task failed: {e}"))??;
        }
        Ok(())
    }
}

fn push_rejected(rejected: &mut Vec<(String, Vec<Record>)>, reason: String, record: Record) {
    match rejected.iter_mut().find(|(r, _)| *r == reason) {
        Some((_, v)) => v.push(record),
        None => rejected.push((reason, vec![record])),
    }
}

/// The HTTP side: health check and delivery of requests with retries.
struct Writer {
    client: reqwest::Client,
    base: String,
    write_url: String,
    config: InfluxDbConfig,
    name: String,
}

/// What one request (with its retries) came to.
enum Outcome {
    Written,
    /// Transient failures until the retries ran out.
    GaveUp(String),
    /// 401/403: stop the sink.
    Fatal(String),
    /// 400/422: some lines refused (the body says which).
    Refused {
        status: StatusCode,
        body: String,
    },
    /// 413: the request is too large.
    TooLarge(String),
    /// Another 4xx (not 404/405, which are operational): the whole request is refused.
    RefusedAll(String),
}

impl Writer {
    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.config.token {
            Some(token) => req.header(
                reqwest::header::AUTHORIZATION,
                format!("Token {}", token.expose()),
            ),
            None => req,
        }
    }

    /// Start-up check: the server answers `/health`, and the token is accepted where the
    /// server can tell (`/api/v2/buckets`; servers without it, like VictoriaMetrics, answer
    /// 404, which is fine).
    async fn health_check(&self) -> Result<(), BoxError> {
        let url = &self.base;
        let health = self
            .auth(self.client.get(format!("{url}/health")))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "sink `{}`: cannot reach InfluxDB at {url}: {e} (is the server running and `url` right?)",
                    self.name
                )
            })?;
        let status = health.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self
                .auth_error(status, &health.text().await.unwrap_or_default())
                .into());
        }
        if !status.is_success() {
            let body = health.text().await.unwrap_or_default();
            return Err(format!(
                "sink `{}`: InfluxDB at {url} is not healthy: GET /health answered {status}: {}",
                self.name,
                body.trim()
            )
            .into());
        }
        let buckets = self
            .auth(self.client.get(format!("{url}/api/v2/buckets")))
            .query(&[("limit", "1")])
            .send()
            .await
            .map_err(|e| format!("sink `{}`: InfluxDB at {url}: {e}", self.name))?;
        let status = buckets.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self
                .auth_error(status, &buckets.text().await.unwrap_or_default())
                .into());
        }
        Ok(())
    }

    fn auth_error(&self, status: StatusCode, body: &str) -> String {
        format!(
            "sink `{}`: InfluxDB at {} refused the credentials ({status}): {}; check `token` (INFLUX_TOKEN) and its write permission on the bucket",
            self.name,
            self.base,
            body.trim()
        )
    }

    /// The error of a write refused because the target is missing (404) or the route is wrong
    /// (405), once the retries are spent.
    fn not_found_error(&self, status: StatusCode, bucket: &str, body: &str) -> String {
        format!(
            "sink `{}`: InfluxDB at {} answered {status} for bucket {bucket:?} (org {:?}): {}; check that the bucket exists in that org and that `url` reaches the InfluxDB write API (a proxy answering 404/405 is routing `/api/v2/write` elsewhere)",
            self.name,
            self.write_url,
            self.config.org,
            body.trim()
        )
    }

    /// Delivers `req`, splitting it when the server refuses part of it. Records end
    /// `Delivered`, dead-lettered (`Rejected`) or `Errored`; `Err` for 401/403, and for
    /// 404/405 once retried `retry.max_retries` times.
    async fn deliver(&self, req: Request, cx: &SinkContext) -> Result<(), BoxError> {
        let timeouts = cx.metrics.counter("timeouts");
        let mut work = vec![req];
        while let Some(mut req) = work.pop() {
            let started = Instant::now();
            let outcome = self.send(&req, &timeouts).await;
            cx.metrics.observe_latency(started.elapsed());
            match outcome {
                Outcome::Written => {
                    cx.metrics.add_bytes(req.body.len());
                    cx.metrics.add_out(req.records.len());
                    for r in &mut req.records {
                        r.finalize(BatchStatus::Delivered);
                    }
                }
                Outcome::GaveUp(e) => {
                    tracing::error!(sink = %self.name, error = %e, records = req.records.len(), "giving up; records will be redelivered");
                    errored(cx, req);
                }
                Outcome::Fatal(e) => {
                    errored(cx, req);
                    for req in work {
                        errored(cx, req);
                    }
                    return Err(e.into());
                }
                Outcome::RefusedAll(message) => {
                    cx.reject(std::mem::take(&mut req.records), &message).await;
                }
                Outcome::TooLarge(message) => {
                    if req.records.len() == 1 {
                        cx.reject(std::mem::take(&mut req.records), &message).await;
                    } else {
                        let (a, b) = halves(req.records.len());
                        work.push(req.subset(&a));
                        work.push(req.subset(&b));
                    }
                }
                Outcome::Refused { status, body } => {
                    let lines: Vec<&str> = (0..req.lines.len()).map(|i| req.line(i)).collect();
                    let refusal = parse_refusal(&body, &lines);
                    let message = refusal.message.clone();
                    if refusal.bad.is_empty() {
                        if req.records.len() == 1 {
                            let reason = format!("influxdb: {status}: {message}");
                            cx.reject(std::mem::take(&mut req.records), &reason).await;
                        } else {
                            // The server did not say which lines: find them by halving.
                            let (a, b) = halves(req.records.len());
                            work.push(req.subset(&a));
                            work.push(req.subset(&b));
                        }
                        continue;
                    }
                    let mut bad = refusal.bad;
                    bad.sort_by_key(|(i, _)| *i);
                    bad.dedup_by_key(|(i, _)| *i);
                    let good: Vec<usize> = (0..req.records.len())
                        .filter(|i| bad.binary_search_by_key(i, |(j, _)| *j).is_err())
                        .collect();
                    for (i, why) in bad {
                        let record = std::mem::take(&mut req.records[i]);
                        cx.reject(vec![record], &format!("influxdb: {status}: {why}"))
                            .await;
                    }
                    if good.is_empty() {
                        continue;
                    }
                    let mut rest = req.subset(&good);
                    if refusal.rest_written {
                        cx.metrics.add_bytes(rest.body.len());
                        cx.metrics.add_out(rest.records.len());
                        for r in &mut rest.records {
                            r.finalize(BatchStatus::Delivered);
                        }
                    } else {
                        work.push(rest);
                    }
                }
            }
        }
        Ok(())
    }

    /// One request with retries of transient failures.
    async fn send(&self, req: &Request, timeouts: &AtomicI64) -> Outcome {
        let body = if self.config.gzip {
            match gzip(&req.body) {
                Ok(b) => b,
                Err(e) => return Outcome::GaveUp(format!("gzip: {e}")),
            }
        } else {
            req.body.clone()
        };
        let body = bytes::Bytes::from(body);
        let mut backoff = Backoff::new(self.config.retry);
        loop {
            let mut http = self
                .auth(self.client.post(&self.write_url))
                .query(&[
                    ("org", self.config.org.as_str()),
                    ("bucket", req.bucket.as_str()),
                    ("precision", self.config.precision.as_str()),
                ])
                .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(body.clone());
            if self.config.gzip {
                http = http.header(reqwest::header::CONTENT_ENCODING, "gzip");
            }
            // `stop`: when the retries run out, stop the sink (the fault is in the setup,
            // not in these records, and would refuse every later request too).
            let (error, hint, stop) = match http.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        return Outcome::Written;
                    }
                    let hint = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    let text = resp.text().await.unwrap_or_default();
                    match status.as_u16() {
                        401 | 403 => return Outcome::Fatal(self.auth_error(status, &text)),
                        400 | 422 => {
                            return Outcome::Refused { status, body: text };
                        }
                        413 => {
                            return Outcome::TooLarge(format!(
                                "influxdb: {status}: line too large for the server: {}",
                                text.trim()
                            ))
                        }
                        404 | 405 => (self.not_found_error(status, &req.bucket, &text), hint, true),
                        408 | 429 | 500..=599 => {
                            (format!("{status}: {}", text.trim()), hint, false)
                        }
                        _ => {
                            return Outcome::RefusedAll(format!(
                                "influxdb: bucket {:?}: {status}: {}",
                                req.bucket,
                                text.trim()
                            ))
                        }
                    }
                }
                Err(e) if e.is_timeout() => {
                    timeouts.fetch_add(1, Ordering::Relaxed);
                    (
                        format!(
                            "request to {} timed out (timeout {}): {e}",
                            self.write_url, self.config.timeout
                        ),
                        None,
                        false,
                    )
                }
                Err(e) => (
                    format!("request to {} failed: {e}", self.write_url),
                    None,
                    false,
                ),
            };
            match backoff.next_delay(hint) {
                Some(delay) => {
                    tracing::warn!(sink = %self.name, error = %error, retry = backoff.retries(), delay_ms = delay.as_millis() as u64, "write failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                None => {
                    let error = format!("{error} (after {} retries)", backoff.retries());
                    return if stop {
                        Outcome::Fatal(error)
                    } else {
                        Outcome::GaveUp(error)
                    };
                }
            }
        }
    }
}

fn errored(cx: &SinkContext, mut req: Request) {
    cx.metrics.add_errors(req.records.len());
    for r in &mut req.records {
        r.finalize(BatchStatus::Errored);
    }
}

fn halves(n: usize) -> (Vec<usize>, Vec<usize>) {
    let mid = n / 2;
    ((0..mid).collect(), (mid..n).collect())
}

fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    enc.write_all(data)?;
    enc.finish()
}

/// Which lines a 400/422 answer refused.
#[derive(Debug, PartialEq)]
struct Refusal {
    /// (line index, 0-based; the server's message for it)
    bad: Vec<(usize, String)>,
    /// Whether the server wrote the other lines (a "partial write").
    rest_written: bool,
    /// The server's overall message.
    message: String,
}

/// Reads the offending lines from an error body. Understood forms:
/// InfluxDB 3 (`{"error": "partial write …", "data": [{"line_number": n, "error_message": …}]}`),
/// InfluxDB Cloud (`{"code": "invalid", "line": n, "message": …}`) and InfluxDB 2 OSS
/// (`{"code": "invalid", "message": "unable to parse '<line>': …"}`, several such messages may
/// be joined). Line numbers are 1-based on the wire.
fn parse_refusal(body: &str, lines: &[&str]) -> Refusal {
    let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let message = json
        .as_ref()
        .and_then(|j| {
            j.get("message")
                .or_else(|| j.get("error"))
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| body.trim().to_string());
    let mut bad = Vec::new();
    let to_index = |n: u64| -> Option<usize> {
        let i = usize::try_from(n).ok()?.checked_sub(1)?;
        (i < lines.len()).then_some(i)
    };
    if let Some(j) = &json {
        if let Some(data) = j.get("data").and_then(|d| d.as_array()) {
            for item in data {
                let n = item.get("line_number").and_then(|n| n.as_u64());
                let why = item
                    .get("error_message")
                    .and_then(|m| m.as_str())
                    .unwrap_or(&message);
                let idx = n.and_then(to_index).or_else(|| {
                    let orig = item.get("original_line").and_then(|l| l.as_str())?;
                    lines.iter().position(|l| *l == orig)
                });
                if let Some(i) = idx {
                    bad.push((i, why.to_string()));
                }
            }
        }
        if let Some(i) = j.get("line").and_then(|n| n.as_u64()).and_then(to_index) {
            bad.push((i, message.clone()));
        }
    }
    if bad.is_empty() {
        for (i, line) in lines.iter().enumerate() {
            if !line.is_empty() && message.contains(&format!("'{line}'")) {
                bad.push((i, message.clone()));
            }
        }
    }
    let lower = body.to_ascii_lowercase();
    Refusal {
        bad,
        rest_written: lower.contains("partial write"),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_tags() {
        let t = Template::parse("tenant-{tenant}-{site}").expect("parses");
        let mut r = Record::new(0);
        r.set_tag("tenant", "acme");
        let mut out = String::new();
        assert_eq!(t.render(&r, &mut out), Err("site"));
        r.set_tag("site", "x");
        t.render(&r, &mut out).expect("renders");
        assert_eq!(out, "tenant-acme-x");
        assert_eq!(
            Template::parse("plain").expect("parses").as_static(),
            Some("plain")
        );
        assert!(Template::parse("bad{").is_err());
        assert!(Template::parse("bad{}").is_err());
    }

    #[test]
    fn refusal_forms() {
        let lines = ["m a=1i 1", "m a=x 2", "m a=3i 3"];
        let v3 = r#"{"error":"partial write of line protocol occurred","data":[{"original_line":"m a=x 2","line_number":2,"error_message":"invalid column type"}]}"#;
        assert_eq!(
            parse_refusal(v3, &lines),
            Refusal {
                bad: vec![(1, "invalid column type".into())],
                rest_written: true,
                message: "partial write of line protocol occurred".into(),
            }
        );
        let cloud = r#"{"code":"invalid","line":3,"message":"failed to parse line protocol"}"#;
        assert_eq!(
            parse_refusal(cloud, &lines).bad,
            vec![(2, "failed to parse line protocol".into())]
        );
        let oss = r#"{"code":"invalid","message":"unable to parse 'm a=x 2': invalid number"}"#;
        let r = parse_refusal(oss, &lines);
        assert_eq!(r.bad.len(), 1);
        assert_eq!(r.bad[0].0, 1);
        assert!(!r.rest_written);
        let out_of_range = r#"{"code":"invalid","line":9,"message":"?"}"#;
        assert!(parse_refusal(out_of_range, &lines).bad.is_empty());
        assert!(parse_refusal("not json", &lines).bad.is_empty());
    }
}
