//! Manager-protocol frames ([`crate::mgr`]) over a byte stream: the one implementation every
//! party uses — `xl-vtpm`'s admin client, vtpm-domain's manager link, vtpmmgr's sockets, the
//! tests and benchmarks. It reads and writes only a stream its caller opened (blocking
//! [`std::io`], or tokio's with the `tokio` feature), and a frame's body grows with the bytes
//! that actually arrive, never to its declared length up front; the buffers are zeroed when
//! they grow or drop (a reply may carry a state key).

use std::io::{Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::mgr::{self, FrameError};

/// Why a frame could not be exchanged.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Reading or writing the stream failed.
    #[error("the manager connection failed")]
    Io(#[source] std::io::Error),
    /// The peer closed the connection before it answered.
    #[error("the connection closed before a reply")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("the frame ended after {got} of its {want} bytes")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes the length prefix announced.
        want: usize,
    },
    /// The frame is too large, or its payload is not the expected message.
    #[error("unusable manager frame")]
    Frame(#[source] FrameError),
}

impl From<WireError> for std::io::Error {
    /// Keeps the kind callers retry on (a closed connection is `UnexpectedEof`), and the cause.
    fn from(e: WireError) -> std::io::Error {
        let kind = match &e {
            WireError::Io(io) => io.kind(),
            WireError::Closed | WireError::Truncated { .. } => std::io::ErrorKind::UnexpectedEof,
            WireError::Frame(_) => std::io::ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, e)
    }
}

/// Appends `chunk` to `body`, moving to a bigger buffer (the old one zeroed on drop) rather than
/// letting the vector reallocate and leave a copy behind.
fn append(body: &mut Zeroizing<Vec<u8>>, chunk: &[u8], want: usize) {
    if body.len() + chunk.len() > body.capacity() {
        let cap = (body.capacity() * 2).max(body.len() + chunk.len()).min(want);
        let mut bigger = Zeroizing::new(Vec::with_capacity(cap));
        bigger.extend_from_slice(body);
        *body = bigger;
    }
    body.extend_from_slice(chunk);
}

const CHUNK: usize = 4096;

/// Reading one frame, without the I/O: the prefix, its length checked against the cap
/// ([`mgr::frame_len`]) before any body is allocated, then a body that grows only with the bytes
/// that arrive. The blocking and the async reader both feed it: a reader reads into [`buf`],
/// hands the outcome to [`advance`], and stops at [`Progress::Done`].
///
/// [`buf`]: FrameDecoder::buf
/// [`advance`]: FrameDecoder::advance
pub struct FrameDecoder {
    prefix: [u8; 4],
    /// Prefix bytes received.
    got: usize,
    /// The body's length, once the prefix is whole and within the cap.
    want: Option<usize>,
    body: Zeroizing<Vec<u8>>,
    chunk: Zeroizing<[u8; CHUNK]>,
}

/// What a read did to the frame being decoded.
#[derive(Debug)]
pub enum Progress {
    /// The frame needs more bytes.
    More,
    /// The frame's payload; `None` if the stream ended before a frame started.
    Done(Option<Zeroizing<Vec<u8>>>),
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder { prefix: [0; 4], got: 0, want: None, body: Zeroizing::new(Vec::new()), chunk: Zeroizing::new([0; CHUNK]) }
    }
}

impl FrameDecoder {
    /// A decoder at the start of a frame.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where the next read goes: never more than the frame still needs.
    pub fn buf(&mut self) -> &mut [u8] {
        match self.want {
            None => &mut self.prefix[self.got..],
            Some(want) => {
                let n = (want - self.body.len()).min(CHUNK);
                &mut self.chunk[..n]
            }
        }
    }

    /// Takes the outcome of a read into [`buf`](Self::buf): `Ok(0)` is the end of the stream
    /// (clean before a frame starts, [`WireError::Truncated`] inside one); an interrupted read
    /// is retried; any other I/O error ends the frame.
    pub fn advance(&mut self, read: std::io::Result<usize>) -> Result<Progress, WireError> {
        let k = match read {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(Progress::More),
            Err(e) => return Err(WireError::Io(e)),
        };
        match self.want {
            None => {
                if k == 0 {
                    return if self.got == 0 { Ok(Progress::Done(None)) } else { Err(WireError::Truncated { got: self.got, want: 4 }) };
                }
                self.got += k;
                if self.got < 4 {
                    return Ok(Progress::More);
                }
                let want = mgr::frame_len(self.prefix).map_err(WireError::Frame)?;
                self.body = Zeroizing::new(Vec::with_capacity(want.min(CHUNK)));
                self.want = Some(want);
            }
            Some(want) => {
                if k == 0 {
                    return Err(WireError::Truncated { got: self.body.len(), want });
                }
                append(&mut self.body, &self.chunk[..k], want);
            }
        }
        if self.want.is_some_and(|w| self.body.len() == w) {
            return Ok(Progress::Done(Some(std::mem::take(&mut self.body))));
        }
        Ok(Progress::More)
    }
}

