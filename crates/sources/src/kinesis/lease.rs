//! The `kinesis` source's lease table: one DynamoDB item per shard in the layout of the Kinesis
//! Client Library (`leaseKey` = shard id, `checkpoint`, `leaseOwner`, `leaseCounter`,
//! `parentShardId`). Every write that could race with another instance is conditional, so
//! DynamoDB — not a cluster of ours — decides who owns a shard.
//!
//! [`plan`] is the pure part: which leases an instance should take (free, expired, or stolen
//! from an instance holding more than its share).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ScalarAttributeType, TableStatus,
};
use aws_sdk_dynamodb::Client;

/// Checkpoint of a shard read to its end (its children may start).
pub(crate) const SHARD_END: &str = "SHARD_END";
/// Checkpoint of a shard not read yet: start at its oldest record.
pub(crate) const TRIM_HORIZON: &str = "TRIM_HORIZON";
/// Checkpoint of a shard not read yet: start at records arriving from now on.
pub(crate) const LATEST: &str = "LATEST";

/// One lease item.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Lease {
    /// The shard id.
    pub key: String,
    /// The last delivered sequence number, or [`TRIM_HORIZON`], [`LATEST`], [`SHARD_END`].
    pub checkpoint: String,
    /// The instance holding it; `None` when free.
    pub owner: Option<String>,
    /// Incremented by every renewal and every change of owner.
    pub counter: i64,
    /// The shard's parents (resharding): read to [`SHARD_END`] before this one starts.
    pub parents: Vec<String>,
}

impl Lease {
    fn from_item(item: &HashMap<String, AttributeValue>) -> Option<Lease> {
        let s = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
        Some(Lease {
            key: s("leaseKey")?,
            checkpoint: s("checkpoint").unwrap_or_else(|| TRIM_HORIZON.to_string()),
            owner: s("leaseOwner").filter(|o| !o.is_empty()),
            counter: item
                .get("leaseCounter")
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            parents: item
                .get("parentShardId")
                .and_then(|v| v.as_ss().ok())
                .cloned()
                .unwrap_or_default(),
        })
    }
}

/// What a conditional write found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Written<T> {
    Done(T),
    /// The condition failed: another instance owns the lease now (or took it first).
    Lost,
}

/// The lease table of one stream (one DynamoDB table).
#[derive(Clone)]
pub(crate) struct LeaseTable {
    client: Client,
    table: String,
}

fn key(shard: &str) -> (String, AttributeValue) {
    ("leaseKey".to_string(), AttributeValue::S(shard.to_string()))
}

fn conditional<E>(e: &aws_sdk_dynamodb::error::SdkError<E>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    e.as_service_error()
        .and_then(|s| s.code())
        .is_some_and(|c| c == "ConditionalCheckFailedException")
}

impl LeaseTable {
    pub(crate) fn new(client: Client, table: &str) -> Self {
        LeaseTable {
            client,
            table: table.to_string(),
        }
    }

