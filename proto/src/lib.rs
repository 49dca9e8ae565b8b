//! Types shared by `cybd` and `cybctl`: the job spec, job records and states, the RPC
//! service, and errors. No I/O happens here.

pub mod error;
pub mod gpu;
pub mod job;
pub mod paths;
pub mod rpc;
pub mod spec;

pub use error::{RpcError, SpecError};
pub use job::{
    CallbackState, CallbackStatus, JobId, JobRecord, JobState, Outcome, Owner, Reason, RunResult, StateName,
    Timestamp,
};
pub use rpc::{Cyb, CybClient, JobSummary, ListFilter, NotEnforced, Stats, SubmitRequest, Submitted};
pub use spec::{Class, JobSpec, parse_job};
