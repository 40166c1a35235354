//! `remap` transform: rename, drop, set, cast and compute fields and tags; set the event time.
//!
//! ```toml
//! [transforms.clean]
//! type = "remap"
//! inputs = ["sim"]
//! rename_fields = { temp = "temperature_c" }
//! cast = { seq = "int" }
//! compute = { temperature_f = "temperature_c * 9.0 / 5.0 + 32.0" }
//! set_tags = { site = "plant-1" }
//! drop_fields = ["device_status"]
//! time_from = { field = "sampled_at", unit = "ms" }
//! ```
//!
//! The steps always run in this order: rename, cast, compute, set, drop, time. A record on which
//! a step fails (a field to cast or compute from is missing, a value that does not convert, a
//! time that is not a time) goes to `dead_letter` with the reason, unchanged.

use std::sync::Arc;

use async_trait::async_trait;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::record::{intern, Batch, Name, Record, Value};
use sluice_core::registry::{BuildContext, TransformConfig};
use sluice_core::transform::{Transform, TransformOutput};
use sluice_core::BoxError;

use crate::expression::Expression;
use crate::Error;

/// A constant written in the pipeline file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Literal {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl Literal {
    fn value(&self) -> Value {
        match self {
            Literal::Bool(b) => Value::Bool(*b),
            Literal::Int(i) => Value::I64(*i),
            Literal::Float(f) => Value::F64(*f),
            Literal::Str(s) => Value::Str(Arc::from(s.as_str())),
        }
    }
}

/// Target type of a cast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CastType {
    /// Integers; floats are rounded to the nearest integer, strings parsed.
    Int,
    /// Floats; strings parsed.
    Float,
    /// Booleans from true/false, 1/0, "true"/"false"/"1"/"0".
    Bool,
    /// The value's text.
    String,
}

/// Unit of a numeric time field, or `rfc3339` for text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    S,
    #[default]
    Ms,
    Us,
    Ns,
    Rfc3339,
}

/// Where the event time comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeFrom {
    /// Field holding the time. Required.
    pub field: String,
    /// "s", "ms", "us", "ns" for numbers or "rfc3339" for text. Default "ms".
    #[serde(default)]
    pub unit: TimeFormat,
    /// Keep the field after setting the time. Default false.
    #[serde(default)]
    pub keep: bool,
}

/// Rename, drop, set, cast and compute fields and tags; set the event time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemapConfig {
    /// Old field name → new name. A missing field is skipped. Default {}.
    #[serde(default)]
    pub rename_fields: IndexMap<String, String>,
    /// Old tag name → new name. A missing tag is skipped. Default {}.
    #[serde(default)]
    pub rename_tags: IndexMap<String, String>,
    /// Field → type ("int", "float", "bool", "string"). A missing field is an error. Default {}.
    #[serde(default)]
    pub cast: IndexMap<String, CastType>,
    /// Field → CEL expression computing it from the record, e.g. `"temp * 9.0 / 5.0 + 32.0"`.
    /// Default {}.
    #[serde(default)]
    pub compute: IndexMap<String, String>,
    /// Field → constant. Default {}.
    #[serde(default)]
    pub set_fields: IndexMap<String, Literal>,
    /// Tag → constant string. Default {}.
    #[serde(default)]
    pub set_tags: IndexMap<String, String>,
    /// Fields to remove. Default [].
    #[serde(default)]
    pub drop_fields: Vec<String>,
    /// Tags to remove. Default [].
    #[serde(default)]
    pub drop_tags: Vec<String>,
    /// Set the event time from a field, e.g. `{ field = "sampled_at", unit = "s" }`.
    /// Default: keep the time.
    #[serde(default)]
    pub time_from: Option<TimeFrom>,
}

#[async_trait]
impl TransformConfig for RemapConfig {
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Transform>, BoxError> {
        Ok(Box::new(Remap::new(self, cx)?))
    }
}

/// The running `remap`.
#[derive(Debug)]
pub struct Remap {
    config: RemapConfig,
    compute: Vec<(Name, Expression)>,
}

impl Remap {
    pub fn new(config: &RemapConfig, cx: &BuildContext) -> Result<Self, Error> {
        let mut compute = Vec::new();
        for (field, src) in &config.compute {
            let e = Expression::compile(src).map_err(|e| {
                Error::option(cx, format!("compute.{field}"), format!("{src:?}: {e}"))
            })?;
            compute.push((intern(field), e));
        }
        if let Some(Literal::Float(f)) = config
            .set_fields
            .values()
            .find(|l| matches!(l, Literal::Float(f) if !f.is_finite()))
        {
            return Err(Error::option(
                cx,
                "set_fields",
                format!("{f} is not a finite number"),
            ));
        }
        Ok(Remap {
            config: config.clone(),
            compute,
        })
    }

