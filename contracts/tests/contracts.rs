//! The shipped CRM contracts, hostile manifests and hostile guests,
//! through the crate's public interface.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use sovra_contracts::{
    dry_run, evaluate, AnyField, CelType, ContractError, Event, GuestFault, Manifest, Scalar,
    Trigger,
};

/// The CRM schema's fields and their CEL types (vault/schema/crm_customer.toml).
fn crm() -> BTreeMap<String, CelType> {
    let strings = [
        "name",
        "phone",
        "email",
        "national_id",
        "company",
        "industry_code",
        "region",
        "customer_kind",
    ];
    let ints = [
        "budget",
        "purchase_count",
        "last_contact_ms",
        "whitepaper_dwell_s",
        "contract_value",
    ];
    strings
        .iter()
        .map(|s| (s.to_string(), CelType::String))
        .chain(ints.iter().map(|s| (s.to_string(), CelType::Int)))
        .collect()
}

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crm").join(name)
}

fn load(name: &str) -> Manifest {
    match Manifest::load(&shipped(&format!("{name}.toml")), &crm()) {
        Ok(m) => m,
        Err(e) => panic!("{name}: {e}"),
    }
}

fn run(name: &str) -> sovra_contracts::DryRun {
    let m = load(name);
    let events = std::fs::read_to_string(shipped(&format!("events/{name}.jsonl"))).unwrap();
    dry_run(&m, &events, None).unwrap()
}

fn outcomes(r: &sovra_contracts::DryRun) -> Vec<(String, &'static str)> {
    r.obligations
        .iter()
        .map(|o| (o.action.clone(), o.outcome))
        .collect()
}

#[test]
fn the_poc_contract_keeps_two_obligations_and_escalates_the_missed_one_at_72_hours() {
    let r = run("poc-activation");
    assert_eq!(
        outcomes(&r),
        vec![
            ("send_activation_link".to_string(), "kept"),
            ("open_delivery_task".to_string(), "kept"),
            ("raise_receivable".to_string(), "escalated"),
        ]
    );
    let missed = &r.obligations[2];
    assert_eq!(missed.at_ms, Some(1_700_000_000_000 + 72 * 3_600_000));
    assert_eq!(
        missed.escalated_to.as_deref(),
        Some("department:customer_success_director")
    );
    // The later `payment_received` signal does not trigger this contract.
    assert!(!r.steps[3].evaluation.as_ref().unwrap().triggered);
}

#[test]
fn the_export_contract_asks_three_officers_only_for_large_government_contracts() {
    let r = run("gov-export-approvals");
    let first = r.steps[0].evaluation.as_ref().unwrap();
    assert_eq!(first.condition, Some(true));
    assert_eq!(first.actions.len(), 1);
    assert_eq!(first.actions[0].detail["count"], 3);
    assert_eq!(first.actions[0].detail["of"], "role:officer");
    let second = r.steps[1].evaluation.as_ref().unwrap();
    assert_eq!(second.condition, Some(false));
    assert!(second.actions.is_empty());
    assert_eq!(outcomes(&r), vec![("three_approvals".to_string(), "kept")]);
}

#[test]
fn the_lead_contract_alerts_sales_from_its_guest_within_300_ms() {
    let r = run("lead-score-alert");
    let hot = r.steps[0].evaluation.as_ref().unwrap();
    assert_eq!(hot.actions.len(), 1);
    assert!(hot.actions[0].from_guest);
    assert_eq!(hot.actions[0].due_ms, Some(1_700_000_000_300));
    assert!(
        hot.fuel_used > 0 && hot.fuel_used < 10_000,
        "{}",
        hot.fuel_used
    );
    let cold = r.steps[2].evaluation.as_ref().unwrap();
    assert!(cold.triggered && cold.actions.is_empty());
    // Without a decider every action is taken: the last hot lead's alert
    // is pending at the end of the file.
    assert_eq!(
        outcomes(&r),
        vec![
            ("alert_rep".to_string(), "kept"),
            ("alert_rep".to_string(), "pending")
        ]
    );
}

