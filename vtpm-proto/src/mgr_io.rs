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

/// Reads one frame and returns its payload; `Ok(None)` if the stream ends before a frame starts.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Zeroizing<Vec<u8>>>, WireError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(WireError::Truncated { got, want: 4 }),
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    let want = mgr::frame_len(prefix).map_err(WireError::Frame)?;
    let mut body = Zeroizing::new(Vec::with_capacity(want.min(CHUNK)));
    let mut chunk = Zeroizing::new([0u8; CHUNK]);
    while body.len() < want {
        let n = (want - body.len()).min(CHUNK);
        match r.read(&mut chunk[..n]) {
            Ok(0) => return Err(WireError::Truncated { got: body.len(), want }),
            Ok(k) => append(&mut body, &chunk[..k], want),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(Some(body))
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
        let mut prefix = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match r.read(&mut prefix[got..]).await {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(WireError::Truncated { got, want: 4 }),
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::Io(e)),
            }
        }
        let want = mgr::frame_len(prefix).map_err(WireError::Frame)?;
        let mut body = Zeroizing::new(Vec::with_capacity(want.min(CHUNK)));
        let mut chunk = Zeroizing::new([0u8; CHUNK]);
        while body.len() < want {
            let n = (want - body.len()).min(CHUNK);
            match r.read(&mut chunk[..n]).await {
                Ok(0) => return Err(WireError::Truncated { got: body.len(), want }),
                Ok(k) => append(&mut body, &chunk[..k], want),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::Io(e)),
            }
        }
        Ok(Some(body))
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

    #[test]
    fn a_large_body_is_read_whole_in_chunks() {
        let big = AdminReply::Error(mgr::Failure::new(mgr::ErrorCode::Internal, "x".repeat(100_000)));
        let mut f = vec![];
        write_msg(&mut f, &big).unwrap();
        // A reader that hands out at most 1000 bytes a call.
        struct Slow<'a>(&'a [u8]);
        impl Read for Slow<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(1000).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let body = read_frame(&mut Slow(&f)).unwrap().unwrap();
        assert_eq!(mgr::decode::<AdminReply>(&body).unwrap(), big);
    }
}
