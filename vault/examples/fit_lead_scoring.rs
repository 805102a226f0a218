//! Fits the lead-scoring workload's weights offline on the synthetic data
//! set: logistic regression by full-batch gradient descent on the features
//! exactly as the sandbox sees them (quantised), then scaled to the integer
//! weights the encrypted model uses (logit = score / 1000).
//!
//! `cargo run -p sovra-vault --example fit_lead_scoring`

use sovra_vault::synthetic;

fn main() {
    let customers = synthetic::generate(2026, 20_000);
    let rows: Vec<([f64; 3], f64)> = customers
        .iter()
        .map(|c| {
            (
                [
                    (c.budget / 10_000) as f64,
                    c.purchase_count as f64,
                    (c.whitepaper_dwell_s / 60) as f64,
                ],
                if c.converted { 1.0 } else { 0.0 },
            )
        })
        .collect();
    // Standardise for the descent, then map back.
    let n = rows.len() as f64;
    let mut mean = [0.0; 3];
    let mut sd = [0.0; 3];
    for (x, _) in &rows {
        for i in 0..3 {
            mean[i] += x[i] / n;
        }
    }
    for (x, _) in &rows {
        for i in 0..3 {
            sd[i] += (x[i] - mean[i]).powi(2) / n;
        }
    }
    for s in &mut sd {
        *s = s.sqrt();
    }
    let mut b = 0.0;
    let mut w = [0.0; 3];
    for _ in 0..3000 {
        let mut gb = 0.0;
        let mut gw = [0.0; 3];
        for (x, y) in &rows {
            let z: f64 = b + (0..3).map(|i| w[i] * (x[i] - mean[i]) / sd[i]).sum::<f64>();
            let err = 1.0 / (1.0 + (-z).exp()) - y;
            gb += err / n;
            for i in 0..3 {
                gw[i] += err * (x[i] - mean[i]) / sd[i] / n;
            }
        }
        b -= 0.5 * gb;
        for i in 0..3 {
            w[i] -= 0.5 * gw[i];
        }
    }
    let raw: Vec<f64> = (0..3).map(|i| w[i] / sd[i]).collect();
    let bias = b - (0..3).map(|i| raw[i] * mean[i]).sum::<f64>();
    let scale = 1000.0;
    let names = ["budget", "purchase_count", "whitepaper_dwell_s"];
    let positives = rows.iter().filter(|(_, y)| *y > 0.5).count();
    println!(
        "fitted on {} synthetic customers ({positives} converted)",
        rows.len()
    );
    println!(
        "logit = {bias:.4} + {}",
        (0..3)
            .map(|i| format!("{:.5}·{}", raw[i], names[i]))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    println!("scale = {scale}");
    println!("bias = {}", (bias * scale).round());
    for i in 0..3 {
        println!("{} = {}", names[i], (raw[i] * scale).round());
    }
}
