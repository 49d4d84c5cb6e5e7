//! RFC 6455 frames on bytes, with no I/O: server frames are encoded once into shared bytes
//! (unmasked, so the same bytes go to every viewer), and client frames are decoded
//! incrementally from whatever the socket returned, under hard size limits. Header parsing
//! and formatting are tungstenite's; this module owns the rules a server must enforce
//! (masking, control-frame limits, fragmentation, UTF-8) and the close code each violation
//! earns.

use std::io::Cursor;

use bytes::{Bytes, BytesMut};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// Close codes of the protocol itself (livedrop's own are in `hub::session::close`).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const PROTOCOL: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
}

/// A complete message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    /// Binary messages are refused by the protocol layer above; the payload is not kept.
    Binary,
    Ping(Bytes),
    Pong,
    /// The client's close code, if it sent one.
    Close(Option<u16>),
}

/// Why the decoder gave up: the connection must close with [`Violation::code`].
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Violation {
    /// A frame or message over the size limit (1009).
    TooBig,
    /// Text that is not UTF-8 (1007).
    BadUtf8,
    /// Anything else RFC 6455 forbids a client to send (1002).
    Protocol(&'static str),
}

impl Violation {
    pub fn code(self) -> u16 {
        match self {
            Violation::TooBig => close_code::TOO_BIG,
            Violation::BadUtf8 => close_code::INVALID_DATA,
            Violation::Protocol(_) => close_code::PROTOCOL,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Violation::TooBig => "message too big",
            Violation::BadUtf8 => "invalid UTF-8",
            Violation::Protocol(why) => why,
        }
    }
}

fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    let len = payload.len() as u64;
    let mut out = Vec::with_capacity(header.len(len) + payload.len());
    // Writing into a Vec cannot fail.
    let _ = header.format(len, &mut out);
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A final, unmasked text frame: what every room event and reply becomes, once.
pub fn text(payload: &str) -> Bytes {
    encode(OpCode::Data(Data::Text), payload.as_bytes())
}

/// Longest server frame header: 2 bytes and a 64-bit length.
const MAX_SERVER_HEADER: usize = 10;

/// A value serialized as JSON straight into a final text frame: one allocation, no copy
/// (the header is written in front of the JSON once its length is known).
pub fn json<T: serde::Serialize>(value: &T) -> serde_json::Result<Bytes> {
    let mut out = Vec::with_capacity(256);
    out.resize(MAX_SERVER_HEADER, 0);
    serde_json::to_writer(&mut out, value)?;
    let len = (out.len() - MAX_SERVER_HEADER) as u64;
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        ..FrameHeader::default()
    };
    let start = MAX_SERVER_HEADER - header.len(len);
    let mut slot = &mut out[start..MAX_SERVER_HEADER];
    // Writing into a slice of exactly the header's length cannot fail.
    let _ = header.format(len, &mut slot);
    Ok(Bytes::from(out).slice(start..))
}

/// A close frame with a code and a short reason (truncated to fit the 125-byte limit).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode(OpCode::Control(Control::Close), &payload)
}

/// A ping (at most 125 bytes of payload).
pub fn ping(payload: &[u8]) -> Bytes {
    encode(
        OpCode::Control(Control::Ping),
        &payload[..payload.len().min(125)],
    )
}

/// The pong answering a ping with this payload.
pub fn pong(payload: &[u8]) -> Bytes {
    encode(
        OpCode::Control(Control::Pong),
        &payload[..payload.len().min(125)],
    )
}

/// A fragmented message being assembled.
struct Partial {
    text: bool,
    data: Vec<u8>,
}

/// Turns the client's byte stream into messages. Holds at most one frame's worth of unread
/// bytes plus one message being assembled, both capped by `max_message`; an idle connection
/// holds no buffer at all.
pub struct Decoder {
    buf: BytesMut,
    partial: Option<Partial>,
    max_message: usize,
}