#[test]
fn a_denied_action_is_reported_with_its_decision_and_sets_no_deadline() {
    let m = load("lead-score-alert");
    let events = std::fs::read_to_string(shipped("events/lead-score-alert.jsonl")).unwrap();
    // A stand-in for the vault's policies: no action for a customer who
    // withdrew the contract's purpose.
    let mut decide = |_: &sovra_contracts::Planned, c: &sovra_contracts::CustomerFacts| {
        let allowed = !c.withdrawn.contains(&m.purpose);
        sovra_contracts::ActionDecision {
            allowed,
            policies: vec![if allowed { "permit" } else { "forbid" }.into()],
        }
    };
    let r = sovra_contracts::dry_run_decided(&m, &events, None, Some(&mut decide)).unwrap();
    let last = r.steps[3].evaluation.as_ref().unwrap();
    assert_eq!(
        last.actions[0].decision.as_ref().map(|d| d.allowed),
        Some(false)
    );
    assert_eq!(outcomes(&r), vec![("alert_rep".to_string(), "kept")]);
}

#[test]
fn the_consent_contract_cancels_marketing_only_on_a_marketing_withdrawal() {
    let r = run("marketing-consent-stop");
    let ev = r.steps[0].evaluation.as_ref().unwrap();
    let kinds: Vec<&str> = ev.actions.iter().map(|a| a.kind).collect();
    assert_eq!(kinds, vec!["cancel_actions", "notify"]);
    assert_eq!(ev.actions[0].detail["purpose"], "marketing");
    assert!(!r.steps[1].evaluation.as_ref().unwrap().triggered);
}

#[test]
fn a_pin_changes_with_any_byte_of_the_manifest_or_the_guest() {
    let a = load("lead-score-alert");
    let text = std::fs::read_to_string(shipped("lead-score-alert.toml")).unwrap();
    let wat = std::fs::read(shipped("lead-score-alert.wat")).unwrap();
    let same = Manifest::parse("x", &text, Some(&wat), &crm()).unwrap();
    assert_eq!(a.hash(), same.hash());
    let other_text = text.replace("fuel = 10000", "fuel = 10001");
    let b = Manifest::parse("x", &other_text, Some(&wat), &crm()).unwrap();
    assert_ne!(a.hash(), b.hash());
    let other_wat = String::from_utf8(wat).unwrap().replace("700", "701");
    let c = Manifest::parse("x", &text, Some(other_wat.as_bytes()), &crm()).unwrap();
    assert_ne!(a.hash(), c.hash());
}

const BASE: &str = r#"id = "t"
version = 1
purpose = "customer_service"
department = "sales"
capabilities = ["notify", "set_timer"]

[[triggers]]
on = "signal"
name = "ping"
"#;

/// The manifest error for `text` (line, column, message).
fn manifest_error(text: &str) -> (usize, usize, String) {
    match Manifest::parse("m.toml", text, None, &crm()) {
        Err(ContractError::Manifest(e)) => {
            assert_eq!(e.file(), "m.toml");
            assert!(e.to_string().starts_with("m.toml"), "{e}");
            (e.line(), e.column(), e.message().to_owned())
        }
        Err(e) => panic!("not a manifest error: {e}"),
        Ok(_) => panic!("accepted:\n{text}"),
    }
}

