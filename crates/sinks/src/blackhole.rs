//! `blackhole` sink: counts records and discards them (benchmarks, load tests).

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::ack::BatchStatus;
use sluice_core::registry::{BuildContext, SinkConfig};
use sluice_core::sink::{Sink, SinkContext, SinkInput};
use sluice_core::BoxError;

/// Counts records (metric `records_in`) and discards them, acknowledging each batch at once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlackholeConfig {
    /// Log the total number of records when the sink finishes. Default true.
    #[serde(default = "default_true")]
    pub print_summary: bool,
}

fn default_true() -> bool {
    true
}

#[async_trait]
impl SinkConfig for BlackholeConfig {
    /// Writes or fails; never dead-letters a record.
    fn can_reject(&self) -> bool {
        false
    }

    async fn build(&self, _cx: &BuildContext) -> Result<Box<dyn Sink>, BoxError> {
        Ok(Box::new(Blackhole {
            print_summary: self.print_summary,
        }))
    }
}

struct Blackhole {
    print_summary: bool,
}

#[async_trait]
impl Sink for Blackhole {
    async fn run(self: Box<Self>, mut input: SinkInput, cx: SinkContext) -> Result<(), BoxError> {
        let mut total = 0u64;
        while let Some(mut batch) = input.recv().await {
            total += batch.len() as u64;
            cx.metrics.add_out(batch.len());
            batch.finalize(BatchStatus::Delivered);
        }
        if self.print_summary {
            tracing::info!(sink = %cx.name, records = total, "blackhole finished");
        }
        Ok(())
    }
}
