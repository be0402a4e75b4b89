//! A small, explicit little-endian binary encoding for log records. Every read is bounds-checked
//! against the remaining input, so a damaged or hostile record can never drive an allocation
//! larger than the record itself.

/// The input ended early or held an invalid value.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("record ends early while reading {0}")]
    Truncated(&'static str),
    #[error("record has invalid {0}")]
    Invalid(&'static str),
    #[error("record has {0} unexpected trailing bytes")]
    Trailing(usize),
}

/// Appends values to a byte buffer.
#[derive(Default)]
pub(crate) struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }

    /// A length-prefixed UTF-8 string. Strings longer than `u32::MAX` bytes are rejected by the
    /// callers long before they get here (document size limits).
    pub(crate) fn str(&mut self, v: &str) {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.buf
            .extend_from_slice(&v.as_bytes()[..v.len().min(u32::MAX as usize)]);
    }

    pub(crate) fn opt_str(&mut self, v: Option<&str>) {
        match v {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }

    pub(crate) fn f32s(&mut self, v: &[f32]) {
        self.buf.reserve(v.len() * 4);
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads values from a byte slice.
pub(crate) struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let b = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    /// Skips `n` bytes.
    pub(crate) fn array_skip(&mut self, n: usize) -> Result<(), DecodeError> {
        self.take(n, "skipped bytes").map(|_| ())
    }

    pub(crate) fn str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let n = self.u32(what)? as usize;
        let b = self.take(n, what)?;
        std::str::from_utf8(b).map_err(|_| DecodeError::Invalid(what))
    }

    pub(crate) fn opt_str(&mut self, what: &'static str) -> Result<Option<&'a str>, DecodeError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => Ok(Some(self.str(what)?)),
            _ => Err(DecodeError::Invalid(what)),
        }
    }

    /// `n` little-endian f32 values.
    pub(crate) fn f32s(&mut self, n: usize, what: &'static str) -> Result<Vec<f32>, DecodeError> {
        let bytes = self.take(n.checked_mul(4).ok_or(DecodeError::Invalid(what))?, what)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Fails unless the whole input was consumed.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let mut e = Encoder::default();
        e.u8(7);
        e.u32(0xdead_beef);
        e.u64(u64::MAX - 1);
        e.str("héllo");
        e.opt_str(None);
        e.opt_str(Some("x"));
        e.f32s(&[1.5, -0.25]);
        e.bytes(&[1, 2, 3, 4]);
        let buf = e.finish();
        let mut d = Decoder::new(&buf);
        assert_eq!(d.u8("a").unwrap(), 7);
        assert_eq!(d.u32("b").unwrap(), 0xdead_beef);
        assert_eq!(d.u64("c").unwrap(), u64::MAX - 1);
        assert_eq!(d.str("d").unwrap(), "héllo");
        assert_eq!(d.opt_str("e").unwrap(), None);
        assert_eq!(d.opt_str("f").unwrap(), Some("x"));
        assert_eq!(d.f32s(2, "g").unwrap(), vec![1.5, -0.25]);
        assert_eq!(d.array::<4>("h").unwrap(), [1, 2, 3, 4]);
        d.finish().unwrap();
    }

    #[test]
    fn huge_declared_lengths_fail_without_allocating() {
        let mut e = Encoder::default();
        e.u32(u32::MAX);
        let buf = e.finish();
        assert!(matches!(
            Decoder::new(&buf).str("text"),
            Err(DecodeError::Truncated("text"))
        ));
        assert!(Decoder::new(&[0u8; 3]).f32s(usize::MAX, "v").is_err());
    }

    #[test]
    fn invalid_utf8_and_trailing_bytes_are_rejected() {
        let mut e = Encoder::default();
        e.u32(2);
        e.bytes(&[0xff, 0xfe]);
        let buf = e.finish();
        assert!(matches!(
            Decoder::new(&buf).str("s"),
            Err(DecodeError::Invalid("s"))
        ));
        assert!(matches!(
            Decoder::new(&[1]).finish(),
            Err(DecodeError::Trailing(1))
        ));
    }
}
