//! WebSocket frames (RFC 6455 §5) as the relay sees them: headers parsed to find frame
//! boundaries, payloads forwarded as they came (the client's still masked, the
//! upstream's plain), and the few frames Switchyard writes itself.
//!
//! No extension is ever negotiated on either side, so the reserved bits must be zero.

use bytes::{BufMut, Bytes, BytesMut};

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub len: u64,
    /// Header length on the wire (2 to 14 bytes).
    pub size: usize,
}

impl Header {
    /// Whether this is a control frame (close, ping, pong).
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }

    /// Header and payload length on the wire.
    pub fn wire_len(&self) -> u64 {
        self.size as u64 + self.len
    }
}

/// Why a frame is refused (the stream then ends with 1002).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("reserved bits set without an extension")]
    Reserved,
    #[error("unknown opcode {0:#x}")]
    Opcode(u8),
    #[error("a control frame is fragmented or longer than 125 bytes")]
    Control,
    #[error("a client frame is not masked")]
    Unmasked,
    #[error("a server frame is masked")]
    Masked,
    #[error("a frame length uses the most significant bit")]
    Length,
    #[error("a continuation frame with no message open, or a new message inside one")]
    Sequence,
    #[error(
        "a close frame with a one-byte payload, a code not to be sent, or a reason not in UTF-8"
    )]
    BadClose,
}

/// Parses the header at the front of `buf`; `None` until all of it has arrived.
/// `from_client`: client frames must be masked, server frames must not be.
pub fn parse(buf: &[u8], from_client: bool) -> Result<Option<Header>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
        return Err(FrameError::Opcode(opcode));
    }
    let masked = b1 & 0x80 != 0;
    if masked != from_client {
        return Err(if from_client {
            FrameError::Unmasked
        } else {
            FrameError::Masked
        });
    }
    let (len, mut size) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(b);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err(FrameError::Length);
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if opcode & 0x8 != 0 && (!fin || len > 125) {
        return Err(FrameError::Control);
    }
    let mask = if masked {
        let Some(key) = buf.get(size..size + 4) else {
            return Ok(None);
        };
        size += 4;
        Some([key[0], key[1], key[2], key[3]])
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        len,
        size,
    }))
}

/// A frame's payload in plain text (unmasked if it came masked).
pub fn payload(header: &Header, frame: &[u8]) -> Vec<u8> {
    let start = header.size.min(frame.len());
    let mut data = frame[start..].to_vec();
    if let Some(key) = header.mask {
        apply_mask(&mut data, key);
    }
    data
}

fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Encodes a final frame; masked with a fresh key when it goes to an upstream (Switchyard
/// is the client there).
pub fn encode(opcode: u8, payload: &[u8], to_upstream: bool) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 14);
    out.put_u8(0x80 | opcode);
    let mask_bit = if to_upstream { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.put_u8(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(mask_bit | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(mask_bit | 127);
            out.put_u64(n as u64);
        }
    }
    if to_upstream {
        let key = mask_key();
        out.put_slice(&key);
        let mut masked = payload.to_vec();
        apply_mask(&mut masked, key);
        out.put_slice(&masked);
    } else {
        out.put_slice(payload);
    }
    out.freeze()
}

/// A masking key from the operating system's random source (RFC 6455 §5.3 asks for a
/// strong one); rustls's provider, already in use for TLS, gives access to it.
fn mask_key() -> [u8; 4] {
    let mut key = [0u8; 4];
    let random = rustls::crypto::ring::default_provider().secure_random;
    if random.fill(&mut key).is_err() {
        key = fastrand::u32(..).to_be_bytes();
    }
    key
}

/// A close frame with `code` and `reason` (at most 123 bytes of it are sent).
pub fn close(code: u16, reason: &str, to_upstream: bool) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(CLOSE, &payload, to_upstream)
}

/// Checks a close frame's payload (RFC 6455 §5.5.1, §7.4): empty, or a code a peer may
/// send (1000-1003, 1007-1014, 3000-4999) and a UTF-8 reason.
pub fn check_close(payload: &[u8]) -> Result<(), FrameError> {
    match payload {
        [] => Ok(()),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            let sendable = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if sendable && std::str::from_utf8(reason).is_ok() {
                Ok(())
            } else {
                Err(FrameError::BadClose)
            }
        }
        [_] => Err(FrameError::BadClose),
    }
}

/// The code of a close frame's payload, if it has one.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_payloads_are_checked() {
        let with = |code: u16, reason: &[u8]| {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(reason);
            check_close(&p)
        };
        assert_eq!(check_close(&[]), Ok(()));
        for code in [1000, 1001, 1008, 1011, 1012, 3000, 4999] {
            assert_eq!(with(code, b"NET-0001"), Ok(()), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 2999, 5000] {
            assert_eq!(with(code, b""), Err(FrameError::BadClose), "{code}");
        }
        assert_eq!(check_close(&[3]), Err(FrameError::BadClose));
        assert_eq!(with(1000, b"\xc3\x28"), Err(FrameError::BadClose));
    }

    #[test]
    fn headers_of_every_length_form_parse_and_wait_for_missing_bytes() {
        let small = encode(BINARY, &[7; 10], false);
        let h = parse(&small, false).expect("valid").expect("complete");
        assert_eq!(
            (h.fin, h.opcode, h.len, h.size, h.mask),
            (true, BINARY, 10, 2, None)
        );

        let medium = encode(TEXT, &[b'a'; 300], true);
        let h = parse(&medium, true).expect("valid").expect("complete");
        assert_eq!((h.len, h.size), (300, 8));
        assert_eq!(
            payload(&h, &medium[..h.wire_len() as usize]),
            vec![b'a'; 300]
        );
        for cut in 0..8 {
            assert_eq!(parse(&medium[..cut], true), Ok(None), "cut at {cut}");
        }

        let large = encode(BINARY, &vec![1; 70_000], false);
        let h = parse(&large, false).expect("valid").expect("complete");
        assert_eq!((h.len, h.size), (70_000, 10));
    }

    #[test]
    fn protocol_violations_are_refused() {
        assert_eq!(
            parse(&[0xC2, 0x80, 0, 0, 0, 0], true),
            Err(FrameError::Reserved)
        );
        assert_eq!(
            parse(&[0x83, 0x80, 0, 0, 0, 0], true),
            Err(FrameError::Opcode(3))
        );
        assert_eq!(parse(&[0x82, 0x00], true), Err(FrameError::Unmasked));
        assert_eq!(
            parse(&[0x82, 0x80, 0, 0, 0, 0], false),
            Err(FrameError::Masked)
        );
        assert_eq!(parse(&[0x09, 0x00], false), Err(FrameError::Control));
        assert_eq!(parse(&[0x89, 126, 0, 200], false), Err(FrameError::Control));
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(parse(&huge, false), Err(FrameError::Length));
    }

    #[test]
    fn close_frames_carry_code_and_a_bounded_reason() {
        let frame = close(1012, &"é".repeat(100), true);
        let h = parse(&frame, true).expect("valid").expect("complete");
        assert_eq!(h.opcode, CLOSE);
        assert!(h.len <= 125);
        let p = payload(&h, &frame);
        assert_eq!(close_code(&p), Some(1012));
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        assert_eq!(close_code(&[]), None);
    }
}
