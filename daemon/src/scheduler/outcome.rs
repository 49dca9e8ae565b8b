//! The outcome: how an attempt's typed end ([`AttemptEnd`]) and the job's retry policy
//! decide the job's next state. Pure, so every case is a unit test, whatever backend ran
//! the attempt.

use std::time::Duration;

use cyb_proto::job::{HeldGpu, JobState, Outcome, Reason, Timestamp};
use cyb_proto::spec::RetrySpec;

use crate::backend::{AttemptEnd, Exit, NotStarted};

/// What the scheduler knows about the attempt that ended.
pub struct Attempt<'a> {
    /// Attempts started so far, this one included.
    pub attempts: u32,
    pub retry: Option<&'a RetrySpec>,
    /// When the attempt was recorded as started.
    pub started_at: Timestamp,
    /// Who cancelled it, when someone did.
    pub cancel_by: Option<String>,
    /// The GPUs it held.
    pub gpus: Vec<HeldGpu>,
    /// Its time limit, where that came from and how to change it, in words.
    pub time_limit: String,
    pub now: Timestamp,
}

/// What becomes of the job.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing ran: queue it again, the attempt not counted.
    Requeue,
    /// Wait `delay`, then run attempt `attempt`; `state` is the `waiting` state.
    Retry {
        state: JobState,
        delay: Duration,
        attempt: u32,
    },
    /// It has ended.
    Finish(JobState),
}

/// The next state of a job whose attempt ended with `end`.
pub fn next(end: AttemptEnd, a: Attempt<'_>) -> Next {
    let AttemptEnd { exit, usage, errors } = end;
    let mut exit_code = None;
    let mut signal = None;
    let cancelled = |by: Option<String>, errors, code, signal| {
        let by = by.unwrap_or_else(|| "unknown (cancelled while cybd restarted)".to_string());
        let outcome = outcome(
            &a,
            &usage,
            errors,
            code,
            signal,
            Reason::Cancelled,
            format!("cancelled by {by}"),
        );
        Next::Finish(JobState::Cancelled {
            outcome: Box::new(outcome),
            by,
        })
    };
    let (state_of, reason, message): (fn(Outcome) -> JobState, Reason, String) = match exit {
        Exit::Cancelled { by, code, signal } => {
            return cancelled(a.cancel_by.clone().or(by), errors, code, signal);
        }
        // Cancelled while it was being started: it never ran, and never will.
        Exit::NotStarted(_) if a.cancel_by.is_some() => {
            return cancelled(a.cancel_by.clone(), errors, None, None);
        }
        Exit::NotStarted(NotStarted::Interrupted) => return Next::Requeue,
        Exit::NotStarted(NotStarted::Failed(why)) => (failed, Reason::SpawnFailed, why),
        Exit::TimedOut { code, signal: sig } => {
            exit_code = code;
            signal = sig;
            (
                |outcome| JobState::TimedOut {
                    outcome: Box::new(outcome),
                },
                Reason::Timeout,
                format!("the job ran past its time limit of {}", a.time_limit),
            )
        }
        Exit::Lost { why } => (failed, Reason::Lost, why),
        Exit::OomKilled { code, signal: sig } => {
            exit_code = code;
            signal = sig;
            let how = match (sig, code) {
                (Some(s), _) => format!("killed by signal {s}"),
                (None, Some(c)) => format!("exited with status {c}"),
                (None, None) => "ended".to_string(),
            };
            (
                failed,
                Reason::OomKilled,
                format!(
                    "the kernel's OOM killer ended a process of the job at its memory limit; the job {how}"
                ),
            )
        }
        Exit::Exited { code: 0 } => {
            exit_code = Some(0);
            (
                |outcome| JobState::Succeeded {
                    outcome: Box::new(outcome),
                },
                Reason::Success,
                "exited with status 0".into(),
            )
        }
        Exit::Exited { code } => {
            exit_code = Some(code);
            (failed, Reason::ExitCode, format!("exited with status {code}"))
        }
        Exit::Signaled { signal: s } => {
            signal = Some(s);
            let name = nix::sys::signal::Signal::try_from(s)
                .map(|s| s.as_str())
                .unwrap_or("unknown signal");
            (failed, Reason::Signal, format!("killed by signal {s} ({name})"))
        }
    };
    let outcome = outcome(&a, &usage, errors, exit_code, signal, reason, message);
    let timed_out = reason == Reason::Timeout;
    if reason != Reason::Success
        && let Some(policy) = a.retry
        && i64::from(a.attempts) < policy.max_attempts
        && (timed_out || policy.retries_exit(exit_code))
    {
        let attempt = a.attempts + 1;
        let delay = policy.delay_before(attempt);
        return Next::Retry {
            state: JobState::Waiting {
                until: Timestamp(a.now.0 + delay),
                next_attempt: attempt,
                last: Box::new(outcome),
            },
            delay,
            attempt,
        };
    }
    Next::Finish(state_of(outcome))
}

