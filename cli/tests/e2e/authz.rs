//! The table-driven authorization test: every row of
//! `tests/data/authz.table` is one call through the real gRPC server, and
//! its outcome (plaintext, masked, allow, deny) must match the table. A
//! second test fails if any RPC of any Sovra service lacks a row for a role.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use sovra_proto::contracts::v1 as cpb;
use sovra_proto::ledger::v1 as lpb;
use sovra_proto::lineage::v1 as linpb;
use sovra_proto::policy::v1 as ppb;
use sovra_proto::sandbox::v1 as spb;
use sovra_proto::vault::v1 as pb;
use sovra_vault::access::auth::Role;
use sovra_vault::client;
use tonic::Code;

use sovra_testkit::*;

const TABLE: &str = include_str!("../data/authz.table");

#[derive(Debug)]
struct Row {
    line: usize,
    principal: String,
    rpc: String,
    field: Option<String>,
    purpose: Option<String>,
    consent: Option<String>,
    expect: String,
}

fn rows() -> Vec<Row> {
    let mut out = Vec::new();
    for (i, l) in TABLE.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let c: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(c.len(), 6, "authz.table line {}: six columns", i + 1);
        let opt = |s: &str| (s != "-").then(|| s.to_owned());
        out.push(Row {
            line: i + 1,
            principal: c[0].into(),
            rpc: c[1].into(),
            field: opt(c[2]),
            purpose: opt(c[3]),
            consent: opt(c[4]),
            expect: c[5].into(),
        });
    }
    out
}

