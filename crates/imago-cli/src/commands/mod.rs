//! One module per area of the command line; each command takes the shared [`crate::Context`].

pub mod archive;
pub mod build;
pub mod deploy;
pub mod images;
pub mod instances;
pub mod registry;
pub mod render;
pub mod volumes;
