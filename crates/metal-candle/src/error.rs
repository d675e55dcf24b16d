//! The library's one error type.

/// Everything that can go wrong in metal-candle. Messages name the shapes, values, dtypes or
/// paths involved and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor had the wrong shape for the operation.
    #[error("{op}: {message}")]
    Shape {
        /// The operation that rejected its input.
        op: &'static str,
        /// What was wrong, with the shapes involved.
        message: String,
    },
    /// Tensors that must share a dtype did not.
    #[error("{op}: dtype mismatch: {message}")]
    DType {
        /// The operation that rejected its input.
        op: &'static str,
        /// Which tensors disagreed and how.
        message: String,
    },
    /// A configuration value is out of its valid range.
    #[error("invalid {name} = {value}: {expected}")]
    InvalidConfig {
        /// The name of the setting.
        name: &'static str,
        /// The value that was given.
        value: String,
        /// What would have been valid.
        expected: &'static str,
    },
    /// An error from candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file that exists but cannot be used: wrong format, truncated, missing a tensor or a
    /// field, or made for another model.
    #[error("{path}: {problem}")]
    File {
        /// The file involved.
        path: String,
        /// What is wrong with it, and the fix where there is one.
        problem: String,
    },
    /// Anything else, with a message that says what happened.
    #[error("{0}")]
    Msg(String),
}

/// Result with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn shape(op: &'static str, message: impl Into<String>) -> Self {
        Error::Shape {
            op,
            message: message.into(),
        }
    }

    pub(crate) fn dtype(op: &'static str, message: impl Into<String>) -> Self {
        Error::DType {
            op,
            message: message.into(),
        }
    }

    pub(crate) fn file(path: impl std::fmt::Display, problem: impl Into<String>) -> Self {
        Error::File {
            path: path.to_string(),
            problem: problem.into(),
        }
    }

    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    /// Wraps this error so it can travel through candle's `Result` (inside custom ops).
    pub(crate) fn into_candle(self) -> candle_core::Error {
        candle_core::Error::Msg(self.to_string())
    }
}
