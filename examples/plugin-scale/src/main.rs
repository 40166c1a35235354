//! A `sluice` binary with every built-in component plus the `scale` plugin.

fn main() -> std::process::ExitCode {
    let mut registry = sluice_cli::default_registry();
    sluice_plugin_scale::register(&mut registry);
    sluice_cli::run_with(registry)
}
