use std::fmt;
use std::str::FromStr;

/// Identity of one gateway *process run*: 48 random bits chosen at start-up.
///
/// Because a restarted gateway picks a new id, client ids are never reused
/// across restarts (the register also refuses a second live gateway with the
/// same id). Printed as 12 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayId(u64);

impl GatewayId {
    /// Largest valid id (48 bits).
    pub const MAX: u64 = (1 << 48) - 1;

    /// Builds an id from its numeric value; `None` if 0 or wider than 48 bits.
    pub fn new(value: u64) -> Option<Self> {
        (value != 0 && value <= Self::MAX).then_some(Self(value))
    }

    /// The numeric value.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:012x}", self.0)
    }
}

impl fmt::Debug for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GatewayId({self})")
    }
}

impl FromStr for GatewayId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 12 {
            return Err(ParseIdError::GatewayId);
        }
        let value = parse_hex(s.as_bytes()).ok_or(ParseIdError::GatewayId)?;
        GatewayId::new(value).ok_or(ParseIdError::GatewayId)
    }
}

/// A client connection's id, unique across the cluster and across restarts.
///
/// Format (documented in `docs/protocol.md`): the 12 hex digits of the
/// [`GatewayId`] followed by the connection's sequence number at that
/// gateway as at least 8 hex digits (20 characters until a gateway has
/// accepted 4 billion connections). A worker routes a command for a client
/// to its gateway by reading the first 12 digits: no lookup needed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId {
    gateway: GatewayId,
    seq: u64,
}

impl ClientId {
    /// Builds an id; `seq` 0 is reserved and refused.
    pub fn new(gateway: GatewayId, seq: u64) -> Option<Self> {
        (seq != 0).then_some(Self { gateway, seq })
    }

    /// The gateway holding this client.
    pub fn gateway(self) -> GatewayId {
        self.gateway
    }

    /// The connection's sequence number at its gateway.
    pub fn seq(self) -> u64 {
        self.seq
    }
}

/// Writes `value` as exactly `digits` lower-case hex digits into `out`.
fn put_hex(out: &mut [u8], value: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut v = value;
    for b in out.iter_mut().rev() {
        *b = HEX[(v & 0xf) as usize];
        v >>= 4;
    }
}

impl ClientId {
    /// The id's text on the stack: what `to_string()` gives, without the
    /// allocation or the formatting machinery (ids are written for every
    /// event and relayed message, and both showed up in profiles).
    pub fn to_text(self) -> ClientIdText {
        let mut buf = [0u8; 28];
        let seq_digits = (16 - self.seq.leading_zeros() as usize / 4).max(8);
        put_hex(&mut buf[..12], self.gateway.get());
        put_hex(&mut buf[12..12 + seq_digits], self.seq);
        ClientIdText {
            buf,
            len: (12 + seq_digits) as u8,
        }
    }
}

/// A [`ClientId`] as text, held on the stack; derefs to `&str`.
#[derive(Clone, Copy)]
pub struct ClientIdText {
    buf: [u8; 28],
    len: u8,
}

impl std::ops::Deref for ClientIdText {
    type Target = str;
    fn deref(&self) -> &str {
        // Only ASCII hex digits are ever written.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientId({self})")
    }
}

impl FromStr for ClientId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !(20..=28).contains(&s.len()) {
            return Err(ParseIdError::ClientId);
        }
        let (gateway, seq) = s.as_bytes().split_at(12);
        // A sequence wider than 8 digits must not have a leading zero, so that
        // every client has exactly one spelling.
        if seq.len() > 8 && seq[0] == b'0' {
            return Err(ParseIdError::ClientId);
        }
        let gateway = parse_hex(gateway)
            .and_then(GatewayId::new)
            .ok_or(ParseIdError::ClientId)?;
        let seq = parse_hex(seq).ok_or(ParseIdError::ClientId)?;
        ClientId::new(gateway, seq).ok_or(ParseIdError::ClientId)
    }
}

/// The value of at most 16 lower-case hex digits; `None` for any other
/// byte. One pass: every event carries a client id to parse.
fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.len() > 16 {
        return None;
    }
    let mut value = 0u64;
    for &b in digits {
        let nibble = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        value = (value << 4) | u64::from(nibble);
    }
    Some(value)
}

/// A string that is not a valid id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseIdError {
    #[error("invalid client_id: expected 20 to 28 lower-case hex digits")]
    ClientId,
    #[error("invalid gateway id: expected 12 lower-case hex digits, not all zero")]
    GatewayId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_round_trips() {
        let gw = GatewayId::new(0xabcd_ef01_2345).unwrap();
        for seq in [1u64, 255, 0xffff_ffff, 0x1_0000_0000, u64::MAX] {
            let id = ClientId::new(gw, seq).unwrap();
            let text = id.to_string();
            assert!(text.len() >= 20, "{text}");
            assert_eq!(text.parse::<ClientId>().unwrap(), id);
        }
        assert_eq!(
            ClientId::new(gw, 1).unwrap().to_string(),
            "abcdef01234500000001"
        );
    }

    #[test]
    fn text_form_is_the_display_form() {
        let gw = GatewayId::new(0xabcd_ef01_2345).unwrap();
        for seq in [1u64, 0xffff_ffff, 0x1_0000_0000, u64::MAX] {
            let id = ClientId::new(gw, seq).unwrap();
            assert_eq!(&*id.to_text(), format!("{:012x}{:08x}", gw.get(), seq));
        }
        assert_eq!("abcdef012345".parse::<GatewayId>().unwrap(), gw);
        for bad in [
            "",
            "000000000000",
            "abcdef01234",
            "abcdef0123456",
            "ABCDEF012345",
            "abcdef01234g",
        ] {
            assert!(bad.parse::<GatewayId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn bad_client_ids_are_refused() {
        for bad in [
            "",
            "0000000000000000001",
            "00000000000000000001", // gateway 0
            "abcdef01234500000000", // seq 0
            "ABCDEF01234500000001",
            "abcdef012345000000010", // leading zero in a 9-digit seq
            "abcdef0123450000000g",
            "abcdef012345 0000001",
        ] {
            assert!(bad.parse::<ClientId>().is_err(), "{bad:?} accepted");
        }
    }
}
