//! A bounded in-memory cache of unwrapped volume keys, used only when every KMS server is
//! unreachable. It trades security for availability: for up to the configured lifetime a
//! volume can be attached again without the KMS, and a KEK revoked during an outage still
//! unlocks it until the entry expires. Off unless `cache_entries` is set.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::crypto::{VolumeKey, VOLUME_KEY_LEN};

struct Entry {
    key_id: String,
    /// SHA-256 of the wrapped key, so volumes sharing a KEK are distinguished without storing the
    /// wrapped bytes.
    wrapped_digest: [u8; 32],
    volume_key: Zeroizing<[u8; VOLUME_KEY_LEN]>,
    expires: Instant,
}

pub struct KeyCache {
    capacity: usize,
    lifetime: Duration,
    entries: Mutex<VecDeque<Entry>>,
}

impl KeyCache {
    pub fn new(capacity: usize, lifetime: Duration) -> Self {
        KeyCache { capacity, lifetime, entries: Mutex::new(VecDeque::new()) }
    }

    /// Stores `key`, replacing an entry for the same wrapped key and evicting the oldest
    /// entry when full.
    pub fn insert(&self, key_id: &str, wrapped: &[u8], key: &VolumeKey) {
        let digest: [u8; 32] = Sha256::digest(wrapped).into();
        let mut entries = self.entries.lock().expect("key cache lock");
        entries.retain(|e| !(e.key_id == key_id && e.wrapped_digest == digest));
        while entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back(Entry {
            key_id: key_id.to_string(),
            wrapped_digest: digest,
            volume_key: Zeroizing::new(*key.as_bytes()),
            expires: Instant::now() + self.lifetime,
        });
    }

    /// Returns the cached volume key for this wrapped key, if it has not expired.
    pub fn get(&self, key_id: &str, wrapped: &[u8]) -> Option<VolumeKey> {
        let digest: [u8; 32] = Sha256::digest(wrapped).into();
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("key cache lock");
        entries.retain(|e| e.expires > now);
        let entry = entries.iter().find(|e| e.key_id == key_id && e.wrapped_digest == digest)?;
        VolumeKey::from_bytes(entry.volume_key.as_slice()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_returns_fresh_entries_only() {
        let cache = KeyCache::new(2, Duration::from_millis(50));
        let key = VolumeKey::generate().unwrap();
        cache.insert("1", b"wrapped", &key);
        assert_eq!(cache.get("1", b"wrapped").unwrap().as_bytes(), key.as_bytes());
        assert!(cache.get("1", b"other").is_none());
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.get("1", b"wrapped").is_none());
    }

    #[test]
    fn cache_evicts_oldest_when_full() {
        let cache = KeyCache::new(2, Duration::from_secs(60));
        let key = VolumeKey::generate().unwrap();
        for id in ["1", "2", "3"] {
            cache.insert(id, b"w", &key);
        }
        assert!(cache.get("1", b"w").is_none());
        assert!(cache.get("3", b"w").is_some());
    }
}
