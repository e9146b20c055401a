//! Arbitrary bytes from a replication peer through the frame decoder: it
//! must never panic nor allocate past its limit, and a frame it accepts
//! encodes back to a frame that decodes to the same message. Inputs whose
//! first byte is odd get their checksum fixed first, so the body decoders
//! (JSON, record batches, zstd) see arbitrary bodies too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rewind_vhost_blk::replication::frame::{decode, reseal, Encoder};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let mut stream = stream.to_vec();
    if mode & 1 == 1 {
        reseal(&mut stream);
    }
    let mut rest = &stream[..];
    while let Ok((frame, used)) = decode(rest) {
        for compress in [false, true] {
            let mut encoder = Encoder::new(compress).expect("zstd context");
            let again = encoder.encode(frame.epoch, &frame.message);
            let (decoded, _) = decode(&again.bytes).expect("an encoded frame decodes");
            assert_eq!(decoded, frame);
        }
        rest = &rest[used..];
    }
});