impl Decoder {
    /// `max_message` caps every frame and every assembled message (bytes of payload).
    pub fn new(max_message: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            partial: None,
            max_message,
        }
    }

    /// Adds bytes read from the socket.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Whether bytes of an unfinished frame are waiting for more input.
    pub fn has_pending(&self) -> bool {
        !self.buf.is_empty() || self.partial.is_some()
    }

    /// The next complete message, `Ok(None)` when more input is needed.
    pub fn next_message(&mut self) -> Result<Option<Incoming>, Violation> {
        loop {
            let Some((header, len, header_len)) = self.header()? else {
                self.release_if_empty();
                return Ok(None);
            };
            let total = header_len + len;
            if self.buf.len() < total {
                return Ok(None);
            }
            let mut frame = self.buf.split_to(total);
            let mut payload = frame.split_off(header_len);
            if let Some(mask) = header.mask {
                unmask(&mut payload, mask);
            }
            self.release_if_empty();
            if let Some(message) = self.on_frame(&header, payload)? {
                return Ok(Some(message));
            }
        }
    }

    /// Parses and checks the next frame header: `(header, payload length, header length)`.
    fn header(&self) -> Result<Option<(FrameHeader, usize, usize)>, Violation> {
        let mut cursor = Cursor::new(&self.buf[..]);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(None),
            Err(_) => return Err(Violation::Protocol("bad frame header")),
        };
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(Violation::Protocol("reserved bits set"));
        }
        if header.mask.is_none() {
            return Err(Violation::Protocol("client frames must be masked"));
        }
        if let OpCode::Control(_) = header.opcode {
            if !header.is_final {
                return Err(Violation::Protocol("fragmented control frame"));
            }
            if len > 125 {
                return Err(Violation::Protocol("control frame over 125 bytes"));
            }
        }
        // Refused from the header alone: a 2^60-byte claim never makes us wait or allocate.
        let assembled = self.partial.as_ref().map_or(0, |p| p.data.len() as u64);
        if len > self.max_message as u64 || assembled + len > self.max_message as u64 {
            return Err(Violation::TooBig);
        }
        Ok(Some((header, len as usize, cursor.position() as usize)))
    }

    fn on_frame(
        &mut self,
        header: &FrameHeader,
        payload: BytesMut,
    ) -> Result<Option<Incoming>, Violation> {
        match header.opcode {
            OpCode::Control(Control::Ping) => Ok(Some(Incoming::Ping(payload.freeze()))),
            OpCode::Control(Control::Pong) => Ok(Some(Incoming::Pong)),
            OpCode::Control(Control::Close) => close_payload(&payload).map(Some),
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(Violation::Protocol("unknown opcode"))
            }
            OpCode::Data(Data::Continue) => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err(Violation::Protocol("continuation without a message"));
                };
                partial.data.extend_from_slice(&payload);
                if !header.is_final {
                    return Ok(None);
                }
                let done = self.partial.take().map(|p| (p.text, p.data));
                match done {
                    Some((text, data)) => message(text, data).map(Some),
                    None => Ok(None),
                }
            }
            OpCode::Data(data) => {
                if self.partial.is_some() {
                    return Err(Violation::Protocol("new message inside a fragmented one"));
                }
                let text = data == Data::Text;
                if header.is_final {
                    message(text, payload.to_vec()).map(Some)
                } else {
                    self.partial = Some(Partial {
                        text,
                        data: payload.to_vec(),
                    });
                    Ok(None)
                }
            }
        }
    }

    /// An idle connection keeps no read buffer.
    fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

fn message(text: bool, data: Vec<u8>) -> Result<Incoming, Violation> {
    if !text {
        return Ok(Incoming::Binary);
    }
    String::from_utf8(data)
        .map(Incoming::Text)
        .map_err(|_| Violation::BadUtf8)
}

