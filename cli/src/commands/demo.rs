//! `sovra demo`: an end-to-end scenario on an embedded server.
//!
//! It initialises a temporary data directory, starts the real gRPC server on
//! a loopback port, and through the real client: loads a synthetic CRM data
//! set with BatchPut, reads a customer back (revealed and masked), shows the
//! policies refusing a partner, finds customers by phone and email through
//! the blind index, records consents on the ledger (withdrawing some, showing
//! a read refused after withdrawal, and verifying an audit bundle offline),
//! rotates the tenant key while reading, erases a customer and shows that
//! nothing of them remains reachable.

use std::io::Write;
use std::time::Instant;

use sha2::{Digest as _, Sha256};
use sovra_proto::ledger::v1 as lpb;
use sovra_proto::vault::v1 as pb;
use tonic::Code;

use crate::access::auth::Role;
use crate::client::{self, Client};
use crate::config::{self, default_tenant, Config};
use crate::error::{Result, VaultError};
use crate::lineage::{openlineage, view as lineage_view};
use crate::server;
use crate::synthetic;
use sovra_proto::lineage::v1 as linpb;

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
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

fn demo_err(step: &str, s: tonic::Status) -> VaultError {
    VaultError::precondition(format!(
        "demo step `{step}` failed: {} ({:?})",
        s.message(),
        s.code()
    ))
}

fn check(cond: bool, what: &str) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(VaultError::precondition(format!(
            "demo check failed: {what}"
        )))
    }
}

