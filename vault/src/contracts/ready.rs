//! The outbox's ready index, in memory (rebuilt at start from the
//! `contract_runtime` tree): the deliverable actions not leased, the leased
//! ones with who holds them, and the leases by expiry.
//!
//! Guarantees: an action is either free or leased, never both; finding
//! free actions scans only free ones (however many are leased), and
//! expired leases are released in O(log n) each. Not guaranteed here:
//! that an entry's action is still deliverable (the runtime checks its
//! record).

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// An action's place: tenant, instance and action id.
pub(crate) type Place = (String, u64, String);

/// What streams filter on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) kind: String,
    pub(crate) contract: String,
}

#[derive(Debug, Clone)]
struct Lease {
    to: String,
    until_ms: i64,
}

/// The index.
#[derive(Debug, Default)]
pub(crate) struct ReadyIndex {
    free: BTreeMap<Place, Meta>,
    leased: HashMap<Place, (Meta, Lease)>,
    expiry: BTreeSet<(i64, Place)>,
}

impl ReadyIndex {
    /// Makes `place` deliverable now (dropping any lease it had).
    pub(crate) fn insert(&mut self, place: Place, meta: Meta) {
        self.remove(&place);
        self.free.insert(place, meta);
    }

    /// Takes `place` out (completed, failed, cancelled, waiting).
    pub(crate) fn remove(&mut self, place: &Place) {
        self.free.remove(place);
        if let Some((_, l)) = self.leased.remove(place) {
            self.expiry.remove(&(l.until_ms, place.clone()));
        }
    }

    /// How many actions it holds, free or leased.
    pub(crate) fn len(&self) -> usize {
        self.free.len() + self.leased.len()
    }

    /// Who holds `place`'s lease, if anyone does.
    pub(crate) fn holder(&self, place: &Place) -> Option<&str> {
        self.leased.get(place).map(|(_, l)| l.to.as_str())
    }

    /// Frees the actions whose lease ran out by `now_ms`.
    pub(crate) fn release_expired(&mut self, now_ms: i64) {
        while let Some((until, place)) = self.expiry.first().cloned() {
            if until > now_ms {
                break;
            }
            self.expiry.pop_first();
            if let Some((meta, _)) = self.leased.remove(&place) {
                self.free.insert(place, meta);
            }
        }
    }

    /// Up to `max` free actions of `tenant` that `keep` accepts, in order.
    pub(crate) fn candidates(
        &self,
        tenant: &str,
        max: usize,
        keep: impl Fn(&Place, &Meta) -> bool,
    ) -> Vec<Place> {
        self.free
            .iter()
            .filter(|(p, m)| p.0 == tenant && keep(p, m))
            .map(|(p, _)| p.clone())
            .take(max)
            .collect()
    }

    /// Frees a leased `place` at once (its stream went away before it was
    /// sent).
    pub(crate) fn unlease(&mut self, place: &Place) {
        if let Some((meta, l)) = self.leased.remove(place) {
            self.expiry.remove(&(l.until_ms, place.clone()));
            self.free.insert(place.clone(), meta);
        }
    }

    /// Leases a free `place` to `to` until `until_ms`; false when it is not
    /// free (another stream took it, or it left the index).
    pub(crate) fn lease(&mut self, place: &Place, to: &str, until_ms: i64) -> bool {
        let Some(meta) = self.free.remove(place) else {
            return false;
        };
        self.expiry.insert((until_ms, place.clone()));
        self.leased.insert(
            place.clone(),
            (
                meta,
                Lease {
                    to: to.to_owned(),
                    until_ms,
                },
            ),
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: u64) -> Place {
        ("t".into(), i, "a".into())
    }

    fn m(kind: &str) -> Meta {
        Meta {
            kind: kind.into(),
            contract: "c".into(),
        }
    }

    #[test]
    fn leased_actions_are_not_candidates_until_their_lease_runs_out() {
        let mut r = ReadyIndex::default();
        for i in 0..5 {
            r.insert(p(i), m(if i % 2 == 0 { "notify" } else { "create_task" }));
        }
        assert!(r.lease(&p(0), "svc", 100));
        assert!(!r.lease(&p(0), "other", 100));
        assert_eq!(r.holder(&p(0)), Some("svc"));
        let c = r.candidates("t", 10, |_, m| m.kind == "notify");
        assert_eq!(c, vec![p(2), p(4)]);
        assert_eq!(r.candidates("other", 10, |_, _| true), vec![]);
        r.release_expired(99);
        assert_eq!(r.holder(&p(0)), Some("svc"));
        r.release_expired(100);
        assert_eq!(r.holder(&p(0)), None);
        assert_eq!(r.candidates("t", 1, |_, _| true), vec![p(0)]);
        // Removing or inserting again drops the lease and its expiry.
        assert!(r.lease(&p(1), "svc", 50));
        r.remove(&p(1));
        assert_eq!(r.len(), 4);
        r.release_expired(1_000);
        assert_eq!(r.len(), 4);
        assert!(r.lease(&p(3), "svc", 70));
        r.unlease(&p(3));
        assert_eq!(r.holder(&p(3)), None);
        assert_eq!(r.candidates("t", 10, |_, _| true).len(), 4);
        assert!(r.lease(&p(2), "svc", 70));
        r.insert(p(2), m("notify"));
        assert_eq!(r.holder(&p(2)), None);
        r.release_expired(1_000);
        assert_eq!(r.len(), 4);
    }
}
