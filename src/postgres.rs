//! The application's PostgreSQL role and database: created when missing, the password set
//! when it no longer matches the secret. SQL and passwords travel on standard input only.

use crate::inventory::Inventory;
use crate::plan::Change;
use crate::secrets::Secrets;
use crate::ssh::{Remote, RemoteCommand, SshError};

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

    let server_up = remote
        .output(&RemoteCommand::new("systemctl").args(["is-active", "postgresql.service"]))
        .await?
        .success();
    if !server_up && dry_run {
        // The server starts during apply; until then nothing can be checked.
        return Ok(vec![Change {
            kind: "postgres",
            target: format!(
                "role {} and database {} (checked once the server runs)",
                database.user, database.name
            ),
            action: "ensure".into(),
        }]);
    }

    let listing = format!(
        "SELECT 'role=' || count(*) FROM pg_roles WHERE rolname = {};\n\
         SELECT 'database=' || count(*) FROM pg_database WHERE datname = {};\n",
        sql_literal(&database.user),
        sql_literal(&database.name)
    );
    let output = remote.run(&psql_as_postgres().stdin(listing)).await?;
    let role_exists = output.lines().any(|line| line.trim() == "role=1");
    let database_exists = output.lines().any(|line| line.trim() == "database=1");
    let password_matches =
        role_exists && database_exists && password_works(remote, inventory, password).await?;

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

/// Whether the application user can log in over TCP with the secret password.
async fn password_works(
    remote: &Remote,
    inventory: &Inventory,
    password: &str,
) -> Result<bool, SshError> {
    let database = &inventory.app.database;
    let port = database.port.to_string();
    let script = r#"IFS= read -r PGPASSWORD; export PGPASSWORD
exec psql -X -A -t -q -w -h 127.0.0.1 -p "$1" -U "$2" -d "$3" -c 'SELECT 1'"#;
    let command = RemoteCommand::script(
        "check the database password",
        script,
        &[&port, &database.user, &database.name],
    )
    .stdin(format!("{password}\n"));
    let output = remote.output(&command).await?;
    Ok(output.success() && output.stdout.trim() == "1")
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
