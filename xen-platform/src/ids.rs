//! Typed identifiers and their checked parsers for values read from xenstore.
//!
//! Everything under a frontend directory (`/local/domain/<fe>/device/vtpm/<devid>/`) is
//! writable by the guest, so every value parsed here is untrusted input. The parsers accept
//! exactly one form: one or more ASCII decimal digits, nothing else (no sign, no whitespace,
//! no `0x`, no trailing newline), and a value inside the type's range. Anything else is a
//! [`ParseError`] that names the key and (a bounded, escaped prefix of) the value. Nothing here
//! panics, allocates in proportion to the input beyond the error's bounded copy, or overflows.

use std::fmt;

/// How many characters of an offending value a [`ParseError`] keeps. Values come from the
/// guest; a bounded copy keeps log lines and error messages bounded too.
const MAX_SHOWN_CHARS: usize = 64;

/// A xenstore value that does not parse as the expected kind of number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid xenstore value for {key:?}: {value:?} ({kind})")]
pub struct ParseError {
    key: String,
    value: String,
    kind: ParseErrorKind,
}

impl ParseError {
    fn new(key: &str, value: &str, kind: ParseErrorKind) -> Self {
        let mut shown: String = value.chars().take(MAX_SHOWN_CHARS).collect();
        if shown.len() < value.len() {
            shown.push('…');
        }
        Self {
            key: key.to_owned(),
            value: shown,
            kind,
        }
    }

    /// The xenstore key (usually the full path) whose value was rejected.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The rejected value, truncated to 64 characters (a trailing `…` marks truncation).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Why the value was rejected.
    pub fn kind(&self) -> ParseErrorKind {
        self.kind
    }
}

/// Why a xenstore value was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    /// The value is the empty string.
    #[error("empty value")]
    Empty,
    /// A byte that is not an ASCII decimal digit (signs, spaces and `0x` included).
    #[error("not a decimal number: byte {index} is not an ASCII digit")]
    NotDecimal {
        /// Byte index of the first offending byte.
        index: usize,
    },
    /// A well-formed number outside the type's range (including u64 overflow).
    #[error("out of range {min}..={max}")]
    OutOfRange {
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
    },
}

/// Parses a strict unsigned decimal in `min..=max`.
fn parse_decimal(key: &str, value: &str, min: u64, max: u64) -> Result<u64, ParseError> {
    if value.is_empty() {
        return Err(ParseError::new(key, value, ParseErrorKind::Empty));
    }
    let out_of_range = || ParseError::new(key, value, ParseErrorKind::OutOfRange { min, max });
    let mut acc: u64 = 0;
    for (index, byte) in value.bytes().enumerate() {
        if !byte.is_ascii_digit() {
            return Err(ParseError::new(
                key,
                value,
                ParseErrorKind::NotDecimal { index },
            ));
        }
        acc = acc
            .checked_mul(10)
            .and_then(|a| a.checked_add(u64::from(byte - b'0')))
            .ok_or_else(out_of_range)?;
    }
    if acc < min || acc > max {
        return Err(out_of_range());
    }
    Ok(acc)
}

/// A Xen domain id (`domid_t`).
///
/// Ids from `0x7FF0` (`DOMID_FIRST_RESERVED`) up are special (`DOMID_SELF`, `DOMID_IO`, …)
/// and never name a real peer, so they are not representable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomId(u16);

impl DomId {
    /// Domain 0.
    pub const DOM0: DomId = DomId(0);
    /// First reserved id (`DOMID_FIRST_RESERVED`); ids at or above it are rejected.
    pub const FIRST_RESERVED: u16 = 0x7FF0;

    /// A domain id, or `None` for the reserved range.
    pub const fn new(id: u16) -> Option<Self> {
        if id < Self::FIRST_RESERVED {
            Some(DomId(id))
        } else {
            None
        }
    }

    /// The raw id.
    pub const fn get(self) -> u16 {
        self.0
    }

