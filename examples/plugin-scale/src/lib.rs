//! An example Sluice plugin: a custom transform in an ordinary crate.
//!
//! `scale` multiplies one numeric field by a factor and adds an offset (unit conversion:
//! `factor = 1.8, offset = 32` turns Celsius into Fahrenheit). Records without the field, or
//! with a non-numeric value, go to `dead_letter` with the reason.
//!
//! A plugin is three steps: a config struct (serde + JsonSchema, documented fields), a
//! [`Transform`], and one registration line in its own binary (see `src/main.rs`).

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::record::{Batch, Value};
use sluice_core::registry::{BuildContext, Registry, TransformConfig};
use sluice_core::transform::{Transform, TransformOutput};
use sluice_core::BoxError;

/// Multiplies a numeric field by `factor` and adds `offset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleConfig {
    /// The field to scale (required).
    pub field: String,
    /// Multiplier. Default 1.0.
    #[serde(default = "one")]
    pub factor: f64,
    /// Added after multiplying. Default 0.0.
    #[serde(default)]
    pub offset: f64,
}

fn one() -> f64 {
    1.0
}

#[async_trait]
impl TransformConfig for ScaleConfig {
    async fn build(&self, _cx: &BuildContext) -> Result<Box<dyn Transform>, BoxError> {
        if !self.factor.is_finite() || !self.offset.is_finite() {
            return Err("`factor` and `offset` must be finite numbers".into());
        }
        Ok(Box::new(Scale(self.clone())))
    }
}

/// The running transform.
pub struct Scale(ScaleConfig);

impl Transform for Scale {
    fn process(&mut self, batch: Batch, out: &mut TransformOutput) {
        for mut r in batch.records {
            match r.field(&self.0.field).and_then(Value::as_f64) {
                Some(v) => {
                    r.set_field(&self.0.field, Value::F64(v * self.0.factor + self.0.offset));
                    out.push(r);
                }
                None => {
                    let reason =
                        format!("scale: field `{}` is missing or not numeric", self.0.field);
                    out.dead_letter(r, reason);
                }
            }
        }
    }
}

/// Registers this plugin's components.
pub fn register(registry: &mut Registry) {
    registry.transform::<ScaleConfig>("scale");
}
