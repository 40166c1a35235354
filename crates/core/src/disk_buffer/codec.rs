//! The on-disk form of a batch: a checksummed frame of binary records.
//!
//! ```text
//! frame  = magic u32 | body_len u32 | crc32(written_at, body) u32 | written_at i64 | body
//! body   = count varint | record*
//! record = time i64 | tags | fields | payload | meta
//! ```
//! All integers little-endian; strings are `len varint | UTF-8`. Finalizers are not stored: a
//! record read back gets the buffer's own finalizer. Decoding never panics: anything that does
//! not parse is a [`CodecError`] and the frame is skipped by the reader.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};

use crate::record::{intern, Batch, Meta, Name, Origin, Record, Value};

/// Marks the start of a frame ("SLBF"), so a reader can find the next frame after damage.
pub const MAGIC: u32 = 0x464c_4253;
/// Bytes before the body.
pub const HEADER_LEN: usize = 20;
/// Largest body accepted when reading (a corrupt length must not make us allocate gigabytes).
pub const MAX_BODY: usize = 256 << 20;

/// Why a frame or record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame truncated")]
    Truncated,
    #[error("bad frame magic")]
    Magic,
    #[error("frame length {0} over the limit")]
    Length(usize),
    #[error("checksum mismatch")]
    Checksum,
    #[error("malformed record: {0}")]
    Malformed(&'static str),
}

/// Encodes `batch` as one frame stamped `written_at` (ns since epoch).
pub fn encode_frame(batch: &Batch, written_at: i64, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    put_varint(out, batch.records.len() as u64);
    for r in &batch.records {
        encode_record(r, out);
    }
    let body_len = out.len() - start - HEADER_LEN;
    let mut h = crc32fast::Hasher::new();
    h.update(&written_at.to_le_bytes());
    h.update(&out[start + HEADER_LEN..]);
    let crc = h.finalize();
    let header = &mut out[start..start + HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&(body_len as u32).to_le_bytes());
    header[8..12].copy_from_slice(&crc.to_le_bytes());
    header[12..20].copy_from_slice(&written_at.to_le_bytes());
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub body_len: usize,
    pub crc: u32,
    pub written_at: i64,
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes of `buf`.
    pub fn parse(buf: &[u8]) -> Result<Header, CodecError> {
        if buf.len() < HEADER_LEN {
            return Err(CodecError::Truncated);
        }
        let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        if word(0) != MAGIC {
            return Err(CodecError::Magic);
        }
        let body_len = word(4) as usize;
        if body_len > MAX_BODY {
            return Err(CodecError::Length(body_len));
        }
        let mut t = [0u8; 8];
        t.copy_from_slice(&buf[12..20]);
        Ok(Header {
            body_len,
            crc: word(8),
            written_at: i64::from_le_bytes(t),
        })
    }

    /// Whether `body` matches the checksum.
    pub fn verify(&self, body: &[u8]) -> bool {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.written_at.to_le_bytes());
        h.update(body);
        h.finalize() == self.crc
    }
}

/// Decodes a verified frame body into records (without finalizers).
pub fn decode_body(body: &[u8]) -> Result<Vec<Record>, CodecError> {
    let mut buf = body;
    let n = get_varint(&mut buf)? as usize;
    // Each record takes at least 11 bytes: a count beyond that is corruption.
    if n > body.len() / 11 + 1 {
        return Err(CodecError::Malformed("record count"));
    }
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        records.push(decode_record(&mut buf)?);
    }
    if !buf.is_empty() {
        return Err(CodecError::Malformed("trailing bytes"));
    }
    Ok(records)
}

