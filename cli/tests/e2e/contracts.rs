//! `sovra contract validate` and `sovra contract test`, the real binary on
//! the shipped CRM contracts and on broken manifests, events files and
//! guests: exit codes, `file:line` errors, and the dry run's report.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::SOVRA;

fn sovra(args: &[&str]) -> Output {
    Command::new(SOVRA).args(args).output().unwrap()
}

fn crm(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contracts/crm")
        .join(name)
        .to_str()
        .unwrap()
        .to_owned()
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_shipped_contracts_validate_and_pin_their_guest() {
    for name in [
        "poc-activation",
        "gov-export-approvals",
        "lead-score-alert",
        "marketing-consent-stop",
    ] {
        let o = sovra(&["contract", "validate", &crm(&format!("{name}.toml"))]);
        assert!(o.status.success(), "{name}: {}", out(&o));
        assert!(
            out(&o).starts_with(&format!("OK: contract {name} v1")),
            "{}",
            out(&o)
        );
    }
    let o = sovra(&["contract", "validate", &crm("lead-score-alert.toml")]);
    assert!(out(&o).contains("a guest module"), "{}", out(&o));
}

#[test]
fn the_poc_dry_run_shows_the_missed_obligation_escalated() {
    let o = sovra(&[
        "contract",
        "test",
        &crm("poc-activation.toml"),
        "--events",
        &crm("events/poc-activation.jsonl"),
    ]);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("completed send_activation_link"), "{text}");
    assert!(
        text.contains("raise_receivable due 1700259200000: escalated at 1700259200000 to department:customer_success_director"),
        "{text}"
    );
    // Only the first three lines, as of a time before the deadline: the
    // receivable is still pending; as of a time after it, escalated.
    let lines: Vec<String> = std::fs::read_to_string(crm("events/poc-activation.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with('{'))
        .take(3)
        .map(str::to_owned)
        .collect();
    let (_d, events) = scratch(&[("e.jsonl", &lines.join("\n"))]);
    let outcomes = |until: &str| -> Vec<String> {
        let o = sovra(&[
            "contract",
            "test",
            &crm("poc-activation.toml"),
            "--events",
            events.to_str().unwrap(),
            "--until",
            until,
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["obligations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["outcome"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(outcomes("1700100000000"), ["kept", "kept", "pending"]);
    assert_eq!(outcomes("1700300000000"), ["kept", "kept", "escalated"]);
}

#[test]
fn the_dry_run_decides_each_action_with_the_policies_for_the_contract_s_principal() {
    let o = sovra(&[
        "contract",
        "test",
        &crm("lead-score-alert.toml"),
        "--events",
        &crm("events/lead-score-alert.jsonl"),
        "--json",
    ]);
    assert!(o.status.success(), "{}", out(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let decisions: Vec<(bool, String)> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["evaluation"]["actions"].as_array())
        .flatten()
        .map(|a| {
            (
                a["decision"]["allowed"].as_bool().unwrap(),
                a["decision"]["policies"].to_string(),
            )
        })
        .collect();
    // The consenting hot lead's alert is allowed; the one who withdrew
    // consent to lead scoring is denied by the consent rules, not taken,
    // and sets no deadline.
    assert_eq!(decisions.len(), 2, "{decisions:?}");
    assert!(decisions[0].0 && decisions[0].1.contains("contract-act-for-its-purpose"));
    assert!(!decisions[1].0 && decisions[1].1.contains("contract-consent-withdrawn"));
    assert_eq!(v["obligations"].as_array().unwrap().len(), 1);

    // A policy directory without the contract rules: every action is denied.
    let d = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if !p.ends_with("95-contracts.cedar") {
            std::fs::copy(&p, d.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let trigger = "{\"at_ms\": 1, \"on\": \"signal\", \"name\": \"poc_report_signed\"}\n";
    let (_e, events) = scratch(&[("e.jsonl", trigger)]);
    let o = sovra(&[
        "contract",
        "test",
        &crm("poc-activation.toml"),
        "--events",
        events.to_str().unwrap(),
        "--policies",
        d.path().to_str().unwrap(),
    ]);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert_eq!(text.matches("DENIED").count(), 3, "{text}");
    assert!(!text.contains("obligations:"), "{text}");
}

fn scratch(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    let p = d.path().join(files[0].0);
    (d, p)
}

#[test]
fn broken_manifests_guests_and_events_exit_non_zero_naming_file_and_line() {
    let good = std::fs::read_to_string(crm("lead-score-alert.toml")).unwrap();
    let wat = std::fs::read_to_string(crm("lead-score-alert.wat")).unwrap();

    // An unknown capability, at its line.
    let bad = good.replace("\"set_timer\"]", "\"set_timer\", \"delete_everything\"]");
    let (_d, p) = scratch(&[("c.toml", &bad), ("lead-score-alert.wat", &wat)]);
    let o = sovra(&["contract", "validate", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let text = out(&o);
    assert!(text.contains("c.toml:9:"), "{text}");
    assert!(
        text.contains("unknown capability `delete_everything`"),
        "{text}"
    );

    // A guest that imports WASI.
    let wasi = wat.replace(
        "(import \"sovra\" \"emit\"",
        "(import \"wasi\" \"fd_write\"",
    );
    let (_d, p) = scratch(&[("c.toml", &good), ("lead-score-alert.wat", &wasi)]);
    let o = sovra(&["contract", "validate", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("wasi.fd_write"), "{}", out(&o));

    // A missing guest file.
    let (_d, p) = scratch(&[("c.toml", &good)]);
    let o = sovra(&["contract", "validate", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("lead-score-alert.wat"), "{}", out(&o));

    // A condition that does not type-check.
    let gov = std::fs::read_to_string(crm("gov-export-approvals.toml")).unwrap();
    let bad = gov.replace(
        "fields.contract_value > 5000000",
        "fields.contract_value > 'big'",
    );
    let (_d, p) = scratch(&[("g.toml", &bad)]);
    let o = sovra(&["contract", "validate", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out(&o).contains("g.toml:10:13: condition: `>` cannot take (int, string)"),
        "{}",
        out(&o)
    );

    // An events file with a bad line: usage error (64) naming the line.
    let (_d, e) = scratch(&[("e.jsonl", "{\"at_ms\": 1, \"on\": \"signal\", \"name\": \"lead_scored\", \"attrs\": {\"score\": 900}}\n{\"at_ms\": 2, \"on\": \"meteor\"}\n")]);
    let o = sovra(&[
        "contract",
        "test",
        &crm("lead-score-alert.toml"),
        "--events",
        e.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(64), "{}", out(&o));
    assert!(out(&o).contains("line 2"), "{}", out(&o));

    // A guest that fails on one event fails that instance, not the run.
    let (_d, e) = scratch(&[("e.jsonl", "{\"at_ms\": 1, \"on\": \"signal\", \"name\": \"lead_scored\"}\n{\"at_ms\": 2, \"on\": \"signal\", \"name\": \"lead_scored\", \"attrs\": {\"score\": 900}}\n")]);
    let o = sovra(&[
        "contract",
        "test",
        &crm("lead-score-alert.toml"),
        "--events",
        e.to_str().unwrap(),
    ]);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("FAILED instance: guest failed: `run` returned 1"),
        "{text}"
    );
    assert!(text.contains("notify alert_rep (guest)"), "{text}");
}
