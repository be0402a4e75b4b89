//! Static checks every wire value passes before it is encoded and after it is decoded.
//!
//! [`Validate::validate`] checks what can be known from the value alone: bounded lengths and
//! counts, finite numbers, ordered timestamps. Checks that need the current time (is a certificate
//! expired?) take `now` explicitly and live on the types themselves.

/// A value breaks a rule of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A text or byte field is longer than the protocol allows.
    #[error("{field} is {len} bytes long, above the limit of {limit} bytes")]
    TooLong {
        /// The field, e.g. `advert.addrs[]`.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The largest length allowed.
        limit: usize,
    },
    /// A list has more entries than the protocol allows.
    #[error("{field} has {count} entries, above the limit of {limit}")]
    TooMany {
        /// The field.
        field: &'static str,
        /// Its number of entries.
        count: usize,
        /// The largest number allowed.
        limit: usize,
    },
    /// A field that must hold something is empty.
    #[error("{field} must not be empty")]
    Empty {
        /// The field.
        field: &'static str,
    },
    /// A number is NaN, infinite or out of its range.
    #[error("{field} must be {expected}, got {value}")]
    BadNumber {
        /// The field.
        field: &'static str,
        /// What it must be, e.g. "a finite number >= 0".
        expected: &'static str,
        /// The value received, as text.
        value: String,
    },
    /// Two timestamps are in the wrong order.
    #[error("{later} ({later_value}) must be after {earlier} ({earlier_value})")]
    TimeOrder {
        /// The field that must come first.
        earlier: &'static str,
        /// Its value (unix seconds).
        earlier_value: u64,
        /// The field that must come later.
        later: &'static str,
        /// Its value (unix seconds).
        later_value: u64,
    },
    /// A field holds a value the protocol rejects for another reason.
    #[error("{field} is invalid: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
}

/// A value that can check its own static invariants.
pub trait Validate {
    /// Checks the invariants that do not depend on the clock or on other values.
    fn validate(&self) -> Result<(), ValidationError>;
}

/// Fails if `text` is longer than `limit` bytes.
pub(crate) fn max_len(
    field: &'static str,
    text: &str,
    limit: usize,
) -> Result<(), ValidationError> {
    if text.len() > limit {
        return Err(ValidationError::TooLong {
            field,
            len: text.len(),
            limit,
        });
    }
    Ok(())
}

/// Fails if `text` is empty or longer than `limit` bytes.
pub(crate) fn non_empty(
    field: &'static str,
    text: &str,
    limit: usize,
) -> Result<(), ValidationError> {
    if text.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    max_len(field, text, limit)
}

/// Fails if `items` has more than `limit` entries.
pub(crate) fn max_count<T>(
    field: &'static str,
    items: &[T],
    limit: usize,
) -> Result<(), ValidationError> {
    if items.len() > limit {
        return Err(ValidationError::TooMany {
            field,
            count: items.len(),
            limit,
        });
    }
    Ok(())
}

/// Fails unless `value` is finite and not negative.
pub(crate) fn finite_non_negative(field: &'static str, value: f32) -> Result<(), ValidationError> {
    if !value.is_finite() || value < 0.0 {
        return Err(ValidationError::BadNumber {
            field,
            expected: "a finite number >= 0",
            value: value.to_string(),
        });
    }
    Ok(())
}

/// Fails unless `value` is finite and not positive (a log-probability).
pub(crate) fn log_probability(field: &'static str, value: f32) -> Result<(), ValidationError> {
    if !value.is_finite() || value > 0.0 {
        return Err(ValidationError::BadNumber {
            field,
            expected: "a finite log-probability <= 0",
            value: value.to_string(),
        });
    }
    Ok(())
}

/// Fails unless `later_value > earlier_value`.
pub(crate) fn strictly_after(
    earlier: &'static str,
    earlier_value: u64,
    later: &'static str,
    later_value: u64,
) -> Result<(), ValidationError> {
    if later_value <= earlier_value {
        return Err(ValidationError::TimeOrder {
            earlier,
            earlier_value,
            later,
            later_value,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_reject_what_they_promise_to() {
        assert!(max_len("f", "abcd", 4).is_ok());
        assert!(matches!(
            max_len("f", "abcde", 4),
            Err(ValidationError::TooLong {
                len: 5,
                limit: 4,
                ..
            })
        ));
        assert!(matches!(
            non_empty("f", "", 4),
            Err(ValidationError::Empty { .. })
        ));
        assert!(max_count("f", &[1, 2], 2).is_ok());
        assert!(max_count("f", &[1, 2, 3], 2).is_err());
        assert!(finite_non_negative("f", 0.0).is_ok());
        for bad in [f32::NAN, f32::INFINITY, -1.0] {
            assert!(finite_non_negative("f", bad).is_err());
        }
        assert!(log_probability("f", -0.5).is_ok());
        assert!(log_probability("f", 0.1).is_err());
        assert!(log_probability("f", f32::NEG_INFINITY).is_err());
        assert!(strictly_after("a", 1, "b", 2).is_ok());
        let err = strictly_after("issued_at", 5, "expires_at", 5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expires_at (5) must be after issued_at (5)"
        );
    }
}
