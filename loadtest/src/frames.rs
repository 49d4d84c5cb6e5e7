//! WebSocket framing for the viewers' lean client (RFC 6455, client side), without I/O:
//! `FrameReader` owns one socket's read buffer and parses the server's frames out of it with
//! no allocation per frame — a text payload is handed out as a slice of the buffer, a ping
//! becomes a masked pong in the caller's reply buffer, other frames are skipped — and the
//! `encode_*` functions write the few masked frames a viewer sends (a `claim`, a close).
//! Protocol violations are reported as tungstenite's errors, so a viewer's end reads exactly
//! as it did on tokio-tungstenite.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::Data;

/// The read buffer a socket starts with, and returns to once a larger frame is consumed.
pub const INITIAL_BUFFER: usize = 4 * 1024;
/// The largest message accepted (a `resync` is tens of KiB).
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

const CONTINUATION: u8 = 0;
const TEXT: u8 = 1;
const BINARY: u8 = 2;
const CLOSE: u8 = 8;
const PING: u8 = 9;
const PONG: u8 = 10;

/// What the reader hands out: pings are answered and every other frame skipped inside.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole text message.
    Text(&'a str),
    /// The server closed the socket, with this status code if it gave one.
    Close(Option<u16>),
}

/// A frame's first bytes, decoded and checked.
#[derive(Debug, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    /// Bytes of the header itself.
    header_len: usize,
    payload_len: usize,
}

impl Header {
    /// Decodes the header at the start of `bytes`: `None` until all of it has arrived.
    fn parse(bytes: &[u8]) -> Result<Option<Self>, WsError> {
        let [first, second, ..] = *bytes else {
            return Ok(None);
        };
        let (fin, opcode) = (first & 0x80 != 0, first & 0x0f);
        if first & 0x70 != 0 {
            return Err(WsError::Protocol(ProtocolError::NonZeroReservedBits));
        }
        if second & 0x80 != 0 {
            return Err(WsError::Protocol(ProtocolError::MaskedFrameFromServer));
        }
        match opcode {
            CONTINUATION | TEXT | BINARY => {}
            CLOSE | PING | PONG if !fin => {
                return Err(WsError::Protocol(ProtocolError::FragmentedControlFrame));
            }
            CLOSE | PING | PONG if second & 0x7f > 125 => {
                return Err(WsError::Protocol(ProtocolError::ControlFrameTooBig));
            }
            CLOSE | PING | PONG => {}
            3..=7 => {
                return Err(WsError::Protocol(ProtocolError::UnknownDataFrameType(
                    opcode,
                )));
            }
            _ => {
                return Err(WsError::Protocol(ProtocolError::UnknownControlFrameType(
                    opcode,
                )));
            }
        }
        let (header_len, payload_len) = match second & 0x7f {
            126 => match bytes.get(2..4) {
                Some(&[hi, lo]) => (4, u64::from(u16::from_be_bytes([hi, lo]))),
                _ => return Ok(None),
            },
            127 => match bytes.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                Some(len) => (10, u64::from_be_bytes(len)),
                None => return Ok(None),
            },
            short => (2, u64::from(short)),
        };
        let payload_len = usize::try_from(payload_len).unwrap_or(usize::MAX);
        if payload_len > MAX_MESSAGE {
            return Err(too_long(payload_len));
        }
        Ok(Some(Self {
            fin,
            opcode,
            header_len,
            payload_len,
        }))
    }
}

fn too_long(size: usize) -> WsError {
    WsError::Capacity(CapacityError::MessageTooLong {
        size,
        max_size: MAX_MESSAGE,
    })
}

/// The status code of a close frame's payload.
fn close_code(payload: &[u8]) -> Result<Option<u16>, WsError> {
    match *payload {
        [] => Ok(None),
        [_] => Err(WsError::Protocol(ProtocolError::InvalidCloseSequence)),
        [hi, lo, ..] => Ok(Some(u16::from_be_bytes([hi, lo]))),
    }
}

fn utf8(payload: &[u8]) -> Result<&str, WsError> {
    std::str::from_utf8(payload).map_err(|e| WsError::Utf8(e.to_string()))
}

