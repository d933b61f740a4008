//! The features the edges serve, built once by the server and handed to both edges whole.
//! A new feature is a field here and its line where the server builds this; its handlers
//! live with the feature's own edge code (as `http/repository.rs` does for the fleet).

use crate::{fleet::Fleet, streams::Streams};

#[derive(Clone)]
pub struct Features {
    /// Decoupled models' responses: ModelStreamInfer, generate and generate_stream.
    pub streams: Streams,
    /// Model control on every endpoint.
    pub fleet: Fleet,
}
