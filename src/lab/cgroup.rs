//! One cgroup per lab host, made before its container starts.
//!
//! With `--keep-unit`, systemd-nspawn runs the container in the cgroup it was started in. If
//! every container started in the same cgroup, their systemd instances would all create and
//! remove `system.slice/...` in one shared tree, and units fail at random with status
//! 219/CGROUP. So each systemd-nspawn process first moves itself into `yametee-lab/HOST` of
//! every cgroup hierarchy that tracks processes.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::LabError;
use super::system;

/// Hierarchies a container's systemd may track processes in: the cgroup v2 tree (at the top
/// on a unified system, under `unified` on a hybrid one) and the v1 `name=systemd` tree.
const HIERARCHY_CANDIDATES: &[&str] = &[
    "/sys/fs/cgroup",
    "/sys/fs/cgroup/unified",
    "/sys/fs/cgroup/systemd",
];

/// Parent cgroup of all lab hosts in each hierarchy.
const LAB_CGROUP: &str = "yametee-lab";

/// The `cgroup.procs` files of one host's cgroups, ready to be written after fork().
pub(crate) struct HostCgroups {
    procs_files: Vec<CString>,
}

/// Creates the host's cgroup in every hierarchy that exists here.
pub(crate) fn create_host_cgroups(host_name: &str) -> Result<HostCgroups, LabError> {
    let mut procs_files = Vec::new();
    for dir in host_cgroup_dirs(host_name) {
        fs::create_dir_all(&dir).map_err(LabError::io("create the cgroup", &dir))?;
        let procs = dir.join("cgroup.procs");
        let procs = CString::new(procs.as_os_str().as_bytes()).map_err(|_| LabError::Io {
            action: "name",
            path: procs.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
        })?;
        procs_files.push(procs);
    }
    Ok(HostCgroups { procs_files })
}

impl HostCgroups {
    /// Moves the calling process into the host's cgroups by writing "0" to each
    /// `cgroup.procs`. It only makes system calls, so it may run between fork() and exec().
    pub fn join(&self) -> io::Result<()> {
        for procs in &self.procs_files {
            // SAFETY: `procs` is a valid NUL-terminated path and the buffer outlives the calls;
            // open, write and close are async-signal-safe.
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
            }
        }
        Ok(())
    }
}

/// Removes the host's cgroups, waiting up to 5 s for their last processes to be gone.
/// Returns the directories that could not be removed.
pub(crate) fn remove_host_cgroups(host_name: &str) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for dir in host_cgroup_dirs(host_name) {
        let removed =
            system::wait_until(Duration::from_secs(5), || remove_cgroup_tree(&dir).is_ok());
        if !removed {
            left.push(dir);
        }
    }
    left
}

/// Removes the lab's parent cgroup in every hierarchy, with whatever host cgroups are left in
/// it. Returns the directories that could not be removed.
pub(crate) fn remove_lab_cgroups() -> Vec<PathBuf> {
    hierarchies()
        .map(|root| root.join(LAB_CGROUP))
        .filter(|dir| remove_cgroup_tree(dir).is_err())
        .collect()
}

/// Removes a cgroup and its children, deepest first. A cgroup directory is removed with
/// rmdir(2) even though it lists files, and fails while a process is in it.
fn remove_cgroup_tree(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

fn host_cgroup_dirs(host_name: &str) -> Vec<PathBuf> {
    hierarchies()
        .map(|root| root.join(LAB_CGROUP).join(host_name))
        .collect()
}

/// Lists the candidate hierarchies that are mounted here, recognised by their `cgroup.procs`.
fn hierarchies() -> impl Iterator<Item = &'static Path> {
    HIERARCHY_CANDIDATES
        .iter()
        .map(Path::new)
        .filter(|root| root.join("cgroup.procs").is_file())
}
