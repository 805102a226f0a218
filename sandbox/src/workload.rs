//! Registered guest workloads: our own modules (lead scoring, lead tier) run as jobs
//! through the same path, policies and release gate as partner jobs. A
//! workload is a manifest in `sandbox/workloads/` naming its spec, the
//! spec's hash, purpose, features, output class and owning department.
//!
//! Guarantees: a workload loads only if its spec validates against the
//! catalogue and the spec's hash, purpose, output and feature list match
//! what the manifest declares, so a manifest cannot claim one thing and run
//! another.
//!
//! Does not: grant anything; policy decides whether the workload may run.

use crate::error::{InvalidSpecError, Result};
use crate::spec::{self, FeatureInfo, OutputClass, ValidatedSpec};
use serde::Deserialize;

/// The manifests shipped with Sovra: (manifest, spec).
const BUILTIN: &[(&str, &str, &str)] = &[
    (
        "lead_scoring",
        include_str!("../workloads/lead_scoring.toml"),
        include_str!("../workloads/lead_scoring.spec.toml"),
    ),
    (
        "lead_tier",
        include_str!("../workloads/lead_tier.toml"),
        include_str!("../workloads/lead_tier.spec.toml"),
    ),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    id: String,
    description: String,
    purpose: String,
    output: OutputClass,
    department: String,
    features: Vec<String>,
    spec: String,
    spec_sha256: String,
}

/// A registered workload.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Its id (also its principal name in policy).
    pub id: String,
    /// What it does.
    pub description: String,
    /// The department that owns it and receives its per-customer output.
    pub department: String,
    /// The file its spec comes from.
    pub spec_file: String,
    /// The spec's source text.
    pub spec_text: String,
    /// The validated spec.
    pub spec: ValidatedSpec,
}

/// Loads a manifest and its spec text, checking one against the other.
pub fn load(manifest: &str, spec_text: &str, catalog: &[FeatureInfo]) -> Result<Workload> {
    let m: RawManifest = toml::from_str(manifest)
        .map_err(|e| InvalidSpecError::error("manifest", e.message().to_owned()))?;
    let spec = spec::parse(spec_text, catalog)?;
    let want = hex::encode(spec.sha256());
    if m.spec_sha256 != want {
        return Err(InvalidSpecError::error(
            format!("manifest {}: spec_sha256", m.id),
            format!(
                "the manifest says {}, the spec hashes to {want}",
                m.spec_sha256
            ),
        ));
    }
    if m.purpose != spec.purpose() || m.output != spec.output() {
        return Err(InvalidSpecError::error(
            format!("manifest {}", m.id),
            "purpose or output differ from the spec's",
        ));
    }
    let mut declared = m.features.clone();
    declared.sort();
    if declared != spec.features() {
        return Err(InvalidSpecError::error(
            format!("manifest {}: features", m.id),
            format!(
                "the manifest declares [{}], the spec uses [{}]",
                declared.join(", "),
                spec.features().join(", ")
            ),
        ));
    }
    Ok(Workload {
        id: m.id,
        description: m.description,
        department: m.department,
        spec_file: m.spec,
        spec_text: spec_text.to_owned(),
        spec,
    })
}

/// The shipped workloads, validated against `catalog`.
pub fn builtin(catalog: &[FeatureInfo]) -> Result<Vec<Workload>> {
    BUILTIN
        .iter()
        .map(|(_, manifest, spec)| load(manifest, spec, catalog))
        .collect()
}
