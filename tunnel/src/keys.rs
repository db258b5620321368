//! The node's WireGuard key pair.
//!
//! A node keeps one static Curve25519 key pair for its whole life: the public
//! half is published in the node record (`WireguardPubKey`, base64, `docs/architecture.md`
//! §4) and every remote node configures it as a peer, so a key that
//! changed on every agent restart would force every peer in the mesh to be
//! rewritten. The private half is therefore generated once and stored in a
//! file readable only by its owner (mode 0600) under the agent's state dir,
//! and reused on the next start.
//!
//! The public key is always computed here from the private key. boringtun's
//! UAPI `get` does not report it reliably, so nothing reads it back from the
//! device.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use boringtun::x25519;
use rand::TryRngCore as _;

/// The file name of the private key under the state dir.
pub const PRIVATE_KEY_FILE: &str = "wireguard.key";

/// Errors of key handling.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key in text form is not 32 bytes of standard base64.
    #[error("invalid wireguard key {what}: expected 32 bytes in standard base64")]
    InvalidKey {
        /// What was being parsed (never the secret itself).
        what: &'static str,
    },
    /// The key file could not be read, written or created.
    #[error("key file {path}: {op}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The key file is readable by others than its owner; it is refused rather
    /// than silently used, since the key may already have leaked.
    #[error(
        "key file {path} has mode {mode:o}; it must not be accessible by group or others (0600)"
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file exists but does not hold a key.
    #[error("key file {path} does not hold a base64 wireguard private key")]
    Corrupt {
        /// The file.
        path: PathBuf,
    },
    /// The operating system's random source failed.
    #[error("reading the os random source for a new key")]
    Random(#[source] rand::rand_core::OsError),
}

/// A WireGuard public key (Curve25519 point, 32 bytes).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Standard base64, the form of `WireguardPubKey` in the node record and of
    /// `wg` tooling.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// Parses standard base64.
    ///
    /// # Errors
    ///
    /// [`KeyError::InvalidKey`] unless `text` is 32 bytes of standard base64.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode_key(text, "public key").map(Self)
    }

    /// Lowercase hex, the form the WireGuard UAPI speaks.
    pub(crate) fn to_hex(self) -> String {
        to_hex(&self.0)
    }
}

impl From<[u8; 32]> for PublicKey {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// A WireGuard private key. Its `Debug` output never shows the secret.
#[derive(Clone)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A fresh key from the operating system's random source.
    ///
    /// # Errors
    ///
    /// [`KeyError::Random`] if the random source fails.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(KeyError::Random)?;
        // Clamp as Curve25519 requires (RFC 7748), like `wg genkey` does, so
        // the stored key is canonical.
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Ok(Self(bytes))
    }

    /// Parses standard base64 (the key file format, as `wg genkey` writes).
    ///
    /// # Errors
    ///
    /// [`KeyError::InvalidKey`] unless `text` is 32 bytes of standard base64.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode_key(text, "private key").map(Self)
    }

    /// Standard base64.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// The public key of this private key.
    pub fn public_key(&self) -> PublicKey {
        let secret = x25519::StaticSecret::from(self.0);
        PublicKey(*x25519::PublicKey::from(&secret).as_bytes())
    }

    /// The raw bytes.
    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, the form the WireGuard UAPI speaks.
    pub(crate) fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// Loads the private key from `state_dir/wireguard.key`, or generates one
    /// and stores it there (mode 0600, written to a temporary file and renamed
    /// so a crash never leaves a half-written key). The directory is created if
    /// missing.
    ///
    /// # Errors
    ///
    /// [`KeyError::Io`] if the directory or file cannot be created or read,
    /// [`KeyError::InsecurePermissions`] if an existing file is accessible by
    /// group or others, [`KeyError::Corrupt`] if it does not hold a key.
    pub fn load_or_generate(state_dir: &Path) -> Result<Self, KeyError> {
        let path = state_dir.join(PRIVATE_KEY_FILE);
        match fs::metadata(&path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyError::InsecurePermissions { path, mode });
                }
                let text = fs::read_to_string(&path).map_err(|source| KeyError::Io {
                    path: path.clone(),
                    op: "reading",
                    source,
                })?;
                Self::from_base64(text.trim()).map_err(|_| KeyError::Corrupt { path })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                key.store(state_dir, &path)?;
                tracing::info!(path = %path.display(), public_key = %key.public_key(), "generated wireguard key pair");
                Ok(key)
            }
            Err(source) => Err(KeyError::Io {
                path,
                op: "inspecting",
                source,
            }),
        }
    }

    fn store(&self, state_dir: &Path, path: &Path) -> Result<(), KeyError> {
        let io_err = |path: &Path, op| {
            let path = path.to_owned();
            move |source| KeyError::Io { path, op, source }
        };
        fs::create_dir_all(state_dir).map_err(io_err(state_dir, "creating the state dir"))?;
        let tmp = path.with_extension("key.tmp");
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp, "creating"))?;
        // The umask cannot widen 0600, but be explicit in case the file
        // system ignores the create mode.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err(&tmp, "restricting permissions of"))?;
        writeln!(file, "{}", self.to_base64()).map_err(io_err(&tmp, "writing"))?;
        file.sync_all().map_err(io_err(&tmp, "syncing"))?;
        fs::rename(&tmp, path).map_err(io_err(path, "renaming the temporary file to"))?;
        Ok(())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<secret>, public {})", self.public_key())
    }
}

fn decode_key(text: &str, what: &'static str) -> Result<[u8; 32], KeyError> {
    BASE64
        .decode(text.trim())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or(KeyError::InvalidKey { what })
}

fn to_hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_matches_rfc7748_test_vector() {
        // RFC 7748 section 6.1: Alice's private key and public key.
        let private = hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(PrivateKey(private).public_key(), PublicKey(public));
    }

    #[test]
    fn base64_round_trip_and_rejects_garbage() {
        let key = PrivateKey::generate().unwrap();
        let public = key.public_key();
        assert_eq!(PublicKey::from_base64(&public.to_base64()).unwrap(), public);
        assert_eq!(
            PrivateKey::from_base64(&key.to_base64())
                .unwrap()
                .as_bytes(),
            key.as_bytes()
        );
        assert!(PublicKey::from_base64("not base64!").is_err());
        assert!(PublicKey::from_base64(&BASE64.encode([1u8; 31])).is_err());
    }

    #[test]
    fn debug_hides_the_secret() {
        let key = PrivateKey::generate().unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.to_base64()), "{shown}");
    }

    #[test]
    fn key_file_is_created_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = PrivateKey::load_or_generate(&state).unwrap();
        let meta = fs::metadata(state.join(PRIVATE_KEY_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let second = PrivateKey::load_or_generate(&state).unwrap();
        assert_eq!(first.as_bytes(), second.as_bytes());
        assert_eq!(first.public_key(), second.public_key());
        assert!(!state.join("wireguard.key.tmp").exists());
    }

    #[test]
    fn key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        PrivateKey::load_or_generate(dir.path()).unwrap();
        let path = dir.path().join(PRIVATE_KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = PrivateKey::load_or_generate(dir.path()).unwrap_err();
        assert!(
            matches!(err, KeyError::InsecurePermissions { mode: 0o644, .. }),
            "{err}"
        );
    }

    #[test]
    fn corrupt_key_file_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PRIVATE_KEY_FILE);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(b"hello\n")
            .unwrap();
        let err = PrivateKey::load_or_generate(dir.path()).unwrap_err();
        assert!(matches!(err, KeyError::Corrupt { .. }), "{err}");
    }

    fn hex32(text: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
