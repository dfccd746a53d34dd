//! Lossless edits of `inventory.yaml`: add a host, remove a host, set one value.
//!
//! The YAML is never serialized again. Each edit finds the lines or the scalar it changes
//! through the parser's positions and splices new text into the original, so comments, blank
//! lines, key order and quoting elsewhere stay byte for byte. The edited text must pass the
//! inventory validator before it is returned, and [`write_atomically`] replaces the file with
//! a rename, so a rejected or interrupted edit leaves the file as it was.
//!
//! Hosts are added to and removed from a block-style `hosts` mapping only. A `hosts` mapping
//! written in flow style (`hosts: {web: {...}}`) is rejected with a message, as are block
//! scalars (`|`, `>`) and block lists as the target of `set`. An empty value (`web:` with
//! nothing after it) can be set, but no key is created under it.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use saphyr::{LoadableYamlNode, MarkedYamlOwned, Marker, ScalarOwned, YamlDataOwned};

use super::parse::{is_host_name, is_unix_name, scalar_string};
use super::suggest::closest_match;
use super::{parse_inventory, Problem, Role};

type Node = MarkedYamlOwned;

/// Indentation used for a new nested mapping when the file shows none to copy.
const DEFAULT_INDENT: usize = 2;

/// A host to append to `hosts`, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewHost {
    pub name: String,
    pub address: String,
    pub roles: Vec<String>,
    pub ssh_user: Option<String>,
    pub ssh_port: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("cannot edit an inventory that is not valid YAML: {line}:{column}: {message}")]
    Yaml {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("the inventory has no block mapping `hosts` to edit; expected `hosts:` followed by indented host entries")]
    NoHostsBlock,
    #[error("`hosts` is written in flow style ({{...}}); only hosts in a block mapping (one `NAME:` line per host) can be added or removed")]
    FlowHosts,
    #[error("host `{name}` already exists; remove it first or choose another name")]
    HostExists { name: String },
    #[error("no host `{name}` in the inventory, which has: {}{}",
        known.join(", "), suggestion_text(suggestion))]
    UnknownHost {
        name: String,
        suggestion: Option<String>,
        known: Vec<String>,
    },
    #[error("invalid {argument} `{value}`; expected {expected}")]
    InvalidArgument {
        argument: &'static str,
        value: String,
        expected: String,
    },
    #[error("unknown key `{key}` in {}, which has: {}{}{}",
        if parent.is_empty() { "the inventory" } else { parent }, known.join(", "),
        if parent == "hosts" { "; a new host is added with `inventory add-host`" } else { "" },
        suggestion_text(suggestion))]
    UnknownPath {
        parent: String,
        key: String,
        suggestion: Option<String>,
        known: Vec<String>,
    },
    #[error("{path} is {kind}; `set` replaces a scalar value, or a flow list such as [worker, web] with another")]
    NotScalar { path: String, kind: &'static str },
    #[error("{path} is {kind}, not a mapping, so it has no key `{key}`")]
    NotMapping {
        path: String,
        kind: &'static str,
        key: String,
    },
    #[error("{path} cannot be edited with `set`: {reason}; edit it by hand")]
    Unsupported { path: String, reason: String },
    #[error("invalid VALUE `{value}`: {reason}")]
    InvalidValue { value: String, reason: String },
    #[error("the edited inventory would be invalid ({} problem{}; positions are in the edited text):\n{}",
        problems.len(), if problems.len() == 1 { "" } else { "s" }, format_problems(problems))]
    Rejected { problems: Vec<Problem> },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} changed while it was being edited; nothing was written, run the command again", path.display())]
    Changed { path: PathBuf },
}

impl EditError {
    /// Returns true when the error comes from the user's input or the inventory (exit code 2),
    /// not from writing the file (exit code 1).
    pub fn is_usage(&self) -> bool {
        !matches!(self, EditError::Write { .. } | EditError::Changed { .. })
    }
}

fn suggestion_text(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(known) => format!("; did you mean `{known}`?"),
        None => String::new(),
    }
}

fn format_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|problem| format!("  {problem}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Appends `host` after the last host of the inventory, in the indentation and style (block
/// or flow mapping, block or flow role list, blank line between hosts or not) of that last
/// host, and returns the validated new text.
pub fn add_host(text: &str, host: &NewHost) -> Result<String, EditError> {
    check_new_host(host)?;
    let source = Source::parse(text)?;
    let hosts = source.hosts()?;
    if hosts.iter().any(|entry| entry.name == host.name) {
        return Err(EditError::HostExists {
            name: host.name.clone(),
        });
    }
    let Some(template) = hosts.last() else {
        return Err(EditError::NoHostsBlock);
    };

    let style = HostStyle::of(&source, template);
    let mut insertion = String::new();
    if style.blank_line_before {
        insertion.push('\n');
    }
    insertion.push_str(&style.render(host));

    let last_line = source.entry_end(template);
    let position = source.line_end(last_line);
    if !text[..position].ends_with('\n') {
        insertion.insert(0, '\n');
    }
    let insertion = source.with_line_endings(insertion);
    let mut new_text = String::with_capacity(text.len() + insertion.len());
    new_text.push_str(&text[..position]);
    new_text.push_str(&insertion);
    new_text.push_str(&text[position..]);
    validated(new_text)
}

/// Removes the host `name` and returns the validated new text.
///
/// The removed lines are the host's key line and every line indented deeper than that key,
/// up to the next line at the key's indentation or less. The comment lines directly above
/// the key (no blank line between) at exactly the key's indentation go too, because they
/// describe the host. A comment indented less, such as a section heading at column 0, stays.
/// When the host was set apart by blank lines, one of them goes too, so no double blank line
/// is left behind.
pub fn remove_host(text: &str, name: &str) -> Result<String, EditError> {
    let source = Source::parse(text)?;
    let hosts = source.hosts()?;
    let Some(entry) = hosts.iter().find(|entry| entry.name == name) else {
        let known: Vec<String> = hosts.iter().map(|entry| entry.name.clone()).collect();
        return Err(EditError::UnknownHost {
            name: name.to_string(),
            suggestion: closest_match(name, known.iter().map(String::as_str)).map(String::from),
            known,
        });
    };

    let key_line = entry.key.span.start.line();
    let key_column = entry.key.span.start.col();
    let mut first = key_line;
    while first > 1 && source.is_comment(first - 1) && source.indent(first - 1) == key_column {
        first -= 1;
    }
    let mut last = source.entry_end(entry);

    let before = first - 1;
    let after = last + 1;
    let after_is_blank = after <= source.line_count() && source.is_blank(after);
    let before_is_blank = before >= 1 && source.is_blank(before);
    let opens_mapping = before == 0 || (!before_is_blank && source.indent(before) < key_column);
    let closes_mapping =
        after > source.line_count() || (!after_is_blank && source.indent(after) < key_column);
    if after_is_blank && (before_is_blank || opens_mapping) {
        last = after;
    } else if before_is_blank && closes_mapping {
        first = before;
    }

    let mut new_text = String::with_capacity(text.len());
    new_text.push_str(&text[..source.line_start(first)]);
    new_text.push_str(&text[source.line_end(last)..]);
    validated(new_text)
}

/// Sets the value at the dotted `path` (such as `app.worker.concurrency`) to `value`, read as
/// a YAML scalar, and returns the validated new text.
///
/// The old value's text is replaced in place, so a comment after it on the same line stays.
/// A flow list (`roles: [worker]`) can be replaced by a list given as `[worker, web]`. A
/// missing key is created under the deepest mapping of the path that exists, together with
/// any missing mappings between.
pub fn set_value(text: &str, path: &str, value: &str) -> Result<String, EditError> {
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|key| key.is_empty()) {
        return Err(EditError::InvalidArgument {
            argument: "PATH",
            value: path.to_string(),
            expected: "dotted keys such as app.worker.concurrency or hosts.worker.address".into(),
        });
    }
    let new_value = parse_value(value)?;
    let source = Source::parse(text)?;

    let mut node = &source.root;
    let mut key_node: Option<&Node> = None;
    for (depth, key) in keys.iter().enumerate() {
        let parent_path = keys[..depth].join(".");
        let YamlDataOwned::Mapping(mapping) = &node.data else {
            return Err(EditError::NotMapping {
                path: parent_path,
                kind: kind_of(node),
                key: key.to_string(),
            });
        };
        let found = mapping
            .iter()
            .find(|(name, _)| scalar_string(name).as_deref() == Some(*key));
        match found {
            Some((name, child)) => {
                key_node = Some(name);
                node = child;
            }
            None => {
                let missing = &keys[depth..];
                return create_key(&source, node, key_node, &parent_path, missing, &new_value);
            }
        }
    }

    let key_node = key_node.expect("a path has at least one key");
    let replacement = replacement_text(&source, path, key_node, node, &new_value)?;
    let mut new_text = String::with_capacity(text.len() + replacement.text.len());
    new_text.push_str(&text[..replacement.start]);
    new_text.push_str(&replacement.text);
    new_text.push_str(&text[replacement.end..]);
    validated(new_text)
}

