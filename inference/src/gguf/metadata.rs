//! GGUF metadata values and their parser.

use super::GgufError;
use super::reader::Reader;

/// Deepest nesting of arrays accepted (an array of arrays of scalars is depth 2).
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Most elements accepted in one metadata array (real vocabularies have a few hundred thousand).
pub const MAX_ARRAY_LEN: u64 = 1 << 22;
/// Most array elements accepted in a whole file's metadata, all arrays together.
pub const MAX_TOTAL_ARRAY_ELEMENTS: u64 = 1 << 23;
/// Longest metadata string accepted, in bytes (chat templates are a few KiB).
pub const MAX_STRING_LEN: u64 = 1 << 24;

/// One metadata value of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    /// GGUF type 0.
    U8(u8),
    /// GGUF type 1.
    I8(i8),
    /// GGUF type 2.
    U16(u16),
    /// GGUF type 3.
    I16(i16),
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 12.
    F64(f64),
    /// GGUF type 7 (a byte that must be 0 or 1).
    Bool(bool),
    /// GGUF type 8 (UTF-8).
    String(String),
    /// GGUF type 9: elements all of one type, possibly arrays themselves.
    Array(Vec<MetadataValue>),
}

impl MetadataValue {
    /// The string, if this is a `String`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as `u64`, if this is an integer of any type and not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as `i64`, if this is an integer of any type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => i64::try_from(v).ok(),
            MetadataValue::I8(v) => Some(v.into()),
            MetadataValue::I16(v) => Some(v.into()),
            MetadataValue::I32(v) => Some(v.into()),
            MetadataValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as `f64`, if this is a number of any type (64-bit integers may round).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(v) => Some(v.into()),
            MetadataValue::F64(v) => Some(v),
            MetadataValue::U64(v) => Some(v as f64),
            MetadataValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value, if this is a `Bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The elements, if this is an `Array`.
    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array(v) => Some(v),
            _ => None,
        }
    }

    /// GGUF's name of this value's type (`"u32"`, `"string"`, `"array"`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            MetadataValue::U8(_) => "u8",
            MetadataValue::I8(_) => "i8",
            MetadataValue::U16(_) => "u16",
            MetadataValue::I16(_) => "i16",
            MetadataValue::U32(_) => "u32",
            MetadataValue::I32(_) => "i32",
            MetadataValue::U64(_) => "u64",
            MetadataValue::I64(_) => "i64",
            MetadataValue::F32(_) => "f32",
            MetadataValue::F64(_) => "f64",
            MetadataValue::Bool(_) => "bool",
            MetadataValue::String(_) => "string",
            MetadataValue::Array(_) => "array",
        }
    }
}

/// GGUF value type ids.
mod ty {
    pub(super) const U8: u32 = 0;
    pub(super) const I8: u32 = 1;
    pub(super) const U16: u32 = 2;
    pub(super) const I16: u32 = 3;
    pub(super) const U32: u32 = 4;
    pub(super) const I32: u32 = 5;
    pub(super) const F32: u32 = 6;
    pub(super) const BOOL: u32 = 7;
    pub(super) const STRING: u32 = 8;
    pub(super) const ARRAY: u32 = 9;
    pub(super) const U64: u32 = 10;
    pub(super) const I64: u32 = 11;
    pub(super) const F64: u32 = 12;
}

/// The fewest bytes one value of type `type_id` occupies in a file (`None` for unknown types).
fn min_encoded_size(type_id: u32) -> Option<u64> {
    Some(match type_id {
        ty::U8 | ty::I8 | ty::BOOL => 1,
        ty::U16 | ty::I16 => 2,
        ty::U32 | ty::I32 | ty::F32 => 4,
        ty::U64 | ty::I64 | ty::F64 => 8,
        ty::STRING => 8,
        ty::ARRAY => 4 + 8,
        _ => return None,
    })
}

/// Parses metadata values, keeping a budget of array elements across the whole file.
pub(crate) struct ValueParser {
    array_elements_left: u64,
}

impl ValueParser {
    pub(crate) fn new() -> Self {
        ValueParser {
            array_elements_left: MAX_TOTAL_ARRAY_ELEMENTS,
        }
    }

    /// Reads one value of GGUF type `type_id` for metadata key `key`, `depth` arrays deep.
    pub(crate) fn value(
        &mut self,
        r: &mut Reader<'_>,
        key: &str,
        type_id: u32,
        depth: usize,
    ) -> Result<MetadataValue, GgufError> {
        let what = || format!("value of metadata key '{key}'");
        Ok(match type_id {
            ty::U8 => MetadataValue::U8(r.u8(what)?),
            ty::I8 => MetadataValue::I8(r.u8(what)? as i8),
            ty::U16 => MetadataValue::U16(r.u16(what)?),
            ty::I16 => MetadataValue::I16(r.u16(what)? as i16),
            ty::U32 => MetadataValue::U32(r.u32(what)?),
            ty::I32 => MetadataValue::I32(r.u32(what)? as i32),
            ty::F32 => MetadataValue::F32(f32::from_bits(r.u32(what)?)),
            ty::U64 => MetadataValue::U64(r.u64(what)?),
            ty::I64 => MetadataValue::I64(r.u64(what)? as i64),
            ty::F64 => MetadataValue::F64(f64::from_bits(r.u64(what)?)),
            ty::BOOL => {
                let offset = r.pos() as u64;
                match r.u8(what)? {
                    0 => MetadataValue::Bool(false),
                    1 => MetadataValue::Bool(true),
                    value => {
                        return Err(GgufError::InvalidBool {
                            key: key.to_owned(),
                            offset,
                            value,
                        });
                    }
                }
            }
            ty::STRING => MetadataValue::String(r.string(MAX_STRING_LEN, what)?),
            ty::ARRAY => self.array(r, key, depth + 1)?,
            _ => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_owned(),
                    offset: r.pos() as u64,
                    type_id,
                });
            }
        })
    }

    fn array(
        &mut self,
        r: &mut Reader<'_>,
        key: &str,
        depth: usize,
    ) -> Result<MetadataValue, GgufError> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(GgufError::NestingTooDeep {
                key: key.to_owned(),
                limit: MAX_ARRAY_DEPTH,
            });
        }
        let type_offset = r.pos() as u64;
        let elem_type = r.u32(|| format!("element type of array '{key}'"))?;
        let Some(min_size) = min_encoded_size(elem_type) else {
            return Err(GgufError::UnknownValueType {
                key: key.to_owned(),
                offset: type_offset,
                type_id: elem_type,
            });
        };
        let count_offset = r.pos() as u64;
        let count = r.u64(|| format!("element count of array '{key}'"))?;
        // Check the count against what the file can really hold before allocating anything.
        let available = r.remaining() as u64;
        let fits = available / min_size;
        if count > fits {
            return Err(GgufError::CountTooLarge {
                what: format!("elements in array '{key}' (at byte {count_offset})"),
                count,
                limit: fits,
                reason: format!(
                    "only {available} bytes remain and each element takes at least {min_size}"
                ),
            });
        }
        if count > MAX_ARRAY_LEN {
            return Err(GgufError::CountTooLarge {
                what: format!("elements in array '{key}' (at byte {count_offset})"),
                count,
                limit: MAX_ARRAY_LEN,
                reason: "that is the most one metadata array may hold".to_owned(),
            });
        }
        if count > self.array_elements_left {
            return Err(GgufError::CountTooLarge {
                what: format!("elements in array '{key}' (at byte {count_offset})"),
                count,
                limit: self.array_elements_left,
                reason: format!(
                    "the metadata of one file may hold at most {MAX_TOTAL_ARRAY_ELEMENTS} array \
                     elements in all"
                ),
            });
        }
        self.array_elements_left -= count;
        // `count` is now bounded by the bytes in the file and by MAX_ARRAY_LEN.
        let mut items = Vec::with_capacity(count as usize);
        for _ in 0..count {
            items.push(self.value(r, key, elem_type, depth)?);
        }
        Ok(MetadataValue::Array(items))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_convert_between_number_types() {
        assert_eq!(MetadataValue::I32(5).as_u64(), Some(5));
        assert_eq!(MetadataValue::I32(-5).as_u64(), None);
        assert_eq!(MetadataValue::U64(u64::MAX).as_i64(), None);
        assert_eq!(MetadataValue::U8(7).as_i64(), Some(7));
        assert_eq!(MetadataValue::U16(3).as_f64(), Some(3.0));
        assert_eq!(MetadataValue::F32(1.5).as_f64(), Some(1.5));
        assert_eq!(MetadataValue::F32(1.5).as_u64(), None);
        assert_eq!(MetadataValue::Bool(true).as_u64(), None);
        assert_eq!(MetadataValue::Bool(true).as_bool(), Some(true));
        assert_eq!(MetadataValue::String("x".into()).as_str(), Some("x"));
        assert_eq!(MetadataValue::String("x".into()).as_array(), None);
        let arr = MetadataValue::Array(vec![MetadataValue::U8(1)]);
        assert_eq!(arr.as_array().map(<[_]>::len), Some(1));
        assert_eq!(arr.type_name(), "array");
    }

    fn array_bytes(elem_type: u32, count: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = elem_type.to_le_bytes().to_vec();
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn huge_array_count_fails_before_allocating() {
        let bytes = array_bytes(ty::U8, 1 << 40, &[0; 64]);
        let err = ValueParser::new()
            .value(&mut Reader::new(&bytes), "k", ty::ARRAY, 0)
            .unwrap_err();
        assert!(
            matches!(err, GgufError::CountTooLarge { limit: 64, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("'k'"), "{err}");
    }

    #[test]
    fn nesting_is_capped() {
        let mut bytes = Vec::new();
        for _ in 0..(MAX_ARRAY_DEPTH + 2) {
            bytes.extend_from_slice(&ty::ARRAY.to_le_bytes());
            bytes.extend_from_slice(&1u64.to_le_bytes());
        }
        bytes.extend_from_slice(&[0; 64]);
        let err = ValueParser::new()
            .value(&mut Reader::new(&bytes), "deep", ty::ARRAY, 0)
            .unwrap_err();
        assert!(matches!(err, GgufError::NestingTooDeep { .. }), "{err}");
    }

    #[test]
    fn nested_arrays_parse() {
        // [[1u16, 2u16], []]
        let mut inner = array_bytes(ty::U16, 2, &[1, 0, 2, 0]);
        inner.extend_from_slice(&array_bytes(ty::U16, 0, &[]));
        let bytes = array_bytes(ty::ARRAY, 2, &inner);
        let v = ValueParser::new()
            .value(&mut Reader::new(&bytes), "n", ty::ARRAY, 0)
            .unwrap();
        assert_eq!(
            v,
            MetadataValue::Array(vec![
                MetadataValue::Array(vec![MetadataValue::U16(1), MetadataValue::U16(2)]),
                MetadataValue::Array(vec![]),
            ])
        );
    }

    #[test]
    fn bad_bool_and_unknown_type_are_errors() {
        let err = ValueParser::new()
            .value(&mut Reader::new(&[2]), "b", ty::BOOL, 0)
            .unwrap_err();
        assert!(
            matches!(err, GgufError::InvalidBool { value: 2, .. }),
            "{err}"
        );
        let err = ValueParser::new()
            .value(&mut Reader::new(&[0; 8]), "u", 13, 0)
            .unwrap_err();
        assert!(
            matches!(err, GgufError::UnknownValueType { type_id: 13, .. }),
            "{err}"
        );
        let bytes = array_bytes(99, 1, &[0; 8]);
        let err = ValueParser::new()
            .value(&mut Reader::new(&bytes), "u", ty::ARRAY, 0)
            .unwrap_err();
        assert!(
            matches!(err, GgufError::UnknownValueType { type_id: 99, .. }),
            "{err}"
        );
    }
}
