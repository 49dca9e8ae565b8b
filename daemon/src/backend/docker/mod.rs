//! (placeholder doc)

pub mod image;
pub mod mounts;
