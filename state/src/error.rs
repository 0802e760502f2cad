//! The errors of the layer every role shares over the store: the registries, the cache and
//! its consistency modes, and the store itself. Each maps to the code a caller sees on the
//! wire ([`Error::code`]), so the scheduler, the gateway and the executor answer alike.

use squall_proto::call::{Failure, FailureCode};

/// Why a registry, cache or store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No function of that name is registered.
    #[error("function {name:?} is not registered")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// A function name that cannot be stored (empty, too long, or with control characters).
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A DAG definition was refused.
    #[error("invalid DAG: {0}")]
    InvalidDag(String),
    /// The stored code of a function version is missing or corrupt.
    #[error("stored code of {name:?} version {version} is unusable: {reason}")]
    CorruptCode {
        /// The function.
        name: String,
        /// The version.
        version: u64,
        /// What is wrong.
        reason: String,
    },
    /// No model of that name is registered.
    #[error("model {name:?} is not registered")]
    ModelNotFound {
        /// The name asked for.
        name: String,
    },
    /// The key-value store failed or could not be reached.
    #[error("key-value store: {0}")]
    Kvs(#[from] squall_kvs::Error),
    /// A value in the store has another type than expected, or is malformed.
    #[error("bad value in key {key:?}: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Repeatable read: the version of a key pinned by an earlier step of the run could not
    /// be fetched from the executor holding it (so the read fails rather than return another).
    #[error("the version of {key:?} pinned by this run on {holder} is unavailable: {reason}")]
    PinUnavailable {
        /// The key.
        key: String,
        /// The executor that pinned it.
        holder: String,
        /// Why.
        reason: String,
    },
    /// Causal: no version of the key can join the run's causal cut. Either the version held
    /// depends on a newer version of a key the run already read (declare the key in the
    /// call's keys, so the run pins it with the others before its first step), or writes kept
    /// outpacing the search for a cut of the declared keys.
    #[error("no version of {key:?} fits this run's causal cut: {reason}")]
    CausalCut {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// Causal: a causal call wrote a key that holds values of another lattice type (causal
    /// writes are multi-key causal versions).
    #[error("key {key:?} holds {stored} values, but a causal call writes multi-causal versions: write it in lww or repeatable-read mode, or use another key")]
    ModeMismatch {
        /// The key.
        key: String,
        /// The type it holds.
        stored: squall_lattices::LatticeType,
    },
    /// A cache or pool could not start (sockets, threads).
    #[error("setup failed: {0}")]
    Setup(String),
    /// A failure not caused by the caller (a worker thread panicked, say).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The code a caller sees for this error.
    pub fn code(&self) -> FailureCode {
        match self {
            Error::NotFound { .. } | Error::ModelNotFound { .. } => FailureCode::NotFound,
            Error::InvalidName { .. } | Error::InvalidDag(_) | Error::ModeMismatch { .. } => {
                FailureCode::BadRequest
            }
            Error::Kvs(_) | Error::PinUnavailable { .. } | Error::CausalCut { .. } => {
                FailureCode::Unavailable
            }
            Error::CorruptCode { .. }
            | Error::BadValue { .. }
            | Error::Setup(_)
            | Error::Internal(_) => FailureCode::Internal,
        }
    }

    /// The error as a caller sees it.
    pub fn failure(&self) -> Failure {
        Failure::new(self.code(), self.to_string())
    }
}

impl From<squall_proto::keys::InvalidName> for Error {
    fn from(e: squall_proto::keys::InvalidName) -> Self {
        Error::InvalidName {
            name: e.name,
            reason: e.reason,
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
