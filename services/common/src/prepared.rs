//! Work a consumer did in `prepare` (outside its transaction), kept for its `handle`.
//!
//! The inbox calls `prepare` and then `handle` for the same delivery, in one task, so the
//! result is almost always taken at once. A duplicate skips `handle` and leaves its entry
//! behind; the map is bounded so such leftovers cannot grow without limit. A handler that
//! finds nothing (a restart between the two, an evicted entry) does the work again.

use std::collections::HashMap;
use std::sync::Mutex;

use uuid::Uuid;

/// Results of `prepare` by event id.
pub struct Prepared<T> {
    entries: Mutex<HashMap<Uuid, T>>,
    capacity: usize,
}

impl<T> Prepared<T> {
    /// Holds at most `capacity` results; more forgets the older ones (all at once: leftovers
    /// of duplicates are rare, and a forgotten result is only recomputed).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    pub fn put(&self, event_id: Uuid, value: T) {
        let mut entries = self.entries.lock().expect("prepared lock");
        if entries.len() >= self.capacity {
            entries.clear();
        }
        entries.insert(event_id, value);
    }

    pub fn take(&self, event_id: &Uuid) -> Option<T> {
        self.entries.lock().expect("prepared lock").remove(event_id)
    }
}

impl<T> Default for Prepared<T> {
    fn default() -> Self {
        Self::new(1000)
    }
}
