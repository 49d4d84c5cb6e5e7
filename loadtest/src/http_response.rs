//! Reading HTTP/1.1 responses off a keep-alive connection into one reusable buffer: the
//! status line and headers (parsed with httparse), then the body framed by `Content-Length`,
//! by `Transfer-Encoding: chunked` (decoded in place) or by the end of the connection.
//! Interim `1xx` answers are skipped; bytes past the end of a response stay buffered for the
//! next one. Heads over [`MAX_HEAD`] bytes and bodies over the reader's body limit fail the
//! read, and so does anything that is not well-formed HTTP/1.1 framing.

use anyhow::{Context, bail};
use httparse::Status;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest status line plus headers accepted (also bounds a chunk-size line and trailers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Headers parsed per response; livedrop sends a handful.
const MAX_HEADERS: usize = 48;
/// Free space guaranteed before each read, so a typical answer arrives in one read.
const READ_SPACE: usize = 16 * 1024;

/// One response: its status and body, borrowed from the reader's buffer until the next read.
#[derive(Debug)]
pub struct Answer<'a> {
    pub status: u16,
    pub body: &'a [u8],
    /// False when the server closes the connection after this response (`Connection:
    /// close`, HTTP/1.0 without keep-alive, or a body that ends with the connection).
    pub keep_alive: bool,
}

/// How the body of a response ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// No body whatever the headers say (`204`, `304`).
    Empty,
    Length(usize),
    Chunked,
    /// Everything until the server closes the connection.
    UntilClose,
}

/// What the head of a response says, copied out of the buffer.
#[derive(Debug)]
struct Head {
    status: u16,
    /// Bytes of status line and headers, final empty line included.
    len: usize,
    framing: Framing,
    keep_alive: bool,
}

/// The receiving half of one connection: a buffer holding the unread bytes, reused from
/// response to response so steady-state reads allocate nothing.
pub struct ResponseReader {
    buf: Vec<u8>,
    /// Start of the unread bytes in `buf`.
    start: usize,
    max_body: usize,
}

impl ResponseReader {
    /// A reader refusing bodies over `max_body` bytes.
    pub fn new(max_body: usize) -> Self {
        Self {
            buf: Vec::with_capacity(READ_SPACE),
            start: 0,
            max_body,
        }
    }

    /// Forgets any buffered bytes: the connection they came from is gone.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }

