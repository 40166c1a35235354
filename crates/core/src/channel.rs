//! Bounded edges between components.
//!
//! Every consumer (transform or sink) owns one bounded input channel of batches; each upstream
//! output that feeds it holds a sender. A full channel makes `send` wait (the default,
//! `when_full = "block"`): a slow sink slows its transforms, which slow the source, which stops
//! reading (MQTT stops polling, Kafka stops fetching). With `when_full = "drop_newest"` the batch
//! is dropped instead and counted in the consumer's `dropped` metric.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::ack::BatchStatus;
use crate::config::ByteSize;
use crate::metrics::ComponentMetrics;
use crate::record::Batch;

/// The name of the output every component has besides its named ones.
pub const DEFAULT_OUTPUT: &str = "default";
/// The output that receives records a component could not process.
pub const DEAD_LETTER: &str = "dead_letter";

/// What a full input buffer does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Wait for room: backpressure reaches the source (never loses data).
    #[default]
    Block,
    /// Drop the incoming batch and count it (`dropped` metric); its records count as delivered.
    DropNewest,
}

/// Where a buffer keeps its batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BufferType {
    /// In memory, at most `max_batches` batches (the default). Upstream acknowledgements wait
    /// until the consumer has delivered the records.
    #[default]
    Memory,
    /// On disk, in the pipeline's data directory ([`crate::disk_buffer`]). Records are
    /// acknowledged upstream once durably appended; the buffer keeps each one until the
    /// consumer's outputs resolve it, and replays what is not resolved after a restart.
    Disk,
}

/// Input buffer of a transform or sink:
/// `buffer = { max_batches = 16, when_full = "block" }` or
/// `buffer = { type = "disk", max_size = "2GiB" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// `memory` (default) or `disk`.
    #[serde(default, rename = "type")]
    pub kind: BufferType,
    /// Maximum number of batches waiting in memory (for a disk buffer: read ahead from disk
    /// for the consumer). Default 16.
    #[serde(default = "default_max_batches")]
    pub max_batches: usize,
    /// What to do when the buffer is full: `block` (default) or `drop_newest`.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Disk buffers: the most disk space the buffer's files may take. Default "2GiB".
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
    /// Disk buffers: `fsync` after each group of appended batches before acknowledging them
    /// upstream (default `true`: an acknowledged record survives a power loss). With `false`
    /// the data reaches the OS before the acknowledgement, which survives a crash or
    /// `kill -9` of sluice but not of the machine.
    #[serde(default = "default_fsync")]
    pub fsync: bool,
    /// Disk buffers: how often one record may fail (Errored) while the stage delivers other
    /// records, before the buffer sends it to the stage's `dead_letter` output. A failing
    /// batch is first split in halves to find the record that fails. While the stage
    /// delivers nothing at all (an outage) nothing is counted and replays go on without
    /// limit. Default 10; 0 = replay without limit.
    #[serde(default = "default_max_replays")]
    pub max_replays: u32,
}

fn default_max_batches() -> usize {
    16
}

fn default_max_size() -> ByteSize {
    ByteSize(2 << 30)
}

fn default_fsync() -> bool {
    true
}

fn default_max_replays() -> u32 {
    10
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            kind: BufferType::Memory,
            max_batches: default_max_batches(),
            when_full: WhenFull::Block,
            max_size: default_max_size(),
            fsync: default_fsync(),
            max_replays: default_max_replays(),
        }
    }
}

/// The receiving end of a component's input buffer.
#[derive(Debug)]
pub struct Input {
    rx: mpsc::Receiver<Batch>,
    metrics: Arc<ComponentMetrics>,
    /// Set by a disk buffer that closed the input at shutdown with records still on disk.
    abandoned: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// A disk buffer's way to the consumer's `dead_letter` output, for poison records.
    dead_letter: Option<crate::disk_buffer::PoisonOutputs>,
}

impl Input {
    /// An input fed by `rx` (a disk buffer's reader), counted in `metrics`.
    pub(crate) fn from_receiver(
        rx: mpsc::Receiver<Batch>,
        metrics: Arc<ComponentMetrics>,
        abandoned: Arc<std::sync::atomic::AtomicBool>,
        dead_letter: crate::disk_buffer::PoisonOutputs,
    ) -> Input {
        Input {
            rx,
            metrics,
            abandoned: Some(abandoned),
            dead_letter: Some(dead_letter),
        }
    }

    /// Gives a disk buffer the consumer's outputs: a record that keeps failing while the
    /// consumer delivers others goes to their `dead_letter` output (see
    /// [`BufferConfig::max_replays`]). A memory buffer needs nothing: its source counts.
    pub fn route_poison_to(&self, outputs: &Outputs) {
        if let Some(slot) = &self.dead_letter {
            slot.set(outputs);
        }
    }

    /// Whether the input ended because the pipeline is shutting down while a disk buffer
    /// still holds records for it (they are replayed at the next start). A transform then
    /// drops its open state (windows) instead of flushing it as partial output: the records
    /// it holds are not released and come back.
    pub fn abandoned(&self) -> bool {
        self.abandoned
            .as_ref()
            .is_some_and(|a| a.load(Ordering::Acquire))
    }