/// Reads one frame and returns its payload; `Ok(None)` if the stream ends before a frame starts.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Zeroizing<Vec<u8>>>, WireError> {
    let mut d = FrameDecoder::new();
    loop {
        let read = r.read(d.buf());
        if let Progress::Done(frame) = d.advance(read)? {
            return Ok(frame);
        }
    }
}

/// Writes `msg` as one frame.
pub fn write_msg<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), WireError> {
    let frame = mgr::encode(msg).map_err(WireError::Frame)?;
    w.write_all(&frame).map_err(WireError::Io)
}

/// Sends `req` and reads the one reply.
pub fn call<S: Read + Write, Req: Serialize, Rep: DeserializeOwned>(s: &mut S, req: &Req) -> Result<Rep, WireError> {
    write_msg(s, req)?;
    let body = read_frame(s)?.ok_or(WireError::Closed)?;
    mgr::decode(&body).map_err(WireError::Frame)
}

/// Decodes a whole frame held in memory (a tpmif page: length prefix ‖ payload); the prefix
/// must announce exactly the bytes that follow it.
pub fn decode_frame<T: DeserializeOwned>(frame: &[u8]) -> Result<T, WireError> {
    let prefix: [u8; 4] = frame.get(..4).and_then(|p| p.try_into().ok()).ok_or(WireError::Truncated { got: frame.len(), want: 4 })?;
    let want = mgr::frame_len(prefix).map_err(WireError::Frame)?;
    if frame.len() - 4 != want {
        return Err(WireError::Truncated { got: frame.len() - 4, want });
    }
    mgr::decode(&frame[4..]).map_err(WireError::Frame)
}

/// The same over tokio's streams.
#[cfg(feature = "tokio")]
pub mod nonblocking {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::*;

    /// [`read_frame`](super::read_frame) over an async stream.
    pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Zeroizing<Vec<u8>>>, WireError> {
        let mut d = FrameDecoder::new();
        loop {
            let read = r.read(d.buf()).await;
            if let Progress::Done(frame) = d.advance(read)? {
                return Ok(frame);
            }
        }
    }

    /// [`write_msg`](super::write_msg) over an async stream.
    pub async fn write_msg<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<(), WireError> {
        let frame = mgr::encode(msg).map_err(WireError::Frame)?;
        w.write_all(&frame).await.map_err(WireError::Io)
    }

