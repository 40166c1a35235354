//! InfluxDB line protocol: the encoder the `influxdb` sink writes with, and a parser used to
//! check it (tests, benches) and available to any future line-protocol source.
//!
//! ```
//! use sluice_core::record::{Record, Value};
//! use sluice_sinks::line_protocol::{parse_line, Encoder, Precision};
//!
//! let mut r = Record::new(1_700_000_000_123_456_789);
//! r.set_tag("device id", "dev,1");
//! r.set_field("temp", Value::F64(21.5));
//! r.set_field("seq", Value::I64(7));
//! r.set_field("note", Value::from("say \"hi\""));
//! let mut buf = Vec::new();
//! Encoder::new(Precision::Ms).encode("weather", &r, &mut buf).expect("encodable");
//! assert_eq!(
//!     std::str::from_utf8(&buf).expect("utf-8"),
//!     "weather,device\\ id=dev\\,1 temp=21.5,seq=7i,note=\"say \\\"hi\\\"\" 1700000000123\n"
//! );
//! let parsed = parse_line("weather,device\\ id=dev\\,1 temp=21.5,seq=7i 1700000000123").expect("parses");
//! assert_eq!(parsed.tags, vec![("device id".to_string(), "dev,1".to_string())]);
//! ```
//!
//! Escaping follows the InfluxDB reference: in the measurement `,`, space and `\` are escaped;
//! in tag keys, tag values and field keys also `=`; in string field values `"` and `\`. A
//! backslash is always written as `\\` (the reference reads `\\` as one backslash), so every
//! value round-trips. Line protocol has no way to write a newline in a name or tag value, and
//! none for NaN or infinity: such records are refused with an [`EncodeError`] (the sink
//! dead-letters them) rather than silently altered. Empty tag values are left out, as InfluxDB
//! itself does.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::record::{Record, Value};

/// The parser lives in core (it is also the `line_protocol` decoding codec).
pub use sluice_core::line_protocol::{parse_line, Line};

/// Timestamp precision of the written lines (the `precision` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Nanoseconds.
    #[default]
    Ns,
    /// Microseconds.
    Us,
    /// Milliseconds.
    Ms,
    /// Seconds.
    S,
}

impl Precision {
    /// The value of the `precision` query parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Ns => "ns",
            Precision::Us => "us",
            Precision::Ms => "ms",
            Precision::S => "s",
        }
    }

    /// Nanoseconds per unit.
    pub fn nanos(self) -> i64 {
        match self {
            Precision::Ns => 1,
            Precision::Us => 1_000,
            Precision::Ms => 1_000_000,
            Precision::S => 1_000_000_000,
        }
    }
}

/// Why a record cannot be written as line protocol (the dead-letter reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// No field left to write (line protocol needs at least one; nulls are skipped).
    NoFields,
    /// A float field is NaN or infinite.
    NonFinite { field: String, value: String },
    /// A measurement, tag key, tag value or field key holds a newline.
    Newline { what: &'static str, name: String },
    /// The measurement or a field key is empty.
    Empty { what: &'static str },
    /// The measurement starts with `#`, which makes the line a comment.
    CommentMeasurement { measurement: String },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::NoFields => f.write_str(
                "line protocol: record has no non-null field (a line needs at least one field)",
            ),
            EncodeError::NonFinite { field, value } => write!(
                f,
                "line protocol: field `{field}` is {value}, which InfluxDB cannot store (only finite floats)"
            ),
            EncodeError::Newline { what, name } => write!(
                f,
                "line protocol: {what} {name:?} contains a newline, which line protocol cannot represent"
            ),
            EncodeError::Empty { what } => write!(f, "line protocol: empty {what}"),
            EncodeError::CommentMeasurement { measurement } => write!(
                f,
                "line protocol: measurement {measurement:?} starts with `#`, which would make the line a comment"
            ),
        }
    }
}

impl std::error::Error for EncodeError {}

/// Encodes records as line protocol lines. Reusable: keeps a small scratch buffer.
#[derive(Debug, Clone)]
pub struct Encoder {
    precision: Precision,
    /// Tags to write (`None`: all of the record's tags).
    tags: Option<Vec<String>>,
    order: Vec<usize>,
}

impl Encoder {
    /// An encoder writing every tag and timestamps in `precision`.
    pub fn new(precision: Precision) -> Self {
        Encoder {
            precision,
            tags: None,
            order: Vec::new(),
        }
    }

    /// Writes only the tags named in `tags` (others are left out).
    pub fn with_tags(mut self, tags: Option<Vec<String>>) -> Self {
        self.tags = tags;
        self
    }

