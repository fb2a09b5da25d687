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
        if s.len() != 12 || !s.bytes().all(is_lower_hex) {
            return Err(ParseIdError::GatewayId);
        }
        let value = u64::from_str_radix(s, 16).map_err(|_| ParseIdError::GatewayId)?;
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

impl fmt::Display for ClientId {
    // By hand rather than `write!`: ids are formatted for every event and
    // command, and the formatting machinery showed up in profiles.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 28];
        let seq_digits = (16 - self.seq.leading_zeros() as usize / 4).max(8);
        put_hex(&mut buf[..12], self.gateway.get());
        put_hex(&mut buf[12..12 + seq_digits], self.seq);
        f.write_str(std::str::from_utf8(&buf[..12 + seq_digits]).map_err(|_| fmt::Error)?)
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
        if !(20..=28).contains(&s.len()) || !s.bytes().all(is_lower_hex) {
            return Err(ParseIdError::ClientId);
        }
        let (gateway, seq) = s.split_at(12);
        // A sequence wider than 8 digits must not have a leading zero, so that
        // every client has exactly one spelling.
        if seq.len() > 8 && seq.starts_with('0') {
            return Err(ParseIdError::ClientId);
        }
        let gateway = gateway.parse().map_err(|_| ParseIdError::ClientId)?;
        let seq = u64::from_str_radix(seq, 16).map_err(|_| ParseIdError::ClientId)?;
        ClientId::new(gateway, seq).ok_or(ParseIdError::ClientId)
    }
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
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
