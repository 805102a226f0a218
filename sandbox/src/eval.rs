//! Evaluation of validated specs on packed feature blocks.
//!
//! Guarantees: only leveled operations (products with cleartexts and
//! cleartext polynomials, sums of ciphertexts and plaintexts, sample
//! extraction): the result of a job is a ciphertext
//! whose noise is within the bound [`crate::spec`] checked, so its
//! decryption is exact. Aggregates stay encrypted until the release gate:
//! each chunk of the cohort is summed inside one ciphertext by multiplying a
//! block by the cleartext polynomial Σ X^(−slot) over the cohort's slots and
//! extracting the constant coefficient, so no per-customer value leaves the
//! ciphertext domain. Work is spread across cores block by block; progress
//! is counted in blocks; cancellation and the wall-time limit are checked
//! between blocks.
//!
//! Trees and histograms need non-linear steps on ciphertexts: they run
//! customer by customer with programmable bootstrapping
//! ([`crate::bootstrap`], [`crate::tree`]), spread across cores, with
//! progress, cancellation and the wall-time limit per customer. A
//! histogram's counts are added up per chunk of at most
//! [`HISTOGRAM_CHUNK`] customers (the noise of that many bootstrap outputs
//! still reads exactly), so the gate decrypts one count per edge and chunk
//! and releases only their totals.
//!
//! Does not: decrypt (no function here takes a secret key), select the
//! cohort (the vault passes it), or bootstrap where it buys no privacy (a
//! logistic's sigmoid runs after the gate's decryption of a score the
//! owning service receives anyway).

use crate::block::FeatureBlock;
use crate::bootstrap::{extract, trivial, BootstrapKey, Bootstrapper, Lwe};
use crate::error::{InvalidSpecError, LimitExceededError, Result, SandboxError};
use crate::params::{self, SLOTS};
use crate::spec::{LinearModel, Model, ValidatedSpec};
use crate::tree;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tfhe::core_crypto::algorithms::polynomial_algorithms::polynomial_wrapping_add_mul_assign;
use tfhe::core_crypto::prelude::*;

/// What evaluation needs besides the ciphertexts: public parameters and,
/// for bootstrapped models, the public bootstrap key. There is deliberately
/// no secret key here, and no way to put one in.
#[derive(Debug, Clone, Default)]
pub struct EvaluationMaterial {
    bootstrap: Option<Arc<BootstrapKey>>,
}

impl EvaluationMaterial {
    /// The material for leveled jobs.
    pub fn new() -> EvaluationMaterial {
        EvaluationMaterial { bootstrap: None }
    }
    /// The material for every job, bootstrapped ones included.
    pub fn with_bootstrap(key: Arc<BootstrapKey>) -> EvaluationMaterial {
        EvaluationMaterial {
            bootstrap: Some(key),
        }
    }
}

/// The most customers whose comparison bits one histogram ciphertext adds
/// up: their sum, at most 63, fits the 7 bits above the 2^57 scale, and
/// the noise of 63 bootstrap outputs stays far inside half that scale.
pub const HISTOGRAM_CHUNK: usize = 63;

/// The encrypted features a job reads, and who is in its cohort.
#[derive(Debug, Default, Clone)]
pub struct JobInput {
    /// Per feature, per block number: the block, or None where no customer
    /// of that block holds the feature (all its slots count as 0).
    pub columns: BTreeMap<String, Vec<Option<FeatureBlock>>>,
    /// Per block number: the cohort's slots in it, sorted, no duplicates.
    pub cohort: Vec<Vec<u16>>,
}

impl JobInput {
    /// Customers in the cohort.
    pub fn cohort_size(&self) -> u64 {
        self.cohort.iter().map(|s| s.len() as u64).sum()
    }
}

/// Limits a job runs under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most customers in a cohort.
    pub max_customers: u64,
    /// Longest a job may run.
    pub max_wall: Duration,
    /// Most memory the job's ciphertexts may take (estimated up front).
    pub max_memory_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_customers: 1_000_000,
            max_wall: Duration::from_secs(600),
            max_memory_bytes: 1 << 30,
        }
    }
}

/// Progress and cancellation, shared with whoever watches the job.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
    cancel: AtomicBool,
    per_customer: AtomicBool,
}