/// Returns the unified diff between two versions of the file at `label`; empty when they are
/// equal.
pub fn unified_diff(label: &str, old: &str, new: &str) -> String {
    if old == new {
        return String::new();
    }
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(label, label)
        .to_string()
}

/// Replaces the file at `path` with `new_text`: writes a temporary file beside it with the
/// same permissions (and owner, when allowed), syncs it, then renames it over the original.
/// A symbolic link is followed, so the file it points to is replaced and the link stays.
/// Fails with [`EditError::Changed`] when the file no longer contains `old_text`, so an
/// edit made meanwhile by someone else is not lost.
pub fn write_atomically(path: &Path, old_text: &str, new_text: &str) -> Result<(), EditError> {
    let write_error = |source| EditError::Write {
        path: path.to_path_buf(),
        source,
    };
    let target = fs::canonicalize(path).map_err(write_error)?;
    let metadata = fs::metadata(&target).map_err(write_error)?;
    let directory = target.parent().unwrap_or(Path::new("."));
    let file_name = target
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "inventory.yaml".into());
    let temporary = directory.join(format!(".{file_name}.{}.tmp", std::process::id()));

    let written = write_temporary(&temporary, new_text, &metadata);
    if let Err(error) = written {
        let _ = fs::remove_file(&temporary);
        return Err(write_error(error));
    }
    let current = fs::read_to_string(&target).map_err(write_error);
    if current.as_deref().ok() != Some(old_text) {
        let _ = fs::remove_file(&temporary);
        current?;
        return Err(EditError::Changed {
            path: path.to_path_buf(),
        });
    }
    if let Err(error) = fs::rename(&temporary, &target) {
        let _ = fs::remove_file(&temporary);
        return Err(write_error(error));
    }
    // The rename is only durable once the directory entry is on disk. Some file systems
    // cannot sync a directory; the file itself is already complete then.
    if let Ok(directory) = File::open(directory) {
        let _ = directory.sync_all();
    }
    Ok(())
}

fn write_temporary(path: &Path, text: &str, original: &fs::Metadata) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.set_permissions(original.permissions())?;
    let owned_by_original = file
        .metadata()
        .is_ok_and(|metadata| metadata.uid() == original.uid() && metadata.gid() == original.gid());
    if !owned_by_original {
        if let Err(error) =
            std::os::unix::fs::fchown(&file, Some(original.uid()), Some(original.gid()))
        {
            tracing::warn!(
                "cannot give {} the owner of the original file ({error}); it keeps the owner of this process",
                path.display()
            );
        }
    }
    file.sync_all()
}

/// Runs the inventory validator over the edited text and returns it when valid.
fn validated(new_text: String) -> Result<String, EditError> {
    match parse_inventory(&new_text) {
        Ok(_) => Ok(new_text),
        Err(problems) => Err(EditError::Rejected { problems }),
    }
}

fn check_new_host(host: &NewHost) -> Result<(), EditError> {
    if !is_host_name(&host.name) {
        return Err(EditError::InvalidArgument {
            argument: "host name",
            value: host.name.clone(),
            expected: "lowercase letters, digits and '-', starting with a letter, at most 63 \
                       characters"
                .into(),
        });
    }
    if host.address.parse::<Ipv4Addr>().is_err() {
        return Err(EditError::InvalidArgument {
            argument: "--address",
            value: host.address.clone(),
            expected: "an IPv4 address such as 192.168.120.46".into(),
        });
    }
    if host.roles.is_empty() {
        return Err(EditError::InvalidArgument {
            argument: "--role",
            value: String::new(),
            expected: "at least one role from: postgres, redis, worker, web".into(),
        });
    }
    for (index, role) in host.roles.iter().enumerate() {
        if Role::from_name(role).is_none() {
            let suggestion = closest_match(role, Role::ALL.map(Role::as_str));
            return Err(EditError::InvalidArgument {
                argument: "--role",
                value: role.clone(),
                expected: match suggestion {
                    Some(known) => {
                        format!("one of: postgres, redis, worker, web (did you mean `{known}`?)")
                    }
                    None => "one of: postgres, redis, worker, web".into(),
                },
            });
        }
        if host.roles[..index].contains(role) {
            return Err(EditError::InvalidArgument {
                argument: "--role",
                value: role.clone(),
                expected: "each role once".into(),
            });
        }
    }
    if let Some(user) = &host.ssh_user {
        if !is_unix_name(user) {
            return Err(EditError::InvalidArgument {
                argument: "--ssh-user",
                value: user.clone(),
                expected: "letters, digits, '_' and '-', starting with a letter".into(),
            });
        }
    }
    Ok(())
}

