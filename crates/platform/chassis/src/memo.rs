//! A bounded, sharded memo: values that are cheap to recompute but worth not
//! recomputing on every request (verified tokens, minted identities).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;

/// A bounded map, sharded so concurrent requests rarely share a lock. A full shard
/// is emptied rather than scanned: entries are cheap to recompute.
pub struct Memo<K, V> {
    shards: Vec<Mutex<HashMap<K, V, Fast>>>,
    per_shard: usize,
    hasher: Fast,
}

/// foldhash (hashbrown's own default) rather than SipHash: the keys are access
/// tokens of a few hundred bytes, hashed twice per request (shard, then map), and
/// only tokens that verified are ever stored, so no client chooses what fills a map.
type Fast = foldhash::fast::RandomState;

const MEMO_SHARDS: usize = 16;

impl<K: std::hash::Hash + Eq, V: Clone> Memo<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..MEMO_SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: (capacity / MEMO_SHARDS).max(1),
            hasher: Default::default(),
        }
    }

    fn shard<Q: std::hash::Hash + ?Sized>(&self, key: &Q) -> &Mutex<HashMap<K, V, Fast>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % MEMO_SHARDS]
    }

    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        shard.get(key).cloned()
    }

    pub fn insert(&self, key: K, value: V) {
        let mut shard = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
        if shard.len() >= self.per_shard {
            shard.clear();
        }
        shard.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_is_bounded() {
        let memo: Memo<u32, u32> = Memo::new(32);
        for i in 0..10_000 {
            memo.insert(i, i);
        }
        let kept = (0..10_000).filter(|i| memo.get(i).is_some()).count();
        assert!(kept <= 32, "{kept}");
        assert_eq!(memo.get(&9_999), Some(9_999));
    }
}
