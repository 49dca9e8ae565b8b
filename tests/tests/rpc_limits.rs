//! What one RPC client can make the daemon hold (issue 15, item 5): frames over the limit,
//! frames begun and never finished, idle connections, and a user's connections past
//! `[rpc] max_connections_per_user` are each ended, while the daemon goes on serving
//! everyone else.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Output;
use std::time::{Duration, Instant};

use cyb_proto::CybClient;
use cyb_tests::{Daemon, TestConfig, root_and_test_user, shown, text};

/// The request frame limit of a daemon with the default `max_job_bytes` (1 MiB).
const MAX_FRAME: u32 = (2 << 20) + (64 << 10);

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// Seconds until the daemon closes `c` (read gives end-of-file or an error), at most
/// `limit`; `None` if it is still open then.
fn closed_within(c: &mut UnixStream, limit: Duration) -> Option<f64> {
    let t0 = Instant::now();
    c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut b = [0u8; 4096];
    while t0.elapsed() < limit {
        match c.read(&mut b) {
            Ok(0) => return Some(t0.elapsed().as_secs_f64()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(t0.elapsed().as_secs_f64()),
        }
    }
    None
}

/// Lines of the daemon's log that contain every one of `words`.
fn log_lines(d: &Daemon, words: &[&str]) -> usize {
    d.log()
        .lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .count()
}

#[test]
fn a_frame_over_the_limit_closes_that_connection_and_nothing_else() {
    let d = Daemon::start();
    let mut idle = UnixStream::connect(d.socket()).unwrap();
    let mut c = UnixStream::connect(d.socket()).unwrap();
    c.write_all(&(MAX_FRAME + 1).to_be_bytes()).unwrap();
    // The daemon reads no further than the header.
    let _ = c.write_all(&[b'x'; 64 << 10]);
    let closed = closed_within(&mut c, Duration::from_secs(5));
    assert!(closed.is_some(), "still open; log:\n{}", d.log());
    let limit = MAX_FRAME.to_string();
    assert!(
        cyb_tests::wait_until(Duration::from_secs(5), || log_lines(
            &d,
            &["WARN", "frame of", &(MAX_FRAME + 1).to_string(), &limit]
        ) == 1),
        "no warning naming the frame and the limit; log:\n{}",
        d.log()
    );
    // A frame of exactly the limit is read on (and refused later, as a request too large).
    let mut at_limit = UnixStream::connect(d.socket()).unwrap();
    at_limit.write_all(&MAX_FRAME.to_be_bytes()).unwrap();
    at_limit.write_all(&[b' '; 1024]).unwrap();
    assert_eq!(closed_within(&mut at_limit, Duration::from_millis(500)), None);
    // Everyone else is served as before, and the idle connection is still there.
    let out = d.ctl(&["ls"]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    let out = d.ctl(&["submit", "--wait", "--", "sh", "-c", "exit 5"]);
    assert_eq!(code(&out), 5, "{}\nlog:\n{}", shown(&out), d.log());
    assert_eq!(closed_within(&mut idle, Duration::from_millis(200)), None);
    assert!(!d.log().contains("panicked"), "log:\n{}", d.log());
}

#[test]
fn a_frame_begun_and_not_finished_is_closed_after_the_header_timeout() {
    let d = Daemon::start_with(
        TestConfig::new()
            .rpc_header_timeout(Duration::from_secs(1))
            .rpc_idle_timeout(Duration::from_secs(30)),
    );
    let mut idle = UnixStream::connect(d.socket()).unwrap();
    let mut c = UnixStream::connect(d.socket()).unwrap();
    let t0 = Instant::now();
    c.write_all(&100u32.to_be_bytes()).unwrap();
    c.write_all(br#"{"Request":{"#).unwrap();
    let closed = closed_within(&mut c, Duration::from_secs(10));
    let after = t0.elapsed().as_secs_f64();
    assert!(
        closed.is_some() && (0.9..5.0).contains(&after),
        "closed after {after:.2} s ({closed:?}); log:\n{}",
        d.log()
    );
    assert_eq!(
        log_lines(&d, &["WARN", "did not finish it within 1s", "rpc.header_timeout"]),
        1,
        "log:\n{}",
        d.log()
    );
    // A connection that sent nothing is idle, not slow: it is still open.
    assert_eq!(closed_within(&mut idle, Duration::from_millis(200)), None);
    // Requests whose bytes come in slowly but within the timeout are served.
    let out = d.ctl(&["ls"]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
}

#[test]
fn an_idle_connection_is_closed_after_the_idle_timeout_but_a_waiting_one_is_not() {
    let d = Daemon::start_with(TestConfig::new().rpc_idle_timeout(Duration::from_secs(1)));
    // `cybctl wait` holds one request for longer than the idle timeout.
    let id = d.submit(&[], &["sh", "-c", "sleep 2.5; exit 7"]);
    let t0 = Instant::now();
    let wait = d
        .ctl_cmd(&["wait", &id.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut idle = UnixStream::connect(d.socket()).unwrap();
    let t1 = Instant::now();
    let closed = closed_within(&mut idle, Duration::from_secs(5));
    let after = t1.elapsed().as_secs_f64();
    assert!(
        closed.is_some() && (0.9..3.0).contains(&after),
        "idle connection closed after {after:.2} s ({closed:?}); log:\n{}",
        d.log()
    );
    let wait = wait.wait_with_output().unwrap();
    assert_eq!(code(&wait), 7, "{}\nlog:\n{}", shown(&wait), d.log());
    assert!(t0.elapsed() > Duration::from_secs(2), "{:?}", t0.elapsed());

    // A connection that made a call is closed once it has been idle as long, quietly.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(d.socket()).await.unwrap();
        let client = CybClient::new(
            tarpc::client::Config::default(),
            cyb_proto::rpc::transport(stream),
        )
        .spawn();
        let ctx = || {
            let mut c = tarpc::context::current();
            c.deadline = Instant::now() + Duration::from_secs(5);
            c
        };
        client.stats(ctx()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.stats(ctx()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let r = client.stats(ctx()).await;
        assert!(r.is_err(), "still served after 2.5 s idle: {r:?}");
    });
    assert_eq!(log_lines(&d, &["WARN"]), 0, "log:\n{}", d.log());
}

#[test]
fn a_user_past_the_connection_cap_is_refused_while_others_are_served() {
    let Some((uid, gid)) = root_and_test_user() else {
        return;
    };
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    let cap = 3;
    let d = Daemon::start_with(TestConfig::new().rpc_max_connections_per_user(cap));
    let sock = d.socket();
    let ls_as = |uid: u32, gid: u32| -> (Output, Duration) {
        let t0 = Instant::now();
        let out = d
            .ctl_cmd(&["ls"])
            .uid(uid)
            .gid(gid)
            .current_dir("/")
            .output()
            .expect("run cybctl");
        (out, t0.elapsed())
    };
    // The test user holds as many idle connections as it may.
    let s = sock.clone();
    let mut held = cyb_tests::as_user(uid, gid, move || {
        (0..cap)
            .map(|_| UnixStream::connect(&s).unwrap())
            .collect::<Vec<_>>()
    })
    .unwrap();
    // Its next one is refused with an error naming the key; three tries, one warning.
    for _ in 0..3 {
        let (out, _) = ls_as(uid, gid);
        assert_eq!(code(&out), 69, "{}\nlog:\n{}", shown(&out), d.log());
        let err = text(&out.stderr);
        assert!(
            err.contains("too many connections") && err.contains("max_connections_per_user"),
            "{err}"
        );
    }
    assert_eq!(
        log_lines(&d, &["WARN", &format!("refused a connection of uid {uid}")]),
        1,
        "log:\n{}",
        d.log()
    );
    // Another user, and root, are served at once.
    let (out, took) = ls_as(nobody.uid.as_raw(), nobody.gid.as_raw());
    assert_eq!(code(&out), 0, "{}", shown(&out));
    assert!(took < Duration::from_secs(1), "{took:?}");
    let out = d.ctl(&["ls"]);
    assert_eq!(code(&out), 0, "{}", shown(&out));
    // Once it closes one, it may connect again.
    held.pop();
    let ok = cyb_tests::wait_until(Duration::from_secs(5), || code(&ls_as(uid, gid).0) == 0);
    assert!(ok, "still refused after closing a connection; log:\n{}", d.log());
    drop(held);
}
