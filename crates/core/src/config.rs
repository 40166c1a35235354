//! Pipeline files: TOML, Vector-style.
//!
//! ```toml
//! [pipeline]
//! id = "demo"                 # used for stable client ids; default: first file's stem
//! shutdown_timeout = "30s"
//!
//! [sources.sim]
//! type = "simulator"
//! devices = 10
//!
//! [sinks.out]
//! type = "console"
//! inputs = ["sim"]            # "component" or "component.output" (e.g. "sim.dead_letter")
//! buffer = { max_batches = 16, when_full = "block" }
//! ```
//!
//! Before parsing, `${VAR}` and `${VAR:-default}` are replaced from the environment (`$$` is a
//! literal `$`). Several files are merged into one pipeline; a name may be declared once.
//! Every error names the file and line, and the component and option when there is one.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toml::Spanned;

use crate::channel::BufferConfig;
use crate::metrics::Kind;

/// A duration written as a string: `"500ms"`, `"10s"`, `"1m"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| {
                format!("invalid duration {s:?}: {e} (examples: \"500ms\", \"10s\", \"1m\")")
            })
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "format": "duration" })
    }
}

/// A size written as a string (`"8MiB"`, `"512KB"`, `"1GiB"`) or an integer number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        bytesize::ByteSize::from_str(s.trim())
            .map(|b| ByteSize(b.as_u64()))
            .map_err(|e| format!("invalid size {s:?}: {e} (examples: \"8MiB\", \"512KB\")"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec_short())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "format": "size" })
    }
}

/// Where something was declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: Arc<Path>,
    /// 1-based line number.
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A problem in a pipeline file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub location: Option<Location>,
    /// `sources.NAME`, `transforms.NAME` or `sinks.NAME`.
    pub component: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = &self.location {
            write!(f, "{l}: ")?;
        }
        if let Some(c) = &self.component {
            write!(f, "{c}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl ConfigError {
    pub fn new(message: impl Into<String>) -> Self {
        ConfigError {
            location: None,
            component: None,
            message: message.into(),
        }
    }
}

/// Pipeline-wide settings (`[pipeline]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Identifies the pipeline; sources derive stable client ids from it. Default: the stem of
    /// the first file (`demo` for `pipelines/demo.toml`).
    #[serde(default)]
    pub id: Option<String>,
    /// How long a graceful shutdown may take (drain, flush, acknowledge) before the remaining
    /// tasks are aborted and sluice exits non-zero. Default "30s".
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
}

fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

impl Default for PipelineSettings {
    fn default() -> Self {
        PipelineSettings {
            id: None,
            shutdown_timeout: default_shutdown_timeout(),
        }
    }
}

/// One component as declared in a file, before its options are interpreted.
#[derive(Debug, Clone)]
pub struct ComponentDecl {
    pub kind: Kind,
    pub name: String,
    /// The `type = "…"` value.
    pub type_name: String,
    /// `inputs = [...]` (empty for sources).
    pub inputs: Vec<String>,
    /// `buffer = {...}` (transforms and sinks).
    pub buffer: BufferConfig,
    /// All other keys: the component's own options.
    pub options: toml::Table,
    /// Where the component's table starts.
    pub location: Location,
    /// Line of each top-level key of the component's table.
    pub key_lines: HashMap<String, usize>,
}

impl ComponentDecl {
    /// `sources.NAME`, `transforms.NAME` or `sinks.NAME`.
    pub fn path(&self) -> String {
        format!("{}s.{}", self.kind.as_str(), self.name)
    }

    /// An error about this component, at the line of `key` when it is one of its keys.
    pub fn error(&self, key: Option<&str>, message: impl Into<String>) -> ConfigError {
        let line = key
            .and_then(|k| self.key_lines.get(k).copied())
            .unwrap_or(self.location.line);
        ConfigError {
            location: Some(Location {
                file: self.location.file.clone(),
                line,
            }),
            component: Some(self.path()),
            message: message.into(),
        }
    }
}

/// A whole pipeline: every component of every file, in declaration order.
#[derive(Debug, Clone, Default)]
pub struct PipelineConfig {
    pub settings: PipelineSettings,
    pub components: Vec<ComponentDecl>,
}

impl PipelineConfig {
    /// The pipeline's id (settings, or the given default).
    pub fn id(&self) -> &str {
        self.settings.id.as_deref().unwrap_or("sluice")
    }
}

type RawTable = IndexMap<Spanned<String>, Spanned<toml::Value>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    pipeline: Option<PipelineSettings>,
    #[serde(default)]
    sources: IndexMap<String, Spanned<RawTable>>,
    #[serde(default)]
    transforms: IndexMap<String, Spanned<RawTable>>,
    #[serde(default)]
    sinks: IndexMap<String, Spanned<RawTable>>,
}

