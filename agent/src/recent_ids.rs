//! Request ids remembered until they are used, at most `CAP` of them: the newest kept, the oldest
//! forgotten first.
//!
//! The frontend's dispatch of each inference request and its read of each reply are noted by request
//! id and used once, when the request's HTTP response is seen. A response that is never seen (the
//! connection was adopted mid-stream, the client went away) must not keep its id for ever, so the
//! table is bounded and forgets in insertion order. Ids used are removed at once; the order queue
//! drops them lazily, and is compacted when they are most of it, so that it holds about as many ids
//! as are waiting. It used to keep every id until 65,536 newer ones had come: ~5 MB of RSS per table
//! at a steady ~1k requests/s, for ids long used.
//!
//! Hand-written: an insertion-ordered map with O(1) removal by key (`hashlink`'s `LinkedHashMap`)
//! would do it too, but is not in the dependency tree; this is a map and a queue.

use std::{collections::VecDeque, sync::Arc};

use crate::FastMap;

/// Ids used since the last compaction may make up at most this many entries of the order queue more
/// than twice the ids waiting: the queue stays small, and each compaction is paid for by at least
/// this many removals.
const SLACK: usize = 1024;

#[derive(Debug)]
pub struct RecentIds<V, const CAP: usize> {
    /// Id → (value, its insertion number).
    map: FastMap<Arc<str>, (V, u64)>,
    /// Insertion number and id, oldest first; entries whose id was used (or inserted again since)
    /// no longer match the map and are skipped.
    order: VecDeque<(u64, Arc<str>)>,
    next: u64,
}

impl<V, const CAP: usize> Default for RecentIds<V, CAP> {
    fn default() -> Self {
        Self {
            map: FastMap::default(),
            order: VecDeque::new(),
            next: 0,
        }
    }
}

impl<V, const CAP: usize> RecentIds<V, CAP> {
    /// Remembers `value` for `id`: replaces the value of an id already waiting (its place in the
    /// order stays), else adds it, forgetting the oldest waiting id when `CAP` are.
    pub fn insert(&mut self, id: &str, value: V) {
        if let Some((v, _)) = self.map.get_mut(id) {
            *v = value;
            return;
        }
        while self.map.len() >= CAP {
            let Some((n, old)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|(_, at)| *at == n) {
                self.map.remove(&old);
            }
        }
        let id: Arc<str> = Arc::from(id);
        self.map.insert(Arc::clone(&id), (value, self.next));
        self.order.push_back((self.next, id));
        self.next += 1;
    }

    /// The value waiting for `id`, which is forgotten.
    pub fn take(&mut self, id: &str) -> Option<V> {
        let (value, _) = self.map.remove(id)?;
        if self.order.len() > 2 * self.map.len() + SLACK {
            let map = &self.map;
            self.order
                .retain(|(n, id)| map.get(id).is_some_and(|(_, at)| at == n));
        }
        Some(value)
    }

    /// Ids waiting.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Entries of the order queue, used ones not yet dropped included (what the table holds).
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_once_and_forgets_the_oldest_past_its_bound() {
        let mut r: RecentIds<u32, 3> = RecentIds::default();
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            r.insert(id, u32::try_from(i).unwrap_or(0));
        }
        // Replacing a waiting id keeps its place: "a" is still the oldest.
        r.insert("a", 10);
        r.insert("d", 3);
        assert_eq!(r.take("a"), None, "the oldest went first");
        assert_eq!(r.take("b"), Some(1));
        assert_eq!(r.take("b"), None, "used once");
        assert_eq!((r.take("c"), r.take("d")), (Some(2), Some(3)));
        assert!(r.is_empty());
    }

    #[test]
    fn an_id_used_and_seen_again_is_not_forgotten_for_its_first_place() {
        let mut r: RecentIds<u32, 2> = RecentIds::default();
        r.insert("a", 1);
        assert_eq!(r.take("a"), Some(1));
        r.insert("b", 2);
        r.insert("a", 3);
        // Full: the next id forgets the oldest waiting one, "b", not "a" by its first, used place.
        r.insert("c", 4);
        assert_eq!(r.take("b"), None);
        assert_eq!((r.take("a"), r.take("c")), (Some(3), Some(4)));
    }

    #[test]
    fn ids_used_do_not_accumulate() {
        let mut r: RecentIds<u64, 65_536> = RecentIds::default();
        // A steady stream: each request's id noted, then used a few requests later.
        for i in 0..200_000u64 {
            r.insert(&format!("{i:036}"), i);
            if i >= 4 {
                let used = i - 4;
                assert_eq!(r.take(&format!("{used:036}")), Some(used));
            }
        }
        assert_eq!(r.len(), 4);
        assert!(
            r.queued() <= 2 * r.len() + SLACK + 1,
            "{} ids queued for {} waiting",
            r.queued(),
            r.len()
        );
    }

    #[test]
    fn ids_never_used_stay_bounded() {
        let mut r: RecentIds<u64, 1000> = RecentIds::default();
        for i in 0..10_000u64 {
            r.insert(&i.to_string(), i);
        }
        assert_eq!(r.len(), 1000);
        assert_eq!(r.queued(), 1000);
        assert_eq!(r.take("8999"), None, "forgotten");
        assert_eq!(r.take("9000"), Some(9000), "the newest thousand kept");
    }
}
