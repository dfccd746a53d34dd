//! The base root file system that every lab host's overlay sits on: a minimal Debian built
//! once with debootstrap from the mirror of the controller's own apt sources, then cached.
//!
//! The cache directory's name carries a hash of the suite, the package list and the build
//! steps, so changing any of them builds a new image instead of reusing a stale one. A build
//! goes to a `.partial` directory first and is renamed into place only when complete.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::error::LabError;
use super::state::LabLock;
use super::system::{self, remove_tree, stop_processes_using};

/// Debian release of the lab hosts.
pub(crate) const SUITE: &str = "bookworm";

/// Packages installed on top of the minbase variant. Redis and PostgreSQL are installed on
/// every host but disabled, because `apply` enables them on the hosts of their role.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "ufw",
    "iptables",
    "sudo",
    "redis-server",
    "redis-tools",
    "postgresql",
    "postgresql-client",
    "iproute2",
    "procps",
    "ca-certificates",
];

/// Services that package installation enables and that the base must leave disabled.
const DISABLED_SERVICES: &[&str] = &["redis-server.service", "postgresql.service"];

/// Version of the steps in [`finish_base`]. It is part of the cache hash, so bump it when they
/// change.
const BUILD_STEPS_VERSION: u32 = 1;

/// Maximum time for debootstrap, which downloads about 190 packages.
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Maximum time for one command run inside the new root with chroot.
const CHROOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Returns the cached base image, building it first when it is missing.
pub(crate) fn ensure_base_image(cache_dir: &Path) -> Result<PathBuf, LabError> {
    let image = cache_dir.join(base_image_name());
    if image.is_dir() {
        return Ok(image);
    }

    fs::create_dir_all(cache_dir).map_err(LabError::io("create", cache_dir))?;
    // Two lab state directories may share one cache, so the build has its own lock.
    let _lock = LabLock::acquire(&cache_dir.join("build.lock"))?;
    if image.is_dir() {
        return Ok(image);
    }

    let partial = cache_dir.join(format!("{}.partial", base_image_name()));
    remove_partial_build(&partial)?;

    let mirror = find_mirror_in_apt_sources()?;
    let log = cache_dir.join(format!("{}.log", base_image_name()));
    eprintln!(
        "lab: building the {SUITE} base image in {} (about a minute; log {})",
        image.display(),
        log.display()
    );
    let started = Instant::now();

    let built = run_debootstrap(&mirror, &partial, &log).and_then(|()| finish_base(&partial));
    if let Err(error) = built {
        // The partial tree is about 750 MB; the log stays for the diagnosis.
        if let Err(cleanup_error) = remove_partial_build(&partial) {
            eprintln!("lab: {cleanup_error}");
        }
        return Err(error);
    }
    fs::rename(&partial, &image).map_err(LabError::io("rename into place", &image))?;

    eprintln!(
        "lab: base image built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(image)
}

/// Name of the cache directory of the current recipe, such as `base-bookworm-1a2b3c4d5e6f`.
pub(crate) fn base_image_name() -> String {
    let mut hasher = Sha256::new();
    hasher.update(SUITE.as_bytes());
    let mut packages = PACKAGES.to_vec();
    packages.sort_unstable();
    for package in packages {
        hasher.update(b"\n");
        hasher.update(package.as_bytes());
    }
    hasher.update(format!("\nsteps {BUILD_STEPS_VERSION}").as_bytes());
    let hash = hex::encode(hasher.finalize());
    format!("base-{SUITE}-{}", &hash[..12])
}

/// Removes what an interrupted build left: its processes, mounts and files. The caller holds
/// the build lock, so no build is using the directory.
fn remove_partial_build(partial: &Path) -> Result<(), LabError> {
    if !partial.exists() {
        return Ok(());
    }
    eprintln!("lab: removing the unfinished build {}", partial.display());
    let left = stop_processes_using(partial, Duration::from_secs(10));
    if !left.is_empty() {
        return Err(LabError::StrayProcesses {
            path: partial.to_owned(),
            pids: left,
        });
    }
    remove_tree(partial)
}

fn run_debootstrap(mirror: &str, target: &Path, log: &Path) -> Result<(), LabError> {
    let log_file = File::create(log).map_err(LabError::io("create", log))?;
    let log_err = log_file.try_clone().map_err(LabError::io("open", log))?;

    let mut command = Command::new("debootstrap");
    command
        .arg("--variant=minbase")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg("--components=main")
        .arg(SUITE)
        .arg(target)
        .arg(mirror);
    let description = system::describe(&command);
    tracing::debug!(command = %description, "running");

    command
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    // SAFETY: prctl is async-signal-safe and the closure allocates nothing.
    unsafe {
        command.pre_exec(|| {
            // debootstrap must not keep writing into the partial tree after the lab process
            // dies. On SIGTERM it unmounts what it mounted there.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| LabError::Spawn {
        command: description.clone(),
        source,
    })?;

    let deadline = Instant::now() + DEBOOTSTRAP_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Ok(None) => {
                // SIGTERM lets debootstrap unmount /proc and /sys from the partial tree. The
                // caller stops whatever is left.
                system::signal_process(child.id(), libc::SIGTERM);
                if !system::wait_until(Duration::from_secs(10), || {
                    child.try_wait().is_ok_and(|exit| exit.is_some())
                }) {
                    system::signal_process(child.id(), libc::SIGKILL);
                    let _ = child.wait();
                }
                return Err(LabError::CommandTimedOut {
                    command: description,
                    timeout: DEBOOTSTRAP_TIMEOUT,
                });
            }
            Err(source) => {
                return Err(LabError::Spawn {
                    command: description,
                    source,
                })
            }
        }
    };

    if !status.success() {
        let text = fs::read_to_string(log).unwrap_or_default();
        return Err(LabError::CommandFailed {
            command: description,
            status: status.to_string(),
            detail: format!(
                "{} (full log: {})",
                system::last_lines(&text, 5),
                log.display()
            ),
        });
    }
    Ok(())
}

