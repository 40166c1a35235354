//! The `Sink` trait: where records leave a pipeline.
//!
//! A sink is an async task that reads its [`SinkInput`] until it closes, groups records with
//! [`SinkInput::next_batch`] (max records / max bytes / max age), writes them and then reports
//! each batch's status with [`Batch::finalize`]: `Delivered` once durably written, `Errored` on
//! a transient failure it gave up on (the source will redeliver). Records the destination refuses
//! permanently go to [`SinkContext::reject`] (the sink's `dead_letter` output). When the input
//! closes `next_batch` returns what is left, so a sink flushes on shutdown by construction.
//!
//! ```
//! use async_trait::async_trait;
//! use sluice_core::ack::BatchStatus;
//! use sluice_core::sink::{BatchConfig, Sink, SinkContext, SinkInput};
//! use sluice_core::BoxError;
//!
//! /// Counts records and prints the total at the end.
//! struct Count { batch: BatchConfig }
//!
//! #[async_trait]
//! impl Sink for Count {
//!     async fn run(self: Box<Self>, mut input: SinkInput, cx: SinkContext) -> Result<(), BoxError> {
//!         let mut total = 0;
//!         while let Some(mut batch) = input.next_batch(&self.batch).await {
//!             total += batch.len();
//!             cx.metrics.add_out(batch.len());
//!             batch.finalize(BatchStatus::Delivered);
//!         }
//!         println!("{total} records");
//!         Ok(())
//!     }
//! }
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::ack::BatchStatus;
use crate::channel::{Input, Outputs, DEAD_LETTER};
use crate::config::{ByteSize, HumanDuration};
use crate::metrics::ComponentMetrics;
use crate::record::{Batch, Record};
use crate::BoxError;

/// A sink of records. See the [module docs](self).
#[async_trait]
pub trait Sink: Send {
    /// Consumes `input` until it closes, reporting every batch's status.
    async fn run(self: Box<Self>, input: SinkInput, cx: SinkContext) -> Result<(), BoxError>;
}

/// What a running sink gets from the topology besides its input.
pub struct SinkContext {
    /// The component's name in the pipeline file.
    pub name: String,
    /// This component's metrics.
    pub metrics: Arc<ComponentMetrics>,
    /// The sink's outputs: only `dead_letter` is meaningful.
    pub out: Outputs,
}

impl SinkContext {
    /// Sends permanently refused records to this sink's `dead_letter` output with `reason`,
    /// marking them `Rejected` (final: the source acknowledges them).
    pub async fn reject(&self, records: Vec<Record>, reason: &str) {
        let reason: Arc<str> = Arc::from(reason);
        self.metrics.add_errors(records.len());
        let records = records
            .into_iter()
            .map(|mut r| {
                r.meta.error = Some(reason.clone());
                r
            })
            .collect::<Vec<_>>();
        if let Err(closed) = self.out.send_to(DEAD_LETTER, Batch::new(records)).await {
            // The dead-letter consumer is gone (pipeline torn down): the records' finalizers
            // were dropped with the failed send, already marked Rejected.
            tracing::warn!(sink = %self.name, error = %closed, "dead-letter output closed");
        }
    }
}

/// How a sink groups records before writing (`batch = { max_records = 1000, … }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Write when this many records are waiting. Default 1000.
    #[serde(default = "default_max_records")]
    pub max_records: usize,
    /// Write when the records' estimated size reaches this. Default "10MiB".
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Write at most this long after the first waiting record arrived. Default "1s".
    #[serde(default = "default_max_age")]
    pub max_age: HumanDuration,
}

fn default_max_records() -> usize {
    1000
}
fn default_max_bytes() -> ByteSize {
    ByteSize(10 * 1024 * 1024)
}
fn default_max_age() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: default_max_records(),
            max_bytes: default_max_bytes(),
            max_age: default_max_age(),
        }
    }
}

/// A sink's input with batching.
#[derive(Debug)]
pub struct SinkInput {
    input: Input,
    carry: Vec<Record>,
    closed: bool,
}

impl SinkInput {
    pub fn new(input: Input) -> Self {
        SinkInput {
            input,
            carry: Vec::new(),
            closed: false,
        }
    }

