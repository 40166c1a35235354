//! `file` source: reads a file of newline-delimited payloads (JSON lines by default) to its end,
//! then finishes — so a pipeline reading a file runs as a batch job. Also the line reader shared
//! with the `stdin` source.
//!
//! This source does not acknowledge (it keeps no read position): a restart reads the file again.

use std::path::PathBuf;

use async_trait::async_trait;
use bytes::Bytes;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::decode::{DecodeConfig, Decoded, Decoder};
use sluice_core::record::{intern, Meta};
use sluice_core::registry::{BuildContext, SourceConfig};
use sluice_core::source::{Source, SourceContext};
use sluice_core::topology::now_ns;
use sluice_core::BoxError;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Reads newline-delimited payloads from a file until its end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Path of the file to read (required).
    pub path: PathBuf,
    /// How each line is decoded. Default: JSON with `ts` in ms as the event time.
    #[serde(default)]
    pub decode: DecodeConfig,
    /// Lines per batch sent downstream. Default 512.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

pub(crate) fn default_batch_size() -> usize {
    512
}

#[async_trait]
impl SourceConfig for FileSourceConfig {
    async fn build(&self, _cx: &BuildContext) -> Result<Box<dyn Source>, BoxError> {
        let decoder = Decoder::new(self.decode.clone())?;
        // Fail at start-up, with the path, rather than in the running task.
        tokio::fs::metadata(&self.path)
            .await
            .map_err(|e| format!("cannot read `path` {}: {e}", self.path.display()))?;
        Ok(Box::new(FileSource {
            path: self.path.clone(),
            decoder,
            batch_size: self.batch_size.max(1),
        }))
    }
}

struct FileSource {
    path: PathBuf,
    decoder: Decoder,
    batch_size: usize,
}

#[async_trait]
impl Source for FileSource {
    async fn run(self: Box<Self>, cx: SourceContext) -> Result<(), BoxError> {
        let file = tokio::fs::File::open(&self.path)
            .await
            .map_err(|e| format!("cannot open {}: {e}", self.path.display()))?;
        let reader = tokio::io::BufReader::with_capacity(256 * 1024, file);
        let n = read_lines(reader, self.decoder, self.batch_size, &cx).await?;
        tracing::info!(source = %cx.name, path = %self.path.display(), lines = n, "end of file");
        Ok(())
    }
}

/// Reads lines until EOF or shutdown, decoding each and sending them in batches. Empty lines
/// are skipped. Returns the number of lines read.
pub(crate) async fn read_lines<R: AsyncBufRead + Unpin>(
    mut reader: R,
    mut decoder: Decoder,
    batch_size: usize,
    cx: &SourceContext,
) -> Result<u64, BoxError> {
    let source = intern(&cx.name);
    let mut total = 0u64;
    let mut line = Vec::with_capacity(1024);
    let mut decoded = Decoded::with_capacity(batch_size);
    loop {
        line.clear();
        let read = tokio::select! {
            r = reader.read_until(b'\n', &mut line) => r?,
            _ = cx.shutdown.cancelled() => 0,
        };
        if read == 0 {
            break;
        }
        let trimmed = line.trim_ascii_end();
        if trimmed.is_empty() {
            continue;
        }
        total += 1;
        cx.metrics.add_bytes(trimmed.len());
        let meta = Meta {
            source: Some(source.clone()),
            ..Meta::default()
        };
        decoded.push(
            &mut decoder,
            Bytes::copy_from_slice(trimmed),
            None,
            now_ns(),
            meta,
        );
        if decoded.len() >= batch_size {
            std::mem::replace(&mut decoded, Decoded::with_capacity(batch_size))
                .send(&cx.out)
                .await?;
        }
    }
    decoded.send(&cx.out).await?;
    Ok(total)
}
