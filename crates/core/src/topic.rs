//! Topic patterns: extract tags from topic segments.
//!
//! `devices/{device_id}/data` matches `devices/dev-7/data` and yields `device_id = "dev-7"`;
//! `mtic/msg/client/realtime/{tenant_id}/{project_id}/#` yields tenant and project ids from any
//! deeper topic. `+` matches one segment without capturing, `#` (last only) matches the rest.

use std::sync::Arc;

use crate::record::{intern, Name};

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    Capture(Name),
    Any,
    Rest,
}

/// A compiled topic pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicPattern {
    source: String,
    segments: Vec<Segment>,
}

impl TopicPattern {
    /// Compiles `pattern`; errors name what is wrong.
    pub fn new(pattern: &str) -> Result<Self, String> {
        let parts: Vec<&str> = pattern.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            let seg = if *p == "#" {
                if i + 1 != parts.len() {
                    return Err(format!(
                        "topic pattern {pattern:?}: `#` must be the last segment"
                    ));
                }
                Segment::Rest
            } else if *p == "+" {
                Segment::Any
            } else if let Some(name) = p.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("topic pattern {pattern:?}: invalid capture `{p}`"));
                }
                Segment::Capture(intern(name))
            } else if p.contains(['{', '}', '+', '#']) {
                return Err(format!(
                    "topic pattern {pattern:?}: segment `{p}` mixes text with a wildcard or capture"
                ));
            } else {
                Segment::Literal(p.to_string())
            };
            segments.push(seg);
        }
        Ok(TopicPattern {
            source: pattern.to_string(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The pattern as an MQTT subscription filter (captures become `+`).
    pub fn filter(&self) -> String {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.as_str(),
                Segment::Capture(_) | Segment::Any => "+",
                Segment::Rest => "#",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Matches `topic`, calling `capture(name, value)` for each capture. Returns whether it
    /// matched (captures may have been reported before a later segment failed).
    pub fn captures(&self, topic: &str, mut capture: impl FnMut(&Name, &str)) -> bool {
        let mut parts = topic.split('/');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                _ => {
                    let Some(part) = parts.next() else {
                        return false;
                    };
                    match seg {
                        Segment::Literal(l) if l != part => return false,
                        Segment::Capture(name) => capture(name, part),
                        _ => {}
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// The captures of `topic`, or `None` if it does not match.
    pub fn extract(&self, topic: &str) -> Option<Vec<(Name, Arc<str>)>> {
        let mut out = Vec::new();
        self.captures(topic, |n, v| out.push((n.clone(), Arc::from(v))))
            .then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_device_id() {
        let p = TopicPattern::new("devices/{device_id}/data").expect("valid");
        let tags = p.extract("devices/dev-7/data").expect("matches");
        assert_eq!(tags.len(), 1);
        assert_eq!((&*tags[0].0, &*tags[0].1), ("device_id", "dev-7"));
        assert!(p.extract("devices/dev-7/status").is_none());
        assert!(p.extract("devices/dev-7/data/extra").is_none());
        assert!(p.extract("devices").is_none());
        assert_eq!(p.filter(), "devices/+/data");
    }

    #[test]
    fn tenant_project_with_rest() {
        let p = TopicPattern::new("mtic/msg/client/realtime/{tenant_id}/{project_id}/#")
            .expect("valid");
        let tags = p
            .extract("mtic/msg/client/realtime/acme/p1/dev9/temp")
            .expect("matches");
        let v: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(v, vec![("tenant_id", "acme"), ("project_id", "p1")]);
        assert_eq!(p.filter(), "mtic/msg/client/realtime/+/+/#");
    }

    #[test]
    fn rejects_bad_patterns() {
        assert!(TopicPattern::new("a/#/b").is_err());
        assert!(TopicPattern::new("a/{}/b").is_err());
        assert!(TopicPattern::new("a/x{id}/b").is_err());
    }
}