    /// [`call`](super::call) over an async stream.
    pub async fn call<S: AsyncRead + AsyncWrite + Unpin, Req: Serialize, Rep: DeserializeOwned>(s: &mut S, req: &Req) -> Result<Rep, WireError> {
        write_msg(s, req).await?;
        let body = read_frame(s).await?.ok_or(WireError::Closed)?;
        mgr::decode(&body).map_err(WireError::Frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mgr::{AdminReply, AdminRequest, MAX_FRAME};

    #[test]
    fn a_call_round_trips_and_reports_each_failure() {
        // The reply the "manager" wrote, then the request the client writes, on one buffer pair.
        let mut reply = vec![];
        write_msg(&mut reply, &AdminReply::Ok).unwrap();
        let mut s = std::io::Cursor::new(reply.clone());
        let r: AdminReply = read_frame(&mut s).unwrap().map(|b| mgr::decode(&b).unwrap()).unwrap();
        assert_eq!(r, AdminReply::Ok);
        assert!(read_frame(&mut s).unwrap().is_none(), "a clean end is no error");
        assert!(matches!(read_frame(&mut &reply[..reply.len() - 1]), Err(WireError::Truncated { .. })));
        assert!(matches!(read_frame(&mut &reply[..2]), Err(WireError::Truncated { got: 2, want: 4 })));
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(read_frame(&mut &huge[..]), Err(WireError::Frame(FrameError::TooLarge(_)))));
        assert_eq!(decode_frame::<AdminReply>(&reply).unwrap(), AdminReply::Ok);
        assert!(decode_frame::<AdminReply>(&reply[..reply.len() - 1]).is_err());
        let e = decode_frame::<AdminRequest>(&reply).unwrap_err();
        let line = xvtpm_log::report(&e);
        assert!(line.starts_with("unusable manager frame: malformed message: "), "{line}");
        assert_eq!(std::io::Error::from(WireError::Closed).kind(), std::io::ErrorKind::UnexpectedEof);
    }

    /// A reader that hands out at most `step` bytes a call and counts what it handed out.
    struct Slow<'a> {
        data: &'a [u8],
        step: usize,
        taken: usize,
    }
    impl Read for Slow<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.step).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            self.taken += n;
            Ok(n)
        }
    }

    #[test]
    fn the_cap_is_checked_before_a_body_is_allocated_or_read() {
        // A prefix over the cap, then as many bytes as it announces: only the prefix is read.
        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.resize(4 + MAX_FRAME + 1, 0);
        let mut r = Slow { data: &huge, step: CHUNK, taken: 0 };
        assert!(matches!(read_frame(&mut r), Err(WireError::Frame(FrameError::TooLarge(n))) if n == MAX_FRAME + 1));
        assert_eq!(r.taken, 4, "nothing past the prefix is read");
        // The decoder itself: the prefix in two reads, the refusal holds no body.
        let mut d = FrameDecoder::new();
        assert_eq!(d.buf().len(), 4);
        d.buf()[..2].copy_from_slice(&huge[..2]);
        assert!(matches!(d.advance(Ok(2)), Ok(Progress::More)));
        assert_eq!(d.buf().len(), 2, "the rest of the prefix, no more");
        d.buf().copy_from_slice(&huge[2..4]);
        assert!(matches!(d.advance(Ok(2)), Err(WireError::Frame(FrameError::TooLarge(_)))));
        assert_eq!(d.body.capacity(), 0, "no body allocated for a refused length");
        // At the cap, the first allocation is one chunk, not the announced length.
        let mut d = FrameDecoder::new();
        d.buf().copy_from_slice(&(MAX_FRAME as u32).to_be_bytes());
        assert!(matches!(d.advance(Ok(4)), Ok(Progress::More)));
        assert_eq!(d.body.capacity(), CHUNK);
        assert_eq!(d.buf().len(), CHUNK, "reads go a chunk at a time");
    }

    #[test]
    fn a_truncated_frame_is_an_error_and_an_empty_one_is_not() {
        let mut f = vec![];
        write_msg(&mut f, &AdminReply::Ok).unwrap();
        for cut in 1..f.len() {
            let want = f.len() - 4;
            let got = read_frame(&mut Slow { data: &f[..cut], step: 1, taken: 0 });
            match got {
                Err(WireError::Truncated { got, want: 4 }) if cut < 4 => assert_eq!(got, cut),
                Err(WireError::Truncated { got, want: w }) if cut >= 4 => assert_eq!((got, w), (cut - 4, want)),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        // Read a byte at a time, the whole frame still arrives.
        let body = read_frame(&mut Slow { data: &f, step: 1, taken: 0 }).unwrap().unwrap();
        assert_eq!(&body[..], &f[4..]);
        // A zero-length frame is a frame (its payload empty), not the end of the stream.
        assert_eq!(read_frame(&mut &[0u8, 0, 0, 0][..]).unwrap().map(|b| b.len()), Some(0));
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
        // An I/O error ends the frame; an interrupted read is retried.
        let mut d = FrameDecoder::new();
        assert!(matches!(d.advance(Err(std::io::ErrorKind::Interrupted.into())), Ok(Progress::More)));
        assert!(matches!(d.advance(Err(std::io::ErrorKind::ConnectionReset.into())), Err(WireError::Io(_))));
    }

    /// The async reader feeds the same decoder: the same frames, the same refusals.
    #[cfg(feature = "tokio")]
    #[test]
    fn the_async_reader_decodes_alike() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut f = vec![];
        write_msg(&mut f, &AdminReply::Ok).unwrap();
        rt.block_on(async {
            let body = nonblocking::read_frame(&mut &f[..]).await.unwrap().unwrap();
            assert_eq!(&body[..], &f[4..]);
            assert!(nonblocking::read_frame(&mut &[][..]).await.unwrap().is_none());
            assert!(matches!(nonblocking::read_frame(&mut &f[..f.len() - 1]).await, Err(WireError::Truncated { .. })));
            assert!(matches!(nonblocking::read_frame(&mut &f[..2]).await, Err(WireError::Truncated { got: 2, want: 4 })));
            let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
            assert!(matches!(nonblocking::read_frame(&mut &huge[..]).await, Err(WireError::Frame(FrameError::TooLarge(_)))));
        });
    }

    #[test]
    fn a_large_body_is_read_whole_in_chunks() {
        let big = AdminReply::Error(mgr::Failure::new(mgr::ErrorCode::Internal, "x".repeat(100_000)));
        let mut f = vec![];
        write_msg(&mut f, &big).unwrap();
        let body = read_frame(&mut Slow { data: &f, step: 1000, taken: 0 }).unwrap().unwrap();
        assert_eq!(mgr::decode::<AdminReply>(&body).unwrap(), big);
    }
}
