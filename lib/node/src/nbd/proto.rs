//! The NBD transmission phase on the wire: constants, request headers and replies.
//!
//! Owns: the numbers of the NBD protocol (doc/proto.md of NetworkBlockDevice/nbd), the
//! decoding and checking of a request header, and the encoding of simple and structured
//! replies. Every check a request must pass before anything is allocated or written lives in
//! `check_request`, so the fuzz target and the server share one gate.
//!
//! Must not: touch sockets, media or the core. It is pure, so it can be fuzzed.

use bytes::{BufMut, BytesMut};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const REQUEST_HEADER_BYTES: usize = 28;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types of NBD_OPT_INFO and NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;

// Structured reply types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// The smallest request the server accepts, in bytes: any alignment works.
pub const MIN_BLOCK_BYTES: u32 = 1;
/// What clients should align to for best performance.
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// The largest READ or WRITE payload. A larger WRITE cannot be skipped economically and
/// closes the connection; a larger READ gets EOVERFLOW.
pub const MAX_BLOCK_BYTES: u32 = 32 << 20;

/// NBD error numbers (errno values fixed by the protocol, not the host's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdError {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdError {
    /// A short, bounded label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            NbdError::Perm => "EPERM",
            NbdError::Io => "EIO",
            NbdError::NoMem => "ENOMEM",
            NbdError::Inval => "EINVAL",
            NbdError::NoSpc => "ENOSPC",
            NbdError::Overflow => "EOVERFLOW",
            NbdError::NotSup => "ENOTSUP",
            NbdError::Shutdown => "ESHUTDOWN",
        }
    }
}

/// A request header as it arrived, before any check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// The header did not start with the request magic: the stream cannot be resynchronised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMagic(pub u32);

pub fn parse_request_header(b: &[u8; REQUEST_HEADER_BYTES]) -> Result<RequestHeader, BadMagic> {
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
    if magic != REQUEST_MAGIC {
        return Err(BadMagic(magic));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes(b[4..6].try_into().expect("2 bytes")),
        kind: u16::from_be_bytes(b[6..8].try_into().expect("2 bytes")),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
        len: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
    })
}

/// What one connection's export allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub export_bytes: u64,
    pub structured: bool,
}

/// A request that passed every check: its range lies inside the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    /// `len` payload bytes follow the header.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
}

/// Why a request is refused, and what the connection must do about its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub error: NbdError,
    pub reason: &'static str,
    /// A refused WRITE still sends its payload; this many bytes are read and discarded.
    pub skip_payload: u32,
    /// The payload is too large to skip: reply, then close the connection.
    pub close: bool,
}

impl Refusal {
    fn new(h: &RequestHeader, error: NbdError, reason: &'static str) -> Refusal {
        let has_payload = h.kind == CMD_WRITE;
        let oversized = has_payload && h.len > MAX_BLOCK_BYTES;
        Refusal { error, reason, skip_payload: if has_payload && !oversized { h.len } else { 0 }, close: oversized }
    }
}