/// The inventory text with its YAML tree and a line table, so positions of nodes can be
/// turned into byte offsets and whole lines.
struct Source<'a> {
    text: &'a str,
    root: Node,
    /// Byte offset at which each line starts: line N (1-based, like [`Marker::line`]) starts
    /// at `line_starts[N - 1]`.
    line_starts: Vec<usize>,
}

/// One entry of the `hosts` mapping.
struct HostEntry<'a> {
    name: String,
    key: &'a Node,
    value: &'a Node,
}

impl<'a> Source<'a> {
    fn parse(text: &'a str) -> Result<Source<'a>, EditError> {
        let documents = MarkedYamlOwned::load_from_str(text).map_err(|error| EditError::Yaml {
            line: error.marker().line(),
            column: error.marker().col() + 1,
            message: error.info().to_string(),
        })?;
        let Some(root) = documents.into_iter().next() else {
            return Err(EditError::NoHostsBlock);
        };
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(index, _)| index + 1));
        if text.ends_with('\n') {
            line_starts.pop();
        }
        Ok(Source {
            text,
            root,
            line_starts,
        })
    }

    /// Entries of the top-level `hosts` mapping, which must be a block mapping.
    fn hosts(&self) -> Result<Vec<HostEntry<'_>>, EditError> {
        let YamlDataOwned::Mapping(top) = &self.root.data else {
            return Err(EditError::NoHostsBlock);
        };
        let hosts = top
            .iter()
            .find(|(key, _)| scalar_string(key).as_deref() == Some("hosts"))
            .map(|(_, value)| value);
        let Some(hosts) = hosts else {
            return Err(EditError::NoHostsBlock);
        };
        if is_flow(self, hosts) {
            return Err(EditError::FlowHosts);
        }
        let YamlDataOwned::Mapping(entries) = &hosts.data else {
            return Err(EditError::NoHostsBlock);
        };
        Ok(entries
            .iter()
            .map(|(key, value)| HostEntry {
                name: scalar_string(key).unwrap_or_default(),
                key,
                value,
            })
            .collect())
    }

    fn line_count(&self) -> usize {
        self.line_starts.len()
    }

    fn line_start(&self, line: usize) -> usize {
        self.line_starts[line - 1]
    }

    /// Byte offset just after the line's newline, or the end of the text on the last line.
    fn line_end(&self, line: usize) -> usize {
        self.line_starts
            .get(line)
            .copied()
            .unwrap_or(self.text.len())
    }

    /// Returns the line's text without its newline.
    fn line(&self, line: usize) -> &'a str {
        self.text[self.line_start(line)..self.line_end(line)].trim_end_matches(['\n', '\r'])
    }

    fn indent(&self, line: usize) -> usize {
        let text = self.line(line);
        text.len() - text.trim_start_matches(' ').len()
    }

    fn is_blank(&self, line: usize) -> bool {
        self.line(line).trim().is_empty()
    }

    fn is_comment(&self, line: usize) -> bool {
        self.line(line).trim_start().starts_with('#')
    }

    /// Byte offset of a parser position. Markers count characters, so the column is walked
    /// in the line's text (which may hold multi-byte characters in comments).
    fn offset(&self, marker: Marker) -> usize {
        if marker.line() > self.line_count() {
            return self.text.len();
        }
        let start = self.line_start(marker.line());
        let line = &self.text[start..self.line_end(marker.line())];
        let within = line
            .char_indices()
            .nth(marker.col())
            .map_or(line.len(), |(index, _)| index);
        start + within
    }

    /// Returns the last line of the mapping entry whose key is `key`. The entry runs from the
    /// key's line up to the next line at the key's indentation or less, without trailing
    /// blank lines. A comment indented deeper than the key belongs to the entry, and one at
    /// the key's indentation belongs to what follows.
    fn entry_end_of(&self, key: &Node, value: &Node) -> usize {
        let key_line = key.span.start.line();
        let key_column = key.span.start.col();
        let mut last = key_line;
        for line in key_line + 1..=self.line_count() {
            if self.is_blank(line) {
                continue;
            }
            if self.indent(line) <= key_column {
                break;
            }
            last = line;
        }
        // A flow collection may continue on lines that are not indented deeper than its key.
        if is_flow(self, value) {
            last = last.max(value.span.end.line());
        }
        last
    }

    fn entry_end(&self, entry: &HostEntry) -> usize {
        self.entry_end_of(entry.key, entry.value)
    }

    /// Converts the `\n` line endings of new lines to `\r\n` when the file's first line ends
    /// with `\r\n`, so an edit does not mix line endings.
    fn with_line_endings(&self, lines: String) -> String {
        let first_line_end = self.text.find('\n');
        let uses_crlf = first_line_end.is_some_and(|end| self.text[..end].ends_with('\r'));
        if uses_crlf {
            lines.replace('\n', "\r\n")
        } else {
            lines
        }
    }

    /// Returns the smallest indentation greater than zero of any content line, used as the
    /// step between a mapping and its children.
    fn indent_step(&self) -> usize {
        (1..=self.line_count())
            .filter(|line| !self.is_blank(*line) && !self.is_comment(*line))
            .map(|line| self.indent(line))
            .filter(|indent| *indent > 0)
            .min()
            .unwrap_or(DEFAULT_INDENT)
    }
}

/// Returns true when a collection node is written in flow style (`{...}` or `[...]`). A
/// block collection's position is that of its first entry, a flow collection's that of its
/// opening bracket.
fn is_flow(source: &Source, node: &Node) -> bool {
    let is_collection = matches!(
        node.data,
        YamlDataOwned::Mapping(_) | YamlDataOwned::Sequence(_)
    );
    let start = source.offset(node.span.start);
    is_collection && matches!(source.text.as_bytes().get(start), Some(b'{' | b'['))
}

fn kind_of(node: &Node) -> &'static str {
    match &node.data {
        YamlDataOwned::Mapping(_) => "a mapping",
        YamlDataOwned::Sequence(_) => "a list",
        YamlDataOwned::Value(ScalarOwned::Null) => "empty",
        _ => "a scalar",
    }
}

/// Layout of the hosts of a file, copied from its last host.
struct HostStyle {
    host_indent: usize,
    /// `None` when hosts are flow mappings on one line (`web: {address: ..., roles: [web]}`).
    block: Option<BlockHostStyle>,
    /// Whether hosts are set apart by a blank line.
    blank_line_before: bool,
}

struct BlockHostStyle {
    field_indent: usize,
    /// Order of `address`, `roles` and `ssh` in the template host.
    key_order: Vec<&'static str>,
    /// Indentation of the `-` of a block role list; `None` for a flow list (`[web]`).
    role_item_indent: Option<usize>,
    /// Indentation of the keys of a block `ssh` mapping; `None` for a flow mapping.
    ssh_field_indent: Option<usize>,
}

