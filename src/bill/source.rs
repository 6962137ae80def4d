//! Where a bill's text comes from: a plain or gzip-compressed stream, decoded as it is read,
//! and the SHA-1 WeChat v3 gives for it (`hash_type SHA1`: over the decompressed text, BOM
//! included).
//!
//! Both take any reader, so a file is checked and parsed in two passes without being held in
//! memory:
//!
//! ```text
//! let mut file = File::open(path)?;
//! let sha1 = sha1_hex_of(open_text(&mut file)?)?;   // pass 1: the hash
//! if !sha1.eq_ignore_ascii_case(&hash_value) { refuse }
//! file.rewind()?;
//! let mut bill = BillReader::new(open_text(file)?)?; // pass 2: the rows
//! ```

use std::io::{self, BufRead, BufReader, Cursor, Read};

use flate2::read::MultiGzDecoder;
use sha1::{Digest, Sha1};

/// The read buffer of both passes.
const BUFFER_BYTES: usize = 64 * 1024;

/// gzip's magic number (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The text of `r`: decompressed as it is read when it starts with gzip's magic number
/// (`1f 8b`; v2's `tar_type=GZIP` and v3's download), else as it is. Reads two bytes to tell;
/// a corrupt gzip stream shows as an IO error of the returned reader.
pub fn open_text<'a, R: Read + 'a>(mut r: R) -> io::Result<Box<dyn BufRead + 'a>> {
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < magic.len() {
        match r.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let gzip = got == magic.len() && magic == GZIP_MAGIC;
    // The bytes read to tell are given back in front of the rest.
    let whole = Cursor::new(magic).take(got as u64).chain(r);
    if gzip {
        Ok(Box::new(BufReader::with_capacity(
            BUFFER_BYTES,
            MultiGzDecoder::new(whole),
        )))
    } else {
        Ok(Box::new(BufReader::with_capacity(BUFFER_BYTES, whole)))
    }
}

/// The SHA-1 of everything `r` gives, in lower-case hex (compare WeChat's `hash_value` with
/// `eq_ignore_ascii_case`). Give it [`open_text`]'s reader for the decompressed text.
pub fn sha1_hex_of<R: Read>(mut r: R) -> io::Result<String> {
    let mut hasher = Sha1::new();
    let mut buf = vec![0u8; BUFFER_BYTES];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    fn all(mut r: impl Read) -> Vec<u8> {
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        v
    }

    /// A reader that gives one byte a call (the sniff must not lose or repeat any).
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((b, rest)), Some(slot)) => {
                    *slot = *b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn plain_text_is_given_back_whole_gzip_is_decoded() {
        let text = "\u{feff}交易时间,公众账号ID\r\n`2021-01-28 17:07:11,`wx1\r\n".as_bytes();
        assert_eq!(all(open_text(text).unwrap()), text);
        assert_eq!(all(open_text(&gzip(text)[..]).unwrap()), text);
        assert_eq!(all(open_text(Trickle(text)).unwrap()), text);
        assert_eq!(all(open_text(Trickle(&gzip(text))).unwrap()), text);
        // Shorter than the magic number, and empty.
        assert_eq!(all(open_text(&b"x"[..]).unwrap()), b"x");
        assert_eq!(all(open_text(&b"\x1f"[..]).unwrap()), b"\x1f");
        assert!(all(open_text(&b""[..]).unwrap()).is_empty());
        // Two gzip members are one text.
        let mut two = gzip(b"ab");
        two.extend(gzip(b"cd"));
        assert_eq!(all(open_text(&two[..]).unwrap()), b"abcd");
    }

    #[test]
    fn a_corrupt_gzip_stream_is_an_io_error_of_the_reader() {
        let mut bad = gzip("交易时间,公众账号ID\n".repeat(100).as_bytes());
        let cut = bad.len() / 2;
        bad.truncate(cut);
        let mut r = open_text(&bad[..]).unwrap();
        let mut v = Vec::new();
        assert!(r.read_to_end(&mut v).is_err());
        let garbage = [0x1f, 0x8b, 0, 0, 0, 0];
        let mut v = Vec::new();
        assert!(
            open_text(&garbage[..])
                .unwrap()
                .read_to_end(&mut v)
                .is_err()
        );
    }

    #[test]
    fn sha1_is_lower_case_hex_of_the_decompressed_text() {
        // FIPS 180 "abc".
        let abc = "a9993e364706816aba3e25717850c26c9cd0d89d";
        assert_eq!(sha1_hex_of(&b"abc"[..]).unwrap(), abc);
        assert_eq!(
            sha1_hex_of(open_text(&gzip(b"abc")[..]).unwrap()).unwrap(),
            abc
        );
        assert_eq!(
            sha1_hex_of(&b""[..]).unwrap(),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
        // Longer than one buffer.
        let big = vec![b'a'; BUFFER_BYTES * 2 + 7];
        assert_eq!(
            sha1_hex_of(&big[..]).unwrap(),
            sha1_hex_of(Trickle(&big)).unwrap()
        );
    }
}
