//! The component registry: maps `type = "…"` to a config type that builds the component.
//!
//! Registering a component is one line:
//!
//! ```ignore
//! registry.source::<SimulatorConfig>("simulator");
//! ```
//!
//! The config type is deserialized from the component's table (with `deny_unknown_fields`, so
//! typos are errors) and describes itself through its JSON schema, which `sluice components`
//! prints (doc comments become option descriptions; serde defaults become defaults).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;

use crate::metrics::Kind;
use crate::sink::Sink;
use crate::source::Source;
use crate::transform::Transform;
use crate::BoxError;

/// What a component's `build` knows about its place in the pipeline.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// The component's name in the pipeline file.
    pub name: String,
    /// The pipeline's id (`[pipeline] id`, default: the first file's stem).
    pub pipeline_id: String,
    /// Where the component may keep state across restarts (`<data_dir>/<pipeline id>/<name>`;
    /// not created until the component writes there). `None` when nothing is to be persisted
    /// (unit tests, benches).
    pub state_dir: Option<std::path::PathBuf>,
}

/// Configuration of a source type.
#[async_trait]
pub trait SourceConfig: std::fmt::Debug + Send + Sync {
    /// Validates and builds the source (connections may be opened here or in `run`).
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Source>, BoxError>;
    /// Named outputs besides `default` and `dead_letter`.
    fn outputs(&self) -> Vec<String> {
        Vec::new()
    }
    /// Whether the source, so configured, acknowledges records upstream (what
    /// [`Source::can_acknowledge`] will say once built). Known before building so that
    /// `validate` can warn where acknowledged records may be dropped. Default false.
    fn acknowledges(&self) -> bool {
        false
    }
    /// How long the source can leave a record unacknowledged before it stalls or its
    /// upstream gives up on it (drops the connection, evicts the consumer, hands the message
    /// out again), with the option that sets it, e.g. `(30s, "keep_alive")`. `validate` warns
    /// when a stage that holds acknowledgements longer ([`TransformConfig::ack_hold`]) sits
    /// behind the source without a disk buffer in between. Default `None`: no known limit
    /// (or the source does not acknowledge).
    fn ack_tolerance(&self) -> Option<(Duration, &'static str)> {
        None
    }
}

/// Configuration of a transform type.
#[async_trait]
pub trait TransformConfig: std::fmt::Debug + Send + Sync {
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Transform>, BoxError>;
    /// Named outputs besides `default` and `dead_letter` (e.g. `late`, `anomalies`).
    fn outputs(&self) -> Vec<String> {
        Vec::new()
    }
    /// How long the transform may hold a record's acknowledgement (keep it in open state
    /// before emitting what carries its finalizer), with what makes up that time, e.g.
    /// `(1h 5m, "window + allowed_lateness")`. Default `None`: it holds records only briefly.
    fn ack_hold(&self) -> Option<(Duration, &'static str)> {
        None
    }
}

/// Configuration of a sink type.
#[async_trait]
pub trait SinkConfig: std::fmt::Debug + Send + Sync {
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Sink>, BoxError>;
    /// Whether the sink may send records to its `dead_letter` output (refuse them for good).
    /// Default true; sinks that only deliver or fail (console, file…) say false, so that
    /// `validate` does not ask for a dead-letter consumer they never feed.
    fn can_reject(&self) -> bool {
        true
    }
    /// How long the sink may hold a record before writing it durably (and acknowledging
    /// it), with the option that sets it, e.g. `(5m, "max_age")`. Default `None`: it holds
    /// records only briefly.
    fn ack_hold(&self) -> Option<(Duration, &'static str)> {
        None
    }
}

/// A component's configuration after parsing, before building.
#[derive(Debug)]
pub enum ParsedConfig {
    Source(Box<dyn SourceConfig>),
    Transform(Box<dyn TransformConfig>),
    Sink(Box<dyn SinkConfig>),
}

impl ParsedConfig {
    /// Named outputs besides `default` and `dead_letter`.
    pub fn outputs(&self) -> Vec<String> {
        match self {
            ParsedConfig::Source(c) => c.outputs(),
            ParsedConfig::Transform(c) => c.outputs(),
            ParsedConfig::Sink(_) => Vec::new(),
        }
    }