    /// Creates the table (on-demand billing, key `leaseKey`) unless it exists; waits up to
    /// 60 s for it to become active.
    pub(crate) async fn ensure(&self) -> Result<(), String> {
        let described = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await;
        match described {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                let created = self
                    .client
                    .create_table()
                    .table_name(&self.table)
                    .billing_mode(BillingMode::PayPerRequest)
                    .attribute_definitions(
                        AttributeDefinition::builder()
                            .attribute_name("leaseKey")
                            .attribute_type(ScalarAttributeType::S)
                            .build()
                            .map_err(|e| e.to_string())?,
                    )
                    .key_schema(
                        KeySchemaElement::builder()
                            .attribute_name("leaseKey")
                            .key_type(KeyType::Hash)
                            .build()
                            .map_err(|e| e.to_string())?,
                    )
                    .send()
                    .await;
                match created {
                    Ok(_) => tracing::info!(table = %self.table, "created the kinesis lease table"),
                    // Another instance created it at the same moment.
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|s| s.is_resource_in_use_exception()) => {}
                    Err(e) => {
                        return Err(format!(
                            "creating lease table {:?}: {}",
                            self.table,
                            DisplayErrorContext(&e)
                        ))
                    }
                }
            }
            Err(e) => {
                return Err(format!(
                    "describing lease table {:?}: {}",
                    self.table,
                    DisplayErrorContext(&e)
                ))
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
                .map_err(|e| format!("{}", DisplayErrorContext(&e)))?
                .table
                .and_then(|t| t.table_status);
            if status == Some(TableStatus::Active) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "lease table {:?} is not active after 60 s ({status:?})",
                    self.table
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Every lease (a consistent read, all pages).
    pub(crate) async fn scan(&self) -> Result<Vec<Lease>, String> {
        let mut leases = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| format!("scanning {:?}: {}", self.table, DisplayErrorContext(&e)))?;
            leases.extend(page.items().iter().filter_map(Lease::from_item));
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(leases),
            }
        }
    }

    /// Adds a free lease for `shard` unless one exists.
    pub(crate) async fn create(
        &self,
        shard: &str,
        checkpoint: &str,
        parents: &[String],
    ) -> Result<Written<()>, String> {
        let (k, v) = key(shard);
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(k, v)
            .item("checkpoint", AttributeValue::S(checkpoint.to_string()))
            .item("leaseCounter", AttributeValue::N("0".into()))
            .condition_expression("attribute_not_exists(leaseKey)");
        if !parents.is_empty() {
            put = put.item("parentShardId", AttributeValue::Ss(parents.to_vec()));
        }
        match put.send().await {
            Ok(_) => Ok(Written::Done(())),
            Err(e) if conditional(&e) => Ok(Written::Lost),
            Err(e) => Err(format!(
                "creating the lease of {shard}: {}",
                DisplayErrorContext(&e)
            )),
        }
    }

    /// Takes `lease` for `me` if its counter is still the one seen; returns the lease as
    /// written (with the newest checkpoint).
    pub(crate) async fn take(&self, lease: &Lease, me: &str) -> Result<Written<Lease>, String> {
        let (k, v) = key(&lease.key);
        let answer = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(k, v)
            .update_expression("SET leaseOwner = :me ADD leaseCounter :one")
            .condition_expression("leaseCounter = :seen")
            .expression_attribute_values(":me", AttributeValue::S(me.to_string()))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":seen", AttributeValue::N(lease.counter.to_string()))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match answer {
            Ok(out) => out
                .attributes
                .as_ref()
                .and_then(Lease::from_item)
                .map(Written::Done)
                .ok_or_else(|| format!("taking {}: no attributes returned", lease.key)),
            Err(e) if conditional(&e) => Ok(Written::Lost),
            Err(e) => Err(format!("taking {}: {}", lease.key, DisplayErrorContext(&e))),
        }
    }

    /// Renews a held lease: increments its counter if `me` still holds it at `counter`.
    pub(crate) async fn renew(
        &self,
        shard: &str,
        me: &str,
        counter: i64,
    ) -> Result<Written<i64>, String> {
        let (k, v) = key(shard);
        let answer = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(k, v)
            .update_expression("ADD leaseCounter :one")
            .condition_expression("leaseOwner = :me AND leaseCounter = :seen")
            .expression_attribute_values(":me", AttributeValue::S(me.to_string()))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":seen", AttributeValue::N(counter.to_string()))
            .send()
            .await;
        match answer {
            Ok(_) => Ok(Written::Done(counter + 1)),
            Err(e) if conditional(&e) => Ok(Written::Lost),
            Err(e) => Err(format!("renewing {shard}: {}", DisplayErrorContext(&e))),
        }
    }

    /// Stores `checkpoint` if `me` still holds the lease.
    pub(crate) async fn checkpoint(
        &self,
        shard: &str,
        me: &str,
        checkpoint: &str,
    ) -> Result<Written<()>, String> {
        let (k, v) = key(shard);
        let answer = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(k, v)
            .update_expression("SET checkpoint = :c")
            .condition_expression("leaseOwner = :me")
            .expression_attribute_values(":me", AttributeValue::S(me.to_string()))
            .expression_attribute_values(":c", AttributeValue::S(checkpoint.to_string()))
            .send()
            .await;
        match answer {
            Ok(_) => Ok(Written::Done(())),
            Err(e) if conditional(&e) => Ok(Written::Lost),
            Err(e) => Err(format!(
                "checkpointing {shard}: {}",
                DisplayErrorContext(&e)
            )),
        }
    }

    /// Frees a lease `me` holds (graceful stop), so another instance takes it at once.
    pub(crate) async fn release(&self, shard: &str, me: &str) -> Result<Written<()>, String> {
        let (k, v) = key(shard);
        let answer = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(k, v)
            .update_expression("REMOVE leaseOwner ADD leaseCounter :one")
            .condition_expression("leaseOwner = :me")
            .expression_attribute_values(":me", AttributeValue::S(me.to_string()))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .send()
            .await;
        match answer {
            Ok(_) => Ok(Written::Done(())),
            Err(e) if conditional(&e) => Ok(Written::Lost),
            Err(e) => Err(format!("releasing {shard}: {}", DisplayErrorContext(&e))),
        }
    }
}

