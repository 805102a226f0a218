//! The CRM module's contracts, as shipped in `contracts/crm/` and compiled
//! into this crate (the demo and tests use them without the repository).

/// One shipped contract: its manifest, its guest module (if any) and the
/// events file of its dry run.
#[derive(Debug, Clone, Copy)]
pub struct Shipped {
    /// The manifest's file name.
    pub file: &'static str,
    /// The manifest.
    pub manifest: &'static str,
    /// The guest module (WebAssembly text), if the manifest names one.
    pub guest: Option<&'static str>,
    /// The dry run's events file.
    pub events: &'static str,
}

/// The four CRM contracts.
pub const CONTRACTS: [Shipped; 4] = [
    Shipped {
        file: "poc-activation.toml",
        manifest: include_str!("../crm/poc-activation.toml"),
        guest: None,
        events: include_str!("../crm/events/poc-activation.jsonl"),
    },
    Shipped {
        file: "gov-export-approvals.toml",
        manifest: include_str!("../crm/gov-export-approvals.toml"),
        guest: None,
        events: include_str!("../crm/events/gov-export-approvals.jsonl"),
    },
    Shipped {
        file: "lead-score-alert.toml",
        manifest: include_str!("../crm/lead-score-alert.toml"),
        guest: Some(include_str!("../crm/lead-score-alert.wat")),
        events: include_str!("../crm/events/lead-score-alert.jsonl"),
    },
    Shipped {
        file: "marketing-consent-stop.toml",
        manifest: include_str!("../crm/marketing-consent-stop.toml"),
        guest: None,
        events: include_str!("../crm/events/marketing-consent-stop.jsonl"),
    },
];
