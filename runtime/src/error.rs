//! The runtime's errors. Each variant's message is what the user reads.

use gallocy_transport::TransportError;

/// Errors returned by gallocy's library calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration variable has a value gallocy cannot use.
    #[error("{var}={value:?} {why}")]
    Config {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// The heap's address range is already in use in this process.
    #[error("heap range {start:#x}-{end:#x} is already occupied by the mapping `{mapping}` (choose another GALLOCY_HEAP_BASE)")]
    Occupied {
        /// Heap start.
        start: usize,
        /// Heap end.
        end: usize,
        /// The conflicting line of /proc/self/maps.
        mapping: String,
    },
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// Connecting the job failed.
    #[error("{0}")]
    Transport(#[from] TransportError),
    /// The job was stopped during start-up; the message names the rank at fault.
    #[error("job stopped by rank 0: {0}")]
    JobStopped(String),
    /// A job-wide call in a process that a member started by `fork`: it is not a member.
    #[error("gallocy: this process is a forked child of rank {rank}; it is not a member of the job and cannot make job-wide calls")]
    NotMember {
        /// The parent's rank.
        rank: usize,
    },
    /// An error on this rank, with the rank named.
    #[error("gallocy: rank {rank}: {}", without_own_rank(*.rank, .source))]
    OnRank {
        /// This process's rank.
        rank: usize,
        /// The error.
        source: Box<Error>,
    },
}

/// The text of `source`, without a leading "rank R: " naming this rank again (the transport
/// names its rank in its own errors; here the prefix already does).
fn without_own_rank(rank: usize, source: &Error) -> String {
    let text = source.to_string();
    let own = format!("rank {rank}: ");
    match text.strip_prefix(&own) {
        Some(rest) => rest.to_owned(),
        None => text,
    }
}

impl Error {
    pub(crate) fn config(var: &str, value: &str, why: &str) -> Error {
        Error::Config { var: var.into(), value: value.into(), why: why.into() }
    }

    pub(crate) fn os(what: impl Into<String>) -> Error {
        Error::Os { what: what.into(), source: std::io::Error::last_os_error() }
    }

    pub(crate) fn on_rank(self, rank: usize) -> Error {
        match self {
            e @ Error::OnRank { .. } => e,
            e => Error::OnRank { rank, source: Box::new(e) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rank_is_named_once() {
        let e = Error::Transport(TransportError::Bootstrap("rank 1: no connection to rank 0".into())).on_rank(1);
        assert_eq!(e.to_string(), "gallocy: rank 1: no connection to rank 0");
        let other = Error::Transport(TransportError::Bootstrap("rank 0: refused".into())).on_rank(1);
        assert_eq!(other.to_string(), "gallocy: rank 1: rank 0: refused", "another rank stays named");
    }
}
