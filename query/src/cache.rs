//! The bounded cache of found messages: digest → the 200's JSON body.
//!
//! A message's digest is its SHA-256, so a found digest names the same message forever, in
//! every generation of the read model (docs/replay.md): a kept answer never goes stale, and
//! keeping hits across a generation switch is safe. Only hits are kept: a miss may be found
//! by the next read, and the read-your-writes barrier is what answers it.
//!
//! Bounded by bytes (the bodies plus a fixed overhead per entry), evicting by S3-FIFO
//! (quick_cache), so a scan of many once-read messages does not push out the popular ones.

use axum::body::Bytes;
use msghash_common::Digest;

/// What an entry costs beside its body: the key, the `Bytes` handle and the table slot.
const ENTRY_OVERHEAD: u64 = 96;

/// Estimated size of a typical entry, to pre-size the table.
const TYPICAL_ENTRY: u64 = 256;

#[derive(Clone)]
struct BodyWeight;

impl quick_cache::Weighter<Digest, Bytes> for BodyWeight {
    fn weight(&self, _digest: &Digest, body: &Bytes) -> u64 {
        body.len() as u64 + ENTRY_OVERHEAD
    }
}

pub(crate) struct HitCache {
    entries: quick_cache::sync::Cache<Digest, Bytes, BodyWeight>,
}

impl HitCache {
    /// A cache of at most `bytes`; `None` for 0 (no cache).
    pub(crate) fn new(bytes: u64) -> Option<HitCache> {
        if bytes == 0 {
            return None;
        }
        let items = usize::try_from(bytes / TYPICAL_ENTRY)
            .unwrap_or(usize::MAX)
            .max(1);
        Some(HitCache {
            entries: quick_cache::sync::Cache::with_weighter(items, bytes, BodyWeight),
        })
    }

    pub(crate) fn get(&self, digest: &Digest) -> Option<Bytes> {
        self.entries.get(digest)
    }

    pub(crate) fn insert(&self, digest: Digest, body: Bytes) {
        self.entries.insert(digest, body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&n.to_string())
    }

    #[test]
    fn keeps_what_fits_and_evicts_past_its_bound() {
        let cache = HitCache::new(10 * (100 + ENTRY_OVERHEAD)).expect("a cache");
        for n in 0..100 {
            cache.insert(digest(n), Bytes::from(vec![b'x'; 100]));
        }
        let kept = (0..100)
            .filter(|n| cache.get(&digest(*n)).is_some())
            .count();
        assert!((1..=10).contains(&kept), "kept {kept}");
        assert!(cache.entries.weight() <= 10 * (100 + ENTRY_OVERHEAD));
    }

    #[test]
    fn zero_bytes_is_no_cache() {
        assert!(HitCache::new(0).is_none());
    }
}
