//! Admission of sandbox jobs: how many evaluate at once, how many wait, and
//! how many one principal may have.
//!
//! Guarantees: at most `max_running` admitted jobs hold a running place at
//! once; the others wait in one FIFO queue of at most `max_queued`; an
//! owner (a principal of a tenant) has at most `max_jobs_per_principal`
//! jobs queued or running; a refusal is RESOURCE_EXHAUSTED
//! ([`VaultError::exhausted`]) and takes no place. A place is given up when
//! its [`Place`] drops: a running place goes to the next waiter still
//! listening, a queued place leaves the queue.
//!
//! Does not: size the evaluation pool (the service does, from
//! `eval_threads`), or persist anything: the queue is in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::error::{Result, VaultError};

pub use crate::config::AdmissionConfig;

#[derive(Debug)]
struct Admitted {
    owner: String,
    running: bool,
}

#[derive(Debug, Default)]
struct AdmissionState {
    running: usize,
    /// Waiting jobs, first to start first, each with the sender that starts
    /// it.
    queue: VecDeque<(String, tokio::sync::oneshot::Sender<()>)>,
    /// Every queued or running job, by id.
    jobs: HashMap<String, Admitted>,
    /// Queued or running jobs per owner.
    per_owner: HashMap<String, usize>,
}

/// The admission queue: a counting semaphore of running jobs with a FIFO
/// queue in front of it, and per-owner counts.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    cfg: AdmissionConfig,
    state: Arc<Mutex<AdmissionState>>,
}

/// What admission decided for a job.
pub(crate) enum Admit {
    /// It may run now.
    Run(Place),
    /// It waits; the receiver fires when it may run, and errs if it was
    /// cancelled while waiting.
    Wait(Place, tokio::sync::oneshot::Receiver<()>),
}

/// A job's place in admission; dropping it gives the place up (hands a
/// running place to the next queued job, or leaves the queue).
pub(crate) struct Place {
    admission: Admission,
    job: String,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.admission.leave(&self.job);
    }
}

