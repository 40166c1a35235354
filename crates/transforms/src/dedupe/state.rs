//! The snapshot of `dedupe`'s settled keys in its state directory, so that a redelivery
//! arriving after a restart (an MQTT message whose PUBACK was lost in a crash) is still
//! recognised as a duplicate.
//!
//! One JSON file, `dedupe-keys.json`, replaced atomically (temp file, fsync, rename, directory
//! fsync): a crash leaves the old snapshot or the new one, never half of one. It names its
//! format, version and the `key` definition it was taken with; a snapshot this build cannot
//! use is ignored with a WARN and dedupe starts empty. Version 2 holds each key's 128-bit hash
//! (32 hex digits); a version 1 snapshot (the key texts) is read and hashed.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::{key_hash, KeyHash};

/// The snapshot's file name in the component's state directory.
pub(super) const FILE: &str = "dedupe-keys.json";
const FORMAT: &str = "sluice-dedupe-keys";
const VERSION: u32 = 2;
/// The version with key texts instead of hashes, still read.
const VERSION_TEXT: u32 = 1;

/// What a snapshot is written from: the settled keys in insertion order.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    format: &'static str,
    version: u32,
    key: &'a [String],
    /// Newest event time seen (ns), "now" for the window.
    newest: i64,
    /// `(event time of the first copy, key hash as 32 hex digits)`.
    entries: HexEntries<'a>,
}

/// Entries serialized with their hashes as hex, without a copy of the list.
struct HexEntries<'a>(&'a [(i64, KeyHash)]);

impl Serialize for HexEntries<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Hex(KeyHash);
        impl Serialize for Hex {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&format_args!("{:032x}", self.0))
            }
        }
        serializer.collect_seq(self.0.iter().map(|(t, h)| (*t, Hex(*h))))
    }
}

/// Read first, so that a snapshot of another format or version is reported as such rather
/// than as a parse error of its entries.
#[derive(Deserialize)]
struct Header {
    format: String,
    version: u32,
    key: Vec<String>,
    #[serde(rename = "entries")]
    _entries: IgnoredAny,
}

#[derive(Deserialize)]
struct Snapshot {
    newest: i64,
    entries: Vec<(i64, String)>,
}

/// A snapshot read back.
#[derive(Debug)]
pub(super) struct Restored {
    pub newest: i64,
    pub entries: Vec<(i64, KeyHash)>,
}

/// Why a snapshot was not used. Its message names the file.
#[derive(Debug, thiserror::Error)]
pub(super) enum LoadError {
    #[error("cannot read dedupe snapshot {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("dedupe snapshot {} is corrupt ({message})", path.display())]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "dedupe snapshot {} has format `{format}` version {version}; this build reads `{FORMAT}` version {VERSION}",
        path.display()
    )]
    Version {
        path: PathBuf,
        format: String,
        version: u32,
    },
    #[error(
        "dedupe snapshot {} was taken with key = {theirs:?}, this dedupe's key is {ours:?}",
        path.display()
    )]
    Key {
        path: PathBuf,
        theirs: Vec<String>,
        ours: Vec<String>,
    },
}

/// Serializes a snapshot.
pub(super) fn encode(key: &[String], newest: i64, entries: &[(i64, KeyHash)]) -> Vec<u8> {
    let snapshot = SnapshotRef {
        format: FORMAT,
        version: VERSION,
        key,
        newest,
        entries: HexEntries(entries),
    };
    // Strings, integers and a slice: serialization cannot fail.
    serde_json::to_vec(&snapshot).unwrap_or_default()
}

