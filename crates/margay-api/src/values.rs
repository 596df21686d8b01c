//! Value types that validate themselves as they are read: Calico's string enums, Go durations,
//! CIDRs, IP addresses, regular expressions and port ranges.
//!
//! Each one refuses a bad value inside `Deserialize`, so that `serde_path_to_error` reports the
//! exact field (`spec.bpfLogLevel: "Loud" is not one of Off, Info, Debug`), and serializes back the
//! text the user wrote (canonicalised where Calico matches case-insensitively), so that
//! `get -o yaml` output applies back unchanged.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Declares a string enum spelled as Calico spells it, matched case-insensitively as Calico's
/// `^(?i)(...)$` patterns do, and written back in Calico's canonical case.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every accepted value, in Calico's spelling.
            pub const VALUES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $(if s.eq_ignore_ascii_case($text) { return Ok($name::$variant); })+
                Err(format!("{:?} is not one of {}", s, Self::VALUES.join(", ")))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use string_enum;

/// Implements `Serialize` as the original text and `Deserialize` through `FromStr`.
macro_rules! text_value {
    ($name:ident) => {
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.text)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.text)
            }
        }
    };
}

// === GoDuration ===

/// A duration written as Go writes them (`10s`, `1h30m`, `250ms`, `0s`), as Calico's
/// `metav1.Duration` fields take them. Negative durations are refused: every duration Margay
/// takes is a timeout or an interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoDuration {
    text: String,
    value: Duration,
}

impl GoDuration {
    pub fn as_duration(&self) -> Duration {
        self.value
    }
}

impl FromStr for GoDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let value = parse_go_duration(text).map_err(|why| {
            format!("{text:?} is not a duration ({why}); write it as Go does, e.g. 10s, 1m30s, 1h")
        })?;
        Ok(GoDuration {
            text: text.to_owned(),
            value,
        })
    }
}

text_value!(GoDuration);

fn parse_go_duration(text: &str) -> Result<Duration, &'static str> {
    let mut rest = text;
    if rest.starts_with('-') {
        return Err("negative durations are not allowed");
    }
    rest = rest.strip_prefix('+').unwrap_or(rest);
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err("it is empty");
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return Err("expected a number");
        }
        let number: f64 = rest[..number_len].parse().map_err(|_| "bad number")?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err("a unit (ns, us, ms, s, m, h) is missing"),
            _ => return Err("unknown unit"),
        };
        rest = &rest[unit_len..];
        total += number * seconds_per_unit;
    }
    if total > (i64::MAX as f64) / 1e9 {
        return Err("it is too long");
    }
    Ok(Duration::from_secs_f64(total))
}

// === Cidr and IpAddress ===

/// An IPv4 or IPv6 network in CIDR notation. Host bits must be zero: `192.168.1.0/16` is refused
/// with the network it probably meant, rather than silently rewritten.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cidr {
    text: String,
    value: ipnet::IpNet,
}

impl Cidr {
    pub fn net(&self) -> ipnet::IpNet {
        self.value
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let value: ipnet::IpNet = text
            .parse()
            .map_err(|_| format!("{text:?} is not a CIDR (expected e.g. 192.168.0.0/16)"))?;
        if value.trunc() != value {
            return Err(format!(
                "{text:?} has host bits set; did you mean {}?",
                value.trunc()
            ));
        }
        Ok(Cidr {
            text: text.to_owned(),
            value,
        })
    }
}

text_value!(Cidr);

/// An IPv4 or IPv6 address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpAddress {
    text: String,
    value: IpAddr,
}

impl IpAddress {
    pub fn addr(&self) -> IpAddr {
        self.value
    }
}

impl FromStr for IpAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let value = text
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address"))?;
        Ok(IpAddress {
            text: text.to_owned(),
            value,
        })
    }
}

text_value!(IpAddress);

/// An address with an optional prefix length (`10.224.0.4` or `10.224.0.4/16`), as Calico's Node
/// addresses and BGP addresses are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpWithPrefix {
    text: String,
    addr: IpAddr,
}

impl IpWithPrefix {
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
}

impl FromStr for IpWithPrefix {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not an IP address or an address with a prefix length");
        let addr = match text.split_once('/') {
            Some(_) => text.parse::<ipnet::IpNet>().map_err(|_| bad())?.addr(),
            None => text.parse().map_err(|_| bad())?,
        };
        Ok(IpWithPrefix {
            text: text.to_owned(),
            addr,
        })
    }
}

text_value!(IpWithPrefix);

// === RegexPattern ===

/// A regular expression, compiled once when read so that a bad pattern is refused at write time
/// rather than when an agent first uses it.
#[derive(Clone, Debug)]
pub struct RegexPattern {
    text: String,
    value: regex::Regex,
}

impl RegexPattern {
    pub fn regex(&self) -> &regex::Regex {
        &self.value
    }
}

impl PartialEq for RegexPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl FromStr for RegexPattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let value = regex::Regex::new(text).map_err(|e| {
            let detail = e.to_string();
            let last = detail.lines().last().unwrap_or("invalid").trim().to_owned();
            format!("{text:?} is not a valid regular expression ({last})")
        })?;
        Ok(RegexPattern {
            text: text.to_owned(),
            value,
        })
    }
}

text_value!(RegexPattern);

// === PortRange ===

