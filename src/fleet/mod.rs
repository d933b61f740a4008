//! The fleet: several Triton endpoints that infergate fronts as one. Model control (the
//! repository extension's load and unload, [`control`]) reaches every endpoint rather than
//! the one a Service would pick, and its answer says how each endpoint did.

pub mod config;
pub mod control;

pub use config::FleetConfig;
pub use control::{Action, Fleet, Outcome};