/// One socket's incoming bytes: a buffer of `INITIAL_BUFFER` that grows only for a frame
/// larger than it (up to `MAX_MESSAGE`), and shrinks back once that frame is consumed.
pub struct FrameReader {
    buf: Vec<u8>,
    /// Bytes before `start` are consumed; `start..end` is read and not yet parsed.
    start: usize,
    end: usize,
    /// Bytes the frame at `start` needs in all, when only part of it has arrived.
    wanted: usize,
    /// The kind of the fragmented message being received, if any.
    fragmented: Option<Data>,
    /// A fragmented text message's payload so far (empty unless a server fragments).
    message: Vec<u8>,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    pub fn new() -> Self {
        Self {
            buf: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
            wanted: 0,
            fragmented: None,
            message: Vec::new(),
        }
    }

    /// The bytes read and not yet consumed (the handshake looks for the response head there).
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Drops the first `n` buffered bytes (the response head: what follows are frames).
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }

    /// Free room to read into, after the unconsumed bytes: at least the rest of a partly
    /// arrived frame, and never empty. Call `filled` with what was read into it.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > INITIAL_BUFFER {
                self.buf.truncate(INITIAL_BUFFER);
                self.buf.shrink_to_fit();
            }
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let needed = self.wanted.max(self.end + 1);
        if needed > self.buf.len() {
            let grown = needed.max(2 * self.buf.len());
            self.buf.resize(grown, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Counts `n` bytes just read into `spare()`.
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next complete text message or close in the buffer, `None` when more bytes are
    /// needed. Each ping on the way is answered by a masked pong appended to `replies`.
    pub fn next_frame(&mut self, replies: &mut Vec<u8>) -> Result<Option<Frame<'_>>, WsError> {
        loop {
            let Some(header) = Header::parse(&self.buf[self.start..self.end])? else {
                return Ok(None);
            };
            let frame_len = header.header_len + header.payload_len;
            if self.end - self.start < frame_len {
                self.wanted = frame_len;
                return Ok(None);
            }
            self.wanted = 0;
            let payload = self.start + header.header_len..self.start + frame_len;
            self.start += frame_len;
            match (header.opcode, self.fragmented) {
                (TEXT | BINARY, Some(_)) => {
                    let kind = if header.opcode == TEXT {
                        Data::Text
                    } else {
                        Data::Binary
                    };
                    return Err(WsError::Protocol(ProtocolError::ExpectedFragment(kind)));
                }
                (TEXT, None) if header.fin => {
                    return utf8(&self.buf[payload]).map(|t| Some(Frame::Text(t)));
                }
                (TEXT, None) => {
                    self.fragmented = Some(Data::Text);
                    self.message.clear();
                    self.message.extend_from_slice(&self.buf[payload]);
                }
                (BINARY, None) if !header.fin => self.fragmented = Some(Data::Binary),
                (BINARY, None) => {} // skipped
                (CONTINUATION, None) => {
                    return Err(WsError::Protocol(ProtocolError::UnexpectedContinueFrame));
                }
                (CONTINUATION, Some(kind)) => {
                    if kind == Data::Text {
                        let size = self.message.len() + payload.len();
                        if size > MAX_MESSAGE {
                            return Err(too_long(size));
                        }
                        self.message.extend_from_slice(&self.buf[payload]);
                    }
                    if header.fin {
                        self.fragmented = None;
                        if kind == Data::Text {
                            return utf8(&self.message).map(|t| Some(Frame::Text(t)));
                        }
                    }
                }
                (CLOSE, _) => return close_code(&self.buf[payload]).map(|c| Some(Frame::Close(c))),
                (PING, _) => encode_masked(replies, PONG, &self.buf[payload]),
                _ => {} // a pong
            }
        }
    }
}

/// Appends a masked text frame (client frames must be masked).
pub fn encode_text(out: &mut Vec<u8>, text: &str) {
    encode_masked(out, TEXT, text.as_bytes());
}

/// Appends a masked close frame without a status code.
pub fn encode_close(out: &mut Vec<u8>) {
    encode_masked(out, CLOSE, &[]);
}