    /// Parses a xenstore value such as `frontend-id` (`key` is only used in the error).
    pub fn parse(key: &str, value: &str) -> Result<Self, ParseError> {
        let max = u64::from(Self::FIRST_RESERVED - 1);
        let id = parse_decimal(key, value, 0, max)?;
        // In range by construction: 0..=0x7FEF fits u16.
        Ok(DomId(u16::try_from(id).unwrap_or(0)))
    }
}

/// A grant reference (`grant_ref_t`) published by a peer, e.g. `ring-ref`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantRef(u32);

impl GrantRef {
    /// A grant reference.
    pub const fn new(gref: u32) -> Self {
        GrantRef(gref)
    }

    /// The raw reference.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Parses a xenstore value such as `ring-ref` (`key` is only used in the error).
    pub fn parse(key: &str, value: &str) -> Result<Self, ParseError> {
        let gref = parse_decimal(key, value, 0, u64::from(u32::MAX))?;
        Ok(GrantRef(u32::try_from(gref).unwrap_or(0)))
    }
}

/// An event-channel port (`evtchn_port_t`). Port 0 is reserved by Xen and never valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EvtchnPort(u32);

impl EvtchnPort {
    /// A port, or `None` for the reserved port 0.
    pub const fn new(port: u32) -> Option<Self> {
        if port == 0 {
            None
        } else {
            Some(EvtchnPort(port))
        }
    }

    /// The raw port number.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Parses a xenstore value such as `event-channel` (`key` is only used in the error).
    pub fn parse(key: &str, value: &str) -> Result<Self, ParseError> {
        let port = parse_decimal(key, value, 1, u64::from(u32::MAX))?;
        Ok(EvtchnPort(u32::try_from(port).unwrap_or(1)))
    }
}

/// A xenbus device id (the `<devid>` path component, libxl's `handle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevId(u32);

impl DevId {
    /// A device id.
    pub const fn new(devid: u32) -> Self {
        DevId(devid)
    }

    /// The raw id.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Parses a device id from a path component or a `handle` value.
    pub fn parse(key: &str, value: &str) -> Result<Self, ParseError> {
        let devid = parse_decimal(key, value, 0, u64::from(u32::MAX))?;
        Ok(DevId(u32::try_from(devid).unwrap_or(0)))
    }
}

macro_rules! display_inner {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    )*};
}
display_inner!(DomId, GrantRef, EvtchnPort, DevId);

/// `enum xenbus_state` (xen/include/public/io/xenbus.h), the value of every `state` node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XenbusState {
    /// 0: not yet written / unknown.
    Unknown = 0,
    /// 1: the toolstack created the device; the end is initialising.
    Initialising = 1,
    /// 2: waiting for information from the peer (the backend's "ready for a frontend").
    InitWait = 2,
    /// 3: the frontend published its ring-ref / event-channel.
    Initialised = 3,
    /// 4: connected.
    Connected = 4,
    /// 5: the device is being closed.
    Closing = 5,
    /// 6: closed.
    Closed = 6,
    /// 7: reconfiguring (unused by tpmif).
    Reconfiguring = 7,
    /// 8: reconfigured (unused by tpmif).
    Reconfigured = 8,
}

/// A `state` value outside `0..=8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid xenbus state {0}")]
pub struct InvalidXenbusState(pub u32);

impl TryFrom<u32> for XenbusState {
    type Error = InvalidXenbusState;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        use XenbusState::*;
        Ok(match value {
            0 => Unknown,
            1 => Initialising,
            2 => InitWait,
            3 => Initialised,
            4 => Connected,
            5 => Closing,
            6 => Closed,
            7 => Reconfiguring,
            8 => Reconfigured,
            other => return Err(InvalidXenbusState(other)),
        })
    }
}

impl XenbusState {
    /// Parses a `state` node's value (strict decimal in `0..=8`).
    pub fn parse(key: &str, value: &str) -> Result<Self, ParseError> {
        let raw = parse_decimal(key, value, 0, 8)?;
        u32::try_from(raw)
            .ok()
            .and_then(|v| XenbusState::try_from(v).ok())
            .ok_or_else(|| {
                ParseError::new(key, value, ParseErrorKind::OutOfRange { min: 0, max: 8 })
            })
    }

