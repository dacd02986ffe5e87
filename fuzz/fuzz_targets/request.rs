//! Arbitrary bytes as the body of `POST /messages` and as the digest of
//! `GET /messages/{digest}`: decoding never panics, and whatever is accepted survives the
//! trip through the event the write path appends.
#![no_main]

use ingest::PostMessage;
use libfuzzer_sys::fuzz_target;
use msghash_common::http::RequestBody;
use msghash_common::{Digest, MessageHashed};

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = PostMessage::decode(data) {
        let event = MessageHashed::new(body.message);
        let back = MessageHashed::decode(Some(event.key()), Some(&event.encode()))
            .expect("an accepted message's event decodes");
        assert_eq!(back.digest, event.digest);
        assert_eq!(back.message, event.message);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(digest) = Digest::parse(text) {
            assert_eq!(digest.to_hex(), text.to_ascii_lowercase());
        }
    }
});
