//! Frames and stream preambles on QUIC streams.
//!
//! Owns: how bytes on a stream become frames (the core's codec: a 7-byte header with magic,
//! version and a length checked against the cap before anything is allocated), and the
//! preamble that opens every stream: which volume, which stream (control or a data lane),
//! and which session the stream belongs to.
//!
//! Must not: interpret frames beyond decoding and validating them.

use crate::volume::SessionId;
use geomirror_core::frame::{self, FrameError, HEADER_BYTES};
use geomirror_core::{Frame, Stream};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const PREAMBLE_MAGIC: [u8; 2] = *b"GS";
const PREAMBLE_VERSION: u8 = 1;
/// Longest volume name in a preamble (names are at most 64 bytes; see config).
const MAX_NAME_BYTES: usize = 255;

#[derive(Debug, Error)]
pub enum FramingError {
    #[error("stream I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("bad stream preamble: {0}")]
    Preamble(&'static str),
    #[error("the stream ended in the middle of a frame")]
    Truncated,
}

/// What a stream carries: sent first on every stream the primary opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preamble {
    pub stream: Stream,
    /// Chosen by the primary per connection attempt; the secondary drops frames of streams
    /// whose session is no longer the volume's current one.
    pub session: SessionId,
    pub volume: String,
}

impl Preamble {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, lane) = match self.stream {
            Stream::Control => (0u8, 0u8),
            Stream::Data(l) => (1, l),
            Stream::Resync => (2, 0),
        };
        let mut b = Vec::with_capacity(16 + self.volume.len());
        b.extend(PREAMBLE_MAGIC);
        b.push(PREAMBLE_VERSION);
        b.push(kind);
        b.push(lane);
        b.extend(self.session.0.to_be_bytes());
        b.push(self.volume.len().min(MAX_NAME_BYTES) as u8);
        b.extend(&self.volume.as_bytes()[..self.volume.len().min(MAX_NAME_BYTES)]);
        b
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Preamble, FramingError> {
        let mut h = [0u8; 14];
        r.read_exact(&mut h).await?;
        if h[0..2] != PREAMBLE_MAGIC {
            return Err(FramingError::Preamble("no preamble magic"));
        }
        if h[2] != PREAMBLE_VERSION {
            return Err(FramingError::Preamble("unknown preamble version"));
        }
        let stream = match h[3] {
            0 => Stream::Control,
            1 => Stream::Data(h[4]),
            2 => Stream::Resync,
            _ => return Err(FramingError::Preamble("unknown stream kind")),
        };
        let session = SessionId(u64::from_be_bytes(h[5..13].try_into().expect("8 bytes")));
        let mut name = vec![0u8; h[13] as usize];
        r.read_exact(&mut name).await?;
        let volume = String::from_utf8(name).map_err(|_| FramingError::Preamble("volume name is not UTF-8"))?;
        Ok(Preamble { stream, session, volume })
    }
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), FramingError> {
    let bytes = frame::encode(f)?;
    w.write_all(&bytes).await?;
    Ok(())
}

/// Reads the next frame; `None` at a clean end of stream between frames. The length is
/// checked before the body is read, so a hostile length allocates nothing.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<Option<Frame>, FramingError> {
    buf.clear();
    buf.resize(HEADER_BYTES, 0);
    let mut got = 0;
    while got < HEADER_BYTES {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(FramingError::Truncated) };
        }
        got += n;
    }
    let len = frame::decode_header(buf)?;
    buf.resize(HEADER_BYTES + len, 0);
    r.read_exact(&mut buf[HEADER_BYTES..]).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FramingError::Truncated,
        _ => FramingError::Io(e),
    })?;
    let (f, _) = frame::decode(buf)?;
    Ok(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use geomirror_core::{Epoch, Seq};

    fn applied() -> Frame {
        Frame::Applied { epoch: Epoch(3), through: Seq(42) }
    }

    #[tokio::test]
    async fn frames_and_preambles_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let p = Preamble { stream: Stream::Data(3), session: SessionId(99), volume: "vol0".into() };
        let resync = Preamble { stream: Stream::Resync, session: SessionId(7), volume: "vol1".into() };
        let mut r = resync.encode();
        assert_eq!(Preamble::read(&mut r.as_slice()).await.unwrap(), resync);
        r.clear();
        a.write_all(&p.encode()).await.unwrap();
        write_frame(&mut a, &applied()).await.unwrap();
        write_frame(&mut a, &applied()).await.unwrap();
        drop(a);
        assert_eq!(Preamble::read(&mut b).await.unwrap(), p);
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut b, &mut buf).await.unwrap(), Some(applied()));
        assert_eq!(read_frame(&mut b, &mut buf).await.unwrap(), Some(applied()));
        assert_eq!(read_frame(&mut b, &mut buf).await.unwrap(), None);
    }

    #[tokio::test]
    async fn truncated_oversized_and_garbage_frames_are_refused() {
        let whole = frame::encode(&applied()).unwrap();
        let mut buf = Vec::new();
        // Truncated in the header and in the body.
        for cut in [3, whole.len() - 1] {
            let mut r = &whole[..cut];
            assert!(matches!(read_frame(&mut r, &mut buf).await, Err(FramingError::Truncated)), "cut at {cut}");
        }
        // A length over the cap: refused from the header alone, nothing allocated.
        let mut big = whole.clone();
        big[3..7].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut r = &big[..];
        assert!(matches!(read_frame(&mut r, &mut buf).await, Err(FramingError::Frame(FrameError::TooLarge(_)))));
        assert!(buf.capacity() < 1 << 20);
        // Garbage.
        let mut r = &b"GET / HTTP/1.1\r\n\r\n"[..];
        assert!(matches!(read_frame(&mut r, &mut buf).await, Err(FramingError::Frame(_))));
        // A valid header over a body that is not a frame.
        let mut junk = whole[..HEADER_BYTES].to_vec();
        junk.extend(std::iter::repeat_n(0xFFu8, whole.len() - HEADER_BYTES));
        let mut r = &junk[..];
        assert!(matches!(read_frame(&mut r, &mut buf).await, Err(FramingError::Frame(_))));
        // A bad preamble.
        let mut r = &b"XX\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"[..];
        assert!(matches!(Preamble::read(&mut r).await, Err(FramingError::Preamble(_))));
    }
}
