//! gRPC ModelInferRequest bytes: decode, validate, then split into chunks of at most
//! `max` rows and concatenate them back. A request that validates must split and re-join to
//! the same tensors, whatever its shapes and sizes.
#![no_main]

#[path = "model.rs"]
mod model;

use infergate::{batch::split, proto::inference::ModelInferRequest};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&max, rest)) = data.split_first() else {
        return;
    };
    let Ok(mut req) = ModelInferRequest::decode(rest) else {
        return;
    };
    req.model_name = "fuzz".into();
    let Ok(v) = infergate::infer::validate::validate(&mut req, &model::model()) else {
        return;
    };
    let rows = v.batch_size.unwrap_or(0);
    let max = i64::from(max % 8) + 1;
    if rows <= 0 {
        return;
    }
    let chunks = split::split_request(&req, rows, max).expect("a valid request splits");
    assert_eq!(chunks.iter().map(|(_, n)| n).sum::<i64>(), rows);
    assert!(chunks.iter().all(|(_, n)| (1..=max).contains(n)));
    let parts: Vec<&ModelInferRequest> = chunks.iter().map(|(c, _)| c).collect();
    let joined = split::concat_requests(&parts);
    assert_eq!(joined.raw_input_contents, req.raw_input_contents);
    for (a, b) in joined.inputs.iter().zip(&req.inputs) {
        assert_eq!((&a.name, &a.shape), (&b.name, &b.shape));
    }
});
