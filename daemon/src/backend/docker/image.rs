//! Docker image references and the `[docker] allowed_images` allowlist: parses a reference
//! the way Docker normalizes it (`busybox` is `docker.io/library/busybox:latest`), and
//! decides whether an image may run from the names of the image a reference RESOLVED to
//! (its RepoTags and RepoDigests), never from how the request was spelled.
//!
//! Pure: no engine access, no I/O.

use std::fmt;

/// The registry Docker Hub references normalize to.
pub const DOCKER_HUB: &str = "docker.io";

/// Names that mean Docker Hub, normalized to [`DOCKER_HUB`].
const DOCKER_HUB_ALIASES: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];

/// The longest `registry/repository` Docker accepts.
const NAME_MAX: usize = 255;
/// The longest tag Docker accepts.
const TAG_MAX: usize = 128;

/// What is wrong with an image reference or an allowlist pattern; every message names it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("an image reference must not be empty")]
    Empty,
    #[error("image reference `{reference}` must not contain whitespace or control characters")]
    Whitespace { reference: String },
    #[error("image reference `{reference}`: repository names must be lower-case (`{component}`)")]
    Uppercase { reference: String, component: String },
    #[error(
        "image reference `{reference}`: `{component}` is not a valid repository path component \
         (lower-case letters and digits, separated by `.`, `_`, `__` or dashes)"
    )]
    BadComponent { reference: String, component: String },
    #[error("image reference `{reference}`: `{registry}` is not a valid registry host[:port]")]
    BadRegistry { reference: String, registry: String },
    #[error(
        "image reference `{reference}`: `{tag}` is not a valid tag \
         (letters, digits, `_`, `.`, `-`, at most 128, not starting with `.` or `-`)"
    )]
    BadTag { reference: String, tag: String },
    #[error(
        "image reference `{reference}`: `{digest}` is not a valid digest \
         (expected sha256:<64 lower-case hex>, sha384:<96> or sha512:<128>)"
    )]
    BadDigest { reference: String, digest: String },
    #[error("image reference `{reference}`: the name is longer than 255 characters")]
    TooLong { reference: String },
    #[error("`{reference}` is an image id, not a name: ask for it as `sha256:<64 hex>`")]
    ImageId { reference: String },
    #[error("[docker] allowed_images: pattern `{pattern}` is invalid: {why}")]
    BadPattern { pattern: String, why: String },
}

/// A normalized image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Lower-case host[:port]; Docker Hub is always `docker.io`.
    pub registry: String,
    /// Path within the registry; a one-component Docker Hub name gets `library/`.
    pub repository: String,
    /// `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// `registry/repository[:tag][@digest]`, e.g. `docker.io/library/busybox:latest` or
    /// `ghcr.io/org/app@sha256:…`. Parsing it again gives the same reference.
    pub fn canonical(&self) -> String {
        let mut s = self.name();
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

/// What a job asked for: a name, or an image id (`sha256:<64 hex>`, or the 64 hex alone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requested {
    Named(Reference),
    /// Always `sha256:<64 lower-case hex>`.
    Id(String),
}

/// Parses a job's `docker.image`: an image id (`sha256:<64 hex>` or 64 hex digits) or a
/// reference as [`parse`] takes it. Short id prefixes are not ids here: `abc123` is the
/// name `docker.io/library/abc123:latest`.
pub fn parse_requested(s: &str) -> Result<Requested, ImageError> {
    if let Some(id) = as_image_id(s) {
        return Ok(Requested::Id(id));
    }
    parse(s).map(Requested::Named)
}

