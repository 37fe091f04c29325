//! Validated identifiers: [`NodeId`] and [`ClusterId`].
//!
//! Both follow the same rule (`docs/PROTOCOL.md`, "Identifiers"): 1 to 256 bytes of
//! `[A-Za-z0-9._-]`, starting with a letter or digit. The character set keeps ids safe in file
//! names, URIs, metric labels and log lines without escaping; the first-character rule keeps
//! them from looking like hidden files or command-line flags.

use std::fmt;
use std::str::FromStr;

/// Longest id in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The id is empty.
    #[error("{kind} is empty")]
    Empty {
        /// "node id" or "cluster id".
        kind: &'static str,
    },
    /// The id is longer than [`MAX_ID_LEN`] bytes.
    #[error("{kind} is {len} bytes long, at most {MAX_ID_LEN} are allowed")]
    TooLong {
        /// "node id" or "cluster id".
        kind: &'static str,
        /// Length found.
        len: usize,
    },
    /// A character outside `[A-Za-z0-9._-]`, or a first character that is not a letter or digit.
    #[error(
        "{kind} has {found:?} at byte {position}: allowed are A-Z a-z 0-9 . _ - \
         (the first one a letter or digit)"
    )]
    BadChar {
        /// "node id" or "cluster id".
        kind: &'static str,
        /// Offending character.
        found: char,
        /// Byte offset of the offending character.
        position: usize,
    },
}

fn validate(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { kind, len: s.len() });
    }
    for (position, found) in s.char_indices() {
        let ok =
            found.is_ascii_alphanumeric() || (position > 0 && matches!(found, '.' | '_' | '-'));
        if !ok {
            return Err(IdError::BadChar {
                kind,
                found,
                position,
            });
        }
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Parses and validates an id.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate($kind, &s)?;
                Ok(Self(s))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// The identity of one node: validated, bound to the node's certificate.
    NodeId,
    "node id"
);
id_type!(
    /// The identity of a cluster; nodes of different clusters refuse each other.
    ClusterId,
    "cluster id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for ok in [
            "a",
            "node-1",
            "Node_2.example",
            "0",
            &"x".repeat(MAX_ID_LEN),
        ] {
            assert_eq!(NodeId::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_invalid_ids() {
        assert_eq!(NodeId::new(""), Err(IdError::Empty { kind: "node id" }));
        assert_eq!(
            NodeId::new("x".repeat(MAX_ID_LEN + 1)),
            Err(IdError::TooLong {
                kind: "node id",
                len: MAX_ID_LEN + 1
            })
        );
        for (bad, position) in [
            ("-flag", 0),
            (".hidden", 0),
            ("a b", 1),
            ("a/b", 1),
            ("é", 0),
            ("ok\n", 2),
        ] {
            match NodeId::new(bad) {
                Err(IdError::BadChar { position: p, .. }) => assert_eq!(p, position, "{bad:?}"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn error_message_names_the_rule() {
        let msg = ClusterId::new("a b").unwrap_err().to_string();
        assert!(msg.contains("cluster id"), "{msg}");
        assert!(msg.contains("A-Z a-z 0-9 . _ -"), "{msg}");
    }
}