impl HostStyle {
    fn of(source: &Source, template: &HostEntry) -> HostStyle {
        let host_indent = template.key.span.start.col();
        let template_line = template.key.span.start.line();
        let mut first_line = template_line;
        while first_line > 1
            && source.is_comment(first_line - 1)
            && source.indent(first_line - 1) == host_indent
        {
            first_line -= 1;
        }
        let blank_line_before = first_line > 1 && source.is_blank(first_line - 1);
        let block = match &template.value.data {
            YamlDataOwned::Mapping(fields) if !is_flow(source, template.value) => {
                Some(BlockHostStyle::of(source, host_indent, fields))
            }
            _ => None,
        };
        HostStyle {
            host_indent,
            block,
            blank_line_before,
        }
    }

    fn render(&self, host: &NewHost) -> String {
        let indent = " ".repeat(self.host_indent);
        let name = scalar_text(&host.name);
        let Some(block) = &self.block else {
            let mut fields = vec![
                format!("address: {}", scalar_text(&host.address)),
                format!("roles: {}", flow_list(&host.roles)),
            ];
            if let Some(ssh) = flow_ssh(host) {
                fields.push(format!("ssh: {ssh}"));
            }
            return format!("{indent}{name}: {{{}}}\n", fields.join(", "));
        };

        let mut text = format!("{indent}{name}:\n");
        let field_indent = " ".repeat(block.field_indent);
        for key in &block.key_order {
            match *key {
                "address" => text.push_str(&format!(
                    "{field_indent}address: {}\n",
                    scalar_text(&host.address)
                )),
                "roles" => match block.role_item_indent {
                    None => text.push_str(&format!(
                        "{field_indent}roles: {}\n",
                        flow_list(&host.roles)
                    )),
                    Some(item_indent) => {
                        text.push_str(&format!("{field_indent}roles:\n"));
                        for role in &host.roles {
                            let item_indent = " ".repeat(item_indent);
                            text.push_str(&format!("{item_indent}- {}\n", scalar_text(role)));
                        }
                    }
                },
                _ => match (block.ssh_field_indent, flow_ssh(host)) {
                    (_, None) => {}
                    (None, Some(ssh)) => text.push_str(&format!("{field_indent}ssh: {ssh}\n")),
                    (Some(ssh_indent), Some(_)) => {
                        text.push_str(&format!("{field_indent}ssh:\n"));
                        let ssh_indent = " ".repeat(ssh_indent);
                        if let Some(user) = &host.ssh_user {
                            text.push_str(&format!("{ssh_indent}user: {}\n", scalar_text(user)));
                        }
                        if let Some(port) = host.ssh_port {
                            text.push_str(&format!("{ssh_indent}port: {port}\n"));
                        }
                    }
                },
            }
        }
        text
    }
}

impl BlockHostStyle {
    fn of(
        source: &Source,
        host_indent: usize,
        fields: &saphyr::AnnotatedMappingOwned<Node>,
    ) -> BlockHostStyle {
        let field_indent = fields
            .keys()
            .next()
            .map_or(host_indent + DEFAULT_INDENT, |key| key.span.start.col());
        let step = field_indent.saturating_sub(host_indent).max(1);
        let field = |name: &str| {
            fields
                .iter()
                .find(|(key, _)| scalar_string(key).as_deref() == Some(name))
                .map(|(_, value)| value)
        };

        let mut key_order: Vec<&'static str> = fields
            .keys()
            .filter_map(|key| match scalar_string(key).as_deref() {
                Some("address") => Some("address"),
                Some("roles") => Some("roles"),
                Some("ssh") => Some("ssh"),
                _ => None,
            })
            .collect();
        for key in ["address", "roles", "ssh"] {
            if !key_order.contains(&key) {
                key_order.push(key);
            }
        }

        let role_item_indent = match field("roles") {
            Some(roles) if !is_flow(source, roles) => match &roles.data {
                YamlDataOwned::Sequence(items) => items
                    .first()
                    .map(|item| source.indent(item.span.start.line())),
                _ => None,
            },
            _ => None,
        };
        let ssh_field_indent = match field("ssh") {
            Some(ssh) if is_flow(source, ssh) => None,
            Some(ssh) => match &ssh.data {
                YamlDataOwned::Mapping(entries) => {
                    entries.keys().next().map(|key| key.span.start.col())
                }
                _ => Some(field_indent + step),
            },
            None => Some(field_indent + step),
        };
        BlockHostStyle {
            field_indent,
            key_order,
            role_item_indent,
            ssh_field_indent,
        }
    }
}

fn flow_list(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|item| scalar_text(item)).collect();
    format!("[{}]", items.join(", "))
}

/// Formats the host's SSH settings as a flow mapping, or returns `None` when it has none.
fn flow_ssh(host: &NewHost) -> Option<String> {
    let mut fields = Vec::new();
    if let Some(user) = &host.ssh_user {
        fields.push(format!("user: {}", scalar_text(user)));
    }
    if let Some(port) = host.ssh_port {
        fields.push(format!("port: {port}"));
    }
    (!fields.is_empty()).then(|| format!("{{{}}}", fields.join(", ")))
}

/// A value given to `set`: one scalar, or a list of scalars for a flow list.
#[derive(Debug, Clone, PartialEq)]
enum NewValue {
    Scalar(ScalarOwned),
    List(Vec<ScalarOwned>),
}

impl NewValue {
    /// Formats the value as YAML text that reads back as the same value, in flow or block
    /// context.
    fn text(&self) -> String {
        match self {
            NewValue::Scalar(scalar) => scalar_yaml(scalar),
            NewValue::List(items) => {
                let items: Vec<String> = items.iter().map(scalar_yaml).collect();
                format!("[{}]", items.join(", "))
            }
        }
    }
}