/// Turns a fresh debootstrap tree into the lab's base image.
///
/// Role services are disabled. SSH host keys and the machine id are removed, so hosts share
/// neither. The name server and the apt sources are emptied, because the lab has no network.
/// No process started by a package's maintainer script is left running.
fn finish_base(root: &Path) -> Result<(), LabError> {
    let mut disable = Command::new("chroot");
    disable
        .arg(root)
        .args(["systemctl", "disable", "--quiet"])
        .args(DISABLED_SERVICES);
    system::run(&mut disable, CHROOT_TIMEOUT)?;

    // Each host gets its own host key when it is created, so it can be pinned.
    let ssh_dir = root.join("etc/ssh");
    for entry in fs::read_dir(&ssh_dir)
        .map_err(LabError::io("read", &ssh_dir))?
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            fs::remove_file(entry.path()).map_err(LabError::io("remove", entry.path()))?;
        }
    }

    // An empty machine id makes systemd generate one per boot; each host also gets its own.
    write(root, "etc/machine-id", "")?;
    let dbus_machine_id = root.join("var/lib/dbus/machine-id");
    if dbus_machine_id.exists() {
        fs::remove_file(&dbus_machine_id).map_err(LabError::io("remove", &dbus_machine_id))?;
    }

    // Without a name server, lookups fail at once instead of waiting for a timeout.
    write(
        root,
        "etc/resolv.conf",
        "# The lab has no name server: hosts are reached by address.\n",
    )?;

    // With no source, `apt-get update` succeeds offline. The package lists from the build stay,
    // so `apt-get install` of an installed package still finds its candidate version.
    write(
        root,
        "etc/apt/sources.list",
        "# The lab has no network: every package a host needs is in the base image.\n",
    )?;
    let archives = root.join("var/cache/apt/archives");
    for entry in fs::read_dir(&archives)
        .map_err(LabError::io("read", &archives))?
        .flatten()
    {
        if entry
            .path()
            .extension()
            .is_some_and(|extension| extension == "deb")
        {
            fs::remove_file(entry.path()).map_err(LabError::io("remove", entry.path()))?;
        }
    }

    let left = stop_processes_using(root, Duration::from_secs(5));
    if !left.is_empty() {
        return Err(LabError::StrayProcesses {
            path: root.to_owned(),
            pids: left,
        });
    }
    Ok(())
}

fn write(root: &Path, relative: &str, contents: &str) -> Result<(), LabError> {
    let path = root.join(relative);
    fs::write(&path, contents).map_err(LabError::io("write", path))
}

/// Files that list the controller's apt sources.
const SOURCES_LIST: &str = "/etc/apt/sources.list";
const SOURCES_DIR: &str = "/etc/apt/sources.list.d";

/// Finds the Debian mirror in the controller's apt sources: one-line `.list` files and deb822
/// `.sources` files.
fn find_mirror_in_apt_sources() -> Result<String, LabError> {
    let mut files = vec![PathBuf::from(SOURCES_LIST)];
    if let Ok(entries) = fs::read_dir(SOURCES_DIR) {
        let mut listed: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
        listed.sort();
        files.extend(listed);
    }

    let mut sources = Vec::new();
    for file in &files {
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        match file.extension().and_then(|extension| extension.to_str()) {
            Some("sources") => sources.extend(parse_deb822_sources(&text)),
            Some("list") => sources.extend(parse_one_line_sources(&text)),
            _ => {}
        }
    }

    choose_mirror(&sources, SUITE).ok_or_else(|| LabError::NoMirror {
        checked: format!("{SOURCES_LIST}, {SOURCES_DIR}/*.list, {SOURCES_DIR}/*.sources"),
    })
}

/// One `deb` source: a repository URI and the suites taken from it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AptSource {
    uri: String,
    suites: Vec<String>,
}

/// Parses the `deb` lines of a one-line-style sources file; `deb-src` and comments are skipped.
fn parse_one_line_sources(text: &str) -> Vec<AptSource> {
    let mut sources = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        else {
            continue;
        };
        let mut rest = rest.trim_start();
        // Options come first, in brackets: deb [arch=amd64 signed-by=...] URI suite components
        if rest.starts_with('[') {
            let Some(end) = rest.find(']') else {
                continue;
            };
            rest = rest[end + 1..].trim_start();
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            sources.push(AptSource {
                uri: uri.to_string(),
                suites: vec![suite.to_string()],
            });
        }
    }
    sources
}

