//! Which requests may share a call: the batch key, and the parameters that keep a request
//! alone or that infergate consumes itself.

use std::{collections::HashMap, fmt::Write as _, sync::Arc};

use crate::proto::inference::{InferParameter, ModelInferRequest};

/// Request parameters that sequence (stateful) models use: such requests are never batched.
const SEQUENCE_PARAMS: &[&str] = &["sequence_id", "sequence_start", "sequence_end"];
/// Parameters infergate consumes rather than forwards.
pub(super) const OWN_PARAMS: &[&str] = &["priority", "timeout"];

/// Whether a request may share a call with others; sequence requests go alone.
pub fn request_is_batchable(req: &ModelInferRequest) -> bool {
    !req.parameters
        .keys()
        .any(|k| SEQUENCE_PARAMS.contains(&k.as_str()))
}

/// Requests with equal keys can be concatenated: same inputs in the same order with equal
/// datatypes and non-batch dimensions, and the same parameters. Requested outputs without
/// parameters do not count: the batch asks for their union and each member gets its own
/// (`split::select_outputs`). Output parameters (a classification count) change what Triton
/// returns, so such requests share a call only with requests naming the same outputs with
/// the same parameters. Built on every batched request, so the common case (no parameters)
/// writes names and numbers straight into one string, without `Debug` formatting; each name
/// is written after its length, so no name can pass for another's separators.
pub(super) fn batch_key(req: &ModelInferRequest) -> Arc<str> {
    let mut k = String::with_capacity(96);
    for i in &req.inputs {
        push_name(&mut k, &i.name);
        push_name(&mut k, &i.datatype);
        for &d in i.shape.iter().skip(1) {
            push_int(&mut k, d);
            k.push(',');
        }
        if !i.parameters.is_empty() {
            let _ = write!(k, "{:?}", sorted(&i.parameters));
        }
        k.push(';');
    }
    k.push('|');
    if req.outputs.iter().any(|o| !o.parameters.is_empty()) {
        let mut outs: Vec<_> = req.outputs.iter().collect();
        outs.sort_by(|a, b| a.name.cmp(&b.name));
        for o in outs {
            push_name(&mut k, &o.name);
            let _ = write!(k, "{:?}", sorted(&o.parameters));
            k.push(';');
        }
    }
    k.push('|');
    if req
        .parameters
        .keys()
        .any(|name| !OWN_PARAMS.contains(&name.as_str()))
    {
        let params: Vec<_> = sorted(&req.parameters)
            .into_iter()
            .filter(|(name, _)| !OWN_PARAMS.contains(&name.as_str()))
            .collect();
        let _ = write!(k, "{params:?}");
    }
    k.into()
}

fn push_name(k: &mut String, s: &str) {
    push_int(k, s.len() as i64);
    k.push(':');
    k.push_str(s);
}

/// Decimal digits without `write!`: the formatting machinery cost more than the rest of the
/// key (callgrind, loadtest/BENCHMARKS.md).
fn push_int(k: &mut String, n: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut v = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        k.push('-');
    }
    k.push_str(std::str::from_utf8(&digits[at..]).expect("ASCII digits"));
}

fn sorted(p: &HashMap<String, InferParameter>) -> Vec<(&String, &InferParameter)> {
    let mut v: Vec<_> = p.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::{
        infer_parameter::ParameterChoice,
        model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    };

    fn req(rows: i64, dims: &[i64], outputs: &[&str]) -> ModelInferRequest {
        let input = |name: &str| InferInputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape: [&[rows][..], dims].concat(),
            ..Default::default()
        };
        ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![input("INPUT0"), input("INPUT1")],
            outputs: outputs
                .iter()
                .map(|&n| InferRequestedOutputTensor {
                    name: n.into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn int(v: i64) -> InferParameter {
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(v)),
        }
    }

    #[test]
    fn requests_that_can_share_a_call_have_one_key() {
        let a = req(3, &[16], &["OUT0", "OUT1"]);
        // Another row count, the outputs in another order, its own priority and timeout.
        let mut b = req(7, &[16], &["OUT1", "OUT0"]);
        b.id = "other".into();
        b.parameters.insert("priority".into(), int(1));
        b.parameters.insert("timeout".into(), int(5000));
        assert_eq!(batch_key(&a), batch_key(&b));
        // Other outputs, or none named (all of them): the call asks for the union.
        assert_eq!(batch_key(&a), batch_key(&req(3, &[16], &["OUT0"])));
        assert_eq!(batch_key(&a), batch_key(&req(3, &[16], &[])));
    }

    #[test]
    fn requests_that_cannot_share_a_call_have_different_keys() {
        let base = batch_key(&req(3, &[16], &["OUT0"]));
        let mut other_dtype = req(3, &[16], &["OUT0"]);
        other_dtype.inputs[1].datatype = "FP64".into();
        let mut renamed = req(3, &[16], &["OUT0"]);
        renamed.inputs[0].name = "X".into();
        let mut with_param = req(3, &[16], &["OUT0"]);
        with_param.parameters.insert("mode".into(), int(2));
        let mut tensor_param = req(3, &[16], &["OUT0"]);
        tensor_param.inputs[0].parameters.insert("p".into(), int(1));
        let mut out_param = req(3, &[16], &["OUT0"]);
        out_param.outputs[0]
            .parameters
            .insert("classification".into(), int(3));
        let others = [
            batch_key(&req(3, &[8], &["OUT0"])),
            batch_key(&req(3, &[16, 1], &["OUT0"])),
            batch_key(&req(3, &[-16], &["OUT0"])),
            batch_key(&other_dtype),
            batch_key(&renamed),
            batch_key(&with_param),
            batch_key(&tensor_param),
            batch_key(&out_param),
        ];
        for (n, k) in others.iter().enumerate() {
            assert_ne!(&base, k, "case {n}");
        }
    }

    #[test]
    fn key_numbers_are_written_as_format_writes_them() {
        for n in [0, 7, -7, 10, 1234567890, i64::MAX, i64::MIN, -1] {
            let mut k = String::new();
            push_int(&mut k, n);
            assert_eq!(k, n.to_string());
        }
    }

    #[test]
    fn names_cannot_imitate_the_separators() {
        // Without lengths, these two would both read "a:FP32:..." in some order.
        let mut a = req(1, &[2], &[]);
        a.inputs.truncate(1);
        a.inputs[0].name = "a".into();
        let mut b = a.clone();
        b.inputs[0].name = "a:FP32:2,;1:a".into();
        b.inputs[0].datatype = "FP32".into();
        assert_ne!(batch_key(&a), batch_key(&b));
        let mut n = String::new();
        for v in [0, 7, -42, i64::MAX, i64::MIN] {
            n.clear();
            push_int(&mut n, v);
            assert_eq!(n, v.to_string());
        }
    }
}
