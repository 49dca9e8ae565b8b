//! mounts placeholder
