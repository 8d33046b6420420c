//! A local reader putting messages together from ring chunks, with no I/O: every chunk header
//! is checked against the message in progress and the size cap before a byte is copied or a
//! buffer allocated. The shell (`reader.rs`) reads headers and bytes out of the ring.

use super::ring::{ChunkHeader, FLAG_FIRST, FLAG_LAST};

/// The message being assembled, if any.
#[derive(Debug)]
pub(crate) struct Assembly {
    cap: u64,
    partial: Option<(Vec<u8>, u64)>,
}

impl Assembly {
    /// `cap`: the largest message accepted.
    pub fn new(cap: usize) -> Assembly {
        Assembly {
            cap: cap as u64,
            partial: None,
        }
    }

    /// Bytes received of the message in progress and its length, if one is in progress.
    pub fn progress(&self) -> Option<(usize, u64)> {
        self.partial.as_ref().map(|(b, t)| (b.len(), *t))
    }

    /// Checks that chunk `h` continues the message (or starts one) and returns the buffer its
    /// `h.len` bytes go to, with room for them. An error means the ring is corrupt.
    pub fn accept(&mut self, h: &ChunkHeader) -> Result<&mut Vec<u8>, String> {
        let len = h.len as u64;
        let last = h.flags & FLAG_LAST != 0;
        match &self.partial {
            None => {
                if h.flags & FLAG_FIRST == 0 {
                    return Err("a message continues where none started".into());
                }
                if h.msg_len > self.cap {
                    return Err(format!(
                        "message of {} bytes over the cap {}",
                        h.msg_len, self.cap
                    ));
                }
                if len > h.msg_len || (last && len != h.msg_len) {
                    return Err(format!(
                        "chunk of {len} bytes in a {}-byte message",
                        h.msg_len
                    ));
                }
                self.partial = Some((Vec::with_capacity(h.msg_len as usize), h.msg_len));
            }
            Some((buf, total)) => {
                let have = buf.len() as u64 + len;
                if h.flags & FLAG_FIRST != 0
                    || h.msg_len != *total
                    || have > *total
                    || (last && have != *total)
                {
                    return Err("chunk does not continue the message in progress".into());
                }
            }
        }
        Ok(&mut self.partial.as_mut().expect("set above").0)
    }

    /// After chunk `h`'s bytes were appended: the message, when `h` was its last chunk.
    pub fn finish(&mut self, h: &ChunkHeader) -> Option<Vec<u8>> {
        if h.flags & FLAG_LAST != 0 {
            self.partial.take().map(|(b, _)| b)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(len: usize, msg_len: u64, flags: u64) -> ChunkHeader {
        ChunkHeader {
            len,
            msg_len,
            flags,
        }
    }

    /// Feeds chunks of `sizes` bytes (filled with their index) through an assembly.
    fn feed(a: &mut Assembly, chunks: &[ChunkHeader]) -> Result<Vec<Vec<u8>>, String> {
        let mut out = Vec::new();
        for (i, h) in chunks.iter().enumerate() {
            let buf = a.accept(h)?;
            assert!(buf.capacity() - buf.len() >= h.len);
            buf.extend(std::iter::repeat(i as u8).take(h.len));
            out.extend(a.finish(h));
        }
        Ok(out)
    }

    #[test]
    fn messages_of_one_and_several_chunks() {
        let mut a = Assembly::new(100);
        let got = feed(
            &mut a,
            &[
                hdr(3, 3, FLAG_FIRST | FLAG_LAST),
                hdr(0, 0, FLAG_FIRST | FLAG_LAST),
                hdr(4, 10, FLAG_FIRST),
                hdr(4, 10, 0),
                hdr(2, 10, FLAG_LAST),
            ],
        )
        .unwrap();
        assert_eq!(
            got,
            vec![vec![0; 3], vec![], vec![2, 2, 2, 2, 3, 3, 3, 3, 4, 4]]
        );
        assert_eq!(a.progress(), None);
        a.accept(&hdr(4, 10, FLAG_FIRST)).unwrap().extend([1; 4]);
        assert_eq!(a.progress(), Some((4, 10)));
    }

    #[test]
    fn corruption_is_refused_before_allocation() {
        let cases: &[&[ChunkHeader]] = &[
            &[hdr(3, 3, 0)],                                 // no start
            &[hdr(1, 1 << 62, FLAG_FIRST | FLAG_LAST)],      // over the cap
            &[hdr(3, 2, FLAG_FIRST | FLAG_LAST)],            // chunk larger than message
            &[hdr(2, 3, FLAG_FIRST | FLAG_LAST)],            // last, but short
            &[hdr(2, 4, FLAG_FIRST), hdr(2, 4, FLAG_FIRST)], // restart mid-message
            &[hdr(2, 4, FLAG_FIRST), hdr(2, 5, FLAG_LAST)],  // length changes
            &[hdr(2, 4, FLAG_FIRST), hdr(3, 4, FLAG_LAST)],  // overruns
            &[hdr(2, 6, FLAG_FIRST), hdr(2, 6, FLAG_LAST)],  // ends early
        ];
        for c in cases {
            let mut a = Assembly::new(100);
            assert!(feed(&mut a, c).is_err(), "{c:?}");
        }
    }
}
