//! Command-line interface: flags and subcommands, and `run`, which carries one command out and
//! decides the exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::deploy::{error_chain, Deployment};
use crate::inventory::edit::{self, EditError, NewHost};
use crate::inventory::{Inventory, InventoryError, SecretRef};
use crate::lab::{self, LabContext, LabHost, LabSpec};
use crate::plan::WorkerBinary;
use crate::render::Renderer;
use crate::report::{self, Format};
use crate::secrets::Secrets;
use crate::ssh::SshOverrides;
use crate::verify::Verifier;

/// `print!` for results: a reader that stops early (`| head`) closes stdout, and the run
/// still ends with its own exit code instead of a panic on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `println!` for results; see [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

const EXIT_CODES: &str = "\
Exit codes:
  0  success: applied, all checks passed, or (plan --detailed-exitcode) in sync
  1  a check failed, an apply failed or was rolled back, or a host could not be reached;
     status: a worker is dead or Redis cannot be read
  2  usage error or invalid inventory
plan --detailed-exitcode: 0 in sync, 2 changes pending, 1 for every error, usage errors
included, so that 2 can only mean changes pending.";

/// Deploys the yametee web platform, Redis, PostgreSQL and background workers from an
/// inventory file, over SSH, and verifies the result.
#[derive(Debug, Parser)]
#[command(name = "yametee-deploy", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Inventory file describing the hosts.
    #[arg(
        short,
        long,
        global = true,
        default_value = "inventory.yaml",
        env = "YAMETEE_INVENTORY"
    )]
    pub inventory: PathBuf,

    /// Run against the local lab replica (`lab up`) instead of the real hosts: commands run in
    /// the lab's isolated network namespace with the lab's SSH key and pinned host keys.
    #[arg(long, global = true)]
    pub lab: bool,

    /// Only work on these hosts (comma-separated names from the inventory).
    #[arg(long, global = true, value_delimiter = ',', value_name = "HOSTS")]
    pub limit: Vec<String>,

    /// Output format of the results on stdout.
    #[arg(long, global = true, value_enum, default_value = "human")]
    pub format: Format,

    /// Maximum number of hosts worked on at once; the hosts of one tier run in parallel up to this bound.
    #[arg(long, global = true, default_value_t = crate::deploy::DEFAULT_PARALLEL_HOSTS as u16,
          value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallel: u16,

    /// Worker binary to install on worker hosts [default: yametee-worker next to this program].
    #[arg(
        long,
        global = true,
        env = "YAMETEE_WORKER_BINARY",
        value_name = "PATH"
    )]
    pub worker_binary: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Render every host's files offline, with secrets as placeholders; no SSH.
    Render {
        /// Write the files under DIR/<host>/<path> instead of printing them.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Connect and show, per host, what apply would change, with unified diffs.
    Plan {
        /// Exit 0 when every host is in sync, 2 when changes are pending, 1 on error.
        #[arg(long)]
        detailed_exitcode: bool,
    },
    /// Converge every host; restart only what changed; roll the worker back if it does not
    /// report ready.
    Apply {
        /// Maximum number of worker hosts restarting at once. The others keep consuming; each waits for
        /// the previous to report ready, and the rollout stops at the first that does not.
        #[arg(long, default_value_t = 1, value_name = "N",
              value_parser = clap::value_parser!(u16).range(1..))]
        max_unavailable: u16,
    },
    /// Run the verification suite: one result per check per host.
    Verify {
        /// Only run these checks: ids such as queue.depth, or prefixes such as worker or
        /// firewall (comma-separated or repeated). ssh.reachable always runs.
        #[arg(long = "check", value_delimiter = ',', value_name = "ID")]
        checks: Vec<String>,
        /// Seconds the end-to-end check waits for a worker to process its probe job.
        #[arg(long, default_value_t = 20, value_name = "SECS",
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        probe_timeout: u64,
    },
    /// Show the queue (waiting, in flight, retry, dead, the oldest waiting job), the
    /// processed and failed counts with their rates, each worker instance alive or dead and
    /// the end of each worker host's journal. Redis is read through a worker host's SSH
    /// connection. Exits 0 when every worker is alive, 1 when one is not, a worker host
    /// cannot be reached or Redis cannot be read.
    Status {
        /// Refresh until Ctrl-C: redrawn in place on a terminal, one block (or one JSON
        /// document per line with --format json) per refresh otherwise.
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 2, value_name = "SECS", requires = "watch",
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        interval: u64,
        /// Journal lines shown per worker host.
        #[arg(long, default_value_t = 5, value_name = "N",
              value_parser = clap::value_parser!(u64).range(0..=200))]
        lines: u64,
    },
    /// Enqueue jobs in the web platform's format.
    #[command(subcommand)]
    Job(JobCommand),
    /// Check, show or edit the inventory.
    #[command(subcommand)]
    Inventory(InventoryCommand),
    /// Local replica of the inventory's hosts in systemd-nspawn containers (needs root).
    #[command(subcommand)]
    Lab(LabCommand),
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Push one job onto the queue from the web host's network position (a worker host's
    /// when there is no web host), as the web platform does: RPUSH of
    /// {"id","type","data","createdAt"}. Prints the job id.
    Push {
        /// Job type: order:process, email:send, webhook:process, cache:warm or verify:probe.
        #[arg(value_name = "TYPE")]
        job_type: String,
        /// The job's data, a JSON object, such as '{"orderId":"test-order-123"}'.
        #[arg(value_name = "JSON", default_value = "{}")]
        data: String,
        /// Job id [default: generated from the type, the time and a random number].
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum InventoryCommand {
    /// Check the inventory and report every problem with its line and column.
    Check,
    /// Print the validated inventory with defaults filled in and secrets as references: a
    /// summary, or with --format json the whole model.
    Show,
    /// Append a host after the last host, in the style of the hosts already there, and print
    /// the diff. Comments and formatting elsewhere are kept.
    AddHost {
        /// Host name: lowercase letters, digits and '-'.
        name: String,
        /// IPv4 address the host is reached at.
        #[arg(long, value_name = "IP")]
        address: String,
        /// Role of the host: postgres, redis, worker or web (repeated or comma-separated).
        #[arg(
            long = "role",
            value_name = "ROLE",
            required = true,
            value_delimiter = ','
        )]
        roles: Vec<String>,
        /// SSH user, when it differs from defaults.ssh.user.
        #[arg(long, value_name = "USER")]
        ssh_user: Option<String>,
        /// SSH port, when it differs from defaults.ssh.port.
        #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        /// Print the diff without writing the file.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove a host with the comment lines directly above it, and print the diff.
    RemoveHost {
        /// Host name.
        name: String,
        /// Print the diff without writing the file.
        #[arg(long)]
        dry_run: bool,
    },
    /// Set one value, keeping a comment after it, and print the diff. A missing key is
    /// created under the mapping that contains it.
    Set {
        /// Dotted keys, such as app.worker.concurrency or hosts.worker.address.
        path: String,
        /// New value, read as a YAML scalar (quote it, as '"8"', to keep a string that looks
        /// like another type), or a flow list such as [worker,web] for roles.
        value: String,
        /// Print the diff without writing the file.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Boot one container per inventory host at the inventory's own address (idempotent).
    Up,
    /// Stop every lab host and remove its network, mounts and processes.
    Down,
    /// Show each lab host and whether it runs and accepts SSH connections.
    Status,
    /// Open an SSH session to a lab host, or run a command on it.
    Ssh {
        /// Inventory name of the host.
        host: String,
        /// Command to run instead of a login shell. One argument is a shell command line run by
        /// the host's shell; several are a program and its arguments, passed unchanged.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

/// Exit codes, decided in one place.
pub mod exit {
    pub const SUCCESS: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
}

/// An error that ends the command, with the exit code it maps to and an optional hint.
#[derive(Debug)]
pub struct Fatal {
    pub code: u8,
    pub message: String,
    pub hint: Option<String>,
}

impl Fatal {
    fn failure(message: impl Into<String>) -> Fatal {
        Fatal {
            code: exit::FAILURE,
            message: message.into(),
            hint: None,
        }
    }

    fn usage(message: impl Into<String>) -> Fatal {
        Fatal {
            code: exit::USAGE,
            message: message.into(),
            hint: None,
        }
    }

    fn hint(mut self, hint: impl Into<String>) -> Fatal {
        self.hint = Some(hint.into());
        self
    }
}

/// Work done before the async runtime starts. Entering the lab's network namespace must
/// happen while the process has one thread, so every later thread and ssh child inherits it.
pub fn prepare(cli: &Cli) -> Result<Option<LabContext>, Fatal> {
    let runs_remote = matches!(
        cli.command,
        Command::Plan { .. }
            | Command::Apply { .. }
            | Command::Verify { .. }
            | Command::Status { .. }
            | Command::Job(_)
    );
    if !cli.lab || !runs_remote {
        return Ok(None);
    }
    let context = lab::load_context().map_err(|error| Fatal::failure(error_chain(&error)))?;
    lab::enter_control_namespace(&context).map_err(|error| Fatal::failure(error_chain(&error)))?;
    Ok(Some(context))
}

pub async fn run(cli: Cli, lab_context: Option<LabContext>) -> Result<u8, Fatal> {
    match &cli.command {
        Command::Inventory(command) => inventory_command(&cli, command),
        Command::Render { out } => render(&cli, out.as_deref()),
        Command::Lab(command) => lab_command(&cli, command),
        Command::Plan { detailed_exitcode } => {
            let deployment = deployment(&cli, lab_context.as_ref(), true, None)?;
            let reports = deployment.plan().await;
            crate::progress::finish();
            out!("{}", report::plan(&reports, cli.format));
            let failed = reports.iter().any(|report| report.error.is_some());
            let pending = reports.iter().any(|report| !report.changes.is_empty());
            Ok(match (failed, pending, detailed_exitcode) {
                (true, _, _) => exit::FAILURE,
                (false, true, true) => exit::USAGE,
                _ => exit::SUCCESS,
            })
        }
        Command::Apply { max_unavailable } => {
            let deployment = deployment(&cli, lab_context.as_ref(), true, None)?;
            let reports = deployment.apply(usize::from(*max_unavailable)).await;
            crate::progress::finish();
            out!("{}", report::apply(&reports, cli.format));
            let ok = reports.iter().all(|report| report.outcome.is_success());
            Ok(if ok { exit::SUCCESS } else { exit::FAILURE })
        }
        Command::Status {
            watch,
            interval,
            lines,
        } => {
            if cli.format == Format::Junit {
                return Err(Fatal::usage(
                    "status has no junit format; use --format human or --format json",
                ));
            }
            let deployment = deployment(&cli, lab_context.as_ref(), false, Some(REDIS_ONLY))?;
            let output = crate::status::Output {
                format: cli.format,
                watch: watch.then(|| std::time::Duration::from_secs(*interval)),
            };
            status(&deployment, output, *lines as usize).await
        }
        Command::Job(JobCommand::Push { job_type, data, id }) => {
            let deployment = deployment(&cli, lab_context.as_ref(), false, Some(REDIS_ONLY))?;
            push_job(&cli, &deployment, job_type, data, id.as_deref()).await
        }
        Command::Verify {
            checks,
            probe_timeout,
        } => {
            let deployment = deployment(&cli, lab_context.as_ref(), false, None)?;
            // `--check a,` or `--check ''` leave empty names, which select nothing.
            let checks: &Vec<String> = &checks
                .iter()
                .map(|check| check.trim().to_string())
                .filter(|check| !check.is_empty())
                .collect();
            let verifier = Verifier {
                inventory: &deployment.inventory,
                secrets: &deployment.secrets,
                ssh: &deployment.ssh,
                worker: deployment.worker.as_ref(),
                renderer: &deployment.renderer,
                targets: &deployment.targets,
                only: checks,
                probe_timeout: std::time::Duration::from_secs(*probe_timeout),
            };
            let known = verifier.all_check_ids();
            let unknown: Vec<&String> = checks
                .iter()
                .filter(|pattern| {
                    !known
                        .iter()
                        .any(|id| crate::verify::check_selected(id, std::slice::from_ref(*pattern)))
                })
                .collect();
            if !unknown.is_empty() {
                return Err(Fatal::usage(format!(
                    "no check matches --check {}; the checks are: {}",
                    unknown
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    known.join(", ")
                )));
            }
            let report = verifier.run().await;
            out!("{}", report::verify(&report, cli.format));
            Ok(if report.ok {
                exit::SUCCESS
            } else {
                exit::FAILURE
            })
        }
    }
}

/// Loads the whole inventory and the names of the hosts selected by `--limit`.
fn load_inventory(cli: &Cli) -> Result<(Inventory, Vec<String>), Fatal> {
    let inventory =
        Inventory::load(&cli.inventory).map_err(|error| Fatal::usage(error_chain(&error)))?;
    let targets = inventory
        .select(&cli.limit)
        .map_err(|error| Fatal::usage(error.to_string()))?;
    Ok((inventory, targets))
}

/// The secrets of commands that only talk to Redis.
const REDIS_ONLY: &[&str] = &["app.redis.password"];

/// Resolves inventory, secrets (all, or those in `secrets` when given), SSH settings and the
/// worker binary before any connection.
fn deployment(
    cli: &Cli,
    lab: Option<&LabContext>,
    binary_required: bool,
    secrets: Option<&[&str]>,
) -> Result<Deployment, Fatal> {
    let (inventory, targets) = load_inventory(cli)?;
    let fallback = lab
        .map(|context| context.secrets.clone())
        .unwrap_or_default();
    let secrets = Secrets::resolve_only(&inventory, &fallback, secrets).map_err(|error| {
        let fatal = Fatal::usage(error_chain(&error));
        if cli.lab {
            fatal
        } else {
            fatal.hint("export the variables named, or rehearse on the lab with --lab, which generates lab secrets")
        }
    })?;
    let ssh = match lab {
        Some(context) => SshOverrides {
            identity: Some(context.identity_file.clone()),
            known_hosts: Some(context.known_hosts_file.clone()),
        },
        None => SshOverrides::default(),
    };

    let has_workers = inventory
        .hosts_with(crate::inventory::Role::Worker)
        .any(|host| targets.contains(&host.name));
    let worker_path = cli.worker_binary.clone().or_else(default_worker_binary);
    let worker = match worker_path {
        Some(path) if has_workers => match WorkerBinary::load(&path) {
            Ok(binary) => Some(binary),
            Err(error) if binary_required => return Err(Fatal::failure(error_chain(&error))),
            Err(error) => {
                tracing::warn!("{}; the binary hash check is skipped", error_chain(&error));
                None
            }
        },
        _ => None,
    };
    if has_workers && binary_required && worker.is_none() {
        return Err(
            Fatal::failure("no worker binary found next to yametee-deploy").hint(
                "build it with `cargo build --release --workspace` or pass --worker-binary PATH",
            ),
        );
    }
    Ok(Deployment {
        inventory,
        secrets,
        ssh,
        worker,
        renderer: Renderer::new(),
        targets,
        parallel: usize::from(cli.parallel),
    })
}

fn default_worker_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.join("yametee-worker");
    candidate.exists().then_some(candidate)
}

/// Runs `status` on the worker hosts among the targets.
async fn status(
    deployment: &Deployment,
    output: crate::status::Output,
    journal_lines: usize,
) -> Result<u8, Fatal> {
    let hosts: Vec<crate::inventory::Host> = deployment
        .target_hosts()
        .filter(|host| host.has_role(crate::inventory::Role::Worker))
        .cloned()
        .collect();
    if hosts.is_empty() {
        let workers: Vec<&str> = deployment
            .inventory
            .hosts_with(crate::inventory::Role::Worker)
            .map(|host| host.name.as_str())
            .collect();
        return Err(Fatal::usage(
            "status reads the queue through a worker host, and no worker host is selected",
        )
        .hint(format!(
            "select one with --limit, such as --limit {}",
            workers.first().copied().unwrap_or("worker")
        )));
    }
    let monitor = crate::status::Monitor::new(
        &deployment.inventory,
        &deployment.secrets,
        &deployment.ssh,
        hosts,
        journal_lines,
    );
    Ok(crate::status::run(monitor, output).await)
}

async fn push_job(
    cli: &Cli,
    deployment: &Deployment,
    job_type: &str,
    data: &str,
    id: Option<&str>,
) -> Result<u8, Fatal> {
    if !crate::queue::JOB_TYPES.contains(&job_type) {
        return Err(Fatal::usage(format!(
            "unknown job type `{job_type}`; expected one of: {}",
            crate::queue::JOB_TYPES.join(", ")
        )));
    }
    let data: serde_json::Value = serde_json::from_str(data).map_err(|error| {
        Fatal::usage(format!("invalid job data: {error}; expected a JSON object"))
    })?;
    if !data.is_object() {
        return Err(Fatal::usage(
            "invalid job data: expected a JSON object such as '{\"orderId\":\"o-1\"}'",
        ));
    }
    let inventory = &deployment.inventory;
    let host = inventory
        .hosts_with(crate::inventory::Role::Web)
        .chain(inventory.hosts_with(crate::inventory::Role::Worker))
        .next()
        .ok_or_else(|| Fatal::usage("the inventory has no web or worker host to push from"))?;

    let id = id
        .map(String::from)
        .unwrap_or_else(|| crate::queue::new_job_id(job_type.split(':').next().unwrap_or("job")));
    let job = crate::queue::job_json(&id, job_type, data);
    let destination = crate::ssh::Destination::for_host(host, &deployment.ssh);
    let remote = crate::ssh::Remote::connect(destination)
        .await
        .map_err(|error| Fatal::failure(error_chain(&error)))?;
    let pushed = crate::queue::push(&remote, inventory, &deployment.secrets, &job).await;
    remote.close().await;
    let length =
        pushed.map_err(|error| Fatal::failure(deployment.secrets.redact(&error_chain(&error))))?;

    match cli.format {
        Format::Json => outln!(
            "{}",
            serde_json::json!({ "ok": true, "id": id, "queue": inventory.app.queue, "length": length, "from": host.name })
        ),
        _ => {
            outln!("{id}");
            eprintln!(
                "pushed job {id} from {} onto {}; {length} job{} waiting",
                host.name,
                inventory.app.queue,
                if length == 1 { "" } else { "s" }
            );
        }
    }
    Ok(exit::SUCCESS)
}

fn inventory_command(cli: &Cli, command: &InventoryCommand) -> Result<u8, Fatal> {
    if cli.format == Format::Junit {
        return Err(Fatal::usage(
            "inventory commands have no junit format; use --format human or --format json",
        ));
    }
    match command {
        InventoryCommand::Check | InventoryCommand::Show => {}
        InventoryCommand::AddHost {
            name,
            address,
            roles,
            ssh_user,
            port,
            dry_run,
        } => {
            let host = NewHost {
                name: name.clone(),
                address: address.clone(),
                roles: roles.clone(),
                ssh_user: ssh_user.clone(),
                ssh_port: *port,
            };
            return edit_inventory(cli, *dry_run, |text| edit::add_host(text, &host));
        }
        InventoryCommand::RemoveHost { name, dry_run } => {
            return edit_inventory(cli, *dry_run, |text| edit::remove_host(text, name));
        }
        InventoryCommand::Set {
            path,
            value,
            dry_run,
        } => {
            return edit_inventory(cli, *dry_run, |text| edit::set_value(text, path, value));
        }
    }

    let inventory = match Inventory::load(&cli.inventory) {
        Ok(inventory) => inventory,
        Err(InventoryError::Invalid { problems, .. }) if cli.format == Format::Json => {
            let document = serde_json::json!({ "ok": false, "problems": problems });
            outln!(
                "{}",
                serde_json::to_string_pretty(&document).expect("problems serialize")
            );
            return Ok(exit::USAGE);
        }
        Err(error) => return Err(Fatal::usage(error_chain(&error))),
    };
    let names: Vec<&str> = inventory
        .hosts
        .iter()
        .map(|host| host.name.as_str())
        .collect();
    match (command, cli.format) {
        (InventoryCommand::Check, Format::Json) => {
            outln!(
                "{}",
                serde_json::json!({ "ok": true, "problems": [], "hosts": names })
            );
        }
        (InventoryCommand::Check, _) => outln!(
            "{}: valid, {} hosts ({})",
            cli.inventory.display(),
            names.len(),
            names.join(", ")
        ),
        (InventoryCommand::Show, Format::Json) => {
            outln!(
                "{}",
                serde_json::to_string_pretty(&inventory).expect("inventory serializes")
            );
        }
        (InventoryCommand::Show, _) => out!("{}", report::inventory_summary(&inventory)),
        _ => unreachable!("edit commands return above"),
    }
    Ok(exit::SUCCESS)
}

/// Reads the inventory, applies `edit` to its text, prints the diff and, unless `dry_run`,
/// replaces the file. A rejected edit is a usage error (exit code 2) and writes nothing.
fn edit_inventory(
    cli: &Cli,
    dry_run: bool,
    edit: impl FnOnce(&str) -> Result<String, EditError>,
) -> Result<u8, Fatal> {
    let path = &cli.inventory;
    let old_text = std::fs::read_to_string(path).map_err(|error| {
        Fatal::usage(format!("cannot read inventory {}: {error}", path.display()))
    })?;
    let rejected = |error: EditError| {
        let fatal = Fatal {
            code: if error.is_usage() {
                exit::USAGE
            } else {
                exit::FAILURE
            },
            message: error_chain(&error),
            hint: None,
        };
        fatal.hint(format!("{} was not changed", path.display()))
    };
    let new_text = edit(&old_text).map_err(rejected)?;

    let label = path.display().to_string();
    let diff = edit::unified_diff(&label, &old_text, &new_text);
    let changed = !diff.is_empty();
    let write = changed && !dry_run;
    if write {
        edit::write_atomically(path, &old_text, &new_text).map_err(rejected)?;
    }

    match cli.format {
        Format::Json => {
            let document = serde_json::json!({
                "ok": true,
                "path": label,
                "changed": changed,
                "written": write,
                "diff": diff,
            });
            outln!(
                "{}",
                serde_json::to_string_pretty(&document).expect("edit result serializes")
            );
        }
        _ => out!("{diff}"),
    }
    let outcome = match (changed, dry_run) {
        (false, _) => "unchanged (the edit changes nothing)",
        (true, true) => "not written (--dry-run)",
        (true, false) => "written",
    };
    eprintln!("{label}: {outcome}");
    Ok(exit::SUCCESS)
}

/// A rendered file as `render --format json` prints it.
#[derive(serde::Serialize)]
struct RenderedFileDocument<'a> {
    host: &'a str,
    path: &'a str,
    mode: String,
    owner: &'a str,
    group: &'a str,
    content: &'a str,
}

fn render(cli: &Cli, out: Option<&Path>) -> Result<u8, Fatal> {
    let (inventory, targets) = load_inventory(cli)?;
    let secrets = Secrets::placeholders(&inventory);
    let renderer = Renderer::new();
    let mut rendered = Vec::new();
    for host in inventory
        .hosts
        .iter()
        .filter(|host| targets.contains(&host.name))
    {
        let desired = renderer
            .render_host(&inventory, host, &secrets)
            .map_err(|error| Fatal::failure(error_chain(&error)))?;
        rendered.extend(
            desired
                .files
                .into_iter()
                .map(|file| (host.name.as_str(), file)),
        );
    }

    if let Some(dir) = out {
        for (host, file) in &rendered {
            write_local(
                &dir.join(host).join(file.path.trim_start_matches('/')),
                &file.content,
            )?;
        }
        eprintln!(
            "wrote {} files for {} hosts under {}",
            rendered.len(),
            targets.len(),
            dir.display()
        );
        return Ok(exit::SUCCESS);
    }
    match cli.format {
        Format::Json => {
            let documents: Vec<RenderedFileDocument> = rendered
                .iter()
                .map(|(host, file)| RenderedFileDocument {
                    host,
                    path: &file.path,
                    mode: format!("{:04o}", file.mode),
                    owner: &file.owner,
                    group: &file.group,
                    content: &file.content,
                })
                .collect();
            let document = serde_json::json!({ "ok": true, "files": documents });
            outln!(
                "{}",
                serde_json::to_string_pretty(&document).expect("files serialize")
            );
        }
        _ => {
            for (host, file) in &rendered {
                out!(
                    "==> {host}:{} ({:04o} {}:{}) <==\n{}\n",
                    file.path,
                    file.mode,
                    file.owner,
                    file.group,
                    file.content
                );
            }
        }
    }
    Ok(exit::SUCCESS)
}

fn write_local(path: &Path, content: &str) -> Result<(), Fatal> {
    let fail =
        |error: std::io::Error| Fatal::failure(format!("cannot write {}: {error}", path.display()));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    std::fs::write(path, content).map_err(fail)
}

fn lab_spec(inventory: &Inventory) -> LabSpec {
    let hosts = inventory
        .hosts
        .iter()
        .map(|host| LabHost {
            name: host.name.clone(),
            address: host.address,
            ssh_port: host.ssh.port,
            ssh_user: host.ssh.user.clone(),
            roles: crate::deploy::role_names(host),
        })
        .collect();
    // The lab makes up passwords; an SMTP relay URL cannot be made up, so it must be given.
    let mut secret_env_names: Vec<String> = inventory
        .secret_refs()
        .into_iter()
        .filter(|(setting, _)| *setting != "app.smtp.url")
        .filter_map(|(_, reference)| match reference {
            SecretRef::Env(name) => Some(name.clone()),
            SecretRef::File(_) => None,
        })
        .collect();
    secret_env_names.dedup();
    LabSpec {
        hosts,
        secret_env_names,
    }
}

fn lab_command(cli: &Cli, command: &LabCommand) -> Result<u8, Fatal> {
    let lab_error = |error: lab::LabError| Fatal::failure(error_chain(&error));
    match command {
        LabCommand::Up => {
            let (inventory, _) = load_inventory(cli)?;
            let status = lab::up(&lab_spec(&inventory)).map_err(lab_error)?;
            print_lab_status(&status, cli.format);
            Ok(if status.is_ready() {
                exit::SUCCESS
            } else {
                exit::FAILURE
            })
        }
        LabCommand::Down => {
            lab::down().map_err(lab_error)?;
            eprintln!("lab stopped");
            Ok(exit::SUCCESS)
        }
        LabCommand::Status => {
            let status = lab::status().map_err(lab_error)?;
            print_lab_status(&status, cli.format);
            Ok(if status.is_ready() {
                exit::SUCCESS
            } else {
                exit::FAILURE
            })
        }
        LabCommand::Ssh { host, command } => {
            let mut ssh = lab::ssh_command(host, remote_command_line(command)).map_err(
                |error| match error {
                    // A host name the lab does not have is a mistake in the command line.
                    lab::LabError::UnknownHost { .. } => Fatal::usage(error_chain(&error)),
                    error => lab_error(error),
                },
            )?;
            let status = ssh
                .status()
                .map_err(|error| Fatal::failure(format!("cannot run ssh: {error}")))?;
            Ok(status
                .code()
                .map_or(exit::FAILURE, |code| code.clamp(0, 255) as u8))
        }
    }
}

/// The command line `lab ssh` sends: one argument is a shell command line, as with ssh
/// itself; several are a program and its arguments, each quoted so it arrives unchanged.
fn remote_command_line(command: &[String]) -> Vec<String> {
    if command.len() <= 1 {
        return command.to_vec();
    }
    vec![command
        .iter()
        .map(|word| crate::ssh::shell_quote(word))
        .collect::<Vec<_>>()
        .join(" ")]
}

fn print_lab_status(status: &lab::LabStatus, format: Format) {
    match format {
        Format::Json => outln!(
            "{}",
            serde_json::to_string_pretty(status).expect("lab status serializes")
        ),
        _ => out!("{status}"),
    }
}

/// Turns the result of `run` into the process's exit code. A fatal error is printed on
/// stderr with its hint and, for `--format json|junit`, also as a document on stdout, so a
/// pipeline reading stdout always gets one.
/// Whether every error must exit 1: `plan --detailed-exitcode` keeps 2 for "changes pending",
/// so a usage error there must not look like it.
pub fn errors_exit_one(cli: &Cli) -> bool {
    matches!(
        cli.command,
        Command::Plan {
            detailed_exitcode: true
        }
    )
}

/// Ends a run whose command line could not be parsed: clap's message on stderr and, when the
/// arguments ask for JSON or JUnit, the error document on stdout. `args` are the raw arguments.
pub fn finish_parse_error(error: clap::Error, args: &[String]) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        error.exit();
    }
    let format = args
        .windows(2)
        .rev()
        .find_map(|pair| match pair[0].as_str() {
            "--format" => Some(pair[1].as_str()),
            _ => None,
        });
    let format = format.or_else(|| {
        args.iter()
            .rev()
            .find_map(|arg| arg.strip_prefix("--format="))
    });
    let message = error.render().to_string();
    let first_line = message
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string();
    match format {
        Some("json") => outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "ok": false, "error": first_line }))
                .expect("error serializes")
        ),
        Some("junit") => out!("{}", report::fatal_junit(&first_line)),
        _ => {}
    }
    let _ = error.print();
    let detailed = args.iter().any(|arg| arg == "--detailed-exitcode");
    ExitCode::from(if detailed { exit::FAILURE } else { exit::USAGE })
}

pub fn finish(result: Result<u8, Fatal>, format: Format, errors_exit_one: bool) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(mut fatal) => {
            if errors_exit_one {
                fatal.code = exit::FAILURE;
            }
            match format {
                Format::Json => {
                    let document = serde_json::json!({ "ok": false, "error": fatal.message });
                    outln!(
                        "{}",
                        serde_json::to_string_pretty(&document).expect("error serializes")
                    );
                }
                Format::Junit => out!("{}", report::fatal_junit(&fatal.message)),
                Format::Human => {}
            }
            eprintln!("error: {}", fatal.message);
            if let Some(hint) = fatal.hint {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(fatal.code)
        }
    }
}
