//! Sequence affinity: the requests of a stateful model's sequence (`sequence_id`, Triton's
//! sequence batcher) must all reach the one server that holds its state.
//!
//! The endpoint is chosen by rendezvous hashing of the sequence id over the endpoints that
//! hold the model, whatever their health: every infergate replica makes the same choice with
//! no table to share, and an endpoint that leaves moves only its own sequences. A sequence
//! whose endpoint is down fails (UNAVAILABLE, naming it) instead of moving: its state is
//! there. One that moved anyway (its endpoint left the fleet) is refused by Triton, which
//! knows no such sequence on the new endpoint, so a running sum is never silently wrong.

use crate::{
    proto::inference::{ModelInferRequest, infer_parameter::ParameterChoice},
    spread::stable_hash,
};

/// The request's sequence, when it belongs to one: Triton's `sequence_id` (a number or a
/// string; 0 and "" mean none).
pub fn sequence_of(req: &ModelInferRequest) -> Option<Sequence> {
    match req
        .parameters
        .get("sequence_id")?
        .parameter_choice
        .as_ref()?
    {
        ParameterChoice::Int64Param(0) | ParameterChoice::Uint64Param(0) => None,
        ParameterChoice::Int64Param(n) => Some(Sequence::Number(*n as u64)),
        ParameterChoice::Uint64Param(n) => Some(Sequence::Number(*n)),
        ParameterChoice::StringParam(s) if !s.is_empty() => Some(Sequence::Text(s.clone())),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sequence {
    Number(u64),
    Text(String),
}

impl std::fmt::Display for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Text(s) => write!(f, "'{s}'"),
        }
    }
}

impl Sequence {
    /// The sequence's score on the endpoint `url`; the highest score wins. The hash is
    /// stable across processes, builds and Rust versions, which a std hasher does not promise.
    pub fn score(&self, url: &str) -> u64 {
        match self {
            Self::Number(n) => stable_hash(&[&n.to_le_bytes(), url.as_bytes()]),
            Self::Text(s) => stable_hash(&[s.as_bytes(), url.as_bytes()]),
        }
    }

    /// The index of the winning URL among `urls` (`None` when there is none).
    pub fn choose<'a>(&self, urls: impl Iterator<Item = &'a str>) -> Option<usize> {
        urls.enumerate()
            .max_by_key(|(_, u)| self.score(u))
            .map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::InferParameter;

    fn with(p: ParameterChoice) -> ModelInferRequest {
        let mut r = ModelInferRequest::default();
        r.parameters.insert(
            "sequence_id".into(),
            InferParameter {
                parameter_choice: Some(p),
            },
        );
        r
    }

    #[test]
    fn a_sequence_id_is_a_number_or_a_string_and_zero_is_none() {
        assert_eq!(
            sequence_of(&with(ParameterChoice::Int64Param(7))),
            Some(Sequence::Number(7))
        );
        assert_eq!(
            sequence_of(&with(ParameterChoice::Uint64Param(7))),
            Some(Sequence::Number(7))
        );
        assert_eq!(
            sequence_of(&with(ParameterChoice::StringParam("a".into()))),
            Some(Sequence::Text("a".into()))
        );
        assert_eq!(sequence_of(&with(ParameterChoice::Int64Param(0))), None);
        assert_eq!(
            sequence_of(&with(ParameterChoice::StringParam(String::new()))),
            None
        );
        assert_eq!(sequence_of(&ModelInferRequest::default()), None);
    }

    #[test]
    fn sequences_spread_and_a_leaving_endpoint_moves_only_its_own() {
        let urls = [
            "http://10.0.0.1:8001",
            "http://10.0.0.2:8001",
            "http://10.0.0.3:8001",
        ];
        let mut per = [0usize; 3];
        let mut moved_elsewhere = 0;
        for n in 1..=3000u64 {
            let s = Sequence::Number(n);
            let i = s.choose(urls.iter().copied()).unwrap();
            per[i] += 1;
            // Without the third endpoint: only the third's sequences move.
            let j = s.choose(urls[..2].iter().copied()).unwrap();
            if i != 2 && i != j {
                moved_elsewhere += 1;
            }
        }
        assert_eq!(moved_elsewhere, 0);
        assert!(per.iter().all(|&k| (850..=1150).contains(&k)), "{per:?}");
        // The same choice every time, in any order of the endpoints.
        let s = Sequence::Text("order-42".into());
        let a = urls[s.choose(urls.iter().copied()).unwrap()];
        let reversed: Vec<&str> = urls.iter().rev().copied().collect();
        let b = reversed[s.choose(reversed.iter().copied()).unwrap()];
        assert_eq!(a, b);
    }
}
