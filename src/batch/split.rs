//! Moving rows between requests: split a client batch into chunks, concatenate member requests
//! into one Triton call, split the batched response back per member, and put chunk responses
//! back together. Fixed-size tensors are cut with `Bytes::slice` (no copy); concatenation copies
//! each member's tensor once, never element by element.

use bytes::BytesMut;

use crate::{
    error::GatewayError,
    proto::inference::{ModelInferRequest, ModelInferResponse},
    tensor::{DataType, element_count},
};

fn internal(msg: String) -> GatewayError {
    GatewayError::Internal(msg)
}

/// Byte offsets of the `rows + 1` row boundaries of a raw tensor with `rows` rows.
pub fn row_offsets(
    dtype: DataType,
    raw: &[u8],
    rows: usize,
    elems_per_row: u64,
) -> Result<Vec<usize>, String> {
    if let Some(size) = dtype.byte_size() {
        if rows == 0 || !raw.len().is_multiple_of(rows) {
            return Err(format!("{} bytes do not split into {rows} rows", raw.len()));
        }
        let row = raw.len() / rows;
        if elems_per_row.checked_mul(size as u64) != Some(row as u64) {
            return Err(format!(
                "row of {row} bytes is not {elems_per_row} elements of {size}"
            ));
        }
        return Ok((0..=rows).map(|r| r * row).collect());
    }
    // BYTES: walk the length framing, marking a boundary every `elems_per_row` elements.
    let mut offsets = Vec::with_capacity(rows + 1);
    offsets.push(0);
    let (mut pos, mut in_row) = (0usize, 0u64);
    while pos < raw.len() {
        let len_bytes: [u8; 4] = raw
            .get(pos..pos + 4)
            .and_then(|s| s.try_into().ok())
            .ok_or("truncated BYTES length")?;
        pos += 4 + u32::from_le_bytes(len_bytes) as usize;
        if pos > raw.len() {
            return Err("BYTES element overruns the tensor".into());
        }
        in_row += 1;
        if in_row == elems_per_row {
            offsets.push(pos);
            in_row = 0;
        }
    }
    if elems_per_row == 0 {
        offsets.resize(rows + 1, 0);
    }
    if offsets.len() != rows + 1 || in_row != 0 {
        return Err(format!("BYTES tensor does not hold {rows} whole rows"));
    }
    Ok(offsets)
}

fn elems_per_row(shape: &[i64]) -> u64 {
    element_count(shape.get(1..).unwrap_or(&[])).unwrap_or(0)
}

fn dtype(name: &str) -> Result<DataType, GatewayError> {
    DataType::parse(name).ok_or_else(|| internal(format!("unknown datatype '{name}'")))
}

/// Splits a validated request of `rows` rows into chunks of at most `max` rows, in order.
pub fn split_request(
    req: &ModelInferRequest,
    rows: i64,
    max: i64,
) -> Result<Vec<(ModelInferRequest, i64)>, GatewayError> {
    let mut cuts = Vec::with_capacity(req.inputs.len());
    for (inp, raw) in req.inputs.iter().zip(&req.raw_input_contents) {
        cuts.push(
            row_offsets(
                dtype(&inp.datatype)?,
                raw,
                rows as usize,
                elems_per_row(&inp.shape),
            )
            .map_err(|e| GatewayError::invalid(format!("input '{}': {e}", inp.name)))?,
        );
    }
    let mut chunks = Vec::new();
    let mut start = 0i64;
    while start < rows {
        let n = max.min(rows - start);
        let (a, b) = (start as usize, (start + n) as usize);
        let mut chunk = req.clone();
        for (i, inp) in chunk.inputs.iter_mut().enumerate() {
            inp.shape[0] = n;
            chunk.raw_input_contents[i] = req.raw_input_contents[i].slice(cuts[i][a]..cuts[i][b]);
        }
        chunks.push((chunk, n));
        start += n;
    }
    Ok(chunks)
}

/// Concatenates compatible members (same inputs, non-batch dims and outputs) into one request.
pub fn concat_requests(members: &[&ModelInferRequest]) -> ModelInferRequest {
    let first = members[0];
    let total: i64 = members.iter().map(|m| m.inputs[0].shape[0]).sum();
    let mut out = ModelInferRequest {
        model_name: first.model_name.clone(),
        model_version: first.model_version.clone(),
        id: String::new(),
        parameters: first.parameters.clone(),
        inputs: first.inputs.clone(),
        outputs: first.outputs.clone(),
        raw_input_contents: Vec::with_capacity(first.inputs.len()),
    };
    for (i, inp) in out.inputs.iter_mut().enumerate() {
        inp.shape[0] = total;
        let len = members.iter().map(|m| m.raw_input_contents[i].len()).sum();
        let mut buf = BytesMut::with_capacity(len);
        for m in members {
            buf.extend_from_slice(&m.raw_input_contents[i]);
        }
        out.raw_input_contents.push(buf.freeze());
    }
    out
}

