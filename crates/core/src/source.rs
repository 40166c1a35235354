//! The `Source` trait: where records enter a pipeline.
//!
//! A source is an async task that reads from the outside world and pushes [`Batch`]es into its
//! [`Outputs`] until [`SourceContext::shutdown`] fires or its input is exhausted. Sending waits
//! when downstream is full: that wait *is* the backpressure, so a source must not buffer around
//! it (stop reading instead).
//!
//! A source that can acknowledge (`can_acknowledge() == true`) attaches a
//! [`Finalizer`](crate::ack::Finalizer) from [`ack::batch`](crate::ack::batch) to each record of a
//! batch and acknowledges upstream only when the batch's status resolves. On shutdown it drops its
//! outputs first (so that downstream drains and flushes) and keeps serving acknowledgements until
//! every pending batch has resolved.
//!
//! ```
//! use async_trait::async_trait;
//! use sluice_core::record::{Batch, Record, Value};
//! use sluice_core::source::{Source, SourceContext};
//! use sluice_core::BoxError;
//!
//! /// Emits `n` records with a counter field, then stops (a finite source).
//! struct Counter { n: i64 }
//!
//! #[async_trait]
//! impl Source for Counter {
//!     async fn run(self: Box<Self>, cx: SourceContext) -> Result<(), BoxError> {
//!         for chunk in (0..self.n).collect::<Vec<_>>().chunks(256) {
//!             if cx.shutdown.is_cancelled() { break; }
//!             let records = chunk.iter().map(|i| {
//!                 let mut r = Record::new(*i);
//!                 r.set_field("n", Value::I64(*i));
//!                 r
//!             }).collect();
//!             cx.out.send(Batch::new(records)).await?;
//!         }
//!         Ok(())
//!     }
//! }
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::channel::Outputs;
use crate::metrics::ComponentMetrics;
use crate::BoxError;

/// What a running source gets from the topology.
pub struct SourceContext {
    /// The component's name in the pipeline file.
    pub name: String,
    /// Where to send batches: `out.send(batch)` for the default output,
    /// `out.send_to("dead_letter", batch)` for records that could not be decoded.
    pub out: Outputs,
    /// Fires when the pipeline shuts down: stop reading, drop `out`, finish acknowledgements.
    pub shutdown: CancellationToken,
    /// This component's metrics.
    pub metrics: Arc<ComponentMetrics>,
}

/// A source of records. See the [module docs](self).
#[async_trait]
pub trait Source: Send {
    /// Whether this source acknowledges records upstream after delivery.
    fn can_acknowledge(&self) -> bool {
        false
    }

    /// Reads until shutdown (or end of input) and sends batches to `cx.out`.
    async fn run(self: Box<Self>, cx: SourceContext) -> Result<(), BoxError>;
}
