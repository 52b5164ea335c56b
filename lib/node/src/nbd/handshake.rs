//! The NBD fixed-newstyle handshake as a state machine over bytes.
//!
//! Owns: option haggling (EXPORT_NAME, INFO, GO, LIST, ABORT, STRUCTURED_REPLY; anything
//! else is answered NBD_REP_ERR_UNSUP), the limits on what a client may send during it, and
//! the transmission flags advertised per export.
//!
//! Must not: read sockets or clocks. The server feeds it the bytes that arrived and writes
//! out what it produced; the stall timeout and the connection cap live in the server. Being
//! pure, it is what the fuzz target drives.

use super::proto::*;
use bytes::{Buf, BufMut, BytesMut};

/// Longest option payload read into memory. NBD_OPT_GO needs 4 + 4096 + 2 + 2n bytes; a
/// longer option is skipped without being stored and refused with NBD_REP_ERR_TOO_BIG.
pub const MAX_OPTION_BYTES: u32 = 16 << 10;
/// The protocol's limit on strings, export names included.
pub const MAX_NAME_BYTES: usize = 4096;
/// Options one connection may send before it is closed: haggling is bounded by count as
/// well as by the server's timeout.
pub const MAX_OPTIONS: u32 = 1024;

/// What the server tells clients about one export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
}

/// The client's choices once transmission starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Index into the export list.
    pub export: usize,
    pub structured: bool,
}

/// What the caller must do after feeding bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send the output (if any) and feed more bytes.
    More,
    /// Send the output, then enter the transmission phase.
    Transmit(Negotiated),
    /// Send the output, then close: the client aborted or broke the protocol.
    Close(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { option: u32, len: u32 },
    Skip { option: u32, left: u32 },
    Finished,
}

pub struct Handshake {
    exports: Vec<ExportInfo>,
    state: State,
    no_zeroes: bool,
    structured: bool,
    options_seen: u32,
    out: BytesMut,
}

impl Handshake {
    /// Starts a handshake; the server's greeting is already in the output.
    pub fn new(exports: Vec<ExportInfo>) -> Handshake {
        let mut out = BytesMut::with_capacity(256);
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        Handshake { exports, state: State::ClientFlags, no_zeroes: false, structured: false, options_seen: 0, out }
    }

    /// Bytes to send to the client now.
    pub fn take_output(&mut self) -> BytesMut {
        self.out.split()
    }

    /// The transmission flags of an export for this connection.
    pub fn transmission_flags(structured: bool) -> u16 {
        // CAN_MULTI_CONN holds: every connection to a volume goes through the volume's one
        // write path, and a FLUSH syncs the whole media file after every write dispatched
        // before it, whichever connection sent that write.
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_CAN_MULTI_CONN;
        if structured {
            // Every read is answered in one chunk, so "do not fragment" always holds.
            f |= FLAG_SEND_DF;
        }
        f
    }

