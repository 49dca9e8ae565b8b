//! Job callbacks: when a job's end is durable, `result.json` is POSTed to the spec's
//! `callback_url`, signed as Standard Webhooks specify. This file holds the pure parts: the
//! `[callbacks]` config, the admission check of a URL against `allowed_hosts`, the secret
//! and the signature. [`outbox`] keeps one durable file per delivery and runs the task that
//! delivers them, with retries that survive a daemon restart.

pub mod outbox;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use cyb_proto::spec::Dur;
use hmac::{Hmac, Mac};
use serde::Deserialize;

pub use outbox::{Ended, enqueue, enqueue_all, prepare, run, status};

/// `[callbacks]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCallbacks {
    secret_file: Option<PathBuf>,
    allowed_hosts: Option<Vec<String>>,
    timeout: Option<Dur>,
    retry: Option<Vec<Dur>>,
}

/// The retry schedule when the config sets none: the waits after the 1st, 2nd, ... failed
/// try. Seven tries over about nine hours.
pub const DEFAULT_RETRY: [Duration; 6] = [
    Duration::from_secs(10),
    Duration::from_secs(60),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(6 * 3600),
];

/// `[callbacks]`, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct CallbacksConfig {
    /// Holds the signing secret, `whsec_<base64>`; read at every try, so it can be rotated.
    pub secret_file: Option<PathBuf>,
    /// The only hosts callbacks go to; empty: callbacks are refused.
    pub allowed_hosts: Vec<AllowedHost>,
    /// How long one try may take, connection included.
    pub timeout: Duration,
    /// The wait after each failed try; when it runs out, the delivery is given up.
    pub retry: Vec<Duration>,
}

impl Default for CallbacksConfig {
    fn default() -> Self {
        CallbacksConfig {
            secret_file: None,
            allowed_hosts: Vec::new(),
            timeout: Duration::from_secs(10),
            retry: DEFAULT_RETRY.to_vec(),
        }
    }
}

/// A host name or address, as a URL's host is compared with `allowed_hosts`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostName {
    Ip(IpAddr),
    /// Lower case.
    Name(String),
}

impl HostName {
    fn of(host: &str) -> HostName {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        match bare.parse::<IpAddr>() {
            Ok(ip) => HostName::Ip(ip),
            Err(_) => HostName::Name(bare.to_ascii_lowercase()),
        }
    }
}

/// One entry of `allowed_hosts`: a host, and the one port allowed on it if given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedHost {
    pub host: HostName,
    pub port: Option<u16>,
}

impl AllowedHost {
    /// `example.org`, `example.org:8443`, `192.0.2.7`, `192.0.2.7:80`, `::1`, `[::1]:9000`.
    pub fn parse(s: &str) -> Result<AllowedHost, String> {
        let bad = |why: &str| format!("`{s}` is not a host name or address with an optional :port ({why})");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(|| bad("no closing ]"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
            };
            (h, port)
        } else if s.matches(':').count() > 1 {
            (s, None)
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad("bad port"))?,
            ),
        };
        let host = HostName::of(host);
        if let HostName::Name(n) = &host {
            let ok = !n.is_empty()
                && n.len() <= 253
                && n.split('.').all(|l| {
                    !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            if !ok {
                return Err(bad("bad host name"));
            }
        }
        Ok(AllowedHost { host, port })
    }
}

impl CallbacksConfig {
    /// Checks and resolves `[callbacks]`; an error names the key.
    pub fn resolve(raw: RawCallbacks) -> Result<CallbacksConfig, (String, String)> {
        let d = CallbacksConfig::default();
        let mut allowed_hosts = Vec::new();
        for (i, h) in raw.allowed_hosts.unwrap_or_default().iter().enumerate() {
            allowed_hosts
                .push(AllowedHost::parse(h).map_err(|m| (format!("callbacks.allowed_hosts[{i}]"), m))?);
        }
        if let Some(p) = &raw.secret_file
            && !p.is_absolute()
        {
            return Err((
                "callbacks.secret_file".into(),
                format!("`{}` is not an absolute path", p.display()),
            ));
        }
        if !allowed_hosts.is_empty() && raw.secret_file.is_none() {
            return Err((
                "callbacks.secret_file".into(),
                "must be set when allowed_hosts lists hosts: every callback is signed".into(),
            ));
        }
        let timeout = raw.timeout.map_or(d.timeout, |t| t.0);
        if !(Duration::from_millis(100)..=Duration::from_secs(600)).contains(&timeout) {
            return Err(("callbacks.timeout".into(), "must be 100ms to 10m".into()));
        }
        let retry = raw
            .retry
            .map_or(d.retry, |r| r.into_iter().map(|d| d.0).collect());
        if retry.len() > 100 {
            return Err(("callbacks.retry".into(), "at most 100 waits".into()));
        }
        if let Some(i) = retry.iter().position(|d| d < &Duration::from_millis(100)) {
            return Err((format!("callbacks.retry[{i}]"), "must be at least 100ms".into()));
        }
        Ok(CallbacksConfig {
            secret_file: raw.secret_file,
            allowed_hosts,
            timeout,
            retry,
        })
    }
}

/// Whether a job may name `url` as its `callback_url` here: an http(s) URL whose host (and
/// port) `allowed_hosts` lists. Checked at intake, and again before every try, so a host
/// taken off the list gets no more callbacks.
pub fn check_url(cfg: &CallbacksConfig, url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!("`{url}` is not an http or https URL"));
    }
    let (Some(host), Some(port)) = (u.host_str(), u.port_or_known_default()) else {
        return Err(format!("`{url}` names no host"));
    };
    if cfg.allowed_hosts.is_empty() {
        return Err("callbacks are off on this host ([callbacks] allowed_hosts is empty)".into());
    }
    let name = HostName::of(host);
    if cfg
        .allowed_hosts
        .iter()
        .any(|a| a.host == name && a.port.is_none_or(|p| p == port))
    {
        Ok(())
    } else {
        Err(format!(
            "host `{host}:{port}` is not in [callbacks] allowed_hosts"
        ))
    }
}