    /// See [`SourceConfig::acknowledges`]; false for transforms and sinks.
    pub fn acknowledges(&self) -> bool {
        match self {
            ParsedConfig::Source(c) => c.acknowledges(),
            _ => false,
        }
    }

    /// See [`SourceConfig::ack_tolerance`]; `None` for transforms and sinks.
    pub fn ack_tolerance(&self) -> Option<(Duration, &'static str)> {
        match self {
            ParsedConfig::Source(c) => c.ack_tolerance(),
            _ => None,
        }
    }

    /// See [`TransformConfig::ack_hold`] and [`SinkConfig::ack_hold`]; `None` for sources.
    pub fn ack_hold(&self) -> Option<(Duration, &'static str)> {
        match self {
            ParsedConfig::Source(_) => None,
            ParsedConfig::Transform(c) => c.ack_hold(),
            ParsedConfig::Sink(c) => c.ack_hold(),
        }
    }

    /// Whether the component may dead-letter records: sources (undecodable messages) and
    /// transforms always may, sinks per [`SinkConfig::can_reject`].
    pub fn can_reject(&self) -> bool {
        match self {
            ParsedConfig::Sink(c) => c.can_reject(),
            _ => true,
        }
    }
}

type ParseFn = Arc<dyn Fn(toml::Value) -> Result<ParsedConfig, toml::de::Error> + Send + Sync>;

#[derive(Clone)]
struct Entry {
    parse: ParseFn,
    schema: fn() -> schemars::Schema,
}

/// Every component type a `sluice` binary knows.
#[derive(Clone, Default)]
pub struct Registry {
    entries: BTreeMap<(Kind, String), Entry>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.entries.keys()).finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers source type `name` configured by `C`.
    pub fn source<C>(&mut self, name: &str) -> &mut Self
    where
        C: SourceConfig + DeserializeOwned + JsonSchema + 'static,
    {
        self.insert::<C>(Kind::Source, name, |c| ParsedConfig::Source(Box::new(c)))
    }

    /// Registers transform type `name` configured by `C`.
    pub fn transform<C>(&mut self, name: &str) -> &mut Self
    where
        C: TransformConfig + DeserializeOwned + JsonSchema + 'static,
    {
        self.insert::<C>(Kind::Transform, name, |c| {
            ParsedConfig::Transform(Box::new(c))
        })
    }

    /// Registers sink type `name` configured by `C`.
    pub fn sink<C>(&mut self, name: &str) -> &mut Self
    where
        C: SinkConfig + DeserializeOwned + JsonSchema + 'static,
    {
        self.insert::<C>(Kind::Sink, name, |c| ParsedConfig::Sink(Box::new(c)))
    }

    fn insert<C: DeserializeOwned + JsonSchema + 'static>(
        &mut self,
        kind: Kind,
        name: &str,
        wrap: fn(C) -> ParsedConfig,
    ) -> &mut Self {
        let parse: ParseFn = Arc::new(move |v: toml::Value| C::deserialize(v).map(wrap));
        self.entries.insert(
            (kind, name.to_string()),
            Entry {
                parse,
                schema: || schemars::schema_for!(C),
            },
        );
        self
    }

    /// Whether type `name` of `kind` is registered.
    pub fn contains(&self, kind: Kind, name: &str) -> bool {
        self.entries.contains_key(&(kind, name.to_string()))
    }

    /// Type names registered for `kind`.
    pub fn names(&self, kind: Kind) -> Vec<&str> {
        self.entries
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n.as_str())
            .collect()
    }

    /// Parses a component's options with the config type registered for it. `None` when the
    /// type is unknown.
    pub fn parse(
        &self,
        kind: Kind,
        name: &str,
        options: toml::Table,
    ) -> Option<Result<ParsedConfig, toml::de::Error>> {
        let entry = self.entries.get(&(kind, name.to_string()))?;
        Some((entry.parse)(toml::Value::Table(options)))
    }

    /// Documentation of every registered type, from the config types' schemas.
    pub fn docs(&self) -> Vec<ComponentDoc> {
        self.entries
            .iter()
            .map(|((kind, name), e)| ComponentDoc::from_schema(*kind, name, &(e.schema)()))
            .collect()
    }
}

