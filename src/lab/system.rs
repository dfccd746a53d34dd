//! Controller-side system helpers: running commands with a timeout, checking and signalling
//! the processes the lab started, and overlay mounts.

use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::error::LabError;

/// Programs the lab runs on the controller, with the Debian package that ships each.
const REQUIRED_TOOLS: &[(&str, &str)] = &[
    ("systemd-nspawn", "systemd-container"),
    ("debootstrap", "debootstrap"),
    ("ip", "iproute2"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    ("chroot", "coreutils"),
];

/// Maximum number of stderr lines quoted in a failed command's error.
const MAX_DETAIL_LINES: usize = 8;

/// Returns an error unless the process runs as root.
pub(crate) fn require_root() -> Result<(), LabError> {
    // SAFETY: geteuid takes no arguments, and POSIX defines no error for it.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LabError::NotRoot);
    }
    Ok(())
}

/// Returns an error naming the first controller program that is not in PATH, with its package.
pub(crate) fn require_tools() -> Result<(), LabError> {
    for &(program, package) in REQUIRED_TOOLS {
        if find_in_path(program).is_none() {
            return Err(LabError::MissingTool { program, package });
        }
    }
    Ok(())
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Formats a command as a shell-like line for messages.
pub(crate) fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    for arg in command.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            words.push(format!("'{arg}'"));
        } else {
            words.push(arg.into_owned());
        }
    }
    words.join(" ")
}

/// Runs a command and returns its stdout.
///
/// stdin is /dev/null. When the timeout passes, the process is killed. A non-zero exit
/// becomes `LabError::CommandFailed` with the last lines of stderr.
pub(crate) fn run(command: &mut Command, timeout: Duration) -> Result<String, LabError> {
    let output = run_unchecked(command, timeout)?;
    if !output.status.success() {
        return Err(command_failed(command, &output));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs a command like [`run`] but returns its output whatever the exit status.
pub(crate) fn run_unchecked(command: &mut Command, timeout: Duration) -> Result<Output, LabError> {
    let description = describe(command);
    tracing::debug!(command = %description, "running");

    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            command: description.clone(),
            source,
        })?;
    let pid = child.id();

    // The waiting thread owns the child, so this thread can give up on it after the timeout.
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });

    match receiver.recv_timeout(timeout) {
        Ok(result) => result.map_err(|source| LabError::Spawn {
            command: description,
            source,
        }),
        Err(_) => {
            // The child is not reaped before the waiting thread returns, so the pid still
            // belongs to it.
            signal_process(pid, libc::SIGKILL);
            let _ = receiver.recv_timeout(Duration::from_secs(5));
            Err(LabError::CommandTimedOut {
                command: description,
                timeout,
            })
        }
    }
}

/// Builds the error for a command that exited unsuccessfully.
pub(crate) fn command_failed(command: &Command, output: &Output) -> LabError {
    LabError::CommandFailed {
        command: describe(command),
        status: output.status.to_string(),
        detail: last_lines(&String::from_utf8_lossy(&output.stderr), MAX_DETAIL_LINES),
    }
}

pub(crate) use crate::ssh::last_lines;

/// Sends `signal` to one process.
pub(crate) fn signal_process(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), and its
/// state letter. Together with the pid, the start time identifies a process even after the
/// pid has been reused.
pub(crate) fn process_start_time(pid: u32) -> Option<(u64, char)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_process_stat(&stat)
}

/// Parses the state and start time out of the text of /proc/PID/stat.
fn parse_process_stat(stat: &str) -> Option<(u64, char)> {
    // The command name in field 2 may contain spaces and parentheses, so fields are counted
    // from the last closing parenthesis. Field 3 (the state) is the first one after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some((start_time, state))
}

/// Tells whether the process `pid` that started at `start_time` still runs (a zombie does not).
pub(crate) fn is_process_running(pid: u32, start_time: u64) -> bool {
    match process_start_time(pid) {
        Some((actual, state)) => actual == start_time && state != 'Z' && state != 'X',
        None => false,
    }
}

/// Lists every process as its id and its directory under /proc.
fn process_dirs() -> Vec<(u32, std::path::PathBuf)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((pid, entry.path()))
        })
        .collect()
}

/// Lists the processes whose root directory is at or below `dir`, or that have an argument
/// naming a path at or below it, such as debootstrap and its downloads into a new root.
pub(crate) fn processes_using(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for (pid, proc_dir) in process_dirs() {
        let rooted = fs::read_link(proc_dir.join("root")).is_ok_and(|root| root.starts_with(dir));
        let cmdline = fs::read(proc_dir.join("cmdline")).unwrap_or_default();
        let names_dir = cmdline
            .split(|byte| *byte == 0)
            .any(|arg| Path::new(OsStr::from_bytes(arg)).starts_with(dir));
        if rooted || names_dir {
            pids.push(pid);
        }
    }
    pids
}

/// Lists the processes that run in the network namespace bound at `netns_path` and in
/// another PID namespace than this process: the processes of a container that uses it.
///
/// The root directory cannot tell these apart, because /proc/PID/root of a process in
/// another mount namespace reads as `/`.
pub(crate) fn container_processes_in_netns(netns_path: &Path) -> Vec<u32> {
    let Some(netns) = namespace_id(netns_path) else {
        return Vec::new();
    };
    let own_pid_namespace = namespace_id(Path::new("/proc/self/ns/pid"));
    let mut pids = Vec::new();
    for (pid, proc_dir) in process_dirs() {
        let in_netns = namespace_id(&proc_dir.join("ns/net")) == Some(netns);
        if in_netns && namespace_id(&proc_dir.join("ns/pid")) != own_pid_namespace {
            pids.push(pid);
        }
    }
    pids
}

