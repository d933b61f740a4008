//! How a shadow's answer compares with the primary's: whether they are the same, and for
//! numeric outputs the largest absolute difference.

use crate::proto::inference::ModelInferResponse;

/// `(exact, max_abs_diff)`: exact when every output has the same name, datatype, shape and
/// bytes; the difference over the numeric outputs present in both (None when there are none,
/// or their shapes differ).
pub fn compare(primary: &ModelInferResponse, shadow: &ModelInferResponse) -> (bool, Option<f64>) {
    let mut exact = primary.outputs.len() == shadow.outputs.len()
        && primary.raw_output_contents.len() == shadow.raw_output_contents.len();
    let mut max: Option<f64> = None;
    for (i, out) in primary.outputs.iter().enumerate() {
        let Some(j) = shadow.outputs.iter().position(|o| o.name == out.name) else {
            exact = false;
            continue;
        };
        let other = &shadow.outputs[j];
        let (a, b) = (
            primary.raw_output_contents.get(i),
            shadow.raw_output_contents.get(j),
        );
        if out.datatype != other.datatype || out.shape != other.shape || a != b {
            exact = false;
        }
        if out.datatype != other.datatype || out.shape != other.shape {
            continue;
        }
        let (Some(a), Some(b)) = (a, b) else { continue };
        if let (Some(x), Some(y)) = (numbers(&out.datatype, a), numbers(&out.datatype, b)) {
            let d = x
                .iter()
                .zip(&y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f64, f64::max);
            max = Some(max.map_or(d, |m| m.max(d)));
        }
    }
    (exact, max)
}

/// A raw little-endian tensor of a numeric datatype, as f64.
fn numbers(datatype: &str, raw: &[u8]) -> Option<Vec<f64>> {
    fn each<const N: usize>(raw: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
        raw.chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunk of N")))
            .collect()
    }
    Some(match datatype {
        "FP32" => each(raw, |b| f32::from_le_bytes(b).into()),
        "FP64" => each(raw, f64::from_le_bytes),
        "INT32" => each(raw, |b| i32::from_le_bytes(b).into()),
        "INT64" => each(raw, |b| i64::from_le_bytes(b) as f64),
        "UINT8" => raw.iter().map(|&b| b.into()).collect(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::model_infer_response::InferOutputTensor;

    fn answer(values: &[f32]) -> ModelInferResponse {
        ModelInferResponse {
            outputs: vec![InferOutputTensor {
                name: "OUT".into(),
                datatype: "FP32".into(),
                shape: vec![1, values.len() as i64],
                ..Default::default()
            }],
            raw_output_contents: vec![values.iter().flat_map(|v| v.to_le_bytes()).collect()],
            ..Default::default()
        }
    }

    #[test]
    fn same_answers_match_and_numbers_give_their_largest_difference() {
        assert_eq!(
            compare(&answer(&[1.0, 2.0]), &answer(&[1.0, 2.0])),
            (true, Some(0.0))
        );
        let (exact, diff) = compare(&answer(&[1.0, 2.0]), &answer(&[1.0, 2.5]));
        assert!(!exact);
        assert_eq!(diff, Some(0.5));
        let (exact, diff) = compare(&answer(&[1.0]), &answer(&[1.0, 2.0]));
        assert_eq!(
            (exact, diff),
            (false, None),
            "shapes differ: no difference to give"
        );
    }
}
