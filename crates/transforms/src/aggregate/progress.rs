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
//! window was flushed (a file replayed again then starts afresh). With `per_group` watermarks
//! the file holds one delivered-through time per group still known to the stage (at most
//! `max_groups`), saved when one moved.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use crate::group::GroupKey;

const VERSION: u32 = 1;
const SECOND: i64 = 1_000_000_000;

#[derive(Debug)]
pub(super) struct Progress {
    file: PathBuf,
    saved: i64,
    saved_at: i64,
}

/// What an earlier run saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Saved {
    /// `global`: the stage's delivered-through event time.
    Global(i64),
    /// `per_group`: each group's delivered-through event time.
    Groups(Vec<(GroupKey, i64)>),
}

impl Progress {
    /// Progress kept in `dir`, with the value saved by an earlier run, if any.
    pub(super) fn open(dir: PathBuf, name: &str) -> (Progress, Option<Saved>) {
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
                saved: match restored {
                    Some(Saved::Global(w)) => w,
                    _ => i64::MIN,
                },
                saved_at: i64::MIN,
            },
            restored,
        )
    }

    /// `per_group`: saves every group's delivered-through time if `changed` and the last save
    /// is a second old (or `force`).
    pub(super) fn save_groups(
        &mut self,
        groups: &[(GroupKey, i64)],
        now: i64,
        changed: bool,
        force: bool,
    ) {
        if !force && (!changed || now.saturating_sub(self.saved_at) < SECOND) {
            return;
        }
        let list: Vec<serde_json::Value> = groups
            .iter()
            .map(|(key, through)| {
                let key: Vec<&str> = key.iter().map(|v| &**v).collect();
                serde_json::json!([key, through])
            })
            .collect();
        let doc = serde_json::json!({ "version": VERSION, "groups": list });
        match write(&self.file, &doc) {
            Ok(()) => self.saved_at = now,
            Err(e) => {
                tracing::warn!(file = %self.file.display(), error = %e, "aggregate: cannot save the per-group watermarks");
            }
        }
    }

    /// Saves `delivered_through` if it moved and the last save is a second old (or `force`).
    pub(super) fn save(&mut self, delivered_through: i64, now: i64, force: bool) {
        if delivered_through <= self.saved && !force {
            return;
        }
        if !force && now.saturating_sub(self.saved_at) < SECOND {
            return;
        }
        let doc = serde_json::json!({ "version": VERSION, "delivered_through": delivered_through });
        match write(&self.file, &doc) {
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

fn parse(text: &str) -> Option<Saved> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v.get("version")?.as_u64()? != u64::from(VERSION) {
        return None;
    }
    if let Some(through) = v.get("delivered_through") {
        return through.as_i64().map(Saved::Global);
    }
    let mut groups = Vec::new();
    for entry in v.get("groups")?.as_array()? {
        let key = entry.get(0)?.as_array()?;
        let key: Option<GroupKey> = key
            .iter()
            .map(|part| part.as_str().map(Arc::<str>::from))
            .collect();
        groups.push((key?, entry.get(1)?.as_i64()?));
    }
    Some(Saved::Groups(groups))
}

fn write(file: &PathBuf, doc: &serde_json::Value) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension("json.tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(doc.to_string().as_bytes())?;
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
        assert_eq!(restored, Some(Saved::Global(5 * SECOND)));
        p.save(6 * SECOND, 12 * SECOND, false);
        let (mut p2, restored) = Progress::open(dir.path().to_path_buf(), "t");
        assert_eq!(restored, Some(Saved::Global(6 * SECOND)));
        p2.clear();
        assert_eq!(Progress::open(dir.path().to_path_buf(), "t").1, None);
        fs::write(dir.path().join("aggregate.json"), "{garbage").expect("write");
        assert_eq!(Progress::open(dir.path().to_path_buf(), "t").1, None);
    }

    #[test]
    fn saves_and_restores_per_group_watermarks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut p, _) = Progress::open(dir.path().to_path_buf(), "t");
        let key = |parts: &[&str]| -> GroupKey { parts.iter().map(|s| Arc::from(*s)).collect() };
        let groups = vec![
            (key(&["acme", "d1"]), 5 * SECOND),
            (key(&["acme", "d/2"]), -7),
        ];
        p.save_groups(&groups, 10 * SECOND, false, false); // nothing changed
        assert_eq!(Progress::open(dir.path().to_path_buf(), "t").1, None);
        p.save_groups(&groups, 10 * SECOND, true, false);
        assert_eq!(
            Progress::open(dir.path().to_path_buf(), "t").1,
            Some(Saved::Groups(groups.clone()))
        );
        p.save_groups(&[], 10 * SECOND + 1, true, false); // throttled
        assert_eq!(
            Progress::open(dir.path().to_path_buf(), "t").1,
            Some(Saved::Groups(groups))
        );
    }
}
