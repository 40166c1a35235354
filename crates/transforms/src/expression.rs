//! The condition and computation language of `filter`, `route` and `remap`: CEL.
//!
//! ```text
//! temp > 30 && tags.site == "a"
//! has(fields.humidity) && fields.humidity < 20.0
//! tags.device_id.matches("^dev-00") || time > 1700000000000000000
//! temp * 9.0 / 5.0 + 32.0
//! ```
//!
//! A record is seen as: every field as a variable of its own name (`temp`), `fields` (a map of
//! all fields, for `has(fields.x)` and names that are not identifiers), `tags` (a map of string
//! tags) and `time` (event time, integer ns since epoch). `tags`, `fields` and `time` win over
//! fields of the same name. Referring to a field the record lacks is an evaluation error, which
//! the stages turn into a dead letter; guard optional fields with `has(fields.x)`.
//!
//! Why CEL (the `cel` crate, MIT, cel-rust project): the language is a published spec (Google's
//! Common Expression Language, also used by Kubernetes and Envoy), so users can read its docs and
//! it will not grow ad hoc; it is side-effect free and always terminates, which matters for an
//! expression evaluated on every record; it has maps (`tags.site`), `has()`, string functions and
//! regex. `evalexpr` was the other candidate: its syntax is smaller, but since v12 it is
//! AGPL-3.0-only, which is incompatible with this Apache-2.0 project's users.

use std::collections::HashMap;
use std::sync::Arc;

use cel::objects::{Key, Map};
use cel::{Context, Env, Program};
use sluice_core::record::{Record, Value};

/// A compiled expression.
pub struct Expression {
    source: String,
    program: Program,
    env: Arc<Env>,
    /// The variables the expression refers to, resolved from each record.
    vars: Vec<Var>,
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expression").field(&self.source).finish()
    }
}

enum Var {
    Tags,
    Fields,
    Time,
    Field(String),
}

impl Expression {
    /// Compiles `source`; the error is the parser's message.
    pub fn compile(source: &str) -> Result<Self, String> {
        let program = Program::compile(source).map_err(|e| e.to_string())?;
        let refs = program.references();
        let mut vars: Vec<Var> = refs
            .variables()
            .into_iter()
            .map(|v| match v {
                "tags" => Var::Tags,
                "fields" => Var::Fields,
                "time" => Var::Time,
                other => Var::Field(other.to_string()),
            })
            .collect();
        // Deterministic order (the reference set is a hash set).
        vars.sort_by_key(|v| match v {
            Var::Tags => String::from("\0tags"),
            Var::Fields => String::from("\0fields"),
            Var::Time => String::from("\0time"),
            Var::Field(f) => f.clone(),
        });
        Ok(Expression {
            source: source.to_string(),
            program,
            env: Arc::new(Env::stdlib()),
            vars,
        })
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the expression against `record`.
    pub fn eval(&self, record: &Record) -> Result<Value, String> {
        let mut cx = Context::with_env(self.env.clone());
        for var in &self.vars {
            match var {
                Var::Tags => {
                    let map: HashMap<Key, cel::Value> = record
                        .tags
                        .iter()
                        .map(|(k, v)| (Key::from(&**k), cel::Value::from(&**v)))
                        .collect();
                    cx.add_variable_from_value("tags", cel::Value::Map(Map::from(map)));
                }
                Var::Fields => {
                    let map: HashMap<Key, cel::Value> = record
                        .fields
                        .iter()
                        .map(|(k, v)| (Key::from(&**k), to_cel(v)))
                        .collect();
                    cx.add_variable_from_value("fields", cel::Value::Map(Map::from(map)));
                }
                Var::Time => cx.add_variable_from_value("time", cel::Value::Int(record.time)),
                Var::Field(name) => {
                    // An absent field stays undeclared: CEL reports "undeclared reference".
                    if let Some(v) = record.field(name) {
                        cx.add_variable_from_value(name.as_str(), to_cel(v));
                    }
                }
            }
        }
        let result = self.program.execute(&cx).map_err(|e| e.to_string())?;
        from_cel(result)
    }

    /// Evaluates a condition; a result that is not a boolean is an error.
    pub fn eval_bool(&self, record: &Record) -> Result<bool, String> {
        match self.eval(record)? {
            Value::Bool(b) => Ok(b),
            other => Err(format!(
                "condition returned a {} ({other}), not a boolean",
                other.type_name()
            )),
        }
    }
}

fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::F64(f) => cel::Value::Float(*f),
        Value::I64(i) => cel::Value::Int(*i),
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Str(s) => cel::Value::from(&**s),
        Value::Null => cel::Value::Null,
    }
}