/// Every method of every `sovra.*` service, from the compiled descriptors.
fn sovra_methods() -> BTreeSet<String> {
    let fds = prost_types::FileDescriptorSet::decode(sovra_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = BTreeSet::new();
    for f in fds.file {
        if !f.package().starts_with("sovra.") {
            continue;
        }
        for s in f.service {
            for m in s.method {
                out.insert(m.name().to_owned());
            }
        }
    }
    out
}

#[test]
fn every_rpc_has_a_row_for_every_role() {
    let rows = rows();
    let methods = sovra_methods();
    assert!(methods.len() >= 20, "{methods:?}");
    let mut missing = Vec::new();
    for m in &methods {
        for who in ["svc", "dpo", "partner", "admin"] {
            if !rows.iter().any(|r| &r.rpc == m && r.principal == who) {
                missing.push(format!("{m} × {who}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "RPCs without an authorization row in tests/data/authz.table: {missing:?}"
    );
    for r in &rows {
        assert!(
            methods.contains(&r.rpc),
            "authz.table line {}: unknown RPC {}",
            r.line,
            r.rpc
        );
    }
}

/// The contract the `RegisterContract` rows register.
const AUTHZ_CONTRACT: &str = "id = \"authz\"\nversion = 1\npurpose = \"customer_service\"\ndepartment = \"sales\"\ncapabilities = [\"notify\"]\n\n[[triggers]]\non = \"signal\"\nname = \"ping\"\n";

fn values() -> Vec<(&'static str, pb::Value)> {
    vec![
        ("name", text("Li Wei")),
        ("phone", text("+8613800138000")),
        ("email", text("li.wei@example.com")),
        ("national_id", text("11010519491231002X")),
        ("company", text("Acme")),
        ("budget", int(250_000)),
        ("contract_value", int(1_000_000)),
        ("customer_kind", text("enterprise")),
    ]
}

fn value_of(field: &str) -> pb::Value {
    values()
        .into_iter()
        .find(|(f, _)| *f == field)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no test value for {field}"))
}

/// What a call came to: the disclosure for GetFields, allow/deny otherwise.
fn outcome<T>(r: Result<T, tonic::Status>) -> Result<&'static str, tonic::Status> {
    match r {
        Ok(_) => Ok("allow"),
        Err(s) if s.code() == Code::PermissionDenied => Ok("deny"),
        Err(s) => Err(s),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_holds_through_grpc() {
    let env = Env::new();
    let mut cfg = env.config();
    let finance = cfg
        .add_principal_with("finance", Role::Service, "default", "finance", &["billing"])
        .unwrap();
    sovra_vault::config::write_config(&cfg, &env.config_path).unwrap();
    let srv = env.start().await;
    let tokens: BTreeMap<&str, String> = [
        ("svc", env.service.clone()),
        ("finance", finance.token.to_string()),
        ("dpo", env.officer.clone()),
        ("partner", env.partner.clone()),
        ("admin", env.admin.clone()),
    ]
    .into();
    let mut setup = srv.client(Some(&env.service)).await;
    let mut setup_ledger = client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    let mut failures = Vec::new();
    for row in rows() {
        // Each row gets its own customer, with every field and the row's
        // consent state.
        let customer = format!("row-{}", row.line);
        setup.put_record(put(&customer, &values())).await.unwrap();
        if let (Some(purpose), Some(c)) = (&row.purpose, &row.consent) {
            match c.as_str() {
                "none" => {}
                "granted" => {
                    setup_ledger
                        .record_consent(consent(&customer, purpose, true))
                        .await
                        .unwrap();
                }
                "withdrawn" => {
                    setup_ledger
                        .record_consent(consent(&customer, purpose, true))
                        .await
                        .unwrap();
                    setup_ledger
                        .record_consent(consent(&customer, purpose, false))
                        .await
                        .unwrap();
                }
                other => panic!("authz.table line {}: consent `{other}`", row.line),
            }
        }
        let token = tokens
            .get(row.principal.as_str())
            .unwrap_or_else(|| panic!("authz.table line {}: principal", row.line));
        let mut v = srv.client(Some(token)).await;
        let mut l = client::connect_ledger(&srv.url, Some(token), None)
            .await
            .unwrap();
        let mut p = client::connect_policy(&srv.url, Some(token), None)
            .await
            .unwrap();
        let mut lin = client::connect_lineage(&srv.url, Some(token), None)
            .await
            .unwrap();
        let mut sb = client::connect_sandbox(&srv.url, Some(token), None)
            .await
            .unwrap();
        let mut ct = client::connect_contracts(&srv.url, Some(token), None)
            .await
            .unwrap();
        let field = row.field.clone().unwrap_or_default();
        let purpose = row.purpose.clone().unwrap_or_default();
        let got: Result<&str, tonic::Status> = match row.rpc.as_str() {
            "PutRecord" => outcome(
                v.put_record(put(&customer, &[(&field, value_of(&field))]))
                    .await,
            ),
            "BatchPut" => {
                let item = put(&customer, &[(&field, value_of(&field))]);
                match v.batch_put(tokio_stream::iter(vec![item])).await {
                    Err(s) => outcome::<()>(Err(s)),
                    Ok(resp) => {
                        let mut s = resp.into_inner();
                        let r = s.message().await.unwrap().unwrap();
                        match Code::from_i32(r.code) {
                            Code::Ok => Ok("allow"),
                            Code::PermissionDenied => Ok("deny"),
                            c => Err(tonic::Status::new(c, r.message)),
                        }
                    }
                }
            }
            "GetFields" => match v.get_fields(get(&customer, &[&field], &purpose)).await {
                Ok(r) => {
                    let r = r.into_inner();
                    assert_eq!(r.fields.len(), 1, "line {}", row.line);
                    Ok(if revealed(&r.fields[0]).is_some() {
                        "plaintext"
                    } else if masked(&r.fields[0]).is_some() {
                        "masked"
                    } else {
                        "neither"
                    })
                }
                Err(s) => outcome::<()>(Err(s)),
            },
            "Search" => outcome(
                v.search(pb::SearchRequest {
                    field: field.clone(),
                    value: Some(value_of(&field)),
                    limit: 10,
                    purpose: purpose.clone(),
                })
                .await,
            ),
            "EraseCustomer" => outcome(
                v.erase_customer(pb::EraseCustomerRequest {
                    customer_id: customer.clone(),
                    reason: "customer_request".into(),
                })
                .await,
            ),
            "RotateTenantKey" => outcome(v.rotate_tenant_key(pb::RotateTenantKeyRequest {}).await),
            "GetKeyStatus" => outcome(v.get_key_status(pb::GetKeyStatusRequest {}).await),
            "RetireTenantKeyVersions" => outcome(
                v.retire_tenant_key_versions(pb::RetireTenantKeyVersionsRequest {
                    min_version: 1,
                    force: false,
                })
                .await,
            ),
            "DescribeSchema" => outcome(v.describe_schema(pb::DescribeSchemaRequest {}).await),
            "RecordConsent" => outcome(l.record_consent(consent(&customer, &purpose, true)).await),
            "GetConsentState" => outcome(
                l.get_consent_state(lpb::GetConsentStateRequest {
                    customer_id: customer.clone(),
                })
                .await,
            ),
            "GetCheckpoint" => outcome(l.get_checkpoint(lpb::GetCheckpointRequest {}).await),
            "GetInclusionProof" => outcome(
                l.get_inclusion_proof(lpb::GetInclusionProofRequest {
                    index: 0,
                    tree_size: 0,
                })
                .await,
            ),
            "GetConsistencyProof" => outcome(
                l.get_consistency_proof(lpb::GetConsistencyProofRequest {
                    from_size: 1,
                    to_size: 0,
                })
                .await,
            ),
            "GetEntries" => match l
                .get_entries(lpb::GetEntriesRequest { start: 0, end: 1 })
                .await
            {
                Ok(s) => {
                    let mut s = s.into_inner();
                    outcome(s.message().await)
                }
                Err(e) => outcome::<()>(Err(e)),
            },
            "ExportAuditBundle" => outcome(
                l.export_audit_bundle(lpb::ExportAuditBundleRequest {
                    customer_id: customer.clone(),
                    ..Default::default()
                })
                .await,
            ),
            "RebuildConsentState" => outcome(
                l.rebuild_consent_state(lpb::RebuildConsentStateRequest {})
                    .await,
            ),
            "GetPolicyStatus" => outcome(p.get_policy_status(ppb::GetPolicyStatusRequest {}).await),
            "ReloadPolicies" => outcome(p.reload_policies(ppb::ReloadPoliciesRequest {}).await),
            "Explain" => outcome(
                p.explain(ppb::ExplainRequest {
                    principal: "svc".into(),
                    action: "reveal".into(),
                    field: "phone".into(),
                    customer_id: customer.clone(),
                    purpose: "customer_service".into(),
                    approvals: 0,
                })
                .await,
            ),
            "GetFieldLineage" => outcome(
                lin.get_field_lineage(linpb::GetFieldLineageRequest {
                    customer_id: customer.clone(),
                    field: field.clone(),
                })
                .await,
            ),
            "ListAccesses" => outcome(
                lin.list_accesses(linpb::ListAccessesRequest {
                    customer_id: customer.clone(),
                    field: field.clone(),
                    ..Default::default()
                })
                .await,
            ),
            "GetDerived" => outcome(
                lin.get_derived(linpb::GetDerivedRequest {
                    customer_id: customer.clone(),
                    field: field.clone(),
                })
                .await,
            ),
            "ExportLineage" => outcome(lin.export_lineage(linpb::ExportLineageRequest {}).await),
            // The field column names the job: a feature to sum, or a
            // registered workload.
            "SubmitJob" => {
                let job = if field == "lead_scoring" {
                    spb::submit_job_request::Job::WorkloadId(field.clone())
                } else {
                    spb::submit_job_request::Job::SpecToml(format!(
                        "name = \"authz\"\npurpose = \"{purpose}\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"sum\"\nfeature = \"{field}\"\n"
                    ))
                };
                match sb
                    .submit_job(spb::SubmitJobRequest { job: Some(job) })
                    .await
                {
                    Err(s) if s.code() == Code::FailedPrecondition => Ok("allow"),
                    r => outcome(r),
                }
            }
            "GetJob" | "WatchJob" | "CancelJob" | "GetResult" => {
                let req = spb::GetJobRequest {
                    job_id: "job-unknown".into(),
                };
                let r = match row.rpc.as_str() {
                    "GetJob" => sb.get_job(req).await.map(|_| ()),
                    "WatchJob" => sb.watch_job(req).await.map(|_| ()),
                    "CancelJob" => sb.cancel_job(req).await.map(|_| ()),
                    _ => sb.get_result(req).await.map(|_| ()),
                };
                match r {
                    Err(s) if s.code() == Code::NotFound => Ok("allow"),
                    r => outcome(r),
                }
            }
            "ListWorkloads" => outcome(sb.list_workloads(spb::ListWorkloadsRequest {}).await),
            "RegisterContract" => outcome(
                ct.register_contract(cpb::RegisterContractRequest {
                    manifest: AUTHZ_CONTRACT.into(),
                    guest: Vec::new(),
                    file_name: String::new(),
                })
                .await,
            ),
            "ListContracts" => outcome(
                ct.list_contracts(cpb::ListContractsRequest::default())
                    .await,
            ),
            // An unknown contract: NOT_FOUND is past the policy check.
            "GetContract" | "DisableContract" => {
                let r = if row.rpc == "GetContract" {
                    ct.get_contract(cpb::GetContractRequest {
                        id: "authz-unknown".into(),
                        version: 0,
                    })
                    .await
                    .map(|_| ())
                } else {
                    ct.disable_contract(cpb::DisableContractRequest {
                        id: "authz-unknown".into(),
                        reason: String::new(),
                    })
                    .await
                    .map(|_| ())
                };
                match r {
                    Err(s) if s.code() == Code::NotFound => Ok("allow"),
                    r => outcome(r),
                }
            }
            "Signal" => outcome(
                ct.signal(cpb::SignalRequest {
                    name: "ping".into(),
                    customer_id: customer.clone(),
                    ..Default::default()
                })
                .await,
            ),
            "WatchActions" => outcome(ct.watch_actions(cpb::WatchActionsRequest::default()).await),
            "ListInstances" => outcome(
                ct.list_instances(cpb::ListInstancesRequest::default())
                    .await,
            ),
            // An unknown action or instance: NOT_FOUND is past the policy
            // check.
            "CompleteAction" | "FailAction" | "GetEvidence" => {
                let r = match row.rpc.as_str() {
                    "CompleteAction" => ct
                        .complete_action(cpb::CompleteActionRequest {
                            handle: "999999/authz".into(),
                        })
                        .await
                        .map(|_| ()),
                    "FailAction" => ct
                        .fail_action(cpb::FailActionRequest {
                            handle: "999999/authz".into(),
                            reason: String::new(),
                        })
                        .await
                        .map(|_| ()),
                    _ => ct
                        .get_evidence(cpb::GetEvidenceRequest { instance: 999_999 })
                        .await
                        .map(|_| ()),
                };
                match r {
                    Err(s) if s.code() == Code::NotFound => Ok("allow"),
                    r => outcome(r),
                }
            }
            other => panic!("authz.table line {}: no executor for {other}", row.line),
        };
        match got {
            Ok(g) if g == row.expect => {}
            Ok(g) => failures.push(format!(
                "line {}: {} {} {:?} {:?} {:?}: expected {}, got {g}",
                row.line, row.principal, row.rpc, row.field, row.purpose, row.consent, row.expect
            )),
            Err(s) => failures.push(format!(
                "line {}: {} {}: expected {}, got error {:?}: {}",
                row.line,
                row.principal,
                row.rpc,
                row.expect,
                s.code(),
                s.message()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    srv.stop().await;
}
