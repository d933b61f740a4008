//! HTTP infer bodies: JSON tensors and the binary tensor extension (the first input byte picks
//! the framing and the JSON header length). Decoding and validation must answer Ok or a clear
//! error, never panic, hang or allocate from a declared size.
#![no_main]

#[path = "model.rs"]
mod model;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    if mode & 1 == 1 && rest.len() >= 2 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        headers.insert(
            "inference-header-content-length",
            http::HeaderValue::from(len.min(rest.len() + 8)),
        );
    }
    let body = Bytes::copy_from_slice(if mode & 1 == 1 && rest.len() >= 2 {
        &rest[2..]
    } else {
        rest
    });
    if let Ok((mut req, _prefs)) =
        infergate::api::http::codec::decode_request("fuzz", "", &headers, body)
    {
        let _ = infergate::infer::validate::validate(&mut req, &model::model());
    }
});
