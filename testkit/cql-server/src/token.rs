//! Partition tokens as ScyllaDB / Cassandra compute them with the default
//! `Murmur3Partitioner`.
//!
//! The hash is MurmurHash3 x64 128-bit with seed 0, in the variant Cassandra
//! shipped (and ScyllaDB copied for compatibility): the tail bytes are read
//! as *signed* bytes, so they are sign-extended before being shifted. The
//! token is the first 64-bit half of the hash as a signed `i64`, with
//! `i64::MIN` (reserved for the minimum token) mapped to `i64::MAX`, and an
//! empty key hashes to the minimum token `i64::MIN`.
//!
//! The hashed bytes are the partition key's serialized value for a
//! single-column key, and for a composite key the `CompositeType` encoding:
//! per component a big-endian `u16` length, the value bytes and a `0x00`
//! end-of-component byte.

use std::net::IpAddr;

use kassandra::cql::value::{CqlValue, PartitionKeyValue};

const C1: u64 = 0x87c3_7b91_1142_53d5;
const C2: u64 = 0x4cf5_ad43_2745_937f;

fn fmix(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

fn mix_k1(k1: u64) -> u64 {
    k1.wrapping_mul(C1).rotate_left(31).wrapping_mul(C2)
}

fn mix_k2(k2: u64) -> u64 {
    k2.wrapping_mul(C2).rotate_left(33).wrapping_mul(C1)
}

/// Cassandra's `MurmurHash.hash3_x64_128(key, 0, len, 0)[0]`.
pub fn murmur3_h1(data: &[u8]) -> i64 {
    let mut h1: u64 = 0;
    let mut h2: u64 = 0;
    let mut blocks = data.chunks_exact(16);
    for block in &mut blocks {
        let (lo, hi) = block.split_at(8);
        // chunks_exact guarantees two 8-byte halves.
        let k1 = u64::from_le_bytes(lo.try_into().unwrap_or([0; 8]));
        let k2 = u64::from_le_bytes(hi.try_into().unwrap_or([0; 8]));
        h1 ^= mix_k1(k1);
        h1 = h1
            .rotate_left(27)
            .wrapping_add(h2)
            .wrapping_mul(5)
            .wrapping_add(0x52dc_e729);
        h2 ^= mix_k2(k2);
        h2 = h2
            .rotate_left(31)
            .wrapping_add(h1)
            .wrapping_mul(5)
            .wrapping_add(0x3849_5ab5);
    }
    let tail = blocks.remainder();
    // Sign-extended tail bytes: Cassandra's `(long) key.get(i) << shift`.
    let signed = |i: usize, shift: usize| ((tail[i] as i8 as i64) << shift) as u64;
    if tail.len() > 8 {
        let mut k2 = 0u64;
        for i in 8..tail.len() {
            k2 ^= signed(i, (i - 8) * 8);
        }
        h2 ^= mix_k2(k2);
    }
    if !tail.is_empty() {
        let mut k1 = 0u64;
        for i in 0..tail.len().min(8) {
            k1 ^= signed(i, i * 8);
        }
        h1 ^= mix_k1(k1);
    }
    let len = data.len() as u64;
    h1 ^= len;
    h2 ^= len;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    h1 = fmix(h1);
    h2 = fmix(h2);
    h1 = h1.wrapping_add(h2);
    h1 as i64
}

/// The Murmur3Partitioner token of an already serialized partition key.
pub fn token_of_bytes(key: &[u8]) -> i64 {
    if key.is_empty() {
        return i64::MIN;
    }
    match murmur3_h1(key) {
        i64::MIN => i64::MAX,
        t => t,
    }
}

/// The CQL serialization of a partition key component (`None` for types
/// that cannot be part of a partition key here).
fn value_bytes(v: &CqlValue) -> Option<Vec<u8>> {
    Some(match v {
        CqlValue::Ascii(s) | CqlValue::Text(s) => s.as_bytes().to_vec(),
        CqlValue::Blob(b) => b.clone(),
        CqlValue::Boolean(b) => vec![u8::from(*b)],
        CqlValue::Int(i) => i.to_be_bytes().to_vec(),
        CqlValue::BigInt(i) | CqlValue::Timestamp(i) | CqlValue::Time(i) => {
            i.to_be_bytes().to_vec()
        }
        CqlValue::Counter(i) => i.to_be_bytes().to_vec(),
        CqlValue::SmallInt(i) => i.to_be_bytes().to_vec(),
        CqlValue::TinyInt(i) => i.to_be_bytes().to_vec(),
        CqlValue::Date(d) => d.to_be_bytes().to_vec(),
        CqlValue::Double(bits) => bits.to_be_bytes().to_vec(),
        CqlValue::Float(bits) => bits.to_be_bytes().to_vec(),
        CqlValue::Uuid(u) | CqlValue::Timeuuid(u) => u.as_bytes().to_vec(),
        CqlValue::Inet(IpAddr::V4(ip)) => ip.octets().to_vec(),
        CqlValue::Inet(IpAddr::V6(ip)) => ip.octets().to_vec(),
        _ => return None,
    })
}

/// The bytes the partitioner hashes for a partition key given as its
/// column values in key order (`None` for an unsupported key type or a
/// composite component longer than 65535 bytes).
pub fn partition_key_bytes(values: &[CqlValue]) -> Option<Vec<u8>> {
    match values {
        [single] => value_bytes(single),
        many => {
            let mut out = Vec::new();
            for v in many {
                let b = value_bytes(v)?;
                out.extend(u16::try_from(b.len()).ok()?.to_be_bytes());
                out.extend(b);
                out.push(0);
            }
            Some(out)
        }
    }
}

/// The token of a stored partition key (`None` if it cannot be hashed).
pub fn token_of_partition(pk: &PartitionKeyValue) -> Option<i64> {
    let bytes = match pk {
        PartitionKeyValue::Simple(v) => partition_key_bytes(std::slice::from_ref(v))?,
        PartitionKeyValue::Composite(vs) => partition_key_bytes(vs)?,
        PartitionKeyValue::Empty => Vec::new(),
    };
    Some(token_of_bytes(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cassandra_int_key_tokens() {
        // `SELECT token(k)` for `k int` in Cassandra (cqlsh and dtest fixtures).
        for (k, token) in [
            (1, -4069959284402364209),
            (2, -3248873570005575792),
            (5, -7509452495886106294),
            (10, -6715243485458697746),
        ] {
            assert_eq!(
                token_of_partition(&PartitionKeyValue::Simple(CqlValue::Int(k))),
                Some(token),
                "int {k}"
            );
        }
    }

    #[test]
    fn text_key_tokens_and_special_cases() {
        // Vectors from the scylla driver's partitioner tests.
        for (s, token) in [
            ("test", -6017608668500074083),
            ("xd", 4507812186440344727),
            ("primary_key", -1632642444691073360),
            ("kremówki", 4354931215268080151),
        ] {
            assert_eq!(token_of_bytes(s.as_bytes()), token, "{s}");
        }
        assert_eq!(token_of_bytes(&[]), i64::MIN);
    }
}
