//! End-to-end tests of job callbacks: a job with a `callback_url` gets its `result.json`
//! POSTed there, signed as Standard Webhooks specify, retried per `[callbacks] retry`
//! (through a kill -9 of cybd, with the same `webhook-id`), given up on 410, and refused at
//! intake when its host is not in `allowed_hosts`. The receiver is a real HTTP server on
//! 127.0.0.1.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use cyb_tests::{Daemon, wait_until};
use hmac::{Hmac, Mac};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);
/// A 24-byte key, as `whsec_` base64.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Got {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// An HTTP receiver on 127.0.0.1 answering the statuses in `script` in turn (the last one
/// from then on), recording every request.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Receiver {
    fn start(script: &[u16]) -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let (g, script) = (got.clone(), script.to_vec());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let (method, path) = (
                    parts.next().unwrap_or("").to_string(),
                    parts.next().unwrap_or("").to_string(),
                );
                let mut headers = BTreeMap::new();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let len = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; len];
                let _ = r.read_exact(&mut body);
                let n = {
                    let mut g = g.lock().unwrap();
                    g.push(Got {
                        method,
                        path,
                        headers,
                        body,
                    });
                    g.len()
                };
                let status = script[(n - 1).min(script.len() - 1)];
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        Receiver { port, got }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    fn wait_for(&self, n: usize, d: &Daemon) -> Vec<Got> {
        let ok = wait_until(T, || self.got().len() >= n);
        assert!(
            ok,
            "receiver got {} of {n} requests; log:\n{}",
            self.got().len(),
            d.log()
        );
        self.got()
    }
}

/// A daemon sending callbacks to 127.0.0.1 (any port), retrying per `retry` (TOML), with
/// the directory of its secret file.
fn daemon(retry: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("callback.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let d = Daemon::start_with(&format!(
        "[callbacks]\nsecret_file = \"{}\"\nallowed_hosts = [\"127.0.0.1\"]\nretry = {retry}\n",
        secret.display()
    ));
    (d, dir)
}

fn submit_with_callback(d: &Daemon, url: &str) -> u64 {
    let job = d.root.path().join("job.json");
    std::fs::write(&job, format!(r#"{{"command":["true"],"callback_url":"{url}"}}"#)).unwrap();
    d.submit(&["-f", job.to_str().unwrap()], &[])
}

fn callback_state(d: &Daemon, id: u64) -> Value {
    d.ctl_json(&["show", &id.to_string()])["callback"].clone()
}

fn show_text(d: &Daemon, id: u64) -> String {
    d.ctl_ok(&["show", &id.to_string()])
}

#[test]
fn result_json_is_posted_signed_with_the_secret() {
    let rx = Receiver::start(&[200]);
    let (d, _secret) = daemon("[\"1s\"]");
    let id = submit_with_callback(&d, &rx.url());
    d.wait_result(id, T);
    let got = rx.wait_for(1, &d);
    let g = &got[0];
    assert_eq!((g.method.as_str(), g.path.as_str()), ("POST", "/hook"));
    let body = std::fs::read(d.run_dir(id).join("result.json")).unwrap();
    assert_eq!(g.body, body, "the body is result.json byte for byte");
    // The signature, computed here independently of cybd.
    let (wid, ts) = (&g.headers["webhook-id"], &g.headers["webhook-timestamp"]);
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{wid}.{ts}.").as_bytes());
    mac.update(&body);
    let want = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(g.headers["webhook-signature"], want);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now - ts.parse::<i64>().unwrap()).abs() < 60,
        "timestamp {ts} is now"
    );
    assert_eq!(g.headers["content-type"], "application/json");
    wait_until(T, || callback_state(&d, id)["state"] == "delivered");
    let c = callback_state(&d, id);
    assert_eq!(c["state"], "delivered", "{c}");
    assert_eq!(c["webhook_id"], wid.as_str());
    assert!(show_text(&d, id).contains("delivered"), "{}", show_text(&d, id));
}

#[test]
fn a_receiver_that_fails_twice_gets_it_on_the_third_try() {
    let rx = Receiver::start(&[500, 500, 200]);
    let (d, _secret) = daemon("[\"2s\", \"2s\"]");
    let id = submit_with_callback(&d, &rx.url());
    rx.wait_for(1, &d);
    // Between the tries, show says it is being retried.
    let ok = wait_until(T, || callback_state(&d, id)["state"] == "retrying");
    assert!(ok, "{}", callback_state(&d, id));
    let text = show_text(&d, id);
    assert!(text.contains("retrying (1 attempt"), "{text}");
    assert!(text.contains("500"), "the last error is shown: {text}");
    let got = rx.wait_for(3, &d);
    assert!(
        got.iter()
            .all(|g| g.headers["webhook-id"] == got[0].headers["webhook-id"])
    );
    assert!(wait_until(T, || callback_state(&d, id)["state"] == "delivered"));
    assert_eq!(callback_state(&d, id)["attempts"], 3);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(rx.got().len(), 3, "nothing sent after delivery");
}

#[test]
fn a_kill_9_between_tries_still_delivers_with_the_same_id() {
    let rx = Receiver::start(&[503, 200]);
    let (mut d, _secret) = daemon("[\"3s\"]");
    let id = submit_with_callback(&d, &rx.url());
    let first = rx.wait_for(1, &d)[0].headers["webhook-id"].clone();
    assert!(wait_until(T, || callback_state(&d, id)["state"] == "retrying"));
    d.kill9();
    d.restart();
    let got = rx.wait_for(2, &d);
    assert_eq!(got[1].headers["webhook-id"], first);
    assert!(wait_until(T, || callback_state(&d, id)["state"] == "delivered"));
}

#[test]
fn gone_means_given_up() {
    let rx = Receiver::start(&[410]);
    let (d, _secret) = daemon("[\"1s\", \"1s\"]");
    let id = submit_with_callback(&d, &rx.url());
    rx.wait_for(1, &d);
    assert!(wait_until(T, || callback_state(&d, id)["state"] == "given_up"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(rx.got().len(), 1, "no try after 410");
    let text = show_text(&d, id);
    assert!(text.contains("given up after 1 attempt: answered 410"), "{text}");
}

#[test]
fn hosts_not_allowed_are_refused_at_intake() {
    let (d, _secret) = daemon("[\"1s\"]");
    let other = Daemon::start();
    for (i, (dm, url, says)) in [
        (&d, "http://127.0.0.2:9/x", "not in [callbacks] allowed_hosts"),
        (&d, "http://localhost:9/x", "not in [callbacks] allowed_hosts"),
        (&other, "http://127.0.0.1:9/x", "allowed_hosts is empty"),
    ]
    .into_iter()
    .enumerate()
    {
        let job = format!(r#"{{"command":["true"],"callback_url":"{url}"}}"#);
        let f = dm.root.path().join("j.json");
        std::fs::write(&f, &job).unwrap();
        let out = dm.ctl(&["submit", "-f", f.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url} accepted");
        assert!(err.contains("callback_url") && err.contains(says), "{url}: {err}");
        let name = format!("cb{i}.json");
        dm.drop_job(&name, &job);
        let e = dm.wait_rejected(&name, T).to_string();
        assert!(e.contains("callback_url") && e.contains(says), "{url}: {e}");
    }
}