    /// Reads the next whole response from `io` (after the bytes already buffered).
    pub async fn read<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> anyhow::Result<Answer<'_>> {
        self.compact();
        let head = loop {
            match self.parse_head()? {
                Some(h) if (100..200).contains(&h.status) => self.start += h.len,
                Some(h) => break h,
                None if self.buf.len() - self.start > MAX_HEAD => {
                    bail!("response head over {} KiB", MAX_HEAD / 1024)
                }
                None => self.fill(io).await?,
            }
        };
        let body_start = self.start + head.len;
        let mut keep_alive = head.keep_alive;
        let (body_end, next) = match head.framing {
            Framing::Empty => (body_start, body_start),
            Framing::Length(n) => {
                self.check_body_size(n)?;
                let end = body_start + n;
                self.buf.reserve(end.saturating_sub(self.buf.len()));
                while self.buf.len() < end {
                    self.fill(io).await?;
                }
                (end, end)
            }
            Framing::Chunked => self.read_chunked(io, body_start).await?,
            Framing::UntilClose => {
                keep_alive = false;
                while self.fill_or_eof(io).await? > 0 {
                    self.check_body_size(self.buf.len() - body_start)?;
                }
                (self.buf.len(), self.buf.len())
            }
        };
        self.start = next;
        Ok(Answer {
            status: head.status,
            body: &self.buf[body_start..body_end],
            keep_alive,
        })
    }

    /// Moves unread bytes to the front of the buffer (usually there are none).
    fn compact(&mut self) {
        if self.start == self.buf.len() {
            self.buf.clear();
        } else if self.start > 0 {
            self.buf.copy_within(self.start.., 0);
            self.buf.truncate(self.buf.len() - self.start);
        }
        self.start = 0;
    }

    fn check_body_size(&self, n: usize) -> anyhow::Result<()> {
        if n > self.max_body {
            bail!("response body over {} bytes", self.max_body);
        }
        Ok(())
    }

    /// Appends what the connection has to the buffer; the connection ending is an error.
    async fn fill<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> anyhow::Result<()> {
        if self.fill_or_eof(io).await? == 0 {
            bail!("connection closed before the whole response");
        }
        Ok(())
    }

    /// Appends what the connection has to the buffer: the count of bytes read, 0 at its end.
    async fn fill_or_eof<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> anyhow::Result<usize> {
        if self.buf.capacity() - self.buf.len() < READ_SPACE / 4 {
            self.buf.reserve(READ_SPACE);
        }
        io.read_buf(&mut self.buf).await.context("read")
    }

    /// The head at `start`, or `None` while it is incomplete.
    fn parse_head(&self) -> anyhow::Result<Option<Head>> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let len = match response
            .parse(&self.buf[self.start..])
            .context("malformed response head")?
        {
            Status::Partial => return Ok(None),
            Status::Complete(len) => len,
        };
        let status = response.code.context("response without a status")?;
        let mut length: Option<usize> = None;
        let mut chunked = false;
        let (mut close, mut keep_alive) = (false, false);
        for h in response.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let n = parse_length(h.value).context("bad Content-Length")?;
                if length.is_some_and(|l| l != n) {
                    bail!("conflicting Content-Length headers");
                }
                length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                // Only `chunked` as the last coding frames a body this client can read.
                let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
                if !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    bail!(
                        "unsupported Transfer-Encoding {:?}",
                        String::from_utf8_lossy(h.value)
                    );
                }
                chunked = true;
            } else if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
        }
        let framing = match (status, chunked, length) {
            (100..200 | 204 | 304, _, _) => Framing::Empty,
            (_, true, _) => Framing::Chunked,
            (_, false, Some(n)) => Framing::Length(n),
            (_, false, None) => Framing::UntilClose,
        };
        let http11 = response.version == Some(1);
        Ok(Some(Head {
            status,
            len,
            framing,
            keep_alive: !close && (http11 || keep_alive),
        }))
    }

    /// Reads a chunked body starting at `body_start`, moving each chunk's data down so the
    /// body ends up contiguous at `body_start`. Returns the body's end and the message's end.
    async fn read_chunked<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        body_start: usize,
    ) -> anyhow::Result<(usize, usize)> {
        let mut body_end = body_start;
        let mut at = body_start; // the next chunk-size line
        loop {
            let (line, size) = match httparse::parse_chunk_size(&self.buf[at..]) {
                Ok(Status::Complete(parsed)) => parsed,
                Ok(Status::Partial) => {
                    self.check_line(at)?;
                    self.fill(io).await?;
                    continue;
                }
                Err(_) => bail!("malformed chunk size"),
            };
            if size == 0 {
                at += line;
                break;
            }
            let size = usize::try_from(size).context("chunk too large")?;
            self.check_body_size((body_end - body_start).saturating_add(size))?;
            let data = at + line;
            while self.buf.len() < data + size + 2 {
                self.fill(io).await?;
            }
            if &self.buf[data + size..data + size + 2] != b"\r\n" {
                bail!("chunk data not followed by CRLF");
            }
            self.buf.copy_within(data..data + size, body_end);
            body_end += size;
            at = data + size + 2;
        }
        // The trailer section: header lines up to an empty line, all ignored.
        let trailers = at;
        loop {
            match self.buf[at..].windows(2).position(|w| w == b"\r\n") {
                Some(0) => return Ok((body_end, at + 2)),
                Some(i) => at += i + 2,
                None => {
                    self.check_line(trailers)?;
                    self.fill(io).await?;
                }
            }
        }
    }

    /// Fails when the bytes buffered from `from` on are too many for a line still unfinished.
    fn check_line(&self, from: usize) -> anyhow::Result<()> {
        if self.buf.len() - from > MAX_HEAD {
            bail!("chunk framing line over {} KiB", MAX_HEAD / 1024);
        }
        Ok(())
    }
}