impl Admission {
    pub(crate) fn new(cfg: AdmissionConfig) -> Admission {
        Admission {
            cfg,
            state: Arc::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, AdmissionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits `job` of `owner`, or refuses it with RESOURCE_EXHAUSTED.
    pub(crate) fn admit(&self, job: &str, owner: &str) -> Result<Admit> {
        let mut s = self.state();
        let mine = s.per_owner.get(owner).copied().unwrap_or(0);
        if mine >= self.cfg.max_jobs_per_principal {
            return Err(VaultError::exhausted(format!(
                "you have {mine} sandbox jobs queued or running, the most one principal may have (max_jobs_per_principal = {}); wait for one to finish (WatchJob) or cancel one (CancelJob), then submit again",
                self.cfg.max_jobs_per_principal
            )));
        }
        let run = s.running < self.cfg.max_running.max(1);
        if !run && s.queue.len() >= self.cfg.max_queued {
            return Err(VaultError::exhausted(format!(
                "the sandbox queue is full ({} jobs waiting, max_queued = {}); submit again once jobs have finished",
                s.queue.len(),
                self.cfg.max_queued
            )));
        }
        *s.per_owner.entry(owner.to_owned()).or_default() += 1;
        s.jobs.insert(
            job.to_owned(),
            Admitted {
                owner: owner.to_owned(),
                running: run,
            },
        );
        let place = Place {
            admission: self.clone(),
            job: job.to_owned(),
        };
        if run {
            s.running += 1;
            Ok(Admit::Run(place))
        } else {
            let (tx, rx) = tokio::sync::oneshot::channel();
            s.queue.push_back((job.to_owned(), tx));
            Ok(Admit::Wait(place, rx))
        }
    }

    /// 1-based place of a queued job (0 if it is not queued).
    pub(crate) fn position(&self, job: &str) -> u64 {
        self.state()
            .queue
            .iter()
            .position(|(j, _)| j == job)
            .map_or(0, |i| i as u64 + 1)
    }

    /// Takes a queued job out of the queue (its waiter then errs). False if
    /// it is not queued (running, finished or unknown).
    pub(crate) fn cancel_queued(&self, job: &str) -> bool {
        let mut s = self.state();
        if s.jobs.get(job).is_none_or(|a| a.running) {
            return false;
        }
        Self::forget(&mut s, job);
        true
    }

    /// Removes `job` wherever it is; a running job's place goes to the next
    /// queued job.
    fn leave(&self, job: &str) {
        let mut s = self.state();
        if let Some(true) = Self::forget(&mut s, job) {
            // Hand the place on, skipping waiters that are gone.
            while let Some((next, tx)) = s.queue.pop_front() {
                if let Some(a) = s.jobs.get_mut(&next) {
                    a.running = true;
                }
                if tx.send(()).is_ok() {
                    return;
                }
                // Its task is gone (its Place, when it drops, finds nothing
                // left to give up): forget it and offer the place on.
                let _ = Self::forget(&mut s, &next);
            }
            s.running = s.running.saturating_sub(1);
        }
    }

    /// Drops `job`'s bookkeeping: Some(was running), None if unknown.
    fn forget(s: &mut AdmissionState, job: &str) -> Option<bool> {
        let a = s.jobs.remove(job)?;
        if let Some(n) = s.per_owner.get_mut(&a.owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.per_owner.remove(&a.owner);
            }
        }
        if !a.running {
            s.queue.retain(|(j, _)| j != job);
        }
        Some(a.running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adm(running: usize, queued: usize, per: usize) -> Admission {
        Admission::new(AdmissionConfig {
            max_running: running,
            eval_threads: 1,
            max_queued: queued,
            max_jobs_per_principal: per,
        })
    }

    fn waits(a: Admit) -> (Place, tokio::sync::oneshot::Receiver<()>) {
        match a {
            Admit::Wait(s, r) => (s, r),
            Admit::Run(_) => panic!("expected to wait"),
        }
    }

    #[test]
    fn admission_is_fifo_bounded_and_per_principal() {
        let a = adm(1, 2, 3);
        let Admit::Run(first) = a.admit("j1", "alice").unwrap() else {
            panic!("the first job runs")
        };
        let (s2, mut r2) = waits(a.admit("j2", "alice").unwrap());
        let (s3, mut r3) = waits(a.admit("j3", "bob").unwrap());
        assert_eq!(
            (a.position("j1"), a.position("j2"), a.position("j3")),
            (0, 1, 2)
        );
        // Alice's fourth: her limit (3 queued or running) is not reached
        // yet, but the queue (2) is full.
        let e = a.admit("j4", "alice").err().unwrap();
        assert!(matches!(e, VaultError::ResourceExhausted(_)), "{e:?}");
        assert!(e.to_string().contains("queue is full"), "{e}");
        // Cancelling a queued job frees its place: j3 moves up.
        assert!(a.cancel_queued("j2"));
        assert!(!a.cancel_queued("j1"), "a running job is not in the queue");
        assert!(r2.try_recv().is_err());
        drop(s2);
        assert_eq!(a.position("j3"), 1);
        // The running job ends: j3 starts.
        drop(first);
        assert!(r3.try_recv().is_ok());
        assert_eq!(a.position("j3"), 0);
        assert_eq!(a.state().running, 1);
        drop(s3);
        assert_eq!(a.state().running, 0);
        assert!(a.state().jobs.is_empty() && a.state().per_owner.is_empty());
    }

    #[test]
    fn a_principal_is_limited_to_its_queued_and_running_jobs() {
        let a = adm(1, 10, 2);
        let _j1 = a.admit("j1", "alice").unwrap();
        let _j2 = a.admit("j2", "alice").unwrap();
        let e = a.admit("j3", "alice").err().unwrap();
        assert!(matches!(e, VaultError::ResourceExhausted(_)), "{e:?}");
        assert!(e.to_string().contains("max_jobs_per_principal = 2"), "{e}");
        // Another principal is not affected.
        let _b = a.admit("j4", "bob").unwrap();
        assert_eq!(a.position("j4"), 2);
    }

    #[test]
    fn a_waiter_whose_task_is_gone_is_skipped() {
        let a = adm(1, 10, 10);
        let Admit::Run(first) = a.admit("j1", "x").unwrap() else {
            panic!("runs")
        };
        let (s2, r2) = waits(a.admit("j2", "x").unwrap());
        let (_s3, mut r3) = waits(a.admit("j3", "x").unwrap());
        drop(r2); // j2's task went away before its Place.
        drop(first);
        assert!(r3.try_recv().is_ok(), "the slot went to j3");
        drop(s2);
        assert_eq!(a.state().running, 1);
    }
}
