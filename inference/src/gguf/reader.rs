//! A bounds-checked little-endian cursor over the bytes of an untrusted GGUF file.
//!
//! Every read says what it was reading (`what`, built only when an error happens), so a
//! failure names the key or tensor and the limit it broke.

use super::GgufError;

/// Cursor over `buf`; `pos` never exceeds `buf.len()`.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Current offset from the start of the file.
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes left after the cursor.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes, or a [`GgufError::Truncated`] naming `what`.
    pub(crate) fn take<F: Fn() -> String>(
        &mut self,
        n: u64,
        what: F,
    ) -> Result<&'a [u8], GgufError> {
        let available = self.remaining();
        match usize::try_from(n) {
            Ok(n) if n <= available => {
                let out = &self.buf[self.pos..self.pos + n];
                self.pos += n;
                Ok(out)
            }
            _ => Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n,
                available: available as u64,
            }),
        }
    }

    fn array<const N: usize, F: Fn() -> String>(&mut self, what: F) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(crate) fn u8<F: Fn() -> String>(&mut self, what: F) -> Result<u8, GgufError> {
        Ok(self.array::<1, F>(what)?[0])
    }

    pub(crate) fn u16<F: Fn() -> String>(&mut self, what: F) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u32<F: Fn() -> String>(&mut self, what: F) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64<F: Fn() -> String>(&mut self, what: F) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A GGUF string: u64 byte length, then that many bytes of UTF-8. The length is checked
    /// against the bytes really left (and `max_len`) before anything is allocated.
    pub(crate) fn string<F: Fn() -> String>(
        &mut self,
        max_len: u64,
        what: F,
    ) -> Result<String, GgufError> {
        let start = self.pos;
        let len = self.u64(|| format!("length of {}", what()))?;
        if len > max_len {
            return Err(GgufError::StringTooLong {
                what: what(),
                offset: start as u64,
                len,
                limit: max_len,
            });
        }
        let bytes = self.take(len, &what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(GgufError::InvalidUtf8 {
                what: what(),
                offset: start as u64 + 8 + e.valid_up_to() as u64,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_little_endian_and_stops_at_the_end() {
        let bytes = [1u8, 2, 0, 3, 0, 0, 0, 9];
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8(|| "a".into()).unwrap(), 1);
        assert_eq!(r.u16(|| "b".into()).unwrap(), 2);
        assert_eq!(r.u32(|| "c".into()).unwrap(), 3);
        assert_eq!(r.remaining(), 1);
        let err = r.u64(|| "the thing".into()).unwrap_err();
        assert!(matches!(
            err,
            GgufError::Truncated {
                needed: 8,
                available: 1,
                offset: 7,
                ..
            }
        ));
        assert!(err.to_string().contains("the thing"), "{err}");
        // A failed read does not move the cursor.
        assert_eq!(r.pos(), 7);
    }

    #[test]
    fn string_length_is_checked_before_allocating() {
        let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let err = Reader::new(&bytes)
            .string(u64::MAX, || "key 'k'".into())
            .unwrap_err();
        assert!(
            matches!(err, GgufError::Truncated { needed, available: 3, .. } if needed == 1 << 40)
        );
        let err = Reader::new(&bytes)
            .string(100, || "key 'k'".into())
            .unwrap_err();
        assert!(
            matches!(err, GgufError::StringTooLong { limit: 100, .. }),
            "{err}"
        );
    }

    #[test]
    fn string_must_be_utf8() {
        let mut bytes = 2u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0xC3, 0x28]);
        let err = Reader::new(&bytes)
            .string(100, || "key 'k'".into())
            .unwrap_err();
        assert!(
            matches!(err, GgufError::InvalidUtf8 { offset: 8, .. }),
            "{err}"
        );
    }
}
