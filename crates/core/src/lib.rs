//! # sluice-core
//!
//! The runtime every Sluice component plugs into:
//!
//! * [`record`]: the [`Record`](record::Record) model and [`Batch`](record::Batch)es;
//! * [`ack`]: end-to-end acknowledgements ([`Finalizer`](ack::Finalizer), ordered release);
//! * [`source`], [`transform`], [`sink`]: the component traits (the plugin API);
//! * [`channel`]: bounded edges with backpressure; [`disk_buffer`]: durable edges;
//! * [`config`], [`registry`], [`topology`]: pipeline files → validated plan → running tasks;
//! * [`decode`], [`topic`], [`json`]: payload decoding shared by sources, the record JSON shape;
//! * [`metrics`]: per-component counters, Prometheus text and the rate line.

pub mod ack;
pub mod channel;
pub mod config;
pub mod decode;
pub mod disk_buffer;
pub mod json;
pub mod line_protocol;
pub mod metrics;
pub mod record;
pub mod registry;
pub mod sink;
pub mod source;
pub mod testing;
pub mod topic;
pub mod topology;
pub mod transform;

/// The error type components return from `run` and `build`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub use record::{Batch, Record, Value};