impl Progress {
    /// What [`Progress::get`] counts: `blocks` of 2,048 customers for
    /// leveled jobs, `customers` for bootstrapped ones (tens of bootstraps
    /// each).
    pub fn unit(&self) -> &'static str {
        if self.per_customer.load(Ordering::Relaxed) {
            "customers"
        } else {
            "blocks"
        }
    }
    /// Blocks done and blocks in all.
    pub fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
    /// Asks the job to stop at the next block.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
    /// Whether cancellation was asked for.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// The encrypted score of the cohort's customers in one block.
#[derive(Clone)]
pub struct ScoredBlock {
    /// The block number.
    pub block: usize,
    /// The cohort's slots in it: only these may be released.
    pub slots: Vec<u16>,
    /// bias + Σ weight·feature, in every slot.
    pub score: GlweCiphertextOwned<u64>,
    /// Per feature, weight·feature (kept when the spec asks for an
    /// explanation); None where the block holds no value of the feature.
    pub terms: Terms,
}

/// An aggregate, still encrypted: the sum over the cohort is the sum of the
/// chunks' decryptions (each chunk is within the noise and magnitude
/// bounds on its own).
#[derive(Clone)]
pub struct EncryptedAggregate {
    /// One LWE ciphertext per chunk of the cohort.
    pub chunks: Vec<LweCiphertextOwned<u64>>,
    /// Customers in the cohort.
    pub cohort_size: u64,
}

/// One customer's encrypted output of a bootstrapped model.
#[derive(Clone)]
pub struct CustomerValue {
    /// The block number.
    pub block: usize,
    /// The customer's slot in it.
    pub slot: u16,
    /// The value, encoded v·2^[`tree::OUTPUT_LOG`].
    pub value: Lwe,
}

/// A histogram, still encrypted.
#[derive(Clone)]
pub struct EncryptedHistogram {
    /// Per edge, per chunk of the cohort: how many of the chunk's customers
    /// have a value ≥ the edge, encoded n·2^[`tree::OUTPUT_LOG`].
    pub at_least: Vec<Vec<Lwe>>,
    /// Customers in the cohort.
    pub cohort_size: u64,
}

/// What a job produced, all of it encrypted.
#[derive(Clone)]
pub enum EncryptedOutput {
    /// One score per cohort customer.
    PerCustomer(Vec<ScoredBlock>),
    /// One value over the cohort.
    Aggregate(EncryptedAggregate),
    /// One value per cohort customer, from a tree.
    PerCustomerValue(Vec<CustomerValue>),
    /// Bucket counts over the cohort.
    Histogram(EncryptedHistogram),
}

impl std::fmt::Debug for EncryptedOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncryptedOutput::PerCustomer(b) => write!(f, "PerCustomer({} blocks)", b.len()),
            EncryptedOutput::Aggregate(a) => write!(f, "Aggregate({} chunks)", a.chunks.len()),
            EncryptedOutput::PerCustomerValue(v) => write!(f, "PerCustomerValue({})", v.len()),
            EncryptedOutput::Histogram(h) => write!(f, "Histogram({} edges)", h.at_least.len()),
        }
    }
}

/// Per feature, weight·feature (None where the block holds no value).
type Terms = Vec<(String, Option<GlweCiphertextOwned<u64>>)>;

fn zero_glwe() -> GlweCiphertextOwned<u64> {
    GlweCiphertext::new(
        0u64,
        params::glwe_dimension().to_glwe_size(),
        params::polynomial_size(),
        params::ciphertext_modulus(),
    )
}

/// bias + Σ w·feature over one block, with the per-feature terms if asked.
fn linear_block(
    model: &LinearModel,
    input: &JobInput,
    block: usize,
    keep_terms: bool,
) -> (GlweCiphertextOwned<u64>, Terms) {
    let mut acc = zero_glwe();
    let mut terms = Vec::new();
    for (feature, w) in &model.terms {
        let ct = input
            .columns
            .get(feature)
            .and_then(|c| c.get(block))
            .and_then(Option::as_ref);
        let term = ct.map(|b| {
            let mut t = b.glwe().clone();
            // INVARIANT: every block conforms to the parameter set (checked
            // when it was built or read), so the sizes tfhe asserts on match.
            glwe_ciphertext_cleartext_mul_assign(&mut t, Cleartext(*w as u64));
            glwe_ciphertext_add_assign(&mut acc, &t);
            t
        });
        if keep_terms {
            terms.push((feature.clone(), term));
        }
    }
    if model.bias != 0 {
        let bias = PlaintextList::new(
            params::encode(model.bias),
            PlaintextCount(params::polynomial_size().0),
        );
        glwe_ciphertext_plaintext_list_add_assign(&mut acc, &bias);
    }
    (acc, terms)
}