/// Replaces `${VAR}` and `${VAR:-default}` from `env`; `$$` stands for `$`.
pub fn interpolate(
    text: &str,
    file: &Path,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<ConfigError>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    for (idx, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            if let Some(stripped) = after.strip_prefix('$') {
                out.push('$');
                rest = stripped;
            } else if let Some(body) = after.strip_prefix('{') {
                let Some(end) = body.find('}') else {
                    errors.push(file_error(
                        file,
                        idx + 1,
                        "unclosed `${` (write `$$` for a literal `$`)",
                    ));
                    out.push_str(&rest[pos..]);
                    rest = "";
                    break;
                };
                let expr = &body[..end];
                let (name, default) = match expr.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (expr, None),
                };
                let valid =
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    errors.push(file_error(
                        file,
                        idx + 1,
                        format!("invalid variable name `{name}` in `${{{expr}}}`"),
                    ));
                } else {
                    match (env(name), default) {
                        (Some(v), _) => out.push_str(&v),
                        (None, Some(d)) => out.push_str(d),
                        (None, None) => errors.push(file_error(
                            file,
                            idx + 1,
                            format!("environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)"),
                        )),
                    }
                }
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn file_error(file: &Path, line: usize, message: impl Into<String>) -> ConfigError {
    ConfigError {
        location: Some(Location {
            file: Arc::from(file),
            line,
        }),
        component: None,
        message: message.into(),
    }
}

/// 1-based line of byte offset `pos` in `text`.
pub fn line_of(text: &str, pos: usize) -> usize {
    text.as_bytes()[..pos.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Reads, interpolates and merges pipeline files.
pub fn load_files(paths: &[PathBuf]) -> Result<PipelineConfig, Vec<ConfigError>> {
    let mut merged = PipelineConfig::default();
    let mut errors = Vec::new();
    for path in paths {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                if let Err(e) = parse_into(&mut merged, &text, path, |k| std::env::var(k).ok()) {
                    errors.extend(e);
                }
            }
            Err(e) => errors.push(ConfigError::new(format!(
                "cannot read pipeline file {}: {e}",
                path.display()
            ))),
        }
    }
    if merged.settings.id.is_none() {
        merged.settings.id = paths
            .first()
            .and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned());
    }
    if errors.is_empty() {
        Ok(merged)
    } else {
        Err(errors)
    }
}

/// Parses one file's text (for tests and embedded pipelines).
pub fn parse_str(text: &str, file: &Path) -> Result<PipelineConfig, Vec<ConfigError>> {
    let mut cfg = PipelineConfig::default();
    parse_into(&mut cfg, text, file, |k| std::env::var(k).ok())?;
    Ok(cfg)
}

