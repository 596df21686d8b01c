//! The node's WireGuard key pair: an x25519 private key kept in a file only root can read
//! (mode 0600, the base64 text `wg genkey` writes), created once and kept across restarts and
//! across disabling, so a node's public key changes only when its file is removed.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519::{PublicKey, StaticSecret};

/// The key file's name inside the agent's state directory.
pub const KEY_FILE: &str = "wireguard.key";

/// A private key and the public key derived from it.
pub struct KeyPair {
    secret: [u8; 32],
    public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("KeyPair")
            .field("public", &self.public_base64())
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A key pair from 32 private bytes, clamped as Curve25519 scalars are (as `wg genkey`).
    pub fn from_secret(mut secret: [u8; 32]) -> KeyPair {
        secret[0] &= 248;
        secret[31] &= 127;
        secret[31] |= 64;
        let public = PublicKey::from(&StaticSecret::from(secret)).to_bytes();
        KeyPair { secret, public }
    }

    /// The public key as Calico publishes it (`status.wireguardPublicKey`): 44 characters of
    /// standard base64.
    pub fn public_base64(&self) -> String {
        STANDARD.encode(self.public)
    }

    /// The private key in hex, as the configuration protocol (UAPI) wants it.
    pub fn secret_hex(&self) -> String {
        hex(&self.secret)
    }

    /// The private key's bytes, as the kernel's netlink interface wants it.
    pub fn secret(&self) -> [u8; 32] {
        self.secret
    }

    fn secret_base64(&self) -> String {
        STANDARD.encode(self.secret)
    }
}

/// 32 bytes in lower-case hex (UAPI spells keys that way).
pub fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A base64 WireGuard key (as published on a Node) in hex, or `None` if it is not one.
pub fn base64_to_hex(key: &str) -> Option<String> {
    Some(hex(&base64_to_bytes(key)?))
}

/// A base64 WireGuard key (as published on a Node) as its 32 bytes, or `None` if it is not one.
pub fn base64_to_bytes(key: &str) -> Option<[u8; 32]> {
    STANDARD.decode(key.trim()).ok()?.try_into().ok()
}

/// The default state directory of `node`'s agent.
pub fn default_state_dir(node: &str) -> PathBuf {
    Path::new("/var/lib/margay").join(node)
}

/// Reads the key in `dir`, or creates one there (the directory too, mode 0700). A key file that
/// others can read is tightened to 0600 with a warning; one that is not a key is an error (it is
/// never overwritten: it may be the only copy of a key someone wants).
pub fn load_or_create(dir: &Path) -> Result<(KeyPair, bool)> {
    let path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bytes: [u8; 32] = STANDARD
                .decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .with_context(|| {
                    format!(
                        "{} is not a WireGuard private key (32 bytes of base64); remove it to make a new one",
                        path.display()
                    )
                })?;
            let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "the WireGuard key was readable by others; setting mode 0600");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
            Ok((KeyPair::from_secret(bytes), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pair = KeyPair::from_secret(random_secret()?);
            write_new(&path, &pair)?;
            Ok((pair, true))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn random_secret() -> Result<[u8; 32]> {
    let mut secret = [0u8; 32];
    let mut urandom = std::fs::File::open("/dev/urandom").context("cannot open /dev/urandom")?;
    std::io::Read::read_exact(&mut urandom, &mut secret).context("cannot read /dev/urandom")?;
    if secret == [0u8; 32] {
        bail!("/dev/urandom returned zeros");
    }
    Ok(secret)
}

/// Writes the key to a temporary file created with mode 0600 (never readable by others, not
/// even for a moment), then renames it into place.
fn write_new(path: &Path, pair: &KeyPair) -> Result<()> {
    let dir = path.parent().context("the key path has no directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("key.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    writeln!(file, "{}", pair.secret_base64())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_matches_the_rfc7748_vector() {
        // RFC 7748 section 6.1: Alice's private key and public key.
        let secret: [u8; 32] =
            decode_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let pair = KeyPair::from_secret(secret);
        assert_eq!(
            hex(&pair.public),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        let b64 = pair.public_base64();
        assert_eq!(b64.len(), 44);
        assert_eq!(
            base64_to_hex(&b64).as_deref(),
            Some(hex(&pair.public).as_str())
        );
        assert!(!format!("{pair:?}").contains(&pair.secret_hex()));
    }

    #[test]
    fn key_file_is_0600_and_kept_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("node-1");
        let (first, created) = load_or_create(&state).unwrap();
        assert!(created);
        let mode = std::fs::metadata(state.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (second, created) = load_or_create(&state).unwrap();
        assert!(!created);
        assert_eq!(first.public_base64(), second.public_base64());

        // Loosened by hand: tightened again, key kept.
        std::fs::set_permissions(state.join(KEY_FILE), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let (third, _) = load_or_create(&state).unwrap();
        assert_eq!(third.public_base64(), first.public_base64());
        let mode = std::fs::metadata(state.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // Garbage is refused, not replaced.
        std::fs::write(state.join(KEY_FILE), "not a key\n").unwrap();
        let err = load_or_create(&state).unwrap_err().to_string();
        assert!(err.contains("is not a WireGuard private key"), "{err}");
        assert_eq!(
            std::fs::read_to_string(state.join(KEY_FILE)).unwrap(),
            "not a key\n"
        );
    }

    fn decode_hex(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
