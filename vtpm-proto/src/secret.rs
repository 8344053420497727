//! Secret bytes on the wire (a vTPM's state key in the manager protocol and in a transfer
//! package): hex in JSON, redacted in `Debug`, zeroed on drop. A leaf module, so every format
//! that carries a secret can use it without importing another format.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Secret bytes on the wire: hex in JSON, redacted in `Debug`, zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(pub Zeroizing<Vec<u8>>);

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes([redacted; {}])", self.0.len())
    }
}

impl Serialize for SecretBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let hex = Zeroizing::new(hex::encode(self.0.as_slice()));
        s.serialize_str(&hex)
    }
}

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Zeroizing::new(String::deserialize(d)?);
        let v = hex::decode(s.as_str()).map_err(serde::de::Error::custom)?;
        Ok(SecretBytes(Zeroizing::new(v)))
    }
}