    /// Consumes what it can from `input` (leaving an incomplete message in place) and says
    /// what to do next. After `Transmit` or `Close`, input is no longer consumed.
    pub fn feed(&mut self, input: &mut BytesMut) -> Step {
        loop {
            match self.state {
                State::Finished => return Step::Close("handshake already finished"),
                State::ClientFlags => {
                    if input.len() < 4 {
                        return Step::More;
                    }
                    let flags = input.get_u32();
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        return self.close("client sent unknown handshake flags");
                    }
                    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
                        return self.close("client does not speak fixed newstyle");
                    }
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    if input.len() < 16 {
                        return Step::More;
                    }
                    if input.get_u64() != IHAVEOPT {
                        return self.close("option without the IHAVEOPT magic");
                    }
                    self.options_seen += 1;
                    if self.options_seen > MAX_OPTIONS {
                        return self.close("too many options");
                    }
                    let option = input.get_u32();
                    let len = input.get_u32();
                    self.state = if len > MAX_OPTION_BYTES {
                        if option == OPT_EXPORT_NAME {
                            // EXPORT_NAME cannot be answered with an error.
                            return self.close("export name longer than the protocol allows");
                        }
                        State::Skip { option, left: len }
                    } else {
                        State::OptionData { option, len }
                    };
                }
                State::Skip { option, left } => {
                    let n = (left as usize).min(input.len());
                    input.advance(n);
                    let left = left - n as u32;
                    if left > 0 {
                        self.state = State::Skip { option, left };
                        return Step::More;
                    }
                    self.reply_error(option, REP_ERR_TOO_BIG, "option data is larger than this server accepts");
                    self.state = State::OptionHeader;
                }
                State::OptionData { option, len } => {
                    if input.len() < len as usize {
                        return Step::More;
                    }
                    let data = input.split_to(len as usize);
                    self.state = State::OptionHeader;
                    if let Some(step) = self.option(option, &data) {
                        return step;
                    }
                }
            }
        }
    }

    fn close(&mut self, why: &'static str) -> Step {
        self.state = State::Finished;
        Step::Close(why)
    }

    /// Handles one complete option; `Some` ends haggling.
    fn option(&mut self, option: u32, data: &[u8]) -> Option<Step> {
        match option {
            OPT_EXPORT_NAME => {
                let Some(export) = std::str::from_utf8(data).ok().and_then(|n| self.find(n)) else {
                    // No error reply exists for EXPORT_NAME: the spec says close.
                    return Some(self.close("EXPORT_NAME named an unknown export"));
                };
                self.out.put_u64(self.exports[export].size_bytes);
                self.out.put_u16(Self::transmission_flags(false));
                if !self.no_zeroes {
                    self.out.put_bytes(0, 124);
                }
                // Structured replies may be negotiated before EXPORT_NAME, but then a client
                // would expect them; only GO and INFO report them reliably, so keep the flag.
                self.state = State::Finished;
                Some(Step::Transmit(Negotiated { export, structured: self.structured }))
            }
            OPT_ABORT => {
                self.reply(option, REP_ACK, &[]);
                Some(self.close("client aborted the handshake"))
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.reply_error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return None;
                }
                for i in 0..self.exports.len() {
                    let mut d = BytesMut::new();
                    let e = &self.exports[i];
                    d.put_u32(e.name.len() as u32);
                    d.put_slice(e.name.as_bytes());
                    d.put_slice(e.description.as_bytes());
                    self.reply(option, REP_SERVER, &d);
                }
                self.reply(option, REP_ACK, &[]);
                None
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.reply_error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                } else {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]);
                }
                None
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data),
            OPT_STARTTLS => {
                self.reply_error(option, REP_ERR_POLICY, "TLS is not offered on the NBD port; reach it over a trusted network");
                None
            }
            _ => {
                self.reply_error(option, REP_ERR_UNSUP, "option not supported by geomirror");
                None
            }
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Option<Step> {
        let mut d = data;
        if d.len() < 4 {
            self.reply_error(option, REP_ERR_INVALID, "option data too short for an export name");
            return None;
        }
        let name_len = d.get_u32() as usize;
        if name_len > MAX_NAME_BYTES {
            self.reply_error(option, REP_ERR_INVALID, "export name longer than 4096 bytes");
            return None;
        }
        if d.len() < name_len + 2 {
            self.reply_error(option, REP_ERR_INVALID, "option data shorter than its export name and request count");
            return None;
        }
        let name = d[..name_len].to_vec();
        d.advance(name_len);
        let requests = d.get_u16() as usize;
        if d.len() != requests * 2 {
            self.reply_error(option, REP_ERR_INVALID, "information request count does not match the option length");
            return None;
        }
        let asked: Vec<u16> = (0..requests).map(|_| d.get_u16()).collect();
        let Some(export) = std::str::from_utf8(&name).ok().and_then(|n| self.find(n)) else {
            self.reply_error(option, REP_ERR_UNKNOWN, "no export by that name (NBD_OPT_LIST shows them)");
            return None;
        };
        let e = self.exports[export].clone();
        let mut info = BytesMut::new();
        info.put_u16(INFO_EXPORT);
        info.put_u64(e.size_bytes);
        info.put_u16(Self::transmission_flags(self.structured));
        self.reply(option, REP_INFO, &info);
        // Block size constraints are sent whether asked or not: the limits hold either way,
        // and a client that did not ask still learns them.
        let mut info = BytesMut::new();
        info.put_u16(INFO_BLOCK_SIZE);
        info.put_u32(MIN_BLOCK_BYTES);
        info.put_u32(PREFERRED_BLOCK_BYTES);
        info.put_u32(MAX_BLOCK_BYTES);
        self.reply(option, REP_INFO, &info);
        if asked.contains(&INFO_NAME) {
            let mut info = BytesMut::new();
            info.put_u16(INFO_NAME);
            info.put_slice(e.name.as_bytes());
            self.reply(option, REP_INFO, &info);
        }
        if asked.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
            let mut info = BytesMut::new();
            info.put_u16(INFO_DESCRIPTION);
            info.put_slice(&e.description.as_bytes()[..e.description.len().min(MAX_NAME_BYTES)]);
            self.reply(option, REP_INFO, &info);
        }
        self.reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            self.state = State::Finished;
            return Some(Step::Transmit(Negotiated { export, structured: self.structured }));
        }
        None
    }

    /// The empty name selects the export when there is exactly one.
    fn find(&self, name: &str) -> Option<usize> {
        if name.is_empty() && self.exports.len() == 1 {
            return Some(0);
        }
        self.exports.iter().position(|e| e.name == name)
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.out.put_u64(OPTION_REPLY_MAGIC);
        self.out.put_u32(option);
        self.out.put_u32(kind);
        self.out.put_u32(data.len() as u32);
        self.out.put_slice(data);
    }

    fn reply_error(&mut self, option: u32, kind: u32, message: &str) {
        self.reply(option, kind, message.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports() -> Vec<ExportInfo> {
        vec![
            ExportInfo { name: "a".into(), description: "first".into(), size_bytes: 1 << 20 },
            ExportInfo { name: "b".into(), description: String::new(), size_bytes: 2 << 20 },
        ]
    }

    fn option(buf: &mut BytesMut, option: u32, data: &[u8]) {
        buf.put_u64(IHAVEOPT);
        buf.put_u32(option);
        buf.put_u32(data.len() as u32);
        buf.put_slice(data);
    }

    fn go_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = BytesMut::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name);
        d.put_u16(infos.len() as u16);
        for i in infos {
            d.put_u16(*i);
        }
        d.to_vec()
    }

    /// Reads option replies: (option, type, data).
    fn replies(mut out: BytesMut) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while out.len() >= 20 {
            assert_eq!(out.get_u64(), OPTION_REPLY_MAGIC);
            let (o, t, l) = (out.get_u32(), out.get_u32(), out.get_u32() as usize);
            v.push((o, t, out.split_to(l).to_vec()));
        }
        assert!(out.is_empty());
        v
    }

    fn started() -> (Handshake, BytesMut) {
        let mut h = Handshake::new(exports());
        assert_eq!(h.take_output().len(), 18);
        let mut input = BytesMut::new();
        input.put_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        (h, input)
    }

    #[test]
    fn list_then_go_with_structured_replies() {
        let (mut h, mut input) = started();
        option(&mut input, OPT_LIST, &[]);
        option(&mut input, OPT_STRUCTURED_REPLY, &[]);
        option(&mut input, OPT_GO, &go_data(b"b", &[INFO_NAME]));
        assert_eq!(h.feed(&mut input), Step::Transmit(Negotiated { export: 1, structured: true }));
        let r = replies(h.take_output());
        let kinds: Vec<(u32, u32)> = r.iter().map(|(o, t, _)| (*o, *t)).collect();
        assert_eq!(
            kinds,
            vec![
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_ACK),
                (OPT_STRUCTURED_REPLY, REP_ACK),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK),
            ]
        );
        assert_eq!(&r[0].2[4..], b"afirst");
        let export = &r[4].2;
        assert_eq!(u64::from_be_bytes(export[2..10].try_into().unwrap()), 2 << 20);
        let block = &r[5].2;
        assert_eq!(u32::from_be_bytes(block[10..14].try_into().unwrap()), MAX_BLOCK_BYTES);
    }

    #[test]
    fn bytes_may_arrive_one_at_a_time() {
        let (mut h, mut all) = started();
        option(&mut all, OPT_GO, &go_data(b"a", &[]));
        let mut input = BytesMut::new();
        let mut step = Step::More;
        for b in all.iter() {
            input.put_u8(*b);
            step = h.feed(&mut input);
            if step != Step::More {
                break;
            }
        }
        assert_eq!(step, Step::Transmit(Negotiated { export: 0, structured: false }));
    }

    #[test]
    fn unknown_exports_and_long_names_get_errors_and_haggling_goes_on() {
        let (mut h, mut input) = started();
        option(&mut input, OPT_GO, &go_data(b"nope", &[]));
        option(&mut input, OPT_INFO, &go_data(&[b'x'; 5000], &[]));
        let mut big = BytesMut::new();
        big.put_u32(100_000);
        big.put_bytes(b'y', 100_000);
        option(&mut input, OPT_GO, &big);
        option(&mut input, 77, &[]);
        option(&mut input, OPT_GO, &go_data(b"a", &[1, 2, 3]));
        assert_eq!(h.feed(&mut input), Step::Transmit(Negotiated { export: 0, structured: false }));
        let r = replies(h.take_output());
        assert_eq!(r[0].1, REP_ERR_UNKNOWN);
        assert_eq!(r[1].1, REP_ERR_INVALID);
        assert_eq!(r[2].1, REP_ERR_TOO_BIG);
        assert_eq!(r[3].1, REP_ERR_UNSUP);
        assert_eq!(r.last().unwrap().1, REP_ACK);
    }

    #[test]
    fn protocol_violations_close() {
        let mut h = Handshake::new(exports());
        let mut input = BytesMut::new();
        input.put_u32(1 << 7);
        assert!(matches!(h.feed(&mut input), Step::Close(_)));

        let (mut h, mut input) = started();
        input.put_u64(0x1234);
        input.put_u64(0);
        assert!(matches!(h.feed(&mut input), Step::Close(_)));

        let (mut h, mut input) = started();
        option(&mut input, OPT_EXPORT_NAME, b"missing");
        assert!(matches!(h.feed(&mut input), Step::Close(_)));

        let (mut h, mut input) = started();
        input.put_u64(IHAVEOPT);
        input.put_u32(OPT_EXPORT_NAME);
        input.put_u32(MAX_OPTION_BYTES + 1);
        assert!(matches!(h.feed(&mut input), Step::Close(_)), "a long EXPORT_NAME is never read");
    }

    #[test]
    fn export_name_enters_transmission_with_zero_padding_unless_declined() {
        let mut h = Handshake::new(exports());
        h.take_output();
        let mut input = BytesMut::new();
        input.put_u32(FLAG_C_FIXED_NEWSTYLE);
        option(&mut input, OPT_EXPORT_NAME, b"a");
        assert_eq!(h.feed(&mut input), Step::Transmit(Negotiated { export: 0, structured: false }));
        assert_eq!(h.take_output().len(), 8 + 2 + 124);
    }
}
