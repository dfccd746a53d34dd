//! The application's PostgreSQL role and database: created when missing, the password set
//! when it no longer matches the secret. SQL and passwords travel on standard input only.

use crate::inventory::Inventory;
use crate::plan::Change;
use crate::secrets::Secrets;
use crate::ssh::{Remote, RemoteCommand, SshError};

/// Action of the planned change when the server was not running, so nothing could be checked.
const WAIT_FOR_SERVER: &str = "ensure";

/// Tells whether `planned` shows the server was not running when planned: the role and database
/// can then only be made once apply has started it.
pub fn waits_for_server(planned: &[Change]) -> bool {
    planned
        .iter()
        .any(|change| change.action == WAIT_FOR_SERVER)
}

/// Checks the role, its password and the database; unless `dry_run`, fixes what is missing.
/// Returns the changes made (or, in a dry run, those that would be).
pub async fn ensure_access(
    remote: &Remote,
    inventory: &Inventory,
    secrets: &Secrets,
    dry_run: bool,
) -> Result<Vec<Change>, SshError> {
    let database = &inventory.app.database;
    let password = secrets.get("app.database.password");

    let state = read_state(remote, inventory, password).await?;
    if !state.server_up && dry_run {
        // The server starts during apply; until then nothing can be checked.
        return Ok(vec![Change {
            kind: "postgres",
            target: format!(
                "role {} and database {} (checked once the server runs)",
                database.user, database.name
            ),
            action: WAIT_FOR_SERVER.into(),
        }]);
    }
    let AccessState {
        role_exists,
        database_exists,
        password_matches,
        ..
    } = state;

    let mut sql = String::new();
    let mut changes = Vec::new();
    if !role_exists {
        sql.push_str(&format!(
            "CREATE ROLE {} LOGIN PASSWORD {};\n",
            sql_identifier(&database.user),
            sql_literal(password)
        ));
        changes.push(change(&database.user, "create"));
    } else if !password_matches {
        sql.push_str(&format!(
            "ALTER ROLE {} WITH LOGIN PASSWORD {};\n",
            sql_identifier(&database.user),
            sql_literal(password)
        ));
        changes.push(change(&database.user, "set password"));
    }
    if !database_exists {
        sql.push_str(&format!(
            "CREATE DATABASE {} OWNER {};\n",
            sql_identifier(&database.name),
            sql_identifier(&database.user)
        ));
        changes.push(Change {
            kind: "postgres",
            target: format!("database {}", database.name),
            action: "create".into(),
        });
    }

    if sql.is_empty() || dry_run {
        return Ok(changes);
    }
    tracing::info!(host = %remote.host(), "creating PostgreSQL role and database where missing");
    remote.run(&psql_as_postgres().stdin(sql)).await?;
    Ok(changes)
}

fn change(user: &str, action: &str) -> Change {
    Change {
        kind: "postgres",
        target: format!("role {user}"),
        action: action.into(),
    }
}

fn psql_as_postgres() -> RemoteCommand {
    // `cd /` keeps psql from warning that it cannot enter the login user's home directory.
    RemoteCommand::script(
        "psql as postgres",
        "cd / && exec psql -X -A -t -q -v ON_ERROR_STOP=1 -d postgres",
        &[],
    )
    .as_user("postgres")
}

/// State of the application's role and database, as [`read_state`] read it.
struct AccessState {
    server_up: bool,
    role_exists: bool,
    database_exists: bool,
    password_matches: bool,
}

/// Reads, in one remote script, whether the server runs, whether the role and database exist
/// and whether the role logs in over TCP with the secret password.
async fn read_state(
    remote: &Remote,
    inventory: &Inventory,
    password: &str,
) -> Result<AccessState, SshError> {
    let database = &inventory.app.database;
    let script = r#"IFS= read -r PGPASSWORD
cd /
systemctl is-active --quiet postgresql.service || { echo server=down; exit 0; }
echo server=up
runuser -u postgres -- psql -X -A -t -q -d postgres -c "$1" -c "$2"
if PGPASSWORD="$PGPASSWORD" psql -X -A -t -q -w -h 127.0.0.1 -p "$3" -U "$4" -d "$5" -c 'SELECT 1' > /dev/null 2>&1
then echo password=ok
else echo password=wrong
fi"#;
    let roles = format!(
        "SELECT 'role=' || count(*) FROM pg_roles WHERE rolname = {}",
        sql_literal(&database.user)
    );
    let databases = format!(
        "SELECT 'database=' || count(*) FROM pg_database WHERE datname = {}",
        sql_literal(&database.name)
    );
    let port = database.port.to_string();
    let command = RemoteCommand::script(
        "read the PostgreSQL role and database",
        script,
        &[&roles, &databases, &port, &database.user, &database.name],
    )
    .as_root()
    .stdin(format!("{password}\n"));
    let output = remote.run(&command).await?;
    let has = |line: &str| output.lines().any(|found| found.trim() == line);
    let role_exists = has("role=1");
    let database_exists = has("database=1");
    Ok(AccessState {
        server_up: has("server=up"),
        role_exists,
        database_exists,
        password_matches: role_exists && database_exists && has("password=ok"),
    })
}

/// Quotes a string as an SQL literal.
pub fn sql_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Quotes a name as an SQL identifier.
pub fn sql_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_quoting_doubles_quotes() {
        assert_eq!(sql_literal("it's"), "'it''s'");
        assert_eq!(sql_identifier("a\"b"), "\"a\"\"b\"");
    }
}
