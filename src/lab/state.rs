//! The lab's file locations, the record of what it has created, the lock that keeps two lab
//! commands apart, and the generated secrets.
//!
//! The state file is written before each resource is created and after each is removed, so
//! `lab down` can find everything an interrupted `lab up` left behind.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};

use super::error::LabError;
use super::system::write_file_atomically;

/// Default lab state directory; the environment variable `YAMETEE_LAB_DIR` overrides it.
const DEFAULT_STATE_DIR: &str = "/var/lib/yametee-deploy/lab";

/// Default directory of the cached base images; `YAMETEE_LAB_CACHE` overrides it.
const DEFAULT_CACHE_DIR: &str = "/var/cache/yametee-deploy";

/// Length of a generated secret, in alphanumeric characters (about 190 bits).
const SECRET_LENGTH: usize = 32;

/// The lab's directories and the files in them.
#[derive(Debug, Clone)]
pub(crate) struct LabPaths {
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
}

impl LabPaths {
    /// Resolves the directories from `YAMETEE_LAB_DIR` and `YAMETEE_LAB_CACHE`, or the defaults.
    pub fn from_env() -> LabPaths {
        let from = |name: &str, default: &str| {
            std::env::var_os(name)
                .filter(|value| !value.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default))
        };
        LabPaths {
            state_dir: from("YAMETEE_LAB_DIR", DEFAULT_STATE_DIR),
            cache_dir: from("YAMETEE_LAB_CACHE", DEFAULT_CACHE_DIR),
        }
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }

    pub fn lock_file(&self) -> PathBuf {
        self.state_dir.join("lock")
    }

    /// Private key of the lab's SSH identity; the public key is beside it with `.pub`.
    pub fn identity_file(&self) -> PathBuf {
        self.state_dir.join("id_ed25519")
    }

    pub fn known_hosts_file(&self) -> PathBuf {
        self.state_dir.join("known_hosts")
    }

    pub fn secrets_file(&self) -> PathBuf {
        self.state_dir.join("secrets.json")
    }

    pub fn hosts_dir(&self) -> PathBuf {
        self.state_dir.join("hosts")
    }

    pub fn host_dir(&self, host_name: &str) -> PathBuf {
        self.hosts_dir().join(host_name)
    }

    /// Creates the state directory, readable by root only because it contains keys and secrets.
    pub fn create_state_dir(&self) -> Result<(), LabError> {
        use std::os::unix::fs::DirBuilderExt;

        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.state_dir)
            .map_err(LabError::io("create", &self.state_dir))
    }
}

/// Record of the resources the lab has created, stored as `state.json` in the state directory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct LabState {
    /// Base image that the host overlays use as their lower layer.
    pub base_image: Option<PathBuf>,
    /// Environment variable names of the inventory's secrets, as of the last `lab up`.
    pub secret_env_names: Vec<String>,
    pub hosts: Vec<HostRecord>,
}

/// One lab host as created: its inventory settings, its namespace and its running container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HostRecord {
    pub name: String,
    pub address: Ipv4Addr,
    pub ssh_port: u16,
    pub ssh_user: String,
    pub roles: Vec<String>,
    /// Network namespace the host's container runs in.
    pub netns: String,
    /// Name of the veth end in the control namespace, enslaved to the bridge.
    pub control_veth: String,
    /// Whether the overlay's upper layer has been fully written (user, keys, sshd port).
    pub prepared: bool,
    /// The host's SSH public key, as pinned in the lab's known_hosts file.
    pub host_public_key: Option<String>,
    /// The lab identity's public key installed for the SSH user when the host was prepared.
    pub authorized_key: Option<String>,
    /// The systemd-nspawn process and its start time, which guards against a reused pid.
    pub nspawn_pid: Option<u32>,
    pub nspawn_start_time: Option<u64>,
}

impl LabState {
    /// Reads the state file; returns `None` when there is none.
    pub fn load(paths: &LabPaths) -> Result<Option<LabState>, LabError> {
        let path = paths.state_file();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(LabError::io("read", path)(error)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| LabError::InvalidState { path, source })
    }

    pub fn save(&self, paths: &LabPaths) -> Result<(), LabError> {
        let text = serde_json::to_string_pretty(self).expect("the lab state serializes to JSON");
        write_file_atomically(&paths.state_file(), text.as_bytes(), 0o600)
    }

    pub fn host(&self, name: &str) -> Option<&HostRecord> {
        self.hosts.iter().find(|host| host.name == name)
    }

    pub fn host_mut(&mut self, name: &str) -> Option<&mut HostRecord> {
        self.hosts.iter_mut().find(|host| host.name == name)
    }
}

/// Exclusive lock on the state directory, held while a command changes the lab and released
/// when dropped (or when the process dies).
pub(crate) struct LabLock {
    _file: File,
}