#[test]
fn malformed_manifests_are_refused_at_their_line_with_what_to_change() {
    let cases: Vec<(String, usize, &str)> = vec![
        (BASE.replace("\"notify\", ", "\"notify\", \"launch_missiles\", "), 5, "unknown capability `launch_missiles`"),
        (format!("{BASE}condition = 1\n"), 0, ""),
        (BASE.replace("version = 1", "version = 0"), 2, "must be 1 to"),
        (BASE.replace("version = 1", "version = \"one\""), 2, "invalid type"),
        (BASE.replace("id = \"t\"", "id = \"t t\""), 1, "not an identifier"),
        (BASE.replace("name = \"ping\"", "name = \"ping\"\ncolour = \"red\""), 10, "unknown field `colour`"),
        (BASE.replace("on = \"signal\"", "on = \"sunrise\""), 8, "unknown trigger `sunrise`"),
        (BASE.replace("name = \"ping\"\n", ""), 8, "needs `name`"),
        (format!("condition = \"fields.phone == 'x'\"\n{BASE}"), 1, "add it to `reads`"),
        (format!("condition = \"event.attrs.n >\"\n{BASE}"), 1, "does not parse"),
        (format!("condition = \"1 + 2\"\n{BASE}"), 1, "not a bool"),
        (format!("reads = [\"phone\"]\n{BASE}"), 1, "needs the `read_fields` capability"),
        (format!("reads = [\"shoe_size\"]\n{BASE}"), 1, "does not define"),
        (format!("{BASE}\n[[actions]]\nid = \"a\"\nkind = \"create_task\"\nassignee = \"department:x\"\ntitle = \"t\"\n"), 13, "needs the `create_task` capability"),
        (format!("{BASE}\n[[actions]]\nid = \"a\"\nkind = \"notify\"\nto = \"customer\"\ntemplate = \"t\"\ndeadline = \"3h\"\n"), 11, "no `escalate_to`"),
        (format!("{BASE}\n[[actions]]\nid = \"a\"\nkind = \"notify\"\nto = \"customer\"\ntemplate = \"t\"\ndeadline = \"3 weeks\"\nescalate_to = \"customer\"\n"), 16, "deadline `3 weeks`"),
        (format!("{BASE}\n[[actions]]\nid = \"a\"\nkind = \"notify\"\nto = \"everyone\"\ntemplate = \"t\"\n"), 14, "is not a target"),
        (format!("{BASE}\n[[actions]]\nid = \"a\"\nkind = \"notify\"\ntemplate = \"t\"\n"), 13, "needs `to`"),
        (format!("{BASE}\n[[actions]]\nid = \"a\"\nkind = \"notify\"\nto = \"customer\"\ntemplate = \"t\"\ncount = 3\n"), 11, "`count` does not apply"),
        (format!("{BASE}\n[[actions]]\nid = \"a\"\nkind = \"teleport\"\n"), 13, "unknown action kind `teleport`"),
        (format!("{BASE}\n[guest]\nmodule = \"g.wat\"\n"), 12, "was not given"),
        (format!("{BASE}\n[guest]\nmodule = \"../../etc/secret\"\n"), 0, ""),
        ("id = \"t\"\n[[[".to_string(), 2, ""),
        (BASE.split("[[triggers]]").next().unwrap().to_string(), 0, "at least one"),
    ];
    for (text, line, want) in cases {
        let (l, _c, msg) = manifest_error(&text);
        if line > 0 {
            assert_eq!(l, line, "{msg}\n{text}");
        }
        assert!(msg.contains(want), "`{msg}` lacks `{want}`\n{text}");
    }
    // Oversized.
    let big = format!("{BASE}# {}\n", "x".repeat(70_000));
    assert!(manifest_error(&big).2.contains("at most"));
}

fn guest_manifest(fuel: u64, pages: u32) -> String {
    format!("{BASE}\n[guest]\nmodule = \"g.wat\"\nfuel = {fuel}\nmemory_pages = {pages}\n")
}

fn with_guest(wat: &str) -> Result<Manifest, ContractError> {
    Manifest::parse(
        "m.toml",
        &guest_manifest(100_000, 1),
        Some(wat.as_bytes()),
        &crm(),
    )
}

fn guest_fault(wat: &str) -> (GuestFault, u64) {
    let m = match with_guest(wat) {
        Ok(m) => m,
        Err(e) => panic!("did not compile: {e}"),
    };
    match evaluate(&m, &ping(), 5) {
        Err(ContractError::Guest(g)) => (g.fault(), g.fuel_used()),
        Err(e) => panic!("not a guest error: {e}"),
        Ok(ev) => panic!("ran: {ev:?}"),
    }
}

fn ping() -> Event {
    Event {
        kind: Trigger::Signal,
        name: "ping".into(),
        at_ms: 1,
        attrs: BTreeMap::new(),
        fields: BTreeMap::new(),
    }
}

const IMPORTS: &str = r#"(import "sovra" "attr" (func $attr (param i32 i32) (result i64)))
  (import "sovra" "emit" (func $emit (param i32 i32)))
  (memory (export "memory") 1)"#;

#[test]
fn a_looping_guest_runs_out_of_fuel_and_says_so() {
    let wat = format!(
        "(module {IMPORTS} (func (export \"run\") (result i32) (loop $l (br $l)) (i32.const 0)))"
    );
    let (fault, used) = guest_fault(&wat);
    assert_eq!(fault, GuestFault::FuelExhausted);
    assert!(used >= 99_000, "{used}");
}

