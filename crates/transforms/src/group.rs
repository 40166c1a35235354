//! Grouping records by tag values: the key of an aggregation group, an anomaly series or a
//! dedupe entry. Keys hold the shared tag values (`Arc<str>`), so building one allocates
//! nothing for up to four tags.

use std::sync::Arc;

use sluice_core::record::{intern, Name, Record};
use smallvec::SmallVec;

/// The values of the `group_by` tags of one record, in `group_by` order.
pub type GroupKey = SmallVec<[Arc<str>; 4]>;

/// Which tags form a group.
#[derive(Debug, Clone, Default)]
pub struct GroupBy {
    tags: Vec<Name>,
}

impl GroupBy {
    pub fn new(tags: &[String]) -> Self {
        GroupBy {
            tags: tags.iter().map(|t| intern(t)).collect(),
        }
    }

    /// The tag names.
    pub fn tags(&self) -> &[Name] {
        &self.tags
    }

    /// The key of `record`; an error naming the first missing tag.
    pub fn key(&self, record: &Record) -> Result<GroupKey, String> {
        let mut key = GroupKey::new();
        for name in &self.tags {
            match record
                .tags
                .iter()
                .find(|(k, _)| Arc::ptr_eq(k, name) || k == name)
            {
                Some((_, v)) => key.push(v.clone()),
                None => return Err(format!("missing group_by tag `{name}`")),
            }
        }
        Ok(key)
    }

    /// The tags of an output record for `key`.
    pub fn tags_of(&self, key: &GroupKey) -> Vec<(Name, Arc<str>)> {
        self.tags.iter().cloned().zip(key.iter().cloned()).collect()
    }

    /// A readable form of `key`: values joined with `/` (`dev-0001`, `acme/dev-0001`).
    pub fn display(key: &GroupKey) -> String {
        key.iter().map(|v| &**v).collect::<Vec<_>>().join("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_follows_group_by_order_and_reports_missing_tags() {
        let g = GroupBy::new(&["tenant".into(), "device_id".into()]);
        let mut r = Record::new(0);
        r.set_tag("device_id", "d1");
        r.set_tag("tenant", "acme");
        let key = g.key(&r).expect("both tags present");
        assert_eq!(GroupBy::display(&key), "acme/d1");
        assert_eq!(g.tags_of(&key)[1].0.as_ref(), "device_id");
        r.remove_tag("tenant");
        assert_eq!(
            g.key(&r).expect_err("tenant missing"),
            "missing group_by tag `tenant`"
        );
    }

    #[test]
    fn empty_group_by_is_one_group() {
        let g = GroupBy::new(&[]);
        assert!(g.key(&Record::new(0)).expect("no tags needed").is_empty());
    }
}
