//! The policy life cycle through the real server and binary: reloads change
//! the next request without a restart and are recorded in the ledger; a
//! broken file is refused with its line and the old set stays in force;
//! SIGHUP reloads; a server with a broken set refuses to start; the CLI
//! validates and explains offline and against the server.

use std::process::Command;

use sovra_proto::ledger::v1 as lpb;
use sovra_proto::policy::v1 as ppb;
use sovra_vault::client;
use tonic::Code;

use sovra_testkit::*;

use crate::SOVRA;

const SENSITIVE: &str = "20-sensitive.cedar";

fn national_id_read(r: &sovra_proto::vault::v1::GetFieldsResponse) -> &'static str {
    if revealed(&r.fields[0]).is_some() {
        "plaintext"
    } else if masked(&r.fields[0]).is_some() {
        "masked"
    } else {
        "neither"
    }
}

/// Lets the sales department see national ids, by editing the sensitive-field rule.
fn widen(dir: &std::path::Path) {
    let p = dir.join(SENSITIVE);
    let t = std::fs::read_to_string(&p).unwrap();
    let w = t.replace(
        "unless { principal.department == resource.department };",
        "unless { principal.department == resource.department || principal.department == \"sales\" };",
    );
    assert_ne!(t, w);
    std::fs::write(p, w).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_the_next_request_and_a_broken_file_keeps_the_old_set() {
    let env = Env::new();
    let policy_dir = env.dir.path().join("policies");
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    svc.put_record(put("c-1", &[("national_id", text("11010519491231002X"))]))
        .await
        .unwrap();
    let read = || get("c-1", &["national_id"], "customer_service");
    let r = svc.get_fields(read()).await.unwrap().into_inner();
    assert_eq!(national_id_read(&r), "masked");

    let mut officer = client::connect_policy(&srv.url, Some(&env.officer), None)
        .await
        .unwrap();
    let mut admin = client::connect_policy(&srv.url, Some(&env.admin), None)
        .await
        .unwrap();
    let before = officer
        .get_policy_status(ppb::GetPolicyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.files.len(), sovra_policy::DEFAULT_FILES.len());
    assert!(before.ledger_index.is_some(), "first start records the set");

    // Nothing changed on disk: a reload is a no-op.
    let r = admin
        .reload_policies(ppb::ReloadPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!r.changed);

    widen(&policy_dir);
    let r = admin
        .reload_policies(ppb::ReloadPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(r.changed);
    let after = r.status.unwrap();
    assert_ne!(after.sha256, before.sha256);
    let r = svc.get_fields(read()).await.unwrap().into_inner();
    assert_eq!(
        national_id_read(&r),
        "plaintext",
        "the next request sees the new set"
    );

    // The change is in the ledger, with the new hash and the admin's name.
    let mut led = client::connect_ledger(&srv.url, Some(&env.officer), None)
        .await
        .unwrap();
    let index = after.ledger_index.unwrap();
    let mut s = led
        .get_entries(lpb::GetEntriesRequest {
            start: index,
            end: index + 1,
        })
        .await
        .unwrap()
        .into_inner();
    let e = s.message().await.unwrap().unwrap();
    assert!(e.decoded_json.contains(&after.sha256), "{}", e.decoded_json);
    assert!(e.decoded_json.contains("\"admin\""), "{}", e.decoded_json);

    // A broken file: refused with file and line, and the widened set stays.
    std::fs::write(
        policy_dir.join("99-broken.cedar"),
        "// a typo on line 3\n@id(\"broken\")\npermit (principal, action, resource) when { principal.departmnt == \"x\" };\n",
    )
    .unwrap();
    let e = admin
        .reload_policies(ppb::ReloadPoliciesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("99-broken.cedar:3:"),
        "{}",
        e.message()
    );
    let r = svc.get_fields(read()).await.unwrap().into_inner();
    assert_eq!(national_id_read(&r), "plaintext", "old set still in force");
    let now = officer
        .get_policy_status(ppb::GetPolicyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.sha256, after.sha256);

    // Syntax errors too.
    std::fs::write(
        policy_dir.join("99-broken.cedar"),
        "@id(\"broken\")\npermit (principal, action, resource)\nwhen { 1 + };\n",
    )
    .unwrap();
    let e = admin
        .reload_policies(ppb::ReloadPoliciesRequest {})
        .await
        .unwrap_err();
    assert!(
        e.message().contains("99-broken.cedar:3:"),
        "{}",
        e.message()
    );

    // Explanations name the determining policy.
    let x = officer
        .explain(ppb::ExplainRequest {
            principal: "partner".into(),
            action: "reveal".into(),
            field: "national_id".into(),
            customer_id: "c-1".into(),
            purpose: "lead_scoring".into(),
            approvals: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!x.allowed);
    assert!(
        x.policies.contains(&"partner-no-plaintext".to_owned()),
        "{x:?}"
    );
    for (bad, code) in [
        (("nobody", "read", "phone"), Code::NotFound),
        (("svc", "frobnicate", "phone"), Code::InvalidArgument),
        (("svc", "read", "no_such_field"), Code::InvalidArgument),
        (("svc", "erase", "phone"), Code::InvalidArgument),
    ] {
        let e = officer
            .explain(ppb::ExplainRequest {
                principal: bad.0.into(),
                action: bad.1.into(),
                field: bad.2.into(),
                customer_id: String::new(),
                purpose: String::new(),
                approvals: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{bad:?}: {}", e.message());
    }
    for (purpose, customer, code) in [
        ("world_domination", "", Code::InvalidArgument),
        ("billing", "not an id", Code::InvalidArgument),
        ("billing", "no-such-customer", Code::NotFound),
    ] {
        let e = officer
            .explain(ppb::ExplainRequest {
                principal: "svc".into(),
                action: "read".into(),
                field: "phone".into(),
                customer_id: customer.into(),
                purpose: purpose.into(),
                approvals: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{purpose} {customer}: {}", e.message());
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policy_configuration_is_refused_clearly() {
    // A policy directory that does not exist.
    let env = Env::new();
    let mut cfg = env.config();
    cfg.policy.dir = Some("no-such-dir".into());
    sovra_vault::config::write_config(&cfg, &env.config_path).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = sovra_vault::server::start(&env.config(), Some(l), std::future::pending())
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot read policies") && e.contains("no-such-dir"),
        "{e}"
    );

    // Principal attributes that are not identifiers.
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    for (bad, needle) in [
        ("department = \"sales dept\"", "principals.department"),
        ("purposes = [\"billing\", \"\"]", "principals.purposes"),
    ] {
        let t = text.replacen("[[principals]]\n", &format!("[[principals]]\n{bad}\n"), 1);
        std::fs::write(&env.config_path, &t).unwrap();
        let e = sovra_vault::config::Config::load(&env.config_path)
            .and_then(|c| c.authenticator().map(|_| ()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{bad}: {e}");
    }
    std::fs::write(&env.config_path, &text).unwrap();
    let o = Command::new(SOVRA)
        .args(["token", "add", "--config"])
        .arg(&env.config_path)
        .args(["--name", "x", "--role", "service", "--department", "a b"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("department"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_broken_set_refuses_to_start() {
    let env = Env::new();
    let policy_dir = env.dir.path().join("policies");
    let port = free_port();
    let mut child = spawn_server(SOVRA, &env, port).await;
    let url = format!("http://127.0.0.1:{port}");
    let mut svc = client::connect(&url, Some(&env.service), None)
        .await
        .unwrap();
    svc.put_record(put("c-1", &[("national_id", text("11010519491231002X"))]))
        .await
        .unwrap();
    let read = || get("c-1", &["national_id"], "customer_service");
    assert_eq!(
        national_id_read(&svc.get_fields(read()).await.unwrap().into_inner()),
        "masked"
    );
    widen(&policy_dir);
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let mut seen = "masked";
    for _ in 0..100 {
        seen = national_id_read(&svc.get_fields(read()).await.unwrap().into_inner());
        if seen == "plaintext" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(seen, "plaintext", "SIGHUP reloaded the widened set");
    child.kill().unwrap();
    child.wait().unwrap();

    // A broken set refuses to start, naming file and line.
    std::fs::write(
        policy_dir.join("05-typo.cedar"),
        "\n@id(\"typo\")\npermit (principal is Sovra::Servise, action, resource);\n",
    )
    .unwrap();
    let o = Command::new(SOVRA)
        .args(["serve", "--config"])
        .arg(&env.config_path)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("05-typo.cedar:3:"), "{err}");
    assert!(err.contains("Servise"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_validates_and_explains() {
    let env = Env::new();
    let dir = env.dir.path().join("policies");
    let cfg = env.config_path.to_str().unwrap().to_owned();
    let run = |args: &[&str], token: Option<&str>| {
        let mut c = Command::new(SOVRA);
        c.args(args).env_remove("SOVRA_TOKEN");
        if let Some(t) = token {
            c.env("SOVRA_TOKEN", t);
        }
        c.output().unwrap()
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let o = run(&["policy", "validate", dir.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("OK:"), "{}", text(&o));

    // Offline explanations, from the files and the configuration.
    let o = run(
        &[
            "policy",
            "explain",
            "--dir",
            dir.to_str().unwrap(),
            "--config",
            &cfg,
            "--principal",
            "svc",
            "--action",
            "read",
            "--field",
            "phone",
            "--purpose",
            "marketing",
            "--withdrawn",
            "marketing",
        ],
        None,
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.starts_with("DENY"), "{out}");
    assert!(out.contains("consent-withdrawn"), "{out}");
    let o = run(
        &[
            "policy",
            "explain",
            "--dir",
            dir.to_str().unwrap(),
            "--config",
            &cfg,
            "--principal",
            "svc",
            "--action",
            "reveal",
            "--field",
            "phone",
            "--purpose",
            "marketing",
            "--consent",
            "marketing",
        ],
        None,
    );
    assert!(text(&o).starts_with("ALLOW"), "{}", text(&o));
    assert!(text(&o).contains("plaintext"), "{}", text(&o));
    let o = run(
        &[
            "policy",
            "explain",
            "--dir",
            dir.to_str().unwrap(),
            "--config",
            &cfg,
            "--principal",
            "nobody",
            "--action",
            "read",
            "--field",
            "phone",
        ],
        None,
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("no principal named `nobody`"),
        "{}",
        text(&o)
    );

    // Broken files: exit 1, every problem located.
    std::fs::write(
        dir.join("98-a.cedar"),
        "@id(\"a\")\npermit (principal, action, resource) when { };\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("99-b.cedar"),
        "\n\npermit (principal, action, resource);\n",
    )
    .unwrap();
    let o = run(&["policy", "validate", dir.to_str().unwrap()], None);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("98-a.cedar:2:"), "{out}");
    assert!(
        out.contains("99-b.cedar:3:") && out.contains("@id"),
        "{out}"
    );
    let o = run(&["policy", "validate", "/nonexistent/policies"], None);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("cannot read policies"), "{}", text(&o));
    std::fs::remove_file(dir.join("98-a.cedar")).unwrap();
    std::fs::remove_file(dir.join("99-b.cedar")).unwrap();

    // Against the running server, with the officer's token.
    let srv = env.start().await;
    let o = run(
        &[
            "policy",
            "explain",
            "--server",
            &srv.url,
            "--principal",
            "svc",
            "--action",
            "reveal",
            "--field",
            "national_id",
            "--purpose",
            "customer_service",
        ],
        Some(&env.officer),
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.starts_with("DENY") && out.contains("masked"), "{out}");
    assert!(out.contains("sensitive-reveal-owning-department"), "{out}");
    let o = run(
        &["policy", "status", "--server", &srv.url],
        Some(&env.officer),
    );
    assert!(text(&o).contains("policy set sha256"), "{}", text(&o));
    let o = run(
        &["policy", "reload", "--server", &srv.url],
        Some(&env.service),
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("PermissionDenied"), "{}", text(&o));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_policy_inputs_get_clear_errors_and_never_allow() {
    let env = Env::new();
    let mut cfg = env.config();
    let dpo2 = cfg
        .add_principal_with(
            "dpo2",
            sovra_vault::access::auth::Role::Officer,
            "default",
            "compliance",
            &[],
        )
        .unwrap();
    sovra_vault::config::write_config(&cfg, &env.config_path).unwrap();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    svc.put_record(put(
        "gov-1",
        &[
            ("company", text("Ministry")),
            ("customer_kind", text("government")),
            ("contract_value", int(8_000_000)),
        ],
    ))
    .await
    .unwrap();

    // Unknown, empty and huge purposes: INVALID_ARGUMENT, never a value.
    for purpose in [
        "",
        "world_domination",
        &"p".repeat(1 << 20),
        "customer_service\0",
    ] {
        let e = svc
            .get_fields(get("gov-1", &["company"], purpose))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.code(),
                Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange
            ),
            "{:?}: {}",
            e.code(),
            e.message()
        );
        assert!(e.message().len() < 1024, "message echoes the input");
    }
    // Searches declare a purpose too.
    for purpose in ["", "world_domination"] {
        let mut r = search_req("phone", "+8613800138000", 1);
        r.purpose = purpose.into();
        let e = svc.search(r).await.unwrap_err();
        assert_eq!(
            e.code(),
            Code::InvalidArgument,
            "{purpose}: {}",
            e.message()
        );
        assert!(e.message().contains("purpose"), "{}", e.message());
    }
    // Unknown principals.
    let mut nobody = srv.client(Some("sovra_not-a-token")).await;
    let e = nobody
        .get_fields(get("gov-1", &["company"], "customer_service"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // Export of a government customer over 5,000,000 needs three approvals.
    let export = |approvals: &[&str]| {
        let mut r = tonic::Request::new(get("gov-1", &["company"], "export"));
        if !approvals.is_empty() {
            r.metadata_mut()
                .insert("x-sovra-approvals", approvals.join(",").parse().unwrap());
        }
        r
    };
    let e = svc.get_fields(export(&[])).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("government-export-three-approvals"),
        "{}",
        e.message()
    );
    // Two distinct approvers, or the same one three times, are not three.
    let e = svc
        .get_fields(export(&[&env.officer, &dpo2.token, &env.officer]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    // The caller cannot approve itself, and partners are not approvers.
    let e = svc
        .get_fields(export(&[
            &env.officer,
            &dpo2.token,
            &env.service,
            &env.partner,
        ]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    // Too many approval tokens.
    let many: Vec<&str> = std::iter::repeat_n(env.officer.as_str(), 17).collect();
    let e = svc.get_fields(export(&many)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    // A forged approval is refused outright.
    let e = svc
        .get_fields(export(&[&env.officer, "sovra_forged"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    let r = svc
        .get_fields(export(&[&env.officer, &dpo2.token, &env.admin]))
        .await
        .unwrap()
        .into_inner();
    assert!(revealed(&r.fields[0]).is_some());

    // The reveal's ledger entry names the determining policies.
    let mut led = client::connect_ledger(&srv.url, Some(&env.officer), None)
        .await
        .unwrap();
    let size = led
        .get_checkpoint(lpb::GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner()
        .tree_size;
    let mut s = led
        .get_entries(lpb::GetEntriesRequest {
            start: 0,
            end: size,
        })
        .await
        .unwrap()
        .into_inner();
    let mut reveals = Vec::new();
    while let Some(e) = s.message().await.unwrap() {
        if e.decoded_json.contains("field_revealed") || e.decoded_json.contains("FieldRevealed") {
            reveals.push(e.decoded_json);
        }
    }
    let last = reveals.last().expect("reveal entries");
    assert!(last.contains("service-reveal"), "{last}");
    assert!(!last.contains("Ministry"), "no values in the ledger");
    assert!(
        reveals
            .iter()
            .any(|r| r.contains("government-export-three-approvals")),
        "denied exports are recorded with their policy: {reveals:?}"
    );
    srv.stop().await;
}