/// The cleartext polynomial Σ_{j ∈ slots} X^(−j): multiplying a block by it
/// puts the sum of those slots in the constant coefficient.
fn selector(slots: &[u16]) -> PolynomialOwned<u64> {
    let mut p = Polynomial::new(0u64, params::polynomial_size());
    let c = p.as_mut();
    for &j in slots {
        let j = usize::from(j);
        if j == 0 {
            c[0] = c[0].wrapping_add(1);
        } else {
            // X^(−j) = −X^(N−j) in Z[X]/(X^N + 1).
            c[SLOTS - j] = c[SLOTS - j].wrapping_sub(1);
        }
    }
    p
}

fn check_limits(spec: &ValidatedSpec, input: &JobInput, limits: &Limits) -> Result<()> {
    let cohort = input.cohort_size();
    if cohort > limits.max_customers {
        return Err(LimitExceededError::error(
            "customers",
            format!("cohort of {cohort}, limit {}", limits.max_customers),
        ));
    }
    let blocks = input.cohort.iter().filter(|s| !s.is_empty()).count() as u64;
    let glwe_bytes = (SLOTS as u64) * 2 * 8;
    let lwe_bytes = (SLOTS as u64 + 1) * 8;
    let per_block = match spec.model() {
        Model::Aggregate { .. } => 2,
        _ if spec.explain() > 0 => 2 + spec.features().len() as u64,
        _ => 2,
    };
    let mut estimate = blocks * per_block * glwe_bytes;
    if matches!(spec.model(), Model::Tree(_)) {
        estimate += cohort * lwe_bytes;
    }
    if estimate > limits.max_memory_bytes {
        return Err(LimitExceededError::error(
            "memory",
            format!(
                "about {estimate} bytes of ciphertexts, limit {}",
                limits.max_memory_bytes
            ),
        ));
    }
    for (slots, b) in input.cohort.iter().zip(0..) {
        if slots.windows(2).any(|w| w[0] >= w[1]) || slots.iter().any(|&s| usize::from(s) >= SLOTS)
        {
            return Err(LimitExceededError::error(
                "customers",
                format!("block {b}: cohort slots must be sorted, distinct and below {SLOTS}"),
            ));
        }
    }
    Ok(())
}

/// The threads jobs evaluate on: a rayon pool of its own, so that however
/// many jobs run, sandbox evaluation occupies at most this many cores and
/// the host's other work (the vault's request handlers) keeps the rest.
/// Every parallel step of [`run`], and tfhe's own parallelism inside it,
/// stays on the pool it is installed on.
#[derive(Debug)]
pub struct EvalPool {
    pool: rayon::ThreadPool,
}

/// Makes the calling thread the last to get a contended core (nice 19):
/// evaluation is background work, the vault's requests are not. Best
/// effort: without the permission or off Linux, the thread keeps its
/// priority and the pool's size alone bounds it.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // On Linux, PRIO_PROCESS with a thread id sets that thread's nice.
        let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
    }
}

impl EvalPool {
    /// A pool of `threads` threads (at least 1), named `sovra-sandbox-N`.
    pub fn new(threads: usize) -> Result<EvalPool> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("sovra-sandbox-{i}"))
            .start_handler(|_| lower_priority())
            .build()
            .map_err(|e| SandboxError::Pool(e.to_string()))?;
        Ok(EvalPool { pool })
    }

    /// How many threads it has.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// [`run`] on this pool's threads (the caller's thread waits).
    pub fn run(
        &self,
        material: &EvaluationMaterial,
        spec: &ValidatedSpec,
        input: &JobInput,
        progress: &Progress,
        limits: &Limits,
    ) -> Result<EncryptedOutput> {
        self.pool
            .install(|| run(material, spec, input, progress, limits))
    }
}

