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
//! `${VAR}` and `${VAR:-default}` are replaced from the environment inside string values, after
//! parsing, so a value is never read as TOML (`$$` is a literal `$`); outside quotes a variable
//! may only hold a number, boolean or date (`count = ${N:-10}`). Several files are merged into one pipeline; a name may be declared once.
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

/// A password, token or key from a pipeline file. `Debug` prints `***`, so a config printed
/// with `{:?}` (a log line, a panic, an error) does not leak it. There is deliberately no
/// `Display`: the value is only reachable through [`Secret::expose`], so every use of it is
/// explicit and greppable, and `format!("{token}")` into a log line or URL does not compile.
/// Written in TOML as a plain string.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_string())
    }
}

/// Properties handed as is to a client library (librdkafka's `librdkafka_options`). `Debug`
/// prints `***` for the value of every key naming a secret (`sasl.password`,
/// `ssl.key.password`, `sasl.oauthbearer.client.secret`, …), since the map is part of configs
/// that are printed with `{:?}`. Written in TOML as a table of strings.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct PassthroughOptions(pub std::collections::BTreeMap<String, String>);

impl PassthroughOptions {
    /// Parts of a key (lower case) that mark its value as secret.
    const SECRET_KEY_PARTS: [&'static str; 5] = [
        "password",
        "secret",
        "sasl.oauthbearer",
        "token",
        "ssl.key.pem",
    ];

    /// Whether the value of `key` must not be printed.
    pub fn is_secret_key(key: &str) -> bool {
        let key = key.to_ascii_lowercase();
        Self::SECRET_KEY_PARTS.iter().any(|part| key.contains(part))
    }
}

impl fmt::Debug for PassthroughOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown: &dyn fmt::Debug = if Self::is_secret_key(k) { &"***" } else { v };
                (k, shown)
            }))
            .finish()
    }
}