    /// The next batch as it arrived from upstream (no regrouping); `None` at end of input.
    pub async fn recv(&mut self) -> Option<Batch> {
        if !self.carry.is_empty() {
            return Some(Batch::new(std::mem::take(&mut self.carry)));
        }
        if self.closed {
            return None;
        }
        let b = self.input.recv().await;
        self.closed = b.is_none();
        b
    }

    /// Waits until `config.max_records` records or `config.max_bytes` bytes are waiting, or
    /// `config.max_age` passed since the first of them arrived, and returns them (never more
    /// than `max_records`). At end of input it returns what is left, then `None`.
    pub async fn next_batch(&mut self, config: &BatchConfig) -> Option<Batch> {
        let max_records = config.max_records.max(1);
        let mut records = std::mem::take(&mut self.carry);
        let mut bytes: usize = records.iter().map(Record::size_hint).sum();
        let mut deadline: Option<Instant> = None;
        loop {
            if records.len() >= max_records || bytes >= config.max_bytes.0 as usize {
                break;
            }
            if self.closed {
                break;
            }
            let next = if records.is_empty() {
                self.input.recv().await
            } else {
                let at = *deadline.get_or_insert_with(|| Instant::now() + config.max_age.0);
                match tokio::time::timeout_at(at, self.input.recv()).await {
                    Ok(next) => next,
                    Err(_elapsed) => break,
                }
            };
            match next {
                Some(batch) => {
                    bytes += batch.size_hint();
                    if records.is_empty() {
                        records = batch.records;
                    } else {
                        records.extend(batch.records);
                    }
                }
                None => self.closed = true,
            }
        }
        if records.len() > max_records {
            self.carry = records.split_off(max_records);
        }
        if records.is_empty() {
            None
        } else {
            Some(Batch::new(records))
        }
    }
}

/// Marks a written batch: `Delivered` on success, `Errored` (redeliver) on failure, and counts
/// it in the sink's metrics.
pub fn finish(metrics: &ComponentMetrics, batch: &mut Batch, result: Result<(), &BoxError>) {
    match result {
        Ok(()) => {
            metrics.add_out(batch.len());
            batch.finalize(BatchStatus::Delivered);
        }
        Err(e) => {
            metrics.add_errors(batch.len());
            tracing::error!(sink = %metrics.name, error = %e, records = batch.len(), "write failed; records will be redelivered");
            batch.finalize(BatchStatus::Errored);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{buffer, BufferConfig, Output};
    use crate::metrics::Kind;

    fn input() -> (Output, SinkInput) {
        let m = Arc::new(ComponentMetrics::new("s", Kind::Sink));
        let (edge, input) = buffer(BufferConfig::default(), m);
        (Output::new(vec![edge]), SinkInput::new(input))
    }

    fn batch(n: usize) -> Batch {
        Batch::new((0..n as i64).map(Record::new).collect())
    }

    #[tokio::test]
    async fn splits_at_max_records_and_flushes_rest_on_close() {
        let (out, mut input) = input();
        out.send(batch(25)).await.expect("send");
        drop(out);
        let cfg = BatchConfig {
            max_records: 10,
            ..Default::default()
        };
        let sizes: Vec<usize> = {
            let mut v = vec![];
            while let Some(b) = input.next_batch(&cfg).await {
                v.push(b.len());
            }
            v
        };
        assert_eq!(sizes, vec![10, 10, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn max_age_bounds_the_wait() {
        let (out, mut input) = input();
        out.send(batch(3)).await.expect("send");
        let cfg = BatchConfig {
            max_records: 100,
            max_age: HumanDuration(Duration::from_millis(200)),
            ..Default::default()
        };
        let started = Instant::now();
        let b = input.next_batch(&cfg).await.expect("batch");
        assert_eq!(b.len(), 3);
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(out);
        assert!(input.next_batch(&cfg).await.is_none());
    }

    #[tokio::test]
    async fn max_bytes_cuts_early() {
        let (out, mut input) = input();
        out.send(batch(4)).await.expect("send");
        out.send(batch(4)).await.expect("send");
        let cfg = BatchConfig {
            max_records: 100,
            max_bytes: ByteSize(1),
            max_age: HumanDuration(Duration::from_secs(3600)),
        };
        assert_eq!(input.next_batch(&cfg).await.map(|b| b.len()), Some(4));
    }
}
