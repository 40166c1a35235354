//! Benchmarks and load tools for Sluice live beside this file; see the README section "Benchmarks".