/// One option of a component type.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OptionDoc {
    pub name: String,
    /// A short type: `string`, `integer`, `duration`, `"a" | "b"`, …
    pub type_name: String,
    /// The default, as it would be written in TOML; `None` when required.
    pub default: Option<String>,
    pub required: bool,
    pub description: String,
}

/// A component type's documentation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ComponentDoc {
    pub kind: &'static str,
    pub name: String,
    pub description: String,
    pub options: Vec<OptionDoc>,
}

impl ComponentDoc {
    fn from_schema(kind: Kind, name: &str, schema: &schemars::Schema) -> Self {
        let root = schema.as_value();
        let description = root
            .get("description")
            .and_then(|d| d.as_str())
            .unwrap_or("")
            .to_string();
        let required: Vec<&str> = root
            .get("required")
            .and_then(|r| r.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let mut options = Vec::new();
        if let Some(props) = root.get("properties").and_then(|p| p.as_object()) {
            for (opt, prop) in props {
                options.push(OptionDoc {
                    name: opt.clone(),
                    type_name: type_of(prop, root),
                    default: prop.get("default").map(toml_literal),
                    required: required.contains(&opt.as_str()),
                    description: prop
                        .get("description")
                        .and_then(|d| d.as_str())
                        .unwrap_or("")
                        .replace('\n', " "),
                });
            }
        }
        ComponentDoc {
            kind: kind.as_str(),
            name: name.to_string(),
            description,
            options,
        }
    }
}

fn resolve<'a>(v: &'a serde_json::Value, root: &'a serde_json::Value) -> &'a serde_json::Value {
    if let Some(r) = v.get("$ref").and_then(|r| r.as_str()) {
        let key = r.rsplit('/').next().unwrap_or("");
        if let Some(target) = root.get("$defs").and_then(|d| d.get(key)) {
            return target;
        }
    }
    v
}

fn type_of(prop: &serde_json::Value, root: &serde_json::Value) -> String {
    let prop = resolve(prop, root);
    if let Some(all) = prop.get("allOf").and_then(|a| a.as_array()) {
        if let Some(first) = all.first() {
            return type_of(first, root);
        }
    }
    if let Some(values) = prop.get("enum").and_then(|e| e.as_array()) {
        return values
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(" | ");
    }
    if let Some(variants) = prop.get("oneOf").and_then(|e| e.as_array()) {
        let consts: Vec<String> = variants
            .iter()
            .filter_map(|v| {
                v.get("const")
                    .or_else(|| v.get("enum").and_then(|e| e.get(0)))
                    .map(|c| c.to_string())
            })
            .collect();
        if consts.len() == variants.len() {
            return consts.join(" | ");
        }
        return "table".to_string();
    }
    if let Some(any) = prop.get("anyOf").and_then(|a| a.as_array()) {
        // Option<T> is rendered as anyOf [T, null].
        if let Some(t) = any
            .iter()
            .find(|v| v.get("type").and_then(|t| t.as_str()) != Some("null"))
        {
            return type_of(t, root);
        }
    }
    if let Some(format) = prop.get("format").and_then(|f| f.as_str()) {
        if format == "duration" || format == "size" {
            return format.to_string();
        }
    }
    match prop.get("type") {
        Some(serde_json::Value::String(t)) => match t.as_str() {
            "array" => {
                let item = prop
                    .get("items")
                    .map(|i| type_of(i, root))
                    .unwrap_or_else(|| "value".into());
                format!("[{item}]")
            }
            "object" => "table".into(),
            "number" => "float".into(),
            other => other.to_string(),
        },
        Some(serde_json::Value::Array(ts)) => ts
            .iter()
            .filter_map(|t| t.as_str())
            .find(|t| *t != "null")
            .unwrap_or("value")
            .to_string(),
        _ => "value".into(),
    }
}

fn toml_literal(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "none".into(),
        serde_json::Value::Object(map) => {
            let inner: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k} = {}", toml_literal(v)))
                .collect();
            format!("{{ {} }}", inner.join(", "))
        }
        other => other.to_string(),
    }
}

/// The registered name closest to `wanted`, for "did you mean" hints.
pub fn suggest<'a>(wanted: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(wanted, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let names = ["simulator", "file", "stdin"];
        assert_eq!(suggest("simulater", names), Some("simulator"));
        assert_eq!(suggest("kafka", names), None);
    }
}
