//! Sluice transforms: one module per transform type. [`register`] adds them all to a registry.
//!
//! * [`aggregate`]: event-time windowed rollups (tumbling, hopping, session) per group;
//! * [`anomaly`]: streaming detectors per series, plus missing-heartbeat alerts;
//! * [`filter`], [`route`], [`remap`]: record-at-a-time stages using the [`expression`] language;
//! * [`dedupe`]: drops redelivered duplicates within a time window.
//!
//! Every transform follows the same acknowledgement rules: a record dropped on purpose is
//! [`discard`](sluice_core::record::Record::discard)ed (counts as delivered), a record that cannot
//! be handled goes to `dead_letter` with a reason, and a record absorbed into state (a window)
//! hands its finalizers to the record emitted from that state.

pub mod aggregate;
pub mod anomaly;
pub mod dedupe;
mod event_time;
pub mod expression;
pub mod filter;
pub mod group;
pub mod remap;
pub mod route;

use sluice_core::registry::{BuildContext, Registry};

/// Registers every transform type of this crate.
pub fn register(registry: &mut Registry) {
    registry
        .transform::<aggregate::AggregateConfig>("aggregate")
        .transform::<anomaly::AnomalyConfig>("anomaly")
        .transform::<filter::FilterConfig>("filter")
        .transform::<route::RouteConfig>("route")
        .transform::<remap::RemapConfig>("remap")
        .transform::<dedupe::DedupeConfig>("dedupe");
}

/// Why a transform could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An option has an invalid value.
    #[error("transforms.{component}: option `{option}`: {message}")]
    Option {
        component: String,
        option: String,
        message: String,
    },
}

impl Error {
    /// An error about `option` of the component being built.
    pub fn option(
        cx: &BuildContext,
        option: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Option {
            component: cx.name.clone(),
            option: option.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Small helpers for the unit tests of this crate.
    use sluice_core::record::{Record, Value};
    use sluice_core::registry::BuildContext;
    use sluice_core::transform::TransformOutput;

    pub fn cx() -> BuildContext {
        BuildContext {
            name: "t".into(),
            pipeline_id: "test".into(),
            state_dir: None,
        }
    }

    /// A record at `secs` seconds with `device_id` = `dev` and the given fields.
    pub fn rec(secs: f64, dev: &str, fields: &[(&str, Value)]) -> Record {
        let mut r = Record::new((secs * 1e9) as i64);
        r.set_tag("device_id", dev);
        for (k, v) in fields {
            r.set_field(k, v.clone());
        }
        r
    }

    /// The records emitted to `output`.
    pub fn take(out: &mut TransformOutput, output: &str) -> Vec<Record> {
        let mut all = out.take();
        let mut found = Vec::new();
        let mut rest = Vec::new();
        for (name, records) in all.drain(..) {
            if name == output {
                found.extend(records);
            } else {
                rest.push((name, records));
            }
        }
        for (name, records) in rest {
            for r in records {
                out.push_to(&name, r);
            }
        }
        found
    }

    pub fn f64_field(r: &Record, name: &str) -> f64 {
        r.field(name)
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("field {name} missing or not numeric in {r:?}"))
    }

    pub fn str_field<'a>(r: &'a Record, name: &str) -> &'a str {
        r.field(name)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("field {name} missing or not a string in {r:?}"))
    }
}
