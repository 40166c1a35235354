//! The buffer's files: a directory of append-only segment files holding frames.
//!
//! A position is a byte offset in one global, ever-growing log; segment `N.seg` holds the bytes
//! from position `N` on. The writer appends to the newest segment and starts a new one when it
//! reaches the segment size (and at every start, so a segment written before a crash is never
//! appended to). The reader walks frames in order and steps over damage: a frame whose checksum
//! fails is skipped by searching for the next frame marker; a torn frame at the end of a segment
//! (a crash mid-write) ends that segment.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::codec::{self, CodecError, Header, HEADER_LEN};
use crate::record::Record;

/// The file of the segment starting at global position `start`.
pub fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.seg"))
}

/// Every segment in `dir`: start position → length in bytes.
pub fn list(dir: &Path) -> io::Result<BTreeMap<u64, u64>> {
    let mut map = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".seg")) else {
            continue;
        };
        if let Ok(start) = stem.parse::<u64>() {
            map.insert(start, entry.metadata()?.len());
        }
    }
    Ok(map)
}

/// Syncs a directory, so that created, renamed and removed entries survive a power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One frame as found by the reader.
#[derive(Debug)]
pub enum Found {
    /// A valid frame `[start, end)`.
    Frame {
        start: u64,
        end: u64,
        written_at: i64,
        records: Vec<Record>,
    },
    /// Bytes `[start, end)` were damaged and skipped (`reason` says why).
    Skipped {
        start: u64,
        end: u64,
        reason: CodecError,
    },
}

/// Scans `data` (the bytes of one segment from offset `base` on) for the first valid frame at
/// or after index `from`; returns its index, or `None`.
fn resync(data: &[u8], from: usize) -> Option<usize> {
    let magic = codec::MAGIC.to_le_bytes();
    let mut i = from;
    while i + HEADER_LEN <= data.len() {
        if data[i..i + 4] == magic {
            if let Ok(h) = Header::parse(&data[i..]) {
                let end = i + HEADER_LEN + h.body_len;
                if end <= data.len() && h.verify(&data[i + HEADER_LEN..end]) {
                    return Some(i);
                }
            }
        }
        i += 1;
    }
    None
}

/// Where the valid data of a segment ends: past its last frame that verifies. Used at start
/// to cut a torn tail left by a crash.
pub fn valid_end(path: &Path) -> io::Result<u64> {
    let data = fs::read(path)?;
    let mut i = 0usize;
    let mut end = 0usize;
    while i + HEADER_LEN <= data.len() {
        let ok = Header::parse(&data[i..]).ok().and_then(|h| {
            let e = i + HEADER_LEN + h.body_len;
            (e <= data.len() && h.verify(&data[i + HEADER_LEN..e])).then_some(e)
        });
        match ok {
            Some(e) => {
                end = e;
                i = e;
            }
            None => match resync(&data, i + 1) {
                Some(next) => i = next,
                None => break,
            },
        }
    }
    Ok(end as u64)
}

/// Appends frames to the newest segment.
pub struct Writer {
    dir: PathBuf,
    file: File,
    seg_start: u64,
    seg_len: u64,
    segment_size: u64,
}

