//! The `sovra` command as a person uses it: init, token add, serve, and the
//! client subcommands against the real server process; the demo.

use std::process::{Command, Output};

use sovra_testkit::*;

use crate::SOVRA;

fn sovra(args: &[&str], token: Option<&str>, server: Option<&str>) -> Output {
    let mut c = Command::new(SOVRA);
    c.args(args)
        .env_remove("SOVRA_TOKEN")
        .env_remove("SOVRA_SERVER");
    if let Some(t) = token {
        c.env("SOVRA_TOKEN", t);
    }
    if let Some(s) = server {
        c.env("SOVRA_SERVER", s);
    }
    c.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_serve_and_client_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vault");
    let d = dir.to_str().unwrap();
    let o = sovra(&["init", "--dir", d], None, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let admin = out
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("sovra_")
                .map(|t| format!("sovra_{t}"))
        })
        .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("root.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
    let cfg_text = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(
        !cfg_text.contains(&admin),
        "only the token's hash is stored"
    );
    // Re-running init refuses to overwrite.
    let o = sovra(&["init", "--dir", d], None, None);
    assert!(
        !o.status.success() && stderr(&o).contains("already initialised"),
        "{}",
        stderr(&o)
    );

    let cfg = dir.join("config.toml");
    let c = cfg.to_str().unwrap();
    let o = sovra(
        &[
            "token",
            "add",
            "--config",
            c,
            "--name",
            "crm",
            "--role",
            "service",
            "--department",
            "sales",
            "--purpose",
            "customer_service",
            "--purpose",
            "marketing",
        ],
        None,
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let svc = stdout(&o)
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("sovra_")
                .map(|t| format!("sovra_{t}"))
        })
        .unwrap();
    let o = sovra(
        &[
            "token", "add", "--config", c, "--name", "crm", "--role", "service",
        ],
        None,
        None,
    );
    assert!(!o.status.success() && stderr(&o).contains("already exists"));
    let o = sovra(
        &[
            "token", "add", "--config", c, "--name", "x", "--role", "root",
        ],
        None,
        None,
    );
    assert!(!o.status.success() && stderr(&o).contains("role"));

    // Serve it as a real process.
    let port = free_port();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text = text.replace("127.0.0.1:50051", &format!("127.0.0.1:{port}"));
    std::fs::write(&cfg, text).unwrap();
    let mut child = Command::new(SOVRA)
        .args(["serve", "--config", c])
        .stderr(std::fs::File::create(tmp.path().join("serve.log")).unwrap())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..200 {
        if sovra(&["schema"], Some(&svc), Some(&url)).status.success() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(up, "server did not start");
    let s = Some(url.as_str());

    let o = sovra(
        &[
            "put",
            "--customer",
            "c-42",
            "phone=138 0013 8000",
            "email=Li.Wei@Example.com",
            "budget=250000",
            "name=Li Wei",
        ],
        Some(&svc),
        s,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("created c-42"));
    let o = sovra(
        &["get", "--customer", "c-42", "--purpose", "customer_service"],
        Some(&svc),
        s,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("+8613800138000")
            && out.contains("li.wei@example.com")
            && out.contains("[redacted] (masked)"),
        "{out}"
    );
    let o = sovra(
        &[
            "search",
            "--field",
            "email",
            "--value",
            "LI.WEI@example.com",
            "--purpose",
            "customer_service",
        ],
        Some(&svc),
        s,
    );
    assert_eq!(stdout(&o).trim(), "c-42");

    // Bad input on the command line: clear errors, distinct exit codes.
    let o = sovra(&["put", "--customer", "c-42", "budget=lots"], Some(&svc), s);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("integer"));
    let o = sovra(&["put", "--customer", "c-42", "nonsense"], Some(&svc), s);
    assert!(stderr(&o).contains("FIELD=VALUE"));
    let o = sovra(&["put", "--customer", "c-42", "shoe=1"], Some(&svc), s);
    assert!(stderr(&o).contains("unknown field"));
    let o = sovra(
        &["get", "--customer", "c-42", "--purpose", "curiosity"],
        Some(&svc),
        s,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("InvalidArgument") && stderr(&o).contains("curiosity"),
        "{}",
        stderr(&o)
    );
    let o = sovra(
        &["get", "--customer", "c-42", "--purpose", "billing"],
        None,
        s,
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("SOVRA_TOKEN"));
    let o = sovra(
        &["get", "--customer", "c-42", "--purpose", "billing"],
        Some("sovra_wrong"),
        s,
    );
    assert!(stderr(&o).contains("Unauthenticated"));
    let o = sovra(&["schema"], Some(&svc), Some("http://127.0.0.1:1"));
    assert!(
        !o.status.success() && stderr(&o).contains("cannot connect"),
        "{}",
        stderr(&o)
    );

    // Key rotation with progress, then erasure.
    let o = sovra(&["keys", "rotate", "--wait"], Some(&admin), s);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("v2: 1 data keys"), "{}", stdout(&o));
    let o = sovra(
        &[
            "erase",
            "--customer",
            "c-42",
            "--reason",
            "gdpr_art17_request",
        ],
        Some(&admin),
        s,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("erased c-42"));
    let o = sovra(
        &["get", "--customer", "c-42", "--purpose", "customer_service"],
        Some(&svc),
        s,
    );
    assert!(stderr(&o).contains("NotFound"), "{}", stderr(&o));
    child.kill().unwrap();
    child.wait().unwrap();

    // A broken configuration refuses to start, naming the problem.
    std::fs::write(&cfg, "listen = 'nowhere'\n").unwrap();
    let o = sovra(&["serve", "--config", c], None, None);
    assert!(
        !o.status.success() && stderr(&o).contains("listen"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn demo_runs_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("demo.openlineage.jsonl");
    let o = sovra(
        &[
            "demo",
            "--customers",
            "120",
            "--openlineage-out",
            export.to_str().unwrap(),
        ],
        None,
        None,
    );
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("Summary: 120 written, 2 rejected"), "{out}");
    assert!(
        out.contains("100 consents (10 withdrawn, refusal and audit bundle verified)"),
        "{out}"
    );
    assert!(out.contains("withdrew consent"), "{out}");
    assert!(
        out.contains("PermissionDenied") && out.contains("NotFound"),
        "{out}"
    );
    assert!(
        out.contains("phone of customer") && out.contains("(origin)"),
        "{out}"
    );
    assert!(std::fs::read_to_string(&export).unwrap().lines().count() >= 4);
    assert!(
        out.contains("5 CRM contracts registered (1 POC obligation missed and escalated, its evidence verified offline)"),
        "{out}"
    );
    assert!(
        out.contains("verified offline with the officer's key")
            && out.contains("escalated, escalated to department:customer_success_director")
            && out.contains("send_activation_link due ")
            && out.contains("kept by crm-backend"),
        "{out}"
    );
    let o = sovra(&["demo", "--customers", "0"], None, None);
    assert_eq!(o.status.code(), Some(64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lineage_commands() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    svc.put_record(put("c-lin", &[("phone", text("+86 138-0013-8000"))]))
        .await
        .unwrap();
    svc.put_record(put("c-lin", &[("phone", text("+8613900001111"))]))
        .await
        .unwrap();
    svc.get_fields(get("c-lin", &["phone"], "customer_service"))
        .await
        .unwrap();
    let url = srv.url.clone();
    let officer = env.officer.clone();
    let run = move |args: Vec<String>, token: String| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            sovra(&a, Some(&token), Some(&url))
        })
    };
    let args = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();

    let o = run(args("lineage show c-lin phone"), officer.clone())
        .await
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("v2") && text.contains("(origin)"), "{text}");
    assert!(text.contains("via web_form"), "{text}");
    assert!(text.contains("normalised"), "{text}");
    assert!(!text.contains("+8613900001111"), "no value is printed");

    let o = run(args("lineage accesses c-lin phone"), officer.clone())
        .await
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("customer_service") && text.contains("plaintext"),
        "{text}"
    );
    assert!(text.contains("ledger entry"), "{text}");

    let o = run(args("lineage derived c-lin phone"), officer.clone())
        .await
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("nothing was computed"),
        "{}",
        stdout(&o)
    );

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ol.jsonl");
    let o = run(
        vec![
            "lineage".into(),
            "export".into(),
            "--openlineage".into(),
            "-o".into(),
            out.to_str().unwrap().into(),
        ],
        officer.clone(),
    )
    .await
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = std::fs::read_to_string(&out).unwrap();
    assert!(lines.lines().count() >= 2);
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["eventType"], "COMPLETE");
    }
    assert!(!lines.contains("c-lin"));
    // No format chosen, an unknown customer, a reversed range, a service token.
    let o = run(args("lineage export"), officer.clone()).await.unwrap();
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("--openlineage"));
    let o = run(args("lineage show nobody phone"), officer.clone())
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("NotFound") || stderr(&o).contains("not found"),
        "{}",
        stderr(&o)
    );
    let o = run(
        args("lineage accesses c-lin phone --from-ms 2000 --to-ms 1000"),
        officer.clone(),
    )
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("reversed"), "{}", stderr(&o));
    let o = run(args("lineage show c-lin phone"), env.service.clone())
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("read_lineage"), "{}", stderr(&o));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_commands() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let mut led = sovra_vault::client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    for i in 0..21 {
        let c = format!("cj-{i}");
        svc.put_record(put(&c, &[("budget", int(10_000 * (i + 1)))]))
            .await
            .unwrap();
        led.record_consent(sovra_testkit::consent(&c, "lead_scoring", true))
            .await
            .unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("sum.toml");
    std::fs::write(
        &spec,
        "name = \"cli-sum\"\npurpose = \"lead_scoring\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"sum\"\nfeature = \"budget\"\n",
    )
    .unwrap();
    let big = tmp.path().join("big.toml");
    std::fs::write(&big, "#".repeat(70_000)).unwrap();
    let binary = tmp.path().join("bin.toml");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00, 0x80]).unwrap();
    let url = srv.url.clone();
    let run = move |args: Vec<String>, token: String| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            sovra(&a, Some(&token), Some(&url))
        })
    };
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();

    // Submit, watch with a progress bar, print the released sum (1 + … + 21).
    let o = run(
        vec!["job".into(), "submit".into(), s(&spec)],
        env.partner.clone(),
    )
    .await
    .unwrap();
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("sum = 231"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("blocks") && stderr(&o).contains("SUCCEEDED"),
        "{}",
        stderr(&o)
    );
    let job_id = stdout(&o)
        .split_whitespace()
        .find(|w| w.starts_with("job-"))
        .unwrap()
        .to_owned();
    let o = run(
        vec!["job".into(), "result".into(), job_id.clone()],
        env.partner.clone(),
    )
    .await
    .unwrap();
    assert!(
        o.status.success() && stdout(&o).contains("sum = 231"),
        "{}",
        stderr(&o)
    );
    let o = run(
        vec!["job".into(), "cancel".into(), job_id.clone()],
        env.partner.clone(),
    )
    .await
    .unwrap();
    assert!(
        o.status.success() && stdout(&o).contains("SUCCEEDED"),
        "{}",
        stderr(&o)
    );
    let o = run(vec!["job".into(), "workloads".into()], env.service.clone())
        .await
        .unwrap();
    assert!(stdout(&o).contains("lead_scoring"), "{}", stdout(&o));

    // Bad input: clear errors, non-zero exit.
    for (args, needle) in [
        (vec!["job".into(), "submit".into(), s(&big)], "larger than"),
        (vec!["job".into(), "submit".into(), s(&binary)], "not UTF-8"),
        (
            vec![
                "job".into(),
                "submit".into(),
                s(&tmp.path().join("none.toml")),
            ],
            "cannot read",
        ),
        (
            vec![
                "job".into(),
                "submit".into(),
                "--workload".into(),
                "nope".into(),
            ],
            "workload",
        ),
        (
            vec!["job".into(), "result".into(), "job-nope".into()],
            "job-nope",
        ),
        (vec!["job".into(), "submit".into()], "required"),
    ] {
        let o = run(args.clone(), env.partner.clone()).await.unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
    // A partner may not take someone else's result.
    let o = run(
        vec!["job".into(), "result".into(), job_id],
        env.service.clone(),
    )
    .await
    .unwrap();
    assert!(
        !o.status.success() && stderr(&o).contains("submitter"),
        "{}",
        stderr(&o)
    );
    srv.stop().await;
}