/// A `Content-Length` value: decimal digits only.
fn parse_length(value: &[u8]) -> anyhow::Result<usize> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        bail!("not a number");
    }
    std::str::from_utf8(digits)?.parse().context("out of range")
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    use super::*;

    /// A connection that hands out the given pieces, one per read, then ends.
    struct Pieces(VecDeque<Vec<u8>>);

    impl Pieces {
        fn new(pieces: &[&[u8]]) -> Self {
            Self(pieces.iter().map(|p| p.to_vec()).collect())
        }
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some(mut piece) = self.0.pop_front() {
                let n = piece.len().min(out.remaining());
                out.put_slice(&piece[..n]);
                if n < piece.len() {
                    self.0.push_front(piece.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Status, body and keep-alive of each response in `pieces`, in order, until one fails.
    async fn read_all(pieces: &[&[u8]], count: usize) -> Vec<anyhow::Result<(u16, String, bool)>> {
        let mut io = Pieces::new(pieces);
        let mut reader = ResponseReader::new(1024);
        let mut out = Vec::new();
        for _ in 0..count {
            let r = reader.read(&mut io).await.map(|a| {
                let body = String::from_utf8_lossy(a.body).into_owned();
                (a.status, body, a.keep_alive)
            });
            let failed = r.is_err();
            out.push(r);
            if failed {
                break;
            }
        }
        out
    }

    async fn read_one(pieces: &[&[u8]]) -> anyhow::Result<(u16, String, bool)> {
        read_all(pieces, 1)
            .await
            .pop()
            .unwrap_or_else(|| Err(anyhow::anyhow!("nothing read")))
    }

    fn ok(status: u16, body: &str, keep_alive: bool) -> (u16, String, bool) {
        (status, body.to_string(), keep_alive)
    }

    const CLAIMED: &[u8] = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\
        content-length: 22\r\ndate: Tue, 01 Dec 2026 09:00:00 GMT\r\n\r\n{\"claim_id\":\"d4f2.17\"}";

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
        5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nx-trailer: 1\r\n\r\n";

    #[tokio::test]
    async fn a_response_split_at_every_byte_reads_the_same() {
        for message in [CLAIMED, CHUNKED] {
            let whole = read_one(&[message]).await.map_err(|e| e.to_string());
            assert!(whole.is_ok(), "{whole:?}");
            for cut in 1..message.len() {
                let (a, b) = message.split_at(cut);
                let split = read_one(&[a, b]).await.map_err(|e| e.to_string());
                assert_eq!(split, whole, "cut at {cut}");
            }
            let bytes: Vec<&[u8]> = message.chunks(1).collect();
            let trickled = read_one(&bytes).await.map_err(|e| e.to_string());
            assert_eq!(trickled, whole);
        }
        let claimed = read_one(&[CLAIMED]).await.map_err(|e| e.to_string());
        assert_eq!(claimed, Ok(ok(201, "{\"claim_id\":\"d4f2.17\"}", true)));
        let chunked = read_one(&[CHUNKED]).await.map_err(|e| e.to_string());
        assert_eq!(chunked, Ok(ok(200, "hello world!", true)));
    }

    #[tokio::test]
    async fn pipelined_responses_in_one_read_are_kept_apart() {
        let three = [
            CLAIMED,
            CHUNKED,
            b"HTTP/1.1 204 No Content\r\n\r\n".as_slice(),
        ]
        .concat();
        let want = vec![
            Ok(ok(201, "{\"claim_id\":\"d4f2.17\"}", true)),
            Ok(ok(200, "hello world!", true)),
            Ok(ok(204, "", true)),
        ];
        // All three in one read, then split at every byte so that a read ends anywhere.
        for cut in 1..=three.len() {
            let (a, b) = three.split_at(cut);
            let answers: Vec<_> = read_all(&[a, b], 3)
                .await
                .into_iter()
                .map(|r| r.map_err(|e| e.to_string()))
                .collect();
            assert_eq!(answers, want, "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_close_is_honoured() {
        let r = read_one(&[b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 409 Conflict\r\n\
            Connection: close\r\nContent-Length: 2\r\n\r\n{}"])
        .await
        .map_err(|e| e.to_string());
        assert_eq!(r, Ok(ok(409, "{}", false)));
        let r = read_one(&[b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"]).await;
        assert_eq!(r.map_err(|e| e.to_string()), Ok(ok(200, "", false)));
        let r = read_one(&[b"HTTP/1.0 200 OK\r\n\r\nuntil ", b"the end"]).await;
        assert_eq!(
            r.map_err(|e| e.to_string()),
            Ok(ok(200, "until the end", false))
        );
    }

    #[tokio::test]
    async fn bad_framing_fails_with_a_reason() {
        let cases: [(&[u8], &str); 8] = [
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
                "closed before",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                "conflicting",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n",
                "body over",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                "Transfer-Encoding",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd",
                "CRLF",
            ),
            (b"HTTX/1.1 200 OK\r\n\r\n", "malformed response head"),
        ];
        for (bytes, reason) in cases {
            let e = read_one(&[bytes]).await.err().map(|e| format!("{e:#}"));
            assert!(
                e.as_deref().is_some_and(|e| e.contains(reason)),
                "{:?}: {e:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let huge = [b"HTTP/1.1 200 OK\r\nx: ".as_slice(), &[b'a'; MAX_HEAD]].concat();
        let e = read_one(&[&huge]).await.err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("head over")));
    }
}