fn parse_value(value: &str) -> Result<NewValue, EditError> {
    let invalid = |reason: &str| EditError::InvalidValue {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    if value.contains(['\n', '\r']) {
        return Err(invalid("expected a single line"));
    }
    if value.trim().is_empty() {
        return Err(invalid(
            "expected a value; write null for no value or '\"\"' for an empty string",
        ));
    }
    let documents = MarkedYamlOwned::load_from_str(value)
        .map_err(|error| invalid(&format!("not a YAML scalar: {}", error.info())))?;
    let [document] = documents.as_slice() else {
        return Err(invalid("expected exactly one YAML scalar"));
    };
    match &document.data {
        YamlDataOwned::Value(scalar) => Ok(NewValue::Scalar(scalar.clone())),
        YamlDataOwned::Sequence(items) => {
            let scalars: Option<Vec<ScalarOwned>> = items
                .iter()
                .map(|item| match &item.data {
                    YamlDataOwned::Value(scalar) => Some(scalar.clone()),
                    _ => None,
                })
                .collect();
            scalars
                .map(NewValue::List)
                .ok_or_else(|| invalid("expected a list of scalars such as [worker, web]"))
        }
        YamlDataOwned::Mapping(_) => Err(invalid(
            "expected a scalar, not a mapping; set each key with its own path, such as \
             app.database.password.env",
        )),
        _ => Err(invalid("expected a YAML scalar")),
    }
}

/// YAML text for a scalar that reads back as the same scalar.
fn scalar_yaml(scalar: &ScalarOwned) -> String {
    match scalar {
        ScalarOwned::Null => "null".into(),
        ScalarOwned::Boolean(value) => value.to_string(),
        ScalarOwned::Integer(value) => value.to_string(),
        ScalarOwned::FloatingPoint(value) => {
            let value = value.into_inner();
            if value.is_nan() {
                ".nan".into()
            } else if value.is_infinite() {
                if value > 0.0 { ".inf" } else { "-.inf" }.into()
            } else {
                format!("{value:?}")
            }
        }
        ScalarOwned::String(text) => scalar_text(text),
    }
}

/// Formats a string as a YAML scalar: plain when that is unambiguous in both block and flow
/// context and reads back as the same string, else double-quoted.
fn scalar_text(text: &str) -> String {
    if is_plain_safe(text) {
        return text.to_string();
    }
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for character in text.chars() {
        match character {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            '\r' => quoted.push_str("\\r"),
            control if control.is_control() => {
                quoted.push_str(&format!("\\u{:04X}", control as u32));
            }
            other => quoted.push(other),
        }
    }
    quoted.push('"');
    quoted
}

fn is_plain_safe(text: &str) -> bool {
    let Some(first) = text.chars().next() else {
        return false;
    };
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_./:@+=-~ ".contains(c);
    let safe_characters = (first.is_ascii_alphanumeric() || "_./".contains(first))
        && text.chars().all(allowed)
        && !text.ends_with([' ', ':'])
        && !text.contains(": ")
        && !text.contains(" #");
    if !safe_characters {
        return false;
    }
    // Words such as `true`, `null`, `0x1f` or `1e3` would read back as another type.
    match MarkedYamlOwned::load_from_str(text).as_deref() {
        Ok([document]) => {
            matches!(&document.data, YamlDataOwned::Value(ScalarOwned::String(read)) if read == text)
        }
        _ => false,
    }
}

/// Byte range of the old value's text, and the text that replaces it.
struct Replacement {
    start: usize,
    end: usize,
    text: String,
}

fn replacement_text(
    source: &Source,
    path: &str,
    key: &Node,
    node: &Node,
    new_value: &NewValue,
) -> Result<Replacement, EditError> {
    let unsupported = |reason: &str| EditError::Unsupported {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    let start = source.offset(node.span.start);

    match (&node.data, new_value) {
        (YamlDataOwned::Value(ScalarOwned::Null), NewValue::Scalar(_) | NewValue::List(_))
            if node.span.is_empty() =>
        {
            // `key:` with nothing after it: the value goes after the colon.
            let key_end = source.offset(key.span.end);
            let line_end = source.line_end(key.span.start.line());
            let colon = source.text[key_end..line_end]
                .find(':')
                .map(|index| key_end + index + 1)
                .ok_or_else(|| unsupported("its key has no colon on the key's line"))?;
            Ok(Replacement {
                start: colon,
                end: colon,
                text: format!(" {}", new_value.text()),
            })
        }
        (YamlDataOwned::Value(_), NewValue::Scalar(_)) => {
            if node.span.start.line() != node.span.end.line() {
                return Err(unsupported(
                    "its value spans several lines (a block scalar or a folded string)",
                ));
            }
            let end = scalar_end(source, node);
            Ok(Replacement {
                start,
                end,
                text: new_value.text(),
            })
        }
        (YamlDataOwned::Sequence(_), NewValue::List(_)) if is_flow(source, node) => {
            let end = source.offset(node.span.end);
            if node.span.start.line() != node.span.end.line()
                || source.text.as_bytes().get(end) != Some(&b']')
            {
                return Err(unsupported("its list spans several lines"));
            }
            Ok(Replacement {
                start,
                end: end + 1,
                text: new_value.text(),
            })
        }
        (YamlDataOwned::Value(_), NewValue::List(_)) => Err(EditError::InvalidValue {
            value: new_value.text(),
            reason: format!("{path} is a scalar; expected a scalar value"),
        }),
        (YamlDataOwned::Sequence(_), _) if !is_flow(source, node) => Err(unsupported(
            "it is a block list (one `- item` line per entry)",
        )),
        _ => Err(EditError::NotScalar {
            path: path.to_string(),
            kind: kind_of(node),
        }),
    }
}

/// Returns the byte offset just after a scalar's text. The parser's end position of a
/// single-quoted scalar runs to the end of the line, past any comment (seen with saphyr
/// 0.3.4), so quoted scalars are scanned to their closing quote here.
fn scalar_end(source: &Source, node: &Node) -> usize {
    let start = source.offset(node.span.start);
    let fallback = source.offset(node.span.end);
    let rest = &source.text[start..];
    let mut characters = rest.char_indices();
    match characters.next() {
        Some((_, '\'')) => {
            // Inside single quotes, `''` is an escaped quote, not the end.
            let mut characters = characters.peekable();
            while let Some((index, character)) = characters.next() {
                if character != '\'' {
                    continue;
                }
                if characters.next_if(|(_, next)| *next == '\'').is_some() {
                    continue;
                }
                return start + index + 1;
            }
            fallback
        }
        Some((_, '"')) => {
            let mut escaped = false;
            for (index, character) in characters {
                match (escaped, character) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => return start + index + 1,
                    _ => {}
                }
            }
            fallback
        }
        _ => fallback,
    }
}

/// Adds the missing `keys` (the first under `parent`, each next one under the previous) with
/// `value` at the end, and returns the validated new text.
fn create_key(
    source: &Source,
    parent: &Node,
    parent_key: Option<&Node>,
    parent_path: &str,
    keys: &[&str],
    value: &NewValue,
) -> Result<String, EditError> {
    let YamlDataOwned::Mapping(entries) = &parent.data else {
        return Err(EditError::NotMapping {
            path: parent_path.to_string(),
            kind: kind_of(parent),
            key: keys[0].to_string(),
        });
    };
    let known: Vec<String> = entries.keys().filter_map(scalar_string).collect();
    let unknown_path = || EditError::UnknownPath {
        parent: parent_path.to_string(),
        key: keys[0].to_string(),
        suggestion: closest_match(keys[0], known.iter().map(String::as_str)).map(String::from),
        known: known.clone(),
    };
    // Hosts are added with add-host, which checks the address and roles. Through `set`, a
    // misspelt host name would silently become a new, incomplete host.
    if parent_path == "hosts" {
        return Err(unknown_path());
    }

    let (position, insertion) = if is_flow(source, parent) {
        let close = source.offset(parent.span.end);
        if source.text.as_bytes().get(close) != Some(&b'}') {
            return Err(unknown_path());
        }
        let mut text = format!("{}: ", scalar_text(keys[keys.len() - 1]));
        text.push_str(&value.text());
        for key in keys[..keys.len() - 1].iter().rev() {
            text = format!("{}: {{{text}}}", scalar_text(key));
        }
        if !entries.is_empty() {
            text = format!(", {text}");
        }
        (close, text)
    } else {
        let Some((last_key, last_value)) = entries.iter().next_back() else {
            return Err(unknown_path());
        };
        let child_indent = last_key.span.start.col();
        let step = match parent_key {
            Some(parent_key) => child_indent.saturating_sub(parent_key.span.start.col()),
            None => source.indent_step(),
        }
        .max(1);
        let mut text = String::new();
        for (depth, key) in keys.iter().enumerate() {
            let indent = " ".repeat(child_indent + depth * step);
            if depth + 1 == keys.len() {
                text.push_str(&format!("{indent}{}: {}\n", scalar_text(key), value.text()));
            } else {
                text.push_str(&format!("{indent}{}:\n", scalar_text(key)));
            }
        }
        let last_line = source.entry_end_of(last_key, last_value);
        let position = source.line_end(last_line);
        if !source.text[..position].ends_with('\n') {
            text.insert(0, '\n');
        }
        (position, source.with_line_endings(text))
    };

    let mut new_text = String::with_capacity(source.text.len() + insertion.len());
    new_text.push_str(&source.text[..position]);
    new_text.push_str(&insertion);
    new_text.push_str(&source.text[position..]);
    validated(new_text).map_err(|error| match error {
        // An unknown key is better reported with the keys that exist than as a problem of
        // the edited text.
        EditError::Rejected { problems }
            if problems.iter().any(|problem| {
                problem
                    .message
                    .starts_with(&format!("unknown key `{}`", keys[0]))
            }) =>
        {
            unknown_path()
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An inventory with comments in every place a user puts them: file header, above and
    /// after keys, inside and between hosts, non-ASCII text, quoting and a null value.
    const COMMENTED: &str = "\
# Production inventory — every comment here must survive an edit.

defaults:
  ssh:
    user: deploy   # the deploy account
    port: 22

app:
  database:
    name: yame_tee # database name
    user: yametee_user
    password: {env: PG_PASSWORD}  # never the value itself
  redis:
    password: {file: /run/secrets/redis}
  queue: 'yametee:jobs'   # quoted on purpose
  worker:
    # How many jobs one worker takes at once.
    concurrency: 4 # four slots
  web:
    start_command:   # filled in at launch
  smtp:
    url: {env: SMTP_URL}
    from: zoë@yametee.example # ünïcode before and after

# The machines.
hosts:
  # Data stores first.
  db:
    address: 10.0.0.2
    roles: [postgres, redis]

  # The only worker today.
  worker:
    address: 10.0.0.3 # rack 2
    roles: [worker]
    # a trailing comment of the worker

  web:
    address: 10.0.0.4
    roles: [web]
# end of hosts
";

    fn worker_2() -> NewHost {
        NewHost {
            name: "worker-2".into(),
            address: "10.0.0.5".into(),
            roles: vec!["worker".into()],
            ssh_user: None,
            ssh_port: None,
        }
    }

    fn problems(error: EditError) -> Vec<String> {
        match error {
            EditError::Rejected { problems } => problems.iter().map(|p| p.to_string()).collect(),
            other => panic!("expected a rejected edit, got: {other}"),
        }
    }

    #[test]
    fn fixture_is_valid() {
        parse_inventory(COMMENTED).expect("the test inventory is valid");
    }

    #[test]
    fn add_host_appends_in_file_style() {
        let edited = add_host(COMMENTED, &worker_2()).unwrap();
        let expected = COMMENTED.replace(
            "    roles: [web]\n# end of hosts\n",
            "    roles: [web]\n\n  worker-2:\n    address: 10.0.0.5\n    roles: [worker]\n\
             # end of hosts\n",
        );
        assert_eq!(edited, expected);
    }

    #[test]
    fn add_host_to_repository_inventory() {
        let original = include_str!("../../inventory.yaml");
        let edited = add_host(original, &worker_2()).unwrap();
        let addition = "  worker-2:\n    address: 10.0.0.5\n    roles: [worker]\n";
        let prefix = if original.ends_with('\n') { "" } else { "\n" };
        assert_eq!(edited, format!("{original}{prefix}{addition}"));
    }

    #[test]
    fn add_host_with_ssh_settings() {
        let host = NewHost {
            ssh_user: Some("ops".into()),
            ssh_port: Some(2222),
            ..worker_2()
        };
        let edited = add_host(COMMENTED, &host).unwrap();
        assert!(
            edited.contains(
                "\n  worker-2:\n    address: 10.0.0.5\n    roles: [worker]\n    ssh:\n      \
                 user: ops\n      port: 2222\n# end of hosts\n"
            ),
            "{edited}"
        );
        let inventory = parse_inventory(&edited).unwrap();
        let added = inventory.host("worker-2").unwrap();
        assert_eq!(added.ssh.user, "ops");
        assert_eq!(added.ssh.port, 2222);
    }

    #[test]
    fn add_host_copies_block_role_list() {
        let original = "\
app:
  database: {name: db, user: app, password: {env: PG}}
  redis: {password: {env: REDIS}}
hosts:
    data:
        address: 10.0.0.2
        roles:
          - postgres
          - redis
";
        let host = NewHost {
            roles: vec!["worker".into(), "web".into()],
            ..worker_2()
        };
        let edited = add_host(original, &host).unwrap();
        let expected = format!(
            "{original}    worker-2:\n        address: 10.0.0.5\n        roles:\n          \
             - worker\n          - web\n"
        );
        assert_eq!(edited, expected);
    }

    #[test]
    fn add_host_copies_flow_hosts() {
        let original = "\
app:
  database: {name: db, user: app, password: {env: PG}}
  redis: {password: {env: REDIS}}
hosts:
  data: {roles: [postgres, redis], address: 10.0.0.2}  # one line per host
";
        let host = NewHost {
            ssh_port: Some(2200),
            ..worker_2()
        };
        let edited = add_host(original, &host).unwrap();
        let expected = format!(
            "{original}  worker-2: {{address: 10.0.0.5, roles: [worker], ssh: {{port: 2200}}}}\n"
        );
        assert_eq!(edited, expected);
    }

    #[test]
    fn add_host_keeps_crlf_line_endings() {
        let original = "app:\r\n  database: {name: db, user: app, password: {env: PG}}\r\n  \
                        redis: {password: {env: REDIS}}\r\nhosts:\r\n  data:\r\n    \
                        address: 10.0.0.2\r\n    roles: [postgres, redis]";
        let edited = add_host(original, &worker_2()).unwrap();
        let expected = format!(
            "{original}\r\n  worker-2:\r\n    address: 10.0.0.5\r\n    roles: [worker]\r\n"
        );
        assert_eq!(edited, expected);
    }

    #[test]
    fn add_host_rejects_existing_name() {
        let host = NewHost {
            name: "worker".into(),
            ..worker_2()
        };
        let error = add_host(COMMENTED, &host).unwrap_err();
        assert!(
            matches!(error, EditError::HostExists { ref name } if name == "worker"),
            "{error}"
        );
    }

    #[test]
    fn add_host_rejects_duplicate_address() {
        let host = NewHost {
            address: "10.0.0.3".into(),
            ..worker_2()
        };
        let found = problems(add_host(COMMENTED, &host).unwrap_err());
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].ends_with(
                "hosts.worker-2.address 10.0.0.3 is already the address of host `worker`"
            ),
            "{found:?}"
        );
    }

    #[test]
    fn add_host_rejects_invalid_arguments() {
        let cases = [
            NewHost {
                address: "10.0.0.256".into(),
                ..worker_2()
            },
            NewHost {
                roles: vec!["wroker".into()],
                ..worker_2()
            },
            NewHost {
                roles: vec!["worker".into(), "worker".into()],
                ..worker_2()
            },
            NewHost {
                name: "Worker_2".into(),
                ..worker_2()
            },
            NewHost {
                ssh_user: Some("deploy\n  evil: true".into()),
                ..worker_2()
            },
        ];
        for host in cases {
            let error = add_host(COMMENTED, &host).unwrap_err();
            assert!(
                matches!(error, EditError::InvalidArgument { .. }),
                "{host:?}: {error}"
            );
        }
        let error = add_host(
            COMMENTED,
            &NewHost {
                roles: vec!["wroker".into()],
                ..worker_2()
            },
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("did you mean `worker`?"),
            "{error}"
        );
    }

    #[test]
    fn add_host_rejects_flow_hosts_mapping() {
        let original = "app:\n  database: {name: db, user: app, password: {env: PG}}\n  redis: \
                        {password: {env: REDIS}}\nhosts: {data: {address: 10.0.0.2, roles: \
                        [postgres, redis]}}\n";
        let error = add_host(original, &worker_2()).unwrap_err();
        assert!(matches!(error, EditError::FlowHosts), "{error}");
    }

    #[test]
    fn remove_host_takes_comment_above() {
        let edited = remove_host(COMMENTED, "worker").unwrap();
        let expected = COMMENTED.replace(
            "  # The only worker today.\n  worker:\n    address: 10.0.0.3 # rack 2\n    roles: \
             [worker]\n    # a trailing comment of the worker\n\n",
            "",
        );
        assert_ne!(edited, COMMENTED);
        assert_eq!(edited, expected);
    }

    #[test]
    fn remove_last_host_keeps_closing_comment() {
        let edited = remove_host(COMMENTED, "web").unwrap();
        let expected = COMMENTED.replace(
            "\n  web:\n    address: 10.0.0.4\n    roles: [web]\n# end of hosts\n",
            "# end of hosts\n",
        );
        assert_eq!(edited, expected);
    }

    #[test]
    fn remove_host_then_add_host_round_trip() {
        let added = add_host(COMMENTED, &worker_2()).unwrap();
        let removed = remove_host(&added, "worker-2").unwrap();
        assert_eq!(removed, COMMENTED);
    }

    #[test]
    fn remove_host_rejects_only_postgres_host() {
        let found = problems(remove_host(COMMENTED, "db").unwrap_err());
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].contains("no host has the role `postgres`"),
            "{found:?}"
        );
        assert!(
            found[1].contains("no host has the role `redis`"),
            "{found:?}"
        );
    }

    #[test]
    fn remove_host_rejects_unknown_name() {
        let error = remove_host(COMMENTED, "wroker").unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, EditError::UnknownHost { .. }), "{message}");
        assert!(message.contains("did you mean `worker`?"), "{message}");
        assert!(message.contains("which has: db, worker, web"), "{message}");
    }

    #[test]
    fn set_keeps_trailing_comment() {
        let edited = set_value(COMMENTED, "app.worker.concurrency", "8").unwrap();
        let expected =
            COMMENTED.replace("concurrency: 4 # four slots", "concurrency: 8 # four slots");
        assert_eq!(edited, expected);
    }

    #[test]
    fn set_replaces_quoted_scalar() {
        let edited = set_value(COMMENTED, "app.queue", "jobs:v2").unwrap();
        let expected = COMMENTED.replace(
            "queue: 'yametee:jobs'   # quoted on purpose",
            "queue: jobs:v2   # quoted on purpose",
        );
        assert_eq!(edited, expected);
    }

    #[test]
    fn set_replaces_scalar_with_escaped_quote() {
        let original = COMMENTED.replace(
            "start_command:   # filled in at launch",
            "start_command: 'it''s # not a comment' # a comment",
        );
        let edited = set_value(&original, "app.web.start_command", "npm start").unwrap();
        let expected = COMMENTED.replace(
            "start_command:   # filled in at launch",
            "start_command: npm start # a comment",
        );
        assert_eq!(edited, expected);
    }

    #[test]
    fn set_value_inside_flow_mapping() {
        let edited = set_value(COMMENTED, "app.database.password.env", "NEW_PG").unwrap();
        let expected = COMMENTED.replace("{env: PG_PASSWORD}", "{env: NEW_PG}");
        assert_eq!(edited, expected);
    }

    #[test]
    fn set_value_after_non_ascii_text() {
        let edited = set_value(COMMENTED, "app.smtp.from", "noreply@yametee.example").unwrap();
        let expected = COMMENTED.replace(
            "from: zoë@yametee.example # ünïcode",
            "from: noreply@yametee.example # ünïcode",
        );
        assert_eq!(edited, expected);
    }

    #[test]
    fn set_fills_empty_value() {
        let edited = set_value(COMMENTED, "app.web.start_command", "npm run start").unwrap();
        let expected = COMMENTED.replace(
            "start_command:   # filled in at launch",
            "start_command: npm run start   # filled in at launch",
        );
        assert_eq!(edited, expected);
    }

    #[test]
    fn set_quotes_string_that_reads_as_other_type() {
        let edited = set_value(COMMENTED, "app.web.start_command", "'true'").unwrap();
        assert!(
            edited.contains("    start_command: \"true\"   # filled in at launch\n"),
            "{edited}"
        );
        let inventory = parse_inventory(&edited).unwrap();
        assert_eq!(inventory.app.web.start_command.as_deref(), Some("true"));
    }

    #[test]
    fn set_replaces_flow_role_list() {
        let edited = set_value(COMMENTED, "hosts.worker.roles", "[worker,web]").unwrap();
        let expected = COMMENTED.replace("    roles: [worker]\n", "    roles: [worker, web]\n");
        assert_eq!(edited, expected);
    }

    #[test]
    fn set_creates_missing_key() {
        let edited = set_value(COMMENTED, "app.worker.memory_budget_mb", "300").unwrap();
        let expected = COMMENTED.replace(
            "    concurrency: 4 # four slots\n",
            "    concurrency: 4 # four slots\n    memory_budget_mb: 300\n",
        );
        assert_eq!(edited, expected);
    }

    #[test]
    fn set_creates_missing_mapping() {
        let edited = set_value(COMMENTED, "hosts.worker.ssh.port", "2222").unwrap();
        let expected = COMMENTED.replace(
            "    roles: [worker]\n",
            "    roles: [worker]\n    ssh:\n      port: 2222\n",
        );
        assert_eq!(edited, expected);
        let inventory = parse_inventory(&edited).unwrap();
        assert_eq!(inventory.host("worker").unwrap().ssh.port, 2222);
    }

    #[test]
    fn set_creates_key_in_flow_mapping() {
        let original = "\
app:
  database: {name: db, user: app, password: {env: PG}}
  redis: {password: {env: REDIS}} # flow
hosts:
  data: {address: 10.0.0.2, roles: [postgres, redis]}
";
        let edited = set_value(original, "app.redis.maxmemory", "256mb").unwrap();
        let expected = original.replace(
            "{password: {env: REDIS}} # flow",
            "{password: {env: REDIS}, maxmemory: 256mb} # flow",
        );
        assert_eq!(edited, expected);
    }

    #[test]
    fn set_rejects_unknown_key_with_suggestion() {
        let error = set_value(COMMENTED, "app.worker.concurency", "8").unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, EditError::UnknownPath { .. }), "{message}");
        assert!(message.contains("did you mean `concurrency`?"), "{message}");
    }

    #[test]
    fn set_rejects_unknown_host() {
        let error = set_value(COMMENTED, "hosts.wroker.address", "10.0.0.9").unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, EditError::UnknownPath { .. }), "{message}");
        assert!(message.contains("did you mean `worker`?"), "{message}");
    }

    #[test]
    fn set_rejects_invalid_values() {
        let cases = [
            (
                "app.worker.concurrency",
                "0",
                "expected a whole number from 1 to 64",
            ),
            (
                "app.worker.concurrency",
                "many",
                "expected a whole number from 1 to 64",
            ),
            (
                "hosts.worker.address",
                "10.0.0.2",
                "is already the address of host `db`",
            ),
            ("hosts.worker.address", "10.0.0", "expected an IPv4 address"),
            ("hosts.worker.roles", "[wroker]", "did you mean `worker`?"),
            (
                "hosts.db.roles",
                "[postgres]",
                "no host has the role `redis`",
            ),
        ];
        for (path, value, expected) in cases {
            let found = problems(set_value(COMMENTED, path, value).unwrap_err());
            assert!(
                found.iter().any(|problem| problem.contains(expected)),
                "{path} {value}: {found:?}"
            );
        }
    }

    #[test]
    fn set_rejects_non_scalar_target() {
        let error = set_value(COMMENTED, "app.database.password", "secret").unwrap_err();
        assert!(matches!(error, EditError::NotScalar { .. }), "{error}");
        let error = set_value(COMMENTED, "app.database", "{name: x}").unwrap_err();
        assert!(matches!(error, EditError::InvalidValue { .. }), "{error}");
        let error = set_value(COMMENTED, "app.queue", "a\nb").unwrap_err();
        assert!(matches!(error, EditError::InvalidValue { .. }), "{error}");
        let error = set_value(COMMENTED, "app.queue.name", "x").unwrap_err();
        assert!(matches!(error, EditError::NotMapping { .. }), "{error}");
        let error = set_value(COMMENTED, "app..queue", "x").unwrap_err();
        assert!(
            matches!(error, EditError::InvalidArgument { .. }),
            "{error}"
        );
    }

    #[test]
    fn set_rejects_block_scalar() {
        let original = COMMENTED.replace(
            "    start_command:   # filled in at launch\n",
            "    start_command: |\n      npm run start\n",
        );
        let error = set_value(&original, "app.web.start_command", "npm start").unwrap_err();
        assert!(matches!(error, EditError::Unsupported { .. }), "{error}");
    }

    #[test]
    fn same_value_changes_nothing() {
        let edited = set_value(COMMENTED, "app.worker.concurrency", "4").unwrap();
        assert_eq!(edited, COMMENTED);
        assert_eq!(unified_diff("inventory.yaml", COMMENTED, &edited), "");
    }

    #[test]
    fn scalar_text_quotes_when_needed() {
        let cases = [
            ("yametee:jobs", "yametee:jobs"),
            ("npm run start", "npm run start"),
            ("/srv/web", "/srv/web"),
            ("true", "\"true\""),
            ("null", "\"null\""),
            ("0x1f", "\"0x1f\""),
            ("", "\"\""),
            ("a: b", "\"a: b\""),
            ("x #y", "\"x #y\""),
            ("[web]", "\"[web]\""),
            ("say \"hi\"\n", "\"say \\\"hi\\\"\\n\""),
        ];
        for (text, expected) in cases {
            assert_eq!(scalar_text(text), expected, "{text:?}");
        }
    }

    #[test]
    fn unified_diff_names_file_and_change() {
        let edited = set_value(COMMENTED, "app.worker.concurrency", "8").unwrap();
        let diff = unified_diff("inventory.yaml", COMMENTED, &edited);
        assert!(
            diff.starts_with("--- inventory.yaml\n+++ inventory.yaml\n"),
            "{diff}"
        );
        assert!(
            diff.contains("\n-    concurrency: 4 # four slots\n"),
            "{diff}"
        );
        assert!(
            diff.contains("\n+    concurrency: 8 # four slots\n"),
            "{diff}"
        );
    }

    #[test]
    fn write_atomically_keeps_permissions() {
        use std::os::unix::fs::PermissionsExt;

        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("inventory.yaml");
        fs::write(&path, "old\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();

        write_atomically(&path, "old\n", "new\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new\n");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let leftovers = fs::read_dir(directory.path()).unwrap().count();
        assert_eq!(leftovers, 1, "the temporary file is gone");
    }

    #[test]
    fn write_atomically_detects_concurrent_change() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("inventory.yaml");
        fs::write(&path, "changed meanwhile\n").unwrap();

        let error = write_atomically(&path, "old\n", "new\n").unwrap_err();
        assert!(matches!(error, EditError::Changed { .. }), "{error}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "changed meanwhile\n");
        let leftovers = fs::read_dir(directory.path()).unwrap().count();
        assert_eq!(leftovers, 1, "the temporary file is gone");
    }

    #[test]
    fn write_atomically_follows_symlink() {
        let directory = tempfile::tempdir().unwrap();
        let target = directory.path().join("real.yaml");
        let link = directory.path().join("inventory.yaml");
        fs::write(&target, "old\n").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();

        write_atomically(&link, "old\n", "new\n").unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read_to_string(&target).unwrap(), "new\n");
    }
}
