//! What the message-oriented sinks (`mqtt`, `kafka`) share: name templates filled from a
//! record's tags (`alerts/{device_id}`) and the payload formats.

use bytes::Bytes;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value as Json};
use sluice_core::json;
use sluice_core::record::{Record, Value};

/// Payload written for each record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// A flat JSON object: `ts` (ms since the epoch), the tags and the fields; what the `mqtt`
    /// and `kafka` sources' `json` codec reads back (with `tags = [...]`).
    #[default]
    Json,
    /// Sluice's record JSON (time, tags, fields, source, topic), as the `file` sink writes.
    Record,
    /// The record's raw payload as received (bridges); records without one are dead-lettered.
    Raw,
    /// A bridge envelope: the tags (e.g. `tenant_id`, `project_id`), `mqtt_topic` (the topic
    /// the record came from), `payload` (the raw payload: embedded as JSON when it is JSON,
    /// else as a string; the fields when there is no raw payload) and `timestamp` (ms).
    Envelope,
}

fn field_json(v: &Value) -> Json {
    match v {
        Value::F64(f) => Number::from_f64(*f).map(Json::Number).unwrap_or(Json::Null),
        Value::I64(i) => Json::Number((*i).into()),
        Value::Bool(b) => Json::Bool(*b),
        Value::Str(s) => Json::String(s.to_string()),
        Value::Null => Json::Null,
    }
}

fn fields_object(r: &Record) -> Map<String, Json> {
    let mut obj = Map::with_capacity(r.fields.len());
    for (k, v) in &r.fields {
        obj.insert(k.to_string(), field_json(v));
    }
    obj
}

/// Encodes `r` in `format`; the error says why the record cannot be written.
pub fn payload(format: Format, r: &Record) -> Result<Bytes, String> {
    match format {
        Format::Raw => r
            .payload
            .clone()
            .ok_or_else(|| "the record has no raw payload (use format = \"json\")".to_string()),
        Format::Record => serde_json::to_vec(&json::to_json(r))
            .map(Bytes::from)
            .map_err(|e| e.to_string()),
        Format::Json => {
            let mut obj = Map::with_capacity(1 + r.tags.len() + r.fields.len());
            obj.insert("ts".into(), Json::Number((r.time / 1_000_000).into()));
            for (k, v) in &r.tags {
                obj.insert(k.to_string(), Json::String(v.to_string()));
            }
            obj.extend(fields_object(r));
            serde_json::to_vec(&Json::Object(obj))
                .map(Bytes::from)
                .map_err(|e| e.to_string())
        }
        Format::Envelope => {
            let mut obj = Map::with_capacity(3 + r.tags.len());
            for (k, v) in &r.tags {
                obj.insert(k.to_string(), Json::String(v.to_string()));
            }
            let topic = r.meta.topic().map(|t| Json::String(t.to_string()));
            obj.insert("mqtt_topic".into(), topic.unwrap_or(Json::Null));
            let body = match &r.payload {
                Some(p) => serde_json::from_slice::<Json>(p)
                    .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(p).into_owned())),
                None => Json::Object(fields_object(r)),
            };
            obj.insert("payload".into(), body);
            obj.insert(
                "timestamp".into(),
                Json::Number((r.time / 1_000_000).into()),
            );
            serde_json::to_vec(&Json::Object(obj))
                .map(Bytes::from)
                .map_err(|e| e.to_string())
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Name(String),
}

/// A compiled name template: `{name}` is replaced by the record's tag `name` (or, failing
/// that, its string / integer / boolean field).
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    option: &'static str,
    source: String,
    parts: Vec<Part>,
    forbidden: &'static [char],
}