impl std::ops::Deref for PassthroughOptions {
    type Target = std::collections::BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for PassthroughOptions {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a PassthroughOptions {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
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
    /// Where components keep state across restarts (disk buffers: one subdirectory per
    /// pipeline id and component, `<data_dir>/<id>/<component>/buffer`). Default:
    /// `$SLUICE_DATA_DIR` when set, else `sluice-data` in the working directory. Relative paths
    /// are taken from the working directory.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
}

fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

impl Default for PipelineSettings {
    fn default() -> Self {
        PipelineSettings {
            id: None,
            shutdown_timeout: default_shutdown_timeout(),
            data_dir: None,
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

    /// The data directory: `[pipeline] data_dir`, else `$SLUICE_DATA_DIR`, else `sluice-data`.
    pub fn data_dir(&self) -> PathBuf {
        self.settings
            .data_dir
            .clone()
            .or_else(|| std::env::var_os("SLUICE_DATA_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("sluice-data"))
    }

    /// The directory of component `name`'s state.
    pub fn component_dir(&self, name: &str) -> PathBuf {
        self.data_dir().join(self.id()).join(name)
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

/// Looks up one `${…}` expression (the text between the braces): `NAME` or `NAME:-default`.
/// The error message never contains a variable's value: it may be a secret.
fn resolve_variable(expr: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let (name, default) = match expr.split_once(":-") {
        Some((n, d)) => (n, Some(d)),
        None => (expr, None),
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("invalid variable name `{name}` in `${{{expr}}}`"));
    }
    match (env(name), default) {
        (Some(v), _) => Ok(v),
        (None, Some(d)) => Ok(d.to_string()),
        (None, None) => Err(format!(
            "environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)"
        )),
    }
}

/// Substitutes `${VAR}`, `${VAR:-default}` and `$$` inside one parsed string value. The result
/// is the value itself, never TOML, so quotes or newlines in a variable cannot end the string
/// or add keys. Errors carry the `${…}` text they are about (to find their line).
fn interpolate_string(
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<(String, String)>> {
    let mut out = String::with_capacity(value.len());
    let mut errors = Vec::new();
    let mut rest = value;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                errors.push((
                    "${".to_string(),
                    "unclosed `${` (write `$$` for a literal `$`)".to_string(),
                ));
                out.push_str(&rest[pos..]);
                rest = "";
                break;
            };
            let expr = &body[..end];
            match resolve_variable(expr, env) {
                Ok(v) => out.push_str(&v),
                Err(msg) => errors.push((format!("${{{expr}}}"), msg)),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Interpolates every string value below `value` in place (keys are left alone).
fn interpolate_value(
    value: &mut Spanned<toml::de::DeValue<'_>>,
    text: &str,
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) {
    let span = value.span();
    match value.get_mut() {
        toml::de::DeValue::String(s) => {
            if !s.contains('$') {
                return;
            }
            match interpolate_string(s, env) {
                Ok(v) => *s = std::borrow::Cow::Owned(v),
                Err(errs) => {
                    // The parsed string has lost escapes and a multi-line string's first
                    // newline, so find the `${…}` in the source text for an exact line.
                    let raw = text.get(span.clone()).unwrap_or("");
                    for (needle, msg) in errs {
                        let pos = span.start + raw.find(&needle).unwrap_or(0);
                        errors.push(file_error(file, line_of(text, pos), msg));
                    }
                }
            }
        }
        toml::de::DeValue::Array(items) => {
            for item in items.iter_mut() {
                interpolate_value(item, text, file, env, errors);
            }
        }
        toml::de::DeValue::Table(table) => {
            for (_, item) in table.iter_mut() {
                interpolate_value(item, text, file, env, errors);
            }
        }
        _ => {}
    }
}

/// Substitutes the `${VAR}` written outside quotes (`count = ${N:-10}`), before parsing. Only
/// a number, boolean or date is accepted there, so no value can add TOML; text belongs in
/// quotes, where `interpolate_value` substitutes it after parsing. Comments are left alone.
fn interpolate_bare<'t>(
    text: &'t str,
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<std::borrow::Cow<'t, str>, Vec<ConfigError>> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Code,
        Comment,
        Basic,
        Literal,
        MultiBasic,
        MultiLiteral,
    }
    // Every delimiter is ASCII, so byte indices at them are char boundaries.
    let bytes = text.as_bytes();
    let mut state = State::Code;
    let mut out = String::new();
    let mut copied = 0;
    let mut line = 1;
    let mut errors = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let rest = &bytes[i..];
        match state {
            State::Code => {
                if rest.starts_with(b"\"\"\"") {
                    state = State::MultiBasic;
                    i += 3;
                    continue;
                } else if rest.starts_with(b"'''") {
                    state = State::MultiLiteral;
                    i += 3;
                    continue;
                } else if c == b'#' {
                    state = State::Comment;
                } else if c == b'"' {
                    state = State::Basic;
                } else if c == b'\'' {
                    state = State::Literal;
                } else if rest.starts_with(b"${") {
                    let close = rest[2..]
                        .iter()
                        .position(|&b| b == b'}' || b == b'\n')
                        .filter(|&n| rest[2 + n] == b'}');
                    let Some(len) = close else {
                        errors.push(file_error(
                            file,
                            line,
                            "unclosed `${` (write `$$` for a literal `$`)",
                        ));
                        i += 2;
                        continue;
                    };
                    let expr = &text[i + 2..i + 2 + len];
                    match resolve_variable(expr, env) {
                        Ok(v) if is_bare_scalar(&v) => {
                            out.push_str(&text[copied..i]);
                            out.push_str(v.trim());
                            copied = i + 2 + len + 1;
                        }
                        Ok(_) => errors.push(file_error(
                            file,
                            line,
                            format!(
                                "`${{{expr}}}` outside quotes must hold a number, boolean or \
                                 date; for text write it inside quotes: \"${{{expr}}}\""
                            ),
                        )),
                        Err(msg) => errors.push(file_error(file, line, msg)),
                    }
                    i += 2 + len + 1;
                    continue;
                }
            }
            State::Comment | State::Basic | State::Literal if c == b'\n' => state = State::Code,
            State::Comment => {}
            State::Basic | State::MultiBasic if c == b'\\' => {
                // Skip the escaped character (it may be a quote), counting a newline.
                if bytes.get(i + 1) == Some(&b'\n') {
                    line += 1;
                }
                i += 2;
                continue;
            }
            State::Basic if c == b'"' => state = State::Code,
            State::Literal if c == b'\'' => state = State::Code,
            State::MultiBasic | State::MultiLiteral => {
                let quote = if state == State::MultiBasic {
                    b'"'
                } else {
                    b'\''
                };
                if rest.starts_with(&[quote; 3]) {
                    // Up to two more quotes before the delimiter belong to the string.
                    i += 3;
                    let mut extra = 0;
                    while extra < 2 && bytes.get(i) == Some(&quote) {
                        i += 1;
                        extra += 1;
                    }
                    state = State::Code;
                    continue;
                }
            }
            State::Basic | State::Literal => {}
        }
        if c == b'\n' {
            line += 1;
        }
        i += 1;
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    if copied == 0 {
        return Ok(std::borrow::Cow::Borrowed(text));
    }
    out.push_str(&text[copied..]);
    Ok(std::borrow::Cow::Owned(out))
}

/// Whether `v` is one TOML number, boolean or date and nothing else.
fn is_bare_scalar(v: &str) -> bool {
    let v = v.trim();
    !v.contains(['\n', '\r', '#', '"', '\'', '[', ']', '{', '}', ',', '='])
        && matches!(
            toml::de::DeValue::parse(v).map(Spanned::into_inner),
            Ok(toml::de::DeValue::Integer(_)
                | toml::de::DeValue::Float(_)
                | toml::de::DeValue::Boolean(_)
                | toml::de::DeValue::Datetime(_))
        )
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
    let toml_error = |text: &str, e: toml::de::Error| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
        // toml's message starts with a location header and a source excerpt; keep the gist.
        let msg = e.message().trim().to_string();
        vec![file_error(file, line, msg)]
    };
    let text = interpolate_bare(text, file, &env)?;
    let text = text.as_ref();
    // Parse first, then substitute inside string values: a variable's value is data, never
    // TOML syntax. Spans still point into `text`, so errors keep their lines.
    let mut root = toml::de::DeTable::parse(text).map_err(|e| toml_error(text, e))?;
    let mut errors = Vec::new();
    for (_, value) in root.get_mut().iter_mut() {
        interpolate_value(value, text, file, &env, &mut errors);
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.location.as_ref().map(|l| l.line));
        return Err(errors);
    }
    let raw = RawFile::deserialize(toml::de::Deserializer::from(root))
        .map_err(|e| toml_error(text, e))?;
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
                line: line_of(text, body.span().start),
            };
            match component_decl(kind, name, body.into_inner(), location, text) {
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

    fn options_of(text: &str, env: impl Fn(&str) -> Option<String>) -> toml::Table {
        let mut cfg = PipelineConfig::default();
        parse_into(&mut cfg, text, Path::new("p.toml"), env).expect("parses");
        cfg.components.remove(0).options
    }

    #[test]
    fn interpolation_with_defaults_and_escapes() {
        let p = Path::new("p.toml");
        let opts = options_of(
            "[sources.s]\ntype = \"x\"\na=\"${HOST}\"\nb=\"${PORT:-1883}\"\nc=\"$$x $y\"\n\
             l=['${HOST}']\nt={ u = \"${HOST}:1\" }\nn = ${PORT:-1883}\n# ${UNSET} in a comment\n",
            env,
        );
        assert_eq!(opts["a"].as_str(), Some("broker"));
        assert_eq!(opts["b"].as_str(), Some("1883"));
        assert_eq!(opts["c"].as_str(), Some("$x $y"));
        assert_eq!(opts["l"][0].as_str(), Some("broker"));
        assert_eq!(opts["t"]["u"].as_str(), Some("broker:1"));
        assert_eq!(opts["n"].as_integer(), Some(1883));
        let err = parse_into(
            &mut PipelineConfig::default(),
            "[sources.s]\ntype = \"x\"\nx = \"${MISSING}\"",
            p,
            env,
        )
        .expect_err("missing var");
        assert_eq!(err[0].to_string().split(':').nth(1), Some("3"));
        assert!(err[0].message.contains("MISSING"));
        let err = parse_into(
            &mut PipelineConfig::default(),
            "[sources.s]\ntype = \"x\"\nx = \"\"\"\nok\n${MISSING}\"\"\"\ny = ${ALSO_MISSING}\n",
            p,
            env,
        )
        .expect_err("missing vars");
        let lines: Vec<_> = err
            .iter()
            .map(|e| e.location.as_ref().map(|l| l.line))
            .collect();
        assert_eq!(
            lines,
            vec![Some(6)],
            "bare variables are checked first: {err:?}"
        );
        let err = parse_into(
            &mut PipelineConfig::default(),
            "[sources.s]\ntype = \"x\"\nx = \"\"\"\nok\n${MISSING}\"\"\"\ny = 'a${B}'\n",
            p,
            env,
        )
        .expect_err("missing vars");
        let lines: Vec<_> = err
            .iter()
            .map(|e| e.location.as_ref().map(|l| l.line))
            .collect();
        assert_eq!(lines, vec![Some(5), Some(6)], "{err:?}");
    }

    #[test]
    fn variables_are_data_not_toml() {
        let secret = |k: &str| (k == "SECRET").then(|| "a\"b\nc = 1".to_string());
        let opts = options_of(
            "[sources.s]\ntype = \"mqtt\"\npassword = \"${SECRET}\"\nraw = '${SECRET}'\n",
            secret,
        );
        assert_eq!(opts["password"].as_str(), Some("a\"b\nc = 1"));
        assert_eq!(opts["raw"].as_str(), Some("a\"b\nc = 1"));
        assert_eq!(opts.len(), 2, "no key injected: {opts:?}");
        // Outside quotes only a scalar is accepted, and the error does not echo the value.
        let err = parse_into(
            &mut PipelineConfig::default(),
            "[sources.s]\ntype = \"mqtt\"\nport = ${SECRET}\n",
            Path::new("p.toml"),
            secret,
        )
        .expect_err("text outside quotes");
        assert_eq!(err[0].location.as_ref().map(|l| l.line), Some(3));
        assert!(!err[0].to_string().contains("a\"b"), "{}", err[0]);
    }

    #[test]
    fn shipped_pipelines_parse_with_their_defaults() {
        // They use `${VAR:-default}` inside and outside quotes (`count = ${FLEET_COUNT:-…}`).
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines");
        let entries = std::fs::read_dir(&dir).expect("pipelines/ exists");
        let mut parsed = 0;
        for entry in entries {
            let path = entry.expect("readable directory").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).expect("readable pipeline");
                // With the defaults, only variables without one (secrets) may be missing.
                if let Err(errors) =
                    parse_into(&mut PipelineConfig::default(), &text, &path, |_| None)
                {
                    for e in errors {
                        assert!(e.message.contains("is not set"), "{}: {e}", path.display());
                    }
                }
                parse_into(&mut PipelineConfig::default(), &text, &path, |_| {
                    Some("1".into())
                })
                .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
                parsed += 1;
            }
        }
        assert!(parsed > 0);
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let s: Secret = toml::from_str::<toml::Table>("p = \"hunter2\"")
            .expect("toml")
            .remove("p")
            .expect("key")
            .try_into()
            .expect("a secret is a string");
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{:?}", Some(s)), "Some(***)");

        // No `Display`: `format!("{token}")` must not compile, so a secret cannot slip into a
        // log line or URL by accident (issue 13, item 11c). Autoref probe: the first method
        // found is `ViaDisplay::shows` only when `Secret: Display`.
        struct Probe<T>(T);
        trait ViaDisplay {
            fn shows(&self) -> bool {
                true
            }
        }
        impl<T: fmt::Display> ViaDisplay for Probe<T> {}
        trait ViaAny {
            fn shows(&self) -> bool {
                false
            }
        }
        impl<T> ViaAny for &Probe<T> {}
        assert!(
            !(&Probe(Secret::new("x"))).shows(),
            "Secret must not implement Display; use expose()"
        );
        assert!(Probe(String::new()).shows(), "the probe detects Display");

        let mut o = PassthroughOptions::default();
        for (k, v) in [
            ("sasl.password", "pw1"),
            ("SSL.KEY.PASSWORD", "pw2"),
            ("sasl.oauthbearer.client.secret", "pw3"),
            ("sasl.oauthbearer.config", "pw4"),
            ("fetch.max.bytes", "1048576"),
        ] {
            o.insert(k.into(), v.into());
        }
        let shown = format!("{o:?}");
        for pw in ["pw1", "pw2", "pw3", "pw4"] {
            assert!(!shown.contains(pw), "{shown}");
        }
        assert!(
            shown.contains("\"fetch.max.bytes\": \"1048576\""),
            "{shown}"
        );
        assert_eq!((&o).into_iter().count(), 5);
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