/// Runs `spec` on `input`. Returns ciphertexts only.
pub fn run(
    material: &EvaluationMaterial,
    spec: &ValidatedSpec,
    input: &JobInput,
    progress: &Progress,
    limits: &Limits,
) -> Result<EncryptedOutput> {
    check_limits(spec, input, limits)?;
    let started = Instant::now();
    let blocks: Vec<usize> = input
        .cohort
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .map(|(b, _)| b)
        .collect();
    progress.total.store(blocks.len() as u64, Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);
    let step = |b: usize| -> Result<usize> {
        if progress.cancelled() {
            return Err(SandboxError::Cancelled);
        }
        if started.elapsed() >= limits.max_wall {
            return Err(LimitExceededError::error(
                "wall_time",
                format!("ran longer than {:?}", limits.max_wall),
            ));
        }
        Ok(b)
    };
    if spec.needs_bootstrap() {
        return run_bootstrapped(material, spec, input, progress, &blocks, &step);
    }
    let Some(model) = spec.linear() else {
        // `count`: the cohort size is the answer and is known in the clear.
        progress.done.store(blocks.len() as u64, Ordering::Relaxed);
        return Ok(EncryptedOutput::Aggregate(EncryptedAggregate {
            chunks: Vec::new(),
            cohort_size: input.cohort_size(),
        }));
    };
    match spec.model() {
        Model::Aggregate { .. } => {
            aggregate(&model, spec, input, progress, &blocks, &step).map(EncryptedOutput::Aggregate)
        }
        _ => score_blocks(&model, spec, input, progress, &blocks, &step)
            .map(EncryptedOutput::PerCustomer),
    }
}

/// Checks for cancellation and the wall-time limit before the work on a
/// block (or a customer of it); passes the block number on.
type Step<'a> = dyn Fn(usize) -> Result<usize> + Sync + 'a;

/// A tree or a histogram: customer by customer, with bootstraps; progress
/// counts customers.
fn run_bootstrapped(
    material: &EvaluationMaterial,
    spec: &ValidatedSpec,
    input: &JobInput,
    progress: &Progress,
    blocks: &[usize],
    step: &Step<'_>,
) -> Result<EncryptedOutput> {
    let key = material
        .bootstrap
        .as_deref()
        .ok_or(SandboxError::NoBootstrapKey)?;
    progress.per_customer.store(true, Ordering::Relaxed);
    progress.total.store(input.cohort_size(), Ordering::Relaxed);
    let customers: Vec<(usize, u16)> = blocks
        .iter()
        .flat_map(|&b| input.cohort[b].iter().map(move |&s| (b, s)))
        .collect();
    let step_customer = |b: usize| -> Result<()> {
        step(b)?;
        progress.done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    };
    match spec.model() {
        Model::Tree(t) => tree_outputs(t, spec, input, key, &customers, &step_customer)
            .map(EncryptedOutput::PerCustomerValue),
        Model::Aggregate { edges, .. } => {
            histogram(spec, edges, input, key, blocks, &customers, &step_customer)
                .map(EncryptedOutput::Histogram)
        }
        // INVARIANT: needs_bootstrap() is true only for the two above.
        _ => Err(InvalidSpecError::error("model", "not a bootstrapped model")),
    }
}

/// A leveled aggregate: the cohort's scores summed per chunk of at most
/// [`ValidatedSpec::aggregate_chunk`] customers, one LWE ciphertext each.
fn aggregate(
    model: &LinearModel,
    spec: &ValidatedSpec,
    input: &JobInput,
    progress: &Progress,
    blocks: &[usize],
    step: &Step<'_>,
) -> Result<EncryptedAggregate> {
    let chunk = spec.aggregate_chunk();
    // Split the cohort into pieces of at most `chunk` customers that
    // never straddle a block, then add pieces into chunks.
    let mut pieces: Vec<(usize, &[u16])> = Vec::new();
    for &b in blocks {
        for piece in input.cohort[b].chunks(chunk.min(SLOTS)) {
            pieces.push((b, piece));
        }
    }
    let products: Vec<(usize, GlweCiphertextOwned<u64>)> = pieces
        .par_iter()
        .map(|&(b, slots)| {
            step(b)?;
            let (score, _) = linear_block(model, input, b, false);
            let sel = selector(slots);
            let mut out = zero_glwe();
            for (mut o, i) in out
                .as_mut_polynomial_list()
                .iter_mut()
                .zip(score.as_polynomial_list().iter())
            {
                polynomial_wrapping_add_mul_assign(&mut o, &i, &sel);
            }
            progress.done.fetch_add(1, Ordering::Relaxed);
            Ok((slots.len(), out))
        })
        .collect::<Result<_>>()?;
    progress
        .total
        .store(progress.done.load(Ordering::Relaxed), Ordering::Relaxed);
    Ok(EncryptedAggregate {
        chunks: add_into_chunks(products, chunk),
        cohort_size: input.cohort_size(),
    })
}

