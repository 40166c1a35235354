//! Benchmarks and load tools for Sluice live beside this file; see the README section "Benchmarks".
//!
//! Shared by the benches: [`pump`], the producer/consumer pair that measures an edge.

use std::sync::Arc;

use sluice_core::ack::{self, BatchStatus, Finalizers};
use sluice_core::channel::{Edge, Input, Output};
use sluice_core::record::{intern, Batch, Record, Value};

/// Sends `records` records in batches of `batch_size` through `edge` to a consumer on `input`
/// that delivers them, the way an acknowledging source does (one finalizer per batch), and
/// waits for every batch's acknowledgement.
pub async fn pump(edge: Edge, mut input: Input, records: usize, batch_size: usize) {
    let out = Output::new(vec![edge]);
    let consumer = tokio::spawn(async move {
        let mut n = 0usize;
        while let Some(mut batch) = input.recv().await {
            n += batch.len();
            batch.finalize(BatchStatus::Delivered);
        }
        n
    });
    let temp = intern("temp");
    let device = intern("device_id");
    let device_value: Arc<str> = Arc::from("dev-0001");
    let mut pending = Vec::with_capacity(records / batch_size + 1);
    for start in (0..records).step_by(batch_size) {
        let (finalizer, status) = ack::batch();
        let batch = (start..(start + batch_size).min(records))
            .map(|i| {
                let mut r = Record::new(i as i64);
                r.tags.push((device.clone(), device_value.clone()));
                r.fields.push((temp.clone(), Value::F64(21.5)));
                r.finalizers = Finalizers::one(finalizer.clone());
                r
            })
            .collect();
        finalizer.finish(BatchStatus::Delivered);
        out.send(Batch::new(batch)).await.expect("consumer alive");
        pending.push(status);
    }
    drop(out);
    for status in pending {
        assert_eq!(status.await, BatchStatus::Delivered);
    }
    assert_eq!(consumer.await.expect("consumer"), records);
}
