//! The `sluice` binary: every built-in component.

/// mimalloc instead of glibc malloc: records are many small allocations made on one thread
/// and freed on another; with glibc, malloc/free took ~20% of the Kafka consumer's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice_cli::run_with(sluice_cli::default_registry())
}
