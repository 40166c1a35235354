//! `route` transform: sends each record to the named outputs whose condition holds.
//!
//! ```toml
//! [transforms.by_temp]
//! type = "route"
//! inputs = ["sim"]
//! routes = { hot = "temp > 30", cold = "temp < 5" }
//!
//! [sinks.alerts]
//! inputs = ["by_temp.hot"]            # and "by_temp._unmatched" for the rest
//! ```
//!
//! A record matching several routes goes to each of them (a copy per route, each holding its
//! own finalizer clone, so it is acknowledged once every copy is delivered). A record matching
//! none goes to `_unmatched`. A record on which a condition cannot be evaluated goes to
//! `dead_letter`. The condition language is described in [`crate::expression`].

use async_trait::async_trait;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::record::Batch;
use sluice_core::registry::{BuildContext, TransformConfig};
use sluice_core::transform::{Transform, TransformOutput};
use sluice_core::BoxError;
use smallvec::SmallVec;

use crate::expression::Expression;
use crate::Error;

/// The output receiving records that match no route.
pub const UNMATCHED: &str = "_unmatched";

/// Named outputs by condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Output name → CEL condition, e.g. `{ hot = "temp > 30" }`. Consumers read
    /// `"<component>.<name>"`. Required.
    pub routes: IndexMap<String, String>,
    /// Send a record only to the first matching route (in declaration order) instead of every
    /// matching route. Default false.
    #[serde(default)]
    pub first_match: bool,
}

#[async_trait]
impl TransformConfig for RouteConfig {
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Transform>, BoxError> {
        Ok(Box::new(Router::new(self, cx)?))
    }

    fn outputs(&self) -> Vec<String> {
        let mut names: Vec<String> = self.routes.keys().cloned().collect();
        names.push(UNMATCHED.to_string());
        names
    }
}

/// The running `route`.
#[derive(Debug)]
pub struct Router {
    routes: Vec<(String, Expression)>,
    first_match: bool,
}

impl Router {
    pub fn new(config: &RouteConfig, cx: &BuildContext) -> Result<Self, Error> {
        if config.routes.is_empty() {
            return Err(Error::option(cx, "routes", "declare at least one route"));
        }
        let mut routes = Vec::new();
        for (name, condition) in &config.routes {
            if matches!(name.as_str(), "default" | "dead_letter" | UNMATCHED) {
                return Err(Error::option(
                    cx,
                    format!("routes.{name}"),
                    "this output name is reserved",
                ));
            }
            let e = Expression::compile(condition).map_err(|e| {
                Error::option(cx, format!("routes.{name}"), format!("{condition:?}: {e}"))
            })?;
            routes.push((name.clone(), e));
        }
        Ok(Router {
            routes,
            first_match: config.first_match,
        })
    }
}

impl Transform for Router {
    fn process(&mut self, batch: Batch, out: &mut TransformOutput) {
        'records: for r in batch.records {
            let mut matched: SmallVec<[usize; 4]> = SmallVec::new();
            for (i, (name, cond)) in self.routes.iter().enumerate() {
                match cond.eval_bool(&r) {
                    Ok(true) => {
                        matched.push(i);
                        if self.first_match {
                            break;
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        let reason = format!("route `{name}`: condition `{}`: {e}", cond.source());
                        out.dead_letter(r, reason);
                        continue 'records;
                    }
                }
            }
            let Some((&last, rest)) = matched.split_last() else {
                out.push_to(UNMATCHED, r);
                continue;
            };
            for &i in rest {
                out.push_to(&self.routes[i].0, r.clone());
            }
            out.push_to(&self.routes[last].0, r);
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_core::ack::{self, BatchStatus};
    use sluice_core::record::Value;

    use super::*;
    use crate::testing::{cx, rec, take};

    fn router(routes: &[(&str, &str)], first_match: bool) -> Router {
        let config = RouteConfig {
            routes: routes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            first_match,
        };
        Router::new(&config, &cx()).expect("valid")
    }

    #[tokio::test]
    async fn routes_to_every_match_and_unmatched() {
        let mut r = router(&[("hot", "temp > 30"), ("very_hot", "temp > 40")], false);
        let (fin, status) = ack::batch();
        let mut scorching = rec(0.0, "a", &[("temp", Value::F64(45.0))]);
        scorching.finalizers.push(fin);
        let mut out = TransformOutput::default();
        r.process(
            Batch::new(vec![
                scorching,
                rec(0.0, "a", &[("temp", Value::F64(35.0))]),
                rec(0.0, "a", &[("temp", Value::F64(5.0))]),
                rec(0.0, "a", &[("humidity", Value::F64(5.0))]),
            ]),
            &mut out,
        );
        let hot = take(&mut out, "hot");
        let very_hot = take(&mut out, "very_hot");
        assert_eq!(hot.len(), 2);
        assert_eq!(very_hot.len(), 1);
        assert_eq!(take(&mut out, UNMATCHED).len(), 1);
        let dead = take(&mut out, "dead_letter");
        assert_eq!(dead.len(), 1);
        assert!(dead[0]
            .meta
            .error
            .as_deref()
            .is_some_and(|e| e.contains("route `hot`")));
        // Both copies of the 45° record must be delivered before the source may ack.
        let mut hot = hot.into_iter();
        hot.next().expect("45").finalize(BatchStatus::Delivered);
        drop(very_hot); // a copy lost without a status
        assert_eq!(status.await, BatchStatus::Errored);
    }

    #[test]
    fn first_match_stops_at_the_first_route() {
        let mut r = router(&[("hot", "temp > 30"), ("very_hot", "temp > 40")], true);
        let mut out = TransformOutput::default();
        r.process(
            Batch::new(vec![rec(0.0, "a", &[("temp", Value::F64(45.0))])]),
            &mut out,
        );
        assert_eq!(take(&mut out, "hot").len(), 1);
        assert!(take(&mut out, "very_hot").is_empty());
    }

    #[test]
    fn outputs_and_validation() {
        let config = RouteConfig {
            routes: [("hot".to_string(), "temp > 30".to_string())]
                .into_iter()
                .collect(),
            first_match: false,
        };
        assert_eq!(config.outputs(), vec!["hot", UNMATCHED]);
        let reserved = RouteConfig {
            routes: [("default".to_string(), "true".to_string())]
                .into_iter()
                .collect(),
            first_match: false,
        };
        assert!(Router::new(&reserved, &cx()).is_err());
        let bad = RouteConfig {
            routes: [("x".to_string(), "temp >".to_string())]
                .into_iter()
                .collect(),
            first_match: false,
        };
        let err = Router::new(&bad, &cx()).expect_err("syntax error");
        assert!(err.to_string().contains("routes.x"), "{err}");
    }
}
