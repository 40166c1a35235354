//! `console` sink: prints records to standard output (debugging, the demo).

use std::io::Write;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::ack::BatchStatus;
use sluice_core::json;
use sluice_core::record::Record;
use sluice_core::registry::{BuildContext, SinkConfig};
use sluice_core::sink::{BatchConfig, Sink, SinkContext, SinkInput};
use sluice_core::BoxError;

/// Output format of the console sink.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleFormat {
    /// One JSON object per line (the record JSON shape).
    #[default]
    Json,
    /// `time tag=… tag=… field=… field=…`, compact and readable.
    Text,
}

/// Prints records to standard output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// `json` (default) or `text`.
    #[serde(default)]
    pub format: ConsoleFormat,
    /// Batching before each write. Default: 1000 records / 10MiB / 1s.
    #[serde(default)]
    pub batch: BatchConfig,
}

#[async_trait]
impl SinkConfig for ConsoleConfig {
    /// Writes or fails; never dead-letters a record.
    fn can_reject(&self) -> bool {
        false
    }

    async fn build(&self, _cx: &BuildContext) -> Result<Box<dyn Sink>, BoxError> {
        Ok(Box::new(Console {
            config: self.clone(),
        }))
    }
}

struct Console {
    config: ConsoleConfig,
}

/// Formats a record as one line of text (without the newline).
pub fn text_line(r: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(json::format_time(r.time).as_bytes());
    for (k, v) in &r.tags {
        let _ = write!(out, " {k}={v}");
    }
    for (k, v) in &r.fields {
        match v {
            sluice_core::Value::Str(s) => {
                let _ = write!(out, " {k}={s:?}");
            }
            other => {
                let _ = write!(out, " {k}={other}");
            }
        }
    }
    if let Some(e) = &r.meta.error {
        let _ = write!(out, " error={e:?}");
        if let Some(p) = &r.payload {
            let _ = write!(out, " payload={:?}", String::from_utf8_lossy(p));
        }
    }
}

#[async_trait]
impl Sink for Console {
    async fn run(self: Box<Self>, mut input: SinkInput, cx: SinkContext) -> Result<(), BoxError> {
        let mut buf = Vec::with_capacity(64 * 1024);
        while let Some(mut batch) = input.next_batch(&self.config.batch).await {
            buf.clear();
            for r in &batch.records {
                match self.config.format {
                    ConsoleFormat::Json => json::write_line(r, &mut buf),
                    ConsoleFormat::Text => {
                        text_line(r, &mut buf);
                        buf.push(b'\n');
                    }
                }
            }
            let result = {
                let mut out = std::io::stdout().lock();
                out.write_all(&buf).and_then(|_| out.flush())
            };
            match result {
                Ok(()) => {
                    cx.metrics.add_out(batch.len());
                    cx.metrics.add_bytes(buf.len());
                    batch.finalize(BatchStatus::Delivered);
                }
                // Stdout closed (e.g. piped into `head`): nothing more can be printed.
                Err(e) => {
                    batch.finalize(BatchStatus::Errored);
                    return Err(format!("cannot write to stdout: {e}").into());
                }
            }
        }
        Ok(())
    }
}
