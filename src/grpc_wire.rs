//! gRPC's wire as infergate speaks it on both sides: to callers on its own listener
//! (`api::grpc`) and to Triton with its lean client (`backend::h2_infer`). Both use what is
//! here, so a frame, a deadline or a status is read and written one way: the 5-byte message
//! prefix, the ModelInfer path, the HTTP/2 windows, `grpc-timeout` and the status carried in
//! headers or trailers.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use prost::Message;
use tonic::{Code, Status};

/// The one call both sides serve without tonic.
pub const MODEL_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";
pub const MODEL_STREAM_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

/// HTTP/2 receive windows, on the listener and towards Triton (hyper's client defaults): a
/// large tensor needs few WINDOW_UPDATE round trips.
pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// gRPC's header names read or written on every call, parsed once (a name given as `&str` is
/// parsed on every lookup).
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub static GRPC_STATUS_DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
pub static GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
pub static GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");

/// Compressed flag and big-endian length, before every message.
pub const PREFIX_LEN: usize = 5;

/// What a message's prefix says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub compressed: bool,
    pub len: usize,
}

/// The prefix at the start of `buf`, once five bytes are there.
pub fn read_prefix(buf: &[u8]) -> Option<Prefix> {
    let p: [u8; PREFIX_LEN] = buf.get(..PREFIX_LEN)?.try_into().ok()?;
    Some(Prefix {
        compressed: p[0] != 0,
        len: u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize,
    })
}

/// A message over the limit that applies to it (or over the 32-bit prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    pub len: usize,
    pub limit: usize,
}

/// `msg` as one uncompressed frame, refused past `limit` bytes.
pub fn encode_frame<M: Message>(msg: &M, limit: usize) -> Result<Bytes, TooLarge> {
    let len = msg.encoded_len();
    // The prefix is 32 bits; a limit may allow up to 4 GiB, one byte more.
    let Some(prefix) = u32::try_from(len).ok().filter(|_| len <= limit) else {
        return Err(TooLarge { len, limit });
    };
    let mut buf = BytesMut::with_capacity(PREFIX_LEN + len);
    buf.put_u8(0);
    buf.put_u32(prefix);
    // The length is known and the room reserved: no second length pass, no error case.
    msg.encode_raw(&mut buf);
    Ok(buf.freeze())
}

/// Why bytes are not exactly one uncompressed frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("{0} bytes, too short for a gRPC message")]
    Short(usize),
    #[error("a compressed message, which was not asked for")]
    Compressed,
    #[error("{held} bytes after the prefix, which announces {announced}")]
    Length { held: usize, announced: usize },
}

/// Checks that `data` is exactly one length-prefixed, uncompressed message.
pub fn check_frame(data: &[u8]) -> Result<(), FrameError> {
    let prefix = read_prefix(data).ok_or(FrameError::Short(data.len()))?;
    if prefix.compressed {
        return Err(FrameError::Compressed);
    }
    let held = data.len() - PREFIX_LEN;
    if held != prefix.len {
        return Err(FrameError::Length {
            held,
            announced: prefix.len,
        });
    }
    Ok(())
}

