//! Tenant key rotation over thousands of customers: resumable re-wrap, reads
//! during and after, and retirement of old versions.

use std::sync::Arc;
use std::time::Duration;

use sovra_proto::vault::v1 as pb;
use sovra_vault::engine::Engine;
use sovra_vault::synthetic;
use tonic::Code;

use sovra_testkit::*;

const CUSTOMERS: usize = 3000;

fn open_engine(env: &Env) -> Arc<Engine> {
    let cfg = env.config();
    Arc::new(
        Engine::open_over(
            &env.data_dir(),
            cfg.load_root_key().unwrap(),
            cfg.load_schema().unwrap(),
            cfg.open_wal().unwrap(),
            &cfg.pad_place().unwrap(),
        )
        .unwrap(),
    )
}

async fn wait_done(
    adm: &mut sovra_vault::client::Client,
    svc: &mut sovra_vault::client::Client,
    ids: &[String],
) -> (pb::KeyStatus, usize) {
    let mut reads = 0;
    for _ in 0..6000 {
        // Reads keep working while the job runs.
        let id = &ids[reads * 37 % ids.len()];
        let got = svc
            .get_fields(get(id, &["phone"], "customer_service"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.fields.len(), 1);
        reads += 1;
        let s = adm
            .get_key_status(pb::GetKeyStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.job.as_ref().is_some_and(|j| j.done) {
            return (s, reads);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("rotation did not finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_rewraps_thousands_resumes_and_retires() {
    let env = Env::new();
    let people = synthetic::generate(5, CUSTOMERS);
    let ids: Vec<String> = people.iter().map(|c| c.id.clone()).collect();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let mut stream = svc
        .batch_put(tokio_stream::iter(
            people
                .iter()
                .map(|c| c.to_request("import"))
                .collect::<Vec<_>>(),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(r) = stream.message().await.unwrap() {
        assert_eq!(r.code, 0, "{r:?}");
        n += 1;
    }
    assert_eq!(n, CUSTOMERS);
    let mut adm = srv.client(Some(&env.admin)).await;
    let s = adm
        .get_key_status(pb::GetKeyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.active_version, s.min_version), (1, 1));
    assert_eq!(s.data_keys_by_version.get(&1), Some(&(CUSTOMERS as u64)));
    srv.stop().await;

    // A rotation recorded but not run (as if the server died right after the
    // call) is resumed by the next start.
    {
        let engine = open_engine(&env);
        let st = engine
            .rotate("default", |_, _| async { Ok(()) })
            .await
            .unwrap();
        assert_eq!(st.active_version, 2);
        assert!(!st.job.unwrap().done);
    }
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let mut adm = srv.client(Some(&env.admin)).await;
    let (s, _) = wait_done(&mut adm, &mut svc, &ids).await;
    assert_eq!(s.active_version, 2);
    assert_eq!(
        s.data_keys_by_version.into_iter().collect::<Vec<_>>(),
        vec![(2, CUSTOMERS as u64)]
    );

    // Rotation through the API, with reads during it.
    let s = adm
        .rotate_tenant_key(pb::RotateTenantKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.active_version, 3);
    // A second rotation while one runs is refused, unless it already finished.
    if let Err(e) = adm.rotate_tenant_key(pb::RotateTenantKeyRequest {}).await {
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("still running"), "{}", e.message());
    }
    let (s, reads) = wait_done(&mut adm, &mut svc, &ids).await;
    assert!(reads >= 1);
    let by: Vec<_> = s.data_keys_by_version.into_iter().collect();
    assert!(
        by == vec![(3, CUSTOMERS as u64)] || by == vec![(4, CUSTOMERS as u64)],
        "{by:?}"
    );
    let active = s.active_version;
    let j = s.job.unwrap();
    assert_eq!(j.target_version, active);
    assert!(j.rewrapped >= j.total && j.finished_at_ms >= j.started_at_ms);

    // New customers are wrapped under the active version at once.
    svc.put_record(put("fresh", &[("phone", text("13911112222"))]))
        .await
        .unwrap();
    // Every key is re-wrapped, so retiring older versions needs no force.
    let s = adm
        .retire_tenant_key_versions(pb::RetireTenantKeyVersionsRequest {
            min_version: active,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.min_version, active);
    for id in ids.iter().step_by(97) {
        svc.get_fields(get(id, &[], "customer_service"))
            .await
            .unwrap();
    }
    srv.stop().await;

    // Retiring a version that still wraps data keys: refused without force,
    // and with force their data becomes an explicit error.
    {
        let engine = open_engine(&env);
        engine
            .rotate("default", |_, _| async { Ok(()) })
            .await
            .unwrap(); // job not run
        let e = engine
            .retire("default", active + 1, false, |_| async { Ok(()) })
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("{} data keys are still wrapped", CUSTOMERS + 1)),
            "{e}"
        );
        engine
            .retire("default", active + 1, true, |_| async { Ok(()) })
            .await
            .unwrap();
    }
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let e = svc
        .get_fields(get(&ids[0], &["phone"], "customer_service"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("retired") && e.message().contains(&format!("version {active}")),
        "{}",
        e.message()
    );
    // New writes still work under the active version.
    svc.put_record(put("after-retire", &[("phone", text("13911113333"))]))
        .await
        .unwrap();
    svc.get_fields(get("after-retire", &["phone"], "customer_service"))
        .await
        .unwrap();
    srv.stop().await;
}