/// Reads the snapshot in `dir`: `Ok(None)` if there is none, an error if it is unusable.
pub(super) fn load(dir: &Path, key: &[String]) -> Result<Option<Restored>, LoadError> {
    let path = dir.join(FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LoadError::Read { path, source }),
    };
    let corrupt = |e: serde_json::Error| LoadError::Corrupt {
        path: path.clone(),
        message: e.to_string(),
    };
    let header: Header = serde_json::from_slice(&bytes).map_err(corrupt)?;
    if header.format != FORMAT || (header.version != VERSION && header.version != VERSION_TEXT) {
        return Err(LoadError::Version {
            path,
            format: header.format,
            version: header.version,
        });
    }
    if header.key != key {
        return Err(LoadError::Key {
            path,
            theirs: header.key,
            ours: key.to_vec(),
        });
    }
    let s: Snapshot = serde_json::from_slice(&bytes).map_err(corrupt)?;
    let mut entries = Vec::with_capacity(s.entries.len());
    for (time, key) in s.entries {
        let hash = if header.version == VERSION_TEXT {
            key_hash(&key)
        } else {
            KeyHash::from_str_radix(&key, 16).map_err(|e| LoadError::Corrupt {
                path: path.clone(),
                message: format!("key hash {key:?}: {e}"),
            })?
        };
        entries.push((time, hash));
    }
    Ok(Some(Restored {
        newest: s.newest,
        entries,
    }))
}

/// Replaces the snapshot in `dir` with `bytes` atomically, creating `dir` if needed. An error
/// carries the snapshot's path for the caller's log line.
pub(super) fn write(dir: &Path, bytes: &[u8]) -> Result<(), (PathBuf, io::Error)> {
    let path = dir.join(FILE);
    let temp = dir.join(format!("{FILE}.tmp"));
    let result = (|| {
        fs::create_dir_all(dir)?;
        let mut file = fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, &path)?;
        // The rename itself is durable only once the directory is synced.
        #[cfg(unix)]
        fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    result.map_err(|e| (path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Vec<String> {
        vec!["tags.device_id".into(), "seq".into()]
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (key_hash("t:a\u{1f}i64:1\u{1f}"), key_hash("t:b\u{1f}"));
        let bytes = encode(&key(), 7, &[(1, a), (7, b), (8, 0)]);
        write(dir.path(), &bytes).expect("written");
        assert!(!dir.path().join(format!("{FILE}.tmp")).exists());
        let r = load(dir.path(), &key())
            .expect("readable")
            .expect("present");
        assert_eq!(r.newest, 7);
        assert_eq!(r.entries, vec![(1, a), (7, b), (8, 0)]);
    }

    #[test]
    fn a_version_1_snapshot_of_key_texts_is_read_and_hashed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v1 = r#"{"format":"sluice-dedupe-keys","version":1,"key":["tags.device_id","seq"],"newest":7,"entries":[[1,"t:a\u001fi64:1\u001f"]]}"#;
        fs::write(dir.path().join(FILE), v1).expect("written");
        let r = load(dir.path(), &key())
            .expect("readable")
            .expect("present");
        assert_eq!(r.entries, vec![(1, key_hash("t:a\u{1f}i64:1\u{1f}"))]);
    }

    #[test]
    fn missing_is_none_and_unusable_snapshots_say_why_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load(dir.path(), &key()).expect("no error").is_none());
        let path = dir.path().join(FILE);
        let name = path.display().to_string();

        // Another key definition.
        write(dir.path(), &encode(&["seq".to_string()], 0, &[])).expect("written");
        let e = load(dir.path(), &key()).expect_err("other key").to_string();
        assert!(e.contains(&name) && e.contains("[\"seq\"]"), "{e}");

        // Another version.
        let v3 = String::from_utf8(encode(&key(), 0, &[]))
            .expect("utf-8")
            .replace("\"version\":2", "\"version\":3");
        fs::write(&path, v3).expect("written");
        let e = load(dir.path(), &key()).expect_err("version 3").to_string();
        assert!(e.contains(&name) && e.contains("version 3"), "{e}");

        // Truncated, garbage, wrong entry types.
        let good = encode(&key(), 0, &[(1, 5)]);
        for bad in [
            &good[..good.len() / 2],
            b"\x00\xffnot json".as_slice(),
            br#"{"format":"sluice-dedupe-keys","version":2,"key":["tags.device_id","seq"],"newest":0,"entries":[["x",1]]}"#,
            br#"{"format":"sluice-dedupe-keys","version":2,"key":["tags.device_id","seq"],"newest":0,"entries":[[1,"not hex"]]}"#,
        ] {
            fs::write(&path, bad).expect("written");
            let e = load(dir.path(), &key()).expect_err("corrupt").to_string();
            assert!(e.contains(&name) && e.contains("corrupt"), "{e}");
        }
    }
}
