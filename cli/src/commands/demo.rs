//! `sovra demo`: an end-to-end scenario on an embedded server.
//!
//! It initialises a temporary data directory, starts the real gRPC server on
//! a loopback port, and through the real client: loads a synthetic CRM data
//! set with BatchPut, reads a customer back (revealed and masked), shows the
//! policies refusing a partner, finds customers by phone and email through
//! the blind index, records consents on the ledger (withdrawing some, showing
//! a read refused after withdrawal, and verifying an audit bundle offline),
//! rotates the tenant key while reading, runs sandbox jobs on the encrypted
//! features, shows a field's lineage, erases a customer and shows that
//! nothing of them remains reachable, and exports the lineage as
//! OpenLineage. Each numbered step is one method of [`Demo`].

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use sha2::{Digest as _, Sha256};
use sovra_proto::ledger::v1 as lpb;
use sovra_proto::lineage::v1 as linpb;
use sovra_proto::sandbox::v1 as spb;
use sovra_proto::vault::v1 as pb;
use sovra_testkit::{KitError, PrincipalSpec};
use sovra_vault::access::auth::Role;
use sovra_vault::client::{
    self, Client, ContractsClient, LedgerClient, LineageClient, SandboxClient,
};
use sovra_vault::lineage::{openlineage, view as lineage_view};
use sovra_vault::synthetic;
use sovra_vault::VaultError;
use tonic::Code;

use crate::common::{CmdResult, Failure};

#[derive(Args)]
pub struct DemoArgs {
    /// Customers to generate.
    #[arg(long, default_value_t = 1000)]
    pub customers: usize,
    /// Seed of the synthetic data set.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where to write the demo's OpenLineage export.
    #[arg(long, default_value = "sovra-demo.openlineage.jsonl")]
    pub openlineage_out: PathBuf,
}

/// `sovra demo`: checks the arguments and runs the demo on standard output.
pub async fn run_command(a: DemoArgs) -> CmdResult {
    if a.customers == 0 || a.customers > 1_000_000 {
        return Err(Failure::Usage("--customers must be 1..=1000000".into()));
    }
    let mut out = std::io::stdout();
    run(
        &DemoOptions {
            customers: a.customers,
            seed: a.seed,
            openlineage_out: a.openlineage_out,
        },
        &mut out,
    )
    .await?;
    Ok(())
}

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Customers to generate.
    pub customers: usize,
    /// Seed of the synthetic data set.
    pub seed: u64,
    /// Where to write the OpenLineage export.
    pub openlineage_out: std::path::PathBuf,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            customers: 1000,
            seed: 42,
            openlineage_out: "sovra-demo.openlineage.jsonl".into(),
        }
    }
}
/// What the demo established.
#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    /// Customers written and acknowledged durable.
    pub written: usize,
    /// Items BatchPut rejected (the demo sends some invalid ones on purpose).
    pub rejected: usize,
    /// Fields read back revealed for the service principal.
    pub revealed: usize,
    /// Fields read back masked.
    pub masked: usize,
    /// Whether search by phone and by email found the customer.
    pub search_ok: bool,
    /// Whether the partner was refused.
    pub partner_denied: bool,
    /// Whether the erased customer was gone afterwards.
    pub erased_gone: bool,
    /// Data keys re-wrapped by the rotation.
    pub rewrapped: u64,
    /// Consents granted through the ledger.
    pub consents: usize,
    /// Consents then withdrawn.
    pub withdrawn: usize,
    /// Whether a read for a withdrawn purpose was refused.
    pub withdrawn_read_refused: bool,
    /// Whether the audit bundle verified offline.
    pub bundle_verified: bool,
    /// Versions in the lineage of the demo customer's phone.
    pub phone_versions: usize,
    /// Whether lineage of the erased customer was NOT_FOUND.
    pub lineage_gone: bool,
    /// OpenLineage RunEvents written.
    pub openlineage_events: usize,
    /// Customers the lead-scoring workload scored (each equal to the
    /// plaintext reference).
    pub lead_scores: usize,
    /// Whether the partner's aggregate equalled the plaintext reference.
    pub aggregate_ok: bool,
    /// Whether the partner's thresholded count (a one-edge histogram,
    /// counted with programmable bootstrapping) equalled the reference.
    pub histogram_ok: bool,
    /// Whether the partner's per-customer job and the under-k aggregate were
    /// refused.
    pub sandbox_refusals_ok: bool,
    /// CRM contracts registered (each a ledger entry).
    pub contracts_registered: usize,
    /// Obligations of the POC contract's dry run that were escalated.
    pub obligations_escalated: usize,
}

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The vault library failed (configuration, connection, the server).
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// A step failed or a check did not hold; the message names it.
    #[error("{0}")]
    Failed(String),
}

impl From<sovra_ledger::LedgerError> for DemoError {
    fn from(e: sovra_ledger::LedgerError) -> Self {
        DemoError::Vault(e.into())
    }
}

impl From<KitError> for DemoError {
    fn from(e: KitError) -> Self {
        match e {
            KitError::Vault(e) => DemoError::Vault(e),
            other => DemoError::Failed(other.to_string()),
        }
    }
}

impl From<DemoError> for Failure {
    fn from(e: DemoError) -> Self {
        match e {
            DemoError::Vault(e) => Failure::Vault(e),
            DemoError::Failed(m) => Failure::Local(m),
        }
    }
}

/// What the demo's functions return.
pub type Result<T, E = DemoError> = std::result::Result<T, E>;

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

// The messages below are worded as the vault's own errors were when the
// demo lived in the vault crate, so its output did not change.
fn io(e: std::io::Error) -> DemoError {
    DemoError::Failed(format!("storage error: cannot print: {e}"))
}

fn demo_err(step: &str, s: tonic::Status) -> DemoError {
    DemoError::Failed(format!(
        "demo step `{step}` failed: {} ({:?})",
        s.message(),
        s.code()
    ))
}

fn check(cond: bool, what: &str) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(DemoError::Failed(format!("demo check failed: {what}")))
    }
}