    /// The numeric value as written to xenstore (`"4"` for `Connected`).
    pub fn as_value(self) -> &'static str {
        ["0", "1", "2", "3", "4", "5", "6", "7", "8"][self as usize]
    }
}

impl fmt::Display for XenbusState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}({})", self, *self as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_decimals() {
        assert_eq!(GrantRef::parse("ring-ref", "8").unwrap().get(), 8);
        assert_eq!(
            GrantRef::parse("ring-ref", "4294967295").unwrap().get(),
            u32::MAX
        );
        assert_eq!(EvtchnPort::parse("event-channel", "17").unwrap().get(), 17);
        assert_eq!(DomId::parse("frontend-id", "32751").unwrap().get(), 0x7FEF);
        assert_eq!(DevId::parse("handle", "0").unwrap().get(), 0);
        assert_eq!(GrantRef::parse("ring-ref", "007").unwrap().get(), 7);
    }

    #[test]
    fn rejects_garbage_with_key_and_value_in_message() {
        let cases: &[(&str, ParseErrorKind)] = &[
            ("", ParseErrorKind::Empty),
            ("abc", ParseErrorKind::NotDecimal { index: 0 }),
            ("-1", ParseErrorKind::NotDecimal { index: 0 }),
            ("+1", ParseErrorKind::NotDecimal { index: 0 }),
            (" 1", ParseErrorKind::NotDecimal { index: 0 }),
            ("1 ", ParseErrorKind::NotDecimal { index: 1 }),
            ("12\n", ParseErrorKind::NotDecimal { index: 2 }),
            ("0x10", ParseErrorKind::NotDecimal { index: 1 }),
            ("１", ParseErrorKind::NotDecimal { index: 0 }),
            (
                "99999999999",
                ParseErrorKind::OutOfRange {
                    min: 0,
                    max: u64::from(u32::MAX),
                },
            ),
            (
                "4294967296",
                ParseErrorKind::OutOfRange {
                    min: 0,
                    max: u64::from(u32::MAX),
                },
            ),
            (
                "99999999999999999999999999",
                ParseErrorKind::OutOfRange {
                    min: 0,
                    max: u64::from(u32::MAX),
                },
            ),
        ];
        for (value, kind) in cases {
            let err = GrantRef::parse("/local/domain/5/device/vtpm/0/ring-ref", value).unwrap_err();
            assert_eq!(err.kind(), *kind, "value {value:?}");
            assert_eq!(err.key(), "/local/domain/5/device/vtpm/0/ring-ref");
            let msg = err.to_string();
            assert!(msg.contains("ring-ref"), "{msg}");
            assert!(msg.contains(&format!("{value:?}")), "{msg}");
        }
    }

    #[test]
    fn ranges_per_type() {
        assert!(EvtchnPort::parse("event-channel", "0").is_err());
        assert!(DomId::parse("frontend-id", "32752").is_err()); // DOMID_SELF
        assert!(DomId::parse("frontend-id", "65536").is_err());
        assert!(DomId::new(0x7FF0).is_none());
        assert!(EvtchnPort::new(0).is_none());
    }

    #[test]
    fn long_values_are_truncated_in_errors() {
        let long = "x".repeat(10_000);
        let err = DevId::parse("handle", &long).unwrap_err();
        assert!(err.value().chars().count() <= MAX_SHOWN_CHARS + 1);
        assert!(err.to_string().len() < 200);
    }

    #[test]
    fn xenbus_state_round_trip() {
        for v in 0..=8u32 {
            let s = XenbusState::try_from(v).unwrap();
            assert_eq!(s as u32, v);
            assert_eq!(XenbusState::parse("state", s.as_value()).unwrap(), s);
        }
        assert_eq!(XenbusState::try_from(9), Err(InvalidXenbusState(9)));
        assert!(XenbusState::parse("state", "9").is_err());
        assert!(XenbusState::parse("state", "4294967300").is_err());
        assert!(XenbusState::parse("state", "").is_err());
    }
}
