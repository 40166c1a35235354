//! Sluice sinks: one module per sink type. [`register`] adds them all to a registry.

pub mod blackhole;
pub mod console;
pub mod dynamodb;
pub mod encoding;
pub mod file;
pub mod influxdb;
pub mod kafka;
pub mod kafka_testing;
pub mod line_protocol;
pub mod mqtt;
pub mod parquet;
pub mod postgres;
pub mod retry;
pub mod s3;
pub mod timestream;

use sluice_core::registry::Registry;

/// Registers every sink type of this crate.
pub fn register(registry: &mut Registry) {
    registry
        .sink::<console::ConsoleConfig>("console")
        .sink::<file::FileSinkConfig>("file")
        .sink::<blackhole::BlackholeConfig>("blackhole")
        .sink::<parquet::ParquetSinkConfig>("parquet")
        .sink::<influxdb::InfluxDbConfig>("influxdb")
        .sink::<timestream::TimestreamConfig>("timestream")
        .sink::<dynamodb::DynamoDbConfig>("dynamodb")
        .sink::<mqtt::MqttSinkConfig>("mqtt")
        .sink::<kafka::KafkaSinkConfig>("kafka")
        .sink::<postgres::PostgresConfig>("postgres");
}