/// Adds the pieces' products (each with its number of customers) into
/// chunks of at most `chunk` customers and extracts each chunk's sum.
fn add_into_chunks(
    products: Vec<(usize, GlweCiphertextOwned<u64>)>,
    chunk: usize,
) -> Vec<LweCiphertextOwned<u64>> {
    let mut chunks = Vec::new();
    let mut acc = zero_glwe();
    let mut used = 0usize;
    let lwe_size = params::glwe_dimension()
        .to_equivalent_lwe_dimension(params::polynomial_size())
        .to_lwe_size();
    let flush = |acc: &GlweCiphertextOwned<u64>, chunks: &mut Vec<_>| {
        let mut lwe = LweCiphertext::new(0u64, lwe_size, params::ciphertext_modulus());
        extract_lwe_sample_from_glwe_ciphertext(acc, &mut lwe, MonomialDegree(0));
        chunks.push(lwe);
    };
    for (n, p) in products {
        if used + n > chunk {
            flush(&acc, &mut chunks);
            acc = zero_glwe();
            used = 0;
        }
        glwe_ciphertext_add_assign(&mut acc, &p);
        used += n;
    }
    if used > 0 {
        flush(&acc, &mut chunks);
    }
    chunks
}

/// A linear or logistic score per block, with the per-feature terms if the
/// spec asks for an explanation.
fn score_blocks(
    model: &LinearModel,
    spec: &ValidatedSpec,
    input: &JobInput,
    progress: &Progress,
    blocks: &[usize],
    step: &Step<'_>,
) -> Result<Vec<ScoredBlock>> {
    let keep = spec.explain() > 0;
    blocks
        .par_iter()
        .map(|&b| {
            step(b)?;
            let (score, terms) = linear_block(model, input, b, keep);
            progress.done.fetch_add(1, Ordering::Relaxed);
            Ok(ScoredBlock {
                block: b,
                slots: input.cohort[b].clone(),
                score,
                terms,
            })
        })
        .collect::<Result<Vec<_>>>()
}

/// A customer's feature as a ciphertext: the slot of its block, or a
/// public zero where the block holds no value of the feature.
fn feature_lwe(input: &JobInput, feature: &str, block: usize, slot: u16) -> Lwe {
    input
        .columns
        .get(feature)
        .and_then(|c| c.get(block))
        .and_then(Option::as_ref)
        .map_or_else(|| trivial(0), |b| extract(b.glwe(), usize::from(slot)))
}

fn tree_outputs(
    t: &tree::Tree,
    spec: &ValidatedSpec,
    input: &JobInput,
    key: &BootstrapKey,
    customers: &[(usize, u16)],
    step: &(dyn Fn(usize) -> Result<()> + Sync),
) -> Result<Vec<CustomerValue>> {
    customers
        .par_iter()
        .map_init(
            || Bootstrapper::new(key),
            |bs, &(block, slot)| {
                step(block)?;
                let feature = |f: &str| (feature_lwe(input, f, block, slot), spec.feature_max(f));
                Ok(CustomerValue {
                    block,
                    slot,
                    value: t.evaluate(bs, &feature),
                })
            },
        )
        .collect()
}

fn histogram(
    spec: &ValidatedSpec,
    edges: &[i64],
    input: &JobInput,
    key: &BootstrapKey,
    blocks: &[usize],
    customers: &[(usize, u16)],
    step: &(dyn Fn(usize) -> Result<()> + Sync),
) -> Result<EncryptedHistogram> {
    let (Some(model), Some((lo, hi))) = (spec.linear(), spec.score_range()) else {
        return Err(InvalidSpecError::error(
            "model",
            "a histogram needs a feature or a linear score",
        ));
    };
    let scores: BTreeMap<usize, GlweCiphertextOwned<u64>> = blocks
        .par_iter()
        .map(|&b| (b, linear_block(&model, input, b, false).0))
        .collect();
    let mut pieces = Vec::new();
    let mut at = 0;
    for len in chunk_sizes(customers.len()) {
        pieces.push(&customers[at..at + len]);
        at += len;
    }
    let per_chunk: Vec<Vec<Lwe>> = pieces
        .par_iter()
        .map_init(
            || Bootstrapper::new(key),
            |bs, chunk| {
                let mut counts: Vec<Lwe> = edges.iter().map(|_| trivial(0)).collect();
                for &(block, slot) in chunk.iter() {
                    step(block)?;
                    let Some(score) = scores.get(&block) else {
                        continue;
                    };
                    let x = extract(score, usize::from(slot));
                    for (count, &e) in counts.iter_mut().zip(edges) {
                        let bit = bs.at_least(&x, lo, hi, e, tree::OUTPUT_LOG);
                        lwe_ciphertext_add_assign(count, &bit);
                    }
                }
                Ok(counts)
            },
        )
        .collect::<Result<_>>()?;
    let at_least = (0..edges.len())
        .map(|e| per_chunk.iter().map(|c| c[e].clone()).collect())
        .collect();
    Ok(EncryptedHistogram {
        at_least,
        cohort_size: input.cohort_size(),
    })
}