/// The demo's principals, besides the admin `init` makes: a sales service,
/// a partner and a compliance officer.
const PRINCIPALS: [PrincipalSpec<'static>; 3] = [
    PrincipalSpec {
        name: "crm-backend",
        role: Role::Service,
        department: "sales",
        purposes: &[
            "customer_service",
            "sales_followup",
            "marketing",
            "billing",
            "analytics",
            "lead_scoring",
        ],
    },
    PrincipalSpec {
        name: "insurer-partner",
        role: Role::Partner,
        department: "partners",
        purposes: &["lead_scoring", "analytics"],
    },
    PrincipalSpec {
        name: "dpo",
        role: Role::Officer,
        department: "compliance",
        purposes: &[],
    },
];

/// The scenario's state: where it prints, what it established so far, and
/// a client per principal.
struct Demo<'o> {
    out: &'o mut (dyn Write + Send),
    sum: DemoSummary,
    /// The sales service.
    svc: Client,
    /// The admin.
    adm: Client,
    /// The partner.
    prt: Client,
    /// The sales service's ledger client (consents).
    consent_svc: LedgerClient,
    /// The officer's lineage client.
    lineage: LineageClient,
    /// The officer's ledger client (checkpoints, bundles).
    dpo: LedgerClient,
}

/// Runs the demo, printing to `out`.
pub async fn run(opts: &DemoOptions, out: &mut (dyn Write + Send)) -> Result<DemoSummary> {
    let dir = sovra_testkit::data_dir(&PRINCIPALS)?;
    let [service, partner, officer] = &dir.tokens[..] else {
        return Err(DemoError::Failed(
            "the demo's principals were not all added".into(),
        ));
    };
    let srv = sovra_testkit::serve(&dir.config()?).await?;
    let url = srv.url.clone();
    writeln!(
        out,
        "Sovra demo: embedded vault at {url}, data in a temporary directory"
    )
    .map_err(io)?;

    let ch = client::channel(&url, None).await?;
    let mut demo = Demo {
        out,
        sum: DemoSummary::default(),
        svc: client::with_token(ch.clone(), Some(&service.token))?,
        adm: client::with_token(ch.clone(), Some(&dir.init.admin_token.token))?,
        prt: client::with_token(ch.clone(), Some(&partner.token))?,
        consent_svc: client::ledger_with_token(ch.clone(), Some(&service.token))?,
        lineage: client::lineage_with_token(ch.clone(), Some(&officer.token))?,
        dpo: client::ledger_with_token(ch, Some(&officer.token))?,
    };

    let customers = synthetic::generate(opts.seed, opts.customers);
    demo.load(&customers).await?;
    let Some(c) = customers.get(7).or(customers.first()).cloned() else {
        return Err(DemoError::Failed(
            "invalid `customers`: the demo needs at least one customer".into(),
        ));
    };
    demo.read_back(&c).await?;
    demo.partner_refused(&c).await?;
    demo.search(&c).await?;
    demo.consent(&customers).await?;
    demo.rotate(&c).await?;
    // 7. The sandbox: lead scoring and a partner aggregate on ciphertexts.
    let mut sales =
        client::sandbox_with_token(client::channel(&url, None).await?, Some(&service.token))?;
    let mut insurer =
        client::sandbox_with_token(client::channel(&url, None).await?, Some(&partner.token))?;
    let cohort = demo.sandbox_consents(&customers).await?;
    demo.lead_scoring(&cohort, &mut sales).await?;
    let spec = demo.partner_aggregate(&cohort, &mut insurer).await?;
    demo.partner_histogram(&cohort, &mut insurer).await?;
    demo.sandbox_refusals(spec, &mut insurer).await?;
    demo.lineage_of(&c).await?;
    demo.erase(&c).await?;
    demo.export(&c, &opts.openlineage_out).await?;
    let contract_client = |token: &str| {
        let url = url.clone();
        let token = token.to_owned();
        async move { client::contracts_with_token(client::channel(&url, None).await?, Some(&token)) }
    };
    let mut adm = contract_client(&dir.init.admin_token.token).await?;
    let key = demo
        .dpo
        .get_checkpoint(sovra_proto::ledger::v1::GetCheckpointRequest {})
        .await
        .map_err(|e| demo_err("checkpoint", e))?
        .into_inner()
        .verifier_key;
    demo.contracts(Contracts {
        adm: &mut adm,
        svc: contract_client(&service.token).await?,
        dpo: contract_client(&officer.token).await?,
        key,
    })
    .await?;

    srv.handle.shutdown().await?;
    let Demo { out, sum, .. } = demo;
    writeln!(
        out,
        "Summary: {} written, {} rejected, {} revealed + {} masked fields, search ok, partner denied, {} consents ({} withdrawn, refusal and audit bundle verified), rotation re-wrapped {}, {} lead scores, a partner aggregate and a bootstrapped count equal to the plaintext reference, sandbox refusals verified, lineage shown, erasure verified, {} OpenLineage events, {} CRM contracts registered ({} POC obligation missed and escalated, its evidence verified offline).",
        sum.written, sum.rejected, sum.revealed, sum.masked, sum.consents, sum.withdrawn, sum.rewrapped, sum.lead_scores, sum.openlineage_events, sum.contracts_registered, sum.obligations_escalated
    )
    .map_err(io)?;
    Ok(sum)
}

/// A read of `fields` of `customer` for `purpose`.
fn read(customer: &str, fields: &[&str], purpose: &str) -> pb::GetFieldsRequest {
    pb::GetFieldsRequest {
        customer_id: customer.into(),
        fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        purpose: purpose.into(),
    }
}

/// A search of the phone or email index for purpose customer_service.
fn search_for(field: &str, value: &str) -> pb::SearchRequest {
    pb::SearchRequest {
        field: field.into(),
        value: Some(pb::Value {
            kind: Some(pb::value::Kind::Text(value.into())),
        }),
        limit: 0,
        purpose: "customer_service".into(),
    }
}

