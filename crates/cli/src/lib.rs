//! The `sluice` command line. A plugin binary builds its own [`Registry`] (starting from
//! [`default_registry`]), adds its components and hands it to [`run_with`]:
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     let mut registry = sluice_cli::default_registry();
//!     // registry.transform::<my_plugin::MyConfig>("my_transform");
//!     sluice_cli::run_with(registry)
//! }
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use sluice_core::config::{self, ConfigError, HumanDuration};
use sluice_core::metrics::{self, Metrics};
use sluice_core::registry::Registry;
use sluice_core::topology;

/// The demo pipeline, embedded so `sluice demo` works from any directory.
pub const DEMO_PIPELINE: &str = include_str!("../../../pipelines/demo.toml");

/// Every built-in component type.
pub fn default_registry() -> Registry {
    let mut r = Registry::new();
    sluice_sources::register(&mut r);
    sluice_transforms::register(&mut r);
    sluice_sinks::register(&mut r);
    r
}

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sluice: IoT telemetry pipelines (MQTT, SQS, Kafka → transforms → Timestream, InfluxDB, Parquet, Kafka)",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline from one or more TOML files (merged).
    Run(RunArgs),
    /// Run the built-in demo pipeline (simulator → decode → console + file).
    Demo(DemoArgs),
    /// Check pipeline files without starting anything; exit 1 with every problem found.
    Validate {
        /// Pipeline files (merged).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the pipeline as a Mermaid flowchart.
    Graph {
        /// Pipeline files (merged).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List every component type with its options and defaults.
    Components {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Only this type.
        name: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Pipeline files (merged).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    opts: RunOptions,
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Stop after this many simulated records (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
    #[command(flatten)]
    opts: RunOptions,
}

#[derive(Debug, clap::Args)]
struct RunOptions {
    /// Serve Prometheus metrics on http://ADDR/metrics and a health check on /health.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// How often to print the rate line on stderr ("0s" to disable).
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    status_interval: HumanDuration,
}

/// Parses the command line and runs it; returns the process exit code.
pub fn run_with(registry: Registry) -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match execute(cli, registry) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

fn print_errors(errors: &[ConfigError]) {
    for e in errors {
        eprintln!("error: {e}");
    }
}

fn print_warnings(warnings: &[ConfigError]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

fn load(files: &[PathBuf]) -> Result<config::PipelineConfig, ExitCode> {
    config::load_files(files).map_err(|errors| {
        print_errors(&errors);
        ExitCode::FAILURE
    })
}

fn execute(cli: Cli, registry: Registry) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { files } => {
            let cfg = match load(&files) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            match topology::plan(cfg, &registry) {
                Ok(plan) => {
                    print_warnings(&plan.warnings());
                    let comps = plan.components();
                    let count = |k| comps.iter().filter(|(kind, _, _)| *kind == k).count();
                    use sluice_core::metrics::Kind;
                    println!(
                        "ok: {} source(s), {} transform(s), {} sink(s)",
                        count(Kind::Source),
                        count(Kind::Transform),
                        count(Kind::Sink)
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    print_errors(&errors);
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Graph { files } => {
            let cfg = match load(&files) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            match topology::plan(cfg, &registry) {
                Ok(plan) => {
                    print!("{}", plan.mermaid());
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    print_errors(&errors);
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Components { json, name } => {
            let docs: Vec<_> = registry
                .docs()
                .into_iter()
                .filter(|d| name.as_deref().is_none_or(|n| n == d.name))
                .collect();
            if docs.is_empty() {
                anyhow::bail!("no component type named {:?}", name.unwrap_or_default());
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&docs)?);
            } else {
                for d in docs {
                    println!(
                        "{} {}  {}",
                        d.kind,
                        d.name,
                        d.description.replace('\n', " ")
                    );
                    for o in d.options {
                        let default = match (&o.default, o.required) {
                            (_, true) => "required".to_string(),
                            (Some(v), _) => format!("default {v}"),
                            (None, _) => "optional".to_string(),
                        };
                        println!(
                            "    {:<22} {:<28} {:<22} {}",
                            o.name, o.type_name, default, o.description
                        );
                    }
                    println!();
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let cfg = match load(&args.files) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            run_pipeline(cfg, registry, args.opts)
        }
        Command::Demo(args) => {
            let mut cfg = config::PipelineConfig::default();
            let env = |k: &str| match (k, args.count) {
                ("DEMO_COUNT", Some(n)) => Some(n.to_string()),
                _ => std::env::var(k).ok(),
            };
            if let Err(errors) = config::parse_into(
                &mut cfg,
                DEMO_PIPELINE,
                std::path::Path::new("pipelines/demo.toml"),
                env,
            ) {
                print_errors(&errors);
                return Ok(ExitCode::FAILURE);
            }
            run_pipeline(cfg, registry, args.opts)
        }
    }
}

fn run_pipeline(
    cfg: config::PipelineConfig,
    registry: Registry,
    opts: RunOptions,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let pipeline_id = cfg.id().to_string();
        let plan = match topology::plan(cfg, &registry) {
            Ok(p) => p,
            Err(errors) => {
                print_errors(&errors);
                return Ok(ExitCode::FAILURE);
            }
        };
        for w in plan.warnings() {
            tracing::warn!("{w}");
        }
        let metrics = Metrics::new();
        if let Some(addr) = opts.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-addr {addr}: {e}"))?;
            tracing::info!(%addr, "serving /metrics and /health");
            tokio::spawn(metrics::serve(listener, metrics.clone()));
        }
        let running = match plan.start(&metrics).await {
            Ok(r) => r,
            Err(errors) => {
                print_errors(&errors);
                return Ok(ExitCode::FAILURE);
            }
        };
        tracing::info!(pipeline = %pipeline_id, "pipeline started");
        let shutdown = running.shutdown_token();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received: stopping sources, draining (again to abort)");
            shutdown.cancel();
            wait_for_signal().await;
            eprintln!(
                "second signal: exiting without draining (unacknowledged data will be redelivered)"
            );
            std::process::exit(130);
        });
        let status = (!opts.status_interval.0.is_zero())
            .then(|| tokio::spawn(status_lines(metrics.clone(), opts.status_interval.0)));
        let started = Instant::now();
        let result = running.wait().await;
        if let Some(s) = status {
            s.abort();
        }
        let comps = metrics.all();
        eprintln!(
            "[sluice] finished after {:.1}s | {}",
            started.elapsed().as_secs_f64(),
            metrics::totals_line(&comps)
        );
        match result {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::FAILURE)
            }
        }
    })
}

async fn status_lines(metrics: Metrics, every: Duration) {
    let started = Instant::now();
    let mut last = Instant::now();
    let mut previous: Vec<metrics::Snapshot> = Vec::new();
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let comps = metrics.all();
        let line = metrics::rate_line(&comps, &previous, last.elapsed());
        eprintln!("[sluice {:>5.0}s] {line}", started.elapsed().as_secs_f64());
        previous = comps.iter().map(|m| m.snapshot()).collect();
        last = Instant::now();
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
