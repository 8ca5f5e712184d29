//! The byte form of an entry in a shared tier: pingora's serialized `CacheMeta`, Aisle's
//! [`EntryInfo`], and the body, optionally sealed with AES-256-GCM.
//!
//! ```text
//! envelope  = 0x00 payload                                   (plain)
//!           | 0x01 key_id[4] nonce[12] AES-256-GCM(payload)  (encrypted; AAD = the storage key)
//! payload   = "AIS3" len32 internal_meta len32 header uri64 len32 host_path len32 rule
//!             ntags32 (len32 tag)*
//!             flags8 [tokens64 if flags & 2] body
//! ```
//! The key id is derived from the key itself, so rotating keys needs no bookkeeping: records
//! sealed with a `previous_keys` entry still open, and an unknown id is simply a miss.

use super::{EntryInfo, Names};
use crate::rules::StoredRule;
use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use bytes::{Buf, Bytes};
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 4] = b"AIS3";
const PLAIN: u8 = 0;
const SEALED: u8 = 1;
const FLAG_ENCRYPT: u8 = 1;
/// The answer's token count follows the flags (records written before it was kept have none).
const FLAG_TOKENS: u8 = 2;

/// A decoded entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// `CacheMeta::serialize()`, first half.
    pub internal: Vec<u8>,
    /// `CacheMeta::serialize()`, second half.
    pub header: Vec<u8>,
    pub info: EntryInfo,
    pub body: Bytes,
}

/// Why a stored record could not be used (always treated as a miss).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Truncated or not a record.
    Malformed,
    /// Sealed with a key this instance does not have.
    UnknownKey,
    /// Authentication failed: tampered, or sealed for another storage key.
    Tampered,
    /// Sealed, but no keys are configured.
    NoKeys,
}

/// The configured encryption keys: the current one seals, all of them open.
pub struct Keys {
    current: (u32, Aes256Gcm),
    previous: Vec<(u32, Aes256Gcm)>,
}