fn close_payload(payload: &[u8]) -> Result<Incoming, Violation> {
    match payload.len() {
        0 => Ok(Incoming::Close(None)),
        1 => Err(Violation::Protocol("close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(Violation::BadUtf8);
            }
            let allowed = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if allowed {
                Ok(Incoming::Close(Some(code)))
            } else {
                Err(Violation::Protocol("bad close code"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, as a browser sends it (header by tungstenite).
    fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let header = FrameHeader {
            is_final: fin,
            opcode: OpCode::from(opcode),
            mask: Some(mask),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        header.format(payload.len() as u64, &mut out).unwrap();
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode_all(d: &mut Decoder) -> Result<Vec<Incoming>, Violation> {
        let mut out = Vec::new();
        while let Some(m) = d.next_message()? {
            out.push(m);
        }
        Ok(out)
    }

    #[test]
    fn server_frames_are_unmasked_and_sized() {
        assert_eq!(&text("hi")[..], &[0x81, 2, b'h', b'i']);
        let long = text(&"x".repeat(300));
        assert_eq!(&long[..4], &[0x81, 126, 1, 44]);
        assert_eq!(long.len(), 304);
        let huge = text(&"x".repeat(70_000));
        assert_eq!(&huge[..2], &[0x81, 127]);
        assert_eq!(&close(4003, "banned")[..4], &[0x88, 8, 0x0f, 0xa3]);
        assert_eq!(close(1000, &"é".repeat(100)).len(), 2 + 2 + 122);
        assert_eq!(&ping(b"p")[..], &[0x89, 1, b'p']);
        assert_eq!(&pong(b"p")[..], &[0x8a, 1, b'p']);
    }

    #[test]
    fn json_frames_equal_text_frames_of_the_same_json() {
        for n in [0, 100, 200, 70_000] {
            let value = serde_json::json!({"type":"chat","text":"x".repeat(n)});
            assert_eq!(
                json(&value).unwrap(),
                text(&value.to_string()),
                "payload {n}"
            );
        }
    }

    #[test]
    fn messages_arrive_whole_whatever_the_read_sizes() {
        let mut wire = client(true, 1, br#"{"type":"ping"}"#);
        wire.extend(client(false, 1, b"hel"));
        wire.extend(client(true, 9, b"ctl"));
        wire.extend(client(true, 0, b"lo"));
        wire.extend(client(true, 10, b""));
        wire.extend(client(true, 8, &[0x03, 0xe8]));
        let want = vec![
            Incoming::Text(r#"{"type":"ping"}"#.into()),
            Incoming::Ping(Bytes::from_static(b"ctl")),
            Incoming::Text("hello".into()),
            Incoming::Pong,
            Incoming::Close(Some(1000)),
        ];
        for step in [1, 2, 3, 7, wire.len()] {
            let mut d = Decoder::new(1024);
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                d.feed(chunk);
                got.extend(decode_all(&mut d).unwrap());
            }
            assert_eq!(got, want, "read size {step}");
            assert!(!d.has_pending());
        }
    }

    #[test]
    fn violations_get_their_close_codes() {
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 60).to_be_bytes());
        huge.extend_from_slice(&[1, 2, 3, 4]);
        let unmasked = vec![0x81, 2, b'h', b'i'];
        let mut fragmented_too_big = client(false, 1, &[b'x'; 600]);
        fragmented_too_big.extend(client(true, 0, &[b'x'; 600]));
        let cases: Vec<(&str, Vec<u8>, u16)> = vec![
            ("2^60 header", huge, 1009),
            ("frame over the limit", client(true, 1, &[b'x'; 1025]), 1009),
            ("message over the limit", fragmented_too_big, 1009),
            ("bad UTF-8", client(true, 1, &[0xff, 0xfe]), 1007),
            ("unmasked", unmasked, 1002),
            ("rsv bit", vec![0xc1, 0x80, 0, 0, 0, 0], 1002),
            ("unknown opcode", client(true, 3, b""), 1002),
            ("fragmented ping", client(false, 9, b""), 1002),
            ("long ping", client(true, 9, &[0; 126]), 1002),
            ("stray continuation", client(true, 0, b"x"), 1002),
            ("one-byte close", client(true, 8, &[3]), 1002),
            ("reserved close code", client(true, 8, &[0x03, 0xed]), 1002),
            (
                "bad close reason",
                client(true, 8, &[0x03, 0xe8, 0xff]),
                1007,
            ),
        ];
        for (name, wire, code) in cases {
            let mut d = Decoder::new(1024);
            d.feed(&wire);
            let err = decode_all(&mut d).expect_err(name);
            assert_eq!(err.code(), code, "{name}");
        }
        let mut d = Decoder::new(1024);
        let mut nested = client(false, 1, b"a");
        nested.extend(client(true, 1, b"b"));
        d.feed(&nested);
        assert_eq!(d.next_message().unwrap_err().code(), 1002);
    }

    #[test]
    fn binary_is_reported_without_its_payload() {
        let mut d = Decoder::new(1024);
        d.feed(&client(true, 2, &[1, 2, 3]));
        assert_eq!(d.next_message().unwrap(), Some(Incoming::Binary));
    }
}
