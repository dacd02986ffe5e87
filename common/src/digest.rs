//! The SHA-256 digest that names a message.
//!
//! A `Digest` can only be built by hashing a message or by parsing 64 hex characters, so
//! anything past the HTTP edge that holds one holds a well-formed digest.

use sha2::{Digest as _, Sha256};
use std::fmt;

/// The SHA-256 of a message's UTF-8 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Hashes a message.
    pub fn of(message: &str) -> Self {
        Digest(Sha256::digest(message.as_bytes()).into())
    }

    /// Parses 64 hex characters, upper- or lower-case. Anything else is `None`: a malformed
    /// digest names no message.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 64 {
            return None;
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Digest(bytes))
    }

    /// Reads the 32 raw bytes used as the event key and the read-model primary key.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Digest)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The lower-case hex form clients see.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOO: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    #[test]
    fn hashes_like_sha256sum() {
        assert_eq!(Digest::of("foo").to_hex(), FOO);
        assert_eq!(
            Digest::of("").to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn parses_lower_and_upper_case_as_the_same_digest() {
        let lower = Digest::parse(FOO).expect("valid");
        let upper = Digest::parse(&FOO.to_uppercase()).expect("valid");
        assert_eq!(lower, upper);
        assert_eq!(upper.to_string(), FOO);
    }

    #[test]
    fn rejects_malformed_digests() {
        for bad in [
            "",
            "abc",
            &FOO[..63],
            &format!("{FOO}0"),
            &format!("{}g", &FOO[..63]),
            &format!("{}é", &FOO[..62]),
            " 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7a",
        ] {
            assert!(Digest::parse(bad).is_none(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn raw_bytes_round_trip_and_reject_wrong_lengths() {
        let d = Digest::of("foo");
        assert_eq!(Digest::from_bytes(d.as_bytes()), Some(d));
        assert_eq!(Digest::from_bytes(&d.as_bytes()[..31]), None);
    }
}