/// The signing key in a secret file's text: `whsec_` followed by the base64 of 24 to 64
/// random bytes, as Standard Webhooks secrets are written (surrounding white space ignored).
pub fn parse_secret(text: &str) -> Result<Vec<u8>, String> {
    let b64 = text
        .trim()
        .strip_prefix("whsec_")
        .ok_or("does not start with whsec_ (write `whsec_` and the base64 of 24 to 64 random bytes)")?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("is not whsec_ and base64: {e}"))?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!("holds a key of {} bytes; it must be 24 to 64", key.len()));
    }
    Ok(key)
}

/// Reads and checks the signing key in `[callbacks] secret_file` (blocking).
pub fn read_secret(path: Option<&std::path::Path>) -> Result<Vec<u8>, String> {
    let path = path.ok_or("[callbacks] secret_file is not set")?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_secret(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The `webhook-signature` header: `v1,` and the base64 HMAC-SHA256, under `key`, of
/// `<webhook-id>.<webhook-timestamp>.<body>`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(key) else {
        unreachable!("HMAC accepts keys of every length")
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(tag))
}

/// The wait after the `failed`-th failed try (1-based), or `None`: give up.
pub fn next_wait(cfg: &CallbacksConfig, failed: u32) -> Option<Duration> {
    cfg.retry.get((failed as usize).checked_sub(1)?).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(hosts: &[&str]) -> CallbacksConfig {
        CallbacksConfig {
            secret_file: Some("/etc/cyb/callback.secret".into()),
            allowed_hosts: hosts.iter().map(|h| AllowedHost::parse(h).unwrap()).collect(),
            ..CallbacksConfig::default()
        }
    }

    /// The example of the Standard Webhooks reference libraries' tests.
    #[test]
    fn signature_matches_the_standard_webhooks_vector() {
        let key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_must_be_whsec_base64() {
        assert!(
            parse_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
                .unwrap_err()
                .contains("whsec_")
        );
        assert!(parse_secret("whsec_!!!").unwrap_err().contains("base64"));
        assert!(parse_secret("whsec_c2hvcnQ=").unwrap_err().contains("24 to 64"));
    }

    #[test]
    fn urls_are_matched_by_host_and_port() {
        let c = cfg(&[
            "hooks.example.org",
            "127.0.0.1:8080",
            "[::1]:9000",
            "Example.COM:443",
        ]);
        for ok in [
            "https://hooks.example.org/x",
            "http://HOOKS.example.org:1234/x?y",
            "http://127.0.0.1:8080/",
            "http://[::1]:9000/cb",
            "https://example.com/",
        ] {
            assert_eq!(check_url(&c, ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("http://127.0.0.1:8081/", "127.0.0.1:8081"),
            ("http://127.0.0.2:8080/", "127.0.0.2:8080"),
            ("http://example.com/", "example.com:80"),
            ("http://evil.example.org/", "evil.example.org"),
            ("http://[::1]:9001/", "[::1]:9001"),
            ("ftp://hooks.example.org/", "http"),
            ("nonsense", "not a URL"),
        ] {
            let e = check_url(&c, bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = check_url(&cfg(&[]), "http://127.0.0.1:8080/").unwrap_err();
        assert!(e.contains("allowed_hosts is empty"), "{e}");
    }

    #[test]
    fn allowed_hosts_entries_parse() {
        let p = |s| AllowedHost::parse(s);
        assert_eq!(p("::1").unwrap().host, HostName::Ip("::1".parse().unwrap()));
        assert_eq!(p("a.b:7").unwrap().port, Some(7));
        for bad in ["", "a b", "a:0", "a:x", "[::1", "[::1]x", "a..b", "http://a"] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_and_schedule() {
        let raw: RawCallbacks = toml::from_str(
            "secret_file = \"/s\"\nallowed_hosts = [\"h\"]\ntimeout = \"2s\"\nretry = [\"1s\", \"5s\"]",
        )
        .unwrap();
        let c = CallbacksConfig::resolve(raw).unwrap();
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(next_wait(&c, 1), Some(Duration::from_secs(1)));
        assert_eq!(next_wait(&c, 2), Some(Duration::from_secs(5)));
        assert_eq!(next_wait(&c, 3), None);
        let d = CallbacksConfig::resolve(RawCallbacks::default()).unwrap();
        assert_eq!(d, CallbacksConfig::default());
        assert_eq!(next_wait(&d, 6), Some(Duration::from_secs(6 * 3600)));
        assert_eq!(next_wait(&d, 7), None);
        for (text, key) in [
            ("allowed_hosts = [\"h\"]", "callbacks.secret_file"),
            ("secret_file = \"rel\"", "callbacks.secret_file"),
            (
                "secret_file = \"/s\"\nallowed_hosts = [\"a b\"]",
                "callbacks.allowed_hosts[0]",
            ),
            ("timeout = \"0s\"", "callbacks.timeout"),
            ("retry = [\"1s\", \"1ms\"]", "callbacks.retry[1]"),
        ] {
            let raw: RawCallbacks = toml::from_str(text).unwrap();
            assert_eq!(CallbacksConfig::resolve(raw).unwrap_err().0, key, "{text}");
        }
    }
}
