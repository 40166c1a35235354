//! Sluice transforms: one module per transform type. [`register`] adds them all to a registry.

use sluice_core::registry::Registry;

/// Registers every transform type of this crate.
pub fn register(_registry: &mut Registry) {}
