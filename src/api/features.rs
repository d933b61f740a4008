//! The features the edges serve, built once by the server and handed to both edges whole.
//! A new feature is a field here and its line where the server builds this; its handlers
//! live with the feature's own edge code (as `http/repository.rs` does for the fleet).

use std::sync::Arc;

use crate::{fleet::Fleet, openai::OpenAi, streams::Streams};

#[derive(Clone)]
pub struct Features {
    /// Decoupled models' responses: ModelStreamInfer, generate and generate_stream.
    pub streams: Streams,
    /// Model control on every endpoint.
    pub fleet: Fleet,
    /// OpenAI's API over generate models (`/v1/chat/completions`, …).
    pub openai: Arc<OpenAi>,
}
