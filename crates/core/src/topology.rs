//! From a pipeline file to running tasks.
//!
//! [`plan`] checks everything that can be checked before anything starts: unknown types (with
//! a "did you mean"), unknown or mistyped options (file, line and key), unknown inputs and
//! outputs, duplicate names and cycles; [`Plan::warnings`] names what is valid but probably
//! not meant (records acknowledged and dropped; acknowledgements held longer than the source
//! tolerates). [`Plan::start`] builds the components, wires every edge
//! as a bounded channel and spawns one task per component; [`Running::wait`] supervises them:
//!
//! * when every source has finished (finite sources: file at EOF, simulator after `count`), the
//!   closing channels drain transforms and sinks in order and `wait` returns `Ok`;
//! * when the shutdown token is cancelled (SIGINT/SIGTERM), sources stop reading and the same
//!   drain happens, bounded by `shutdown_timeout`; past it, sources are aborted first (so no
//!   acknowledgement races the teardown), then everything else, and `wait` returns an error;
//! * when a component fails, the pipeline shuts down and `wait` reports the failure.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::channel::{self, BufferType, Edge, Input, Output, Outputs, DEAD_LETTER, DEFAULT_OUTPUT};
use crate::config::{ComponentDecl, ConfigError, PipelineConfig};
use crate::metrics::{Kind, Metrics};
use crate::record::Batch;
use crate::registry::{suggest, BuildContext, ParsedConfig, Registry};
use crate::sink::{SinkContext, SinkInput};
use crate::source::SourceContext;
use crate::transform::{Transform, TransformOutput};
use crate::BoxError;

struct Node {
    decl: ComponentDecl,
    parsed: ParsedConfig,
    /// Named outputs (without `default`).
    outputs: Vec<String>,
    /// Resolved inputs: (producer index, output name).
    inputs: Vec<(usize, String)>,
}

/// A validated pipeline, ready to start.
pub struct Plan {
    pub config: PipelineConfig,
    nodes: Vec<Node>,
}

/// Validates `config` against `registry`, reporting every problem found.
pub fn plan(config: PipelineConfig, registry: &Registry) -> Result<Plan, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut nodes = Vec::new();
    for decl in &config.components {
        if !registry.contains(decl.kind, &decl.type_name) {
            let names = registry.names(decl.kind);
            let hint = match suggest(&decl.type_name, names.iter().copied()) {
                Some(s) => format!(" (did you mean `{s}`?)"),
                None => format!(
                    " (known {} types: {})",
                    decl.kind.as_str(),
                    names.join(", ")
                ),
            };
            errors.push(decl.error(
                Some("type"),
                format!(
                    "unknown {} type `{}`{hint}",
                    decl.kind.as_str(),
                    decl.type_name
                ),
            ));
            continue;
        }
        match registry.parse(decl.kind, &decl.type_name, decl.options.clone()) {
            Some(Ok(parsed)) => {
                let mut outputs = parsed.outputs();
                outputs.push(DEAD_LETTER.to_string());
                nodes.push(Node {
                    decl: decl.clone(),
                    parsed,
                    outputs,
                    inputs: Vec::new(),
                });
            }
            Some(Err(e)) => errors.push(option_error(decl, &e, registry)),
            None => {}
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let index: HashMap<String, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.decl.name.clone(), i))
        .collect();
    for i in 0..nodes.len() {
        let mut resolved = Vec::new();
        for input in nodes[i].decl.inputs.clone() {
            match resolve_input(&input, &nodes, &index) {
                Ok((p, _)) if p == i => errors.push(
                    nodes[i]
                        .decl
                        .error(Some("inputs"), format!("`{input}` is the component itself")),
                ),
                Ok(r) => resolved.push(r),
                Err(msg) => errors.push(nodes[i].decl.error(Some("inputs"), msg)),
            }
        }
        nodes[i].inputs = resolved;
    }
    if errors.is_empty() {
        if let Some(cycle) = find_cycle(&nodes) {
            let names: Vec<&str> = cycle.iter().map(|&i| nodes[i].decl.name.as_str()).collect();
            errors.push(nodes[cycle[0]].decl.error(
                Some("inputs"),
                format!(
                    "cycle between components: {} -> {}",
                    names.join(" -> "),
                    names[0]
                ),
            ));
        }
    }
    if errors.is_empty() {
        Ok(Plan { config, nodes })
    } else {
        Err(errors)
    }
}

