//! Terminal views of sandbox jobs: a progress bar and result tables. What
//! they print comes from the release gate's answer; nothing is decrypted
//! here.

use sovra_proto::sandbox::v1 as pb;

/// The state's name (`RUNNING`).
pub fn state(j: &pb::Job) -> &'static str {
    pb::JobState::try_from(j.state)
        .map(|s| s.as_str_name().trim_start_matches("JOB_STATE_"))
        .unwrap_or("UNKNOWN")
}

/// One line: a 30-character bar of work done (blocks, or customers for
/// bootstrapped jobs), the state and the cohort.
pub fn progress_line(j: &pb::Job) -> String {
    let width = 30u64;
    let finished = j.state >= pb::JobState::Succeeded as i32;
    let filled = (j.blocks_done.min(j.blocks_total) * width)
        .checked_div(j.blocks_total)
        .unwrap_or(if finished { width } else { 0 });
    format!(
        "[{}{}] {}/{} {}  {:<9}  cohort {} (excluded {})",
        "#".repeat(filled as usize),
        ".".repeat((width - filled) as usize),
        j.blocks_done,
        j.blocks_total,
        if j.progress_unit.is_empty() {
            "blocks"
        } else {
            j.progress_unit.as_str()
        },
        state(j),
        j.cohort_size,
        j.excluded
    )
}

/// A job's summary.
pub fn job(j: &pb::Job) -> String {
    let mut s = format!(
        "job {}  {}  ({}, purpose {}, {} output)\n  spec sha256 {}\n  submitted by {}; cohort {} customers, {} excluded by consent or policy\n",
        j.job_id,
        state(j),
        j.name,
        j.purpose,
        j.output_class,
        j.spec_sha256,
        j.submitted_by,
        j.cohort_size,
        j.excluded
    );
    if j.bootstraps_per_customer > 0 {
        s.push_str(&format!(
            "  {} programmable bootstraps per customer\n",
            j.bootstraps_per_customer
        ));
    }
    if j.eval_micros > 0 {
        s.push_str(&format!(
            "  evaluated on ciphertexts in {:.1} ms\n",
            j.eval_micros as f64 / 1000.0
        ));
    }
    if !j.error.is_empty() {
        s.push_str(&format!("  error: {}\n", j.error));
    }
    s
}

/// A released result: the aggregate, or the first `limit` scores.
pub fn result(r: &pb::JobResult, limit: usize) -> String {
    let mut s = String::new();
    if let Some(a) = &r.aggregate {
        if a.op == "histogram" {
            s.push_str(&format!("  histogram over {} customers\n", a.sum));
            for (i, n) in a.buckets.iter().enumerate() {
                let range = match (
                    i.checked_sub(1).and_then(|p| a.edges.get(p)),
                    a.edges.get(i),
                ) {
                    (None, Some(hi)) => format!("< {hi}"),
                    (Some(lo), Some(hi)) => format!("{lo} .. < {hi}"),
                    (Some(lo), None) => format!(">= {lo}"),
                    (None, None) => "all".to_owned(),
                };
                if a.suppressed.get(i).copied().unwrap_or(false) {
                    s.push_str(&format!(
                        "    {range:<22} withheld (fewer than {} customers, or would reveal such a bucket)\n",
                        a.min_count
                    ));
                } else {
                    s.push_str(&format!("    {range:<22} {n}\n"));
                }
            }
        } else {
            s.push_str(&format!("  {} = {}", a.op, a.value));
            if a.op == "mean" {
                s.push_str(&format!(" (sum {})", a.sum));
            }
            s.push('\n');
        }
    }
    if !r.scores.is_empty() {
        s.push_str(&format!(
            "  {:<14} {:>7} {:>6} {:<7} top features\n",
            "customer", "score", "p", "band"
        ));
        for c in r.scores.iter().take(limit) {
            s.push_str(&format!(
                "  {:<14} {:>7} {:>6.3} {:<7} {}\n",
                c.customer_id,
                c.score,
                c.probability,
                c.band,
                c.top_features.join(", ")
            ));
        }
        if r.scores.len() > limit {
            s.push_str(&format!("  … {} more\n", r.scores.len() - limit));
        }
    }
    s.push_str(&format!(
        "  released to {}; output sha256 {} anchored at ledger entry {}\n",
        r.released_to, r.output_sha256, r.ledger_index
    ));
    s
}
