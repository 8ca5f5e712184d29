//! Hash maps whose keys are hashes already (a BLAKE3 key hash, a popularity hash).
//!
//! Such keys are uniform: hashing them again with the standard library's SipHash only costs
//! time on every lookup (issue 16: the memory tier's lookup and the popularity count are on
//! every hit). [`AsIs`] uses the key's own bits as its hash instead.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` keyed by a value that is itself a uniform hash (`u64`, `u128`).
pub type Map<K, V> = HashMap<K, V, BuildHasherDefault<AsIs>>;

/// The key's own bits as its hash: the low 64 bits of a `u128`, a `u64` as it is.
#[derive(Default)]
pub struct AsIs(u64);

impl Hasher for AsIs {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only integer keys are meant; anything else is still folded in, not ignored.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_keys_hash_to_their_own_bits_and_maps_work() {
        let mut h = AsIs::default();
        h.write_u128(0xdead_beef_0000_0001_2345_6789_abcd_ef01);
        assert_eq!(h.finish(), 0x2345_6789_abcd_ef01);
        let mut m: Map<u128, u32> = Map::default();
        for i in 0..1000u128 {
            m.insert(i << 64 | i, i as u32);
        }
        assert!((0..1000u128).all(|i| m[&(i << 64 | i)] == i as u32));
    }
}
