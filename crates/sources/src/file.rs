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
use sluice_core::config::ByteSize;
use sluice_core::decode::{DecodeConfig, DecodeError, Decoded, Decoder};
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
    /// How each line is decoded. Default: JSON with `ts` in ms as the event time. A line
    /// longer than `decode.max_payload` (default "1MiB") is skipped to its newline without
    /// being held in memory, and its first `max_payload` bytes go to `dead_letter`.
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

/// How [`read_line_bounded`] ended.
#[derive(Debug, PartialEq)]
enum LineRead {
    Eof,
    /// A whole line (with its newline, if any) is in the buffer.
    Line,
    /// The line had `len` bytes (newline included); only its first bytes are in the buffer.
    TooLong {
        len: u64,
    },
}

/// Reads one line into `line` (cleared first), holding at most `limit` bytes of it: the rest
/// of an over-long line is read and dropped up to its newline, so one line without a newline
/// in a huge file cannot take all the memory (as `read_until` would).
async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<LineRead> {
    line.clear();
    let mut len = 0u64;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            break;
        }
        let newline = buf.iter().position(|&b| b == b'\n');
        let chunk = &buf[..newline.map_or(buf.len(), |i| i + 1)];
        let room = limit.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let n = chunk.len();
        len += n as u64;
        reader.consume(n);
        if newline.is_some() {
            break;
        }
    }
    Ok(if len == 0 {
        LineRead::Eof
    } else if len > line.len() as u64 {
        LineRead::TooLong { len }
    } else {
        LineRead::Line
    })
}

/// Reads lines until EOF or shutdown, decoding each and sending them in batches. Empty lines
/// are skipped; a line longer than the decoder's `max_payload` is dead-lettered (its first
/// `max_payload` bytes) without being held whole. Returns the number of lines read.
pub(crate) async fn read_lines<R: AsyncBufRead + Unpin>(
    mut reader: R,
    mut decoder: Decoder,
    batch_size: usize,
    cx: &SourceContext,
) -> Result<u64, BoxError> {
    let source = intern(&cx.name);
    let max_payload = usize::try_from(decoder.max_payload()).unwrap_or(usize::MAX);
    // Two more bytes for a line's "\r\n", which is trimmed before decoding.
    let limit = max_payload.saturating_add(2);
    let mut total = 0u64;
    let mut line = Vec::with_capacity(1024);
    let mut decoded = Decoded::with_capacity(batch_size);
    loop {
        let read = tokio::select! {
            r = read_line_bounded(&mut reader, &mut line, limit) => r?,
            _ = cx.shutdown.cancelled() => LineRead::Eof,
        };
        let meta = Meta {
            source: Some(source.clone()),
            ..Meta::default()
        };
        match read {
            LineRead::Eof => break,
            LineRead::TooLong { len } => {
                total += 1;
                cx.metrics
                    .add_bytes(usize::try_from(len).unwrap_or(usize::MAX));
                line.truncate(max_payload);
                let error = DecodeError(format!(
                    "line of {len} bytes exceeds max_payload ({}); skipped to its end, the \
                     first {max_payload} bytes are kept here",
                    ByteSize(max_payload as u64)
                ));
                let payload = Bytes::copy_from_slice(&line);
                decoded
                    .dead
                    .push(Decoder::dead_letter(payload, now_ns(), meta, &error));
            }
            LineRead::Line => {
                let trimmed = line.trim_ascii_end();
                if trimmed.is_empty() {
                    continue;
                }
                total += 1;
                cx.metrics.add_bytes(trimmed.len());
                decoded.push(
                    &mut decoder,
                    Bytes::copy_from_slice(trimmed),
                    None,
                    now_ns(),
                    meta,
                );
            }
        }
        if decoded.len() >= batch_size {
            std::mem::replace(&mut decoded, Decoded::with_capacity(batch_size))
                .send(&cx.out)
                .await?;
        }
    }
    decoded.send(&cx.out).await?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sluice_core::ack::BatchStatus;
    use sluice_core::testing::SourceHarness;

    use super::*;

    #[tokio::test]
    async fn bounded_reads_drop_the_rest_of_a_long_line() {
        let text = format!("{}\nshort\nlast", "x".repeat(100));
        let mut reader = tokio::io::BufReader::with_capacity(16, text.as_bytes());
        let mut line = Vec::new();
        let read = read_line_bounded(&mut reader, &mut line, 10).await;
        assert_eq!(read.ok(), Some(LineRead::TooLong { len: 101 }));
        assert_eq!(line.len(), 10);
        let read = read_line_bounded(&mut reader, &mut line, 10).await;
        assert_eq!(read.ok(), Some(LineRead::Line));
        assert_eq!(line, b"short\n");
        let read = read_line_bounded(&mut reader, &mut line, 10).await;
        assert_eq!(read.ok(), Some(LineRead::Line));
        assert_eq!(line, b"last");
        let read = read_line_bounded(&mut reader, &mut line, 10).await;
        assert_eq!(read.ok(), Some(LineRead::Eof));
    }

    #[tokio::test]
    async fn a_line_over_max_payload_is_dead_lettered_and_the_next_arrives() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("in.jsonl");
        let long = format!("{{\"ts\": 1, \"pad\": \"{}\"}}", "x".repeat(10_000));
        std::fs::write(&path, format!("{long}\n{{\"ts\": 2, \"v\": 1}}\n")).expect("write");
        let config = FileSourceConfig {
            path,
            decode: DecodeConfig {
                max_payload: ByteSize(1024),
                ..DecodeConfig::default()
            },
            batch_size: 1,
        };
        let mut h = SourceHarness::start(&config, "file", "t")
            .await
            .expect("source starts");
        let idle = Duration::from_secs(5);
        let good = h.take(1, BatchStatus::Delivered, idle).await;
        assert_eq!(good.len(), 1);
        assert_eq!(good[0].time, 2_000_000);
        let mut dead = tokio::time::timeout(idle, h.dead.recv())
            .await
            .ok()
            .flatten()
            .expect("a dead letter");
        dead.finalize(BatchStatus::Delivered);
        let r = &dead.records[0];
        assert_eq!(r.payload.as_ref().map(|p| p.len()), Some(1024));
        let error = r.meta.error.as_deref().unwrap_or("");
        assert!(error.contains("exceeds max_payload"), "{error}");
        // Counted as a decode error, like any other payload that cannot be decoded.
        assert_eq!(
            h.metrics.errors.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        h.stop(idle).await.expect("stops");
    }
}
