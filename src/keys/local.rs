//! The local keystore: a directory of 256-bit KEKs, one file per key id.
//!
//! Files are created 0600 in a 0700 directory and synced (file, then directory) before the
//! key id is returned, so a header never names a key that a crash could lose. Key files or
//! directories that group or others can access are rejected.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use zeroize::Zeroizing;

use super::{Health, KeyError, KeyProvider, WrappedKey};
use crate::crypto::{self, Kek, VolumeKey, KEK_LEN};
use crate::volume::WrapAlgorithm;

/// A keystore directory on the local file system.
#[derive(Debug)]
pub struct LocalKeystore {
    name: String,
    dir: PathBuf,
}

impl LocalKeystore {
    /// Opens (without touching the disk yet) the keystore at `dir` under provider `name`.
    pub fn new(name: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        LocalKeystore { name: name.into(), dir: dir.into() }
    }

    /// The keystore directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns the default directory: `/var/lib/nbdcrypt/keys` for root, else
    /// `$XDG_DATA_HOME/nbdcrypt/keys`, else `$HOME/.local/share/nbdcrypt/keys`, with the home
    /// directory from the password database when `HOME` is unset. Relative values of the
    /// variables are ignored, as the XDG base directory specification requires, so the
    /// only copy of a key never lands below the current directory.
    #[allow(unsafe_code)]
    pub fn default_dir() -> Result<PathBuf, KeyError> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if uid == 0 {
            return Ok(PathBuf::from("/var/lib/nbdcrypt/keys"));
        }
        let absolute =
            |name: &str| std::env::var_os(name).map(PathBuf::from).filter(|path| path.is_absolute());
        if let Some(data) = absolute("XDG_DATA_HOME") {
            return Ok(data.join("nbdcrypt/keys"));
        }
        match absolute("HOME").or_else(|| home_from_passwd(uid)) {
            Some(home) => Ok(home.join(".local/share/nbdcrypt/keys")),
            None => Err(KeyError::Keystore {
                path: String::new(),
                reason: format!("no home directory is known for user {uid}; give --keystore DIR"),
            }),
        }
    }

    fn key_path(&self, key_id: &str) -> Result<PathBuf, KeyError> {
        if !is_valid_key_id(key_id) {
            return Err(KeyError::InvalidKeyId(key_id.to_string()));
        }
        Ok(self.dir.join(key_id))
    }

    fn keystore_error(&self, reason: impl Into<String>) -> KeyError {
        KeyError::Keystore { path: self.dir.display().to_string(), reason: reason.into() }
    }

    fn ensure_dir(&self) -> Result<(), KeyError> {
        if !self.dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(|e| self.keystore_error(format!("creating the directory failed: {e}")))?;
            if let Some(parent) = self.dir.parent() {
                sync_dir(parent)
                    .map_err(|e| self.keystore_error(format!("syncing the parent directory failed: {e}")))?;
            }
        }
        self.check_dir_permissions()
    }

    fn check_dir_permissions(&self) -> Result<(), KeyError> {
        let meta = fs::metadata(&self.dir)
            .map_err(|e| self.keystore_error(format!("cannot read the directory: {e}")))?;
        if !meta.is_dir() {
            return Err(self.keystore_error("is not a directory"));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(self.keystore_error(format!(
                "directory mode is {:o}; group and others must have no access (run: chmod 700 {})",
                meta.mode() & 0o777,
                self.dir.display()
            )));
        }
        Ok(())
    }

    fn store_kek(&self, key_id: &str, kek: &Kek) -> Result<(), KeyError> {
        self.ensure_dir()?;
        let path = self.key_path(key_id)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| self.keystore_error(format!("creating key file {key_id} failed: {e}")))?;
        file.write_all(kek.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| self.keystore_error(format!("writing key file {key_id} failed: {e}")))?;
        sync_dir(&self.dir).map_err(|e| self.keystore_error(format!("syncing the directory failed: {e}")))?;
        Ok(())
    }

    fn load_kek(&self, key_id: &str) -> Result<Kek, KeyError> {
        let path = self.key_path(key_id)?;
        self.check_dir_permissions()?;
        let mut file =
            File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(&path).map_err(|e| {
                match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        KeyError::KeyNotFound { provider: self.name.clone(), key_id: key_id.to_string() }
                    }
                    _ => self.keystore_error(format!("opening key file {key_id} failed: {e}")),
                }
            })?;
        let meta = file.metadata().map_err(|e| self.keystore_error(format!("key file {key_id}: {e}")))?;
        if !meta.is_file() {
            return Err(self.keystore_error(format!("key file {key_id} is not a regular file")));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(self.keystore_error(format!(
                "key file {key_id} has mode {:o}; it must be readable by its owner only (chmod 600)",
                meta.mode() & 0o777
            )));
        }
        if meta.len() != KEK_LEN as u64 {
            return Err(self
                .keystore_error(format!("key file {key_id} has {} bytes, expected {KEK_LEN}", meta.len())));
        }
        let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
        file.read_exact(bytes.as_mut_slice())
            .map_err(|e| self.keystore_error(format!("reading key file {key_id} failed: {e}")))?;
        Ok(Kek::from_bytes(bytes.as_slice())?)
    }
}

