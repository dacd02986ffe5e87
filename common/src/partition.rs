//! Where a digest lives in the event log.
//!
//! The partition is a pure function of the digest and the partition count, so the producer,
//! the projector and the query barrier all agree on it without asking anyone.

use crate::Digest;
use std::num::NonZeroU32;

/// The first four bytes of the digest, big-endian, modulo the partition count.
///
/// SHA-256 output is uniform, so partitions fill evenly.
pub fn partition_for(digest: &Digest, partitions: NonZeroU32) -> u32 {
    let b = digest.as_bytes();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) % partitions.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(count: u32) -> NonZeroU32 {
        NonZeroU32::new(count).expect("non-zero")
    }

    #[test]
    fn is_the_first_four_bytes_mod_n() {
        // sha256("foo") starts with 2c 26 b4 6b.
        let d = Digest::of("foo");
        assert_eq!(partition_for(&d, n(8)), 0x2c26_b46b % 8);
        assert_eq!(partition_for(&d, n(1)), 0);
        assert_eq!(partition_for(&d, n(1000)), 0x2c26_b46b % 1000);
    }

    #[test]
    fn is_stable_and_in_range_and_spreads() {
        let mut seen = [0u32; 8];
        for i in 0..800 {
            let d = Digest::of(&i.to_string());
            let p = partition_for(&d, n(8));
            assert_eq!(p, partition_for(&d, n(8)));
            seen[p as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "uneven spread: {seen:?}");
    }
}
