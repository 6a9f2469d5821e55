//! Identifiers and fixed-size values of the crypto layer. None of them is secret or PHI.

use std::fmt;

use uuid::Uuid;

use crate::error::IdError;

/// A SHA-256 event hash: the link of a stream's hash chain.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventHash([u8; 32]);

impl EventHash {
    /// The `prev_hash` of the first event (version 1) of every stream.
    pub const GENESIS: EventHash = EventHash([0; 32]);

    /// Wraps 32 bytes read from storage.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Wraps a stored hash, refusing any length but 32.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
        <[u8; 32]>::try_from(bytes)
            .map(Self)
            .map_err(|_| IdError::new("event hash", "expected 32 bytes"))
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for EventHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for EventHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventHash({self})")
    }
}

/// An Ed25519 signature over an event hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventSignature([u8; 64]);

impl EventSignature {
    /// Wraps 64 bytes read from storage.
    pub const fn from_bytes(bytes: [u8; 64]) -> Self {
        Self(bytes)
    }

    /// Wraps a stored signature, refusing any length but 64.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
        <[u8; 64]>::try_from(bytes)
            .map(Self)
            .map_err(|_| IdError::new("event signature", "expected 64 bytes"))
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 64] {
        &self.0
    }
}

impl fmt::Debug for EventSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventSignature({})", hex::encode(self.0))
    }
}

/// The id of one data key (random UUID v4). Stored in the clear header of every event it seals.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DataKeyId(Uuid);

impl DataKeyId {
    /// A fresh random id.
    pub fn generate() -> Self {
        Self(uuid::Builder::from_random_bytes(crate::rng::array()).into_uuid())
    }

    /// Wraps an id read from storage.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The UUID.
    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for DataKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for DataKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKeyId({})", self.0)
    }
}

/// Longest key id ([`KekId`], [`SignerKeyId`]) in bytes.
const KEY_ID_LENGTH_MAX: usize = 64;

/// ASCII letters, digits, `-`, `_` and `.`, starting with a letter or digit, 1 to 64 bytes.
/// `:` and `,` are excluded, so ids can be listed in an environment variable.
fn parse_key_id(raw: &str, kind: &'static str) -> Result<String, IdError> {
    if raw.is_empty() || raw.len() > KEY_ID_LENGTH_MAX {
        return Err(IdError::new(kind, "expected 1 to 64 bytes"));
    }
    if !raw
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
    {
        return Err(IdError::new(
            kind,
            "must start with an ASCII letter or digit",
        ));
    }
    if !raw
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(IdError::new(
            kind,
            "only ASCII letters, digits, '-', '_' and '.' are allowed",
        ));
    }
    Ok(raw.to_owned())
}

macro_rules! key_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// ASCII letters, digits, `-`, `_` and `.`, starting with a letter or digit, at
            /// most 64 bytes.
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                parse_key_id(raw, $kind).map(Self)
            }

            /// A fresh id: the prefix and 16 random hex digits.
            pub fn generate() -> Self {
                let suffix: [u8; 8] = crate::rng::array();
                Self(format!(concat!($prefix, "-{}"), hex::encode(suffix)))
            }

            /// The id as written.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0)
            }
        }
    };
}

key_id!(
    /// The id of a key-encryption key in a [`crate::KeyRing`], stored beside each wrapped data key.
    KekId,
    "KEK id",
    "kek"
);
key_id!(
    /// The id of an Ed25519 event-signing key, stored in the clear header of every event.
    SignerKeyId,
    "signer key id",
    "signer"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_print_as_hex_and_check_length() {
        let hash = EventHash::from_bytes([0xab; 32]);
        assert_eq!(hash.to_string(), "ab".repeat(32));
        assert_eq!(EventHash::from_slice(hash.as_bytes()), Ok(hash));
        assert!(EventHash::from_slice(&[0; 31]).is_err());
        assert!(EventSignature::from_slice(&[0; 63]).is_err());
        assert_eq!(EventHash::GENESIS.as_bytes(), &[0; 32]);
    }

    #[test]
    fn key_ids_are_short_ascii() {
        for good in ["kek-1", "K.2024_01", "0abc", &"a".repeat(64)] {
            assert_eq!(KekId::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", "-kek", "kek:1", "kek,1", "kék", "a b", &"a".repeat(65)] {
            assert!(SignerKeyId::parse(bad).is_err(), "{bad:?}");
        }
        let generated = KekId::generate();
        assert_eq!(KekId::parse(generated.as_str()), Ok(generated.clone()));
        assert_ne!(generated, KekId::generate());
    }

    #[test]
    fn data_key_ids_are_random_v4() {
        let id = DataKeyId::generate();
        assert_eq!(id.as_uuid().get_version_num(), 4);
        assert_ne!(id, DataKeyId::generate());
    }
}