    /// Receives the next batch; `None` once every upstream is finished.
    pub async fn recv(&mut self) -> Option<Batch> {
        let batch = self.rx.recv().await?;
        self.metrics.buffered.fetch_sub(1, Ordering::Relaxed);
        self.metrics.add_in(batch.len());
        Some(batch)
    }
}

/// The sending half toward one consumer, as held by one upstream output.
#[derive(Debug, Clone)]
pub struct Edge {
    to: EdgeTo,
    when_full: WhenFull,
    consumer: Arc<ComponentMetrics>,
}

#[derive(Debug, Clone)]
enum EdgeTo {
    /// The consumer's in-memory channel.
    Memory(mpsc::Sender<Batch>),
    /// The consumer's disk buffer.
    Disk(crate::disk_buffer::Appender),
}

/// Creates a consumer's input buffer and the edge upstream outputs send into.
pub fn buffer(config: BufferConfig, consumer: Arc<ComponentMetrics>) -> (Edge, Input) {
    let cap = config.max_batches.max(1);
    consumer.buffer_capacity.store(cap, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(cap);
    (
        Edge {
            to: EdgeTo::Memory(tx),
            when_full: config.when_full,
            consumer: consumer.clone(),
        },
        Input {
            rx,
            metrics: consumer,
            abandoned: None,
            dead_letter: None,
        },
    )
}

impl Edge {
    /// The edge into a disk buffer (see [`crate::disk_buffer::open`]).
    pub(crate) fn disk(
        appender: crate::disk_buffer::Appender,
        consumer: Arc<ComponentMetrics>,
    ) -> Edge {
        Edge {
            to: EdgeTo::Disk(appender),
            when_full: WhenFull::Block,
            consumer,
        }
    }

    async fn send(&self, batch: Batch) -> Result<(), Closed> {
        let tx = match &self.to {
            EdgeTo::Memory(tx) => tx,
            EdgeTo::Disk(appender) => return appender.append(batch).await,
        };
        // Count before sending: the receiver may take the batch (and decrement) immediately.
        self.consumer.buffered.fetch_add(1, Ordering::Relaxed);
        let result = match self.when_full {
            WhenFull::Block => tx.send(batch).await.map_err(|_| Closed),
            WhenFull::DropNewest => match tx.try_send(batch) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(mut b)) => {
                    self.consumer.buffered.fetch_sub(1, Ordering::Relaxed);
                    self.consumer.add_dropped(b.len());
                    b.finalize(BatchStatus::Delivered);
                    return Ok(());
                }
                Err(mpsc::error::TrySendError::Closed(_)) => Err(Closed),
            },
        };
        if result.is_err() {
            self.consumer.buffered.fetch_sub(1, Ordering::Relaxed);
        }
        result
    }
}

/// The downstream consumer went away (it failed or the pipeline is being torn down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("downstream component has shut down")]
pub struct Closed;

/// One named output of a component, fanned out to every consumer that lists it as an input.
#[derive(Debug, Clone, Default)]
pub struct Output {
    edges: Vec<Edge>,
}

impl Output {
    pub fn new(edges: Vec<Edge>) -> Self {
        Output { edges }
    }

    /// Whether any consumer is attached.
    pub fn is_connected(&self) -> bool {
        !self.edges.is_empty()
    }

    /// Sends `batch` to every consumer (cloning it for all but the last), waiting for room.
    /// A batch sent to an output nobody consumes is dropped on purpose: the pipeline file did
    /// not route it anywhere, so its records count as delivered.
    pub async fn send(&self, mut batch: Batch) -> Result<(), Closed> {
        match self.edges.split_last() {
            None => {
                batch.finalize(BatchStatus::Delivered);
                Ok(())
            }
            Some((last, rest)) => {
                for edge in rest {
                    edge.send(batch.clone()).await?;
                }
                last.send(batch).await
            }
        }
    }
}

/// All outputs of one component: the default one and any named ones (`dead_letter`, `late`, …).
#[derive(Debug, Clone)]
pub struct Outputs {
    default: Output,
    named: HashMap<String, Output>,
    metrics: Arc<ComponentMetrics>,
}

impl Outputs {
    pub fn new(
        default: Output,
        named: HashMap<String, Output>,
        metrics: Arc<ComponentMetrics>,
    ) -> Self {
        Outputs {
            default,
            named,
            metrics,
        }
    }

    /// Outputs connected to nothing, with fresh metrics (for tests and benches).
    pub fn disconnected(name: &str) -> Self {
        use crate::metrics::Kind;
        Outputs::new(
            Output::default(),
            HashMap::new(),
            Arc::new(ComponentMetrics::new(name, Kind::Transform)),
        )
    }

    /// Sends a batch to the default output.
    pub async fn send(&self, batch: Batch) -> Result<(), Closed> {
        if batch.is_empty() {
            return Ok(());
        }
        self.metrics.add_out(batch.len());
        self.default.send(batch).await
    }

