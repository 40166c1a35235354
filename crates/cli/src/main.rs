//! The `sluice` binary: every built-in component.

/// mimalloc returns memory freed after a burst (a sink outage's backlog, a replay) to the OS;
/// with the system allocator the process kept its peak RSS for good.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice_cli::run_with(sluice_cli::default_registry())
}