fn key_id(key: &[u8; 32]) -> u32 {
    let digest = Sha256::digest(key);
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

impl Keys {
    pub fn new(current: [u8; 32], previous: &[[u8; 32]]) -> Self {
        let make = |k: &[u8; 32]| (key_id(k), Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(k)));
        Keys {
            current: make(&current),
            previous: previous.iter().map(make).collect(),
        }
    }

    fn find(&self, id: u32) -> Option<&Aes256Gcm> {
        std::iter::once(&self.current)
            .chain(self.previous.iter())
            .find(|(i, _)| *i == id)
            .map(|(_, c)| c)
    }
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

impl Record {
    fn payload(&self) -> Vec<u8> {
        let tags_len: usize = self.info.tags().map(|t| t.len() + 4).sum();
        let mut out = Vec::with_capacity(
            32 + self.internal.len() + self.header.len() + tags_len + self.body.len(),
        );
        out.extend_from_slice(MAGIC);
        put(&mut out, &self.internal);
        put(&mut out, &self.header);
        out.extend_from_slice(&self.info.uri.to_be_bytes());
        put(&mut out, self.info.host_path().as_bytes());
        put(&mut out, self.info.rule_name().as_bytes());
        out.extend_from_slice(&(self.info.tags().len() as u32).to_be_bytes());
        for t in self.info.tags() {
            put(&mut out, t.as_bytes());
        }
        let mut flags = if self.info.encrypt() { FLAG_ENCRYPT } else { 0 };
        if self.info.tokens > 0 {
            flags |= FLAG_TOKENS;
        }
        out.push(flags);
        if self.info.tokens > 0 {
            out.extend_from_slice(&self.info.tokens.to_be_bytes());
        }
        out.extend_from_slice(&self.body);
        out
    }

    /// Encodes the record; sealed when the entry asks for encryption (`keys` must then be set).
    pub fn encode(&self, storage_key: &[u8], keys: Option<&Keys>) -> Vec<u8> {
        let payload = self.payload();
        match (self.info.encrypt(), keys) {
            (true, Some(keys)) => {
                let (id, cipher) = &keys.current;
                let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
                let sealed = cipher
                    .encrypt(
                        &nonce,
                        Payload {
                            msg: &payload,
                            aad: storage_key,
                        },
                    )
                    .expect("AES-GCM encryption of an in-memory buffer cannot fail");
                let mut out = Vec::with_capacity(1 + 4 + 12 + sealed.len());
                out.push(SEALED);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&nonce);
                out.extend_from_slice(&sealed);
                out
            }
            _ => {
                let mut out = Vec::with_capacity(1 + payload.len());
                out.push(PLAIN);
                out.extend_from_slice(&payload);
                out
            }
        }
    }

    /// Decodes a record read from `storage_key`.
    pub fn decode(
        raw: Bytes,
        storage_key: &[u8],
        keys: Option<&Keys>,
    ) -> Result<Record, DecodeError> {
        let (&kind, rest) = raw.split_first().ok_or(DecodeError::Malformed)?;
        match kind {
            PLAIN => Self::parse(raw.slice(1..)),
            SEALED => {
                let keys = keys.ok_or(DecodeError::NoKeys)?;
                if rest.len() < 4 + 12 + 16 {
                    return Err(DecodeError::Malformed);
                }
                let id = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let cipher = keys.find(id).ok_or(DecodeError::UnknownKey)?;
                let nonce = Nonce::from_slice(&rest[4..16]);
                let plain = cipher
                    .decrypt(
                        nonce,
                        Payload {
                            msg: &rest[16..],
                            aad: storage_key,
                        },
                    )
                    .map_err(|_| DecodeError::Tampered)?;
                Self::parse(Bytes::from(plain))
            }
            _ => Err(DecodeError::Malformed),
        }
    }

    fn parse(mut b: Bytes) -> Result<Record, DecodeError> {
        fn take(b: &mut Bytes) -> Result<Bytes, DecodeError> {
            if b.remaining() < 4 {
                return Err(DecodeError::Malformed);
            }
            let n = b.get_u32() as usize;
            if b.remaining() < n {
                return Err(DecodeError::Malformed);
            }
            Ok(b.split_to(n))
        }
        if b.remaining() < 4 || &b[..4] != MAGIC {
            return Err(DecodeError::Malformed);
        }
        b.advance(4);
        let internal = take(&mut b)?.to_vec();
        let header = take(&mut b)?.to_vec();
        if b.remaining() < 12 {
            return Err(DecodeError::Malformed);
        }
        let uri = b.get_u64();
        let host_path =
            String::from_utf8(take(&mut b)?.to_vec()).map_err(|_| DecodeError::Malformed)?;
        let rule = String::from_utf8(take(&mut b)?.to_vec()).map_err(|_| DecodeError::Malformed)?;
        if b.remaining() < 4 {
            return Err(DecodeError::Malformed);
        }
        let ntags = b.get_u32() as usize;
        let mut tags = Vec::with_capacity(ntags.min(1024));
        for _ in 0..ntags {
            let t = take(&mut b)?;
            tags.push(String::from_utf8(t.to_vec()).map_err(|_| DecodeError::Malformed)?);
        }
        if b.remaining() < 1 {
            return Err(DecodeError::Malformed);
        }
        let flags = b.get_u8();
        let tokens = if flags & FLAG_TOKENS != 0 {
            if b.remaining() < 8 {
                return Err(DecodeError::Malformed);
            }
            b.get_u64()
        } else {
            0
        };
        Ok(Record {
            internal,
            header,
            info: EntryInfo {
                uri,
                names: Names::new(&host_path, &tags),
                rule: StoredRule::decoded(&rule, flags & FLAG_ENCRYPT != 0),
                tokens,
            },
            body: b,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(encrypt: bool) -> Record {
        Record {
            internal: vec![1, 2, 3],
            header: b"HTTP/1.1 200 OK\r\n\r\n".to_vec(),
            info: EntryInfo {
                uri: 77,
                names: Names::new("h/p", &["a", "wedding:42"]),
                rule: StoredRule::decoded("r", encrypt),
                tokens: 0,
            },
            body: Bytes::from_static(b"{\"secret\":\"guest list\"}"),
        }
    }

    #[test]
    fn token_counts_round_trip_and_old_records_have_none() {
        let mut r = record(false);
        r.info.tokens = 1234;
        let raw = r.encode(b"k", None);
        assert_eq!(Record::decode(Bytes::from(raw), b"k", None).unwrap(), r);
        // A record written without the tokens flag (as before it existed) decodes as 0 tokens.
        let old = record(false).encode(b"k", None);
        assert_eq!(
            Record::decode(Bytes::from(old), b"k", None)
                .unwrap()
                .info
                .tokens,
            0
        );
    }

    #[test]
    fn plain_round_trip() {
        let r = record(false);
        let raw = r.encode(b"k", None);
        assert!(raw.windows(10).any(|w| w == b"guest list"));
        assert_eq!(Record::decode(Bytes::from(raw), b"k", None).unwrap(), r);
    }

    #[test]
    fn sealed_round_trip_and_rotation() {
        let old = Keys::new([7; 32], &[]);
        let r = record(true);
        let raw = r.encode(b"k", Some(&old));
        assert!(
            !raw.windows(10).any(|w| w == b"guest list"),
            "ciphertext hides the body"
        );
        assert_eq!(
            Record::decode(Bytes::from(raw.clone()), b"k", Some(&old)).unwrap(),
            r
        );
        let rotated = Keys::new([9; 32], &[[7; 32]]);
        assert_eq!(
            Record::decode(Bytes::from(raw.clone()), b"k", Some(&rotated)).unwrap(),
            r
        );
        let wrong = Keys::new([9; 32], &[]);
        assert_eq!(
            Record::decode(Bytes::from(raw.clone()), b"k", Some(&wrong)),
            Err(DecodeError::UnknownKey)
        );
        assert_eq!(
            Record::decode(Bytes::from(raw.clone()), b"k", None),
            Err(DecodeError::NoKeys)
        );
        assert_eq!(
            Record::decode(Bytes::from(raw.clone()), b"other", Some(&old)),
            Err(DecodeError::Tampered),
            "a record moved to another key does not open"
        );
        let mut tampered = raw;
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            Record::decode(Bytes::from(tampered), b"k", Some(&old)),
            Err(DecodeError::Tampered)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        for raw in [
            &b""[..],
            b"\x00",
            b"\x00AIS3\x00\x00",
            b"\x05xyz",
            b"\x00NOPE",
        ] {
            assert_eq!(
                Record::decode(Bytes::copy_from_slice(raw), b"k", None),
                Err(DecodeError::Malformed)
            );
        }
    }
}
