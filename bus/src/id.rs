//! Id newtypes: the only way to hold a device, target, tunnel or relay id is to
//! have checked it against `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`, so no id can reach
//! into another topic (`/`, `+`, `#`, `$` are refused) or grow without bound.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is empty.
    #[error("id is empty")]
    Empty,
    /// The id is longer than [`MAX_ID_LEN`] bytes.
    #[error("id is {0} bytes long, the limit is {MAX_ID_LEN}")]
    TooLong(usize),
    /// The id holds a character outside `[A-Za-z0-9._-]` or starts with `.`, `_` or `-`.
    #[error("id may only hold A-Z a-z 0-9 . _ - and must start with a letter or digit; {0:?} is not allowed")]
    BadChar(char),
}

/// Checks `s` against the id pattern.
pub fn check_id(s: &str) -> Result<(), IdError> {
    let first = s.chars().next().ok_or(IdError::Empty)?;
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(s.len()));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(IdError::BadChar(first));
    }
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(IdError::BadChar(c)),
        None => Ok(()),
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks `s` and wraps it.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check_id(&s)?;
                Ok(Self(s))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
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
    /// A gateway running `warren-agent` (also its MQTT username).
    DeviceId
);
id_type!(
    /// A destination on a device: one of its own services or a lower device on its LAN.
    TargetName
);
id_type!(
    /// One tunnel, chosen by the requester or by the relay.
    TunnelId
);
id_type!(
    /// One `warren-relay` process.
    RelayId
);
id_type!(
    /// An operator known to the relay (username on the bus).
    UserName
);

impl TunnelId {
    /// A fresh random id, `t` followed by 12 hex digits.
    pub fn random() -> Self {
        Self(format!(
            "t{:012x}",
            rand::random::<u64>() & 0xffff_ffff_ffff
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_ids_are_accepted() {
        for s in ["gw1", "GW-1.a_b", "0", &"a".repeat(64)] {
            assert!(DeviceId::new(s).is_ok(), "{s}");
        }
    }

    #[test]
    fn hostile_ids_are_refused() {
        let cases: &[(&str, IdError)] = &[
            ("", IdError::Empty),
            ("a/b", IdError::BadChar('/')),
            ("a+", IdError::BadChar('+')),
            ("#", IdError::BadChar('#')),
            ("$SYS", IdError::BadChar('$')),
            ("gw é", IdError::BadChar(' ')),
            ("gwé", IdError::BadChar('é')),
            ("-gw", IdError::BadChar('-')),
            (".hidden", IdError::BadChar('.')),
            ("a\u{0}b", IdError::BadChar('\u{0}')),
        ];
        for (s, want) in cases {
            assert_eq!(DeviceId::new(*s).unwrap_err(), *want, "{s:?}");
        }
        assert_eq!(
            TunnelId::new("a".repeat(65)).unwrap_err(),
            IdError::TooLong(65)
        );
    }

    #[test]
    fn ids_refuse_bad_input_when_decoded() {
        let err = serde_json::from_str::<DeviceId>("\"a/#\"").unwrap_err();
        assert!(err.to_string().contains("not allowed"), "{err}");
    }

    #[test]
    fn random_tunnel_ids_are_valid_and_differ() {
        let (a, b) = (TunnelId::random(), TunnelId::random());
        assert_ne!(a, b);
        assert!(check_id(a.as_str()).is_ok());
    }
}