fn from_cel(v: cel::Value) -> Result<Value, String> {
    Ok(match v {
        cel::Value::Float(f) => Value::F64(f),
        cel::Value::Int(i) => Value::I64(i),
        cel::Value::UInt(u) => match i64::try_from(u) {
            Ok(i) => Value::I64(i),
            Err(_) => Value::F64(u as f64),
        },
        cel::Value::Bool(b) => Value::Bool(b),
        cel::Value::String(s) => Value::Str(Arc::from(s.as_str())),
        cel::Value::Null => Value::Null,
        other => {
            return Err(format!(
                "expression produced a {}, which is not a field value",
                other.type_of()
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        let mut r = Record::new(1_000);
        r.set_tag("site", "a");
        r.set_tag("device_id", "dev-0001");
        r.set_field("temp", Value::F64(31.5));
        r.set_field("seq", Value::I64(7));
        r.set_field("ok", Value::Bool(true));
        r
    }

    fn eval(src: &str) -> Result<Value, String> {
        Expression::compile(src)?.eval(&record())
    }

    #[test]
    fn the_issue_example_works() {
        let e = Expression::compile(r#"temp > 30 && tags.site == "a""#).expect("compiles");
        assert_eq!(e.eval_bool(&record()), Ok(true));
        let mut cold = record();
        cold.set_field("temp", Value::F64(12.0));
        assert_eq!(e.eval_bool(&cold), Ok(false));
    }

    #[test]
    fn fields_tags_time_and_functions() {
        assert_eq!(eval("seq + 1"), Ok(Value::I64(8)));
        assert_eq!(eval("temp * 2.0"), Ok(Value::F64(63.0)));
        assert_eq!(eval("time"), Ok(Value::I64(1_000)));
        assert_eq!(eval("has(fields.humidity)"), Ok(Value::Bool(false)));
        assert_eq!(eval("has(fields.temp) && ok"), Ok(Value::Bool(true)));
        assert_eq!(
            eval(r#"tags.device_id.matches("^dev-0+1$")"#),
            Ok(Value::Bool(true))
        );
        assert_eq!(
            eval(r#"tags.device_id + "/x""#),
            Ok(Value::Str(Arc::from("dev-0001/x")))
        );
    }

    #[test]
    fn missing_field_and_type_mismatch_are_errors_not_panics() {
        let missing = eval("humidity > 3").expect_err("humidity is absent");
        assert!(missing.contains("humidity"), "{missing}");
        assert!(eval(r#"temp > "x""#).is_err());
        let e = Expression::compile("temp + 1.0").expect("compiles");
        assert!(
            e.eval_bool(&record()).is_err(),
            "a number is not a condition"
        );
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time() {
        assert!(Expression::compile("temp > && 3").is_err());
    }

    #[test]
    fn nan_cannot_be_compared() {
        // CEL has no ordering for NaN: the comparison is an error (→ dead letter), not a match.
        let mut r = record();
        r.set_field("temp", Value::F64(f64::NAN));
        let e = Expression::compile("temp > 30").expect("compiles");
        assert!(e.eval_bool(&r).is_err());
    }
}