/// When each lease's counter was last seen to change (this instance's clock): a lease whose
/// counter has not moved for `lease_timeout` belongs to a dead instance.
#[derive(Debug, Default)]
pub(crate) struct Observed(HashMap<String, (i64, Option<String>, Instant)>);

impl Observed {
    /// Records what a scan saw at `now`.
    pub(crate) fn update(&mut self, leases: &[Lease], now: Instant) {
        let keys: HashSet<&str> = leases.iter().map(|l| l.key.as_str()).collect();
        self.0.retain(|k, _| keys.contains(k.as_str()));
        for l in leases {
            let moved = self
                .0
                .get(&l.key)
                .is_none_or(|(c, o, _)| *c != l.counter || *o != l.owner);
            if moved {
                self.0
                    .insert(l.key.clone(), (l.counter, l.owner.clone(), now));
            }
        }
    }

    fn expired(&self, l: &Lease, now: Instant, timeout: Duration) -> bool {
        match self.0.get(&l.key) {
            Some((c, o, since)) if *c == l.counter && *o == l.owner => {
                now.duration_since(*since) >= timeout
            }
            _ => false,
        }
    }
}

/// Whether `lease` may be read now: not finished, and every parent read to its end (a parent
/// with no lease and no longer listed by the stream has expired from it: nothing left).
pub(crate) fn ready(lease: &Lease, by_key: &HashMap<&str, &Lease>, listed: &HashSet<&str>) -> bool {
    lease.checkpoint != SHARD_END
        && lease.parents.iter().all(|p| match by_key.get(p.as_str()) {
            Some(parent) => parent.checkpoint == SHARD_END,
            None => !listed.contains(p.as_str()),
        })
}