impl Template {
    /// Compiles `template`, the value of option `option` (named in errors). Neither the
    /// literal text nor a filled-in value may contain a `forbidden` character.
    pub fn new(
        option: &'static str,
        template: &str,
        forbidden: &'static [char],
    ) -> Result<Self, String> {
        if template.is_empty() {
            return Err(format!("`{option}` must not be empty"));
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("`{option}` = {template:?}: unclosed `{{`"))?;
            let name = &after[..close];
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
            {
                return Err(format!(
                    "`{option}` = {template:?}: invalid placeholder `{{{name}}}`"
                ));
            }
            parts.push(Part::Name(name.to_string()));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        for p in &parts {
            if let Part::Text(t) = p {
                if t.contains('}') || t.contains(forbidden) {
                    return Err(format!(
                        "`{option}` = {template:?}: contains a stray `}}` or one of {forbidden:?}"
                    ));
                }
            }
        }
        Ok(Template {
            option,
            source: template.to_string(),
            parts,
            forbidden,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Fills the template from `r`; the error names the missing or unusable value.
    pub fn render(&self, r: &Record) -> Result<String, String> {
        let mut out = String::with_capacity(self.source.len() + 16);
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Name(n) => {
                    let value = match (r.tag(n), r.field(n)) {
                        (Some(t), _) => t.to_string(),
                        (None, Some(v @ (Value::Str(_) | Value::I64(_) | Value::Bool(_)))) => {
                            v.to_string()
                        }
                        _ => {
                            return Err(format!(
                                "{} {:?}: the record has no tag or string/integer field `{n}`",
                                self.option, self.source
                            ))
                        }
                    };
                    if value.is_empty() || value.contains(self.forbidden) {
                        return Err(format!(
                            "{} {:?}: `{n}` = {value:?} is empty or contains one of {:?}",
                            self.option, self.source, self.forbidden
                        ));
                    }
                    out.push_str(&value);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::record::{Meta, Origin};
    use std::sync::Arc;

    const MQTT: &[char] = &['+', '#', '\0'];

    fn record() -> Record {
        let mut r = Record::new(1_700_000_000_123_000_000);
        r.set_tag("device_id", "dev-1");
        r.set_field("temp", Value::F64(21.5));
        r.set_field("zone", Value::I64(3));
        r
    }

    #[test]
    fn template_fills_tags_and_fields() {
        let t = Template::new("topic", "alerts/{device_id}/{zone}", MQTT).expect("valid");
        assert_eq!(t.render(&record()).expect("render"), "alerts/dev-1/3");
        let missing = Template::new("topic", "alerts/{site}", MQTT).expect("valid");
        let err = missing.render(&record()).expect_err("no site");
        assert!(err.contains("`site`"), "{err}");
        assert!(Template::new("topic", "alerts/{device_id", MQTT).is_err());
        assert!(Template::new("topic", "alerts/+", MQTT).is_err());
        assert!(Template::new("key", "", &[]).is_err());
        let mut bad = record();
        bad.set_tag("device_id", "a+b");
        let t = Template::new("topic", "alerts/{device_id}", MQTT).expect("valid");
        assert!(t.render(&bad).is_err());
    }

    #[test]
    fn flat_json_payload() {
        let p = payload(Format::Json, &record()).expect("json");
        let v: Json = serde_json::from_slice(&p).expect("parse");
        assert_eq!(v["ts"], 1_700_000_000_123i64);
        assert_eq!(v["device_id"], "dev-1");
        assert_eq!(v["temp"], 21.5);
        assert!(payload(Format::Raw, &record()).is_err());
    }

    #[test]
    fn envelope_embeds_json_payload_and_topic() {
        let mut r = Record::new(1_700_000_000_123_000_000);
        r.set_tag("tenant_id", "t1");
        r.set_tag("project_id", "p9");
        r.payload = Some(Bytes::from_static(br#"{"temp":20.5}"#));
        r.meta = Meta {
            origin: Origin::Mqtt {
                topic: Arc::from("mtic/msg/client/realtime/t1/p9/d3"),
            },
            ..Meta::default()
        };
        let v: Json =
            serde_json::from_slice(&payload(Format::Envelope, &r).expect("env")).expect("json");
        assert_eq!(v["tenant_id"], "t1");
        assert_eq!(v["project_id"], "p9");
        assert_eq!(v["mqtt_topic"], "mtic/msg/client/realtime/t1/p9/d3");
        assert_eq!(v["payload"]["temp"], 20.5);
        assert_eq!(v["timestamp"], 1_700_000_000_123i64);
        r.payload = Some(Bytes::from_static(b"not json \xff"));
        let v: Json =
            serde_json::from_slice(&payload(Format::Envelope, &r).expect("env")).expect("json");
        assert!(v["payload"]
            .as_str()
            .expect("string")
            .starts_with("not json"));
    }
}