impl LabLock {
    /// Takes the lock, or fails at once with `LabError::Locked` when another command holds it.
    pub fn acquire(path: &Path) -> Result<LabLock, LabError> {
        let file = File::create(path).map_err(LabError::io("create", path))?;
        // SAFETY: the descriptor belongs to `file`, which stays open while the lock is held.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(LabError::Locked {
                    path: path.to_owned(),
                });
            }
            return Err(LabError::io("lock", path)(error));
        }
        Ok(LabLock { _file: file })
    }
}

/// Generates a value for every secret name that has neither an environment variable nor a
/// stored value, and stores it in the secrets file (mode 0600). Values are kept across
/// `lab down`, so the lab's databases keep working with the same passwords.
pub(crate) fn ensure_secrets(paths: &LabPaths, names: &[String]) -> Result<(), LabError> {
    let mut stored = read_stored_secrets(paths)?;
    let mut changed = false;
    for name in names {
        let from_env = std::env::var_os(name).is_some_and(|value| !value.is_empty());
        if from_env || stored.contains_key(name) {
            continue;
        }
        stored.insert(name.clone(), generate_secret());
        changed = true;
    }
    if changed {
        let text = serde_json::to_string_pretty(&stored).expect("a string map serializes to JSON");
        write_file_atomically(&paths.secrets_file(), text.as_bytes(), 0o600)?;
    }
    Ok(())
}

/// Returns the value of each secret name: the environment variable when it is set, else the
/// value stored by `lab up`. Names with neither are left out.
pub(crate) fn resolve_secrets(
    paths: &LabPaths,
    names: &[String],
) -> Result<BTreeMap<String, String>, LabError> {
    let stored = read_stored_secrets(paths)?;
    let mut secrets = BTreeMap::new();
    for name in names {
        let from_env = std::env::var(name).ok().filter(|value| !value.is_empty());
        if let Some(value) = from_env.or_else(|| stored.get(name).cloned()) {
            secrets.insert(name.clone(), value);
        }
    }
    Ok(secrets)
}

fn read_stored_secrets(paths: &LabPaths) -> Result<BTreeMap<String, String>, LabError> {
    let path = paths.secrets_file();
    match fs::read_to_string(&path) {
        Ok(text) => {
            serde_json::from_str(&text).map_err(|source| LabError::InvalidState { path, source })
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(error) => Err(LabError::io("read", path)(error)),
    }
}

fn generate_secret() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), SECRET_LENGTH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temporary_paths() -> (tempfile::TempDir, LabPaths) {
        let dir = tempfile::tempdir().unwrap();
        let paths = LabPaths {
            state_dir: dir.path().join("state"),
            cache_dir: dir.path().join("cache"),
        };
        paths.create_state_dir().unwrap();
        (dir, paths)
    }

    #[test]
    fn secrets_generated_once_and_private() {
        use std::os::unix::fs::PermissionsExt;

        let (_dir, paths) = temporary_paths();
        let names = vec!["YTD_LAB_TEST_SECRET_UNSET".to_string()];

        ensure_secrets(&paths, &names).unwrap();
        let first = resolve_secrets(&paths, &names).unwrap();
        ensure_secrets(&paths, &names).unwrap();
        let second = resolve_secrets(&paths, &names).unwrap();

        let value = &first["YTD_LAB_TEST_SECRET_UNSET"];
        assert_eq!(value.len(), SECRET_LENGTH);
        assert!(value.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(first, second);
        let mode = fs::metadata(paths.secrets_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn secrets_from_env_not_stored() {
        let (_dir, paths) = temporary_paths();
        // PATH is set in every test environment, so it plays the part of a secret the user set.
        let names = vec!["PATH".to_string()];

        ensure_secrets(&paths, &names).unwrap();

        assert!(!paths.secrets_file().exists());
        let resolved = resolve_secrets(&paths, &names).unwrap();
        assert_eq!(resolved["PATH"], std::env::var("PATH").unwrap());
    }

    #[test]
    fn state_missing_loads_as_none() {
        let (_dir, paths) = temporary_paths();
        assert!(LabState::load(&paths).unwrap().is_none());
    }

    #[test]
    fn state_round_trips() {
        let (_dir, paths) = temporary_paths();
        let mut state = LabState::default();
        state.hosts.push(HostRecord {
            name: "web".into(),
            address: Ipv4Addr::new(192, 168, 120, 50),
            ssh_port: 22,
            ssh_user: "deploy".into(),
            roles: vec!["web".into()],
            netns: "ytd-h-web".into(),
            control_veth: "vh-web".into(),
            prepared: true,
            host_public_key: None,
            authorized_key: None,
            nspawn_pid: Some(42),
            nspawn_start_time: Some(7),
        });

        state.save(&paths).unwrap();
        let loaded = LabState::load(&paths).unwrap().unwrap();

        assert_eq!(loaded.hosts, state.hosts);
    }
}
