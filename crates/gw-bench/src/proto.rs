//! The chat protocol as the generator sees it: frame builders for what the
//! client sends, a borrowed view of what the server sends, and the
//! benchmark payload carried in `text`.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::value::RawValue;

/// A server frame, borrowed from the received text so the hot path does not
/// allocate. Fields the generator does not need (`from`, `uid`) are skipped.
#[derive(Debug, Deserialize)]
pub struct Inbound<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub room: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub client_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub text: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub reason: Option<Cow<'a, str>>,
    #[serde(default)]
    pub clients: Option<u64>,
    #[serde(default)]
    pub online: Option<u64>,
}

impl<'a> Inbound<'a> {
    pub fn parse(s: &'a str) -> anyhow::Result<Self> {
        serde_json::from_str(s).map_err(|e| anyhow::anyhow!("bad frame from server ({e}): {s}"))
    }
}

/// JSON string literal for `s` (with quotes and escapes).
pub fn json_str(s: &str) -> String {
    // Serializing a &str cannot fail.
    serde_json::to_string(s).unwrap_or_default()
}

pub fn join_frame(room: &str) -> String {
    format!(r#"{{"type":"join","room":{}}}"#, json_str(room))
}

pub fn leave_frame(room: &str) -> String {
    format!(r#"{{"type":"leave","room":{}}}"#, json_str(room))
}

pub fn login_frame(uid: &str) -> String {
    format!(r#"{{"type":"login","uid":{}}}"#, json_str(uid))
}

pub fn count_frame(room: &str) -> String {
    format!(r#"{{"type":"count","room":{}}}"#, json_str(room))
}

/// Everything of a `say` frame up to the `text` value; the sender appends
/// the payload and the closing brace per message, so the room name is
/// escaped once per connection rather than once per message.
pub fn say_prefix(room: &str) -> String {
    format!(r#"{{"type":"say","room":{},"text":"#, json_str(room))
}

pub fn whisper_prefix(to_uid: &str) -> String {
    format!(r#"{{"type":"whisper","to":{},"text":"#, json_str(to_uid))
}

pub fn echo_prefix() -> String {
    r#"{"type":"echo","text":"#.to_string()
}

/// What the generator embeds in `text`: who sent it, its sequence number
/// and when (nanoseconds since the process-wide epoch in `client::now_ns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    pub sender: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

/// Append the payload as a JSON string literal `"sender:seq:ns:...."`,
/// padded with `.` so the literal (quotes included) is exactly `size` bytes
/// when it fits; a string rather than an object because it is cheaper to
/// build and to parse back, and servers must pass `text` through anyway.
pub fn encode_payload(out: &mut String, p: Payload, size: usize) {
    let start = out.len();
    // Writing to a String cannot fail.
    let _ = write!(out, "\"{}:{}:{}:", p.sender, p.seq, p.sent_ns);
    let used = out.len() - start + 1; // + closing quote
    for _ in used..size {
        out.push('.');
    }
    out.push('"');
}

/// The payload of a delivery frame (`said`, `whisper`, `echo`) found by a
/// plain scan, without parsing the JSON: the generator handles up to a
/// million frames a second on one thread and full parsing was a third of
/// its time. `None` when the frame is not a delivery or is spelled in a
/// way the scan does not expect (the caller then parses it properly).
pub fn scan_delivery(frame: &str) -> Option<Payload> {
    use memchr::memmem::Finder;
    use std::sync::OnceLock;
    // Built once: constructing a searcher per frame showed in profiles.
    static FINDERS: OnceLock<(Finder<'static>, Finder<'static>)> = OnceLock::new();
    let (type_key, text_key) =
        FINDERS.get_or_init(|| (Finder::new(b"\"type\":\""), Finder::new(b"\"text\":\"")));
    let bytes = frame.as_bytes();
    let at = type_key.find(bytes)? + type_key.needle().len();
    let kind = &bytes[at..at + memchr::memchr(b'"', &bytes[at..])?];
    if !matches!(kind, b"said" | b"whisper" | b"echo") {
        return None;
    }
    let at = text_key.find(bytes)? + text_key.needle().len() - 1;
    let len = memchr::memchr(b'"', &bytes[at + 1..])? + 2;
    decode_payload(frame.get(at..at + len)?)
}

/// Parse a `text` value produced by [`encode_payload`]. Byte by byte, not
/// with `split`/`parse`: it runs once per delivery, up to a million times a
/// second, and the generic path showed as ~7 % of the generator's CPU.
pub fn decode_payload(raw: &str) -> Option<Payload> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?.as_bytes();
    let mut at = 0;
    let mut field = || -> Option<u64> {
        let digits = inner[at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        // Non-empty, fits in a u64 (20 digits may not), and ends at a ':'
        // (after the third field that ':' proves it is complete).
        if digits == 0 || digits > 20 || inner.get(at + digits) != Some(&b':') {
            return None;
        }
        let mut v: u64 = 0;
        for &d in &inner[at..at + digits] {
            v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        }
        at += digits + 1;
        Some(v)
    };
    let sender = u32::try_from(field()?).ok()?;
    let seq = field()?;
    let sent_ns = field()?;
    Some(Payload {
        sender,
        seq,
        sent_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_are_found_by_scanning_in_any_key_order() {
        let p = Payload {
            sender: 3,
            seq: 77,
            sent_ns: 123_456,
        };
        let mut text = String::new();
        encode_payload(&mut text, p, 40);
        for frame in [
            format!(r#"{{"type":"said","room":"r","from":"x","text":{text}}}"#),
            format!(r#"{{"text":{text},"type":"echo"}}"#),
            format!(r#"{{"from":"x","text":{text},"type":"whisper"}}"#),
        ] {
            assert_eq!(scan_delivery(&frame), Some(p), "{frame}");
        }
        // Not deliveries, or spelled otherwise: left to the full parser.
        assert_eq!(scan_delivery(r#"{"type":"joined","room":"r"}"#), None);
        assert_eq!(
            scan_delivery(&format!(r#"{{"type": "said", "text": {text}}}"#)),
            None
        );
    }

    #[test]
    fn payload_round_trips_and_is_padded_to_size() {
        let p = Payload {
            sender: 12,
            seq: 345,
            sent_ns: 6_789_012_345,
        };
        for size in [0usize, 10, 64, 200] {
            let mut s = String::new();
            encode_payload(&mut s, p, size);
            assert_eq!(decode_payload(&s), Some(p));
            let minimal = "\"12:345:6789012345:\"".len();
            assert_eq!(s.len(), size.max(minimal), "size {size}");
            // It must be a valid JSON string value.
            let v: serde_json::Value = serde_json::from_str(&s).unwrap();
            assert!(v.is_string());
        }
    }

    #[test]
    fn foreign_text_is_rejected() {
        assert_eq!(decode_payload(r#""hello""#), None);
        assert_eq!(decode_payload(r#"{"a":1}"#), None);
        assert_eq!(decode_payload(r#""1:2""#), None);
        assert_eq!(decode_payload(r#""1:2:3""#), None);
        assert_eq!(decode_payload(r#""1::3:""#), None);
        assert_eq!(decode_payload(r#""1:x2:3:""#), None);
        // Out of range: sender beyond u32, seq beyond u64.
        assert_eq!(decode_payload(r#""4294967296:2:3:""#), None);
        assert_eq!(decode_payload(r#""1:18446744073709551616:3:""#), None);
        let max = format!("\"4294967295:{}:0:..\"", u64::MAX);
        assert_eq!(
            decode_payload(&max),
            Some(Payload {
                sender: u32::MAX,
                seq: u64::MAX,
                sent_ns: 0
            })
        );
    }

    #[test]
    fn inbound_said_borrows_text_verbatim() {
        let f = r#"{"type":"said","room":"r\"1","from":"c1","text":"1:2:3:.."}"#;
        let m = Inbound::parse(f).unwrap();
        assert_eq!(m.kind, "said");
        assert_eq!(m.room.as_deref(), Some("r\"1"));
        let p = decode_payload(m.text.unwrap().get()).unwrap();
        assert_eq!((p.sender, p.seq, p.sent_ns), (1, 2, 3));
    }

    #[test]
    fn frames_escape_names() {
        let v: serde_json::Value = serde_json::from_str(&join_frame("a\"b")).unwrap();
        assert_eq!(v["room"], "a\"b");
        let mut say = say_prefix("r");
        encode_payload(
            &mut say,
            Payload {
                sender: 0,
                seq: 0,
                sent_ns: 0,
            },
            64,
        );
        say.push('}');
        let v: serde_json::Value = serde_json::from_str(&say).unwrap();
        assert_eq!(v["type"], "say");
    }
}