    /// Appends `record` as one line (with its trailing `\n`) to `out`. On error `out` is left
    /// as it was.
    pub fn encode(
        &mut self,
        measurement: &str,
        record: &Record,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let start = out.len();
        let result = self.encode_inner(measurement, record, out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn encode_inner(
        &mut self,
        measurement: &str,
        record: &Record,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        if measurement.is_empty() {
            return Err(EncodeError::Empty {
                what: "measurement",
            });
        }
        if measurement.starts_with('#') {
            return Err(EncodeError::CommentMeasurement {
                measurement: measurement.to_string(),
            });
        }
        check_newline("measurement", measurement)?;
        escape_into(measurement, out, is_measurement_special);

        // Tags sorted by key, as InfluxDB recommends (it sorts them itself otherwise).
        self.order.clear();
        for (i, (k, v)) in record.tags.iter().enumerate() {
            if k.is_empty() || v.is_empty() {
                continue;
            }
            if let Some(wanted) = &self.tags {
                if !wanted.iter().any(|w| w.as_str() == &**k) {
                    continue;
                }
            }
            check_newline("tag key", k)?;
            check_newline("tag value", v)?;
            self.order.push(i);
        }
        let tags = &record.tags;
        self.order
            .sort_unstable_by(|a, b| tags[*a].0.cmp(&tags[*b].0));
        for &i in &self.order {
            let (k, v) = &tags[i];
            out.push(b',');
            escape_into(k, out, is_key_special);
            out.push(b'=');
            escape_into(v, out, is_key_special);
        }

        let mut first = true;
        for (name, value) in &record.fields {
            if matches!(value, Value::Null) {
                continue;
            }
            if name.is_empty() {
                return Err(EncodeError::Empty { what: "field key" });
            }
            check_newline("field key", name)?;
            out.push(if first { b' ' } else { b',' });
            first = false;
            escape_into(name, out, is_key_special);
            out.push(b'=');
            match value {
                Value::F64(v) => {
                    if !v.is_finite() {
                        return Err(EncodeError::NonFinite {
                            field: name.to_string(),
                            value: v.to_string(),
                        });
                    }
                    let mut b = ryu::Buffer::new();
                    out.extend_from_slice(b.format_finite(*v).as_bytes());
                }
                Value::I64(v) => {
                    let mut b = itoa::Buffer::new();
                    out.extend_from_slice(b.format(*v).as_bytes());
                    out.push(b'i');
                }
                Value::Bool(v) => out.extend_from_slice(if *v { b"true" } else { b"false" }),
                Value::Str(s) => {
                    out.push(b'"');
                    escape_into(s, out, |b| b == b'"' || b == b'\\');
                    out.push(b'"');
                }
                Value::Null => {}
            }
        }
        if first {
            return Err(EncodeError::NoFields);
        }
        out.push(b' ');
        let mut b = itoa::Buffer::new();
        out.extend_from_slice(
            b.format(record.time.div_euclid(self.precision.nanos()))
                .as_bytes(),
        );
        out.push(b'\n');
        Ok(())
    }
}

fn check_newline(what: &'static str, s: &str) -> Result<(), EncodeError> {
    if s.as_bytes().contains(&b'\n') {
        return Err(EncodeError::Newline {
            what,
            name: s.to_string(),
        });
    }
    Ok(())
}

fn is_measurement_special(b: u8) -> bool {
    matches!(b, b',' | b' ' | b'\\')
}

fn is_key_special(b: u8) -> bool {
    matches!(b, b',' | b' ' | b'=' | b'\\')
}

#[inline]
fn escape_into(s: &str, out: &mut Vec<u8>, special: impl Fn(u8) -> bool) {
    let bytes = s.as_bytes();
    // Fast path: most names and values need no escaping.
    if !bytes.iter().any(|&b| special(b)) {
        out.extend_from_slice(bytes);
        return;
    }
    out.reserve(bytes.len() + 4);
    for &b in bytes {
        if special(b) {
            out.push(b'\\');
        }
        out.push(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(measurement: &str, r: &Record) -> Result<String, EncodeError> {
        let mut buf = Vec::new();
        Encoder::new(Precision::Ns).encode(measurement, r, &mut buf)?;
        Ok(String::from_utf8(buf).expect("encoder writes utf-8"))
    }

    #[test]
    fn escapes_every_special_character() {
        let mut r = Record::new(5);
        r.set_tag("k=,\\ ", "v=, \\\"x");
        r.set_field("f,= ", Value::from("a\"b\\c\nd, e=f"));
        r.set_field("i", Value::I64(-3));
        r.set_field("b", Value::Bool(true));
        r.set_field("x", Value::F64(1.0));
        let line = encode("m, =\\", &r).expect("encodable");
        assert_eq!(
            line,
            "m\\,\\ =\\\\,k\\=\\,\\\\\\ =v\\=\\,\\ \\\\\"x f\\,\\=\\ =\"a\\\"b\\\\c\nd, e=f\",i=-3i,b=true,x=1.0 5\n"
        );
        let parsed = parse_line(line.trim_end_matches('\n')).expect("parses");
        assert_eq!(parsed.measurement, "m, =\\");
        assert_eq!(
            parsed.tags,
            vec![("k=,\\ ".to_string(), "v=, \\\"x".to_string())]
        );
        assert_eq!(parsed.fields[0].1, Value::from("a\"b\\c\nd, e=f"));
        assert_eq!(parsed.fields[1].1, Value::I64(-3));
        assert_eq!(parsed.fields[3].1, Value::F64(1.0));
    }

    #[test]
    fn refuses_what_line_protocol_cannot_carry() {
        let mut r = Record::new(0);
        r.set_field("t", Value::F64(f64::NAN));
        let err = encode("m", &r).expect_err("NaN");
        assert!(err.to_string().contains("`t` is NaN"), "{err}");
        r.set_field("t", Value::F64(f64::NEG_INFINITY));
        assert!(encode("m", &r)
            .expect_err("inf")
            .to_string()
            .contains("-inf"));
        r.set_field("t", Value::Null);
        assert_eq!(encode("m", &r), Err(EncodeError::NoFields));
        r.set_field("t", Value::I64(1));
        r.set_tag("dev", "a\nb");
        assert!(matches!(encode("m", &r), Err(EncodeError::Newline { .. })));
        r.set_tag("dev", "");
        assert_eq!(
            encode("m", &r).expect("empty tag is left out"),
            "m t=1i 0\n"
        );
        assert!(matches!(
            encode("#m", &r),
            Err(EncodeError::CommentMeasurement { .. })
        ));
        let mut buf = b"keep\n".to_vec();
        r.set_field("t", Value::F64(f64::NAN));
        assert!(Encoder::new(Precision::Ns)
            .encode("m", &r, &mut buf)
            .is_err());
        assert_eq!(buf, b"keep\n", "a failed record leaves no partial line");
    }

    #[test]
    fn precision_and_tag_selection() {
        let mut r = Record::new(-1_500_000_001);
        r.set_tag("b", "2");
        r.set_tag("a", "1");
        r.set_tag("skip", "x");
        r.set_field("v", Value::F64(0.1));
        let mut buf = Vec::new();
        Encoder::new(Precision::S)
            .with_tags(Some(vec!["a".into(), "b".into()]))
            .encode("m", &r, &mut buf)
            .expect("encodable");
        // Tags sorted by key; floor division keeps pre-epoch times in the right second.
        assert_eq!(buf, b"m,a=1,b=2 v=0.1 -2\n");
    }

    fn name() -> impl Strategy<Value = String> {
        // Printable text with every character line protocol treats specially, no newline.
        proptest::string::string_regex("[a-zA-Z0-9 ,=\\\\\"#_.é\\t-]{1,12}").expect("regex")
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<f64>()
                .prop_filter("finite", |v| v.is_finite())
                .prop_map(Value::F64),
            any::<i64>().prop_map(Value::I64),
            any::<bool>().prop_map(Value::Bool),
            proptest::string::string_regex("[a-z \",=\\\\\n\r\té{}]{0,16}")
                .expect("regex")
                .prop_map(|s| Value::from(s.as_str())),
        ]
    }

    proptest! {
        #[test]
        fn encode_then_parse_round_trips(
            measurement in name().prop_filter("not a comment", |m| !m.starts_with('#')),
            tags in proptest::collection::btree_map(name(), name(), 0..4),
            fields in proptest::collection::btree_map(name(), value(), 1..6),
            time in any::<i64>(),
        ) {
            let mut r = Record::new(time);
            for (k, v) in &tags {
                r.set_tag(k, v.as_str());
            }
            for (k, v) in &fields {
                r.set_field(k, v.clone());
            }
            let line = encode(&measurement, &r).expect("encodable");
            prop_assert!(line.ends_with('\n'));
            let parsed = parse_line(&line[..line.len() - 1]).map_err(|e| TestCaseError::fail(format!("{e}: {line:?}")))?;
            prop_assert_eq!(parsed.measurement, measurement);
            // btree_map iterates sorted by key, the order the encoder writes tags in.
            let want_tags: Vec<(String, String)> = tags.into_iter().collect();
            prop_assert_eq!(parsed.tags, want_tags);
            let want_fields: Vec<(String, Value)> = fields.into_iter().collect();
            prop_assert_eq!(parsed.fields, want_fields);
            prop_assert_eq!(parsed.time, Some(time));
        }
    }
}