#[async_trait]
impl KeyProvider for LocalKeystore {
    fn name(&self) -> &str {
        &self.name
    }

    async fn create_key(&self, _volume_uuid: &str) -> Result<String, KeyError> {
        // Random ids rather than the volume UUID: a volume may be re-keyed, and clones share a
        // KEK, so a key id names a key, not a volume.
        let key_id = uuid::Uuid::new_v4().simple().to_string();
        let kek = Kek::generate()?;
        self.store_kek(&key_id, &kek)?;
        Ok(key_id)
    }

    async fn wrap_volume_key(&self, key_id: &str, key: &VolumeKey) -> Result<WrappedKey, KeyError> {
        let kek = self.load_kek(key_id)?;
        let bytes = crypto::wrap_volume_key(&kek, key)?;
        Ok(WrappedKey { alg: WrapAlgorithm::AesKw, bytes: Zeroizing::new(bytes) })
    }

    async fn unwrap_volume_key(&self, key_id: &str, wrapped: &WrappedKey) -> Result<VolumeKey, KeyError> {
        if wrapped.alg != WrapAlgorithm::AesKw {
            return Err(KeyError::UnsupportedWrap { provider: self.name.clone(), alg: wrapped.alg.as_str() });
        }
        let kek = self.load_kek(key_id)?;
        Ok(crypto::unwrap_volume_key(&kek, &wrapped.bytes)?)
    }

    async fn health(&self) -> Health {
        match self.check_dir_permissions() {
            Ok(()) => Health::Available,
            Err(e) => Health::Unavailable(e.to_string()),
        }
    }
}

/// Returns the absolute home directory of `uid` from the password database.
#[allow(unsafe_code)]
fn home_from_passwd(uid: libc::uid_t) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: an all-zero `passwd` (null pointers, zero ids) is a valid value of this C struct.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes only into `entry` and `buffer`, whose sizes it is given. It
    // sets `result` to null or to `&mut entry`, and the strings it stores point into `buffer`.
    let rc = unsafe { libc::getpwuid_r(uid, &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut result) };
    if rc != 0 || result.is_null() || entry.pw_dir.is_null() {
        return None;
    }
    // SAFETY: on success `pw_dir` is a NUL-terminated string inside `buffer`, alive here.
    let dir = unsafe { std::ffi::CStr::from_ptr(entry.pw_dir) };
    let dir = PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes()));
    dir.is_absolute().then_some(dir)
}

/// Key ids become file names, so only a safe character set is accepted: no path separators,
/// no leading dot (which also excludes "." and "..").
pub fn is_valid_key_id(key_id: &str) -> bool {
    !key_id.is_empty()
        && key_id.len() <= 128
        && !key_id.starts_with('.')
        && key_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().build().unwrap()
    }

    #[test]
    fn create_wrap_unwrap_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalKeystore::new("local", dir.path().join("keys"));
        runtime().block_on(async {
            let id = store.create_key("uuid").await.unwrap();
            let key = VolumeKey::generate().unwrap();
            let wrapped = store.wrap_volume_key(&id, &key).await.unwrap();
            let back = store.unwrap_volume_key(&id, &wrapped).await.unwrap();
            assert_eq!(back.as_bytes(), key.as_bytes());
        });
        let dir_mode = fs::metadata(dir.path().join("keys")).unwrap().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
    }

    #[test]
    fn key_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalKeystore::new("local", dir.path().join("keys"));
        let id = runtime().block_on(store.create_key("uuid")).unwrap();
        let path = dir.path().join("keys").join(&id);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let key = VolumeKey::generate().unwrap();
        let err = runtime().block_on(store.wrap_volume_key(&id, &key)).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn path_traversal_key_ids_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalKeystore::new("local", dir.path());
        for bad in ["../x", "/etc/passwd", "..", ".", "a/b", "", "a\0b"] {
            assert!(matches!(store.key_path(bad), Err(KeyError::InvalidKeyId(_))), "{bad:?}");
        }
        assert!(store.key_path("0123abcd-ef.key_1").is_ok());
    }

    #[test]
    fn missing_key_is_reported_by_id() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let store = LocalKeystore::new("local", dir.path());
        let err = store.load_kek("nope").unwrap_err();
        assert!(matches!(err, KeyError::KeyNotFound { ref key_id, .. } if key_id == "nope"));
    }
}
