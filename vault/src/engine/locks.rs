//! Per-customer write locks, shared by the engine and the components that
//! change a customer's keys (rotation).
//!
//! Guarantees: two holders of the guard of one (tenant, customer) never run
//! at once, so a customer's data key, records and index entries change
//! under one writer at a time.
//!
//! Does not guarantee: that different customers never wait for each other
//! (customers are hashed onto a fixed number of stripes), nor anything
//! across processes (sled's directory lock keeps a second server out).

use std::sync::{Mutex, MutexGuard};

const STRIPES: usize = 256;

/// A fixed set of mutexes, one of which guards each customer.
pub(crate) struct CustomerLocks {
    stripes: Vec<Mutex<()>>,
}

impl CustomerLocks {
    pub(crate) fn new() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Holds the customer's lock until the guard is dropped.
    pub(crate) fn lock(&self, tenant: &str, customer: &str) -> MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (tenant, customer).hash(&mut h);
        let i = (h.finish() as usize) % STRIPES;
        // A poisoned stripe only means another writer panicked; the data it
        // guards is in sled, not behind the mutex, so continuing is sound.
        self.stripes[i].lock().unwrap_or_else(|p| p.into_inner())
    }
}