/// "CODE: message" of a refusal, or that the call was (unexpectedly) allowed.
fn refusal(e: Option<tonic::Status>) -> String {
    e.map_or("ALLOWED (unexpected)".into(), |s| {
        format!("{:?}: {}", s.code(), s.message())
    })
}

/// The two invalid items step 1 mixes in: a bad phone, an unknown field.
fn invalid_items(first: Option<&synthetic::Customer>) -> [pb::PutRecordRequest; 2] {
    let mut bad = first.map(|c| c.to_request("web_form")).unwrap_or_default();
    bad.customer_id = "bad-phone".into();
    bad.fields.insert(
        "phone".into(),
        pb::Value {
            kind: Some(pb::value::Kind::Text("not a phone".into())),
        },
    );
    let mut unknown = pb::PutRecordRequest {
        idempotency_key: String::new(),
        customer_id: "bad-field".into(),
        ..Default::default()
    };
    unknown.fields.insert(
        "shoe_size".into(),
        pb::Value {
            kind: Some(pb::value::Kind::Integer(42)),
        },
    );
    unknown.source = Some(pb::CollectionSource {
        channel: "web_form".into(),
        collector: "demo".into(),
        consent_ref: String::new(),
    });
    [bad, unknown]
}

impl Demo<'_> {
    /// Step 1: Loads the data set with BatchPut, with a few invalid items mixed in.
    async fn load(&mut self, customers: &[synthetic::Customer]) -> Result<()> {
        let mut reqs: Vec<pb::PutRecordRequest> =
            customers.iter().map(|c| c.to_request("web_form")).collect();
        reqs.extend(invalid_items(customers.first()));
        let t = Instant::now();
        let mut results = self
            .svc
            .batch_put(tokio_stream::iter(reqs))
            .await
            .map_err(|s| demo_err("batch put", s))?
            .into_inner();
        while let Some(r) = results
            .message()
            .await
            .map_err(|s| demo_err("batch put", s))?
        {
            if r.code == Code::Ok as i32 {
                self.sum.written += 1;
            } else {
                self.sum.rejected += 1;
                writeln!(
                    self.out,
                    "  rejected item {} ({}): {}",
                    r.index, r.customer_id, r.message
                )
                .map_err(io)?;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        writeln!(
            self.out,
            "1. BatchPut: {} customers x 11 fields written durably in {:.2} s ({:.0} records/s); {} invalid items rejected alone",
            self.sum.written,
            secs,
            self.sum.written as f64 / secs.max(1e-9),
            self.sum.rejected
        )
        .map_err(io)?;
        check(
            self.sum.written == customers.len() && self.sum.rejected == 2,
            "every valid customer written, the two invalid ones rejected",
        )
    }

    /// Step 2: Reads the customer back for a declared purpose.
    async fn read_back(&mut self, c: &synthetic::Customer) -> Result<()> {
        let got = self
            .svc
            .get_fields(read(&c.id, &[], "customer_service"))
            .await
            .map_err(|s| demo_err("get fields", s))?
            .into_inner();
        writeln!(
            self.out,
            "2. GetFields {} for purpose customer_service (role service):",
            c.id
        )
        .map_err(io)?;
        for f in &got.fields {
            match f.disclosure {
                Some(pb::field_reading::Disclosure::Masked(_)) => self.sum.masked += 1,
                _ => self.sum.revealed += 1,
            }
            writeln!(
                self.out,
                "     {:<20} v{} {}",
                f.field,
                f.version,
                client::display(f)
            )
            .map_err(io)?;
        }
        check(
            self.sum.masked == 2 && self.sum.revealed == 9,
            "sensitive fields masked, the rest revealed",
        )
    }

    /// Step 3: The policies at work: partners never read field values.
    async fn partner_refused(&mut self, c: &synthetic::Customer) -> Result<()> {
        let denied = self
            .prt
            .get_fields(read(&c.id, &["phone"], "analytics"))
            .await
            .err();
        self.sum.partner_denied = denied
            .as_ref()
            .is_some_and(|s| s.code() == Code::PermissionDenied);
        writeln!(self.out, "3. Partner reads phone: {}", refusal(denied)).map_err(io)?;
        check(self.sum.partner_denied, "partner refused")
    }

    /// Step 4: Finds the customer through the blind index.
    async fn search(&mut self, c: &synthetic::Customer) -> Result<()> {
        let by_phone = self
            .svc
            .search(search_for("phone", &c.phone_e164))
            .await
            .map_err(|s| demo_err("search", s))?
            .into_inner();
        let by_email = self
            .svc
            .search(search_for("email", &c.email.to_uppercase()))
            .await
            .map_err(|s| demo_err("search", s))?
            .into_inner();
        self.sum.search_ok = by_phone.customer_ids == vec![c.id.clone()]
            && by_email.customer_ids == vec![c.id.clone()];
        writeln!(
            self.out,
            "4. Search by phone {} -> {:?}; by email (upper-cased) -> {:?}",
            c.phone_e164, by_phone.customer_ids, by_email.customer_ids
        )
        .map_err(io)?;
        check(
            self.sum.search_ok,
            "search finds the customer by phone and email",
        )
    }

    /// Step 5: Consent on the ledger: grants, withdrawals, a refused read, and an
    /// audit bundle verified offline against a checkpoint kept earlier.
    async fn consent(&mut self, customers: &[synthetic::Customer]) -> Result<()> {
        let old_cp = self
            .dpo
            .get_checkpoint(lpb::GetCheckpointRequest {})
            .await
            .map_err(|s| demo_err("checkpoint", s))?
            .into_inner();
        let wid = self
            .record_consents(customers, &old_cp.verifier_key)
            .await?;
        let refused = self
            .svc
            .get_fields(read(&wid, &["email"], "marketing"))
            .await
            .err();
        self.sum.withdrawn_read_refused = refused
            .as_ref()
            .is_some_and(|s| s.code() == Code::PermissionDenied);
        writeln!(
            self.out,
            "   read of {wid}'s email for marketing after withdrawal: {}",
            refusal(refused)
        )
        .map_err(io)?;
        check(
            self.sum.withdrawn_read_refused,
            "read refused after withdrawal",
        )?;
        self.verify_bundle(&wid, &old_cp).await
    }

    /// Marketing consent for the first 100 customers, every tenth from the
    /// fourth withdrawn again, each receipt verified; returns the first
    /// customer who withdrew.
    async fn record_consents(
        &mut self,
        customers: &[synthetic::Customer],
        verifier_key: &str,
    ) -> Result<String> {
        let t = Instant::now();
        let mut withdrawn_id = None;
        for (i, cust) in customers.iter().take(100).enumerate() {
            let mut req = lpb::RecordConsentRequest {
                customer_id: cust.id.clone(),
                purpose: "marketing".into(),
                action: lpb::ConsentAction::Grant as i32,
                channel: "web_form".into(),
                legal_basis: "consent".into(),
                notice_version: "2026-11".into(),
                evidence_sha256: Sha256::digest(format!("signed form of {}", cust.id)).to_vec(),
            };
            let r = self
                .consent_svc
                .record_consent(req.clone())
                .await
                .map_err(|s| demo_err("record consent", s))?
                .into_inner();
            sovra_ledger::verify_receipt(&r.entry, r.proof.as_bytes(), verifier_key)?;
            self.sum.consents += 1;
            if i % 10 == 3 {
                req.action = lpb::ConsentAction::Withdraw as i32;
                self.consent_svc
                    .record_consent(req)
                    .await
                    .map_err(|s| demo_err("withdraw consent", s))?;
                self.sum.withdrawn += 1;
                withdrawn_id.get_or_insert_with(|| cust.id.clone());
            }
        }
        let secs = t.elapsed().as_secs_f64();
        writeln!(
            self.out,
            "5. Consent ledger: {} grants and {} withdrawals recorded durably in {:.2} s, each with a receipt verified against a signed checkpoint",
            self.sum.consents, self.sum.withdrawn, secs
        )
        .map_err(io)?;
        withdrawn_id.ok_or_else(|| {
            DemoError::Failed("invalid `customers`: the demo needs at least 4 customers".into())
        })
    }

    /// The officer's audit bundle of `wid`, verified offline against the
    /// checkpoint kept before the consents.
    async fn verify_bundle(&mut self, wid: &str, old_cp: &lpb::Checkpoint) -> Result<()> {
        let bundle = self
            .dpo
            .export_audit_bundle(lpb::ExportAuditBundleRequest {
                customer_id: wid.to_owned(),
                consistency_from_size: old_cp.tree_size,
                ..Default::default()
            })
            .await
            .map_err(|s| demo_err("audit bundle", s))?
            .into_inner();
        let verdict = sovra_ledger::verify_bundle(
            bundle.json.as_bytes(),
            sovra_ledger::VerifyOptions {
                trusted_key: Some(&old_cp.verifier_key),
                since: Some(old_cp.note.as_bytes()),
                consistency: None,
            },
        )?;
        self.sum.bundle_verified = verdict.entries == usize::try_from(bundle.entries).unwrap_or(0);
        writeln!(
            self.out,
            "   audit bundle of {wid}: {} entries (collection, grant, withdrawal, refused read) verified offline against checkpoint {} and consistent with the officer's earlier checkpoint {}",
            verdict.entries, verdict.checkpoint.size, old_cp.tree_size
        )
        .map_err(io)?;
        check(
            self.sum.bundle_verified && verdict.entries == 4,
            "audit bundle verified",
        )
    }

    /// Step 6: Rotates the tenant key while reading, then retires the old version.
    async fn rotate(&mut self, c: &synthetic::Customer) -> Result<()> {
        let st = self
            .adm
            .rotate_tenant_key(pb::RotateTenantKeyRequest {})
            .await
            .map_err(|s| demo_err("rotate", s))?
            .into_inner();
        let mut reads = 0;
        let status = loop {
            self.svc
                .get_fields(read(&c.id, &["phone"], "customer_service"))
                .await
                .map_err(|s| demo_err("read during rotation", s))?;
            reads += 1;
            let s = self
                .adm
                .get_key_status(pb::GetKeyStatusRequest {})
                .await
                .map_err(|s| demo_err("key status", s))?
                .into_inner();
            if s.job.as_ref().is_some_and(|j| j.done) {
                break s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        self.sum.rewrapped = status.job.as_ref().map_or(0, |j| j.rewrapped);
        writeln!(
            self.out,
            "6. RotateTenantKey: v{} active; {} data keys re-wrapped ({} reads served meanwhile); keys by version {:?}",
            st.active_version, self.sum.rewrapped, reads, status.data_keys_by_version
        )
        .map_err(io)?;
        let retired = self
            .adm
            .retire_tenant_key_versions(pb::RetireTenantKeyVersionsRequest {
                min_version: st.active_version,
                force: false,
            })
            .await
            .map_err(|s| demo_err("retire", s))?
            .into_inner();
        writeln!(
            self.out,
            "   retired versions below v{}: old wraps can no longer be used",
            retired.min_version
        )
        .map_err(io)?;
        Ok(())
    }

    /// Step 7: Lead-scoring consent for the first 60 customers (every tenth from
    /// the sixth withdrawn again), analytics consent for 12 only; returns
    /// the lead-scoring cohort.
    async fn sandbox_consents<'c>(
        &mut self,
        customers: &'c [synthetic::Customer],
    ) -> Result<Vec<&'c synthetic::Customer>> {
        let mut cohort = Vec::new();
        for (i, c) in customers.iter().take(60).enumerate() {
            let mut purposes = vec![("lead_scoring", i % 10 == 5)];
            if i < 12 {
                purposes.push(("analytics", false));
            }
            for (purpose, withdraw) in purposes {
                let mut req = lpb::RecordConsentRequest {
                    customer_id: c.id.clone(),
                    purpose: purpose.into(),
                    action: lpb::ConsentAction::Grant as i32,
                    channel: "web_form".into(),
                    legal_basis: "consent".into(),
                    notice_version: "2026-11".into(),
                    evidence_sha256: Sha256::digest(format!("{purpose} form of {}", c.id)).to_vec(),
                };
                self.consent_svc
                    .record_consent(req.clone())
                    .await
                    .map_err(|s| demo_err("record consent", s))?;
                if withdraw {
                    req.action = lpb::ConsentAction::Withdraw as i32;
                    self.consent_svc
                        .record_consent(req)
                        .await
                        .map_err(|s| demo_err("withdraw consent", s))?;
                } else if purpose == "lead_scoring" {
                    cohort.push(c);
                }
            }
        }
        writeln!(
            self.out,
            "7. Sandbox (TFHE, packed GLWE ciphertexts; only the release gate decrypts): lead-scoring consent from {} customers (some withdrawn), analytics consent from 12"
        , cohort.len())
        .map_err(io)?;
        Ok(cohort)
    }

    /// The lead-scoring workload, run by the sales service: each released
    /// score next to the plaintext reference.
    async fn lead_scoring(
        &mut self,
        cohort: &[&synthetic::Customer],
        sales: &mut SandboxClient,
    ) -> Result<()> {
        let job = sales
            .submit_job(spb::SubmitJobRequest {
                job: Some(spb::submit_job_request::Job::WorkloadId(
                    "lead_scoring".into(),
                )),
            })
            .await
            .map_err(|s| demo_err("submit lead scoring", s))?
            .into_inner();
        let r = finish_job(sales, &job).await?;
        let done = r.job.clone().unwrap_or_default();
        let reference = |c: &synthetic::Customer| {
            let q = quantised(c);
            -3499 + 7 * q[0] + 53 * q[1] + 35 * q[2]
        };
        let mut matches = 0;
        for s in &r.scores {
            if let Some(c) = cohort.iter().find(|c| c.id == s.customer_id) {
                if reference(c) == s.score {
                    matches += 1;
                }
            }
        }
        self.sum.lead_scores = matches;
        writeln!(
            self.out,
            "   lead_scoring workload (sales service): cohort {} ({} excluded by consent or policy), {} blocks evaluated in {:.1} ms; released scores (encrypted result | plaintext reference):",
            done.cohort_size,
            done.excluded,
            done.blocks_total,
            done.eval_micros as f64 / 1000.0
        )
        .map_err(io)?;
        let mut top: Vec<&spb::CustomerScore> = r.scores.iter().collect();
        top.sort_by_key(|s| std::cmp::Reverse(s.score));
        for s in top.iter().take(5) {
            let want = cohort
                .iter()
                .find(|c| c.id == s.customer_id)
                .map(|c| reference(c));
            writeln!(
                self.out,
                "     {:<12} {:>6} | {:>6}  p={:.2} {:<6} top features: {}",
                s.customer_id,
                s.score,
                want.map_or("-".into(), |w| w.to_string()),
                s.probability,
                s.band,
                s.top_features.join(", ")
            )
            .map_err(io)?;
        }
        writeln!(
            self.out,
            "     … {} of {} scores equal the plaintext reference; release anchored at ledger entry {}",
            matches,
            r.scores.len(),
            r.ledger_index
        )
        .map_err(io)?;
        check(
            matches == cohort.len() && r.scores.len() == cohort.len(),
            "every lead score equals the plaintext reference",
        )
    }

    /// A partner's aggregate: mean budget over the lead-scoring cohort.
    /// Returns its spec, which the refusals reuse.
    async fn partner_aggregate(
        &mut self,
        cohort: &[&synthetic::Customer],
        partner: &mut SandboxClient,
    ) -> Result<&'static str> {
        let spec = "name = \"insurer-mean-budget\"\npurpose = \"lead_scoring\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"mean\"\nfeature = \"budget\"\n";
        let job = partner
            .submit_job(spb::SubmitJobRequest {
                job: Some(spb::submit_job_request::Job::SpecToml(spec.into())),
            })
            .await
            .map_err(|s| demo_err("submit partner aggregate", s))?
            .into_inner();
        let r = finish_job(partner, &job).await?;
        let want_sum: i64 = cohort.iter().map(|c| quantised(c)[0]).sum();
        let got = r.aggregate.clone().unwrap_or_default();
        self.sum.aggregate_ok = got.sum == want_sum;
        writeln!(
            self.out,
            "   partner aggregate (mean budget, units of 10,000 CNY, over {} customers): {:.2} (sum {}) | plaintext reference {:.2} (sum {})",
            job.cohort_size,
            got.value,
            got.sum,
            want_sum as f64 / cohort.len().max(1) as f64,
            want_sum
        )
        .map_err(io)?;
        check(
            self.sum.aggregate_ok,
            "the partner aggregate equals the plaintext reference",
        )?;
        Ok(spec)
    }

    /// A thresholded count on ciphertexts: how many of the cohort have a
    /// budget of at least the threshold. The comparison is non-linear, so it
    /// runs with programmable bootstrapping; the gate releases only counts,
    /// each of at least k customers (smaller ones are withheld), so the
    /// threshold is the one that splits the cohort most evenly.
    async fn partner_histogram(
        &mut self,
        cohort: &[&synthetic::Customer],
        partner: &mut SandboxClient,
    ) -> Result<()> {
        let mut budgets: Vec<i64> = cohort.iter().map(|c| quantised(c)[0]).collect();
        budgets.sort_unstable();
        let n = budgets.len();
        let edge = budgets
            .iter()
            .map(|&e| (e, budgets.partition_point(|&b| b < e)))
            .max_by_key(|&(_, below)| below.min(n - below))
            .map_or(100, |(e, _)| e.max(1));
        let hist = format!("name = \"insurer-big-budgets\"\npurpose = \"lead_scoring\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"histogram\"\nfeature = \"budget\"\nedges = [{edge}]\n");
        let job = partner
            .submit_job(spb::SubmitJobRequest {
                job: Some(spb::submit_job_request::Job::SpecToml(hist)),
            })
            .await
            .map_err(|s| demo_err("submit partner histogram", s))?
            .into_inner();
        let r = finish_job(partner, &job).await?;
        let done = r.job.clone().unwrap_or_default();
        let got = r.aggregate.clone().unwrap_or_default();
        let big = cohort.iter().filter(|c| quantised(c)[0] >= edge).count() as u64;
        let want = vec![cohort.len() as u64 - big, big];
        self.sum.histogram_ok = got.buckets == want && !got.suppressed.iter().any(|&s| s);
        writeln!(
            self.out,
            "   partner thresholded count (budget >= {} CNY; every released count covers at least {} customers) with {} bootstraps per customer, {:.1} s: {:?} | plaintext reference {:?}",
            edge * 10_000,
            got.min_count,
            done.bootstraps_per_customer,
            done.eval_micros as f64 / 1e6,
            got.buckets,
            want
        )
        .map_err(io)?;
        check(
            self.sum.histogram_ok,
            "the partner's thresholded count equals the plaintext reference",
        )
    }

    /// Refusals: per-customer output to a partner, an aggregate under k
    /// (the mean-budget `spec` over the 12 analytics consents).
    async fn sandbox_refusals(&mut self, spec: &str, partner: &mut SandboxClient) -> Result<()> {
        let per_customer = partner
            .submit_job(spb::SubmitJobRequest {
                job: Some(spb::submit_job_request::Job::WorkloadId(
                    "lead_scoring".into(),
                )),
            })
            .await
            .err();
        let small = partner
            .submit_job(spb::SubmitJobRequest {
                job: Some(spb::submit_job_request::Job::SpecToml(
                    spec.replace("lead_scoring", "analytics")
                        .replace("mean", "sum"),
                )),
            })
            .await
            .err();
        let code = |e: &Option<tonic::Status>| e.as_ref().map_or(Code::Ok, |s| s.code());
        self.sum.sandbox_refusals_ok = code(&per_customer) == Code::PermissionDenied
            && code(&small) == Code::FailedPrecondition;
        writeln!(
            self.out,
            "   partner asking for per-customer scores: {:?}; partner aggregate over the 12 analytics consents: {:?} ({})",
            code(&per_customer),
            code(&small),
            small.as_ref().map_or("", |s| s.message())
        )
        .map_err(io)?;
        check(self.sum.sandbox_refusals_ok, "the sandbox refusals")
    }

    /// Step 8: Lineage: an update through the call centre, a read, then the chain
    /// of the customer's phone and budget back to their origin.
    async fn lineage_of(&mut self, c: &synthetic::Customer) -> Result<()> {
        let mut update = pb::PutRecordRequest {
            idempotency_key: String::new(),
            customer_id: c.id.clone(),
            source: Some(pb::CollectionSource {
                channel: "call_centre".into(),
                collector: "agent-desk".into(),
                consent_ref: String::new(),
            }),
            ..Default::default()
        };
        update.fields.insert(
            "phone".into(),
            pb::Value {
                kind: Some(pb::value::Kind::Text("+86 139-1234-5678".into())),
            },
        );
        update.fields.insert(
            "budget".into(),
            pb::Value {
                kind: Some(pb::value::Kind::Integer(250_000)),
            },
        );
        self.svc
            .put_record(update)
            .await
            .map_err(|s| demo_err("update", s))?;
        self.svc
            .get_fields(read(&c.id, &["phone", "budget"], "customer_service"))
            .await
            .map_err(|s| demo_err("read after update", s))?;
        writeln!(
            self.out,
            "8. Lineage (compliance officer): phone and budget updated via the call centre and read again"
        )
        .map_err(io)?;
        for field in ["phone", "budget"] {
            self.show_lineage(c, field).await?;
        }
        check(
            self.sum.phone_versions == 2,
            "the phone's lineage has its origin and the update",
        )
    }

    /// One field's lineage tree, accesses and derivations, as the officer
    /// sees them.
    async fn show_lineage(&mut self, c: &synthetic::Customer, field: &str) -> Result<()> {
        let l = self
            .lineage
            .get_field_lineage(linpb::GetFieldLineageRequest {
                customer_id: c.id.clone(),
                field: field.into(),
            })
            .await
            .map_err(|s| demo_err("lineage", s))?
            .into_inner();
        if field == "phone" {
            self.sum.phone_versions = l.versions.len();
        }
        write!(self.out, "{}", indent(&lineage_view::field_tree(&c.id, &l))).map_err(io)?;
        let a = self
            .lineage
            .list_accesses(linpb::ListAccessesRequest {
                customer_id: c.id.clone(),
                field: field.into(),
                ..Default::default()
            })
            .await
            .map_err(|s| demo_err("accesses", s))?
            .into_inner();
        writeln!(self.out, "   accesses to {field}:").map_err(io)?;
        write!(
            self.out,
            "{}",
            indent(&lineage_view::accesses(field, &a.accesses))
        )
        .map_err(io)?;
        let d = self
            .lineage
            .get_derived(linpb::GetDerivedRequest {
                customer_id: c.id.clone(),
                field: field.into(),
            })
            .await
            .map_err(|s| demo_err("derived", s))?
            .into_inner();
        writeln!(self.out, "   derived from {field}:").map_err(io)?;
        write!(
            self.out,
            "{}",
            indent(&lineage_view::derived(field, &d.derived))
        )
        .map_err(io)
    }

    /// Step 9: Erases the customer; neither a read, a search nor the lineage
    /// finds them afterwards.
    async fn erase(&mut self, c: &synthetic::Customer) -> Result<()> {
        let receipt = self
            .adm
            .erase_customer(pb::EraseCustomerRequest {
                customer_id: c.id.clone(),
                reason: "gdpr_art17_request".into(),
            })
            .await
            .map_err(|s| demo_err("erase", s))?
            .into_inner();
        let after = self
            .svc
            .get_fields(read(&c.id, &[], "customer_service"))
            .await
            .err();
        let search_after = self
            .svc
            .search(search_for("phone", &c.phone_e164))
            .await
            .map_err(|s| demo_err("search", s))?
            .into_inner();
        self.sum.erased_gone = after.as_ref().is_some_and(|s| s.code() == Code::NotFound)
            && search_after.customer_ids.is_empty();
        writeln!(
            self.out,
            "9. EraseCustomer {}: receipt {} (ledger entry {}; {} fields, {} index entries, data key and pseudonym salt destroyed); read afterwards: {}; search: {:?}",
            c.id,
            receipt.receipt_id,
            receipt.ledger_index,
            receipt.fields_erased,
            receipt.index_entries_removed,
            after.map_or("found (unexpected)".into(), |s| format!("{:?}", s.code())),
            search_after.customer_ids
        )
        .map_err(io)?;
        check(self.sum.erased_gone, "erased customer unreachable")?;
        self.sum.lineage_gone = self
            .lineage
            .get_field_lineage(linpb::GetFieldLineageRequest {
                customer_id: c.id.clone(),
                field: "phone".into(),
            })
            .await
            .err()
            .is_some_and(|s| s.code() == Code::NotFound);
        check(
            self.sum.lineage_gone,
            "the erased customer's lineage is gone",
        )
    }

    /// Step 10: OpenLineage export: aggregated per job, the erased customer's
    /// activities included, no customer named.
    async fn export(&mut self, c: &synthetic::Customer, path: &std::path::Path) -> Result<()> {
        let export = self
            .lineage
            .export_lineage(linpb::ExportLineageRequest {})
            .await
            .map_err(|s| demo_err("export lineage", s))?
            .into_inner();
        let events = openlineage::run_events(&export);
        self.sum.openlineage_events = events.len();
        std::fs::write(path, openlineage::to_json_lines(&events)).map_err(|e| {
            DemoError::Failed(format!(
                "{}: cannot write the OpenLineage export: {e}",
                path.display()
            ))
        })?;
        writeln!(
            self.out,
            "10. Lineage of {} afterwards: NOT_FOUND. OpenLineage export: {} RunEvents ({}) written to {}",
            c.id,
            events.len(),
            export
                .jobs
                .iter()
                .map(|j| format!("{} ×{}", j.name, j.runs))
                .collect::<Vec<_>>()
                .join(", "),
            path.display()
        )
        .map_err(io)?;
        Ok(())
    }
}