/// Device and inode of a namespace file, which identify the namespace.
fn namespace_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;

    let metadata = fs::metadata(path).ok()?;
    Some((metadata.dev(), metadata.ino()))
}

/// Stops the processes that `find` lists: SIGTERM first, then SIGKILL for those left after
/// `grace` (SIGKILL at once when `grace` is zero). Returns the pids that still run 5 s later.
pub(crate) fn stop_processes(find: impl Fn() -> Vec<u32>, grace: Duration) -> Vec<u32> {
    let pids = find();
    if pids.is_empty() {
        return pids;
    }
    if !grace.is_zero() {
        for &pid in &pids {
            signal_process(pid, libc::SIGTERM);
        }
        if wait_until(grace, || find().is_empty()) {
            return Vec::new();
        }
    }
    for pid in find() {
        signal_process(pid, libc::SIGKILL);
    }
    wait_until(Duration::from_secs(5), || find().is_empty());
    find()
}

/// Stops the processes that [`processes_using`] lists, as [`stop_processes`] does.
pub(crate) fn stop_processes_using(dir: &Path, grace: Duration) -> Vec<u32> {
    stop_processes(|| processes_using(dir), grace)
}

/// Polls `done` every 50 ms until it returns true or `timeout` passes. Returns whether it did.
pub(crate) fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Lists the mount points at or below `path`, deepest first, from /proc/self/mountinfo.
pub(crate) fn mount_points_under(path: &Path) -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = parse_mount_points(&mountinfo)
        .into_iter()
        .filter(|point| point.starts_with(path))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    points.dedup();
    points
}

/// Extracts the mount point (field 5) of every line of a mountinfo file.
fn parse_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .collect()
}

/// Decodes the octal escapes (`\040` for a space) that mountinfo uses in paths.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let is_escape = bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|digit| (b'0'..=b'7').contains(digit));
        if is_escape {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |value, digit| value * 8 + u32::from(digit - b'0'));
            decoded.push(value as u8);
            i += 4;
            continue;
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

pub(crate) fn is_mount_point(path: &Path) -> bool {
    mount_points_under(path).iter().any(|point| point == path)
}

/// Mounts an overlay file system on `target` with one read-only `lower` layer.
pub(crate) fn mount_overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    target: &Path,
) -> io::Result<()> {
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let source = CString::new("overlay")?;
    let fstype = CString::new("overlay")?;
    let target = path_to_cstring(target)?;
    let data = CString::new(options)?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let result = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmounts `path`, retrying for up to 5 s while it is busy. A path that is not a mount point
/// is left alone.
pub(crate) fn unmount(path: &Path) -> Result<(), LabError> {
    let target = path_to_cstring(path).map_err(|source| LabError::Unmount {
        path: path.to_owned(),
        source,
    })?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // SAFETY: target is a valid NUL-terminated string that outlives the call.
        if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOENT) => return Ok(()),
            Some(libc::EBUSY) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(100))
            }
            _ => {
                return Err(LabError::Unmount {
                    path: path.to_owned(),
                    source: error,
                })
            }
        }
    }
}

/// Removes a directory tree after unmounting everything mounted below it, so that removal
/// never reaches into a mounted file system.
pub(crate) fn remove_tree(path: &Path) -> Result<(), LabError> {
    if !path.exists() {
        return Ok(());
    }
    for point in mount_points_under(path) {
        unmount(&point)?;
    }
    fs::remove_dir_all(path).map_err(LabError::io("remove", path))
}

fn path_to_cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Writes `contents` to a new file beside `path`, then renames it over `path`, so readers
/// see either the old or the new file, never a partial one.
pub(crate) fn write_file_atomically(
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), LabError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let mut temporary_name = path.file_name().unwrap_or(OsStr::new("file")).to_owned();
    temporary_name.push(".new");
    let temporary = path.with_file_name(temporary_name);

    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .map_err(LabError::io("create", &temporary))?;
    file.write_all(contents)
        .map_err(LabError::io("write", &temporary))?;
    // The mode given to open() is reduced by the umask, so set it explicitly.
    fs::set_permissions(
        &temporary,
        std::os::unix::fs::PermissionsExt::from_mode(mode),
    )
    .map_err(LabError::io("set the mode of", &temporary))?;
    fs::rename(&temporary, path).map_err(LabError::io("rename into place", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_stat_with_spaces_in_name() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 12345 67";
        assert_eq!(parse_process_stat(stat), Some((987654, 'S')));
    }

    #[test]
    fn process_stat_truncated() {
        assert_eq!(parse_process_stat("4242 (sh) S 1 2"), None);
    }

    #[test]
    fn mountinfo_points_unescaped() {
        let mountinfo = "\
36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw
37 35 0:40 / /var/lib/lab/hosts/web/root rw shared:2 - overlay overlay rw,lowerdir=/a
";
        assert_eq!(
            parse_mount_points(mountinfo),
            vec![
                PathBuf::from("/mnt/with space"),
                PathBuf::from("/var/lib/lab/hosts/web/root")
            ]
        );
    }

    #[test]
    fn last_lines_skips_blank() {
        assert_eq!(last_lines("a\n\nb\n c \n", 2), "b; c");
        assert_eq!(last_lines("", 2), "");
    }
}
