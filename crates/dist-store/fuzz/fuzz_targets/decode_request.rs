//! Fuzzes the request and reply decoders: no panic, no allocation beyond the input, and
//! every complete request re-encodes to the bytes it was decoded from.
//!
//! Run: `cd crates/dist-store/fuzz && cargo +nightly fuzz run decode_request`.
#![no_main]

use dist_store::proto::{decode_reply, decode_request, Decoded, Limits, ReplyKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let lim = Limits::torch();
    let mut buf = data;
    // Decode a stream of requests, as the server does.
    while !buf.is_empty() {
        match decode_request(buf, &lim) {
            Ok(Decoded::Complete(req, used)) => {
                assert!(used > 0 && used <= buf.len());
                assert_eq!(req.to_bytes(), &buf[..used]);
                buf = &buf[used..];
            }
            Ok(Decoded::NeedMore { min_len }) => {
                assert!(min_len > buf.len());
                break;
            }
            Err(_) => break,
        }
    }
    for kind in [
        ReplyKind::Value,
        ReplyKind::Values(3),
        ReplyKind::I64,
        ReplyKind::U32,
        ReplyKind::Check,
        ReplyKind::Wait,
        ReplyKind::QueuePop,
        ReplyKind::Auth,
    ] {
        if let Ok(Decoded::Complete(_, used)) = decode_reply(kind, data, &lim) {
            assert!(used <= data.len());
        }
    }
});
