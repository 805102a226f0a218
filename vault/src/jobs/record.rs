//! Recording a sandbox job's lineage: the orchestration of the ledger (the
//! job's entry, one write entry per per-customer output) and the engine
//! (each cohort customer's pseudonym, under their lock, and the lineage
//! store), so it sits above both.
//!
//! Guarantees: the job's ledger entry carries the hash of its tenant-level
//! activity, and every per-customer record is anchored like any write; all
//! of it is durable when [`Recorder::record_job`] returns.
//!
//! Does not guarantee: all or nothing. If recording fails part-way, what
//! was recorded stays anchored and the error is returned (the release gate
//! then releases nothing).

use std::collections::BTreeMap;
use std::sync::Arc;

use sovra_ledger::Ledger;

use crate::engine::Engine;
use crate::error::{Result, VaultError};
use crate::lineage::{appended_index, JobRecord, Pending};
use crate::schema::{validate_id, MAX_CUSTOMER_ID_LEN};

/// Records what the sandbox computes. The sandbox calls this from its
/// release gate; each call appends the job's ledger entry (kind 7) carrying
/// the hash of the job's tenant-level activity, and one write entry per
/// per-customer output, and is durable when it returns.
#[derive(Debug, Clone)]
pub struct Recorder {
    engine: Arc<Engine>,
    ledger: Arc<Ledger>,
}

impl Recorder {
    /// A recorder over the vault's engine and ledger.
    pub fn new(engine: Arc<Engine>, ledger: Arc<Ledger>) -> Self {
        Self { engine, ledger }
    }

    /// Records `job`: a tenant-level compute activity that used the features
    /// (no customer listed) and generated the output, derived INDIRECT from
    /// the cohort's features for aggregates; per customer, a `derived` link
    /// from each feature to it, and for per-customer outputs a compute
    /// activity generating the customer's output version, derived from the
    /// feature versions it was computed from. Durable when it returns; the
    /// job entry's ledger index.
    ///
    /// Refuses malformed ids, features or outputs, an output named like a
    /// schema field (its versions belong to the record store), and
    /// per-customer outputs for customers outside the cohort. A customer of
    /// the cohort erased since the job ran is skipped. If recording fails
    /// part-way, what was recorded stays anchored and the error is returned:
    /// the release gate must then not release the output.
    pub async fn record_job(&self, job: &JobRecord) -> Result<u64> {
        self.check(job)?;
        let this = self.clone();
        let job = job.clone();
        let index = tokio::task::spawn_blocking(move || this.record_job_now(&job))
            .await
            .map_err(|_| VaultError::storage("the lineage recording task failed"))??;
        let (l, e) = tokio::join!(self.ledger.commit(), self.engine.commit());
        l?;
        e?;
        Ok(index)
    }

    fn check(&self, job: &JobRecord) -> Result<()> {
        validate_id("tenant", &job.tenant, 64)?;
        validate_id("job_id", &job.job_id, 128)?;
        validate_id("output", &job.output, 64)?;
        if self.engine.schema().field(&job.output).is_ok() {
            return Err(VaultError::invalid(
                "output",
                format!(
                    "`{}` is a schema field; job outputs need names of their own",
                    job.output
                ),
            ));
        }
        if job.features.is_empty() {
            return Err(VaultError::invalid("features", "at least one is required"));
        }
        for f in &job.features {
            validate_id("features", f, 64)?;
        }
        for c in &job.cohort {
            validate_id("cohort", c, MAX_CUSTOMER_ID_LEN)?;
        }
        let cohort: std::collections::BTreeSet<&str> =
            job.cohort.iter().map(String::as_str).collect();
        if let Some((c, _)) = job
            .per_customer
            .iter()
            .find(|(c, _)| !cohort.contains(c.as_str()))
        {
            return Err(VaultError::invalid(
                "per_customer",
                format!("customer `{c}` has an output but is not in the cohort"),
            ));
        }
        Ok(())
    }

    fn record_job_now(&self, job: &JobRecord) -> Result<u64> {
        let tenant = job.tenant.as_str();
        let cohort: std::collections::BTreeSet<&str> =
            job.cohort.iter().map(String::as_str).collect();
        let pending = Pending::new(job.activity());
        let index = appended_index(self.ledger.append(&[sovra_ledger::Body::JobRun(
            sovra_ledger::entry::JobRun {
                tenant: tenant.to_owned(),
                actor: job.agent.name.clone(),
                job_id: job.job_id.clone(),
                spec_sha256: job.spec_sha256,
                purpose: job.agent.purpose.clone(),
                cohort_size: cohort.len() as u64,
                output_sha256: job.output_sha256,
                lineage: pending.hash,
            },
        )])?)?;
        let job_act = self
            .engine
            .lineage()
            .store_activity(tenant, &pending, index)?;
        let outputs: BTreeMap<&str, &[u8]> = job
            .per_customer
            .iter()
            .map(|(c, v)| (c.as_str(), v.as_slice()))
            .collect();
        for customer in cohort {
            self.record_customer(job, customer, outputs.get(customer).copied(), job_act)?;
        }
        Ok(index)
    }

    /// Records the job's lineage for one customer of its cohort, under the
    /// customer's lock: a `derived` link from each feature to the job's
    /// activity `job_act`, or, for a per-customer `output`, a write of that
    /// derived value with its own ledger entry. Nothing for a customer
    /// erased since the job ran.
    fn record_customer(
        &self,
        job: &JobRecord,
        customer: &str,
        output: Option<&[u8]>,
        job_act: u64,
    ) -> Result<()> {
        let (engine, tenant) = (&self.engine, job.tenant.as_str());
        let lineage = engine.lineage();
        let _guard = engine.lock(tenant, customer);
        let subject = match engine.pseudonym(tenant, customer, false) {
            Ok(s) => s,
            // Erased since the job ran: nothing of theirs to link.
            Err(VaultError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(value) = output else {
            // An aggregate (or no output for this customer): the
            // customer's features fed the job-level activity.
            return lineage.link_derived(tenant, customer, &subject, &job.features, job_act);
        };
        let latest = lineage.latest_versions(tenant, &subject)?;
        let version = match latest.get(&job.output) {
            Some(v) => v
                .checked_add(1)
                .ok_or_else(|| VaultError::integrity("a lineage version"))?,
            None => 1,
        };
        let used: Vec<(String, u64)> = job
            .features
            .iter()
            .filter_map(|f| latest.get(f).map(|v| (f.clone(), *v)))
            .collect();
        let value_hash = hex::encode(lineage.value_hash(tenant, &job.output, value));
        let act = job.output_activity(&subject, &used, version, value_hash);
        // The customer's output is a write of a derived value: the same
        // record and anchor as any write, from the sandbox channel.
        let ledger = &self.ledger;
        let record = lineage.stage_write(
            tenant,
            customer,
            &subject,
            act,
            Box::new(|subject, hash, fields| {
                appended_index(ledger.append(&[sovra_ledger::Body::FieldsWritten(
                    sovra_ledger::entry::Write {
                        tenant: tenant.to_owned(),
                        subject: *subject,
                        actor: job.agent.name.clone(),
                        channel: format!("sandbox:{}", job.job_id),
                        fields,
                        lineage: *hash,
                    },
                )])?)
            }),
        )?;
        lineage.apply_staged(&record.staged)
    }
}
