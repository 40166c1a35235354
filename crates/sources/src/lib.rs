//! Sluice sources: one module per source type. [`register`] adds them all to a registry.

pub mod file;
pub mod kafka;
pub mod kinesis;
pub mod mqtt;
pub mod redelivery;
pub mod simulator;
pub mod sqs;
pub mod stdin;

use sluice_core::registry::Registry;

/// Registers every source type of this crate.
pub fn register(registry: &mut Registry) {
    registry
        .source::<simulator::SimulatorConfig>("simulator")
        .source::<file::FileSourceConfig>("file")
        .source::<stdin::StdinConfig>("stdin")
        .source::<mqtt::MqttSourceConfig>("mqtt")
        .source::<sqs::SqsConfig>("sqs")
        .source::<kafka::KafkaSourceConfig>("kafka")
        .source::<kinesis::KinesisConfig>("kinesis");
}