#[test]
fn a_guest_growing_memory_past_its_cap_stops_at_the_cap() {
    let wat = format!(
        "(module {IMPORTS} (func (export \"run\") (result i32) (drop (memory.grow (i32.const 4))) (i32.const 0)))"
    );
    assert_eq!(guest_fault(&wat).0, GuestFault::MemoryCap);
    // A module that starts above the cap is refused at registration.
    let big =
        r#"(module (memory (export "memory") 8) (func (export "run") (result i32) (i32.const 0)))"#;
    match with_guest(big) {
        Err(ContractError::Manifest(e)) => assert!(e.message().contains("memory"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn trapping_failing_and_misbehaving_guests_fail_their_run_with_the_reason() {
    let trap = format!("(module {IMPORTS} (func (export \"run\") (result i32) unreachable))");
    assert_eq!(guest_fault(&trap).0, GuestFault::Trap);
    let oob = format!(
        "(module {IMPORTS} (func (export \"run\") (result i32) (i32.load (i32.const 70000))))"
    );
    assert_eq!(guest_fault(&oob).0, GuestFault::Trap);
    let failed = format!("(module {IMPORTS} (func (export \"run\") (result i32) (i32.const 7)))");
    assert_eq!(guest_fault(&failed).0, GuestFault::Failed);
    // An action the capabilities do not cover.
    let json = r#"{\"id\":\"x\",\"kind\":\"submit_workload\",\"workload\":\"w\"}"#;
    let len = json.replace("\\\"", "\"").len();
    let emit = format!(
        "(module {IMPORTS} (data (i32.const 0) \"{json}\") (func (export \"run\") (result i32) (call $emit (i32.const 0) (i32.const {len})) (i32.const 0)))"
    );
    assert_eq!(guest_fault(&emit).0, GuestFault::BadAction);
    // Not JSON; out of bounds; too many.
    let junk = format!("(module {IMPORTS} (func (export \"run\") (result i32) (call $emit (i32.const 0) (i32.const 8)) (i32.const 0)))");
    assert_eq!(guest_fault(&junk).0, GuestFault::BadAction);
    let far = format!("(module {IMPORTS} (func (export \"run\") (result i32) (call $emit (i32.const 65530) (i32.const 100)) (i32.const 0)))");
    assert_eq!(guest_fault(&far).0, GuestFault::Trap);
    let ok_json = r#"{\"id\":\"n\",\"kind\":\"notify\",\"to\":\"customer\",\"template\":\"t\"}"#;
    let ok_len = ok_json.replace("\\\"", "\"").len();
    let many = format!(
        "(module {IMPORTS} (data (i32.const 0) \"{ok_json}\") (func (export \"run\") (result i32) (local $i i32) (loop $l (call $emit (i32.const 0) (i32.const {ok_len})) (local.set $i (i32.add (local.get $i) (i32.const 1))) (br_if $l (i32.lt_u (local.get $i) (i32.const 20)))) (i32.const 0)))"
    );
    assert_eq!(guest_fault(&many).0, GuestFault::BadAction);
}

#[test]
fn modules_outside_the_guest_interface_are_refused_at_registration() {
    let cases = [
        (
            r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32))) (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#,
            "wasi_snapshot_preview1.fd_write",
        ),
        (
            r#"(module (import "sovra" "clock" (func (result i64))) (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#,
            "sovra.clock",
        ),
        (
            r#"(module (memory (export "memory") 1))"#,
            "does not export `run`",
        ),
        (
            r#"(module (func (export "run") (result i32) (i32.const 0)))"#,
            "does not export `memory`",
        ),
        (
            r#"(module (memory (export "memory") 1) (func (export "run") (param i32) (result i32) (i32.const 0)))"#,
            "`run` must be",
        ),
        (
            r#"(module (import "sovra" "emit" (func (param i64))) (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#,
            "",
        ),
        ("(module (func", "does not compile"),
        ("\0asm\x01\0\0\0\x05garbage", "does not"),
    ];
    for (wat, want) in cases {
        match with_guest(wat) {
            Err(ContractError::Manifest(e)) => {
                assert_eq!(e.line(), 12, "{e}");
                assert!(e.message().contains(want), "`{e}` lacks `{want}`");
            }
            other => panic!("{wat}: {other:?}"),
        }
    }
}

#[test]
fn guest_runs_are_deterministic() {
    let m = load("lead-score-alert");
    let mut e = ping();
    e.kind = Trigger::Signal;
    e.name = "lead_scored".into();
    e.attrs.insert("score".into(), Scalar::Int(900));
    let a = evaluate(&m, &e, 10).unwrap();
    let b = evaluate(&m, &e, 10).unwrap();
    assert_eq!(a.fuel_used, b.fuel_used);
    assert_eq!(a.input_digest, b.input_digest);
    assert_eq!(
        serde_json::to_string(&a.actions).unwrap(),
        serde_json::to_string(&b.actions).unwrap()
    );
    // No score: the guest fails its run (status 1), it does not skip.
    e.attrs.clear();
    match evaluate(&m, &e, 10) {
        Err(ContractError::Guest(g)) => assert_eq!(g.fault(), GuestFault::Failed),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_guest_module_outside_the_manifest_s_folder_is_refused() {
    let text = format!("{BASE}\n[guest]\nmodule = \"../secret.wat\"\n");
    match Manifest::parse("m.toml", &text, Some(b"(module)"), &crm()) {
        Err(ContractError::Manifest(e)) => {
            assert_eq!(e.line(), 12, "{e}");
            assert!(e.message().contains("file name beside the manifest"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    let d = tempfile_dir();
    std::fs::write(d.join("c.toml"), &text).unwrap();
    match Manifest::load(&d.join("c.toml"), &crm()) {
        Err(ContractError::Manifest(e)) => {
            assert!(e.message().contains("beside the manifest"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("sovra-contracts-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_completion_after_the_deadline_is_recorded_late_on_the_escalation() {
    let m = load("poc-activation");
    let events = "{\"at_ms\": 0, \"on\": \"signal\", \"name\": \"poc_report_signed\"}\n{\"at_ms\": 300000000, \"complete\": \"raise_receivable\"}\n";
    let r = dry_run(&m, events, None).unwrap();
    let o = r
        .obligations
        .iter()
        .find(|o| o.action == "raise_receivable")
        .unwrap();
    assert_eq!(o.outcome, "escalated");
    assert_eq!(o.completed_late_ms, Some(300_000_000));
    // Field values are bounded like attributes.
    let long = format!(
        "{{\"at_ms\": 0, \"on\": \"signal\", \"name\": \"poc_report_signed\", \"fields\": {{\"email\": \"{}\"}}}}",
        "x".repeat(300)
    );
    match dry_run(&m, &long, None) {
        Err(ContractError::Event(e)) => assert!(e.message().contains("at most 256"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn events_files_with_mistakes_are_refused_at_their_line() {
    let m = load("poc-activation");
    for (text, line) in [
        ("{\"at_ms\": 1, \"on\": \"signal\", \"name\": \"poc_report_signed\"}\n{\"at_ms\": 0, \"complete\": \"x\"}", 2),
        ("{\"at_ms\": 1, \"complete\": \"nothing_pending\"}", 1),
        ("{\"at_ms\": 1, \"on\": \"sunset\"}", 1),
        ("{\"at_ms\": 1, \"name\": \"x\"}", 1),
        ("not json", 1),
        ("{\"at_ms\": 1, \"on\": \"signal\", \"name\": \"bad name\"}", 1),
        ("{\"at_ms\": 1, \"on\": \"signal\", \"name\": \"n\", \"extra\": 1}", 1),
    ] {
        match dry_run(&m, text, None) {
            Err(ContractError::Event(e)) => assert_eq!(e.line(), line, "{e}"),
            other => panic!("{text}: {other:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any text is a manifest or an error, never a panic.
    #[test]
    fn arbitrary_manifest_text_never_panics(s in ".{0,400}") {
        let _ = Manifest::parse("p.toml", &s, None, &AnyField);
        let _ = Manifest::parse("p.toml", &format!("{BASE}{s}"), None, &AnyField);
    }

    /// Any condition text compiles or is refused, and a compiled one
    /// evaluates or errs, never panics.
    #[test]
    fn arbitrary_conditions_never_panic(s in "[a-z_.()!&|<>=+\\-*/%'\"0-9 \\[\\]{}?:,]{0,80}") {
        let text = format!("condition = {}\n{BASE}", toml_string(&s));
        if let Ok(m) = Manifest::parse("p.toml", &text, None, &AnyField) {
            let _ = evaluate(&m, &ping(), 0);
        }
    }

    /// Any bytes are a guest or an error, never a panic.
    #[test]
    fn arbitrary_guest_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Manifest::parse("p.toml", &guest_manifest(1000, 1), Some(&b), &AnyField);
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}