/// Parses the stanzas of a deb822 `.sources` file whose `Types` include `deb` and that are
/// not disabled with `Enabled: no`. A stanza may list several URIs; each becomes a source.
fn parse_deb822_sources(text: &str) -> Vec<AptSource> {
    let mut sources = Vec::new();
    for stanza in split_deb822_stanzas(text) {
        let field = |name: &str| {
            stanza
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        };
        let words = |name: &str| -> Vec<String> {
            field(name)
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect()
        };

        let is_binary = words("Types").iter().any(|kind| kind == "deb");
        let is_enabled =
            field("Enabled").is_none_or(|value| !value.trim().eq_ignore_ascii_case("no"));
        if !is_binary || !is_enabled {
            continue;
        }
        let suites = words("Suites");
        for uri in words("URIs") {
            sources.push(AptSource {
                uri,
                suites: suites.clone(),
            });
        }
    }
    sources
}

/// Splits deb822 text into stanzas of (field, value) pairs. Continuation lines (starting with
/// a space or tab) extend the previous field's value; `#` lines are comments.
fn split_deb822_stanzas(text: &str) -> Vec<Vec<(String, String)>> {
    let mut stanzas = Vec::new();
    let mut current: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                stanzas.push(std::mem::take(&mut current));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some((_, value)) = current.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((key, value)) = line.split_once(':') {
            current.push((key.trim().to_string(), value.trim().to_string()));
        }
    }
    if !current.is_empty() {
        stanzas.push(current);
    }
    stanzas
}

/// Picks the URI of the first source that carries `suite` itself. Failing that, it takes the
/// first source of any plain release suite (no `-updates` or `-security` part), because a
/// Debian mirror carries every release: this covers a controller on another release.
fn choose_mirror(sources: &[AptSource], suite: &str) -> Option<String> {
    let carries = |source: &&AptSource, wanted: &dyn Fn(&str) -> bool| {
        source.suites.iter().any(|s| wanted(s))
    };
    sources
        .iter()
        .find(|source| carries(source, &|s| s == suite))
        .or_else(|| {
            sources
                .iter()
                .find(|source| carries(source, &|s| !s.contains(['-', '/'])))
        })
        .map(|source| source.uri.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "\
Types: deb
# a comment inside the stanza
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
";

    #[test]
    fn deb822_stanzas_parsed() {
        let sources = parse_deb822_sources(DEB822);
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[0].uri, "http://mirror.example/debian");
        assert_eq!(sources[0].suites, vec!["bookworm", "bookworm-updates"]);
        assert_eq!(sources[1].suites, vec!["bookworm-security"]);
    }

    #[test]
    fn deb822_skips_disabled_and_source_only() {
        let text = "\
Types: deb-src
URIs: http://source-only.example/debian
Suites: bookworm

Enabled: no
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm

Types: deb deb-src
URIs:
 http://first.example/debian
 http://second.example/debian
Suites: bookworm
";
        let uris: Vec<String> = parse_deb822_sources(text)
            .into_iter()
            .map(|source| source.uri)
            .collect();
        assert_eq!(
            uris,
            vec![
                "http://first.example/debian",
                "http://second.example/debian"
            ]
        );
    }

    #[test]
    fn one_line_sources_with_options() {
        let text = "\
# deb http://commented.example/debian bookworm main
deb-src http://source.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.example/debian bookworm main contrib
deb http://security.example/debian-security bookworm-security main # trailing comment
";
        let sources = parse_one_line_sources(text);
        assert_eq!(
            sources,
            vec![
                AptSource {
                    uri: "http://mirror.example/debian".into(),
                    suites: vec!["bookworm".into()],
                },
                AptSource {
                    uri: "http://security.example/debian-security".into(),
                    suites: vec!["bookworm-security".into()],
                },
            ]
        );
    }

    #[test]
    fn mirror_prefers_exact_suite() {
        let mut sources =
            parse_one_line_sources("deb http://security.example/ds bookworm-security main\n");
        sources.extend(parse_deb822_sources(DEB822));
        assert_eq!(
            choose_mirror(&sources, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn mirror_falls_back_to_other_release() {
        let sources = parse_one_line_sources(
            "deb http://security.example/ds trixie-security main\ndeb http://mirror.example/debian trixie main\n",
        );
        assert_eq!(
            choose_mirror(&sources, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn mirror_none_without_release_suite() {
        let sources =
            parse_one_line_sources("deb http://security.example/ds bookworm-security main\n");
        assert_eq!(choose_mirror(&sources, "bookworm"), None);
    }

    #[test]
    fn base_image_name_is_stable() {
        let name = base_image_name();
        assert!(name.starts_with("base-bookworm-"));
        assert_eq!(name.len(), "base-bookworm-".len() + 12);
        assert_eq!(name, base_image_name());
    }
}