    fn apply(&self, r: &mut Record) -> Result<(), String> {
        let c = &self.config;
        for (from, to) in &c.rename_fields {
            if let Some(v) = r.remove_field(from) {
                r.set_field(to, v);
            }
        }
        for (from, to) in &c.rename_tags {
            if let Some(v) = r.remove_tag(from) {
                r.set_tag(to, v);
            }
        }
        for (field, ty) in &c.cast {
            let v = r
                .field(field)
                .ok_or_else(|| format!("cast: field `{field}` missing"))?;
            let cast = cast(v, *ty).map_err(|e| format!("cast: field `{field}`: {e}"))?;
            r.set_field(field, cast);
        }
        for (field, e) in &self.compute {
            let v = e
                .eval(r)
                .map_err(|err| format!("compute `{field}` = `{}`: {err}", e.source()))?;
            r.set_field_named(field, v);
        }
        for (field, lit) in &c.set_fields {
            r.set_field(field, lit.value());
        }
        for (tag, v) in &c.set_tags {
            r.set_tag(tag, v.as_str());
        }
        for f in &c.drop_fields {
            r.remove_field(f);
        }
        for t in &c.drop_tags {
            r.remove_tag(t);
        }
        if let Some(tf) = &c.time_from {
            let v = r
                .field(&tf.field)
                .ok_or_else(|| format!("time_from: field `{}` missing", tf.field))?;
            r.time = to_time(v, tf.unit).map_err(|e| format!("time_from `{}`: {e}", tf.field))?;
            if !tf.keep {
                r.remove_field(&tf.field);
            }
        }
        Ok(())
    }
}

fn cast(v: &Value, ty: CastType) -> Result<Value, String> {
    let fail = || format!("cannot cast {} {v:?} to {ty:?}", v.type_name());
    Ok(match (ty, v) {
        (_, Value::Null) => Value::Null,
        (CastType::String, v) => Value::Str(Arc::from(v.to_string())),
        (CastType::Float, Value::Str(s)) => match s.trim().parse::<f64>() {
            Ok(f) if f.is_finite() => Value::F64(f),
            _ => return Err(fail()),
        },
        (CastType::Float, v) => Value::F64(v.as_f64().ok_or_else(fail)?),
        (CastType::Int, Value::I64(i)) => Value::I64(*i),
        (CastType::Int, Value::Str(s)) => match s.trim().parse::<i64>() {
            Ok(i) => Value::I64(i),
            Err(_) => {
                float_to_int(s.trim().parse::<f64>().map_err(|_| fail())?).ok_or_else(fail)?
            }
        },
        (CastType::Int, v) => float_to_int(v.as_f64().ok_or_else(fail)?).ok_or_else(fail)?,
        (CastType::Bool, Value::Bool(b)) => Value::Bool(*b),
        (CastType::Bool, Value::Str(s)) => match s.trim() {
            "true" | "1" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => return Err(fail()),
        },
        (CastType::Bool, v) => match v.as_f64() {
            Some(1.0) => Value::Bool(true),
            Some(0.0) => Value::Bool(false),
            _ => return Err(fail()),
        },
    })
}

fn float_to_int(f: f64) -> Option<Value> {
    let r = f.round();
    (r.is_finite() && r >= i64::MIN as f64 && r < i64::MAX as f64).then_some(Value::I64(r as i64))
}

fn to_time(v: &Value, unit: TimeFormat) -> Result<i64, String> {
    if unit == TimeFormat::Rfc3339 {
        return match v {
            Value::Str(s) => sluice_core::json::parse_time(s),
            other => Err(format!(
                "expected an RFC 3339 string, got a {}",
                other.type_name()
            )),
        };
    }
    let scale = match unit {
        TimeFormat::S => 1e9,
        TimeFormat::Ms => 1e6,
        TimeFormat::Us => 1e3,
        TimeFormat::Ns | TimeFormat::Rfc3339 => 1.0,
    };
    if let Value::I64(i) = v {
        return i
            .checked_mul(scale as i64)
            .ok_or_else(|| format!("{i} is out of range"));
    }
    let x = match v {
        Value::F64(f) => *f,
        Value::Str(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("{s:?} is not a number"))?,
        other => return Err(format!("expected a number, got a {}", other.type_name())),
    };
    let ns = x * scale;
    if ns.is_finite() && ns.abs() < 9.2e18 {
        Ok(ns as i64)
    } else {
        Err(format!("{x} is not a valid time"))
    }
}