/// The caller's deadline from `grpc-timeout` (`<digits><unit>`).
pub fn read_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(&GRPC_TIMEOUT)?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    // At most 8 digits on the wire; more is not a timeout gRPC could have sent.
    if num.is_empty() || num.len() > 8 {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `budget` as a `grpc-timeout` value in whole milliseconds (at least 1, at most 8 digits).
/// The remaining budget differs from call to call, so it is sent as a literal HPACK never
/// indexes: it would churn the connection's header table otherwise.
pub fn timeout_value(budget: Duration) -> HeaderValue {
    let ms = budget.as_millis().clamp(1, 99_999_999);
    let mut v = HeaderValue::from_str(&format!("{ms}m"))
        .expect("digits and a unit are a valid header value");
    v.set_sensitive(true);
    v
}

/// The status in `grpc-status`/`grpc-message`, if any (headers of a trailers-only answer, or
/// trailers). Status details are not forwarded.
pub fn status_from_headers(mut headers: HeaderMap) -> Option<Status> {
    if headers.get(&GRPC_STATUS)? == "0" {
        // Every answer's trailers: no message or details to read.
        return Some(Status::new(Code::Ok, ""));
    }
    // tonic panics on details that are not base64; infergate does not use them.
    headers.remove(&GRPC_STATUS_DETAILS);
    Status::from_header_map(&headers)
}

/// gRPC's mapping for an answer that is not HTTP 200.
pub fn status_for_http(status: http::StatusCode) -> Status {
    let code = match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(code, format!("HTTP {status} in place of a gRPC answer"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::ModelInferResponse;

    #[test]
    fn frames_carry_their_length_and_are_checked() {
        let msg = ModelInferResponse {
            model_name: "m".repeat(100),
            ..Default::default()
        };
        let f = encode_frame(&msg, 1024).unwrap();
        assert_eq!(
            read_prefix(&f),
            Some(Prefix {
                compressed: false,
                len: f.len() - PREFIX_LEN
            })
        );
        assert_eq!(check_frame(&f), Ok(()));
        assert_eq!(
            encode_frame(&msg, 50).unwrap_err(),
            TooLarge {
                len: msg.encoded_len(),
                limit: 50
            }
        );
        let mut compressed = f.to_vec();
        compressed[0] = 1;
        assert_eq!(check_frame(&compressed), Err(FrameError::Compressed));
        assert!(matches!(
            check_frame(&f[..f.len() - 1]),
            Err(FrameError::Length { .. })
        ));
        assert_eq!(check_frame(&[0, 0]), Err(FrameError::Short(2)));
        assert_eq!(read_prefix(&[0, 0, 0, 0]), None);
    }

    #[test]
    fn timeouts_read_every_unit_and_write_milliseconds_never_indexed() {
        let mut h = HeaderMap::new();
        for (v, d) in [
            ("5S", Duration::from_secs(5)),
            ("250m", Duration::from_millis(250)),
            ("7u", Duration::from_micros(7)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3600)),
            ("9n", Duration::from_nanos(9)),
        ] {
            h.insert(&GRPC_TIMEOUT, HeaderValue::from_static(v));
            assert_eq!(read_timeout(&h), Some(d), "{v}");
        }
        for bad in ["5x", "m", "123456789m", "-1S"] {
            h.insert(&GRPC_TIMEOUT, HeaderValue::from_static(bad));
            assert_eq!(read_timeout(&h), None, "{bad}");
        }
        let v = timeout_value(Duration::from_millis(1500));
        assert_eq!(v, "1500m");
        assert!(v.is_sensitive());
        assert_eq!(timeout_value(Duration::ZERO), "1m");
        assert_eq!(timeout_value(Duration::from_secs(1 << 40)), "99999999m");
        h.insert(&GRPC_TIMEOUT, timeout_value(Duration::from_millis(42)));
        assert_eq!(read_timeout(&h), Some(Duration::from_millis(42)));
    }

    #[test]
    fn statuses_come_from_headers_and_bad_details_do_not_panic() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("3"));
        h.insert("grpc-message", HeaderValue::from_static("bad%20shape"));
        h.insert("grpc-status-details-bin", HeaderValue::from_static("%%%"));
        let s = status_from_headers(h).unwrap();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "bad shape");
        assert!(status_from_headers(HeaderMap::new()).is_none());
        let mut ok = HeaderMap::new();
        ok.insert("grpc-status", HeaderValue::from_static("0"));
        assert_eq!(status_from_headers(ok).unwrap().code(), Code::Ok);
        // Only "0" is OK: anything else goes through tonic's parsing.
        let mut odd = HeaderMap::new();
        odd.insert("grpc-status", HeaderValue::from_static("00x"));
        assert_ne!(status_from_headers(odd).unwrap().code(), Code::Ok);
        assert_eq!(
            status_for_http(http::StatusCode::SERVICE_UNAVAILABLE).code(),
            Code::Unavailable
        );
    }
}
