//! The `sluice` binary: every built-in component.

fn main() -> std::process::ExitCode {
    sluice_cli::run_with(sluice_cli::default_registry())
}