/// Appends one masked, final frame of `opcode` carrying `payload`.
fn encode_masked(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    const MASKED: u8 = 0x80;
    out.push(0x80 | opcode);
    match payload.len() {
        short @ 0..=125 => out.push(MASKED | short as u8),
        medium @ 126..=0xffff => {
            out.push(MASKED | 126);
            out.extend_from_slice(&(medium as u16).to_be_bytes());
        }
        long => {
            out.push(MASKED | 127);
            out.extend_from_slice(&(long as u64).to_be_bytes());
        }
    }
    let mask = mask_key();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

/// A fresh masking key: std's `RandomState` is seeded from the OS and gives every new
/// instance different keys, which is random enough for masking (no extra dependency).
fn mask_key() -> [u8; 4] {
    let hash = RandomState::new().build_hasher().finish();
    (hash as u32).to_ne_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame (unmasked) of `opcode` with `payload`, `fin` as given.
    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=0xffff => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// What the reader hands out, as owned values.
    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Text(String),
        Close(Option<u16>),
    }

    /// Feeds `wire` to a reader in reads of at most `chunk` bytes (and never more than
    /// `spare()` offers), collecting every frame and the replies.
    fn read_all(wire: &[u8], chunk: usize) -> (Vec<Got>, Vec<u8>, Result<(), String>) {
        let mut reader = FrameReader::new();
        let (mut got, mut replies) = (Vec::new(), Vec::new());
        let mut rest = wire;
        loop {
            loop {
                match reader.next_frame(&mut replies) {
                    Ok(Some(Frame::Text(t))) => got.push(Got::Text(t.to_string())),
                    Ok(Some(Frame::Close(c))) => got.push(Got::Close(c)),
                    Ok(None) => break,
                    Err(e) => return (got, replies, Err(e.to_string())),
                }
            }
            if rest.is_empty() {
                return (got, replies, Ok(()));
            }
            let spare = reader.spare();
            let n = chunk.min(spare.len()).min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            reader.filled(n);
            rest = &rest[n..];
        }
    }

    /// Decodes one masked client frame: (fin, opcode, unmasked payload, bytes used).
    fn client_frame(bytes: &[u8]) -> (bool, u8, Vec<u8>, usize) {
        assert_eq!(bytes[1] & 0x80, 0x80, "client frames are masked");
        let (len, at) = match bytes[1] & 0x7f {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().expect("8 bytes")) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let mask = &bytes[at..at + 4];
        let payload = bytes[at + 4..at + 4 + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        (bytes[0] & 0x80 != 0, bytes[0] & 0x0f, payload, at + 4 + len)
    }

    #[test]
    fn frames_split_at_every_byte_boundary_parse_the_same() {
        let mut wire = Vec::new();
        wire.extend(server_frame(true, TEXT, br#"{"type":"welcome"}"#));
        wire.extend(server_frame(true, PING, b"livedrop"));
        wire.extend(server_frame(true, BINARY, &[1, 2, 3]));
        wire.extend(server_frame(true, TEXT, &[b'a'; 300]));
        wire.extend(server_frame(false, TEXT, "caf".as_bytes()));
        wire.extend(server_frame(true, PONG, b""));
        wire.extend(server_frame(true, CONTINUATION, "é!".as_bytes()));
        wire.extend(server_frame(true, CLOSE, &1001u16.to_be_bytes()));
        let expected = vec![
            Got::Text(r#"{"type":"welcome"}"#.into()),
            Got::Text("a".repeat(300)),
            Got::Text("café!".into()),
            Got::Close(Some(1001)),
        ];
        for chunk in 1..=wire.len() {
            let (got, replies, end) = read_all(&wire, chunk);
            assert_eq!(end, Ok(()), "chunk {chunk}");
            assert_eq!(got, expected, "chunk {chunk}");
            let (fin, opcode, payload, used) = client_frame(&replies);
            assert_eq!(
                (fin, opcode, payload.as_slice()),
                (true, PONG, &b"livedrop"[..])
            );
            assert_eq!(used, replies.len(), "one pong, chunk {chunk}");
        }
        // And split between every pair of bytes, in two reads.
        for cut in 0..wire.len() {
            let mut reader = FrameReader::new();
            let mut replies = Vec::new();
            let mut got = Vec::new();
            for part in [&wire[..cut], &wire[cut..]] {
                let spare = reader.spare();
                spare[..part.len()].copy_from_slice(part);
                reader.filled(part.len());
                while let Ok(Some(f)) = reader.next_frame(&mut replies) {
                    got.push(match f {
                        Frame::Text(t) => Got::Text(t.into()),
                        Frame::Close(c) => Got::Close(c),
                    });
                }
            }
            assert_eq!(got, expected, "cut at {cut}");
        }
    }

    #[test]
    fn lengths_of_16_and_64_bits_and_frames_larger_than_the_buffer() {
        for len in [125, 126, 127, 0xffff, 0x1_0000, 3 * INITIAL_BUFFER, 200_000] {
            let text = "x".repeat(len);
            let mut wire = server_frame(true, TEXT, text.as_bytes());
            wire.extend(server_frame(true, TEXT, b"after"));
            for chunk in [7, 1500, 65_536] {
                let (got, _, end) = read_all(&wire, chunk);
                assert_eq!(end, Ok(()), "len {len}");
                assert_eq!(
                    got,
                    vec![Got::Text(text.clone()), Got::Text("after".into())]
                );
            }
        }
        // The 64-bit form, even for a length that would fit in 16 bits.
        let mut wire = vec![0x81, 127];
        wire.extend_from_slice(&5u64.to_be_bytes());
        wire.extend_from_slice(b"hello");
        assert_eq!(read_all(&wire, 3).0, vec![Got::Text("hello".into())]);
    }

    #[test]
    fn the_buffer_grows_for_a_large_frame_and_shrinks_back() {
        let mut reader = FrameReader::new();
        let mut replies = Vec::new();
        let big = server_frame(true, TEXT, &[b'r'; 40_000]);
        let mut sent = 0;
        while sent < big.len() {
            let spare = reader.spare();
            let n = spare.len().min(big.len() - sent);
            spare[..n].copy_from_slice(&big[sent..sent + n]);
            reader.filled(n);
            sent += n;
            if sent < big.len() {
                assert!(matches!(reader.next_frame(&mut replies), Ok(None)));
            }
        }
        assert!(reader.buf.len() >= big.len() && reader.buf.len() < 2 * big.len());
        assert!(
            matches!(reader.next_frame(&mut replies), Ok(Some(Frame::Text(t))) if t.len() == 40_000)
        );
        reader.spare();
        assert_eq!(reader.buf.len(), INITIAL_BUFFER);
    }

    #[test]
    fn close_codes_and_violations_are_reported() {
        let close = |payload: &[u8]| read_all(&server_frame(true, CLOSE, payload), 100).0;
        assert_eq!(close(&1000u16.to_be_bytes()), vec![Got::Close(Some(1000))]);
        assert_eq!(
            close(&[0x0f, 0xa0, b'b', b'y', b'e']),
            vec![Got::Close(Some(4000))]
        );
        assert_eq!(close(b""), vec![Got::Close(None)]);
        let error = |wire: &[u8]| read_all(wire, 100).2.expect_err("a violation");
        assert_eq!(
            error(&server_frame(true, CLOSE, &[3])),
            "WebSocket protocol error: Invalid close sequence"
        );
        assert_eq!(
            error(&[0x81, 0x81, 0, 0, 0, 0, b'x']),
            "WebSocket protocol error: Received a masked frame from server"
        );
        assert_eq!(
            error(&server_frame(true, CONTINUATION, b"x")),
            "WebSocket protocol error: Continue frame but nothing to continue"
        );
        assert_eq!(
            error(&server_frame(false, PING, b"x")),
            "WebSocket protocol error: Fragmented control frame"
        );
        assert!(
            error(&server_frame(true, TEXT, &[0xff, 0xfe])).starts_with("UTF-8 encoding error")
        );
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&(MAX_MESSAGE as u64 + 1).to_be_bytes());
        assert!(error(&huge).starts_with("Space limit exceeded: Message too long"));
    }

    #[test]
    fn client_frames_are_masked_and_decode_back() {
        let mut out = Vec::new();
        encode_text(&mut out, "claim");
        encode_close(&mut out);
        let long = "c".repeat(300);
        encode_text(&mut out, &long);
        let (fin, op, payload, used) = client_frame(&out);
        assert_eq!((fin, op, payload.as_slice()), (true, TEXT, &b"claim"[..]));
        let (_, op, payload, used2) = client_frame(&out[used..]);
        assert_eq!((op, payload.as_slice()), (CLOSE, &[][..]));
        let (_, op, payload, used3) = client_frame(&out[used + used2..]);
        assert_eq!((op, payload), (TEXT, long.into_bytes()));
        assert_eq!(used + used2 + used3, out.len());
        assert_ne!(mask_key(), mask_key());
    }
}
