//! The stable JSON shape of a record, used by the `console` and `file` sinks and read back by
//! the `record` codec:
//!
//! ```json
//! {"time":"2026-11-25T10:00:00.000000001Z",
//!  "tags":{"device_id":"dev-0001"},
//!  "fields":{"temp":21.5,"count":3,"ok":true,"status":"online","gone":null},
//!  "source":"sim","topic":"devices/dev-0001/data",
//!  "error":"…only on dead-lettered records…","payload":"…only when kept…"}
//! ```
//!
//! `time` is RFC 3339 in UTC with nanoseconds. Integers stay integers and floats are written
//! with a decimal point, so types survive a round trip. Non-finite floats (NaN, ±inf) have no
//! JSON form and are written as `null`. `topic`, `partition`, `offset` and `message_id` appear
//! when the record came from MQTT, Kafka or SQS. A payload that is not UTF-8 is written with
//! invalid bytes replaced.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Number, Value as Json};

use crate::record::{intern, Meta, Origin, Record, Value};

/// Formats nanoseconds since the epoch as RFC 3339 UTC.
pub fn format_time(ns: i64) -> String {
    DateTime::<Utc>::from_timestamp_nanos(ns).to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Parses RFC 3339 to nanoseconds since the epoch.
pub fn parse_time(s: &str) -> Result<i64, String> {
    let t =
        DateTime::parse_from_rfc3339(s).map_err(|e| format!("invalid RFC 3339 time {s:?}: {e}"))?;
    t.timestamp_nanos_opt()
        .ok_or_else(|| format!("time {s:?} is out of range"))
}

fn value_to_json(v: &Value) -> Json {
    match v {
        Value::F64(f) => Number::from_f64(*f).map(Json::Number).unwrap_or(Json::Null),
        Value::I64(i) => Json::Number((*i).into()),
        Value::Bool(b) => Json::Bool(*b),
        Value::Str(s) => Json::String(s.to_string()),
        Value::Null => Json::Null,
    }
}

/// The record as a JSON value (see the module docs for the shape).
pub fn to_json(r: &Record) -> Json {
    let mut obj = Map::new();
    obj.insert("time".into(), Json::String(format_time(r.time)));
    let tags: Map<String, Json> = r
        .tags
        .iter()
        .map(|(k, v)| (k.to_string(), Json::String(v.to_string())))
        .collect();
    obj.insert("tags".into(), Json::Object(tags));
    let fields: Map<String, Json> = r
        .fields
        .iter()
        .map(|(k, v)| (k.to_string(), value_to_json(v)))
        .collect();
    obj.insert("fields".into(), Json::Object(fields));
    if let Some(src) = &r.meta.source {
        obj.insert("source".into(), Json::String(src.to_string()));
    }
    match &r.meta.origin {
        Origin::None => {}
        Origin::Mqtt { topic } => {
            obj.insert("topic".into(), Json::String(topic.to_string()));
        }
        Origin::Kafka {
            topic,
            partition,
            offset,
        } => {
            obj.insert("topic".into(), Json::String(topic.to_string()));
            obj.insert("partition".into(), Json::Number((*partition).into()));
            obj.insert("offset".into(), Json::Number((*offset).into()));
        }
        Origin::Sqs { message_id } => {
            obj.insert("message_id".into(), Json::String(message_id.to_string()));
        }
    }
    if let Some(e) = &r.meta.error {
        obj.insert("error".into(), Json::String(e.to_string()));
    }
    if let Some(p) = &r.payload {
        obj.insert(
            "payload".into(),
            Json::String(String::from_utf8_lossy(p).into_owned()),
        );
    }
    Json::Object(obj)
}

/// Appends the record as one JSON line (with `\n`) to `out`.
pub fn write_line(r: &Record, out: &mut Vec<u8>) {
    // Serializing a `serde_json::Value` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &to_json(r));
    out.push(b'\n');
}

/// Converts a JSON scalar to a field value (`None` for arrays and objects).
pub fn json_scalar(v: &Json) -> Option<Value> {
    Some(match v {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::I64(i),
            None => Value::F64(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::Str(Arc::from(s.as_str())),
        Json::Array(_) | Json::Object(_) => return None,
    })
}

/// Parses a record written by [`to_json`].
pub fn from_json(bytes: &[u8]) -> Result<Record, String> {
    let v: Json = serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v.as_object().ok_or("a record must be a JSON object")?;
    let time = match obj.get("time") {
        Some(Json::String(s)) => parse_time(s)?,
        Some(Json::Number(n)) => n
            .as_i64()
            .ok_or("`time` must be an integer of nanoseconds")?,
        Some(_) => return Err("`time` must be an RFC 3339 string".into()),
        None => return Err("missing `time`".into()),
    };
    let mut r = Record::new(time);
    if let Some(tags) = obj.get("tags") {
        let tags = tags.as_object().ok_or("`tags` must be an object")?;
        for (k, v) in tags {
            let s = v
                .as_str()
                .ok_or_else(|| format!("tag `{k}` must be a string"))?;
            r.tags.push((intern(k), Arc::from(s)));
        }
    }
    if let Some(fields) = obj.get("fields") {
        let fields = fields.as_object().ok_or("`fields` must be an object")?;
        for (k, v) in fields {
            let value = json_scalar(v)
                .ok_or_else(|| format!("field `{k}` must be a number, string, bool or null"))?;
            r.fields.push((intern(k), value));
        }
    }
    let s = |k: &str| obj.get(k).and_then(Json::as_str).map(Arc::<str>::from);
    r.meta = Meta {
        source: obj.get("source").and_then(Json::as_str).map(intern),
        origin: match (
            s("topic"),
            obj.get("partition").and_then(Json::as_i64),
            s("message_id"),
        ) {
            (Some(topic), Some(p), _) => Origin::Kafka {
                topic,
                partition: p as i32,
                offset: obj.get("offset").and_then(Json::as_i64).unwrap_or(-1),
            },
            (Some(topic), None, _) => Origin::Mqtt { topic },
            (None, _, Some(message_id)) => Origin::Sqs { message_id },
            _ => Origin::None,
        },
        error: s("error"),
    };
    if let Some(p) = obj.get("payload").and_then(Json::as_str) {
        r.payload = Some(bytes::Bytes::copy_from_slice(p.as_bytes()));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_types() {
        let mut r = Record::new(1_764_000_000_123_456_789);
        r.set_tag("device_id", "dev-1");
        r.set_field("temp", Value::F64(21.0));
        r.set_field("n", Value::I64(3));
        r.set_field("ok", Value::Bool(true));
        r.set_field("status", Value::from("online"));
        r.set_field("gone", Value::Null);
        r.meta.source = Some(intern("sim"));
        r.meta.origin = Origin::Mqtt {
            topic: Arc::from("devices/dev-1/data"),
        };
        let mut line = Vec::new();
        write_line(&r, &mut line);
        let text = String::from_utf8(line.clone()).expect("utf8");
        assert!(
            text.starts_with("{\"time\":\"2025-11-24T16:00:00.123456789Z\""),
            "{text}"
        );
        assert!(text.contains("\"temp\":21.0"), "{text}");
        let back = from_json(&line).expect("parses");
        assert_eq!(back.time, r.time);
        assert_eq!(back.tags, r.tags);
        assert_eq!(back.fields, r.fields);
        assert_eq!(back.meta, r.meta);
    }

    #[test]
    fn non_finite_floats_become_null() {
        let mut r = Record::new(0);
        r.set_field("x", Value::F64(f64::NAN));
        assert_eq!(to_json(&r)["fields"]["x"], Json::Null);
    }

    #[test]
    fn bad_records_are_errors_not_panics() {
        assert!(from_json(b"[1,2]").is_err());
        assert!(from_json(b"{\"tags\":{}}").is_err());
        assert!(from_json(b"{\"time\":\"yesterday\"}").is_err());
        assert!(from_json(b"{\"time\":0,\"fields\":{\"a\":[1]}}").is_err());
        assert!(from_json(b"\xff").is_err());
    }

    /// A float field as an `f64`, whether it came back as a float or (integral) an integer.
    fn number(r: &Record) -> Option<f64> {
        match r.field("x")? {
            Value::F64(f) => Some(*f),
            Value::I64(i) => Some(*i as f64),
            _ => None,
        }
    }

    #[test]
    fn floats_decode_exactly() {
        // serde_json's default (fast, not correctly rounded) parser turns the first one into
        // 92.2779806, one unit in the last place away.
        for text in [
            "92.27798059999999",
            "2.2250738585072014e-308",
            "0.3",
            "1e300",
        ] {
            let exact: f64 = text.parse().expect("a float");
            let line = format!(r#"{{"time":"2026-01-01T00:00:00Z","fields":{{"x":{text}}}}}"#);
            let r = from_json(line.as_bytes()).expect("a record");
            assert_eq!(r.field("x"), Some(&Value::F64(exact)), "{text}");
            let v: Json = serde_json::from_str(text).expect("JSON");
            assert_eq!(json_scalar(&v), Some(Value::F64(exact)), "{text}");
            // The `json` codec of the sources.
            let mut decoder = crate::decode::Decoder::new(Default::default()).expect("decoder");
            let payload = bytes::Bytes::from(format!(r#"{{"ts":1,"x":{text}}}"#));
            let r = decoder
                .decode(payload, None, 0, Meta::default())
                .expect("decodes");
            assert_eq!(r.field("x"), Some(&Value::F64(exact)), "{text}");
        }
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_finite_f64_survives_encode_then_decode(
            f in proptest::num::f64::ANY.prop_filter("finite", |f| f.is_finite())
        ) {
            let mut r = Record::new(0);
            r.set_field("x", Value::F64(f));
            let mut line = Vec::new();
            write_line(&r, &mut line);
            let back = from_json(&line).map_err(TestCaseError::fail)?;
            match back.field("x") {
                Some(Value::F64(g)) => prop_assert_eq!(g.to_bits(), f.to_bits()),
                other => prop_assert!(false, "{f} came back as {other:?}"),
            }
            // Rust's `{}` (shortest round-trip decimal, no exponent) read as a JSON number.
            let v: Json = serde_json::from_str(&format!("{f}")).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut r = Record::new(0);
            r.fields.push((intern("x"), json_scalar(&v).unwrap_or(Value::Null)));
            prop_assert_eq!(number(&r), Some(f));
        }
    }
}