impl Transform for Remap {
    fn process(&mut self, batch: Batch, out: &mut TransformOutput) {
        for r in batch.records {
            // Work on a copy of the data so a failing step leaves the dead letter unchanged.
            let mut changed = Record {
                time: r.time,
                tags: r.tags.clone(),
                fields: r.fields.clone(),
                ..Record::default()
            };
            match self.apply(&mut changed) {
                Ok(()) => {
                    let mut r = r;
                    r.time = changed.time;
                    r.tags = changed.tags;
                    r.fields = changed.fields;
                    out.push(r);
                }
                Err(e) => out.dead_letter(r, format!("remap: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{cx, rec, take};

    fn remap(toml_text: &str) -> Remap {
        let c: RemapConfig = toml::from_str(toml_text).expect("parses");
        Remap::new(&c, &cx()).expect("valid")
    }

    fn one(m: &mut Remap, r: Record) -> Result<Record, String> {
        let mut out = TransformOutput::default();
        m.process(Batch::new(vec![r]), &mut out);
        if let Some(r) = take(&mut out, "default").pop() {
            return Ok(r);
        }
        let dead = take(&mut out, "dead_letter").pop().expect("one record out");
        Err(dead.meta.error.as_deref().unwrap_or("").to_string())
    }

    #[test]
    fn every_step_in_order() {
        let mut m = remap(
            r#"
            rename_fields = { temp = "temperature_c" }
            rename_tags = { device_id = "device" }
            cast = { seq = "int", ok = "bool" }
            compute = { temperature_f = "temperature_c * 9.0 / 5.0 + 32.0" }
            set_fields = { unit = "C", version = 2 }
            set_tags = { site = "plant-1" }
            drop_fields = ["humidity"]
            time_from = { field = "sampled_at", unit = "s" }
            "#,
        );
        let r = rec(
            0.0,
            "d1",
            &[
                ("temp", Value::F64(100.0)),
                ("seq", Value::from("7")),
                ("ok", Value::I64(1)),
                ("humidity", Value::F64(3.0)),
                ("sampled_at", Value::I64(1_700_000_000)),
            ],
        );
        let r = one(&mut m, r).expect("remapped");
        assert_eq!(r.field("temperature_c"), Some(&Value::F64(100.0)));
        assert_eq!(r.field("temperature_f"), Some(&Value::F64(212.0)));
        assert_eq!(r.field("seq"), Some(&Value::I64(7)));
        assert_eq!(r.field("ok"), Some(&Value::Bool(true)));
        assert_eq!(r.field("unit"), Some(&Value::from("C")));
        assert_eq!(r.field("version"), Some(&Value::I64(2)));
        assert!(r.field("humidity").is_none() && r.field("sampled_at").is_none());
        assert_eq!(r.tag("device"), Some("d1"));
        assert_eq!(r.tag("site"), Some("plant-1"));
        assert_eq!(r.time, 1_700_000_000_000_000_000);
    }

    #[test]
    fn casts() {
        assert_eq!(cast(&Value::F64(2.6), CastType::Int), Ok(Value::I64(3)));
        assert_eq!(
            cast(&Value::from("2.5e1"), CastType::Float),
            Ok(Value::F64(25.0))
        );
        assert_eq!(cast(&Value::I64(5), CastType::String), Ok(Value::from("5")));
        assert_eq!(
            cast(&Value::from("false"), CastType::Bool),
            Ok(Value::Bool(false))
        );
        assert_eq!(cast(&Value::Null, CastType::Int), Ok(Value::Null));
        assert!(cast(&Value::from("warm"), CastType::Float).is_err());
        assert!(cast(&Value::from("NaN"), CastType::Float).is_err());
        assert!(cast(&Value::F64(f64::INFINITY), CastType::Int).is_err());
        assert!(cast(&Value::I64(2), CastType::Bool).is_err());
    }

    #[test]
    fn times() {
        assert_eq!(to_time(&Value::F64(1.5), TimeFormat::S), Ok(1_500_000_000));
        assert_eq!(
            to_time(&Value::from("1970-01-01T00:00:01Z"), TimeFormat::Rfc3339),
            Ok(1_000_000_000)
        );
        assert!(to_time(&Value::I64(i64::MAX), TimeFormat::Ms).is_err());
        assert!(to_time(&Value::F64(f64::NAN), TimeFormat::Ms).is_err());
        assert!(to_time(&Value::Bool(true), TimeFormat::Ms).is_err());
    }

    #[test]
    fn failures_dead_letter_the_unchanged_record() {
        let mut m = remap(
            r#"
            rename_fields = { temp = "t" }
            cast = { seq = "int" }
            "#,
        );
        let e = one(&mut m, rec(0.0, "d1", &[("temp", Value::F64(1.0))])).expect_err("no seq");
        assert!(e.contains("cast: field `seq` missing"), "{e}");
        let mut out = TransformOutput::default();
        m.process(
            Batch::new(vec![rec(
                0.0,
                "d1",
                &[("temp", Value::F64(1.0)), ("seq", Value::from("x"))],
            )]),
            &mut out,
        );
        let dead = take(&mut out, "dead_letter");
        assert!(
            dead[0].field("temp").is_some(),
            "the rename was not applied"
        );
        let mut m = remap(r#"compute = { f = "temp * 2.0" }"#);
        let e = one(&mut m, rec(0.0, "d1", &[])).expect_err("no temp");
        assert!(e.contains("compute `f`"), "{e}");
        let mut m = remap(r#"time_from = { field = "at", unit = "rfc3339" }"#);
        let e = one(&mut m, rec(0.0, "d1", &[("at", Value::from("yesterday"))])).expect_err("bad");
        assert!(e.contains("time_from `at`"), "{e}");
    }

    #[test]
    fn invalid_expressions_fail_the_build() {
        let c: RemapConfig = toml::from_str(r#"compute = { f = "temp *" }"#).expect("parses");
        let err = Remap::new(&c, &cx()).expect_err("syntax").to_string();
        assert!(err.contains("compute.f"), "{err}");
        assert!(toml::from_str::<RemapConfig>("renam_fields = {}").is_err());
    }
}