/// The single gate every request passes before anything is allocated, read or written.
pub fn check_request(h: &RequestHeader, limits: &Limits) -> Result<Command, Refusal> {
    let refuse = |error, reason| Err(Refusal::new(h, error, reason));
    let allowed_flags = match h.kind {
        CMD_READ if limits.structured => CMD_FLAG_DF,
        CMD_READ | CMD_DISC | CMD_FLUSH => 0,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => return refuse(NbdError::Inval, "unknown or unadvertised command"),
    };
    if h.flags & !allowed_flags != 0 {
        return refuse(NbdError::Inval, "unknown or unadvertised flag for this command");
    }
    match h.kind {
        CMD_DISC => return Ok(Command::Disconnect),
        // The offset and length of a flush carry no meaning; the spec asks clients for zeros
        // and a server gains nothing by refusing otherwise.
        CMD_FLUSH => return Ok(Command::Flush),
        _ => {}
    }
    if (h.kind == CMD_READ || h.kind == CMD_WRITE) && h.len > MAX_BLOCK_BYTES {
        return refuse(NbdError::Overflow, "request larger than the advertised maximum block size");
    }
    if h.len == 0 {
        return refuse(NbdError::Inval, "zero-length request");
    }
    let Some(end) = h.offset.checked_add(h.len as u64) else {
        return refuse(NbdError::Inval, "offset plus length overflows");
    };
    if end > limits.export_bytes {
        // The spec asks for ENOSPC on writes past the end and EINVAL otherwise.
        let error = if h.kind == CMD_READ { NbdError::Inval } else { NbdError::NoSpc };
        return refuse(error, "request runs past the end of the export");
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (h.offset, h.len);
    Ok(match h.kind {
        CMD_READ => Command::Read { offset, len },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_TRIM => Command::Trim { offset, len, fua },
        _ => Command::WriteZeroes { offset, len, fua },
    })
}

/// Encodes the header of a successful reply. For a READ with structured replies, `data_len`
/// bytes of data must follow; with simple replies the data follows the header as well.
pub fn put_reply_ok(out: &mut BytesMut, structured: bool, cookie: u64, read: Option<(u64, u32)>) {
    match (structured, read) {
        (false, _) => {
            out.put_u32(SIMPLE_REPLY_MAGIC);
            out.put_u32(0);
            out.put_u64(cookie);
        }
        (true, Some((offset, len))) => {
            out.put_u32(STRUCTURED_REPLY_MAGIC);
            out.put_u16(REPLY_FLAG_DONE);
            out.put_u16(REPLY_TYPE_OFFSET_DATA);
            out.put_u64(cookie);
            out.put_u32(8 + len);
            out.put_u64(offset);
        }
        (true, None) => {
            out.put_u32(STRUCTURED_REPLY_MAGIC);
            out.put_u16(REPLY_FLAG_DONE);
            out.put_u16(REPLY_TYPE_NONE);
            out.put_u64(cookie);
            out.put_u32(0);
        }
    }
}

/// Encodes an error reply. With structured replies it carries a message for the user.
pub fn put_reply_error(out: &mut BytesMut, structured: bool, cookie: u64, error: NbdError, message: &str) {
    if structured {
        let msg = &message.as_bytes()[..message.len().min(4096)];
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(REPLY_FLAG_DONE);
        out.put_u16(REPLY_TYPE_ERROR);
        out.put_u64(cookie);
        out.put_u32(6 + msg.len() as u32);
        out.put_u32(error as u32);
        out.put_u16(msg.len() as u16);
        out.put_slice(msg);
    } else {
        out.put_u32(SIMPLE_REPLY_MAGIC);
        out.put_u32(error as u32);
        out.put_u64(cookie);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader { flags, kind, cookie: 7, offset, len }
    }

    const LIMITS: Limits = Limits { export_bytes: 1 << 30, structured: false };

    #[test]
    fn good_requests_pass() {
        assert_eq!(check_request(&header(CMD_READ, 0, 0, 4096), &LIMITS), Ok(Command::Read { offset: 0, len: 4096 }));
        assert_eq!(
            check_request(&header(CMD_WRITE, CMD_FLAG_FUA, (1 << 30) - 512, 512), &LIMITS),
            Ok(Command::Write { offset: (1 << 30) - 512, len: 512, fua: true })
        );
        assert_eq!(check_request(&header(CMD_FLUSH, 0, 0, 0), &LIMITS), Ok(Command::Flush));
        assert_eq!(
            check_request(&header(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, u32::MAX), &Limits { export_bytes: 1 << 33, ..LIMITS }),
            Ok(Command::WriteZeroes { offset: 0, len: u32::MAX, fua: false }),
            "zeroing carries no payload, so it may exceed the block size"
        );
    }

    #[test]
    fn each_bad_input_gets_its_error() {
        let err = |h: RequestHeader, l: &Limits| check_request(&h, l).unwrap_err();
        assert_eq!(err(header(CMD_READ, 0, u64::MAX - 10, 4096), &LIMITS).error, NbdError::Inval);
        assert_eq!(err(header(CMD_READ, 0, 1 << 30, 1), &LIMITS).error, NbdError::Inval);
        assert_eq!(err(header(CMD_WRITE, 0, 1 << 30, 1), &LIMITS).error, NbdError::NoSpc);
        assert_eq!(err(header(CMD_TRIM, 0, 0, 0), &LIMITS).error, NbdError::Inval);
        assert_eq!(err(header(CMD_READ, CMD_FLAG_DF, 0, 1), &LIMITS).error, NbdError::Inval, "DF needs structured replies");
        assert!(check_request(&header(CMD_READ, CMD_FLAG_DF, 0, 1), &Limits { structured: true, ..LIMITS }).is_ok());
        assert_eq!(err(header(CMD_WRITE, 1 << 9, 0, 1), &LIMITS).error, NbdError::Inval);
        assert_eq!(err(header(99, 0, 0, 1), &LIMITS).error, NbdError::Inval);
        assert_eq!(err(header(CMD_READ, 0, 0, MAX_BLOCK_BYTES + 1), &LIMITS).error, NbdError::Overflow);
    }

    #[test]
    fn a_refused_write_says_what_to_do_with_its_payload() {
        let r = check_request(&header(CMD_WRITE, 0, 1 << 30, 4096), &LIMITS).unwrap_err();
        assert_eq!((r.skip_payload, r.close), (4096, false));
        let r = check_request(&header(CMD_WRITE, 0, 0, MAX_BLOCK_BYTES + 1), &LIMITS).unwrap_err();
        assert_eq!((r.skip_payload, r.close), (0, true), "an oversized payload is never read");
        let r = check_request(&header(CMD_READ, 0, 1 << 30, 4096), &LIMITS).unwrap_err();
        assert_eq!((r.skip_payload, r.close), (0, false));
    }

    #[test]
    fn headers_round_trip_and_bad_magic_is_caught() {
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&42u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(parse_request_header(&b), Ok(header(CMD_WRITE, 0, 0, 512)).map(|h| RequestHeader { cookie: 42, ..h }));
        b[0] = 0;
        assert!(parse_request_header(&b).is_err());
    }
}