fn failed(outcome: Outcome) -> JobState {
    JobState::Failed {
        outcome: Box::new(outcome),
    }
}

fn outcome(
    a: &Attempt<'_>,
    usage: &crate::backend::Usage,
    errors: Vec<String>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    reason: Reason,
    message: String,
) -> Outcome {
    Outcome {
        reason,
        message,
        exit_code,
        signal,
        started_at: usage.started_at.or(Some(a.started_at)),
        finished_at: usage.finished_at.unwrap_or(a.now),
        peak_memory_bytes: usage.peak_memory_bytes,
        cpu_usage_ms: usage.cpu_ms,
        gpus: a.gpus.clone(),
        container_id: usage.container_id.clone(),
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Usage;

    fn t(secs: i64) -> Timestamp {
        Timestamp(time::OffsetDateTime::from_unix_timestamp(1_800_000_000 + secs).unwrap())
    }

    fn attempt(attempts: u32, retry: Option<&RetrySpec>) -> Attempt<'_> {
        Attempt {
            attempts,
            retry,
            started_at: t(0),
            cancel_by: None,
            gpus: vec![HeldGpu {
                index: 1,
                uuid: Some("GPU-b".into()),
            }],
            time_limit: "1m".into(),
            now: t(60),
        }
    }

    fn end(exit: Exit) -> AttemptEnd {
        AttemptEnd {
            exit,
            usage: Usage {
                started_at: Some(t(1)),
                finished_at: Some(t(50)),
                peak_memory_bytes: Some(1 << 20),
                cpu_ms: Some(700),
                container_id: None,
            },
            errors: vec!["artifacts not collected: x".into()],
        }
    }

    fn retry(max: i64, codes: &[i64]) -> RetrySpec {
        RetrySpec {
            max_attempts: max,
            backoff: Some(cyb_proto::spec::Dur(Duration::from_secs(10))),
            max_backoff: None,
            on_exit_codes: codes.to_vec(),
        }
    }

    fn finished(n: Next) -> JobState {
        match n {
            Next::Finish(s) => s,
            other => panic!("expected the job to end, got {other:?}"),
        }
    }

    #[test]
    fn success_keeps_usage_gpus_and_errors() {
        let s = finished(next(end(Exit::Exited { code: 0 }), attempt(1, None)));
        let JobState::Succeeded { outcome: o } = s else {
            panic!("{s:?}")
        };
        assert_eq!(o.reason, Reason::Success);
        assert_eq!(o.exit_code, Some(0));
        assert_eq!((o.started_at, o.finished_at), (Some(t(1)), t(50)));
        assert_eq!((o.peak_memory_bytes, o.cpu_usage_ms), (Some(1 << 20), Some(700)));
        assert_eq!(o.gpus[0].uuid.as_deref(), Some("GPU-b"));
        assert_eq!(o.errors, ["artifacts not collected: x"]);
        // Even with a retry policy, success is the end.
        let r = retry(3, &[]);
        assert!(matches!(
            next(end(Exit::Exited { code: 0 }), attempt(1, Some(&r))),
            Next::Finish(JobState::Succeeded { .. })
        ));
    }

    #[test]
    fn without_usage_the_recorded_start_and_now_are_the_times() {
        let s = finished(next(AttemptEnd::of(Exit::Exited { code: 2 }), attempt(1, None)));
        let o = s.outcome().unwrap();
        assert_eq!((o.started_at, o.finished_at), (Some(t(0)), t(60)));
        assert!(o.errors.is_empty());
    }

    #[test]
    fn an_exit_code_in_on_exit_codes_is_retried_and_one_outside_is_not() {
        let r = retry(3, &[75]);
        match next(end(Exit::Exited { code: 75 }), attempt(1, Some(&r))) {
            Next::Retry {
                state,
                delay,
                attempt,
            } => {
                assert_eq!((delay, attempt), (Duration::from_secs(10), 2));
                let JobState::Waiting {
                    until,
                    next_attempt,
                    last,
                } = state
                else {
                    panic!()
                };
                assert_eq!((until, next_attempt), (t(70), 2));
                assert_eq!((last.reason, last.exit_code), (Reason::ExitCode, Some(75)));
            }
            other => panic!("{other:?}"),
        }
        let s = finished(next(end(Exit::Exited { code: 3 }), attempt(1, Some(&r))));
        let JobState::Failed { outcome: o } = s else {
            panic!("{s:?}")
        };
        assert_eq!(
            (o.reason, o.exit_code, o.message.as_str()),
            (Reason::ExitCode, Some(3), "exited with status 3")
        );
        // No list: any failure is retried.
        let any = retry(2, &[]);
        assert!(matches!(
            next(end(Exit::Exited { code: 3 }), attempt(1, Some(&any))),
            Next::Retry { .. }
        ));
    }

    #[test]
    fn a_signal_fails_the_job_with_its_name_and_counts_as_a_failure_to_retry() {
        let s = finished(next(end(Exit::Signaled { signal: 11 }), attempt(1, None)));
        let o = s.outcome().unwrap();
        assert_eq!((o.reason, o.signal), (Reason::Signal, Some(11)));
        assert_eq!(o.message, "killed by signal 11 (SIGSEGV)");
        // A signal has no exit code, so a list of exit codes does not retry it.
        let codes = retry(3, &[1]);
        assert!(matches!(
            next(end(Exit::Signaled { signal: 9 }), attempt(1, Some(&codes))),
            Next::Finish(_)
        ));
        let any = retry(3, &[]);
        assert!(matches!(
            next(end(Exit::Signaled { signal: 9 }), attempt(1, Some(&any))),
            Next::Retry { .. }
        ));
    }

    #[test]
    fn oom_fails_the_job_saying_how_it_ended() {
        let s = finished(next(
            end(Exit::OomKilled {
                code: None,
                signal: Some(9),
            }),
            attempt(1, None),
        ));
        let JobState::Failed { outcome: o } = s else {
            panic!("{s:?}")
        };
        assert_eq!((o.reason, o.signal), (Reason::OomKilled, Some(9)));
        assert!(
            o.message.contains("OOM killer") && o.message.ends_with("killed by signal 9"),
            "{}",
            o.message
        );
        let s = finished(next(
            end(Exit::OomKilled {
                code: Some(1),
                signal: None,
            }),
            attempt(1, None),
        ));
        assert!(s.outcome().unwrap().message.ends_with("exited with status 1"));
    }

    #[test]
    fn a_timeout_ends_timed_out_and_is_retried_whatever_the_exit_codes() {
        let s = finished(next(
            end(Exit::TimedOut {
                code: None,
                signal: Some(9),
            }),
            attempt(1, None),
        ));
        let JobState::TimedOut { outcome: o } = s else {
            panic!("{s:?}")
        };
        assert_eq!((o.reason, o.signal), (Reason::Timeout, Some(9)));
        let codes = retry(2, &[42]);
        assert!(matches!(
            next(
                end(Exit::TimedOut {
                    code: None,
                    signal: Some(9)
                }),
                attempt(1, Some(&codes))
            ),
            Next::Retry { attempt: 2, .. }
        ));
    }

    #[test]
    fn a_cancel_ends_cancelled_by_who_and_is_never_retried() {
        let r = retry(5, &[]);
        let mut a = attempt(1, Some(&r));
        a.cancel_by = Some("alice".into());
        let s = finished(next(
            end(Exit::Cancelled {
                by: None,
                code: None,
                signal: Some(15),
            }),
            a,
        ));
        let JobState::Cancelled { outcome: o, by } = s else {
            panic!("{s:?}")
        };
        assert_eq!(
            (by.as_str(), o.reason, o.message.as_str()),
            ("alice", Reason::Cancelled, "cancelled by alice")
        );
        // Cancelled while cybd restarted: nobody here knows who.
        let s = finished(next(
            end(Exit::Cancelled {
                by: None,
                code: None,
                signal: Some(15),
            }),
            attempt(1, Some(&r)),
        ));
        assert!(matches!(s, JobState::Cancelled { by, .. } if by.starts_with("unknown")));
        // Cancelled while it was being started, whether or not the start went through.
        for exit in [
            Exit::NotStarted(NotStarted::Interrupted),
            Exit::NotStarted(NotStarted::Failed("no such file".into())),
        ] {
            let mut a = attempt(1, Some(&r));
            a.cancel_by = Some("bob".into());
            assert!(matches!(finished(next(end(exit), a)), JobState::Cancelled { by, .. } if by == "bob"));
        }
    }

    #[test]
    fn never_handed_over_is_queued_again_and_a_failed_start_fails() {
        assert_eq!(
            next(end(Exit::NotStarted(NotStarted::Interrupted)), attempt(1, None)),
            Next::Requeue
        );
        let s = finished(next(
            end(Exit::NotStarted(NotStarted::Failed("no such program: x".into()))),
            attempt(1, None),
        ));
        let o = s.outcome().unwrap();
        assert_eq!(
            (o.reason, o.message.as_str()),
            (Reason::SpawnFailed, "no such program: x")
        );
    }

    #[test]
    fn lost_fails_or_is_retried_by_the_policy() {
        let lost = || {
            end(Exit::Lost {
                why: "whatever ran it is gone".into(),
            })
        };
        let s = finished(next(lost(), attempt(1, None)));
        let o = s.outcome().unwrap();
        assert_eq!(
            (o.reason, o.message.as_str()),
            (Reason::Lost, "whatever ran it is gone")
        );
        let r = retry(2, &[]);
        assert!(matches!(
            next(lost(), attempt(1, Some(&r))),
            Next::Retry { attempt: 2, .. }
        ));
        // A list of exit codes: a lost attempt has none, so it is not retried.
        let codes = retry(2, &[1]);
        assert!(matches!(
            next(lost(), attempt(1, Some(&codes))),
            Next::Finish(JobState::Failed { .. })
        ));
    }

    #[test]
    fn the_last_attempt_ends_the_job() {
        let r = retry(3, &[]);
        assert!(matches!(
            next(end(Exit::Exited { code: 1 }), attempt(2, Some(&r))),
            Next::Retry { attempt: 3, .. }
        ));
        let s = finished(next(end(Exit::Exited { code: 1 }), attempt(3, Some(&r))));
        assert!(matches!(s, JobState::Failed { .. }));
        let s = finished(next(
            end(Exit::TimedOut {
                code: None,
                signal: Some(9),
            }),
            attempt(3, Some(&r)),
        ));
        assert!(matches!(s, JobState::TimedOut { .. }));
    }
}