fn encode_record(r: &Record, out: &mut Vec<u8>) {
    out.put_i64_le(r.time);
    put_varint(out, r.tags.len() as u64);
    for (k, v) in &r.tags {
        put_str(out, k);
        put_str(out, v);
    }
    put_varint(out, r.fields.len() as u64);
    for (k, v) in &r.fields {
        put_str(out, k);
        match v {
            Value::F64(x) => {
                out.put_u8(0);
                out.put_f64_le(*x);
            }
            Value::I64(x) => {
                out.put_u8(1);
                out.put_i64_le(*x);
            }
            Value::Bool(b) => {
                out.put_u8(2);
                out.put_u8(u8::from(*b));
            }
            Value::Str(s) => {
                out.put_u8(3);
                put_str(out, s);
            }
            Value::Null => out.put_u8(4),
        }
    }
    match &r.payload {
        Some(p) => {
            out.put_u8(1);
            put_varint(out, p.len() as u64);
            out.extend_from_slice(p);
        }
        None => out.put_u8(0),
    }
    put_opt_str(out, r.meta.source.as_deref());
    match &r.meta.origin {
        Origin::None => out.put_u8(0),
        Origin::Mqtt { topic } => {
            out.put_u8(1);
            put_str(out, topic);
        }
        Origin::Kafka {
            topic,
            partition,
            offset,
        } => {
            out.put_u8(2);
            put_str(out, topic);
            out.put_i32_le(*partition);
            out.put_i64_le(*offset);
        }
        Origin::Sqs { message_id } => {
            out.put_u8(3);
            put_str(out, message_id);
        }
    }
    put_opt_str(out, r.meta.error.as_deref());
}

fn decode_record(buf: &mut &[u8]) -> Result<Record, CodecError> {
    let mut r = Record::new(get_i64(buf)?);
    let ntags = get_count(buf)?;
    r.tags.reserve(ntags);
    for _ in 0..ntags {
        let k = get_name(buf)?;
        let v = get_arc(buf)?;
        r.tags.push((k, v));
    }
    let nfields = get_count(buf)?;
    r.fields.reserve(nfields);
    for _ in 0..nfields {
        let k = get_name(buf)?;
        let v = match get_u8(buf)? {
            0 => Value::F64(f64::from_bits(get_i64(buf)? as u64)),
            1 => Value::I64(get_i64(buf)?),
            2 => Value::Bool(get_u8(buf)? != 0),
            3 => Value::Str(get_arc(buf)?),
            4 => Value::Null,
            _ => return Err(CodecError::Malformed("value type")),
        };
        r.fields.push((k, v));
    }
    r.payload = match get_u8(buf)? {
        0 => None,
        1 => {
            let len = get_count(buf)?;
            Some(Bytes::copy_from_slice(take(buf, len)?))
        }
        _ => return Err(CodecError::Malformed("payload flag")),
    };
    r.meta = Meta {
        source: get_opt_str(buf)?.map(|s| intern(&s)),
        origin: match get_u8(buf)? {
            0 => Origin::None,
            1 => Origin::Mqtt {
                topic: get_arc(buf)?,
            },
            2 => Origin::Kafka {
                topic: get_arc(buf)?,
                partition: get_i64_from(buf, 4)? as i32,
                offset: get_i64(buf)?,
            },
            3 => Origin::Sqs {
                message_id: get_arc(buf)?,
            },
            _ => return Err(CodecError::Malformed("origin")),
        },
        error: get_opt_str(buf)?,
    };
    Ok(r)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.put_u8(1);
            put_str(out, s);
        }
        None => out.put_u8(0),
    }
}

fn get_varint(buf: &mut &[u8]) -> Result<u64, CodecError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = get_u8(buf)?;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(CodecError::Malformed("varint"))
}

/// A length or count, which can never exceed the bytes left.
fn get_count(buf: &mut &[u8]) -> Result<usize, CodecError> {
    let n = get_varint(buf)?;
    if n > buf.len() as u64 {
        return Err(CodecError::Malformed("length"));
    }
    Ok(n as usize)
}

fn get_u8(buf: &mut &[u8]) -> Result<u8, CodecError> {
    if buf.is_empty() {
        return Err(CodecError::Malformed("truncated"));
    }
    Ok(buf.get_u8())
}

fn get_i64(buf: &mut &[u8]) -> Result<i64, CodecError> {
    get_i64_from(buf, 8)
}

fn get_i64_from(buf: &mut &[u8], width: usize) -> Result<i64, CodecError> {
    if buf.len() < width {
        return Err(CodecError::Malformed("truncated"));
    }
    Ok(if width == 4 {
        i64::from(buf.get_i32_le())
    } else {
        buf.get_i64_le()
    })
}

fn take<'a>(buf: &mut &'a [u8], len: usize) -> Result<&'a [u8], CodecError> {
    if buf.len() < len {
        return Err(CodecError::Malformed("truncated"));
    }
    let (head, rest) = buf.split_at(len);
    *buf = rest;
    Ok(head)
}