/// The sizes a histogram splits `n` customers into: they differ by at
/// most one and none is above [`HISTOGRAM_CHUNK`], so with 63 or more
/// customers every chunk holds at least 31 and no partial count the gate
/// decrypts covers fewer.
fn chunk_sizes(n: usize) -> Vec<usize> {
    let chunks = n.div_ceil(HISTOGRAM_CHUNK).max(1);
    let (base, extra) = (n / chunks, n % chunks);
    (0..chunks).map(|i| base + usize::from(i < extra)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{self, FeatureInfo};

    fn spec() -> ValidatedSpec {
        spec::parse(
            "name = \"t\"\npurpose = \"analytics\"\noutput = \"per_customer\"\n[model]\nkind = \"linear\"\nweights = { budget = 2 }\n",
            &[FeatureInfo {
                name: "budget".into(),
                max: 1023,
            }],
        )
        .unwrap()
    }

    fn input() -> JobInput {
        JobInput {
            columns: BTreeMap::new(),
            cohort: vec![vec![0, 1], vec![], vec![5]],
        }
    }

    fn limit_of(e: SandboxError) -> &'static str {
        match e {
            SandboxError::LimitExceeded(l) => l.limit(),
            other => panic!("expected a limit, got {other}"),
        }
    }

    #[test]
    fn histogram_chunks_are_balanced() {
        for n in [0usize, 1, 20, 62, 63, 64, 127, 10_000, 100_000, 1_000_003] {
            let sizes = chunk_sizes(n);
            assert_eq!(sizes.iter().sum::<usize>(), n);
            assert!(sizes.iter().all(|&s| s <= HISTOGRAM_CHUNK), "{n}");
            if n >= HISTOGRAM_CHUNK {
                assert!(sizes.iter().all(|&s| s >= 31), "{n}: {sizes:?}");
            }
        }
    }

    #[test]
    fn a_pool_bounds_the_threads_a_job_evaluates_on() {
        let pool = EvalPool::new(1).unwrap();
        assert_eq!(pool.threads(), 1);
        assert_eq!(EvalPool::new(0).unwrap().threads(), 1);
        let m = EvaluationMaterial::new();
        let p = Progress::default();
        pool.run(&m, &spec(), &input(), &p, &Limits::default())
            .unwrap();
        let (done, total) = p.get();
        assert_eq!(done, total);
        // Inside the pool, rayon sees one thread: nothing spreads wider.
        assert_eq!(pool.pool.install(rayon::current_num_threads), 1);
    }

    #[test]
    fn cancellation_limits_and_progress() {
        let m = EvaluationMaterial::new();
        let p = Progress::default();
        let out = run(&m, &spec(), &input(), &p, &Limits::default()).unwrap();
        assert!(matches!(out, EncryptedOutput::PerCustomer(ref b) if b.len() == 2));
        assert_eq!(p.get(), (2, 2));

        let p = Progress::default();
        p.cancel();
        assert!(matches!(
            run(&m, &spec(), &input(), &p, &Limits::default()),
            Err(SandboxError::Cancelled)
        ));
        let few = Limits {
            max_customers: 2,
            ..Limits::default()
        };
        let e = run(&m, &spec(), &input(), &Progress::default(), &few).unwrap_err();
        assert_eq!(limit_of(e), "customers");
        let small = Limits {
            max_memory_bytes: 1,
            ..Limits::default()
        };
        let e = run(&m, &spec(), &input(), &Progress::default(), &small).unwrap_err();
        assert_eq!(limit_of(e), "memory");
        let none = Limits {
            max_wall: Duration::ZERO,
            ..Limits::default()
        };
        std::thread::sleep(Duration::from_millis(2));
        let e = run(&m, &spec(), &input(), &Progress::default(), &none).unwrap_err();
        assert_eq!(limit_of(e), "wall_time");
        let mut bad = input();
        bad.cohort[0] = vec![3, 3];
        let e = run(&m, &spec(), &bad, &Progress::default(), &Limits::default()).unwrap_err();
        assert!(e.to_string().contains("sorted, distinct"), "{e}");
    }
}
