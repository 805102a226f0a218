//! The sandbox through gRPC on a real server: partner aggregates and the
//! lead-scoring workload on TFHE ciphertexts, every refusal the release
//! gate and the cohort rules make, bad specs and corrupted ciphertexts on
//! disk, and erasure of encrypted features.

use sovra_proto::lineage::v1 as linpb;
use sovra_proto::sandbox::v1 as spb;
use sovra_proto::vault::v1 as pb;
use sovra_testkit::*;
use sovra_vault::client::{self, SandboxClient};
use tonic::Code;

fn cust(i: usize) -> String {
    format!("sb-{i:03}")
}

/// The features written for customer `i`: (budget CNY, purchases, dwell s).
fn features(i: usize) -> (i64, i64, i64) {
    (
        ((i * 37) % 400 + 1) as i64 * 10_000 + 1234,
        ((i * 11) % 40) as i64,
        ((i * 97) % 3000) as i64,
    )
}

/// Quantised as the schema says.
fn q(i: usize) -> [i64; 3] {
    let (b, p, d) = features(i);
    [(b / 10_000).min(1023), p.min(1023), (d / 60).min(1023)]
}

/// Writes `n` customers and grants each `lead_scoring` consent, then
/// withdraws it for those in `withdraw`.
async fn populate(srv: &Running, env: &Env, n: usize, withdraw: &[usize]) {
    let mut svc = srv.client(Some(&env.service)).await;
    let mut led = client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    for i in 0..n {
        let (b, p, d) = features(i);
        svc.put_record(put(
            &cust(i),
            &[
                ("name", text("Test Person")),
                ("budget", int(b)),
                ("purchase_count", int(p)),
                ("whitepaper_dwell_s", int(d)),
            ],
        ))
        .await
        .unwrap();
        led.record_consent(consent(&cust(i), "lead_scoring", true))
            .await
            .unwrap();
    }
    for &i in withdraw {
        led.record_consent(consent(&cust(i), "lead_scoring", false))
            .await
            .unwrap();
    }
}

async fn sandbox(srv: &Running, token: &str) -> SandboxClient {
    client::connect_sandbox(&srv.url, Some(token), None)
        .await
        .unwrap()
}

fn spec_job(text: &str) -> spb::SubmitJobRequest {
    spb::SubmitJobRequest {
        job: Some(spb::submit_job_request::Job::SpecToml(text.into())),
    }
}

fn workload_job(id: &str) -> spb::SubmitJobRequest {
    spb::SubmitJobRequest {
        job: Some(spb::submit_job_request::Job::WorkloadId(id.into())),
    }
}

fn sum_spec(purpose: &str, feature: &str) -> String {
    format!("name = \"sum-{feature}\"\npurpose = \"{purpose}\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"sum\"\nfeature = \"{feature}\"\n")
}

