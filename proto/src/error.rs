//! Errors shared by daemon and client: a spec error that names its field, and the errors an
//! RPC call can return.

use serde::{Deserialize, Serialize};

/// A job spec that cannot be accepted, and the field to blame where there is one.
///
/// Serialized as `{"error": "...", "field": "..."}`, the shape of a rejected file's
/// `.error.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct SpecError {
    #[serde(rename = "error")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field `{field}`: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl SpecError {
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            message: message.into(),
            field: Some(field.into()),
        }
    }

    pub fn general(message: impl Into<String>) -> Self {
        SpecError {
            message: message.into(),
            field: None,
        }
    }

    /// Turns a serde_json error at `path` (as serde_path_to_error prints it, `.` for the
    /// root) into a spec error naming the field.
    pub fn from_json(path: &str, e: &serde_json::Error) -> Self {
        let msg = e.to_string();
        let path = if path == "." || path.is_empty() {
            None
        } else {
            Some(path.to_string())
        };
        // serde names an unknown field only in its message: "unknown field `x`, expected ...".
        if let Some(rest) = msg.strip_prefix("unknown field `")
            && let Some(end) = rest.find('`')
        {
            let name = &rest[..end];
            // serde_path_to_error already ends the path with the unknown name.
            let field = match &path {
                Some(p) if p == name || p.ends_with(&format!(".{name}")) => p.clone(),
                Some(p) => format!("{p}.{name}"),
                None => name.to_string(),
            };
            return SpecError::field(field, msg);
        }
        if e.is_syntax() || e.is_eof() {
            return SpecError::general(format!("the job file is not valid JSON: {msg}"));
        }
        match path {
            Some(p) => SpecError::field(p, msg),
            None => SpecError::general(msg),
        }
    }
}

/// Why an RPC call was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RpcError {
    #[error("invalid job: {0}")]
    InvalidSpec(SpecError),
    #[error("no job {0}")]
    NotFound(u64),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}