fn get_str<'a>(buf: &mut &'a [u8]) -> Result<&'a str, CodecError> {
    let len = get_count(buf)?;
    std::str::from_utf8(take(buf, len)?).map_err(|_| CodecError::Malformed("utf-8"))
}

fn get_arc(buf: &mut &[u8]) -> Result<Arc<str>, CodecError> {
    get_str(buf).map(Arc::from)
}

fn get_name(buf: &mut &[u8]) -> Result<Name, CodecError> {
    get_str(buf).map(intern)
}

fn get_opt_str(buf: &mut &[u8]) -> Result<Option<Arc<str>>, CodecError> {
    match get_u8(buf)? {
        0 => Ok(None),
        1 => get_arc(buf).map(Some),
        _ => Err(CodecError::Malformed("option flag")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Record {
        let mut r = Record::new(1_700_000_000_123_456_789);
        r.set_tag("device_id", "dev-1");
        r.set_tag("tenant", "ünï");
        r.set_field("temp", Value::F64(21.5));
        r.set_field("count", Value::I64(-3));
        r.set_field("ok", Value::Bool(true));
        r.set_field("state", Value::from("on"));
        r.set_field("nothing", Value::Null);
        r.payload = Some(Bytes::from_static(b"{\"temp\":21.5}"));
        r.meta.source = Some(intern("mqtt_in"));
        r.meta.origin = Origin::Kafka {
            topic: Arc::from("t"),
            partition: -1,
            offset: 42,
        };
        r.meta.error = Some(Arc::from("why"));
        r
    }

    fn roundtrip(records: Vec<Record>) -> Vec<Record> {
        let mut out = Vec::new();
        encode_frame(&Batch::new(records), 77, &mut out);
        let h = Header::parse(&out).expect("header");
        assert_eq!(h.written_at, 77);
        assert_eq!(out.len(), HEADER_LEN + h.body_len);
        let body = &out[HEADER_LEN..];
        assert!(h.verify(body));
        decode_body(body).expect("decode")
    }

    fn same(a: &Record, b: &Record) -> bool {
        a.time == b.time
            && a.tags == b.tags
            && a.fields.len() == b.fields.len()
            && a.fields.iter().zip(&b.fields).all(|((ka, va), (kb, vb))| {
                ka == kb
                    && match (va, vb) {
                        (Value::F64(x), Value::F64(y)) => x.to_bits() == y.to_bits(),
                        _ => va == vb,
                    }
            })
            && a.payload == b.payload
            && a.meta == b.meta
    }

    #[test]
    fn every_part_of_a_record_survives() {
        let r = sample();
        let back = roundtrip(vec![r.clone(), Record::new(0)]);
        assert_eq!(back.len(), 2);
        assert!(same(&back[0], &r));
        assert!(same(&back[1], &Record::new(0)));
    }

    #[test]
    fn a_flipped_byte_fails_the_checksum() {
        let mut out = Vec::new();
        encode_frame(&Batch::new(vec![sample()]), 1, &mut out);
        let h = Header::parse(&out).expect("header");
        out[HEADER_LEN + 5] ^= 0x40;
        assert!(!h.verify(&out[HEADER_LEN..]));
    }

    #[test]
    fn garbage_bodies_are_errors_not_panics() {
        for len in 0..64 {
            let body: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = decode_body(&body);
        }
        assert_eq!(Header::parse(&[0u8; 3]), Err(CodecError::Truncated));
        assert_eq!(Header::parse(&[0u8; 20]), Err(CodecError::Magic));
    }

    proptest! {
        #[test]
        fn arbitrary_records_roundtrip(
            time in any::<i64>(),
            tags in proptest::collection::vec(("[a-z]{1,8}", ".{0,12}"), 0..4),
            f in any::<f64>(),
            i in any::<i64>(),
            payload in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        ) {
            let mut r = Record::new(time);
            for (k, v) in &tags { r.set_tag(k, v.as_str()); }
            r.set_field("f", Value::F64(f));
            r.set_field("i", Value::I64(i));
            r.payload = payload.map(Bytes::from);
            let back = roundtrip(vec![r.clone()]);
            prop_assert!(same(&back[0], &r));
        }

        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_body(&body);
        }
    }
}
