//! Harnesses that run one source or one sink in-process, for connector tests against real
//! servers: the test plays the rest of the pipeline (it finishes the source's batches with the
//! status it wants, or feeds the sink batches and awaits their statuses).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::ack::BatchStatus;
use crate::channel::{buffer, BufferConfig, Input, Output, Outputs, DEAD_LETTER};
use crate::metrics::{ComponentMetrics, Kind};
use crate::record::{Batch, Record};
use crate::registry::{BuildContext, SinkConfig, SourceConfig};
use crate::sink::{SinkContext, SinkInput};
use crate::source::SourceContext;
use crate::BoxError;

/// A source running in this process; its default and `dead_letter` outputs are readable.
pub struct SourceHarness {
    pub input: Input,
    pub dead: Input,
    pub metrics: Arc<ComponentMetrics>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), String>>,
}

impl SourceHarness {
    /// Builds `config` as component `name` of pipeline `pipeline_id` and starts it.
    pub async fn start(
        config: &dyn SourceConfig,
        name: &str,
        pipeline_id: &str,
    ) -> Result<Self, BoxError> {
        let metrics = Arc::new(ComponentMetrics::new(name, Kind::Source));
        let cap = BufferConfig {
            max_batches: 64,
            ..BufferConfig::default()
        };
        let (edge, input) = buffer(cap, Arc::new(ComponentMetrics::new("out", Kind::Sink)));
        let (dead_edge, dead) = buffer(cap, Arc::new(ComponentMetrics::new("dlq", Kind::Sink)));
        let out = Outputs::new(
            Output::new(vec![edge]),
            HashMap::from([(DEAD_LETTER.to_string(), Output::new(vec![dead_edge]))]),
            metrics.clone(),
        );
        let source = config
            .build(&BuildContext {
                name: name.to_string(),
                pipeline_id: pipeline_id.to_string(),
                state_dir: None,
            })
            .await?;
        let shutdown = CancellationToken::new();
        let cx = SourceContext {
            name: name.to_string(),
            out,
            shutdown: shutdown.clone(),
            metrics: metrics.clone(),
        };
        let task = tokio::spawn(async move { source.run(cx).await.map_err(|e| e.to_string()) });
        Ok(SourceHarness {
            input,
            dead,
            metrics,
            shutdown,
            task,
        })
    }

    /// A component gauge or counter of the source.
    pub fn gauge(&self, name: &'static str) -> i64 {
        self.metrics
            .gauge(name)
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the source task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Takes at least `n` records from the default output (whole batches), finishing each
    /// batch with `status`; stops early when nothing arrives for `idle`.
    pub async fn take(&mut self, n: usize, status: BatchStatus, idle: Duration) -> Vec<Record> {
        let mut out = Vec::with_capacity(n.min(1 << 16));
        while out.len() < n {
            match tokio::time::timeout(idle, self.input.recv()).await {
                Ok(Some(mut b)) => {
                    b.finalize(status);
                    out.extend(b.records);
                }
                Ok(None) | Err(_) => break,
            }
        }
        out
    }

    /// The next batch, unfinished (the caller decides its status), or `None` after `idle`.
    pub async fn next_batch(&mut self, idle: Duration) -> Option<Batch> {
        tokio::time::timeout(idle, self.input.recv())
            .await
            .ok()
            .flatten()
    }

    /// Graceful shutdown; returns the source's result.
    pub async fn stop(self, deadline: Duration) -> Result<(), String> {
        self.shutdown.cancel();
        drop(self.input);
        drop(self.dead);
        match tokio::time::timeout(deadline, self.task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(format!("source task failed: {e}")),
            Err(_) => Err(format!("source did not stop within {deadline:?}")),
        }
    }
}

/// A sink running in this process: send batches to `out`, read its `dead_letter` output.
pub struct SinkHarness {
    pub out: Output,
    pub dead: Input,
    pub metrics: Arc<ComponentMetrics>,
    task: JoinHandle<Result<(), String>>,
}

impl SinkHarness {
    /// Builds `config` as component `name` of pipeline `pipeline_id` and starts it.
    pub async fn start(
        config: &dyn SinkConfig,
        name: &str,
        pipeline_id: &str,
    ) -> Result<Self, BoxError> {
        let metrics = Arc::new(ComponentMetrics::new(name, Kind::Sink));
        let (edge, input) = buffer(BufferConfig::default(), metrics.clone());
        let (dead_edge, dead) = buffer(
            BufferConfig {
                max_batches: 1024,
                ..BufferConfig::default()
            },
            Arc::new(ComponentMetrics::new("dlq", Kind::Sink)),
        );
        let cx = SinkContext {
            name: name.to_string(),
            metrics: metrics.clone(),
            out: Outputs::new(
                Output::default(),
                HashMap::from([(DEAD_LETTER.to_string(), Output::new(vec![dead_edge]))]),
                metrics.clone(),
            ),
        };
        let sink = config
            .build(&BuildContext {
                name: name.to_string(),
                pipeline_id: pipeline_id.to_string(),
                state_dir: None,
            })
            .await?;
        let task = tokio::spawn(async move {
            sink.run(SinkInput::new(input), cx)
                .await
                .map_err(|e| e.to_string())
        });
        Ok(SinkHarness {
            out: Output::new(vec![edge]),
            dead,
            metrics,
            task,
        })
    }

    /// Closes the input and waits for the sink to flush and stop.
    pub async fn stop(self, deadline: Duration) -> Result<(), String> {
        drop(self.out);
        match tokio::time::timeout(deadline, self.task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(format!("sink task failed: {e}")),
            Err(_) => Err(format!("sink did not stop within {deadline:?}")),
        }
    }
}

/// The final status of a batch sent through a harness, or `None` if it did not resolve
/// within `wait`.
pub async fn status_within(rx: crate::ack::StatusReceiver, wait: Duration) -> Option<BatchStatus> {
    tokio::time::timeout(wait, rx).await.ok()
}
