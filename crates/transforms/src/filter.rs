//! `filter` transform: keeps the records for which a condition holds.
//!
//! ```toml
//! [transforms.hot]
//! type = "filter"
//! inputs = ["sim"]
//! condition = 'temp > 30 && tags.site == "a"'
//! ```
//!
//! Records that do not match are discarded (acknowledged as delivered). Records on which the
//! condition cannot be evaluated (a field it names is missing, a type mismatch) go to
//! `dead_letter` with the error. The language is described in [`crate::expression`].

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::record::Batch;
use sluice_core::registry::{BuildContext, TransformConfig};
use sluice_core::transform::{Transform, TransformOutput};
use sluice_core::BoxError;

use crate::expression::Expression;
use crate::Error;

/// Keeps the records for which `condition` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// CEL condition, e.g. `temp > 30 && tags.site == "a"`. Fields are variables, tags are in
    /// `tags`, all fields in `fields`, event time (ns) in `time`. Required.
    pub condition: String,
}

#[async_trait]
impl TransformConfig for FilterConfig {
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Transform>, BoxError> {
        let condition = Expression::compile(&self.condition)
            .map_err(|e| Error::option(cx, "condition", format!("{:?}: {e}", self.condition)))?;
        Ok(Box::new(Filter { condition }))
    }
}

/// The running `filter`.
#[derive(Debug)]
pub struct Filter {
    condition: Expression,
}

impl Transform for Filter {
    fn process(&mut self, batch: Batch, out: &mut TransformOutput) {
        for r in batch.records {
            match self.condition.eval_bool(&r) {
                Ok(true) => out.push(r),
                Ok(false) => r.discard(),
                Err(e) => {
                    let reason = format!("filter: condition `{}`: {e}", self.condition.source());
                    out.dead_letter(r, reason);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_core::ack::{self, BatchStatus};
    use sluice_core::record::{Record, Value};

    use super::*;
    use crate::testing::{cx, rec, take};

    async fn build(condition: &str) -> Result<Box<dyn Transform>, BoxError> {
        FilterConfig {
            condition: condition.into(),
        }
        .build(&cx())
        .await
    }

    #[tokio::test]
    async fn keeps_matches_discards_others_and_dead_letters_errors() {
        let mut f = build("temp > 30").await.expect("builds");
        let (fin, status) = ack::batch();
        let mut dropped = rec(0.0, "a", &[("temp", Value::F64(10.0))]);
        dropped.finalizers.push(fin);
        let batch = vec![
            rec(0.0, "a", &[("temp", Value::F64(31.0))]),
            dropped,
            rec(0.0, "a", &[("humidity", Value::F64(50.0))]),
            rec(0.0, "a", &[("temp", Value::from("hot"))]),
        ];
        let mut out = TransformOutput::default();
        f.process(Batch::new(batch), &mut out);
        let kept = take(&mut out, "default");
        let dead = take(&mut out, "dead_letter");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].field("temp"), Some(&Value::F64(31.0)));
        assert_eq!(dead.len(), 2, "missing field and type mismatch");
        let reason = dead[0].meta.error.as_deref().expect("a reason");
        assert!(
            reason.contains("temp > 30") && reason.contains("temp"),
            "{reason}"
        );
        // The filtered-out record was acknowledged as delivered, not errored.
        assert_eq!(status.await, BatchStatus::Delivered);
    }

    #[tokio::test]
    async fn invalid_condition_fails_the_build_with_the_option_name() {
        let Err(err) = build("temp >").await else {
            panic!("a syntax error must fail the build");
        };
        let err = err.to_string();
        assert!(
            err.contains("transforms.t") && err.contains("`condition`"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn empty_batch_emits_nothing() {
        let mut f = build("true").await.expect("builds");
        let mut out = TransformOutput::default();
        f.process(Batch::new(Vec::<Record>::new()), &mut out);
        assert!(out.is_empty());
    }
}
