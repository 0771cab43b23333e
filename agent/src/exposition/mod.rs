//! The metrics endpoint: TorchServe's text format and the HTTP server that serves it.

pub mod access;
pub mod server;
pub mod text;
pub mod torchserve;