/// `sha256:<hex>` when `s` is a full image id, with or without its algorithm.
fn as_image_id(s: &str) -> Option<String> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    (hex.len() == 64 && is_lower_hex(hex)).then(|| format!("sha256:{hex}"))
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses an image reference with Docker's normalization:
///
/// - the first `/`-separated component is a registry only if it contains `.` or `:` or is
///   `localhost`; otherwise the registry is `docker.io`, and `index.docker.io` and
///   `registry-1.docker.io` are `docker.io` too (registries are lower-cased);
/// - a one-component Docker Hub name gets `library/` (`busybox` is
///   `docker.io/library/busybox`);
/// - neither tag nor digest means tag `latest`; `name:tag@sha256:…` keeps both;
/// - repositories are lower-case only; tags are `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`;
///   digests are `sha256:<64 hex>`, `sha384:<96>` or `sha512:<128>`, hex lower-case;
/// - an image id (64 hex digits, or `sha256:` and 64 hex) is refused: see
///   [`parse_requested`]. IPv6 registry literals (`[::1]:5000`) are not supported.
pub fn parse(s: &str) -> Result<Reference, ImageError> {
    if s.is_empty() {
        return Err(ImageError::Empty);
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ImageError::Whitespace {
            reference: s.to_string(),
        });
    }
    if as_image_id(s).is_some() {
        return Err(ImageError::ImageId {
            reference: s.to_string(),
        });
    }
    let parts = split(s);
    let reference = || s.to_string();

    let digest = match parts.digest {
        Some(d) => {
            if !valid_digest(d) {
                return Err(ImageError::BadDigest {
                    reference: reference(),
                    digest: d.to_string(),
                });
            }
            Some(d.to_string())
        }
        None => None,
    };
    let tag = match parts.tag {
        Some(t) => {
            if !valid_tag(t) {
                return Err(ImageError::BadTag {
                    reference: reference(),
                    tag: t.to_string(),
                });
            }
            Some(t.to_string())
        }
        None if digest.is_none() => Some("latest".to_string()),
        None => None,
    };

    let (registry, path) = match parts.registry {
        Some(r) => {
            if !valid_registry(r) {
                return Err(ImageError::BadRegistry {
                    reference: reference(),
                    registry: r.to_string(),
                });
            }
            (normalize_registry(r), parts.path)
        }
        None => (DOCKER_HUB.to_string(), parts.path),
    };
    for c in path.split('/') {
        if c.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ImageError::Uppercase {
                reference: reference(),
                component: c.to_string(),
            });
        }
        if !valid_component(c) {
            return Err(ImageError::BadComponent {
                reference: reference(),
                component: c.to_string(),
            });
        }
    }
    // Docker measures the name as written, before `docker.io/library/` is added.
    let written = parts.registry.map_or(0, |r| r.len() + 1) + path.len();
    if written > NAME_MAX {
        return Err(ImageError::TooLong {
            reference: reference(),
        });
    }
    let repository = if registry == DOCKER_HUB && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    Ok(Reference {
        registry,
        repository,
        tag,
        digest,
    })
}

/// A reference (or pattern) split into its pieces, unvalidated.
struct Parts<'a> {
    registry: Option<&'a str>,
    path: &'a str,
    tag: Option<&'a str>,
    digest: Option<&'a str>,
}

/// Splits at the first `@` (digest), then at a `:` after the last `/` (tag), then the first
/// component off if it looks like a registry.
fn split(s: &str) -> Parts<'_> {
    let (name, digest) = match s.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (s, None),
    };
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
        None => (name, None),
    };
    let (registry, path) = match name.split_once('/') {
        Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            (Some(first), rest)
        }
        _ => (None, name),
    };
    Parts {
        registry,
        path,
        tag,
        digest,
    }
}

fn normalize_registry(r: &str) -> String {
    let r = r.to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&r.as_str()) {
        DOCKER_HUB.to_string()
    } else {
        r
    }
}