    /// Sends a batch to the named output. Records sent to `dead_letter` are counted in the
    /// `dead_lettered` metric and marked [`BatchStatus::Rejected`]; when nothing consumes the
    /// dead-letter output they are logged and dropped.
    pub async fn send_to(&self, output: &str, mut batch: Batch) -> Result<(), Closed> {
        if batch.is_empty() {
            return Ok(());
        }
        if output == DEFAULT_OUTPUT {
            return self.send(batch).await;
        }
        if output == DEAD_LETTER {
            self.metrics.add_dead_lettered(batch.len());
            for r in &batch.records {
                r.finalizers.mark(BatchStatus::Rejected);
            }
        } else {
            self.metrics.add_out(batch.len());
        }
        match self.named.get(output) {
            Some(out) if out.is_connected() => out.send(batch).await,
            _ => {
                if output == DEAD_LETTER {
                    for r in &batch.records {
                        tracing::warn!(
                            component = %self.metrics.name,
                            error = r.meta.error.as_deref().unwrap_or("unknown"),
                            "record dead-lettered (no consumer of the dead_letter output)"
                        );
                    }
                }
                // Already marked Rejected above when dead-lettered; worst status wins.
                batch.finalize(BatchStatus::Delivered);
                Ok(())
            }
        }
    }

    /// Whether the named output has at least one consumer.
    pub fn is_connected(&self, output: &str) -> bool {
        if output == DEFAULT_OUTPUT {
            return self.default.is_connected();
        }
        self.named.get(output).is_some_and(Output::is_connected)
    }

    /// The metrics of the component owning these outputs.
    pub fn metrics(&self) -> &Arc<ComponentMetrics> {
        &self.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack;
    use crate::metrics::Kind;
    use crate::record::Record;

    fn consumer(name: &str, config: BufferConfig) -> (Edge, Input, Arc<ComponentMetrics>) {
        let m = Arc::new(ComponentMetrics::new(name, Kind::Sink));
        let (e, i) = buffer(config, m.clone());
        (e, i, m)
    }

    #[tokio::test]
    async fn fan_out_reaches_every_consumer() {
        let (ea, mut ia, _) = consumer("a", BufferConfig::default());
        let (eb, mut ib, _) = consumer("b", BufferConfig::default());
        let out = Output::new(vec![ea, eb]);
        out.send(Batch::new(vec![Record::new(1), Record::new(2)]))
            .await
            .expect("send");
        assert_eq!(ia.recv().await.map(|b| b.len()), Some(2));
        assert_eq!(ib.recv().await.map(|b| b.len()), Some(2));
    }

    #[tokio::test]
    async fn block_waits_for_room() {
        let cfg = BufferConfig {
            max_batches: 1,
            when_full: WhenFull::Block,
            ..BufferConfig::default()
        };
        let (e, mut i, m) = consumer("slow", cfg);
        let out = Output::new(vec![e]);
        out.send(Batch::new(vec![Record::new(1)]))
            .await
            .expect("first");
        let second = out.send(Batch::new(vec![Record::new(2)]));
        tokio::pin!(second);
        // The buffer holds one batch: the second send must not complete until we read.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), &mut second)
                .await
                .is_err()
        );
        assert_eq!(m.buffered.load(Ordering::Relaxed), 2);
        assert!(i.recv().await.is_some());
        second.await.expect("second after room");
        assert!(i.recv().await.is_some());
        assert_eq!(m.buffered.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn drop_newest_counts_and_acks() {
        let cfg = BufferConfig {
            max_batches: 1,
            when_full: WhenFull::DropNewest,
            ..BufferConfig::default()
        };
        let (e, _i, m) = consumer("lossy", cfg);
        let out = Output::new(vec![e]);
        out.send(Batch::new(vec![Record::new(1)]))
            .await
            .expect("first");
        let (f, status) = ack::batch();
        let mut r = Record::new(2);
        r.finalizers = ack::Finalizers::one(f);
        out.send(Batch::new(vec![r, Record::new(3)]))
            .await
            .expect("dropped, not an error");
        assert_eq!(m.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(status.await, BatchStatus::Delivered);
    }

    #[tokio::test]
    async fn unconsumed_default_output_counts_as_delivered() {
        let outputs = Outputs::disconnected("only_dead_letters_routed");
        let (f, status) = ack::batch();
        let mut r = Record::new(1);
        r.finalizers = ack::Finalizers::one(f);
        outputs.send(Batch::new(vec![r])).await.expect("send");
        assert_eq!(status.await, BatchStatus::Delivered);
    }

    #[tokio::test]
    async fn unconsumed_dead_letter_rejects_and_counts() {
        let outputs = Outputs::disconnected("decoder");
        let (f, status) = ack::batch();
        let mut r = Record::new(1);
        r.finalizers = ack::Finalizers::one(f);
        outputs
            .send_to(DEAD_LETTER, Batch::new(vec![r]))
            .await
            .expect("send");
        assert_eq!(status.await, BatchStatus::Rejected);
        assert_eq!(outputs.metrics().dead_lettered.load(Ordering::Relaxed), 1);
    }
}
