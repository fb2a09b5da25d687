//! Challenge-response proof of the cluster secret.
//!
//! The accepting side sends a fresh random nonce; the connecting side answers
//! with its own nonce and `HMAC-SHA256(secret, label | role | node | nonces)`;
//! the accepting side checks it in constant time and proves itself the same
//! way with another label. The secret never crosses the wire, and a recorded
//! handshake cannot be replayed because the nonces differ every time.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of a nonce in bytes.
pub const NONCE_LEN: usize = 32;

const CLIENT_LABEL: &[u8] = b"gateworker/v1/client";
const SERVER_LABEL: &[u8] = b"gateworker/v1/server";

/// Which side of the handshake a proof is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The side that connected (sends `Hello`).
    Connecting,
    /// The side that accepted (sends `Welcome`).
    Accepting,
}

/// What both sides feed into a proof.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    /// Numeric `pb::Role` of the connecting side.
    pub role: i32,
    /// `node_id` of the connecting side.
    pub node_id: &'a str,
    pub server_nonce: &'a [u8],
    pub client_nonce: &'a [u8],
}

fn mac(secret: &[u8], side: Side, t: &Transcript<'_>) -> HmacSha256 {
    let mut mac =
        <HmacSha256 as KeyInit>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(match side {
        Side::Connecting => CLIENT_LABEL,
        Side::Accepting => SERVER_LABEL,
    });
    mac.update(&t.role.to_be_bytes());
    // Length-prefix the variable fields so that no two transcripts collide.
    for field in [t.node_id.as_bytes(), t.server_nonce, t.client_nonce] {
        mac.update(&(field.len() as u32).to_be_bytes());
        mac.update(field);
    }
    mac
}

/// Computes the proof `side` sends.
pub fn prove(secret: &[u8], side: Side, t: &Transcript<'_>) -> Vec<u8> {
    mac(secret, side, t).finalize().into_bytes().to_vec()
}

/// Checks a proof in constant time.
pub fn verify(secret: &[u8], side: Side, t: &Transcript<'_>, proof: &[u8]) -> bool {
    mac(secret, side, t).verify_slice(proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_secret_side_and_nonces() {
        let t = Transcript {
            role: 2,
            node_id: "w1",
            server_nonce: &[1; 32],
            client_nonce: &[2; 32],
        };
        let p = prove(b"s3cret", Side::Connecting, &t);
        assert!(verify(b"s3cret", Side::Connecting, &t, &p));
        assert!(!verify(b"other", Side::Connecting, &t, &p));
        assert!(!verify(b"s3cret", Side::Accepting, &t, &p));
        let replay = Transcript {
            server_nonce: &[3; 32],
            ..t
        };
        assert!(!verify(b"s3cret", Side::Connecting, &replay, &p));
        assert!(!verify(b"s3cret", Side::Connecting, &t, &p[..31]));
    }
}
