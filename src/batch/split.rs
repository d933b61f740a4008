//! Moving rows between requests: split a client batch into chunks, concatenate member requests
//! into one Triton call, split the batched response back per member, and put chunk responses
//! back together. Fixed-size tensors are cut with `Bytes::slice` (no copy); concatenation copies
//! each member's tensor once, never element by element.

use bytes::BytesMut;

use crate::{
    error::GatewayError,
    proto::inference::{
        ModelInferRequest, ModelInferResponse, model_infer_request::InferRequestedOutputTensor,
    },
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

/// The outputs a batch asks Triton for: all of them when a member names none, else every
/// output some member names, in the order first named.
fn union_outputs(members: &[&ModelInferRequest]) -> Vec<InferRequestedOutputTensor> {
    if members.iter().any(|m| m.outputs.is_empty()) {
        return Vec::new();
    }
    let mut union: Vec<InferRequestedOutputTensor> = Vec::with_capacity(members[0].outputs.len());
    for m in members {
        for o in &m.outputs {
            if !union.iter().any(|u| u.name == o.name) {
                union.push(o.clone());
            }
        }
    }
    union
}

/// Concatenates compatible members (same inputs and non-batch dims) into one request that asks
/// for the union of their outputs.
pub fn concat_requests(members: &[&ModelInferRequest]) -> ModelInferRequest {
    let first = members[0];
    let total: i64 = members.iter().map(|m| m.inputs[0].shape[0]).sum();
    let mut out = ModelInferRequest {
        model_name: first.model_name.clone(),
        model_version: first.model_version.clone(),
        id: String::new(),
        parameters: first.parameters.clone(),
        inputs: first.inputs.clone(),
        outputs: union_outputs(members),
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

/// Gives a member of a batch only the outputs it named: its batch may have asked for more.
/// They keep the order Triton sent them in, as they would had the member gone alone (Triton
/// lists outputs in the model's order, whatever order a request names them in). Only for
/// members that named outputs: one that names none gets all of them.
pub fn select_outputs(
    part: ModelInferResponse,
    wanted: &[InferRequestedOutputTensor],
) -> Result<ModelInferResponse, GatewayError> {
    let is_wanted = |name: &str| wanted.iter().any(|w| w.name == name);
    if let Some(w) = wanted
        .iter()
        .find(|w| !part.outputs.iter().any(|o| o.name == w.name))
    {
        return Err(internal(format!("Triton returned no output '{}'", w.name)));
    }
    if part.outputs.iter().all(|o| is_wanted(&o.name)) {
        return Ok(part);
    }
    if part.raw_output_contents.len() != part.outputs.len() {
        return Err(internal("outputs without raw contents".into()));
    }
    let (outputs, raw) = part
        .outputs
        .into_iter()
        .zip(part.raw_output_contents)
        .filter(|(o, _)| is_wanted(&o.name))
        .unzip();
    Ok(ModelInferResponse {
        outputs,
        raw_output_contents: raw,
        ..part
    })
}

/// Puts the responses of a split client batch back together, in chunk order. Outputs are
/// matched by name: chunks answered alone and in batches (which asked Triton for other
/// outputs) need not list them in the same order.
pub fn concat_responses(
    parts: Vec<ModelInferResponse>,
) -> Result<ModelInferResponse, GatewayError> {
    let mut parts = parts.into_iter();
    let mut out = parts.next().expect("at least one chunk");
    let rest: Vec<ModelInferResponse> = parts.collect();
    if rest.is_empty() {
        return Ok(out);
    }
    for (i, o) in out.outputs.iter_mut().enumerate() {
        let first = out
            .raw_output_contents
            .get(i)
            .ok_or_else(|| internal(format!("output '{}' has no raw contents", o.name)))?;
        let mut buf = BytesMut::from(first.as_ref());
        for p in &rest {
            let j = if p.outputs.get(i).is_some_and(|q| q.name == o.name) {
                i
            } else {
                p.outputs
                    .iter()
                    .position(|q| q.name == o.name)
                    .ok_or_else(|| internal(format!("a chunk has no output '{}'", o.name)))?
            };
            let part = p
                .raw_output_contents
                .get(j)
                .ok_or_else(|| internal(format!("output '{}' has no raw contents", o.name)))?;
            // Triton answered each chunk alone or in a batch; either way a batched model's
            // outputs lead with the rows. An answer without that dimension is refused, not
            // indexed.
            let rows = p.outputs[j].shape.first().copied();
            match (o.shape.first_mut(), rows) {
                (Some(total), Some(rows)) => *total += rows,
                _ => {
                    return Err(internal(format!(
                        "a chunk's output '{}' has no batch dimension",
                        o.name
                    )));
                }
            }
            buf.extend_from_slice(part);
        }
        out.raw_output_contents[i] = buf.freeze();
    }
    Ok(out)
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
            concat_responses(parts).unwrap().raw_output_contents,
            resp.raw_output_contents
        );
        // A response whose batch dimension disagrees is an error for everyone, not a bad split.
        assert!(split_response(&resp, &[1, 1]).is_err());
    }

    fn named(names: &[&str]) -> Vec<InferRequestedOutputTensor> {
        names
            .iter()
            .map(|&n| InferRequestedOutputTensor {
                name: n.into(),
                ..Default::default()
            })
            .collect()
    }

    fn names(outputs: &[InferOutputTensor]) -> Vec<&str> {
        outputs.iter().map(|o| o.name.as_str()).collect()
    }

    /// One row of outputs X, Y, Z (one INT8 each: 1, 2, 3), listed in `order`.
    fn answer(order: &[&str]) -> ModelInferResponse {
        let value = |n: &str| match n {
            "X" => 1u8,
            "Y" => 2,
            _ => 3,
        };
        ModelInferResponse {
            outputs: order
                .iter()
                .map(|&n| InferOutputTensor {
                    name: n.into(),
                    datatype: "INT8".into(),
                    shape: vec![1, 1],
                    ..Default::default()
                })
                .collect(),
            raw_output_contents: order.iter().map(|&n| Bytes::from(vec![value(n)])).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_batch_asks_for_the_union_and_each_member_gets_what_it_named() {
        let mut a = req(1, 0);
        a.outputs = named(&["Y"]);
        let mut b = req(1, 0);
        b.outputs = named(&["Z", "Y"]);
        let union = |members: &[&ModelInferRequest]| {
            let call = concat_requests(members);
            call.outputs.into_iter().map(|o| o.name).collect::<Vec<_>>()
        };
        assert_eq!(union(&[&a, &b]), vec!["Y", "Z"]);
        // A member naming none asks for all, so the batch does too.
        assert!(union(&[&a, &req(1, 0), &b]).is_empty());

        let from_triton = answer(&["X", "Y", "Z"]);
        let only_y = select_outputs(from_triton.clone(), &named(&["Y"])).unwrap();
        assert_eq!(names(&only_y.outputs), vec!["Y"]);
        assert_eq!(only_y.raw_output_contents, vec![Bytes::from(vec![2u8])]);
        // Triton's order, as the member would get it alone; each with its own contents.
        let y_z = select_outputs(from_triton.clone(), &named(&["Z", "Y"])).unwrap();
        assert_eq!(names(&y_z.outputs), vec!["Y", "Z"]);
        assert_eq!(
            y_z.raw_output_contents,
            vec![Bytes::from(vec![2u8]), Bytes::from(vec![3u8])]
        );
        let err = select_outputs(answer(&["X"]), &named(&["Y"])).unwrap_err();
        assert!(err.to_string().contains("no output 'Y'"), "{err}");
    }

    #[test]
    fn chunks_are_joined_by_output_name_whatever_their_order() {
        let joined = concat_responses(vec![answer(&["X", "Y"]), answer(&["Y", "X"])]).unwrap();
        assert_eq!(names(&joined.outputs), vec!["X", "Y"]);
        assert_eq!(joined.outputs[0].shape, vec![2, 1]);
        assert_eq!(
            joined.raw_output_contents,
            vec![Bytes::from(vec![1u8, 1]), Bytes::from(vec![2u8, 2])]
        );
        assert!(concat_responses(vec![answer(&["X", "Y"]), answer(&["X"])]).is_err());
        // A chunk whose output lost its batch dimension is an error, never a panic.
        let mut flat = answer(&["X", "Y"]);
        flat.outputs[1].shape.clear();
        let err = concat_responses(vec![answer(&["X", "Y"]), flat]).unwrap_err();
        assert!(err.to_string().contains("no batch dimension"), "{err}");
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