/// The leases `me` should try to take now: free or expired ready leases up to its fair share
/// (ready leases / live instances, rounded up), else one lease stolen from the instance that
/// holds the most, if that is more than the share. `held` are the leases `me` reads.
pub(crate) fn plan(
    leases: &[Lease],
    listed: &HashSet<&str>,
    observed: &Observed,
    held: &HashSet<String>,
    me: &str,
    now: Instant,
    timeout: Duration,
) -> Vec<Lease> {
    let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
    let ready: Vec<&Lease> = leases
        .iter()
        .filter(|l| ready(l, &by_key, listed))
        .collect();
    if ready.is_empty() {
        return Vec::new();
    }
    let available = |l: &Lease| match &l.owner {
        None => true,
        Some(o) if o == me => !held.contains(&l.key),
        Some(_) => observed.expired(l, now, timeout),
    };
    // Live instances: owners of ready leases that are not expired, and this one.
    let mut load: BTreeMap<&str, Vec<&Lease>> = BTreeMap::new();
    load.insert(me, Vec::new());
    for l in &ready {
        if let Some(o) = &l.owner {
            if !available(l) {
                load.entry(o.as_str()).or_default().push(l);
            }
        }
    }
    let share = ready.len().div_ceil(load.len());
    let mine = load.get(me).map_or(0, Vec::len);
    if mine >= share {
        return Vec::new();
    }
    let mut take: Vec<Lease> = ready
        .iter()
        .filter(|l| available(l))
        .take(share - mine)
        .map(|l| (*l).clone())
        .collect();
    if take.is_empty() {
        // Steal one from the busiest instance holding more than its share.
        let busiest = load
            .iter()
            .filter(|(o, _)| **o != me)
            .max_by_key(|(_, ls)| ls.len());
        if let Some((_, ls)) = busiest {
            if ls.len() > share {
                if let Some(l) = ls.iter().max_by_key(|l| l.key.as_str()) {
                    take.push((*l).clone());
                }
            }
        }
    }
    take
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str, owner: Option<&str>, counter: i64) -> Lease {
        Lease {
            key: key.into(),
            checkpoint: TRIM_HORIZON.into(),
            owner: owner.map(str::to_string),
            counter,
            parents: Vec::new(),
        }
    }

    fn keys(v: &[Lease]) -> Vec<&str> {
        v.iter().map(|l| l.key.as_str()).collect()
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn a_lone_instance_takes_every_free_lease() {
        let leases: Vec<Lease> = (0..4).map(|i| lease(&format!("s{i}"), None, 0)).collect();
        let mut seen = Observed::default();
        let now = Instant::now();
        seen.update(&leases, now);
        let p = plan(
            &leases,
            &HashSet::new(),
            &seen,
            &HashSet::new(),
            "a",
            now,
            T,
        );
        assert_eq!(keys(&p), vec!["s0", "s1", "s2", "s3"]);
    }

    #[test]
    fn a_second_instance_steals_one_at_a_time_up_to_half() {
        let mut leases: Vec<Lease> = (0..4)
            .map(|i| lease(&format!("s{i}"), Some("a"), 5))
            .collect();
        let mut seen = Observed::default();
        let now = Instant::now();
        seen.update(&leases, now);
        let p = plan(
            &leases,
            &HashSet::new(),
            &seen,
            &HashSet::new(),
            "b",
            now,
            T,
        );
        assert_eq!(keys(&p), vec!["s3"], "one stolen per round");
        leases[3].owner = Some("b".into());
        let held = HashSet::from(["s3".to_string()]);
        let p = plan(&leases, &HashSet::new(), &seen, &held, "b", now, T);
        assert_eq!(keys(&p), vec!["s2"]);
        leases[2].owner = Some("b".into());
        let held = HashSet::from(["s3".to_string(), "s2".to_string()]);
        assert!(plan(&leases, &HashSet::new(), &seen, &held, "b", now, T).is_empty());
        // And `a`, holding its share, does not steal back.
        let held_a = HashSet::from(["s0".to_string(), "s1".to_string()]);
        assert!(plan(&leases, &HashSet::new(), &seen, &held_a, "a", now, T).is_empty());
    }

    #[test]
    fn leases_of_a_silent_instance_expire_after_the_timeout() {
        let mut leases = vec![
            lease("s0", Some("a"), 3),
            lease("s1", Some("a"), 3),
            lease("s2", Some("b"), 9),
            lease("s3", Some("b"), 9),
        ];
        let t0 = Instant::now();
        let mut seen = Observed::default();
        seen.update(&leases, t0);
        let held = HashSet::from(["s2".to_string(), "s3".to_string()]);
        assert!(plan(&leases, &HashSet::new(), &seen, &held, "b", t0 + T / 2, T).is_empty());
        // `b` renews (its counters move), `a` stays silent.
        leases[2].counter = 12;
        leases[3].counter = 12;
        seen.update(&leases, t0 + T / 2);
        let p = plan(&leases, &HashSet::new(), &seen, &held, "b", t0 + T, T);
        assert_eq!(keys(&p), vec!["s0", "s1"], "a is dead: b takes all");
        // A counter that moved resets the clock: `a` lives, and `b` holds its share.
        leases[0].counter = 4;
        seen.update(&leases, t0 + T);
        let p = plan(&leases, &HashSet::new(), &seen, &held, "b", t0 + T, T);
        assert!(keys(&p).is_empty(), "{p:?}");
        // `a` no longer reads s1 (it stopped renewing it): it takes it back itself.
        let held_a = HashSet::from(["s0".to_string()]);
        let p = plan(&leases, &HashSet::new(), &seen, &held_a, "a", t0 + T, T);
        assert_eq!(keys(&p), vec!["s1"]);
    }

    #[test]
    fn children_wait_for_their_parents() {
        let mut parent = lease("p", Some("a"), 1);
        let mut child = lease("c1", None, 0);
        child.parents = vec!["p".into()];
        let listed = HashSet::from(["p", "c1"]);
        let leases = [parent.clone(), child.clone()];
        let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
        assert!(!ready(&child, &by_key, &listed));
        parent.checkpoint = SHARD_END.into();
        let leases = [parent.clone(), child.clone()];
        let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
        assert!(ready(&child, &by_key, &listed));
        assert!(
            !ready(&parent, &by_key, &listed),
            "a finished shard is not read"
        );
        // A parent listed by the stream but without a lease yet: wait.
        let by_key: HashMap<&str, &Lease> = HashMap::from([("c1", &child)]);
        assert!(!ready(&child, &by_key, &listed));
        // A parent gone from the stream (past retention): nothing to wait for.
        assert!(ready(&child, &by_key, &HashSet::from(["c1"])));
    }
}