/// Watches a job to its end (the stream must end by itself) and returns
/// every state seen.
async fn watch(c: &mut SandboxClient, job: &spb::Job) -> Vec<spb::Job> {
    let mut s = c
        .watch_job(spb::GetJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(j) = s.message().await.unwrap() {
        seen.push(j);
    }
    seen
}

async fn run_to_result(c: &mut SandboxClient, req: spb::SubmitJobRequest) -> spb::JobResult {
    let job = c.submit_job(req).await.unwrap().into_inner();
    let seen = watch(c, &job).await;
    let last = seen.last().unwrap();
    assert_eq!(last.state, spb::JobState::Succeeded as i32, "{last:?}");
    c.get_result(spb::GetJobRequest {
        job_id: job.job_id.clone(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// A tree `depth` splits deep along its `at_least` side.
fn deep_tree(depth: usize) -> String {
    let mut t = "name = \"deep\"\npurpose = \"lead_scoring\"\noutput = \"per_customer\"\n[model]\nkind = \"tree\"\n".to_owned();
    let mut path = "model.tree".to_owned();
    for _ in 0..depth {
        t.push_str(&format!(
            "[{path}]\nfeature = \"budget\"\nthreshold = 10\nbelow = {{ leaf = 1 }}\n"
        ));
        path.push_str(".at_least");
    }
    t.push_str(&format!("[{path}]\nleaf = 2\n"));
    t
}

fn refused(r: Result<tonic::Response<spb::Job>, tonic::Status>, code: Code, needle: &str) {
    let s = r
        .err()
        .unwrap_or_else(|| panic!("expected {code:?} mentioning {needle}"));
    assert_eq!(s.code(), code, "{}", s.message());
    assert!(
        s.message().contains(needle),
        "{} should mention {needle}",
        s.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_aggregates_and_every_refusal() {
    let env = Env::new();
    let srv = env.start().await;
    populate(&srv, &env, 25, &[3, 7]).await;
    let mut partner = sandbox(&srv, &env.partner).await;

    // The aggregate: the cohort is the 23 customers whose consent is in
    // force; the withdrawn two are counted as excluded, not summed.
    let r = run_to_result(&mut partner, spec_job(&sum_spec("lead_scoring", "budget"))).await;
    let cohort: Vec<usize> = (0..25).filter(|i| *i != 3 && *i != 7).collect();
    let want: i64 = cohort.iter().map(|&i| q(i)[0]).sum();
    let job = r.job.clone().unwrap();
    assert_eq!(job.cohort_size, 23);
    assert_eq!(job.excluded, 2);
    let agg = r.aggregate.clone().unwrap();
    assert_eq!((agg.op.as_str(), agg.sum), ("sum", want));
    assert_eq!(r.released_to, "partner");
    assert_eq!(r.output_sha256.len(), 64);
    assert!(r.ledger_index > 0);

    // Per-customer output to a partner: refused before anything runs.
    refused(
        partner.submit_job(workload_job("lead_scoring")).await,
        Code::PermissionDenied,
        "release-scores-never-to-partners",
    );
    refused(
        partner
            .submit_job(spec_job("name = \"p\"\npurpose = \"lead_scoring\"\noutput = \"per_customer\"\n[model]\nkind = \"linear\"\nweights = { budget = 1 }\n"))
            .await,
        Code::PermissionDenied,
        "release_scores",
    );

    // Below k: four more withdrawals leave 19 < 20.
    let mut led = client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    for i in [0, 1, 2, 4] {
        led.record_consent(consent(&cust(i), "lead_scoring", false))
            .await
            .unwrap();
    }
    refused(
        partner
            .submit_job(spec_job(&sum_spec("lead_scoring", "budget")))
            .await,
        Code::FailedPrecondition,
        "release-aggregate-min-cohort",
    );

    // A purpose without consent, and a feature whose policy denies the
    // purpose: the cohort is empty, and the status says which policy.
    let mut svc = sandbox(&srv, &env.service).await;
    refused(
        svc.submit_job(spec_job(&sum_spec("sales_followup", "budget")))
            .await,
        Code::FailedPrecondition,
        "consent-required",
    );
    refused(
        svc.submit_job(spec_job(&sum_spec("marketing", "budget")))
            .await,
        Code::FailedPrecondition,
        "purpose-allowed-for-field",
    );
    // A purpose the partner may not declare.
    refused(
        partner
            .submit_job(spec_job(&sum_spec("billing", "purchase_count")))
            .await,
        Code::FailedPrecondition,
        "purpose-entitled-to-principal",
    );

    // Only the submitter gets the result; officers see the job's state.
    let job_id = job.job_id.clone();
    let other = svc
        .get_result(spb::GetJobRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied, "{}", other.message());
    let mut dpo = sandbox(&srv, &env.officer).await;
    let seen = dpo
        .get_job(spb::GetJobRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.state, spb::JobState::Succeeded as i32);
    assert_eq!(
        dpo.get_result(spb::GetJobRequest { job_id })
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        dpo.submit_job(spec_job(&sum_spec("lead_scoring", "budget")))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let anon = client::connect_sandbox(&srv.url, None, None).await.unwrap();
    let mut anon = anon;
    assert_eq!(
        anon.list_workloads(spb::ListWorkloadsRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        partner
            .get_job(spb::GetJobRequest {
                job_id: "job-nope".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    for hostile in ["", "job-\u{0}\n../x", &"j".repeat(10_000)] {
        let e = partner
            .get_result(spb::GetJobRequest {
                job_id: hostile.to_owned(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().len() < 200);
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lead_scoring_workload_scores_equal_the_reference_and_are_anchored() {
    let env = Env::new();
    let srv = env.start().await;
    populate(&srv, &env, 30, &[5]).await;
    let mut svc = sandbox(&srv, &env.service).await;
    let w = svc
        .list_workloads(spb::ListWorkloadsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.workloads.len(), 2);
    assert_eq!(w.workloads[0].id, "lead_scoring");
    assert_eq!(w.workloads[1].id, "lead_tier");
    assert_eq!(w.workloads[0].department, "sales");

    let job = svc
        .submit_job(workload_job("lead_scoring"))
        .await
        .unwrap()
        .into_inner();
    let seen = watch(&mut svc, &job).await;
    assert_eq!(seen.last().unwrap().state, spb::JobState::Succeeded as i32);
    let r = svc
        .get_result(spb::GetJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.scores.len(), 29);
    for s in &r.scores {
        let i: usize = s.customer_id[3..].parse().unwrap();
        assert_ne!(i, 5, "a withdrawn customer was scored");
        let x = q(i);
        let want = -3499 + 7 * x[0] + 53 * x[1] + 35 * x[2];
        assert_eq!(s.score, want, "{}", s.customer_id);
        let p = 1.0 / (1.0 + (-(want as f64) / 1000.0).exp());
        assert!((s.probability - p).abs() < 1e-9);
        let band = if p >= 0.7 {
            "high"
        } else if p >= 0.4 {
            "medium"
        } else {
            "low"
        };
        assert_eq!(s.band, band);
        assert!(s.top_features.len() <= 2);
        for f in &s.top_features {
            assert!(["budget", "purchase_count", "whitepaper_dwell_s"].contains(&f.as_str()));
        }
    }
    // The lineage of a scored customer's budget shows the job.
    let mut lin = client::connect_lineage(&srv.url, Some(&env.officer), None)
        .await
        .unwrap();
    let d = lin
        .get_derived(linpb::GetDerivedRequest {
            customer_id: cust(0),
            field: "budget".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let text = format!("{d:?}");
    assert!(text.contains(&job.job_id), "{text}");
    assert!(text.contains("lead_scoring_score"), "{text}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_and_corrupted_ciphertexts_release_nothing() {
    let env = Env::new();
    let srv = env.start().await;
    populate(&srv, &env, 22, &[]).await;
    let mut partner = sandbox(&srv, &env.partner).await;
    for (spec, needle) in [
        ("{{{", "invalid job spec"),
        ("name = \"x\"\npurpose = \"lead_scoring\"\noutput = \"aggregate\"\n[model]\nkind = \"forest\"\n", "unknown variant"),
        (&deep_tree(7), "at most 6 splits deep"),
        ("name = \"x\"\npurpose = \"lead_scoring\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"histogram\"\nfeature = \"budget\"\nedges = [5, 2]\n", "strictly increasing"),
        ("name = \"x\"\npurpose = \"lead_scoring\"\noutput = \"per_customer\"\n[model]\nkind = \"linear\"\nweights = { budget = 99999999 }\n", "outside"),
        ("name = \"x\"\npurpose = \"lead_scoring\"\noutput = \"per_customer\"\n[model]\nkind = \"linear\"\nweights = { salary = 1 }\n", "not an encrypted feature"),
        ("name = \"x\"\npurpose = \"lead_scoring\"\noutput = \"per_customer\"\n[model]\nkind = \"linear\"\nweights = { budget = 10000, purchase_count = 10000 }\n", "noise bound"),
    ] {
        refused(partner.submit_job(spec_job(spec)).await, Code::InvalidArgument, needle);
    }
    refused(
        partner.submit_job(spec_job(&"#".repeat(70_000))).await,
        Code::InvalidArgument,
        "more than",
    );
    refused(
        partner.submit_job(workload_job("../../etc/passwd")).await,
        Code::NotFound,
        "workload",
    );
    refused(
        partner
            .submit_job(spb::SubmitJobRequest { job: None })
            .await,
        Code::InvalidArgument,
        "spec_toml",
    );
    srv.stop().await;

    // Corrupt every stored block of `budget`: the job fails on DATA_LOSS
    // before any evaluation, and nothing is released.
    {
        let db = open_raw(&env.data_dir());
        let t = db.open_tree("fhe_blocks").unwrap();
        let mut n = 0;
        for item in t.scan_prefix(b"Bdefault\0budget\0") {
            let (k, v) = item.unwrap();
            let mut bad = v.to_vec();
            bad.truncate(bad.len() / 2);
            t.insert(k, bad).unwrap();
            n += 1;
        }
        assert!(n > 0);
        db.flush().unwrap();
    }
    let srv = env.start().await;
    let mut partner = sandbox(&srv, &env.partner).await;
    let e = partner
        .submit_job(spec_job(&sum_spec("lead_scoring", "budget")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{}", e.message());
    assert!(e.message().contains("feature `budget`"), "{}", e.message());
    // Other features are intact.
    run_to_result(
        &mut partner,
        spec_job(&sum_spec("lead_scoring", "purchase_count")),
    )
    .await;
    srv.stop().await;

    // A tampered TFHE key: writes of features fail, losing nothing.
    {
        let db = open_raw(&env.data_dir());
        let t = db.open_tree("fhe_blocks").unwrap();
        let k = b"Kdefault".to_vec();
        let mut w = t.get(&k).unwrap().unwrap().to_vec();
        w[20] ^= 1;
        t.insert(k, w).unwrap();
        db.flush().unwrap();
    }
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let e = svc
        .put_record(put(&cust(0), &[("budget", int(1))]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{}", e.message());
    assert!(e.message().contains("TFHE secret key"), "{}", e.message());
    let r = svc
        .get_fields(get(&cust(0), &["budget"], "customer_service"))
        .await
        .unwrap()
        .into_inner();
    // Still the first version: the failed write changed nothing.
    assert_eq!(r.fields[0].version, 1, "{r:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_removes_a_customers_encrypted_features() {
    let env = Env::new();
    // A second partner: another receiver, with no release to difference.
    let mut cfg = env.config();
    let other = cfg
        .add_principal_with(
            "partner2",
            sovra_vault::access::auth::Role::Partner,
            "default",
            "partners",
            &["lead_scoring"],
        )
        .unwrap();
    sovra_vault::config::write_config(&cfg, &env.config_path).unwrap();
    let srv = env.start().await;
    populate(&srv, &env, 23, &[]).await;
    let mut partner = sandbox(&srv, &env.partner).await;
    let before = run_to_result(&mut partner, spec_job(&sum_spec("lead_scoring", "budget"))).await;
    let mut adm = srv.client(Some(&env.admin)).await;
    adm.erase_customer(pb::EraseCustomerRequest {
        customer_id: cust(4),
        reason: "gdpr_art17".into(),
    })
    .await
    .unwrap();
    // The partner may not have the same sum over one customer fewer: the
    // difference would be the erased customer's budget.
    refused(
        partner
            .submit_job(spec_job(&sum_spec("lead_scoring", "budget")))
            .await,
        Code::FailedPrecondition,
        "release-aggregate-no-differencing",
    );
    // Another partner may (receivers that collude can difference, see
    // SECURITY.md); the cohort no longer has the customer.
    let mut other = sandbox(&srv, other.token.as_ref()).await;
    let after = run_to_result(&mut other, spec_job(&sum_spec("lead_scoring", "budget"))).await;
    assert_eq!(after.job.unwrap().cohort_size, 22);
    assert_eq!(
        after.aggregate.unwrap().sum,
        before.aggregate.unwrap().sum - q(4)[0]
    );
    srv.stop().await;
    // No key or value of the encrypted-feature store names the customer.
    let db = open_raw(&env.data_dir());
    let needle = cust(4).into_bytes();
    let mut blocks = 0;
    for tree in ["fhe_features", "fhe_blocks"] {
        for item in db.open_tree(tree).unwrap().iter() {
            let (k, v) = item.unwrap();
            assert!(!k.windows(needle.len()).any(|w| w == needle));
            assert!(!v.windows(needle.len()).any(|w| w == needle));
            blocks += usize::from(k.first() == Some(&b'B'));
        }
    }
    assert!(blocks >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_has_its_tfhe_key_from_init_and_the_first_start() {
    let env = Env::new();
    // `sovra init` (app::setup::init) made the default tenant's key.
    let at_init = {
        let db = open_raw(&env.data_dir());
        let t = db.open_tree("fhe_blocks").unwrap();
        t.get(b"Kdefault")
            .unwrap()
            .expect("the key exists after init")
    };
    // Nonce, 256 bytes of packed key, tag: wrapped, never the raw key.
    assert_eq!(at_init.len(), 12 + 256 + 16);
    env.start().await.stop().await;
    let db = open_raw(&env.data_dir());
    let t = db.open_tree("fhe_blocks").unwrap();
    let wrapped = t.get(b"Kdefault").unwrap().expect("the key exists");
    assert_eq!(wrapped, at_init, "the server kept the key init made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrapped_histogram_for_a_partner_and_tree_scores_for_sales() {
    let env = Env::new();
    let srv = env.start().await;
    populate(&srv, &env, 22, &[4]).await;
    let cohort: Vec<usize> = (0..22).filter(|&i| i != 4).collect();

    // A partner's histogram of purchases: counted on ciphertexts with
    // bootstraps, released as bucket counts only.
    let mut partner = sandbox(&srv, &env.partner).await;
    let hist = "name = \"purchases\"\npurpose = \"lead_scoring\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"histogram\"\nfeature = \"purchase_count\"\nedges = [10, 30]\n";
    let job = partner
        .submit_job(spec_job(hist))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.progress_unit, "customers");
    assert_eq!(job.bootstraps_per_customer, 10);
    assert_eq!(job.blocks_total, 21);
    let seen = watch(&mut partner, &job).await;
    let last = seen.last().unwrap();
    assert_eq!(last.state, spb::JobState::Succeeded as i32, "{last:?}");
    assert_eq!((last.blocks_done, last.blocks_total), (21, 21));
    let r = partner
        .get_result(spb::GetJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.scores.is_empty(), "a partner got per-customer values");
    let a = r.aggregate.unwrap();
    assert_eq!(a.op, "histogram");
    assert_eq!(a.edges, vec![10, 30]);
    let mut want = vec![0u64; 3];
    for &i in &cohort {
        let p = q(i)[1];
        want[usize::from(p >= 10) + usize::from(p >= 30)] += 1;
    }
    // 21 customers in three buckets: every bucket counts fewer than k = 20
    // or is the only large one (the rest then adds up to at most 1), so
    // every count is withheld; only the cohort size is released.
    assert!(want.iter().filter(|&&n| n >= 20).count() <= 1, "{want:?}");
    assert_eq!(a.suppressed, vec![true; 3]);
    assert_eq!(a.buckets, vec![0; 3]);
    assert_eq!(a.min_count, 20);
    assert_eq!(a.sum, 21);

    // A partner cannot have a tree's per-customer output.
    let tree = "name = \"tier\"\npurpose = \"lead_scoring\"\noutput = \"per_customer\"\n[model]\nkind = \"tree\"\n[model.tree]\nfeature = \"budget\"\nthreshold = 200\nbelow = { leaf = 0 }\nat_least = { leaf = 1 }\n";
    refused(
        partner.submit_job(spec_job(tree)).await,
        Code::PermissionDenied,
        "release_scores",
    );
    refused(
        partner.submit_job(workload_job("lead_tier")).await,
        Code::PermissionDenied,
        "release_scores",
    );

    // Sales runs the lead-tier workload (a tree): each customer's tier
    // equals the reference on the same quantised features.
    let mut svc = sandbox(&srv, &env.service).await;
    let r = run_to_result(&mut svc, workload_job("lead_tier")).await;
    assert_eq!(r.scores.len(), cohort.len());
    for s in &r.scores {
        let i: usize = s.customer_id[3..].parse().unwrap();
        let x = q(i);
        let want = match (x[0] >= 50, x[2] >= 30, x[1] >= 3) {
            (false, false, _) => 0,
            (false, true, _) | (true, _, false) => 1,
            (true, _, true) => 2,
        };
        assert_eq!(s.score, want, "{}", s.customer_id);
    }
    srv.stop().await;
}

fn histogram_spec(name: &str, edges: &[i64]) -> String {
    format!("name = \"{name}\"\npurpose = \"lead_scoring\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"histogram\"\nfeature = \"purchase_count\"\nedges = {edges:?}\n")
}

/// Issue 13, item 2: every released count covers at least k customers (a
/// bucket below k is withheld, and so is a second one when the first could
/// be derived from the cohort size); a partner cannot difference two
/// releases whose cohorts differ by fewer than k customers, across
/// restarts; the record of what was released holds pseudonyms only and is
/// anchored in the ledger through the output hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_counts_cover_k_customers_and_releases_cannot_be_differenced() {
    use prost::Message;
    use sha2::{Digest, Sha256};
    let n = 45;
    let env = Env::new();
    let srv = env.start().await;
    populate(&srv, &env, n, &[]).await;
    let mut partner = sandbox(&srv, &env.partner).await;

    // Edges that isolate one customer (the only one with 39 purchases):
    // [44, 1, 0]. The bucket of one is withheld, and the bucket of 44 too,
    // since the cohort size minus 44 would give it away.
    let purchases: Vec<i64> = (0..n).map(|i| q(i)[1]).collect();
    assert_eq!(purchases.iter().filter(|&&p| p >= 39).count(), 1);
    let r = run_to_result(
        &mut partner,
        spec_job(&histogram_spec("isolate", &[39, 40])),
    )
    .await;
    let a = r.aggregate.clone().unwrap();
    assert_eq!(a.suppressed, vec![true, true, true], "{a:?}");
    assert_eq!(a.buckets, vec![0, 0, 0]);
    assert_eq!((a.sum, a.min_count), (n as i64, 20));
    // The cohort digest is inside the hash the ledger anchors.
    let canonical = spb::JobResult {
        aggregate: Some(a.clone()),
        ..Default::default()
    };
    assert_eq!(
        hex::encode(Sha256::digest(canonical.encode_to_vec())),
        r.output_sha256
    );
    let isolate_job = r.job.clone().unwrap().job_id;
    let isolate_sha = r.output_sha256.clone();

    // Two buckets of at least k each: released exactly.
    let r = run_to_result(&mut partner, spec_job(&histogram_spec("halves", &[20]))).await;
    let a = r.aggregate.unwrap();
    let below = purchases.iter().filter(|&&p| p < 20).count() as u64;
    assert!(below >= 20 && n as u64 - below >= 20, "{below}");
    assert_eq!(a.buckets, vec![below, n as u64 - below]);
    assert_eq!(a.suppressed, vec![false, false]);

    // A sum over the same cohort: no difference, released.
    run_to_result(&mut partner, spec_job(&sum_spec("lead_scoring", "budget"))).await;

    // One consent withdrawn: the same sum, or any aggregate, over the
    // cohort minus that customer would single them out. Refused.
    let mut led = client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    led.record_consent(consent(&cust(29), "lead_scoring", false))
        .await
        .unwrap();
    for spec in [
        sum_spec("lead_scoring", "budget"),
        histogram_spec("halves", &[20]),
    ] {
        refused(
            partner.submit_job(spec_job(&spec)).await,
            Code::FailedPrecondition,
            "release-aggregate-no-differencing",
        );
    }
    srv.stop().await;

    // The record survives a restart.
    let srv = env.start().await;
    let mut partner = sandbox(&srv, &env.partner).await;
    refused(
        partner
            .submit_job(spec_job(&sum_spec("lead_scoring", "budget")))
            .await,
        Code::FailedPrecondition,
        "release-aggregate-no-differencing",
    );
    // Once the cohorts differ by k = 20 customers (29 and 19 more), the
    // difference covers k customers and the sum is released again.
    let mut led = client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    for i in 0..19 {
        led.record_consent(consent(&cust(i), "lead_scoring", false))
            .await
            .unwrap();
    }
    let r = run_to_result(&mut partner, spec_job(&sum_spec("lead_scoring", "budget"))).await;
    assert_eq!(r.job.unwrap().cohort_size, n as u64 - 20);
    srv.stop().await;

    // At rest: pseudonyms only, and the stored set reproduces the digest
    // the ledger anchors.
    let db = open_raw(&env.data_dir());
    let t = db.open_tree("sandbox_releases").unwrap();
    assert_eq!(t.len(), 4);
    let mut checked = false;
    for item in t.iter() {
        let (k, v) = item.unwrap();
        for i in 0..n {
            let id = cust(i).into_bytes();
            assert!(!k.windows(id.len()).any(|w| w == id));
            assert!(!v.windows(id.len()).any(|w| w == id));
        }
        if k.ends_with(isolate_job.as_bytes()) {
            assert_eq!(v[0], 1);
            let count = u32::from_be_bytes(v[1..5].try_into().unwrap()) as usize;
            assert_eq!(count, n);
            let subjects = &v[5..5 + 32 * count];
            let mut h = Sha256::new();
            h.update(b"sovra-cohort-v1\0");
            h.update((isolate_job.len() as u64).to_be_bytes());
            h.update(isolate_job.as_bytes());
            h.update(subjects);
            let stored = spb::Aggregate::decode(&v[5 + 32 * count..]).unwrap();
            assert_eq!(hex::encode(h.finalize()), stored.cohort_sha256);
            let canonical = spb::JobResult {
                aggregate: Some(stored),
                ..Default::default()
            };
            // What the partner received, so the hash the ledger anchors.
            assert_eq!(
                hex::encode(Sha256::digest(canonical.encode_to_vec())),
                isolate_sha
            );
            checked = true;
        }
    }
    assert!(checked);
}

/// A histogram with 16 edges: 80 bootstraps per customer, long enough that
/// the test's few calls finish while it still runs.
fn heavy_spec(i: usize) -> String {
    let edges: Vec<i64> = (1..=16).map(|e| e * 3).collect();
    histogram_spec(&format!("heavy-{i}"), &edges)
}

async fn job_state(c: &mut SandboxClient, id: &str) -> spb::Job {
    c.get_job(spb::GetJobRequest {
        job_id: id.to_owned(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Issue 13, item 7: jobs beyond `max_running` wait in a FIFO queue whose
/// position GetJob and WatchJob report; a principal's queued and running
/// jobs are bounded (RESOURCE_EXHAUSTED, saying what to do); cancelling a
/// queued job takes it out of the queue at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_report_their_place_and_admission_is_bounded() {
    let cfg = sovra_vault::grpc::sandbox::AdmissionConfig::default();
    let (running, per) = (cfg.max_running, cfg.max_jobs_per_principal);
    let env = Env::new();
    let srv = env.start().await;
    populate(&srv, &env, 22, &[]).await;
    let mut partner = sandbox(&srv, &env.partner).await;
    let mut ids = Vec::new();
    for i in 0..per {
        let j = partner
            .submit_job(spec_job(&heavy_spec(i)))
            .await
            .unwrap()
            .into_inner();
        ids.push(j.job_id);
    }
    refused(
        partner.submit_job(spec_job(&heavy_spec(99))).await,
        Code::ResourceExhausted,
        "max_jobs_per_principal",
    );
    // The first `running` jobs run; the rest queue in submission order.
    let queued: Vec<String> = ids.iter().skip(running).cloned().collect();
    for (n, id) in queued.iter().enumerate() {
        let j = job_state(&mut partner, id).await;
        assert_eq!(j.state, spb::JobState::Queued as i32, "{j:?}");
        assert_eq!(j.queue_position, n as u64 + 1, "{j:?}");
    }
    for id in ids.iter().take(running) {
        assert_eq!(job_state(&mut partner, id).await.queue_position, 0);
    }
    if queued.len() >= 2 {
        // WatchJob on the last queued job: its position, then one less once
        // the first queued job is cancelled.
        let last = queued.last().unwrap().clone();
        let mut w = partner
            .watch_job(spb::GetJobRequest {
                job_id: last.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = w.message().await.unwrap().unwrap();
        assert_eq!(first.queue_position, queued.len() as u64);
        let c = partner
            .cancel_job(spb::GetJobRequest {
                job_id: queued[0].clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(c.state, spb::JobState::Cancelled as i32, "{c:?}");
        assert_eq!(c.queue_position, 0);
        let next = w.message().await.unwrap().unwrap();
        assert_eq!(next.queue_position, queued.len() as u64 - 1, "{next:?}");
        // The cancelled job's place is free again.
        let j = partner
            .submit_job(spec_job(&heavy_spec(100)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(j.state, spb::JobState::Queued as i32);
        assert_eq!(j.queue_position, queued.len() as u64);
        ids.push(j.job_id);
    }
    // Cancel everything; every job ends CANCELLED (queued ones at once,
    // running ones at their next customer).
    for id in &ids {
        partner
            .cancel_job(spb::GetJobRequest { job_id: id.clone() })
            .await
            .unwrap();
    }
    for id in &ids {
        let j = job_state(&mut partner, id).await;
        let seen = watch(&mut partner, &j).await;
        let end = seen.last().unwrap_or(&j);
        assert_eq!(end.state, spb::JobState::Cancelled as i32, "{end:?}");
    }
    srv.stop().await;
}

/// A data directory of storage key format 3 (feature slots keyed by
/// customer, with `R` reverse links and `P` pending marks beside them, and
/// no slot in the record sets) is upgraded in place at start: its
/// customers stay in the cohort with their slots, new customers get slots
/// after the format-3 counter, a job packs and sums both, every record set
/// holds its slot and no format-3 key is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_3_directory_is_upgraded_and_its_slots_kept() {
    let env = Env::new();
    let srv = env.start().await;
    populate(&srv, &env, 20, &[]).await;
    srv.stop().await;
    {
        // Back to format 3: `S tenant 0 ref` → slot, a reverse link `R` per
        // slot, no slot in the record sets (version 1), the counter at the
        // next slot, the marker 3.
        let db = open_raw(&env.data_dir());
        let t = db.open_tree("fhe_features").unwrap();
        let records = db.open_tree("records").unwrap();
        let mut n = 0u32;
        for item in t.scan_prefix(b"Mdefault\0").collect::<Vec<_>>() {
            let (k, v) = item.unwrap();
            let slot = u32::from_be_bytes(k[k.len() - 4..].try_into().unwrap());
            assert_eq!(v.len(), 16, "a clean stop packed every mark");
            let cref = &v[..16];
            t.insert([&b"Sdefault\0"[..], cref].concat(), &slot.to_be_bytes()[..])
                .unwrap();
            t.insert([&b"Rdefault\0"[..], &slot.to_be_bytes()].concat(), cref)
                .unwrap();
            t.remove(&k).unwrap();
            let rk = [&b"default\0"[..], cref].concat();
            let set = records.get(&rk).unwrap().unwrap();
            assert_eq!(set[..5], [&[2][..], &slot.to_be_bytes()].concat()[..]);
            records.insert(&rk, [&[1][..], &set[5..]].concat()).unwrap();
            n = n.max(slot + 1);
        }
        assert_eq!(n, 20);
        t.insert(b"Ndefault", &n.to_be_bytes()[..]).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert(b"key-format", &[3u8][..])
            .unwrap();
        db.flush().unwrap();
    }
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let mut led = client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    for i in 20..23 {
        let (b, ..) = features(i);
        svc.put_record(put(&cust(i), &[("budget", int(b))]))
            .await
            .unwrap();
        led.record_consent(consent(&cust(i), "lead_scoring", true))
            .await
            .unwrap();
    }
    let mut partner = sandbox(&srv, &env.partner).await;
    let r = run_to_result(&mut partner, spec_job(&sum_spec("lead_scoring", "budget"))).await;
    assert_eq!(r.job.unwrap().cohort_size, 23);
    assert_eq!(
        r.aggregate.unwrap().sum,
        (0..23).map(|i| q(i)[0]).sum::<i64>()
    );
    srv.stop().await;
    let db = open_raw(&env.data_dir());
    assert_eq!(
        db.open_tree("meta")
            .unwrap()
            .get(b"key-format")
            .unwrap()
            .unwrap()
            .as_ref(),
        [4]
    );
    let t = db.open_tree("fhe_features").unwrap();
    let mut slots = Vec::new();
    for item in t.iter() {
        let (k, _) = item.unwrap();
        assert!(matches!(k[0], b'N' | b'M'), "a format-3 key is left: {k:?}");
        if k[0] == b'M' {
            slots.push(u32::from_be_bytes(k[k.len() - 4..].try_into().unwrap()));
        }
    }
    // Every record set holds its customer's slot again.
    let records = db.open_tree("records").unwrap();
    assert_eq!(
        records
            .iter()
            .filter(|i| i.as_ref().unwrap().1[0] == 2)
            .count(),
        23
    );
    slots.sort();
    // The 20 kept slots, then the new customers' after the old counter.
    assert_eq!(slots[..20], (0..20).collect::<Vec<_>>()[..]);
    assert_eq!(slots[20..], [20, 21, 22]);
}

/// Feature values still pending when the real server is killed (-9) are
/// neither lost nor packed twice: the marks are durable with the fields
/// (in the write-ahead log), start-up finds them (with no noted value, so
/// the packer reads them back), and the first job after the restart sums
/// every acknowledged write, the latest value of each customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_feature_values_survive_kill_9_and_the_next_job_sums_them() {
    let env = Env::new();
    let budget = |i: usize, round: i64| ((i as i64 % 50) + 1 + round * 100) * 10_000;
    let mut round = 0;
    // Each try: a burst of writes, one per customer, all at once, then
    // SIGKILL as soon as the last is acknowledged. The packer runs every
    // 250 ms, so the burst's values are pending unless it ran just then;
    // the log is replayed into the view (as start-up does) to count them.
    let pending = loop {
        let port = free_port();
        let mut child = spawn_server(crate::SOVRA, &env, port).await;
        let url = format!("http://127.0.0.1:{port}");
        if round == 0 {
            let mut led = client::connect_ledger(&url, Some(&env.service), None)
                .await
                .unwrap();
            for i in 0..22 {
                led.record_consent(consent(&cust(i), "lead_scoring", true))
                    .await
                    .unwrap();
            }
        }
        let mut writes = Vec::new();
        for i in 0..22 {
            let (url, token) = (url.clone(), env.service.clone());
            let value = budget(i, round);
            writes.push(tokio::spawn(async move {
                let mut c = client::connect(&url, Some(&token), None).await.unwrap();
                c.put_record(put(&cust(i), &[("budget", int(value))]))
                    .await
                    .unwrap();
            }));
        }
        for w in writes {
            w.await.unwrap();
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let dir = env.data_dir();
        let cfg = env.config();
        let store = sovra_vault::store::Store::open_at(
            &dir,
            cfg.open_wal().unwrap(),
            &cfg.pad_place().unwrap(),
        )
        .unwrap();
        store.flush().unwrap();
        drop(store);
        let db = open_raw(&dir);
        let pending = db
            .open_tree("fhe_features")
            .unwrap()
            .scan_prefix(b"M")
            .filter(|i| i.as_ref().unwrap().1.len() > 16)
            .count();
        drop(db);
        if pending > 0 || round == 4 {
            break pending;
        }
        round += 1;
    };
    eprintln!(
        "{pending} of 22 slots pending at the kill, try {}",
        round + 1
    );
    assert!(pending > 0, "five bursts were all packed before the kill");
    let srv = env.start().await;
    let mut partner = sandbox(&srv, &env.partner).await;
    let r = run_to_result(&mut partner, spec_job(&sum_spec("lead_scoring", "budget"))).await;
    assert_eq!(r.job.unwrap().cohort_size, 22);
    // Quantised as the schema says: 10,000 CNY a step, at most 1023.
    let want: i64 = (0..22).map(|i| (budget(i, round) / 10_000).min(1023)).sum();
    assert_eq!(r.aggregate.unwrap().sum, want);
    srv.stop().await;
}

/// A feature slot's stored value (its customer and pending mark) altered
/// in a stopped server is refused at start, naming it, and nothing is
/// changed: with the bytes back, the same directory serves and a job sums
/// every customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_feature_slot_is_refused_at_start_and_changes_nothing() {
    let env = Env::new();
    let srv = env.start().await;
    populate(&srv, &env, 20, &[]).await;
    srv.stop().await;
    let slot0 = b"Mdefault\0\0\0\0\0".to_vec();
    let set = |v: &[u8]| {
        let db = open_raw(&env.data_dir());
        let t = db.open_tree("fhe_features").unwrap();
        let before = t.insert(&slot0, v).unwrap().unwrap().to_vec();
        db.flush().unwrap();
        before
    };
    let good = set(b"junk");
    let out = crate::hardening::serve_refused(&env.config_path);
    assert!(
        out.contains("encrypted-feature slot 0 of tenant `default`")
            && out.contains("fhe_features"),
        "{out}"
    );
    assert_eq!(set(&good), b"junk");
    let srv = env.start().await;
    let mut partner = sandbox(&srv, &env.partner).await;
    let r = run_to_result(&mut partner, spec_job(&sum_spec("lead_scoring", "budget"))).await;
    assert_eq!(r.job.unwrap().cohort_size, 20);
    assert_eq!(
        r.aggregate.unwrap().sum,
        (0..20).map(|i| q(i)[0]).sum::<i64>()
    );
    srv.stop().await;
}
