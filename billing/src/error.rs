//! Billing's one error type.
//!
//! Every fallible function of the library returns [`Error`]; the HTTP layer
//! maps it to a status in exactly one place ([`crate::api_error`]). The
//! variants fall in three categories, and [`Error::kind`] says which, so a
//! caller can branch without matching every variant:
//!
//! - [`ErrorKind::Client`]: the request is at fault (bad field, unknown id,
//!   conflict, no or wrong key). Retrying the same request won't help: 4xx.
//! - [`ErrorKind::Unavailable`]: a dependency (ClickHouse, NATS JetStream or
//!   its KV buckets) is unreachable or failed. Nothing is wrong with the
//!   request; retry later: 503 with `Retry-After`.
//! - [`ErrorKind::Internal`]: a bug of ours (a record we cannot decode, an
//!   amount that does not fit ClickHouse's decimal): 500.

/// A boxed source error (the dependency's own error, kept for the logs).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which of the three categories an [`Error`] is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's mistake: 4xx.
    Client,
    /// A dependency outage: retry later (503).
    Unavailable,
    /// A failure of ours: 500.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Validation: `field` names the offending field when there is one.
    #[error("{message}")]
    BadRequest {
        field: Option<String>,
        message: String,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    /// ClickHouse is unreachable or a query or insert failed.
    #[error("ClickHouse: {op}: {source}")]
    ClickHouse {
        op: String,
        #[source]
        source: BoxError,
    },
    /// NATS (JetStream, a KV bucket, or the events bus) is unreachable or an
    /// operation on it failed.
    #[error("NATS: {op}: {source}")]
    Nats {
        op: String,
        #[source]
        source: BoxError,
    },
    /// The configuration is invalid (start-up only).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A bug of ours; the detail goes to the logs, never to the caller.
    #[error("{context}: {source}")]
    Internal {
        context: String,
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Validation of a named field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::BadRequest {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// Validation of the request as a whole (no one field to name).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            field: None,
            message: message.into(),
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::Unauthorized(message.into())
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::Forbidden(message.into())
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound(message.into())
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::Conflict(message.into())
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::MethodNotAllowed(message.into())
    }

    pub fn clickhouse(op: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::ClickHouse {
            op: op.into(),
            source: source.into(),
        }
    }

    pub fn nats(op: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Nats {
            op: op.into(),
            source: source.into(),
        }
    }

    /// A failure of ours, with what we were doing.
    pub fn internal(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Internal {
            context: context.into(),
            source: source.into(),
        }
    }

    /// A failure of ours that has no underlying error.
    pub fn bug(message: impl Into<String>) -> Self {
        let message: String = message.into();
        Self::Internal {
            context: "internal".into(),
            source: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::BadRequest { .. }
            | Error::Unauthorized(_)
            | Error::Forbidden(_)
            | Error::NotFound(_)
            | Error::MethodNotAllowed(_)
            | Error::Conflict(_) => ErrorKind::Client,
            Error::ClickHouse { .. } | Error::Nats { .. } => ErrorKind::Unavailable,
            Error::Config(_) | Error::Internal { .. } => ErrorKind::Internal,
        }
    }

    /// Whether retrying later may succeed (a dependency outage).
    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Unavailable
    }
}

impl From<clickhouse::error::Error> for Error {
    fn from(e: clickhouse::error::Error) -> Self {
        Self::clickhouse("query", e)
    }
}

impl From<tollgate_schemas::migrations::MigrationError> for Error {
    fn from(e: tollgate_schemas::migrations::MigrationError) -> Self {
        Self::clickhouse("migrate", e)
    }
}

impl From<tollgate_schemas::bus::BusError> for Error {
    fn from(e: tollgate_schemas::bus::BusError) -> Self {
        Self::nats("bus", e)
    }
}

/// Every `async_nats` operation error (`kv::PutError`, `EntryError`, …).
impl<K> From<async_nats::error::Error<K>> for Error
where
    K: Clone + std::fmt::Debug + std::fmt::Display + PartialEq + Send + Sync + 'static,
{
    fn from(e: async_nats::error::Error<K>) -> Self {
        Self::nats("jetstream", e)
    }
}

/// A JSON record we wrote and cannot (de)serialize: ours.
impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Self::internal("json", e)
    }
}

/// `.context(..)` for the results billing handles: says which category the
/// failure is in and what was being done.
pub trait ResultExt<T> {
    fn nats_ctx(self, op: impl FnOnce() -> String) -> Result<T>;
    fn clickhouse_ctx(self, op: impl FnOnce() -> String) -> Result<T>;
    fn internal_ctx(self, op: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for std::result::Result<T, E> {
    fn nats_ctx(self, op: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::nats(op(), e))
    }
    fn clickhouse_ctx(self, op: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::clickhouse(op(), e))
    }
    fn internal_ctx(self, op: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::internal(op(), e))
    }
}

/// An invalid configuration; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment variable does not parse (figment names the
    /// key and where it came from).
    #[error("{0}")]
    Load(Box<figment::Error>),
    /// A value parses but is not acceptable.
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}