impl Writer {
    /// Starts a new segment at `start`.
    pub fn create(dir: &Path, start: u64, segment_size: u64) -> io::Result<Writer> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(dir, start))?;
        sync_dir(dir)?;
        Ok(Writer {
            dir: dir.to_path_buf(),
            file,
            seg_start: start,
            seg_len: 0,
            segment_size,
        })
    }

    /// The position after the last byte written.
    pub fn position(&self) -> u64 {
        self.seg_start + self.seg_len
    }

    /// Start of the segment being written.
    pub fn segment_start(&self) -> u64 {
        self.seg_start
    }

    /// Appends one encoded frame; returns `Some(new segment start)` when it rolled first.
    pub fn append(&mut self, frame: &[u8]) -> io::Result<Option<u64>> {
        let mut rolled = None;
        if self.seg_len > 0 && self.seg_len + frame.len() as u64 > self.segment_size {
            self.file.sync_data()?;
            let next = self.position();
            *self = Writer::create(&self.dir, next, self.segment_size)?;
            rolled = Some(next);
        }
        if let Err(e) = self.file.write_all(frame) {
            // Cut what a partial write left, so the next frame starts at a frame boundary.
            let _ = self.file.set_len(self.seg_len);
            return Err(e);
        }
        self.seg_len += frame.len() as u64;
        Ok(rolled)
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Reads frames at increasing positions.
pub struct Reader {
    dir: PathBuf,
    /// Open segment: (start, file).
    open: Option<(u64, File)>,
    chunk: Vec<u8>,
    /// Global position of `chunk[0]`.
    chunk_pos: u64,
}

/// Bytes read at once.
const CHUNK: usize = 1 << 20;

impl Reader {
    pub fn new(dir: &Path) -> Reader {
        Reader {
            dir: dir.to_path_buf(),
            open: None,
            chunk: Vec::new(),
            chunk_pos: 0,
        }
    }

    fn file(&mut self, seg: u64) -> io::Result<&File> {
        if self.open.as_ref().map(|(s, _)| *s) != Some(seg) {
            self.open = Some((seg, File::open(segment_path(&self.dir, seg))?));
            self.chunk.clear();
        }
        match &self.open {
            Some((_, f)) => Ok(f),
            None => Err(io::Error::other("segment not open")),
        }
    }

    /// Makes `chunk` hold bytes from `pos` (in segment `seg`) on, at least `need` of them when
    /// the segment has them below `limit`. Returns the bytes available from `pos`.
    fn fill(&mut self, seg: u64, pos: u64, need: usize, limit: u64) -> io::Result<&[u8]> {
        let have = self.open.as_ref().map(|(s, _)| *s) == Some(seg)
            && pos >= self.chunk_pos
            && pos - self.chunk_pos <= self.chunk.len() as u64;
        let offset_in_chunk = if have {
            (pos - self.chunk_pos) as usize
        } else {
            usize::MAX
        };
        if offset_in_chunk == usize::MAX || self.chunk.len() - offset_in_chunk < need {
            let want = (limit.saturating_sub(pos) as usize).min(CHUNK.max(need));
            let mut buf = vec![0u8; want];
            let file = self.file(seg)?;
            let mut got = 0;
            while got < want {
                match file.read_at(&mut buf[got..], pos - seg + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            buf.truncate(got);
            self.chunk = buf;
            self.chunk_pos = pos;
            return Ok(&self.chunk[..]);
        }
        Ok(&self.chunk[offset_in_chunk..])
    }

    /// Reads the frame at `pos` in segment `seg`, not reading at or past `limit` (the end of
    /// committed data in that segment). `Ok(None)`: no complete frame before `limit`.
    pub fn next(&mut self, seg: u64, pos: u64, limit: u64) -> io::Result<Option<Found>> {
        if pos + HEADER_LEN as u64 > limit {
            return Ok(None);
        }
        let data = self.fill(seg, pos, HEADER_LEN, limit)?;
        let header = match Header::parse(data) {
            Ok(h) => h,
            Err(CodecError::Truncated) => return Ok(None),
            Err(reason) => return self.skip(seg, pos, limit, reason).map(Some),
        };
        let total = HEADER_LEN + header.body_len;
        if pos + total as u64 > limit {
            return Ok(None);
        }
        let data = self.fill(seg, pos, total, limit)?;
        if data.len() < total {
            return Ok(None);
        }
        let body = &data[HEADER_LEN..total];
        if !header.verify(body) {
            return self.skip(seg, pos, limit, CodecError::Checksum).map(Some);
        }
        match codec::decode_body(body) {
            Ok(records) => Ok(Some(Found::Frame {
                start: pos,
                end: pos + total as u64,
                written_at: header.written_at,
                records,
            })),
            Err(reason) => Ok(Some(Found::Skipped {
                start: pos,
                end: pos + total as u64,
                reason,
            })),
        }
    }

    /// Damage at `pos`: finds the next valid frame before `limit` (or gives up the rest).
    fn skip(&mut self, seg: u64, pos: u64, limit: u64, reason: CodecError) -> io::Result<Found> {
        let len = limit.saturating_sub(pos) as usize;
        let data = self.fill(seg, pos, len, limit)?.to_vec();
        let next = resync(&data, 1).map_or(limit, |i| pos + i as u64);
        Ok(Found::Skipped {
            start: pos,
            end: next,
            reason,
        })
    }

    /// Re-reads the valid frames of `[start, end)` (a range handed out before), for replay.
    pub fn reread(
        &mut self,
        segments: &BTreeMap<u64, u64>,
        start: u64,
        end: u64,
    ) -> io::Result<Vec<Record>> {
        let mut out = Vec::new();
        let mut pos = start;
        while pos < end {
            let Some((&seg, &len)) = segments.range(..=pos).next_back() else {
                break;
            };
            let limit = (seg + len).min(end);
            if pos >= seg + len {
                // Past the segment's end: continue in the next one.
                match segments.range(pos + 1..).next() {
                    Some((&next, _)) => {
                        pos = next;
                        continue;
                    }
                    None => break,
                }
            }
            match self.next(seg, pos, limit)? {
                Some(Found::Frame {
                    end: e, records, ..
                }) => {
                    out.extend(records);
                    pos = e;
                }
                Some(Found::Skipped { end: e, .. }) => pos = e,
                None => pos = seg + len,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Batch;

    fn frame(n: usize, t: i64) -> Vec<u8> {
        let records = (0..n).map(|i| Record::new(t + i as i64)).collect();
        let mut out = Vec::new();
        codec::encode_frame(&Batch::new(records), t, &mut out);
        out
    }

    #[test]
    fn writes_rolls_and_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = Writer::create(dir.path(), 0, 200).expect("create");
        let mut ends = Vec::new();
        for i in 0..10 {
            w.append(&frame(2, i * 10)).expect("append");
            ends.push(w.position());
        }
        w.sync().expect("sync");
        let segs = list(dir.path()).expect("list");
        assert!(segs.len() > 1, "rolled into several segments: {segs:?}");
        let mut r = Reader::new(dir.path());
        let mut pos = 0;
        let mut times = Vec::new();
        for (&seg, &len) in &segs {
            while let Some(found) = r.next(seg, pos, seg + len).expect("read") {
                match found {
                    Found::Frame { end, records, .. } => {
                        times.extend(records.iter().map(|r| r.time));
                        pos = end;
                    }
                    Found::Skipped { .. } => panic!("no damage written"),
                }
            }
        }
        assert_eq!(times.len(), 20);
        assert_eq!(times[0], 0);
        assert_eq!(times[19], 91);
        let again = r.reread(&segs, ends[3], ends[5]).expect("reread");
        assert_eq!(
            again.iter().map(|r| r.time).collect::<Vec<_>>(),
            [40, 41, 50, 51]
        );
    }

    #[test]
    fn damage_is_skipped_and_a_torn_tail_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = Writer::create(dir.path(), 0, 1 << 20).expect("create");
        let mut bounds = vec![0];
        for i in 0..5 {
            w.append(&frame(3, i * 10)).expect("append");
            bounds.push(w.position());
        }
        let path = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&path).expect("read");
        // Flip a byte inside the second frame's body, and tear the last frame.
        bytes[bounds[1] as usize + HEADER_LEN + 3] ^= 0xff;
        bytes.truncate(bounds[5] as usize - 4);
        fs::write(&path, &bytes).expect("write");
        assert_eq!(valid_end(&path).expect("scan"), bounds[4]);

        let mut r = Reader::new(dir.path());
        let limit = bytes.len() as u64;
        let mut pos = 0;
        let mut frames = 0;
        let mut skipped = Vec::new();
        while let Some(found) = r.next(0, pos, limit).expect("read") {
            match found {
                Found::Frame { end, .. } => {
                    frames += 1;
                    pos = end;
                }
                Found::Skipped { start, end, .. } => {
                    skipped.push((start, end));
                    pos = end;
                }
            }
        }
        assert_eq!(frames, 3, "frames 0, 2, 3 survive");
        assert_eq!(skipped, vec![(bounds[1], bounds[2])]);
        assert_eq!(pos, bounds[4], "the torn frame is never returned");
    }
}
