//! The `MessageHashed` event and its wire form.
//!
//! Key: the 32 raw digest bytes. Value: a versioned JSON envelope,
//! `{"v":1,"message":"...","received_at":"2026-11-25T13:35:30.123Z"}`, readable with any
//! Kafka tool. Decoding checks that the message really hashes to the key, so a corrupted or
//! foreign record is rejected as undecodable instead of being projected under a wrong name.

use crate::Digest;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

/// The only envelope version this build writes.
pub const EVENT_VERSION: u32 = 1;

/// A message was accepted and hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageHashed {
    pub digest: Digest,
    pub message: String,
    pub received_at: SystemTime,
}

impl MessageHashed {
    pub fn new(message: String) -> Self {
        MessageHashed {
            digest: Digest::of(&message),
            message,
            received_at: SystemTime::now(),
        }
    }

    /// The record key.
    pub fn key(&self) -> &[u8] {
        self.digest.as_bytes()
    }

    /// The record value.
    pub fn encode(&self) -> Vec<u8> {
        // RFC 3339 holds years 1970 (here) to 9999: a clock outside them is written as the
        // nearest time it can hold, never a panic in the POST that reads it.
        let last = SystemTime::UNIX_EPOCH + Duration::from_millis(253_402_300_799_999);
        let at = self.received_at.clamp(SystemTime::UNIX_EPOCH, last);
        let received_at = humantime::format_rfc3339_millis(at).to_string();
        let envelope = EnvelopeOut {
            v: EVENT_VERSION,
            message: &self.message,
            received_at: &received_at,
        };
        // Serialising a struct of strings and an integer cannot fail.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }

    /// Reads a record back. Any failure means the record is poison: it is dead-lettered,
    /// never retried.
    pub fn decode(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Self, DecodeError> {
        let key = key.ok_or(DecodeError::MissingKey)?;
        let digest = Digest::from_bytes(key).ok_or(DecodeError::BadKey(key.len()))?;
        let value = value.ok_or(DecodeError::MissingValue)?;
        let version: VersionOnly =
            serde_json::from_slice(value).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if version.v != EVENT_VERSION {
            return Err(DecodeError::UnsupportedVersion(version.v));
        }
        let envelope: EnvelopeIn =
            serde_json::from_slice(value).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        let received_at = humantime::parse_rfc3339(&envelope.received_at)
            .map_err(|e| DecodeError::Malformed(format!("received_at: {e}")))?;
        if Digest::of(&envelope.message) != digest {
            return Err(DecodeError::DigestMismatch);
        }
        Ok(MessageHashed {
            digest,
            message: envelope.message,
            received_at,
        })
    }
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    v: u32,
    message: &'a str,
    received_at: &'a str,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    message: String,
    received_at: String,
}

/// Why a record is not a `MessageHashed` event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record has no key")]
    MissingKey,
    #[error("record key has {0} bytes, expected 32")]
    BadKey(usize),
    #[error("record has no value")]
    MissingValue,
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u32),
    #[error("message does not hash to the record key")]
    DigestMismatch,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(message: &str) -> MessageHashed {
        MessageHashed {
            digest: Digest::of(message),
            message: message.to_owned(),
            received_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_077_730_123),
        }
    }

    #[test]
    fn round_trips_through_the_versioned_envelope() {
        for m in ["foo", "", "héllo 🌍 日本\n\"quoted\"\u{0}"] {
            let e = event(m);
            let back = MessageHashed::decode(Some(e.key()), Some(&e.encode())).expect("decodes");
            assert_eq!(back, e);
        }
    }

    /// A clock outside what RFC 3339 can write (before 1970, after 9999) must not panic
    /// the POST that reads it, nor write a record that the projector cannot read back:
    /// the time is written as the nearest one it can hold.
    #[test]
    fn a_clock_outside_rfc_3339_is_written_as_the_nearest_time_it_can_hold() {
        let before_1970 = SystemTime::UNIX_EPOCH - Duration::from_secs(86_400);
        let year_10000 = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800 + 86_400);
        for (at, written) in [
            (before_1970, "1970-01-01T00:00:00.000Z"),
            (year_10000, "9999-12-31T23:59:59.999Z"),
        ] {
            let e = MessageHashed {
                received_at: at,
                ..event("foo")
            };
            let value: serde_json::Value = serde_json::from_slice(&e.encode()).expect("json");
            assert_eq!(value["received_at"], written);
            let back = MessageHashed::decode(Some(e.key()), Some(&e.encode())).expect("decodes");
            assert_eq!(back.message, "foo");
        }
    }

    #[test]
    fn envelope_is_inspectable_json() {
        let value: serde_json::Value =
            serde_json::from_slice(&event("foo").encode()).expect("json");
        assert_eq!(value["v"], 1);
        assert_eq!(value["message"], "foo");
        assert_eq!(value["received_at"], "2025-11-25T13:35:30.123Z");
    }

    #[test]
    fn reads_envelopes_with_extra_fields() {
        let e = event("foo");
        let value =
            br#"{"v":1,"message":"foo","received_at":"2025-11-25T13:35:30.123Z","trace":"x"}"#;
        assert_eq!(MessageHashed::decode(Some(e.key()), Some(value)), Ok(e));
    }

    #[test]
    fn rejects_undecodable_records() {
        let e = event("foo");
        let good = e.encode();
        let bar = Digest::of("bar");
        type Case<'a> = (Option<&'a [u8]>, Option<&'a [u8]>, DecodeError);
        let cases: Vec<Case> = vec![
            (None, Some(&good), DecodeError::MissingKey),
            (Some(b"short"), Some(&good), DecodeError::BadKey(5)),
            (Some(e.key()), None, DecodeError::MissingValue),
            (
                Some(e.key()),
                Some(br#"{"v":2,"message":"foo"}"#),
                DecodeError::UnsupportedVersion(2),
            ),
            (
                Some(bar.as_bytes()),
                Some(&good),
                DecodeError::DigestMismatch,
            ),
        ];
        for (key, value, want) in cases {
            assert_eq!(MessageHashed::decode(key, value), Err(want));
        }
        for garbage in [&b"\xff\x00garbage"[..], b"{}", br#"{"v":1,"message":7}"#] {
            assert!(matches!(
                MessageHashed::decode(Some(e.key()), Some(garbage)),
                Err(DecodeError::Malformed(_))
            ));
        }
    }
}
