//! `file` sink: appends records as JSON lines (the record JSON shape, see
//! `sluice_core::json`) to a local file. A batch is acknowledged once it is written and, with
//! `fsync = true` (default), flushed to disk.

use std::path::PathBuf;
use std::time::Instant;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::config::HumanDuration;
use sluice_core::json;
use sluice_core::registry::{BuildContext, SinkConfig};
use sluice_core::sink::{finish, BatchConfig, Sink, SinkContext, SinkInput};
use sluice_core::BoxError;
use tokio::io::AsyncWriteExt;

/// Appends records as JSON lines to a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Path of the file (created with its parent directories; appended to). Required.
    pub path: PathBuf,
    /// Flush each batch to disk (fsync) before acknowledging it. Default true.
    #[serde(default = "default_true")]
    pub fsync: bool,
    /// Wait this long before each write: simulates a slow destination (testing backpressure
    /// and crash recovery). Default: none.
    #[serde(default)]
    pub write_delay: Option<HumanDuration>,
    /// Batching before each write. Default: 1000 records / 10MiB / 1s.
    #[serde(default)]
    pub batch: BatchConfig,
}

fn default_true() -> bool {
    true
}

#[async_trait]
impl SinkConfig for FileSinkConfig {
    /// Writes or fails; never dead-letters a record.
    fn can_reject(&self) -> bool {
        false
    }

    async fn build(&self, _cx: &BuildContext) -> Result<Box<dyn Sink>, BoxError> {
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| format!("cannot create directory {}: {e}", parent.display()))?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await
            .map_err(|e| format!("cannot open `path` {}: {e}", self.path.display()))?;
        Ok(Box::new(FileSink {
            config: self.clone(),
            file,
        }))
    }
}

struct FileSink {
    config: FileSinkConfig,
    file: tokio::fs::File,
}

impl FileSink {
    async fn write(&mut self, buf: &[u8]) -> Result<(), BoxError> {
        self.file.write_all(buf).await?;
        self.file.flush().await?;
        if self.config.fsync {
            self.file.sync_data().await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for FileSink {
    async fn run(
        mut self: Box<Self>,
        mut input: SinkInput,
        cx: SinkContext,
    ) -> Result<(), BoxError> {
        let mut buf = Vec::with_capacity(256 * 1024);
        let batch_config = self.config.batch;
        while let Some(mut batch) = input.next_batch(&batch_config).await {
            if let Some(d) = self.config.write_delay {
                tokio::time::sleep(d.0).await;
            }
            buf.clear();
            for r in &batch.records {
                json::write_line(r, &mut buf);
            }
            let started = Instant::now();
            let result = self.write(&buf).await;
            cx.metrics.observe_latency(started.elapsed());
            if result.is_ok() {
                cx.metrics.add_bytes(buf.len());
            }
            finish(&cx.metrics, &mut batch, result.as_ref().map(|_| ()));
            if let Err(e) = result {
                return Err(format!("cannot write {}: {e}", self.config.path.display()).into());
            }
        }
        Ok(())
    }
}