/// Parses one file into `merged`, reporting every problem found.
pub fn parse_into(
    merged: &mut PipelineConfig,
    text: &str,
    file: &Path,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(), Vec<ConfigError>> {
    let text = interpolate(text, file, env)?;
    let raw: RawFile = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| line_of(&text, s.start)).unwrap_or(1);
        // toml's message starts with a location header and a source excerpt; keep the gist.
        let msg = e.message().trim().to_string();
        vec![file_error(file, line, msg)]
    })?;
    let file: Arc<Path> = Arc::from(file);
    let mut errors = Vec::new();
    if let Some(settings) = raw.pipeline {
        merged.settings = settings;
    }
    for (kind, table) in [
        (Kind::Source, raw.sources),
        (Kind::Transform, raw.transforms),
        (Kind::Sink, raw.sinks),
    ] {
        for (name, body) in table {
            let location = Location {
                file: file.clone(),
                line: line_of(&text, body.span().start),
            };
            match component_decl(kind, name, body.into_inner(), location, &text) {
                Ok(decl) => {
                    if let Some(prev) = merged.components.iter().find(|c| c.name == decl.name) {
                        errors.push(decl.error(
                            None,
                            format!(
                                "duplicate component name `{}` (already declared as {} at {})",
                                decl.name,
                                prev.path(),
                                prev.location
                            ),
                        ));
                    } else {
                        merged.components.push(decl);
                    }
                }
                Err(e) => errors.push(e),
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn component_decl(
    kind: Kind,
    name: String,
    body: RawTable,
    location: Location,
    text: &str,
) -> Result<ComponentDecl, ConfigError> {
    let mut decl = ComponentDecl {
        kind,
        name,
        type_name: String::new(),
        inputs: Vec::new(),
        buffer: BufferConfig::default(),
        options: toml::Table::new(),
        location,
        key_lines: HashMap::new(),
    };
    if decl.name.is_empty()
        || !decl
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(decl.error(
            None,
            "component names may only contain letters, digits, `_` and `-`",
        ));
    }
    let mut type_name = None;
    let mut inputs = None;
    for (key, value) in body {
        let line = line_of(text, key.span().start);
        let key = key.into_inner();
        decl.key_lines.insert(key.clone(), line);
        let value = value.into_inner();
        match key.as_str() {
            "type" => match value {
                toml::Value::String(s) => type_name = Some(s),
                other => {
                    return Err(decl.error(
                        Some("type"),
                        format!("`type` must be a string, found {}", other.type_str()),
                    ))
                }
            },
            "inputs" if kind != Kind::Source => {
                let list: Vec<String> = value.try_into().map_err(|_| {
                    decl.error(
                        Some("inputs"),
                        "`inputs` must be a list of component names, e.g. [\"sim\", \"parse.late\"]",
                    )
                })?;
                inputs = Some(list);
            }
            "inputs" => {
                return Err(decl.error(Some("inputs"), "sources do not take `inputs`"));
            }
            "buffer" if kind != Kind::Source => {
                decl.buffer = value.try_into().map_err(|e: toml::de::Error| {
                    decl.error(
                        Some("buffer"),
                        format!("option `buffer`: {}", e.message().trim()),
                    )
                })?;
            }
            _ => {
                decl.options.insert(key, value);
            }
        }
    }
    decl.type_name = type_name.ok_or_else(|| decl.error(None, "missing `type`"))?;
    if kind != Kind::Source {
        match inputs {
            Some(list) if !list.is_empty() => decl.inputs = list,
            _ => {
                return Err(decl.error(
                    Some("inputs"),
                    format!(
                        "{} `{}` has no inputs (add `inputs = [\"…\"]`)",
                        kind.as_str(),
                        decl.name
                    ),
                ))
            }
        }
    }
    Ok(decl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "HOST" => Some("broker".into()),
            _ => None,
        }
    }

    #[test]
    fn interpolation_with_defaults_and_escapes() {
        let p = Path::new("p.toml");
        let out = interpolate("a=\"${HOST}\"\nb=\"${PORT:-1883}\"\nc=\"$$x $y\"\n", p, env)
            .expect("interpolates");
        assert_eq!(out, "a=\"broker\"\nb=\"1883\"\nc=\"$x $y\"\n");
        let err = interpolate("\n\nx = \"${MISSING}\"", p, env).expect_err("missing var");
        assert_eq!(err[0].to_string().split(':').nth(1), Some("3"));
        assert!(err[0].message.contains("MISSING"));
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(
            "500ms".parse::<HumanDuration>(),
            Ok(HumanDuration(Duration::from_millis(500)))
        );
        assert_eq!("1m".parse::<HumanDuration>().map(|d| d.0.as_secs()), Ok(60));
        assert_eq!("8MiB".parse::<ByteSize>(), Ok(ByteSize(8 * 1024 * 1024)));
        assert!("eight".parse::<ByteSize>().is_err());
        assert!("fast".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn parses_components_with_lines() {
        let text = r#"
[pipeline]
id = "t"

[sources.sim]
type = "simulator"
devices = 3

[sinks.out]
type = "console"
inputs = ["sim", "sim.dead_letter"]
buffer = { max_batches = 4 }
"#;
        let cfg = parse_str(text, Path::new("t.toml")).expect("parses");
        assert_eq!(cfg.id(), "t");
        assert_eq!(cfg.components.len(), 2);
        let sink = &cfg.components[1];
        assert_eq!(sink.kind, Kind::Sink);
        assert_eq!(sink.inputs, vec!["sim", "sim.dead_letter"]);
        assert_eq!(sink.buffer.max_batches, 4);
        assert_eq!(sink.location.line, 9);
        assert_eq!(cfg.components[0].key_lines.get("devices"), Some(&7));
        assert_eq!(
            cfg.components[0].options.get("devices"),
            Some(&toml::Value::Integer(3))
        );
    }

    #[test]
    fn errors_name_file_line_and_component() {
        let text = "[sinks.out]\ntype = \"console\"\n";
        let err = parse_str(text, Path::new("x.toml")).expect_err("no inputs");
        assert_eq!(
            err[0].to_string(),
            "x.toml:1: sinks.out: sink `out` has no inputs (add `inputs = [\"…\"]`)"
        );
        let err = parse_str("[sorces.a]\ntype = \"x\"\n", Path::new("y.toml")).expect_err("typo");
        assert!(err[0].to_string().starts_with("y.toml:1: "), "{}", err[0]);
        assert!(err[0].message.contains("sorces"), "{}", err[0]);
    }

    #[test]
    fn duplicate_names_across_files_are_rejected() {
        let mut cfg = PipelineConfig::default();
        let a = "[sources.x]\ntype = \"stdin\"\n";
        parse_into(&mut cfg, a, Path::new("a.toml"), env).expect("first");
        let err = parse_into(&mut cfg, a, Path::new("b.toml"), env).expect_err("dup");
        assert!(err[0].message.contains("a.toml:1"), "{}", err[0]);
    }
}