impl Demo<'_> {
    /// Step 11, CRM contracts on the real runtime: the admin registers the
    /// four shipped contracts (each pinned and a ledger entry), and a copy
    /// of the POC contract with 2 s deadlines as its version 2; the CRM
    /// backend signals `poc_report_signed`, takes the three actions from
    /// the outbox and completes two; the third misses its deadline and is
    /// escalated; the officer's evidence report is verified offline
    /// against the log's key as the officer holds it.
    async fn contracts(&mut self, c: Contracts<'_>) -> Result<()> {
        use sovra_proto::contracts::v1 as cpb;
        let Contracts {
            adm,
            mut svc,
            mut dpo,
            key,
        } = c;
        writeln!(
            self.out,
            "11. CRM contracts (contracts/crm/), registered by the admin:"
        )
        .map_err(io)?;
        self.register_all(adm).await?;
        self.svc
            .put_record(demo_put(
                "demo-poc-customer",
                &[("email", "poc@example.com")],
            ))
            .await
            .map_err(|e| demo_err("store the POC customer", e))?;
        let inst = svc
            .signal(cpb::SignalRequest {
                name: "poc_report_signed".into(),
                customer_id: "demo-poc-customer".into(),
                contract: String::new(),
                idempotency_key: "demo-poc-1".into(),
                attrs: Default::default(),
            })
            .await
            .map_err(|e| demo_err("signal", e))?
            .into_inner()
            .instances
            .into_iter()
            .next()
            .ok_or_else(|| DemoError::Failed("the POC signal started no instance".into()))?;
        writeln!(
            self.out,
            "    crm-backend signals poc_report_signed: instance {} of {} v{}, {} actions queued (ledger entry {})",
            inst.id,
            inst.contract,
            inst.version,
            inst.actions.len(),
            inst.evaluated_entry
        )
        .map_err(io)?;
        self.connector(&mut svc, inst.id).await?;
        let escalated = self.wait_escalated(&mut dpo, inst.id).await?;
        writeln!(self.out, "    {escalated}").map_err(io)?;
        let report = dpo
            .get_evidence(cpb::GetEvidenceRequest { instance: inst.id })
            .await
            .map_err(|e| demo_err("evidence", e))?
            .into_inner();
        let v = sovra_vault::contracts::evidence::verify(report.json.as_bytes(), Some(&key))?;
        writeln!(
            self.out,
            "    evidence report of instance {} verified offline with the officer's key: {} entries proven against a checkpoint of size {}",
            inst.id, v.entries, v.tree_size
        )
        .map_err(io)?;
        for o in &v.obligations {
            writeln!(
                self.out,
                "      {} due {}: {}{}{}",
                o.action,
                o.due_ms,
                o.outcome,
                if o.by.is_empty() {
                    String::new()
                } else {
                    format!(" by {} at {}", o.by, o.at_ms)
                },
                if o.escalated_to.is_empty() {
                    String::new()
                } else {
                    format!(", escalated to {}", o.escalated_to)
                }
            )
            .map_err(io)?;
        }
        self.sum.obligations_escalated = v
            .obligations
            .iter()
            .filter(|o| o.outcome == "escalated")
            .count();
        check(
            self.sum.contracts_registered == 5 && self.sum.obligations_escalated == 1,
            "the contracts registered and the POC's missed obligation escalated, in verified evidence",
        )
    }

    /// Registers the four shipped contracts and the demo's copy of the POC
    /// contract with 2 s deadlines (its version 2).
    async fn register_all(&mut self, adm: &mut ContractsClient) -> Result<()> {
        use sovra_proto::contracts::v1 as cpb;
        let poc = sovra_contracts::crm::CONTRACTS[0];
        let fast = poc
            .manifest
            .replace("version = 1", "version = 2")
            .replace("\"72h\"", "\"2s\"");
        let mut all: Vec<(String, String, Option<&str>)> = sovra_contracts::crm::CONTRACTS
            .iter()
            .map(|s| (s.file.to_owned(), s.manifest.to_owned(), s.guest))
            .collect();
        all.push((poc.file.to_owned(), fast, None));
        for (file, manifest, guest) in all {
            let r = adm
                .register_contract(cpb::RegisterContractRequest {
                    manifest,
                    guest: guest.map(|g| g.as_bytes().to_vec()).unwrap_or_default(),
                    file_name: file,
                })
                .await
                .map_err(|e| demo_err("register a contract", e))?
                .into_inner();
            writeln!(
                self.out,
                "    {} v{}: pin {}…, {}, ledger entry {}{}",
                r.id,
                r.version,
                &r.sha256[..16],
                r.triggers.join(", "),
                r.registered_entry,
                if r.version == 2 {
                    " (the demo's copy: deadlines 2 s, not 72 h)"
                } else {
                    ""
                }
            )
            .map_err(io)?;
            self.sum.contracts_registered += 1;
        }
        Ok(())
    }

    /// The CRM backend as a connector: takes the instance's three actions
    /// from the outbox and completes two of them.
    async fn connector(&mut self, svc: &mut ContractsClient, instance: u64) -> Result<()> {
        use sovra_proto::contracts::v1 as cpb;
        let mut stream = svc
            .watch_actions(cpb::WatchActionsRequest::default())
            .await
            .map_err(|e| demo_err("watch actions", e))?
            .into_inner();
        let mut got = Vec::new();
        while got.len() < 3 {
            let d = tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
                .await
                .map_err(|_| DemoError::Failed("the outbox sent no action in 10 s".into()))?
                .map_err(|e| demo_err("watch actions", e))?
                .ok_or_else(|| DemoError::Failed("the outbox stream ended".into()))?;
            if let Some(a) = d.action.filter(|a| a.instance == instance) {
                got.push(a);
            }
        }
        drop(stream);
        for a in got.iter().filter(|a| a.action_id != "raise_receivable") {
            let out = svc
                .complete_action(cpb::CompleteActionRequest {
                    handle: a.handle.clone(),
                })
                .await
                .map_err(|e| demo_err("complete an action", e))?
                .into_inner();
            writeln!(
                self.out,
                "    the connector took {} ({}, for {}) and completed it: ledger entry {}",
                a.action_id, a.kind, a.customer_id, out.entry
            )
            .map_err(io)?;
        }
        writeln!(
            self.out,
            "    raise_receivable is left undone; its 2 s deadline runs out…"
        )
        .map_err(io)?;
        Ok(())
    }

    /// Waits (10 s at most) for the instance's missed obligation to be
    /// escalated; says how.
    async fn wait_escalated(&mut self, dpo: &mut ContractsClient, instance: u64) -> Result<String> {
        use sovra_proto::contracts::v1 as cpb;
        for _ in 0..100 {
            let list = dpo
                .list_instances(cpb::ListInstancesRequest {
                    contract: "poc-activation".into(),
                    ..Default::default()
                })
                .await
                .map_err(|e| demo_err("list instances", e))?
                .into_inner();
            if let Some(i) = list.instances.iter().find(|i| i.id == instance) {
                if let Some(e) = i
                    .actions
                    .iter()
                    .find(|a| a.action_id == "escalate.raise_receivable")
                {
                    return Ok(format!(
                        "the timer fired: raise_receivable escalated, and {} queued ({} to {})",
                        e.action_id,
                        e.kind,
                        serde_json::from_str::<serde_json::Value>(&e.detail_json)
                            .ok()
                            .and_then(|d| d["to"].as_str().map(str::to_owned))
                            .unwrap_or_default()
                    ));
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Err(DemoError::Failed(
            "the missed obligation was not escalated within 10 s".into(),
        ))
    }
}

/// The contracts clients step 11 uses.
struct Contracts<'a> {
    adm: &'a mut ContractsClient,
    svc: ContractsClient,
    dpo: ContractsClient,
    /// The log's verifier key as the officer holds it.
    key: String,
}

/// A write of text fields, from the demo's web form.
fn demo_put(customer: &str, fields: &[(&str, &str)]) -> pb::PutRecordRequest {
    pb::PutRecordRequest {
        customer_id: customer.into(),
        fields: fields
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    pb::Value {
                        kind: Some(pb::value::Kind::Text((*v).to_owned())),
                    },
                )
            })
            .collect(),
        source: Some(pb::CollectionSource {
            channel: "web_form".into(),
            collector: "demo".into(),
            consent_ref: String::new(),
        }),
        idempotency_key: String::new(),
    }
}

/// The quantised features of a demo customer, as the schema quantises them.
fn quantised(c: &synthetic::Customer) -> [i64; 3] {
    [
        (c.budget / 10_000).min(1023),
        c.purchase_count.min(1023),
        (c.whitepaper_dwell_s / 60).min(1023),
    ]
}

/// Waits for a sandbox job to end and returns its released result.
async fn finish_job(c: &mut SandboxClient, job: &spb::Job) -> Result<spb::JobResult> {
    let mut stream = c
        .watch_job(spb::GetJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .map_err(|s| demo_err("watch job", s))?
        .into_inner();
    let mut last = None;
    while let Some(j) = stream
        .message()
        .await
        .map_err(|s| demo_err("watch job", s))?
    {
        last = Some(j);
    }
    if last.map(|j| j.state) != Some(spb::JobState::Succeeded as i32) {
        return Err(DemoError::Failed(format!(
            "storage error: demo job {} did not succeed",
            job.job_id
        )));
    }
    Ok(c.get_result(spb::GetJobRequest {
        job_id: job.job_id.clone(),
    })
    .await
    .map_err(|s| demo_err("job result", s))?
    .into_inner())
}