/// `host[:port]`: DNS labels (letters, digits, inner dashes) separated by dots.
fn valid_registry(r: &str) -> bool {
    let (host, port) = match r.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[\w][\w.-]{0,127}`.
fn valid_tag(t: &str) -> bool {
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= TAG_MAX
        && word(b[0])
        && b.iter().all(|x| word(*x) || *x == b'.' || *x == b'-')
}

fn valid_digest(d: &str) -> bool {
    let Some((algo, hex)) = d.split_once(':') else {
        return false;
    };
    let len = match algo {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return false,
    };
    hex.len() == len && is_lower_hex(hex)
}

/// One `[docker] allowed_images` pattern, normalized like a reference.
#[derive(Clone, Debug)]
struct Pattern {
    text: String,
    name: glob::Pattern,
    tag: Option<glob::Pattern>,
    digest: Option<glob::Pattern>,
}

/// The `[docker] allowed_images` allowlist.
///
/// Patterns are image references with glob wildcards (`*`, `?`, `[...]`), normalized like
/// references: `busybox:*` means `docker.io/library/busybox:*`, `ghcr.io/org/*` every
/// repository directly under `ghcr.io/org`. Rules a user notices:
///
/// - a pattern with neither tag nor digest matches every tag and every digest of the
///   repositories it names (`busybox` allows `busybox:1.36` and `busybox@sha256:…`; it does
///   not mean `busybox:latest` only);
/// - a pattern with a tag matches tagged names only, one with a digest digested names only;
/// - `*` and `?` never cross `/`: `ghcr.io/org/*` does not allow `ghcr.io/org/team/app`
///   (write `ghcr.io/org/*/*` for that), and `**` is refused;
/// - a first component without `.` or `:` is not a registry, as in references: `*` means
///   `docker.io/library/*` (official images only), `docker.io/*/*` all of Docker Hub;
/// - an empty allowlist allows nothing.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    patterns: Vec<Pattern>,
}

impl Allowlist {
    /// Compiles the patterns; the first bad one is named in the error.
    pub fn new(patterns: &[String]) -> Result<Allowlist, ImageError> {
        let patterns = patterns
            .iter()
            .map(|p| compile(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Allowlist { patterns })
    }

    /// Whether the allowlist has no pattern (and so allows nothing).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The first of `names` that a pattern matches, or `None` when the image is refused.
    ///
    /// `names` must be the names of the image the request RESOLVED to (the engine's
    /// RepoTags and RepoDigests, each normalized with `parse(..).canonical()`): the decision
    /// never rests on how the request was spelled. A name that does not parse matches
    /// nothing.
    pub fn allows(&self, names: &[String]) -> Option<String> {
        names.iter().find(|n| self.allows_one(n)).cloned()
    }

    fn allows_one(&self, name: &str) -> bool {
        let Ok(r) = parse(name) else {
            return false;
        };
        let full = r.name();
        self.patterns.iter().any(|p| {
            if !p.name.matches_with(&full, GLOB) {
                return false;
            }
            let tag_ok = match (&p.tag, &r.tag) {
                (None, _) => true,
                (Some(pt), Some(t)) => pt.matches_with(t, GLOB),
                (Some(_), None) => false,
            };
            let digest_ok = match (&p.digest, &r.digest) {
                (None, _) => true,
                (Some(pd), Some(d)) => pd.matches_with(d, GLOB),
                (Some(_), None) => false,
            };
            tag_ok && digest_ok
        })
    }

    /// The patterns as written, for messages.
    pub fn patterns(&self) -> Vec<&str> {
        self.patterns.iter().map(|p| p.text.as_str()).collect()
    }
}

/// `*` and `?` stop at `/`; case matters (repositories are lower-case).
const GLOB: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

fn compile(p: &str) -> Result<Pattern, ImageError> {
    let bad = |why: &str| ImageError::BadPattern {
        pattern: p.to_string(),
        why: why.to_string(),
    };
    if p.is_empty() {
        return Err(bad("it is empty"));
    }
    if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it contains whitespace"));
    }
    if p.contains("**") {
        return Err(bad(
            "`**` is not supported: `*` matches within one path component",
        ));
    }
    if p.matches('@').count() > 1 {
        return Err(bad("it has more than one `@`"));
    }
    let parts = split(p);
    let registry = match parts.registry {
        Some(r) => normalize_registry(r),
        None => DOCKER_HUB.to_string(),
    };
    let components: Vec<&str> = parts.path.split('/').collect();
    if components.iter().any(|c| c.is_empty()) {
        return Err(bad("it has an empty path component"));
    }
    if parts.path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad("repository names are lower-case, so it would match nothing"));
    }
    if components.iter().any(|c| *c == "." || *c == "..") {
        return Err(bad("`.` and `..` are not repository components"));
    }
    let repository = if registry == DOCKER_HUB && components.len() == 1 {
        format!("library/{}", parts.path)
    } else {
        parts.path.to_string()
    };
    let glob_of =
        |what: &str, s: &str| glob::Pattern::new(s).map_err(|e| bad(&format!("its {what} `{s}`: {}", e.msg)));
    let opt = |what: &str, s: Option<&str>| -> Result<Option<glob::Pattern>, ImageError> {
        match s {
            Some("") => Err(bad(&format!("its {what} is empty"))),
            Some(s) => glob_of(what, s).map(Some),
            None => Ok(None),
        }
    };
    Ok(Pattern {
        text: p.to_string(),
        name: glob_of("name", &format!("{registry}/{repository}"))?,
        tag: opt("tag", parts.tag)?,
        digest: opt("digest", parts.digest)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const D2: &str = "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    fn canon(s: &str) -> String {
        parse(s).unwrap().canonical()
    }

    fn list(ps: &[&str]) -> Allowlist {
        Allowlist::new(&ps.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn names(ns: &[&str]) -> Vec<String> {
        ns.iter().map(|s| canon(s)).collect()
    }

    #[test]
    fn docker_hub_names_normalize() {
        assert_eq!(canon("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(canon("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(canon("library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(canon("docker.io/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(
            canon("index.docker.io/library/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            canon("registry-1.docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(canon("DOCKER.IO/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(canon("alice/tool"), "docker.io/alice/tool:latest");
        let r = parse("busybox").unwrap();
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.digest, None);
        assert_eq!(r.name(), "docker.io/library/busybox");
    }

    #[test]
    fn registries_are_recognized_by_dot_colon_or_localhost() {
        let r = parse("ghcr.io/org/app:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("ghcr.io", "org/app")
        );
        let r = parse("localhost:5000/app").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost:5000", "app")
        );
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = parse("localhost/app").unwrap();
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("localhost", "app"));
        // Not a registry: no dot, no colon, not localhost.
        let r = parse("myhost/app").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "myhost/app")
        );
        // A one-component name elsewhere gets no `library/`.
        assert_eq!(
            canon("registry.example.com/busybox"),
            "registry.example.com/busybox:latest"
        );
        // `localhost:5000` alone is the name `localhost` with tag `5000`, as in Docker.
        assert_eq!(canon("localhost:5000"), "docker.io/library/localhost:5000");
    }

    #[test]
    fn tags_and_digests() {
        let r = parse(&format!("ghcr.io/org/app@{D}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.canonical(), format!("ghcr.io/org/app@{D}"));
        let r = parse(&format!("busybox:1.36@{D}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("1.36"));
        assert_eq!(r.canonical(), format!("docker.io/library/busybox:1.36@{D}"));
        assert!(parse("busybox:Release_1.2-rc.3").is_ok());
        assert!(parse(&format!("busybox:{}", "a".repeat(128))).is_ok());
        // Canonical forms parse back to themselves.
        for s in ["busybox", "ghcr.io/org/app:v1", &format!("a/b:c@{D}")] {
            let c = canon(s);
            assert_eq!(canon(&c), c);
        }
    }

    #[test]
    fn bad_references_are_refused_naming_what_is_wrong() {
        assert_eq!(parse(""), Err(ImageError::Empty));
        assert!(matches!(parse("busy box"), Err(ImageError::Whitespace { .. })));
        assert!(matches!(parse(" busybox"), Err(ImageError::Whitespace { .. })));
        assert!(matches!(parse("busybox\n"), Err(ImageError::Whitespace { .. })));
        let e = parse("BusyBox").unwrap_err();
        assert!(matches!(e, ImageError::Uppercase { .. }));
        assert!(e.to_string().contains("lower-case"), "{e}");
        assert!(e.to_string().contains("BusyBox"), "{e}");
        assert!(matches!(
            parse("ghcr.io/Org/app"),
            Err(ImageError::Uppercase { .. })
        ));
        for s in [
            "a/../b",
            "../busybox",
            "a//b",
            "/busybox",
            "busybox/",
            "a/./b",
            "-a",
            "a-",
            "a..b",
            "a___b",
            "a@b",
        ] {
            assert!(parse(s).is_err(), "{s} should be refused");
        }
        assert!(matches!(parse("a/../b"), Err(ImageError::BadComponent { .. })));
        assert!(matches!(parse("busybox:"), Err(ImageError::BadTag { .. })));
        assert!(matches!(parse("busybox:.x"), Err(ImageError::BadTag { .. })));
        assert!(matches!(parse("busybox:-x"), Err(ImageError::BadTag { .. })));
        assert!(matches!(
            parse(&format!("busybox:{}", "a".repeat(129))),
            Err(ImageError::BadTag { .. })
        ));
        assert!(matches!(
            parse("busybox@sha256:abc"),
            Err(ImageError::BadDigest { .. })
        ));
        assert!(matches!(
            parse("busybox@md5:0123456789abcdef0123456789abcdef"),
            Err(ImageError::BadDigest { .. })
        ));
        assert!(matches!(
            parse(&format!("busybox@{}", D.to_uppercase().replace("SHA", "sha"))),
            Err(ImageError::BadDigest { .. })
        ));
        assert!(matches!(
            parse(&format!("busybox@{D}@{D}")),
            Err(ImageError::BadDigest { .. })
        ));
        assert!(matches!(
            parse("bad_host.io/app"),
            Err(ImageError::BadRegistry { .. })
        ));
        assert!(matches!(
            parse("host.io:port/app"),
            Err(ImageError::BadRegistry { .. })
        ));
        assert!(matches!(
            parse("-host.io/app"),
            Err(ImageError::BadRegistry { .. })
        ));
        assert!(matches!(parse(&"a".repeat(256)), Err(ImageError::TooLong { .. })));
        assert!(parse(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn image_ids_are_ids_not_names() {
        let hex = &D["sha256:".len()..];
        assert!(matches!(parse(hex), Err(ImageError::ImageId { .. })));
        assert!(matches!(parse(D), Err(ImageError::ImageId { .. })));
        assert_eq!(parse_requested(D), Ok(Requested::Id(D.to_string())));
        assert_eq!(parse_requested(hex), Ok(Requested::Id(D.to_string())));
        assert_eq!(
            parse_requested("busybox"),
            Ok(Requested::Named(parse("busybox").unwrap()))
        );
        // A short prefix is a name, as Docker reads it.
        assert_eq!(
            parse_requested("0123456789ab"),
            Ok(Requested::Named(parse("0123456789ab").unwrap()))
        );
        assert!(parse_requested("").is_err());
    }

    #[test]
    fn empty_allowlist_allows_nothing() {
        let a = list(&[]);
        assert!(a.is_empty());
        assert_eq!(a.allows(&names(&["busybox"])), None);
    }

    #[test]
    fn patterns_normalize_like_references() {
        let a = list(&["busybox:*", "cyb-test:*", "ghcr.io/org/*"]);
        assert!(a.allows(&names(&["busybox:1.36"])).is_some());
        assert!(a.allows(&names(&["docker.io/library/busybox:latest"])).is_some());
        assert!(
            a.allows(&names(&["index.docker.io/library/busybox:latest"]))
                .is_some()
        );
        assert!(a.allows(&names(&["cyb-test:abc"])).is_some());
        assert!(a.allows(&names(&["ghcr.io/org/app:v2"])).is_some());
        assert!(a.allows(&names(&[&format!("ghcr.io/org/app@{D}")])).is_some());
        // `*` does not cross `/`.
        assert_eq!(a.allows(&names(&["ghcr.io/org/team/app:v1"])), None);
        assert!(
            list(&["ghcr.io/org/*/*"])
                .allows(&names(&["ghcr.io/org/team/app:v1"]))
                .is_some()
        );
        // Another registry's busybox is not Docker Hub's.
        assert_eq!(
            a.allows(&names(&["registry.example.com/library/busybox:latest"])),
            None
        );
        assert_eq!(a.allows(&names(&["ghcr.io/other/app:v1"])), None);
        assert_eq!(a.allows(&names(&["alice/busybox:1"])), None);
        // The same pattern spelled three ways.
        for p in [
            "busybox:*",
            "docker.io/library/busybox:*",
            "index.docker.io/library/busybox:*",
            "docker.io/busybox:*",
        ] {
            assert!(list(&[p]).allows(&names(&["busybox:x"])).is_some(), "{p}");
        }
    }

    #[test]
    fn untagged_pattern_matches_every_tag_and_digest() {
        let a = list(&["busybox"]);
        assert!(a.allows(&names(&["busybox:1.36"])).is_some());
        assert!(a.allows(&names(&[&format!("busybox@{D}")])).is_some());
        // A tagged pattern matches tagged names only.
        let t = list(&["busybox:1.*"]);
        assert!(t.allows(&names(&["busybox:1.36"])).is_some());
        assert_eq!(t.allows(&names(&["busybox:2.0"])), None);
        assert_eq!(t.allows(&names(&[&format!("busybox@{D}")])), None);
        // A digest pattern matches that digest only.
        let d = list(&[&format!("busybox@{D}")]);
        assert!(d.allows(&names(&[&format!("busybox@{D}")])).is_some());
        assert_eq!(d.allows(&names(&[&format!("busybox@{D2}")])), None);
        assert_eq!(d.allows(&names(&["busybox:latest"])), None);
        // `*` alone is Docker Hub's official images.
        let star = list(&["*"]);
        assert!(star.allows(&names(&["busybox:1"])).is_some());
        assert_eq!(star.allows(&names(&["alice/tool:1"])), None);
        assert_eq!(star.allows(&names(&["ghcr.io/x:1"])), None);
    }

    #[test]
    fn the_decision_rests_on_what_the_request_resolved_to() {
        let a = list(&["busybox:*"]);
        // Asked as `busybox@sha256:...`, but the engine's image is really `evil`: refused.
        let asked = parse_requested(&format!("busybox@{D}")).unwrap();
        assert!(matches!(asked, Requested::Named(_)));
        let resolved = names(&[
            "docker.io/library/evil:latest",
            &format!("docker.io/library/evil@{D}"),
        ]);
        assert_eq!(a.allows(&resolved), None);
        // Asked by digest, and the resolved image carries an allowed tag: allowed, and the
        // name that allowed it is returned.
        let resolved = names(&[&format!("busybox@{D}"), "evil:1", "busybox:1.36"]);
        assert_eq!(
            a.allows(&resolved),
            Some("docker.io/library/busybox:1.36".to_string())
        );
        // Asked by id: same rule.
        assert!(matches!(parse_requested(D), Ok(Requested::Id(_))));
        assert_eq!(a.allows(&names(&["busybox:1"])), Some(canon("busybox:1")));
        // An image with no names at all (dangling) is refused.
        assert_eq!(a.allows(&[]), None);
        // Names that do not parse never match.
        assert_eq!(list(&["*"]).allows(&["Busybox:1".to_string()]), None);
    }

    #[test]
    fn bad_patterns_name_themselves() {
        for p in [
            "",
            "busy box",
            "ghcr.io/**",
            "Busybox:*",
            "a//b",
            "a/../b",
            "busybox:[",
            "busybox:",
            "a@b@c",
        ] {
            let e = Allowlist::new(&["ok:*".to_string(), p.to_string()]).unwrap_err();
            assert!(matches!(e, ImageError::BadPattern { .. }), "{p}: {e}");
            assert!(e.to_string().contains(&format!("`{p}`")), "{e}");
            assert!(e.to_string().contains("allowed_images"), "{e}");
        }
        assert_eq!(list(&["a:*", "ghcr.io/b"]).patterns(), vec!["a:*", "ghcr.io/b"]);
    }
}