/// Splits a batched response back into one response per member, by each member's rows.
pub fn split_response(
    resp: &ModelInferResponse,
    member_rows: &[i64],
) -> Result<Vec<ModelInferResponse>, GatewayError> {
    let total: i64 = member_rows.iter().sum();
    let mut cuts = Vec::with_capacity(resp.outputs.len());
    for (i, out) in resp.outputs.iter().enumerate() {
        if out.shape.first() != Some(&total) {
            return Err(internal(format!(
                "Triton returned output '{}' with shape {:?} for a batch of {total} rows",
                out.name, out.shape
            )));
        }
        let raw = resp
            .raw_output_contents
            .get(i)
            .ok_or_else(|| internal(format!("output '{}' has no raw contents", out.name)))?;
        cuts.push(
            row_offsets(
                dtype(&out.datatype)?,
                raw,
                total as usize,
                elems_per_row(&out.shape),
            )
            .map_err(|e| internal(format!("output '{}': {e}", out.name)))?,
        );
    }
    let mut parts = Vec::with_capacity(member_rows.len());
    let mut start = 0usize;
    for &rows in member_rows {
        let end = start + rows as usize;
        let mut part = ModelInferResponse {
            model_name: resp.model_name.clone(),
            model_version: resp.model_version.clone(),
            id: String::new(),
            parameters: resp.parameters.clone(),
            outputs: resp.outputs.clone(),
            raw_output_contents: Vec::with_capacity(resp.outputs.len()),
        };
        for (i, out) in part.outputs.iter_mut().enumerate() {
            out.shape[0] = rows;
            part.raw_output_contents
                .push(resp.raw_output_contents[i].slice(cuts[i][start]..cuts[i][end]));
        }
        parts.push(part);
        start = end;
    }
    Ok(parts)
}

/// Puts the responses of a split client batch back together, in chunk order.
pub fn concat_responses(parts: Vec<ModelInferResponse>) -> ModelInferResponse {
    let mut parts = parts.into_iter();
    let mut out = parts.next().expect("at least one chunk");
    let rest: Vec<ModelInferResponse> = parts.collect();
    if rest.is_empty() {
        return out;
    }
    for (i, o) in out.outputs.iter_mut().enumerate() {
        let mut buf = BytesMut::from(out.raw_output_contents[i].as_ref());
        for p in &rest {
            o.shape[0] += p.outputs[i].shape[0];
            buf.extend_from_slice(&p.raw_output_contents[i]);
        }
        out.raw_output_contents[i] = buf.freeze();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::{
        model_infer_request::InferInputTensor, model_infer_response::InferOutputTensor,
    };
    use bytes::Bytes;

    fn words(items: &[&str]) -> Bytes {
        let mut v = Vec::new();
        for s in items {
            v.extend_from_slice(&(s.len() as u32).to_le_bytes());
            v.extend_from_slice(s.as_bytes());
        }
        v.into()
    }

    fn req(rows: i64, base: u8) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![
                InferInputTensor {
                    name: "A".into(),
                    datatype: "UINT8".into(),
                    shape: vec![rows, 2],
                    ..Default::default()
                },
                InferInputTensor {
                    name: "S".into(),
                    datatype: "BYTES".into(),
                    shape: vec![rows, 1],
                    ..Default::default()
                },
            ],
            raw_input_contents: vec![
                (0..rows as u8 * 2)
                    .map(|i| base + i)
                    .collect::<Vec<u8>>()
                    .into(),
                words(
                    &(0..rows)
                        .map(|i| if i % 2 == 0 { "x" } else { "long" })
                        .collect::<Vec<_>>(),
                ),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn split_then_concat_gives_back_the_request() {
        let r = req(5, 10);
        let chunks = split_request(&r, 5, 2).unwrap();
        assert_eq!(
            chunks.iter().map(|c| c.1).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
        assert_eq!(
            chunks[1].0.raw_input_contents[0].as_ref(),
            &[14, 15, 16, 17]
        );
        assert_eq!(chunks[2].0.raw_input_contents[1], words(&["x"]));
        let members: Vec<&ModelInferRequest> = chunks.iter().map(|c| &c.0).collect();
        let joined = concat_requests(&members);
        assert_eq!(joined.raw_input_contents, r.raw_input_contents);
        assert_eq!(joined.inputs[0].shape, vec![5, 2]);
    }

    #[test]
    fn a_batched_response_splits_by_member_rows() {
        let resp = ModelInferResponse {
            model_name: "m".into(),
            outputs: vec![InferOutputTensor {
                name: "O".into(),
                datatype: "INT16".into(),
                shape: vec![3, 1],
                ..Default::default()
            }],
            raw_output_contents: vec![Bytes::from_static(&[1, 0, 2, 0, 3, 0])],
            ..Default::default()
        };
        let parts = split_response(&resp, &[1, 2]).unwrap();
        assert_eq!(parts[0].raw_output_contents[0].as_ref(), &[1, 0]);
        assert_eq!(parts[1].outputs[0].shape, vec![2, 1]);
        assert_eq!(parts[1].raw_output_contents[0].as_ref(), &[2, 0, 3, 0]);
        assert_eq!(
            concat_responses(parts).raw_output_contents,
            resp.raw_output_contents
        );
        // A response whose batch dimension disagrees is an error for everyone, not a bad split.
        assert!(split_response(&resp, &[1, 1]).is_err());
    }

    #[test]
    fn bytes_rows_must_be_whole() {
        let raw = words(&["a", "b", "c"]);
        assert_eq!(
            row_offsets(DataType::Bytes, &raw, 3, 1).unwrap(),
            vec![0, 5, 10, 15]
        );
        assert!(row_offsets(DataType::Bytes, &raw, 2, 2).is_err());
        assert!(row_offsets(DataType::Bytes, &raw[..7], 2, 1).is_err());
    }
}
