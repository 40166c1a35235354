//! The saved progress of a global watermark: the event time below which every window's rollup
//! has been delivered (or dead-lettered).
//!
//! After a crash, or a shutdown that left records in a disk buffer, some inputs come back
//! (redelivered by the source, replayed by the buffer). Records of windows whose rollup was
//! already delivered can be among them: a replayed batch that straddles a window boundary
//! holds the tail of a delivered window. Without the saved progress they would reopen that
//! window and emit it again with only that tail. With it, the stage starts with its watermark
//! there and such records leave on `late`, as they would have before the restart.
//!
//! The file (`<state_dir>/aggregate.json`) is written at most once a second while the
//! watermark moves, and at shutdown; it is removed when the input ended for good and every
//! window was flushed (a file replayed again then starts afresh). `per_group` watermarks are
//! not saved.

use std::fs;
use std::io::Write;
use std::path::PathBuf;

const VERSION: u32 = 1;
const SECOND: i64 = 1_000_000_000;

#[derive(Debug)]
pub(super) struct Progress {
    file: PathBuf,
    saved: i64,
    saved_at: i64,
}

impl Progress {
    /// Progress kept in `dir`, with the value saved by an earlier run, if any.
    pub(super) fn open(dir: PathBuf, name: &str) -> (Progress, Option<i64>) {
        let file = dir.join("aggregate.json");
        let restored = match fs::read_to_string(&file) {
            Ok(text) => match parse(&text) {
                Some(w) => Some(w),
                None => {
                    tracing::warn!(transform = %name, file = %file.display(), "aggregate: unreadable saved watermark ignored; starting afresh");
                    None
                }
            },
            Err(_) => None,
        };
        (
            Progress {
                file,
                saved: restored.unwrap_or(i64::MIN),
                saved_at: i64::MIN,
            },
            restored,
        )
    }

    /// Saves `delivered_through` if it moved and the last save is a second old (or `force`).
    pub(super) fn save(&mut self, delivered_through: i64, now: i64, force: bool) {
        if delivered_through <= self.saved && !force {
            return;
        }
        if !force && now.saturating_sub(self.saved_at) < SECOND {
            return;
        }
        match write(&self.file, delivered_through) {
            Ok(()) => {
                self.saved = delivered_through;
                self.saved_at = now;
            }
            Err(e) => {
                tracing::warn!(file = %self.file.display(), error = %e, "aggregate: cannot save the watermark");
            }
        }
    }

    /// Forgets the saved progress (the input ended and every window was flushed).
    pub(super) fn clear(&mut self) {
        let _ = fs::remove_file(&self.file);
    }
}

fn parse(text: &str) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v.get("version")?.as_u64()? != u64::from(VERSION) {
        return None;
    }
    v.get("delivered_through")?.as_i64()
}

fn write(file: &PathBuf, delivered_through: i64) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension("json.tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(
        serde_json::json!({ "version": VERSION, "delivered_through": delivered_through })
            .to_string()
            .as_bytes(),
    )?;
    f.sync_all()?;
    fs::rename(&tmp, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_restores_and_clears() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut p, restored) = Progress::open(dir.path().to_path_buf(), "t");
        assert_eq!(restored, None);
        p.save(5 * SECOND, 10 * SECOND, false);
        p.save(6 * SECOND, 10 * SECOND + 1, false); // throttled
        let (_, restored) = Progress::open(dir.path().to_path_buf(), "t");
        assert_eq!(restored, Some(5 * SECOND));
        p.save(6 * SECOND, 12 * SECOND, false);
        let (mut p2, restored) = Progress::open(dir.path().to_path_buf(), "t");
        assert_eq!(restored, Some(6 * SECOND));
        p2.clear();
        assert_eq!(Progress::open(dir.path().to_path_buf(), "t").1, None);
        fs::write(dir.path().join("aggregate.json"), "{garbage").expect("write");
        assert_eq!(Progress::open(dir.path().to_path_buf(), "t").1, None);
    }
}
