//! Sluice sinks: one module per sink type. [`register`] adds them all to a registry.

pub mod blackhole;
pub mod console;
pub mod file;
pub mod mqtt;
pub mod parquet;
pub mod s3;

use sluice_core::registry::Registry;

/// Registers every sink type of this crate.
pub fn register(registry: &mut Registry) {
    registry
        .sink::<console::ConsoleConfig>("console")
        .sink::<file::FileSinkConfig>("file")
        .sink::<blackhole::BlackholeConfig>("blackhole")
        .sink::<parquet::ParquetSinkConfig>("parquet")
        .sink::<mqtt::MqttSinkConfig>("mqtt");
}