fn resolve_input(
    input: &str,
    nodes: &[Node],
    index: &HashMap<String, usize>,
) -> Result<(usize, String), String> {
    let (name, output) = match input.split_once('.') {
        Some((n, o)) => (n, o),
        None => (input, DEFAULT_OUTPUT),
    };
    let Some(&p) = index.get(name) else {
        let hint = suggest(name, index.keys().map(String::as_str))
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        return Err(format!(
            "unknown input `{input}`: no component named `{name}`{hint}"
        ));
    };
    let producer = &nodes[p];
    let exists = if output == DEFAULT_OUTPUT {
        producer.decl.kind != Kind::Sink
    } else {
        producer.outputs.iter().any(|o| o == output)
    };
    if !exists {
        let mut available: Vec<String> = producer
            .outputs
            .iter()
            .map(|o| format!("`{name}.{o}`"))
            .collect();
        if producer.decl.kind != Kind::Sink {
            available.insert(0, format!("`{name}`"));
        }
        return Err(format!(
            "unknown input `{input}`: {} `{name}` has no output `{output}` (available: {})",
            producer.decl.kind.as_str(),
            available.join(", ")
        ));
    }
    Ok((p, output.to_string()))
}

/// Returns the nodes of one cycle, if the graph has any.
fn find_cycle(nodes: &[Node]) -> Option<Vec<usize>> {
    // 0 = unvisited, 1 = on the stack, 2 = done. Edges go from a consumer to its producers.
    fn visit(
        i: usize,
        nodes: &[Node],
        state: &mut [u8],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        state[i] = 1;
        stack.push(i);
        for (p, _) in &nodes[i].inputs {
            match state[*p] {
                1 => {
                    let start = stack.iter().position(|x| x == p).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.reverse();
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(*p, nodes, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state[i] = 2;
        None
    }
    let mut state = vec![0u8; nodes.len()];
    for i in 0..nodes.len() {
        if state[i] == 0 {
            if let Some(c) = visit(i, nodes, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// Turns a serde error on a component's options into a located, actionable message.
fn option_error(decl: &ComponentDecl, e: &toml::de::Error, registry: &Registry) -> ConfigError {
    let msg = e.message().trim().to_string();
    let quoted: Vec<&str> = msg.split('`').skip(1).step_by(2).collect();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let key = rest.split('`').next().unwrap_or("");
        let expected: Vec<&str> = quoted.iter().skip(1).copied().collect();
        let hint = match suggest(key, expected.iter().copied()) {
            Some(s) => format!(" (did you mean `{s}`?)"),
            None if expected.is_empty() => String::new(),
            None => format!(" (options: {})", expected.join(", ")),
        };
        return decl.error(
            Some(key),
            format!(
                "unknown option `{key}` for {} type `{}`{hint}",
                decl.kind.as_str(),
                decl.type_name
            ),
        );
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let key = rest.split('`').next().unwrap_or("");
        return decl.error(None, format!("missing required option `{key}`"));
    }
    // Type errors: point at the first key the message names, if it is one of ours; otherwise
    // find the key whose removal makes the error go away (serde does not say which key failed).
    let key = quoted
        .iter()
        .find(|q| decl.key_lines.contains_key(**q))
        .map(|k| k.to_string())
        .or_else(|| {
            decl.options
                .keys()
                .find(|k| {
                    let mut without = decl.options.clone();
                    without.remove(*k);
                    match registry.parse(decl.kind, &decl.type_name, without) {
                        Some(Ok(_)) => true,
                        Some(Err(e2)) => e2.message().contains(&format!("missing field `{k}`")),
                        None => false,
                    }
                })
                .cloned()
        });
    let key = key.as_deref();
    match key {
        Some(k) => decl.error(Some(k), format!("option `{k}`: {msg}")),
        None => decl.error(None, msg),
    }
}

impl Plan {
    /// The pipeline as a Mermaid flowchart.
    pub fn mermaid(&self) -> String {
        let mut s = String::from("flowchart LR\n");
        for n in &self.nodes {
            let (open, close) = match n.decl.kind {
                Kind::Source => ("([", "])"),
                Kind::Transform => ("[", "]"),
                Kind::Sink => ("[(", ")]"),
            };
            let _ = writeln!(
                s,
                "  {id}{open}\"{name}<br/><i>{ty}</i>\"{close}",
                id = mermaid_id(&n.decl.name),
                name = n.decl.name,
                ty = n.decl.type_name
            );
        }
        for n in &self.nodes {
            for (p, output) in &n.inputs {
                let from = mermaid_id(&self.nodes[*p].decl.name);
                let to = mermaid_id(&n.decl.name);
                if output == DEFAULT_OUTPUT {
                    let _ = writeln!(s, "  {from} --> {to}");
                } else {
                    let _ = writeln!(s, "  {from} -- {output} --> {to}");
                }
            }
        }
        s
    }

    /// What is valid but probably not meant: a component that can reject records (send them
    /// to `dead_letter`), fed by a source that acknowledges, whose `dead_letter` output nobody
    /// consumes. Its rejected records are logged, dropped and acknowledged (the source will
    /// not redeliver them); that must be a visible choice, so each gets a warning with the fix.
    /// Also a stage that holds acknowledgements longer than its source tolerates, with no
    /// disk buffer in between (see `hold_warnings`).
    pub fn warnings(&self) -> Vec<ConfigError> {
        let n = self.nodes.len();
        let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut dead_letter_read = vec![false; n];
        for (j, node) in self.nodes.iter().enumerate() {
            for (p, output) in &node.inputs {
                consumers[*p].push(j);
                dead_letter_read[*p] |= output == DEAD_LETTER;
            }
        }
        // For each component, the first acknowledging source whose records reach it.
        let mut fed_by: Vec<Option<usize>> = vec![None; n];
        for (s, node) in self.nodes.iter().enumerate() {
            if !node.parsed.acknowledges() || fed_by[s].is_some() {
                continue;
            }
            let mut stack = vec![s];
            while let Some(i) = stack.pop() {
                if fed_by[i].is_none() {
                    fed_by[i] = Some(s);
                    stack.extend(&consumers[i]);
                }
            }
        }
        let mut warnings = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(source) = fed_by[i] else { continue };
            // A component that reads only dead letters gets records already marked
            // rejected: what it rejects in turn changes no acknowledgement.
            let only_dead_letters = !node.inputs.is_empty()
                && node.inputs.iter().all(|(_, output)| output == DEAD_LETTER);
            // A disk buffer dead-letters poison records itself (`max_replays`).
            let buffer_rejects =
                node.decl.buffer.kind == BufferType::Disk && node.decl.buffer.max_replays > 0;
            let can_reject = node.parsed.can_reject() || buffer_rejects;
            if dead_letter_read[i] || only_dead_letters || !can_reject {
                continue;
            }
            let name = &node.decl.name;
            warnings.push(node.decl.error(
                None,
                format!(
                    "records it rejects are dropped, and source `{}` acknowledges them (nothing reads `{name}.dead_letter`); to keep them, add a sink with inputs = [\"{name}.dead_letter\"]",
                    self.nodes[source].decl.name
                ),
            ));
        }
        warnings.extend(self.hold_warnings(&consumers));
        warnings
    }

    /// Stages that hold acknowledgements (an `aggregate` window, a `parquet` sink's
    /// `max_age`) longer than an acknowledging source upstream tolerates, with only memory
    /// buffers in between: the source stalls or its upstream redelivers. A disk buffer
    /// acknowledges once it appended, so the walk from each source stops at one.
    fn hold_warnings(&self, consumers: &[Vec<usize>]) -> Vec<ConfigError> {
        let mut warned = vec![false; self.nodes.len()];
        let mut warnings = Vec::new();
        for (s, source) in self.nodes.iter().enumerate() {
            let Some((tolerance, why)) = source.parsed.ack_tolerance() else {
                continue;
            };
            if !source.parsed.acknowledges() {
                continue;
            }
            let mut seen = vec![false; self.nodes.len()];
            let mut stack = vec![s];
            while let Some(i) = stack.pop() {
                for &j in &consumers[i] {
                    let node = &self.nodes[j];
                    if seen[j] || node.decl.buffer.kind == BufferType::Disk {
                        continue;
                    }
                    seen[j] = true;
                    stack.push(j);
                    let Some((hold, what)) = node.parsed.ack_hold() else {
                        continue;
                    };
                    if hold <= tolerance || warned[j] {
                        continue;
                    }
                    warned[j] = true;
                    warnings.push(node.decl.error(
                        None,
                        format!(
                            "holds acknowledgements up to {} ({what}) but source `{}` tolerates {} ({why}); add buffer = {{ type = \"disk\" }} to `{}` (or a stage before it)",
                            humantime::format_duration(hold),
                            source.decl.name,
                            humantime::format_duration(tolerance),
                            node.decl.name
                        ),
                    ));
                }
            }
        }
        warnings
    }

    /// Component names with their kind, in declaration order.
    pub fn components(&self) -> Vec<(Kind, &str, &str)> {
        self.nodes
            .iter()
            .map(|n| (n.decl.kind, n.decl.name.as_str(), n.decl.type_name.as_str()))
            .collect()
    }

    /// Builds every component, wires the channels and spawns the tasks.
    pub async fn start(self, metrics: &Metrics) -> Result<Running, Vec<ConfigError>> {
        let pipeline_id = self.config.id().to_string();
        let mut errors = Vec::new();
        let mut built = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            let cx = BuildContext {
                name: n.decl.name.clone(),
                pipeline_id: pipeline_id.clone(),
                state_dir: Some(self.config.component_dir(&n.decl.name)),
            };
            let result = match &n.parsed {
                ParsedConfig::Source(c) => c.build(&cx).await.map(Built::Source),
                ParsedConfig::Transform(c) => c.build(&cx).await.map(Built::Transform),
                ParsedConfig::Sink(c) => c.build(&cx).await.map(Built::Sink),
            };
            match result {
                Ok(b) => built.push(Some(b)),
                Err(e) => {
                    errors.push(n.decl.error(None, format!("cannot start: {e}")));
                    built.push(None);
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }

        // One bounded input per consumer; producers' outputs get a clone of its edge.
        let comp_metrics: Vec<_> = self
            .nodes
            .iter()
            .map(|n| metrics.component(&n.decl.name, n.decl.kind))
            .collect();
        let shutdown = CancellationToken::new();
        let mut inputs: Vec<Option<Input>> = Vec::new();
        let mut edges_to: HashMap<(usize, String), Vec<Edge>> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.decl.kind == Kind::Source {
                inputs.push(None);
                continue;
            }
            let (edge, input) = match n.decl.buffer.kind {
                BufferType::Memory => channel::buffer(n.decl.buffer, comp_metrics[i].clone()),
                BufferType::Disk => {
                    let dir = self.config.component_dir(&n.decl.name).join("buffer");
                    let cfg = n.decl.buffer;
                    let token = shutdown.child_token();
                    match crate::disk_buffer::open(dir, cfg, comp_metrics[i].clone(), token).await {
                        Ok(pair) => pair,
                        Err(e) => {
                            errors.push(n.decl.error(Some("buffer"), format!("cannot start: {e}")));
                            continue;
                        }
                    }
                }
            };
            inputs.push(Some(input));
            for (p, output) in &n.inputs {
                edges_to
                    .entry((*p, output.clone()))
                    .or_default()
                    .push(edge.clone());
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut outputs: Vec<Outputs> = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let default = Output::new(
                edges_to
                    .remove(&(i, DEFAULT_OUTPUT.to_string()))
                    .unwrap_or_default(),
            );
            let named = n
                .outputs
                .iter()
                .map(|o| {
                    let edges = edges_to.remove(&(i, o.clone())).unwrap_or_default();
                    (o.clone(), Output::new(edges))
                })
                .collect();
            outputs.push(Outputs::new(default, named, comp_metrics[i].clone()));
        }

        let mut sources = JoinSet::new();
        let mut others = JoinSet::new();
        // Transforms fed, directly or through other transforms, by a disk buffer: at shutdown
        // they drop open state instead of flushing it (the buffer replays it next start).
        let mut below_disk: Vec<bool> = self
            .nodes
            .iter()
            .map(|n| n.decl.kind != Kind::Source && n.decl.buffer.kind == BufferType::Disk)
            .collect();
        loop {
            let mut changed = false;
            for (i, n) in self.nodes.iter().enumerate() {
                if !below_disk[i]
                    && n.decl.kind == Kind::Transform
                    && n.inputs.iter().any(|(p, _)| below_disk[*p])
                {
                    below_disk[i] = true;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let iter = self
            .nodes
            .iter()
            .zip(built)
            .zip(inputs)
            .zip(outputs)
            .zip(comp_metrics);
        for (idx, ((((node, built), input), out), m)) in iter.enumerate() {
            let name = node.decl.name.clone();
            if let Some(input) = &input {
                input.route_poison_to(&out);
            }
            match (built, input) {
                (Some(Built::Source(source)), _) => {
                    let cx = SourceContext {
                        name: name.clone(),
                        out,
                        shutdown: shutdown.child_token(),
                        metrics: m,
                    };
                    sources.spawn(async move { (name, source.run(cx).await) });
                }
                (Some(Built::Transform(t)), Some(input)) => {
                    let stop = below_disk[idx].then(|| shutdown.clone());
                    others.spawn(async move { (name, run_transform(t, input, out, stop).await) });
                }
                (Some(Built::Sink(sink)), Some(input)) => {
                    let cx = SinkContext {
                        name: name.clone(),
                        metrics: m,
                        out,
                    };
                    others.spawn(async move { (name, sink.run(SinkInput::new(input), cx).await) });
                }
                _ => {}
            }
        }
        Ok(Running {
            shutdown,
            sources,
            others,
            timeout: self.config.settings.shutdown_timeout.0,
        })
    }
}

fn mermaid_id(name: &str) -> String {
    name.replace('-', "_")
}

enum Built {
    Source(Box<dyn crate::source::Source>),
    Transform(Box<dyn Transform>),
    Sink(Box<dyn crate::sink::Sink>),
}

async fn run_transform(
    mut t: Box<dyn Transform>,
    mut input: Input,
    outputs: Outputs,
    below_disk_buffer: Option<CancellationToken>,
) -> Result<(), BoxError> {
    let mut out = TransformOutput::default();
    let mut ticker = t.tick_interval().map(|d| {
        let mut i = tokio::time::interval(d.max(Duration::from_millis(1)));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    loop {
        let tick = async {
            match ticker.as_mut() {
                Some(i) => {
                    i.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            batch = input.recv() => match batch {
                Some(batch) => t.process(batch, &mut out),
                None => break,
            },
            _ = tick => t.on_tick(now_ns(), &mut out),
        }
        emit(&outputs, &mut out).await?;
    }
    if input.abandoned() || below_disk_buffer.is_some_and(|s| s.is_cancelled()) {
        // Shutdown with a disk buffer upstream: open state (windows) is dropped, not flushed
        // as partial output; its records were not released and are replayed at the next start.
        t.save_state();
        return Ok(());
    }
    t.flush(&mut out);
    emit(&outputs, &mut out).await?;
    t.save_state();
    Ok(())
}

async fn emit(outputs: &Outputs, out: &mut TransformOutput) -> Result<(), BoxError> {
    for (name, records) in out.take() {
        outputs.send_to(&name, Batch::new(records)).await?;
    }
    Ok(())
}

/// Wall-clock time in nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// A started pipeline.
pub struct Running {
    shutdown: CancellationToken,
    sources: JoinSet<(String, Result<(), BoxError>)>,
    others: JoinSet<(String, Result<(), BoxError>)>,
    timeout: Duration,
}

/// Why a pipeline did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{} component(s) failed: {}", .0.len(), .0.iter().map(|(n, e)| format!("{n}: {e}")).collect::<Vec<_>>().join("; "))]
    Failed(Vec<(String, String)>),
    #[error("shutdown did not finish within {0:?}; aborted {1} task(s) (unacknowledged data will be redelivered)")]
    Deadline(Duration, usize),
}

impl Running {
    /// Cancel this token to shut the pipeline down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until every component has finished (see the [module docs](self)).
    pub async fn wait(mut self) -> Result<(), RunError> {
        let mut failures: Vec<(String, String)> = Vec::new();
        let mut deadline: Option<Instant> = None;
        loop {
            if self.sources.is_empty() && self.others.is_empty() {
                break;
            }
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(res) = self.sources.join_next(), if !self.sources.is_empty() => {
                    Self::record(res, &mut failures, &self.shutdown);
                }
                Some(res) = self.others.join_next(), if !self.others.is_empty() => {
                    Self::record(res, &mut failures, &self.shutdown);
                }
                _ = self.shutdown.cancelled(), if deadline.is_none() => {
                    tracing::info!(timeout = ?self.timeout, "shutting down: draining in-flight records");
                    deadline = Some(Instant::now() + self.timeout);
                }
                _ = sleep => {
                    let n = self.sources.len() + self.others.len();
                    // Sources first: once they are gone no acknowledgement can race the teardown.
                    self.sources.shutdown().await;
                    self.others.shutdown().await;
                    return Err(RunError::Deadline(self.timeout, n));
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(RunError::Failed(failures))
        }
    }

    fn record(
        res: Result<(String, Result<(), BoxError>), tokio::task::JoinError>,
        failures: &mut Vec<(String, String)>,
        shutdown: &CancellationToken,
    ) {
        match res {
            Ok((name, Ok(()))) => tracing::debug!(component = %name, "finished"),
            Ok((name, Err(e))) => {
                tracing::error!(component = %name, error = %e, "component failed; shutting down");
                failures.push((name, e.to_string()));
                shutdown.cancel();
            }
            Err(e) => {
                tracing::error!(error = %e, "component task panicked; shutting down");
                failures.push(("task".into(), e.to_string()));
                shutdown.cancel();
            }
        }
    }
}

impl RunError {
    /// The failed components and their errors.
    pub fn failures(&self) -> &[(String, String)] {
        match self {
            RunError::Failed(f) => f,
            RunError::Deadline(..) => &[],
        }
    }
}

/// Convenience for tests and embedders: plan, start and wait with a shutdown token.
pub async fn run(
    config: PipelineConfig,
    registry: &Registry,
    metrics: &Metrics,
    shutdown: Option<CancellationToken>,
) -> Result<(), BoxError> {
    let plan = plan(config, registry).map_err(join_errors)?;
    let running = plan.start(metrics).await.map_err(join_errors)?;
    if let Some(token) = shutdown {
        let inner = running.shutdown_token();
        tokio::spawn(async move {
            token.cancelled().await;
            inner.cancel();
        });
    }
    running.wait().await?;
    Ok(())
}

fn join_errors(errors: Vec<ConfigError>) -> BoxError {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
        .into()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use async_trait::async_trait;
    use serde::Deserialize;

    use super::*;
    use crate::config::{parse_str, HumanDuration};
    use crate::registry::{SinkConfig, SourceConfig, TransformConfig};

    /// An acknowledging source that tolerates `tolerance`.
    #[derive(Debug, Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct Acking {
        tolerance: HumanDuration,
    }

    #[async_trait]
    impl SourceConfig for Acking {
        async fn build(
            &self,
            _: &BuildContext,
        ) -> Result<Box<dyn crate::source::Source>, BoxError> {
            Err("not built in these tests".into())
        }
        fn acknowledges(&self) -> bool {
            true
        }
        fn ack_tolerance(&self) -> Option<(Duration, &'static str)> {
            Some((self.tolerance.0, "tolerance"))
        }
    }

    /// A transform or sink that holds acknowledgements for `hold` (none when absent).
    #[derive(Debug, Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct Holding {
        #[serde(default)]
        hold: Option<HumanDuration>,
    }

    #[async_trait]
    impl TransformConfig for Holding {
        async fn build(&self, _: &BuildContext) -> Result<Box<dyn Transform>, BoxError> {
            Err("not built in these tests".into())
        }
        fn ack_hold(&self) -> Option<(Duration, &'static str)> {
            self.hold.map(|h| (h.0, "hold"))
        }
    }

    #[async_trait]
    impl SinkConfig for Holding {
        async fn build(&self, _: &BuildContext) -> Result<Box<dyn crate::sink::Sink>, BoxError> {
            Err("not built in these tests".into())
        }
        fn can_reject(&self) -> bool {
            false
        }
        fn ack_hold(&self) -> Option<(Duration, &'static str)> {
            self.hold.map(|h| (h.0, "hold"))
        }
    }

    fn warnings(text: &str) -> Vec<String> {
        let mut registry = Registry::new();
        registry
            .source::<Acking>("acking")
            .transform::<Holding>("holding")
            .sink::<Holding>("holding");
        let config = parse_str(text, Path::new("t.toml")).expect("parses");
        let plan = plan(config, &registry).expect("valid");
        plan.warnings()
            .iter()
            .map(ToString::to_string)
            .filter(|w| w.contains("holds acknowledgements"))
            .collect()
    }

    const CHAIN: &str = r#"
[sources.in]
type = "acking"
tolerance = "30s"

[transforms.pass]
type = "holding"
inputs = ["in"]
BUFFER_PASS

[transforms.hourly]
type = "holding"
inputs = ["pass"]
hold = "1h 10s"
BUFFER_HOURLY

[sinks.quick]
type = "holding"
inputs = ["hourly", "in"]
hold = "10s"

[sinks.dead]
type = "holding"
inputs = ["in.dead_letter", "pass.dead_letter", "hourly.dead_letter"]
"#;

    fn chain(pass: &str, hourly: &str) -> String {
        CHAIN
            .replace("BUFFER_PASS", pass)
            .replace("BUFFER_HOURLY", hourly)
    }

    #[test]
    fn a_hold_longer_than_the_source_tolerates_warns_with_the_path_and_the_fix() {
        let w = warnings(&chain("", ""));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("transforms.hourly:"), "{}", w[0]);
        assert!(
            w[0].contains("holds acknowledgements up to 1h 10s (hold) but source `in` tolerates 30s (tolerance); add buffer = { type = \"disk\" } to `hourly` (or a stage before it)"),
            "{}",
            w[0]
        );
    }

    #[test]
    fn a_disk_buffer_at_or_before_the_holding_stage_ends_the_warning() {
        let disk = "buffer = { type = \"disk\" }";
        assert_eq!(warnings(&chain("", disk)), Vec::<String>::new());
        assert_eq!(warnings(&chain(disk, "")), Vec::<String>::new());
        // A memory buffer does not acknowledge: still a warning.
        let memory = "buffer = { max_batches = 4 }";
        assert_eq!(warnings(&chain(memory, "")).len(), 1);
    }

    #[test]
    fn holds_within_the_tolerance_and_tolerant_sources_do_not_warn() {
        let within = chain("", "").replace("hold = \"1h 10s\"", "hold = \"30s\"");
        assert_eq!(warnings(&within), Vec::<String>::new());
        let tolerant = chain("", "").replace("tolerance = \"30s\"", "tolerance = \"2h\"");
        assert_eq!(warnings(&tolerant), Vec::<String>::new());
    }

    #[test]
    fn a_disk_buffer_can_dead_letter_so_its_dead_letter_output_should_be_read() {
        let mut registry = Registry::new();
        registry
            .source::<Acking>("acking")
            .sink::<Holding>("holding");
        let text = |buffer: &str| {
            format!(
                "[sources.in]\ntype = \"acking\"\ntolerance = \"30s\"\n\n[sinks.out]\ntype = \"holding\"\ninputs = [\"in\"]\n{buffer}\n"
            )
        };
        let dead_letter_warnings = |buffer: &str| -> Vec<String> {
            let config = parse_str(&text(buffer), Path::new("t.toml")).expect("parses");
            plan(config, &registry)
                .expect("valid")
                .warnings()
                .iter()
                .map(ToString::to_string)
                .filter(|w| w.contains("out.dead_letter"))
                .collect()
        };
        // The sink itself never rejects: nothing to warn about in memory.
        assert_eq!(dead_letter_warnings(""), Vec::<String>::new());
        assert_eq!(
            dead_letter_warnings("buffer = { type = \"disk\" }").len(),
            1,
            "its disk buffer dead-letters poison records"
        );
        assert_eq!(
            dead_letter_warnings("buffer = { type = \"disk\", max_replays = 0 }"),
            Vec::<String>::new()
        );
    }
}
