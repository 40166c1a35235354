//! InfluxDB line protocol parsing: the `line_protocol` codec of every source
//! (`decode = { codec = "line_protocol" }`), and the reader the `influxdb` sink's tests use to
//! check its encoder.
//!
//! ```
//! use sluice_core::line_protocol::parse_line;
//! use sluice_core::record::Value;
//! let l = parse_line("weather,device\\ id=dev\\,1 temp=21.5,seq=7i 1700000000123").expect("parses");
//! assert_eq!(l.measurement, "weather");
//! assert_eq!(l.tags, vec![("device id".to_string(), "dev,1".to_string())]);
//! assert_eq!(l.fields[1], ("seq".to_string(), Value::I64(7)));
//! assert_eq!(l.time, Some(1_700_000_000_123));
//! ```

use crate::record::Value;

/// One parsed line.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub measurement: String,
    /// Tags in line order.
    pub tags: Vec<(String, String)>,
    /// Fields in line order.
    pub fields: Vec<(String, Value)>,
    /// The timestamp as written (in the writer's precision), if any.
    pub time: Option<i64>,
}

/// Parses one line of line protocol (without its newline).
pub fn parse_line(line: &str) -> Result<Line, String> {
    let mut p = Parser {
        s: line.as_bytes(),
        i: 0,
    };
    let measurement = p.ident(|b| b == b',' || b == b' ')?;
    if measurement.is_empty() {
        return Err("empty measurement".into());
    }
    let mut tags = Vec::new();
    while p.peek() == Some(b',') {
        p.i += 1;
        let k = p.ident(|b| b == b'=' || b == b',' || b == b' ')?;
        p.expect(b'=')?;
        let v = p.ident(|b| b == b',' || b == b' ' || b == b'=')?;
        tags.push((k, v));
    }
    p.expect(b' ')?;
    let mut fields = Vec::new();
    loop {
        let k = p.ident(|b| b == b'=' || b == b',' || b == b' ')?;
        if k.is_empty() {
            return Err(format!("empty field key at byte {}", p.i));
        }
        p.expect(b'=')?;
        let v = p.field_value()?;
        fields.push((k, v));
        match p.peek() {
            Some(b',') => p.i += 1,
            _ => break,
        }
    }
    let time = match p.peek() {
        None => None,
        Some(b' ') => {
            p.i += 1;
            let rest = std::str::from_utf8(&p.s[p.i..]).map_err(|e| e.to_string())?;
            Some(
                rest.parse::<i64>()
                    .map_err(|e| format!("bad timestamp {rest:?}: {e}"))?,
            )
        }
        Some(b) => return Err(format!("unexpected {:?} at byte {}", b as char, p.i)),
    };
    Ok(Line {
        measurement,
        tags,
        fields,
        time,
    })
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, b: u8) -> Result<(), String> {
        if self.peek() == Some(b) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected {:?} at byte {}", b as char, self.i))
        }
    }

    /// Reads an escaped identifier up to an unescaped byte for which `stop` holds. A backslash
    /// escapes `,`, `=`, space and itself; before anything else it is literal.
    fn ident(&mut self, stop: impl Fn(u8) -> bool) -> Result<String, String> {
        let mut out = Vec::new();
        while let Some(b) = self.peek() {
            if b == b'\\' {
                match self.s.get(self.i + 1) {
                    Some(&n) if matches!(n, b',' | b'=' | b' ' | b'\\') => {
                        out.push(n);
                        self.i += 2;
                    }
                    _ => {
                        out.push(b);
                        self.i += 1;
                    }
                }
                continue;
            }
            if stop(b) {
                break;
            }
            if b == b'\n' {
                return Err("newline inside a line".into());
            }
            out.push(b);
            self.i += 1;
        }
        String::from_utf8(out).map_err(|e| e.to_string())
    }

    fn field_value(&mut self) -> Result<Value, String> {
        if self.peek() == Some(b'"') {
            self.i += 1;
            let mut out = Vec::new();
            loop {
                match self.peek() {
                    None => return Err("unterminated string".into()),
                    Some(b'"') => {
                        self.i += 1;
                        break;
                    }
                    Some(b'\\') if matches!(self.s.get(self.i + 1), Some(b'"' | b'\\')) => {
                        out.push(self.s[self.i + 1]);
                        self.i += 2;
                    }
                    Some(b) => {
                        out.push(b);
                        self.i += 1;
                    }
                }
            }
            let s = String::from_utf8(out).map_err(|e| e.to_string())?;
            return Ok(Value::from(s.as_str()));
        }
        let start = self.i;
        while let Some(b) = self.peek() {
            if b == b',' || b == b' ' {
                break;
            }
            self.i += 1;
        }
        let raw = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
        match raw {
            "t" | "T" | "true" | "True" | "TRUE" => return Ok(Value::Bool(true)),
            "f" | "F" | "false" | "False" | "FALSE" => return Ok(Value::Bool(false)),
            _ => {}
        }
        if let Some(int) = raw.strip_suffix('i') {
            return int
                .parse::<i64>()
                .map(Value::I64)
                .map_err(|e| format!("bad integer {raw:?}: {e}"));
        }
        raw.parse::<f64>()
            .map(Value::F64)
            .map_err(|e| format!("bad float {raw:?}: {e}"))
    }
}
