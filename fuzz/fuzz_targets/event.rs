//! Arbitrary records as the projector reads them from the log: decoding never panics, and
//! whatever is accepted encodes back to the same event (to the millisecond the envelope
//! keeps).
#![no_main]

use libfuzzer_sys::fuzz_target;
use msghash_common::{Digest, MessageHashed};
use std::time::{SystemTime, UNIX_EPOCH};

fuzz_target!(|data: &[u8]| {
    // The first byte says how the record is made of the rest:
    //   bits 0-1, the key: 0 the digest of the value's "message" when it has one (so that
    //   the fuzzer reaches the accepted path), 1 none, 2 the first 32 bytes, 3 the first
    //   n bytes with n in bits 2-6;
    //   bit 7: no value.
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let raw_len = match flags & 0b11 {
        2 => 32,
        3 => usize::from((flags >> 2) & 0x1f),
        _ => 0,
    }
    .min(rest.len());
    let (raw_key, value) = rest.split_at(raw_len);
    let derived;
    let key = match flags & 0b11 {
        0 => {
            derived = serde_json::from_slice::<serde_json::Value>(value)
                .ok()
                .and_then(|v| v.get("message")?.as_str().map(Digest::of));
            derived.as_ref().map(|d| d.as_bytes().as_slice())
        }
        1 => None,
        _ => Some(raw_key),
    };
    let value = (flags & 0x80 == 0).then_some(value);

    if let Ok(event) = MessageHashed::decode(key, value) {
        let again = MessageHashed::decode(Some(event.key()), Some(&event.encode()))
            .expect("a decoded event re-encodes");
        assert_eq!(again.digest, event.digest);
        assert_eq!(again.message, event.message);
        assert_eq!(millis(again.received_at), millis(event.received_at));
    }
});

fn millis(t: SystemTime) -> Option<u128> {
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_millis())
}
