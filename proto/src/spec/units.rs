//! The spec's units: durations (`"90s"`, `"1h 30m"`, or seconds) and sizes (`"512MiB"`,
//! or bytes), parsed strictly and printed as people write them.

use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::MAX_DURATION;

/// A duration written as `"90s"`, `"10m"`, `"1h 30m"` (humantime), or a number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    /// Refuses only what no [`Duration`] can hold (negative, not a number, 2^64 s or more):
    /// the reader of records must take back everything earlier builds wrote. The range a
    /// job may ask for is [`JobSpec::validate`]'s business.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"90s\" or a number of seconds")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Dur, E> {
                Ok(Dur(Duration::from_secs(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Dur, E> {
                u64::try_from(v)
                    .map(|v| Dur(Duration::from_secs(v)))
                    .map_err(|_| E::custom(format!("duration must not be negative (got {v})")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Dur, E> {
                if v.is_nan() {
                    return Err(E::custom("duration must be a number of seconds (got NaN)"));
                }
                // -0.0 is zero, not negative.
                if v < 0.0 {
                    return Err(E::custom(format!(
                        "duration must not be negative (got {})",
                        show_f64(v)
                    )));
                }
                Duration::try_from_secs_f64(v).map(Dur).map_err(|_| {
                    E::custom(format!(
                        "{}s is out of range (at most {})",
                        show_f64(v),
                        humantime::format_duration(MAX_DURATION)
                    ))
                })
            }
            fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<Dur, E> {
                humantime::parse_duration(t.trim()).map(Dur).map_err(|e| {
                    E::custom(format!(
                        "invalid duration `{t}`: {e} (write e.g. \"90s\", \"10m\", \"1h 30m\")"
                    ))
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A number as a person would write it: `1e20` rather than twenty-one digits.
pub(super) fn show_f64(v: f64) -> String {
    if v != 0.0 && !(1e-4..1e16).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

impl JsonSchema for Dur {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "a duration such as \"90s\", \"10m\", \"1h 30m\", or a number of seconds",
            "type": ["string", "number"]
        })
    }
}

/// A size: a number of bytes, or a string such as `"512M"`, `"4GiB"`, `"1.5g"`.
///
/// Every unit is a power of 1024, as Docker (`-m 4g`), Slurm (`--mem=4G`) and systemd
/// (`MemoryMax=4G`) read them: `K`, `M`, `G`, `T`, `P`, `E`, written alone, with `iB`, or with
/// `B` (`4G` = `4GiB` = `4GB` = 4 × 1024³ bytes), in either case. There are no decimal units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Size {
    /// Takes any `u64` back (the reader of records must take what earlier builds wrote); the
    /// range a job may ask for is [`JobSpec::validate`]'s business.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"512MiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("size must not be negative (got {v})")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Size, E> {
                if v < 0.0 {
                    return Err(E::custom(format!(
                        "size must not be negative (got {})",
                        show_f64(v)
                    )));
                }
                Err(E::custom(format!(
                    "a size is a whole number of bytes or a string such as \"512MiB\" (got {})",
                    show_f64(v)
                )))
            }
            fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<Size, E> {
                let trimmed = t.trim();
                if trimmed.starts_with('-') {
                    return Err(E::custom(format!("size must not be negative (got `{t}`)")));
                }
                parse_size(trimmed).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The forms a size may take, for error messages.
pub const SIZE_FORMS: &str = "a number of bytes, or a number with a unit K, M, G, T, P or E \
    (powers of 1024; `4G`, `4GiB` and `4GB` are all 4 × 1024³ bytes), e.g. 512M, 4GiB, 1.5G";

/// Parses a size as [`Size`] documents: `"4096"`, `"512M"`, `"4 GiB"`, `"1.5g"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = |why: &str| format!("`{text}` is not a size ({why}); write {SIZE_FORMS}");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad(if t.starts_with('-') {
            "it must not be negative"
        } else {
            "no number"
        }));
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => return Err(bad(&format!("unknown unit `{}`", unit.trim()))),
    };
    let too_big = || bad("too large");
    if let Some((whole, frac)) = num.split_once('.') {
        if frac.contains('.') || (whole.is_empty() && frac.is_empty()) {
            return Err(bad("not a number"));
        }
        // Exact for what people write (a few decimal places), in whole bytes, rounding down.
        let digits = format!("{whole}{frac}");
        let n: u128 = digits.parse().map_err(|_| too_big())?;
        let scale = 10u128
            .checked_pow(u32::try_from(frac.len()).map_err(|_| too_big())?)
            .ok_or_else(too_big)?;
        let bytes = (n << shift) / scale;
        return u64::try_from(bytes).map_err(|_| too_big());
    }
    let n: u64 = num.parse().map_err(|_| too_big())?;
    n.checked_mul(1u64 << shift).ok_or_else(too_big)
}

impl JsonSchema for Size {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Size".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "a number of bytes, or a size with a unit K, M, G, T, P or E, all powers of 1024 (\"512M\", \"4GiB\", \"4G\" and \"4GB\" are the same)",
            "type": ["string", "integer"]
        })
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}
