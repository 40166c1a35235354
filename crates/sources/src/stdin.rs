//! `stdin` source: newline-delimited payloads from standard input until it closes.

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::decode::{DecodeConfig, Decoder};
use sluice_core::registry::{BuildContext, SourceConfig};
use sluice_core::source::{Source, SourceContext};
use sluice_core::BoxError;

use crate::file::{default_batch_size, read_lines};

/// Reads newline-delimited payloads (JSON lines by default) from standard input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StdinConfig {
    /// How each line is decoded. Default: JSON with `ts` in ms as the event time.
    #[serde(default)]
    pub decode: DecodeConfig,
    /// Lines per batch sent downstream. Default 512.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

#[async_trait]
impl SourceConfig for StdinConfig {
    async fn build(&self, _cx: &BuildContext) -> Result<Box<dyn Source>, BoxError> {
        Ok(Box::new(Stdin {
            decoder: Decoder::new(self.decode.clone())?,
            batch_size: self.batch_size.max(1),
        }))
    }
}

struct Stdin {
    decoder: Decoder,
    batch_size: usize,
}

#[async_trait]
impl Source for Stdin {
    async fn run(self: Box<Self>, cx: SourceContext) -> Result<(), BoxError> {
        let reader = tokio::io::BufReader::new(tokio::io::stdin());
        read_lines(reader, self.decoder, self.batch_size, &cx).await?;
        Ok(())
    }
}