/// Runs the demo, printing to `out`.
pub async fn run(opts: &DemoOptions, out: &mut (dyn Write + Send)) -> Result<DemoSummary> {
    let io = |e: std::io::Error| VaultError::storage(format!("cannot print: {e}"));
    let mut sum = DemoSummary::default();
    let dir = tempfile::tempdir().map_err(|e| VaultError::config("tempdir", e.to_string()))?;
    let init = config::init(dir.path(), "127.0.0.1:0")?;
    let mut cfg = Config::load(&init.config_path)?;
    let service = cfg.add_principal_with(
        "crm-backend",
        Role::Service,
        &default_tenant(),
        "sales",
        &[
            "customer_service",
            "sales_followup",
            "marketing",
            "billing",
            "analytics",
            "lead_scoring",
        ],
    )?;
    let partner = cfg.add_principal_with(
        "insurer-partner",
        Role::Partner,
        &default_tenant(),
        "partners",
        &["lead_scoring", "analytics"],
    )?;
    let officer =
        cfg.add_principal_with("dpo", Role::Officer, &default_tenant(), "compliance", &[])?;
    config::write_config(&cfg, &init.config_path)?;
    let cfg = Config::load(&init.config_path)?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| VaultError::config("listen", e.to_string()))?;
    let srv = server::start(&cfg, Some(listener), std::future::pending()).await?;
    let url = format!("http://{}", srv.addr());
    writeln!(
        out,
        "Sovra demo: embedded vault at {url}, data in a temporary directory"
    )
    .map_err(io)?;

    let ch = client::channel(&url, None).await?;
    let mut svc: Client = client::with_token(ch.clone(), Some(&service.token))?;
    let mut adm: Client = client::with_token(ch.clone(), Some(&init.admin_token.token))?;
    let mut prt: Client = client::with_token(ch.clone(), Some(&partner.token))?;
    let mut consent_svc = client::ledger_with_token(ch.clone(), Some(&service.token))?;
    let mut lineage = client::lineage_with_token(ch.clone(), Some(&officer.token))?;
    let mut dpo = client::ledger_with_token(ch, Some(&officer.token))?;

    // 1. Load the data set, with a few invalid items mixed in.
    let customers = synthetic::generate(opts.seed, opts.customers);
    let mut reqs: Vec<pb::PutRecordRequest> =
        customers.iter().map(|c| c.to_request("web_form")).collect();
    let mut bad = customers
        .first()
        .map(|c| c.to_request("web_form"))
        .unwrap_or_default();
    bad.customer_id = "bad-phone".into();
    bad.fields.insert(
        "phone".into(),
        pb::Value {
            kind: Some(pb::value::Kind::Text("not a phone".into())),
        },
    );
    reqs.push(bad);
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
    reqs.push(unknown);
    let t = Instant::now();
    let mut results = svc
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
            sum.written += 1;
        } else {
            sum.rejected += 1;
            writeln!(
                out,
                "  rejected item {} ({}): {}",
                r.index, r.customer_id, r.message
            )
            .map_err(io)?;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    writeln!(
        out,
        "1. BatchPut: {} customers x 11 fields written durably in {:.2} s ({:.0} records/s); {} invalid items rejected alone",
        sum.written,
        secs,
        sum.written as f64 / secs.max(1e-9),
        sum.rejected
    )
    .map_err(io)?;
    check(
        sum.written == customers.len() && sum.rejected == 2,
        "every valid customer written, the two invalid ones rejected",
    )?;

    let Some(c) = customers.get(7).or(customers.first()).cloned() else {
        return Err(VaultError::invalid(
            "customers",
            "the demo needs at least one customer",
        ));
    };

    // 2. Read back for a declared purpose.
    let got = svc
        .get_fields(pb::GetFieldsRequest {
            customer_id: c.id.clone(),
            fields: vec![],
            purpose: "customer_service".into(),
        })
        .await
        .map_err(|s| demo_err("get fields", s))?
        .into_inner();
    writeln!(
        out,
        "2. GetFields {} for purpose customer_service (role service):",
        c.id
    )
    .map_err(io)?;
    for f in &got.fields {
        match f.disclosure {
            Some(pb::field_reading::Disclosure::Masked(_)) => sum.masked += 1,
            _ => sum.revealed += 1,
        }
        writeln!(
            out,
            "     {:<20} v{} {}",
            f.field,
            f.version,
            client::display(f)
        )
        .map_err(io)?;
    }
    check(
        sum.masked == 2 && sum.revealed == 9,
        "sensitive fields masked, the rest revealed",
    )?;

    // 3. The policies at work: partners never read field values.
    let denied = prt
        .get_fields(pb::GetFieldsRequest {
            customer_id: c.id.clone(),
            fields: vec!["phone".into()],
            purpose: "analytics".into(),
        })
        .await
        .err();
    sum.partner_denied = denied
        .as_ref()
        .is_some_and(|s| s.code() == Code::PermissionDenied);
    writeln!(
        out,
        "3. Partner reads phone: {}",
        denied.map_or("ALLOWED (unexpected)".into(), |s| format!(
            "{:?}: {}",
            s.code(),
            s.message()
        ))
    )
    .map_err(io)?;
    check(sum.partner_denied, "partner refused")?;

    // 4. Blind-index search.
    let by_phone = svc
        .search(pb::SearchRequest {
            field: "phone".into(),
            value: Some(pb::Value {
                kind: Some(pb::value::Kind::Text(c.phone_e164.clone())),
            }),
            limit: 0,
            purpose: "customer_service".into(),
        })
        .await
        .map_err(|s| demo_err("search", s))?
        .into_inner();
    let by_email = svc
        .search(pb::SearchRequest {
            field: "email".into(),
            value: Some(pb::Value {
                kind: Some(pb::value::Kind::Text(c.email.to_uppercase())),
            }),
            limit: 0,
            purpose: "customer_service".into(),
        })
        .await
        .map_err(|s| demo_err("search", s))?
        .into_inner();
    sum.search_ok =
        by_phone.customer_ids == vec![c.id.clone()] && by_email.customer_ids == vec![c.id.clone()];
    writeln!(
        out,
        "4. Search by phone {} -> {:?}; by email (upper-cased) -> {:?}",
        c.phone_e164, by_phone.customer_ids, by_email.customer_ids
    )
    .map_err(io)?;
    check(
        sum.search_ok,
        "search finds the customer by phone and email",
    )?;

    // 5. Consent on the ledger: grants, withdrawals, a refused read, and an
    // audit bundle verified offline against a checkpoint kept earlier.
    let old_cp = dpo
        .get_checkpoint(lpb::GetCheckpointRequest {})
        .await
        .map_err(|s| demo_err("checkpoint", s))?
        .into_inner();
    let consenting: Vec<&synthetic::Customer> = customers.iter().take(100).collect();
    let t = Instant::now();
    let mut withdrawn_id = None;
    for (i, cust) in consenting.iter().enumerate() {
        let mut req = lpb::RecordConsentRequest {
            customer_id: cust.id.clone(),
            purpose: "marketing".into(),
            action: lpb::ConsentAction::Grant as i32,
            channel: "web_form".into(),
            legal_basis: "consent".into(),
            notice_version: "2026-11".into(),
            evidence_sha256: Sha256::digest(format!("signed form of {}", cust.id)).to_vec(),
        };
        let r = consent_svc
            .record_consent(req.clone())
            .await
            .map_err(|s| demo_err("record consent", s))?
            .into_inner();
        sovra_ledger::verify_receipt(&r.entry, r.proof.as_bytes(), &old_cp.verifier_key)?;
        sum.consents += 1;
        if i % 10 == 3 {
            req.action = lpb::ConsentAction::Withdraw as i32;
            consent_svc
                .record_consent(req)
                .await
                .map_err(|s| demo_err("withdraw consent", s))?;
            sum.withdrawn += 1;
            withdrawn_id.get_or_insert_with(|| cust.id.clone());
        }
    }
    let secs = t.elapsed().as_secs_f64();
    writeln!(
        out,
        "5. Consent ledger: {} grants and {} withdrawals recorded durably in {:.2} s, each with a receipt verified against a signed checkpoint",
        sum.consents, sum.withdrawn, secs
    )
    .map_err(io)?;
    let Some(wid) = withdrawn_id else {
        return Err(VaultError::invalid(
            "customers",
            "the demo needs at least 4 customers",
        ));
    };
    let refused = svc
        .get_fields(pb::GetFieldsRequest {
            customer_id: wid.clone(),
            fields: vec!["email".into()],
            purpose: "marketing".into(),
        })
        .await
        .err();
    sum.withdrawn_read_refused = refused
        .as_ref()
        .is_some_and(|s| s.code() == Code::PermissionDenied);
    writeln!(
        out,
        "   read of {wid}'s email for marketing after withdrawal: {}",
        refused.map_or("ALLOWED (unexpected)".into(), |s| format!(
            "{:?}: {}",
            s.code(),
            s.message()
        ))
    )
    .map_err(io)?;
    check(sum.withdrawn_read_refused, "read refused after withdrawal")?;
    let bundle = dpo
        .export_audit_bundle(lpb::ExportAuditBundleRequest {
            customer_id: wid.clone(),
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
    sum.bundle_verified = verdict.entries == usize::try_from(bundle.entries).unwrap_or(0);
    writeln!(
        out,
        "   audit bundle of {wid}: {} entries (collection, grant, withdrawal, refused read) verified offline against checkpoint {} and consistent with the officer's earlier checkpoint {}",
        verdict.entries, verdict.checkpoint.size, old_cp.tree_size
    )
    .map_err(io)?;
    check(
        sum.bundle_verified && verdict.entries == 4,
        "audit bundle verified",
    )?;

    // 6. Rotate the tenant key while reading.
    let st = adm
        .rotate_tenant_key(pb::RotateTenantKeyRequest {})
        .await
        .map_err(|s| demo_err("rotate", s))?
        .into_inner();
    let mut reads = 0;
    let status = loop {
        svc.get_fields(pb::GetFieldsRequest {
            customer_id: c.id.clone(),
            fields: vec!["phone".into()],
            purpose: "customer_service".into(),
        })
        .await
        .map_err(|s| demo_err("read during rotation", s))?;
        reads += 1;
        let s = adm
            .get_key_status(pb::GetKeyStatusRequest {})
            .await
            .map_err(|s| demo_err("key status", s))?
            .into_inner();
        if s.job.as_ref().is_some_and(|j| j.done) {
            break s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    sum.rewrapped = status.job.as_ref().map_or(0, |j| j.rewrapped);
    writeln!(
        out,
        "6. RotateTenantKey: v{} active; {} data keys re-wrapped ({} reads served meanwhile); keys by version {:?}",
        st.active_version, sum.rewrapped, reads, status.data_keys_by_version
    )
    .map_err(io)?;
    let retired = adm
        .retire_tenant_key_versions(pb::RetireTenantKeyVersionsRequest {
            min_version: st.active_version,
            force: false,
        })
        .await
        .map_err(|s| demo_err("retire", s))?
        .into_inner();
    writeln!(
        out,
        "   retired versions below v{}: old wraps can no longer be used",
        retired.min_version
    )
    .map_err(io)?;

    // 7. The sandbox: lead scoring and a partner aggregate on ciphertexts.
    sandbox_step(
        &mut sum,
        &customers,
        &mut consent_svc,
        client::sandbox_with_token(client::channel(&url, None).await?, Some(&service.token))?,
        client::sandbox_with_token(client::channel(&url, None).await?, Some(&partner.token))?,
        out,
    )
    .await?;

    // 8. Lineage: an update through the call centre, a read, then the chain
    // of the customer's phone and budget back to their origin.
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
    svc.put_record(update)
        .await
        .map_err(|s| demo_err("update", s))?;
    svc.get_fields(pb::GetFieldsRequest {
        customer_id: c.id.clone(),
        fields: vec!["phone".into(), "budget".into()],
        purpose: "customer_service".into(),
    })
    .await
    .map_err(|s| demo_err("read after update", s))?;
    writeln!(
        out,
        "8. Lineage (compliance officer): phone and budget updated via the call centre and read again"
    )
    .map_err(io)?;
    for field in ["phone", "budget"] {
        let l = lineage
            .get_field_lineage(linpb::GetFieldLineageRequest {
                customer_id: c.id.clone(),
                field: field.into(),
            })
            .await
            .map_err(|s| demo_err("lineage", s))?
            .into_inner();
        if field == "phone" {
            sum.phone_versions = l.versions.len();
        }
        write!(out, "{}", indent(&lineage_view::field_tree(&c.id, &l))).map_err(io)?;
        let a = lineage
            .list_accesses(linpb::ListAccessesRequest {
                customer_id: c.id.clone(),
                field: field.into(),
                ..Default::default()
            })
            .await
            .map_err(|s| demo_err("accesses", s))?
            .into_inner();
        writeln!(out, "   accesses to {field}:").map_err(io)?;
        write!(
            out,
            "{}",
            indent(&lineage_view::accesses(field, &a.accesses))
        )
        .map_err(io)?;
        let d = lineage
            .get_derived(linpb::GetDerivedRequest {
                customer_id: c.id.clone(),
                field: field.into(),
            })
            .await
            .map_err(|s| demo_err("derived", s))?
            .into_inner();
        writeln!(out, "   derived from {field}:").map_err(io)?;
        write!(out, "{}", indent(&lineage_view::derived(field, &d.derived))).map_err(io)?;
    }
    check(
        sum.phone_versions == 2,
        "the phone's lineage has its origin and the update",
    )?;

    // 9. Erase the customer.
    let receipt = adm
        .erase_customer(pb::EraseCustomerRequest {
            customer_id: c.id.clone(),
            reason: "gdpr_art17_request".into(),
        })
        .await
        .map_err(|s| demo_err("erase", s))?
        .into_inner();
    let after = svc
        .get_fields(pb::GetFieldsRequest {
            customer_id: c.id.clone(),
            fields: vec![],
            purpose: "customer_service".into(),
        })
        .await
        .err();
    let search_after = svc
        .search(pb::SearchRequest {
            field: "phone".into(),
            value: Some(pb::Value {
                kind: Some(pb::value::Kind::Text(c.phone_e164.clone())),
            }),
            limit: 0,
            purpose: "customer_service".into(),
        })
        .await
        .map_err(|s| demo_err("search", s))?
        .into_inner();
    sum.erased_gone = after.as_ref().is_some_and(|s| s.code() == Code::NotFound)
        && search_after.customer_ids.is_empty();
    writeln!(
        out,
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
    check(sum.erased_gone, "erased customer unreachable")?;
    sum.lineage_gone = lineage
        .get_field_lineage(linpb::GetFieldLineageRequest {
            customer_id: c.id.clone(),
            field: "phone".into(),
        })
        .await
        .err()
        .is_some_and(|s| s.code() == Code::NotFound);
    check(sum.lineage_gone, "the erased customer's lineage is gone")?;

    // 10. OpenLineage export: aggregated per job, the erased customer's
    // activities included, no customer named.
    let export = lineage
        .export_lineage(linpb::ExportLineageRequest {})
        .await
        .map_err(|s| demo_err("export lineage", s))?
        .into_inner();
    let events = openlineage::run_events(&export);
    sum.openlineage_events = events.len();
    std::fs::write(&opts.openlineage_out, openlineage::to_json_lines(&events)).map_err(|e| {
        VaultError::config(
            opts.openlineage_out.display().to_string(),
            format!("cannot write the OpenLineage export: {e}"),
        )
    })?;
    writeln!(
        out,
        "10. Lineage of {} afterwards: NOT_FOUND. OpenLineage export: {} RunEvents ({}) written to {}",
        c.id,
        events.len(),
        export
            .jobs
            .iter()
            .map(|j| format!("{} ×{}", j.name, j.runs))
            .collect::<Vec<_>>()
            .join(", "),
        opts.openlineage_out.display()
    )
    .map_err(io)?;

    srv.shutdown().await?;
    writeln!(
        out,
        "Summary: {} written, {} rejected, {} revealed + {} masked fields, search ok, partner denied, {} consents ({} withdrawn, refusal and audit bundle verified), rotation re-wrapped {}, {} lead scores, a partner aggregate and a bootstrapped count equal to the plaintext reference, sandbox refusals verified, lineage shown, erasure verified, {} OpenLineage events.",
        sum.written, sum.rejected, sum.revealed, sum.masked, sum.consents, sum.withdrawn, sum.rewrapped, sum.lead_scores, sum.openlineage_events
    )
    .map_err(io)?;
    Ok(sum)
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
async fn finish_job(
    c: &mut client::SandboxClient,
    job: &sovra_proto::sandbox::v1::Job,
) -> Result<sovra_proto::sandbox::v1::JobResult> {
    use sovra_proto::sandbox::v1 as spb;
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
        return Err(VaultError::storage(format!(
            "demo job {} did not succeed",
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

/// Step 7: consents for lead scoring and analytics, the lead-scoring
/// workload for the sales service, a partner's aggregate, and the refusals.
async fn sandbox_step(
    sum: &mut DemoSummary,
    customers: &[synthetic::Customer],
    consent_svc: &mut client::LedgerClient,
    mut sales: client::SandboxClient,
    mut partner: client::SandboxClient,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    use sovra_proto::sandbox::v1 as spb;
    let io = |e: std::io::Error| VaultError::storage(format!("cannot print: {e}"));
    // Lead-scoring consent for the first 60 customers (every tenth from the
    // sixth withdrawn again), analytics consent for 12 only.
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
            consent_svc
                .record_consent(req.clone())
                .await
                .map_err(|s| demo_err("record consent", s))?;
            if withdraw {
                req.action = lpb::ConsentAction::Withdraw as i32;
                consent_svc
                    .record_consent(req)
                    .await
                    .map_err(|s| demo_err("withdraw consent", s))?;
            } else if purpose == "lead_scoring" {
                cohort.push(c);
            }
        }
    }
    writeln!(
        out,
        "7. Sandbox (TFHE, packed GLWE ciphertexts; only the release gate decrypts): lead-scoring consent from {} customers (some withdrawn), analytics consent from 12"
    , cohort.len())
    .map_err(io)?;

    // The lead-scoring workload, run by the sales service.
    let job = sales
        .submit_job(spb::SubmitJobRequest {
            job: Some(spb::submit_job_request::Job::WorkloadId(
                "lead_scoring".into(),
            )),
        })
        .await
        .map_err(|s| demo_err("submit lead scoring", s))?
        .into_inner();
    let r = finish_job(&mut sales, &job).await?;
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
    sum.lead_scores = matches;
    writeln!(
        out,
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
            out,
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
        out,
        "     … {} of {} scores equal the plaintext reference; release anchored at ledger entry {}",
        matches,
        r.scores.len(),
        r.ledger_index
    )
    .map_err(io)?;
    check(
        matches == cohort.len() && r.scores.len() == cohort.len(),
        "every lead score equals the plaintext reference",
    )?;

    // A partner's aggregate: mean budget over the lead-scoring cohort.
    let spec = "name = \"insurer-mean-budget\"\npurpose = \"lead_scoring\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"mean\"\nfeature = \"budget\"\n";
    let job = partner
        .submit_job(spb::SubmitJobRequest {
            job: Some(spb::submit_job_request::Job::SpecToml(spec.into())),
        })
        .await
        .map_err(|s| demo_err("submit partner aggregate", s))?
        .into_inner();
    let r = finish_job(&mut partner, &job).await?;
    let want_sum: i64 = cohort.iter().map(|c| quantised(c)[0]).sum();
    let got = r.aggregate.clone().unwrap_or_default();
    sum.aggregate_ok = got.sum == want_sum;
    writeln!(
        out,
        "   partner aggregate (mean budget, units of 10,000 CNY, over {} customers): {:.2} (sum {}) | plaintext reference {:.2} (sum {})",
        job.cohort_size,
        got.value,
        got.sum,
        want_sum as f64 / cohort.len().max(1) as f64,
        want_sum
    )
    .map_err(io)?;
    check(
        sum.aggregate_ok,
        "the partner aggregate equals the plaintext reference",
    )?;

    // A thresholded count on ciphertexts: how many of the cohort have a
    // budget of at least the threshold. The comparison is non-linear, so it
    // runs with programmable bootstrapping; the gate releases only counts,
    // each of at least k customers (smaller ones are withheld), so the
    // threshold is the one that splits the cohort most evenly.
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
    let r = finish_job(&mut partner, &job).await?;
    let done = r.job.clone().unwrap_or_default();
    let got = r.aggregate.clone().unwrap_or_default();
    let big = cohort.iter().filter(|c| quantised(c)[0] >= edge).count() as u64;
    let want = vec![cohort.len() as u64 - big, big];
    sum.histogram_ok = got.buckets == want && !got.suppressed.iter().any(|&s| s);
    writeln!(
        out,
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
        sum.histogram_ok,
        "the partner's thresholded count equals the plaintext reference",
    )?;

    // Refusals: per-customer output to a partner, an aggregate under k.
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
    sum.sandbox_refusals_ok =
        code(&per_customer) == Code::PermissionDenied && code(&small) == Code::FailedPrecondition;
    writeln!(
        out,
        "   partner asking for per-customer scores: {:?}; partner aggregate over the 12 analytics consents: {:?} ({})",
        code(&per_customer),
        code(&small),
        small.as_ref().map_or("", |s| s.message())
    )
    .map_err(io)?;
    check(sum.sandbox_refusals_ok, "the sandbox refusals")?;
    Ok(())
}
