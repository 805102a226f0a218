//! The policy crate through its public API: broken policy sets are refused
//! with located messages, hostile request input never yields an allow, and
//! arbitrary policy text never panics the loader.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use sovra_policy::{
    Action, Context, CustomerAttrs, Disclosure, FieldAttrs, Policies, PolicyError, Principal,
    PrincipalKind, DEFAULT_FILES,
};

fn defaults_with(name: &str, text: &str) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = DEFAULT_FILES
        .iter()
        .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
        .collect();
    files.push((name.to_owned(), text.to_owned()));
    files
}

fn problems(files: Vec<(String, String)>) -> Vec<(String, usize, String)> {
    match Policies::from_files(files) {
        Err(PolicyError::Invalid(e)) => e
            .problems()
            .iter()
            .map(|p| (p.file().to_owned(), p.line(), p.message().to_owned()))
            .collect(),
        other => panic!("expected an invalid set, got {other:?}"),
    }
}

#[test]
fn syntax_error_names_file_and_line() {
    let p = problems(defaults_with(
        "99-broken.cedar",
        "// fine\n@id(\"x\")\npermit (principal, action, resource)\nwhen { 1 + };\n",
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "99-broken.cedar");
    assert_eq!(p[0].1, 4, "{p:?}");
}

#[test]
fn type_error_names_file_line_and_policy() {
    let p = problems(defaults_with(
        "99-typo.cedar",
        "\n\n@id(\"typo\")\npermit (principal is Sovra::Service, action == Sovra::Action::\"read\", resource is Sovra::Field)\nwhen { resource.sensitivty == \"public\" };\n",
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "99-typo.cedar");
    assert!(p[0].1 >= 3, "{p:?}");
    assert!(p[0].2.contains("typo"), "{p:?}");
    assert!(p[0].2.contains("sensitivty"), "{p:?}");
}

#[test]
fn unknown_entity_type_and_action_are_refused() {
    let p = problems(defaults_with(
        "99-unknown.cedar",
        "@id(\"u\")\npermit (principal is Sovra::Root, action == Sovra::Action::\"read\", resource);\n@id(\"v\")\npermit (principal, action == Sovra::Action::\"export_everything\", resource);\n",
    ));
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(p[0].1, 2);
    assert_eq!(p[1].1, 4);
}

#[test]
fn ids_are_required_unique_and_plain() {
    let p = problems(defaults_with(
        "99-ids.cedar",
        "permit (principal, action, resource);\n\n@id(\"service-read\")\npermit (principal, action, resource);\n@id(\"has space\")\npermit (principal, action, resource);\n",
    ));
    assert_eq!(p.len(), 3, "{p:?}");
    assert!(p[0].2.contains("no `@id"), "{p:?}");
    assert_eq!(p[0].1, 1);
    assert!(
        p[1].2.contains("duplicate policy id `service-read`"),
        "{p:?}"
    );
    assert_eq!(p[1].1, 3);
    assert!(p[2].2.contains("policy id must be"), "{p:?}");
}

#[test]
fn templates_and_empty_sets_are_refused() {
    let p = problems(defaults_with(
        "99-template.cedar",
        "@id(\"t\")\npermit (principal == ?principal, action, resource);\n",
    ));
    assert!(p[0].2.contains("templates"), "{p:?}");
    let p = problems(Vec::new());
    assert!(p[0].2.contains("no `.cedar` files"), "{p:?}");
}

#[test]
fn directories_load_in_name_order_and_hash_their_contents() {
    let dir = tempfile::tempdir().unwrap();
    for (n, t) in DEFAULT_FILES {
        std::fs::write(dir.path().join(n), t).unwrap();
    }
    std::fs::write(dir.path().join("README.txt"), "not a policy").unwrap();
    let a = Policies::load_dir(dir.path()).unwrap();
    assert_eq!(a.sha256_hex(), Policies::embedded().unwrap().sha256_hex());
    assert_eq!(a.files().len(), DEFAULT_FILES.len());
    std::fs::write(
        dir.path().join("20-sensitive.cedar"),
        DEFAULT_FILES[2]
            .1
            .replace("// Least privilege", "//  Least privilege"),
    )
    .unwrap();
    let b = Policies::load_dir(dir.path()).unwrap();
    assert_ne!(a.sha256_hex(), b.sha256_hex());
    std::fs::write(dir.path().join("big.cedar"), vec![b' '; (1 << 20) + 1]).unwrap();
    let e = Policies::load_dir(dir.path()).unwrap_err();
    assert!(matches!(e, PolicyError::Io(_)), "{e}");
    assert!(e.to_string().contains("big.cedar"), "{e}");
    let e = Policies::load_dir(&dir.path().join("missing")).unwrap_err();
    assert!(matches!(e, PolicyError::Io(_)), "{e}");
}

fn field(name: &str, sensitivity: &str, dept: &str, purposes: &[&str]) -> FieldAttrs {
    FieldAttrs {
        name: name.into(),
        sensitivity: sensitivity.into(),
        department: dept.into(),
        purposes: purposes.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn principal(kind: PrincipalKind, dept: &str, purposes: &[&str]) -> Principal {
    Principal {
        kind,
        name: "p".into(),
        department: dept.into(),
        purposes: purposes.iter().map(|s| (*s).to_owned()).collect(),
    }
}

#[test]
fn contract_actions_are_for_the_contract_s_purpose_and_the_customer_s_consent() {
    let pol = Policies::embedded().unwrap();
    let consenting = CustomerAttrs {
        consents: ["marketing".to_owned()].into(),
        ..CustomerAttrs::default()
    };
    let withdrawn = CustomerAttrs {
        withdrawn: ["marketing".to_owned()].into(),
        ..CustomerAttrs::default()
    };
    let decide = |p: &Principal, c: &CustomerAttrs, a: Action, purpose: &str| {
        let scope = pol.scope(p, "t", c, &[]).unwrap();
        let ctx = Context {
            purpose: purpose.into(),
            ..Context::default()
        };
        pol.decide(&scope, a, None, &ctx).unwrap().allowed()
    };
    let acts = [Action::Notify, Action::CreateTask, Action::RequestApprovals];
    // A customer-service contract acts for customer service, not marketing.
    let cs = principal(
        PrincipalKind::Workload,
        "customer_success",
        &["customer_service"],
    );
    for a in acts {
        assert!(
            decide(&cs, &CustomerAttrs::default(), a, "customer_service"),
            "{a:?}"
        );
        assert!(!decide(&cs, &consenting, a, "marketing"), "{a:?}");
    }
    // A marketing contract needs the consent, and a withdrawal stops it;
    // cancelling stays allowed, since it honours the withdrawal.
    let mk = principal(PrincipalKind::Workload, "marketing", &["marketing"]);
    for a in acts {
        assert!(
            !decide(&mk, &CustomerAttrs::default(), a, "marketing"),
            "{a:?}"
        );
        assert!(decide(&mk, &consenting, a, "marketing"), "{a:?}");
        assert!(!decide(&mk, &withdrawn, a, "marketing"), "{a:?}");
    }
    assert!(decide(&mk, &withdrawn, Action::CancelActions, "marketing"));
    // Cancelling is decided for the purpose it cancels: another purpose's
    // obligations only when the customer withdrew that purpose.
    let legal = principal(PrincipalKind::Workload, "compliance", &["legal_obligation"]);
    assert!(decide(
        &legal,
        &withdrawn,
        Action::CancelActions,
        "marketing"
    ));
    assert!(!decide(
        &legal,
        &consenting,
        Action::CancelActions,
        "marketing"
    ));
    assert!(!decide(
        &legal,
        &CustomerAttrs::default(),
        Action::CancelActions,
        "export"
    ));
    // Only contracts take contract actions.
    for kind in [
        PrincipalKind::Service,
        PrincipalKind::Officer,
        PrincipalKind::Partner,
        PrincipalKind::Admin,
    ] {
        let p = principal(kind, "customer_success", &["customer_service"]);
        for a in acts.into_iter().chain([Action::CancelActions]) {
            assert!(
                !decide(&p, &consenting, a, "customer_service"),
                "{kind:?} {a:?}"
            );
        }
    }
}

#[test]
fn government_export_needs_three_approvals() {
    let pol = Policies::embedded().unwrap();
    let svc = principal(PrincipalKind::Service, "sales", &["export"]);
    let f = field("company", "internal", "sales", &["export"]);
    let gov = CustomerAttrs {
        kind: "government".into(),
        contract_value: 5_000_001,
        ..CustomerAttrs::default()
    };
    let scope = pol.scope(&svc, "t", &gov, &[&f]).unwrap();
    for (approvals, expect) in [
        (0, Disclosure::Denied),
        (2, Disclosure::Denied),
        (3, Disclosure::Plaintext),
    ] {
        let ctx = Context {
            purpose: "export".into(),
            approvals,
            ..Context::default()
        };
        let d = pol.read_fields(&scope, &[&f], &ctx).unwrap();
        assert_eq!(d[0].disclosure, expect, "{approvals}: {}", d[0].summary());
        if expect == Disclosure::Denied {
            assert!(d[0]
                .determining()
                .contains(&"government-export-three-approvals".to_owned()));
        }
    }
    // At the threshold, or for other kinds, no approvals are needed.
    for (kind, value) in [("government", 5_000_000), ("enterprise", 9_000_000)] {
        let c = CustomerAttrs {
            kind: kind.into(),
            contract_value: value,
            ..CustomerAttrs::default()
        };
        let scope = pol.scope(&svc, "t", &c, &[&f]).unwrap();
        let ctx = Context {
            purpose: "export".into(),
            ..Context::default()
        };
        let d = pol.read_fields(&scope, &[&f], &ctx).unwrap();
        assert_eq!(d[0].disclosure, Disclosure::Plaintext, "{kind} {value}");
    }
}

#[test]
fn a_field_outside_the_scope_is_an_error_not_an_allow() {
    let pol = Policies::embedded().unwrap();
    let svc = principal(PrincipalKind::Service, "sales", &["billing"]);
    let scope = pol
        .scope(&svc, "t", &CustomerAttrs::default(), &[])
        .unwrap();
    let ctx = Context::default();
    assert!(pol
        .decide(&scope, Action::Read, Some("phone"), &ctx)
        .is_err());
    assert!(pol.decide(&scope, Action::Read, None, &ctx).is_err());
}

fn kinds() -> impl Strategy<Value = PrincipalKind> {
    prop::sample::select(PrincipalKind::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Whatever the purpose string, principal name, department or customer
    /// attributes: partners never get plaintext, officers and admins never
    /// read field values, contracts read only for their purpose, and nobody
    /// but admins erases.
    #[test]
    fn hostile_request_input_never_allows_what_roles_forbid(
        kind in kinds(),
        name in "\\PC{0,300}",
        dept in "\\PC{0,40}",
        purpose in prop_oneof![Just("customer_service".to_owned()), "\\PC{0,2000}"],
        consents in prop::collection::btree_set("\\PC{0,20}", 0..4),
        sens in prop::sample::select(vec!["public", "internal", "personal", "sensitive", "", "SENSITIVE\u{0}"]),
        kind_s in "\\PC{0,20}",
        value in any::<i64>(),
        approvals in any::<i64>(),
    ) {
        let pol = Policies::embedded().unwrap();
        let mut purposes: BTreeSet<String> = consents.clone();
        purposes.insert(purpose.clone());
        let p = Principal { kind, name, department: dept.clone(), purposes: purposes.clone() };
        let f = FieldAttrs { name: "national_id".into(), sensitivity: sens.into(), department: dept, purposes };
        let c = CustomerAttrs { consents, withdrawn: BTreeSet::new(), kind: kind_s, contract_value: value };
        let scope = pol.scope(&p, "t", &c, &[&f]).unwrap();
        let ctx = Context { purpose, time_ms: 0, approvals, cohort_size: 0 };
        let d = pol.read_fields(&scope, &[&f], &ctx).unwrap();
        match kind {
            PrincipalKind::Partner => prop_assert_ne!(d[0].disclosure, Disclosure::Plaintext),
            PrincipalKind::Officer | PrincipalKind::Admin => {
                prop_assert_eq!(d[0].disclosure, Disclosure::Denied)
            }
            // A contract reads for its own purpose only, and sees a
            // sensitive field in the clear only in the owning department.
            PrincipalKind::Workload => {
                if d[0].disclosure != Disclosure::Denied {
                    prop_assert!(p.purposes.contains(&ctx.purpose));
                }
                if d[0].disclosure == Disclosure::Plaintext && f.sensitivity == "sensitive" {
                    prop_assert_eq!(&p.department, &f.department);
                }
            }
            PrincipalKind::Service => {}
        }
        let erase = pol.decide(&scope, Action::Erase, None, &ctx).unwrap();
        prop_assert_eq!(erase.allowed(), kind == PrincipalKind::Admin);
        let keys = pol.decide(&scope, Action::ManageKeys, None, &ctx).unwrap();
        prop_assert_eq!(keys.allowed(), kind == PrincipalKind::Admin);
        // Contract actions: only a workload, only for a purpose it holds.
        for a in [Action::Notify, Action::CreateTask, Action::RequestApprovals, Action::CancelActions] {
            let d = pol.decide(&scope, a, None, &ctx).unwrap();
            if d.allowed() {
                prop_assert_eq!(kind, PrincipalKind::Workload);
                prop_assert!(p.purposes.contains(&ctx.purpose));
            }
        }
    }

    /// A purpose the principal may not declare, or the field does not
    /// allow, is never an allow.
    #[test]
    fn undeclared_purposes_never_allow(purpose in "\\PC{0,64}") {
        let pol = Policies::embedded().unwrap();
        prop_assume!(purpose != "customer_service");
        let p = principal(PrincipalKind::Service, "legal", &["customer_service"]);
        let f = field("national_id", "sensitive", "legal", &["customer_service"]);
        let scope = pol.scope(&p, "t", &CustomerAttrs::default(), &[&f]).unwrap();
        let ctx = Context { purpose, ..Context::default() };
        let d = pol.read_fields(&scope, &[&f], &ctx).unwrap();
        prop_assert_eq!(d[0].disclosure, Disclosure::Denied);
        for a in [Action::Search, Action::Compute, Action::Write] {
            let _ = pol.decide(&scope, a, Some("national_id"), &ctx).unwrap();
        }
    }

    /// Arbitrary bytes as a policy file: a clear error or a valid set, never
    /// a panic; and a set with a broken file never loads.
    #[test]
    fn arbitrary_policy_text_never_panics(text in "\\PC{0,400}") {
        match Policies::from_files(defaults_with("99-fuzz.cedar", &text)) {
            Ok(_) => {}
            Err(PolicyError::Invalid(e)) => {
                prop_assert!(!e.problems().is_empty());
                prop_assert!(e.to_string().contains("99-fuzz.cedar"));
            }
            Err(e) => prop_assert!(false, "unexpected error kind: {e}"),
        }
    }

    /// Mutations of a real policy file (deleted, duplicated or swapped
    /// characters) are either valid or refused with a location.
    #[test]
    fn mutated_policy_files_are_located(i in 0usize..2000, op in 0u8..3, c in "[a-z(){};\"=!&|@ ]") {
        let (name, text) = DEFAULT_FILES[1];
        let mut chars: Vec<char> = text.chars().collect();
        let i = i % chars.len();
        match op {
            0 => { chars.remove(i); }
            1 => { chars.insert(i, c.chars().next().unwrap()); }
            _ => { chars[i] = c.chars().next().unwrap(); }
        }
        let mutated: String = chars.into_iter().collect();
        let mut files: Vec<(String, String)> = DEFAULT_FILES.iter().map(|(n, t)| ((*n).to_owned(), (*t).to_owned())).collect();
        files[1] = (name.to_owned(), mutated);
        if let Err(PolicyError::Invalid(e)) = Policies::from_files(files) {
            for p in e.problems() {
                prop_assert!(p.file() == name || p.file().ends_with(".cedar"), "{}", p);
            }
        }
    }
}