/// A port range written `20000:29999` (both ends inclusive) or a single port, as Calico's
/// `bpfPSNATPorts` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRange {
    text: String,
    pub first: u16,
    pub last: u16,
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a port range (expected e.g. 20000:29999)");
        let port = |s: &str| match s.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(bad()),
        };
        let (first, last) = match text.split_once(':') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(text)?, port(text)?),
        };
        if first > last {
            return Err(format!(
                "{text:?} is not a port range: {first} is above {last}"
            ));
        }
        Ok(PortRange {
            text: text.to_owned(),
            first,
            last,
        })
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    /// Accepts `20000:29999` and also a bare number, which Calico's `numorstring.Port` takes.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Number(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

// === Bounded integers ===

/// Declares an integer newtype that refuses values outside `[min, max]`.
macro_rules! bounded_int {
    ($(#[$meta:meta])* $name:ident: $ty:ty, $min:expr, $max:expr) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub $ty);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let value = d.deserialize_any(IntegerVisitor {
                    min: $min as i128,
                    max: $max as i128,
                })?;
                Ok($name(value as $ty))
            }
        }
    };
}

/// Reads any integer and checks it against a range, with a message that says what is expected
/// (rather than serde's "expected i128").
struct IntegerVisitor {
    min: i128,
    max: i128,
}

impl IntegerVisitor {
    fn check<E: serde::de::Error>(&self, value: i128) -> Result<i128, E> {
        if value < self.min || value > self.max {
            return Err(E::custom(format!(
                "{value} is out of range (must be between {} and {})",
                self.min, self.max
            )));
        }
        Ok(value)
    }
}

impl serde::de::Visitor<'_> for IntegerVisitor {
    type Value = i128;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an integer between {} and {}", self.min, self.max)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i128, E> {
        self.check(v.into())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i128, E> {
        self.check(v.into())
    }

    fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<i128, E> {
        self.check(v)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<i128, E> {
        if v.fract() == 0.0 && v.abs() < 1e30 {
            self.check(v as i128)
        } else {
            Err(E::custom(format!("{v} is not a whole number")))
        }
    }
}

bounded_int!(
    /// A TCP or UDP port, 1 to 65535.
    Port: u16, 1, 65535
);
bounded_int!(
    /// A port where 0 means "off", 0 to 65535.
    OptionalPort: u16, 0, 65535
);
bounded_int!(
    /// A BPF map size: at least one entry, at most 2^28.
    MapSize: u32, 1, 1u32 << 28
);
bounded_int!(
    /// A 32-bit mark.
    Mark: u32, 0, u32::MAX
);
bounded_int!(
    /// A VXLAN network identifier, 1 to 2^24 - 1.
    Vni: u32, 1, 16_777_215
);
bounded_int!(
    /// An MTU where 0 means "work it out": 0, or 576 to 65535.
    Mtu: u32, 0, 65535
);
bounded_int!(
    /// A routing rule priority, 1 to 32765 as Calico allows.
    RulePriority: u32, 1, 32765
);
bounded_int!(
    /// A count that must be positive.
    PositiveCount: u32, 1, u32::MAX
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_like_go() {
        for (text, secs) in [
            ("0", 0.0),
            ("0s", 0.0),
            ("10s", 10.0),
            ("1h", 3600.0),
            ("1h30m", 5400.0),
            ("250ms", 0.25),
            ("1.5s", 1.5),
            ("1h0m0s", 3600.0),
        ] {
            let d: GoDuration = text.parse().expect(text);
            assert!(
                (d.as_duration().as_secs_f64() - secs).abs() < 1e-9,
                "{text}"
            );
        }
        for bad in ["", "10", "ten seconds", "1d", "-5s", "s"] {
            assert!(bad.parse::<GoDuration>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cidrs_refuse_host_bits_and_say_what_was_meant() {
        assert!("192.168.0.0/16".parse::<Cidr>().is_ok());
        assert!("fd00::/64".parse::<Cidr>().is_ok());
        let err = "192.168.1.0/16".parse::<Cidr>().unwrap_err();
        assert!(err.contains("192.168.0.0/16"), "{err}");
        assert!("192.168.0.0".parse::<Cidr>().is_err());
    }

    #[test]
    fn port_ranges() {
        let r: PortRange = "20000:29999".parse().unwrap();
        assert_eq!((r.first, r.last), (20000, 29999));
        assert!("30000:20000".parse::<PortRange>().is_err());
        assert!("0:10".parse::<PortRange>().is_err());
        let r: PortRange = serde_json::from_value(serde_json::json!(8080)).unwrap();
        assert_eq!((r.first, r.last), (8080, 8080));
    }

    string_enum!(Level { Off = "Off", Info = "Info" });

    #[test]
    fn string_enums_match_case_insensitively_and_name_the_choices() {
        assert_eq!("off".parse::<Level>(), Ok(Level::Off));
        assert_eq!(
            "Loud".parse::<Level>().unwrap_err(),
            "\"Loud\" is not one of Off, Info"
        );
    }

    #[test]
    fn bounded_ints_refuse_out_of_range() {
        assert!(serde_json::from_value::<Port>(serde_json::json!(0)).is_err());
        assert!(serde_json::from_value::<Port>(serde_json::json!(65536)).is_err());
        assert_eq!(
            serde_json::from_value::<Port>(serde_json::json!(51820)).unwrap(),
            Port(51820)
        );
    }
}
