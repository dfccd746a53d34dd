//! PostgreSQL connections and schema migrations.

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};
use tracing::{info, warn};

/// Time allowed to open a PostgreSQL connection when the URL sets no `connect_timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum time start-up waits for another worker to finish applying migrations.
pub const MIGRATION_LOCK_TIMEOUT: Duration = Duration::from_secs(60);
/// Advisory lock key that serialises migrations between workers ("yametee" in ASCII
/// followed by 0x01).
const MIGRATION_LOCK_KEY: i64 = 0x7961_6d65_7465_6501;

/// One schema change, embedded in the binary.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Schema changes in the order they are applied. A released migration is never edited:
/// a change goes in a new file with the next version.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial_schema",
        sql: include_str!("../migrations/0001_initial_schema.sql"),
    },
    Migration {
        version: 2,
        name: "email_delivery_and_stored_webhooks",
        sql: include_str!("../migrations/0002_email_delivery_and_stored_webhooks.sql"),
    },
];

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("timed out after {} s waiting for the migration lock held by another worker", .0.as_secs())]
    LockTimeout(Duration),
    #[error("migration {version} ({name}) failed")]
    Apply {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("reading the schema_migrations table failed")]
    Query(#[from] tokio_postgres::Error),
}

/// Connection settings parsed from `DATABASE_URL`, with a connect timeout added when the
/// URL sets none.
pub fn connection_config(
    database_url: &str,
) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::from_str(database_url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("yametee-worker");
    }
    Ok(config)
}

/// Opens a connection and drives it on a background task.
pub async fn connect(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            warn!(
                "PostgreSQL connection closed: {}",
                crate::error_chain(&error)
            );
        }
    });
    Ok(client)
}

/// A PostgreSQL connection owned by one job at a time, reopened when it was lost.
pub struct DatabaseSlot {
    config: tokio_postgres::Config,
    client: Option<Client>,
}

impl DatabaseSlot {
    /// Creates a slot that connects on first use, or starts with `client`.
    pub fn new(config: tokio_postgres::Config, client: Option<Client>) -> DatabaseSlot {
        DatabaseSlot { config, client }
    }

    /// Returns an open connection, reconnecting first when the previous one closed.
    pub async fn client(&mut self) -> Result<&mut Client, tokio_postgres::Error> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(connect(&self.config).await?);
        }
        Ok(self.client.as_mut().expect("client was set above"))
    }

    /// Cancels the query the connection may still be running and closes it, so that the
    /// next job gets a fresh connection.
    ///
    /// Used after a job timed out. Dropping the job's future does not stop its query on
    /// the server, and the next job's queries would queue behind it on this connection.
    pub async fn discard(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };

        let cancel_token = client.cancel_token();
        let cancel = cancel_token.cancel_query(NoTls);
        match tokio::time::timeout(CONNECT_TIMEOUT, cancel).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(
                "Cancelling the query of a timed-out job failed: {}",
                crate::error_chain(&error)
            ),
            Err(_) => warn!(
                "Cancelling the query of a timed-out job timed out after {} s",
                CONNECT_TIMEOUT.as_secs()
            ),
        }
    }
}

/// Applies the pending [`MIGRATIONS`] while holding a PostgreSQL advisory lock, so that
/// workers starting together apply each migration once.
pub async fn apply_migrations(client: &mut Client) -> Result<(), MigrationError> {
    acquire_migration_lock(client).await?;
    let result = apply_pending_migrations(client).await;

    // The lock is released with the session anyway; unlocking here keeps it short.
    if let Err(error) = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await
    {
        warn!(
            "Releasing the migration lock failed: {}",
            crate::error_chain(&error)
        );
    }
    result
}

async fn acquire_migration_lock(client: &Client) -> Result<(), MigrationError> {
    let started = tokio::time::Instant::now();
    let mut logged_wait = false;

    loop {
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        if started.elapsed() >= MIGRATION_LOCK_TIMEOUT {
            return Err(MigrationError::LockTimeout(MIGRATION_LOCK_TIMEOUT));
        }
        if !logged_wait {
            info!("Waiting for another worker to finish applying migrations");
            logged_wait = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn apply_pending_migrations(client: &mut Client) -> Result<(), MigrationError> {
    client
        // Without the SET, PostgreSQL sends a NOTICE that the table exists at every start,
        // and the client library logs it.
        .batch_execute(
            "SET client_min_messages TO warning;
             CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer     PRIMARY KEY,
                 name       text        NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;

    let applied: Vec<i32> = client
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();

    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        let apply_error = |source| MigrationError::Apply {
            version: migration.version,
            name: migration.name,
            source,
        };

        let transaction = client.transaction().await.map_err(apply_error)?;
        transaction
            .batch_execute(migration.sql)
            .await
            .map_err(apply_error)?;
        transaction
            .execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&migration.version, &migration.name],
            )
            .await
            .map_err(apply_error)?;
        transaction.commit().await.map_err(apply_error)?;

        info!(
            version = migration.version,
            "Applied database migration {} ({})", migration.version, migration.name
        );
    }

    let newest_known = MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0);
    if let Some(newest_applied) = applied.iter().copied().max().filter(|v| *v > newest_known) {
        warn!(
            "Database schema is at version {newest_applied}, newer than this worker's {newest_known}: \
             an older worker binary is running against a newer schema"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_have_increasing_versions() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        sorted.dedup();

        assert_eq!(versions, sorted);
        assert_eq!(versions.first(), Some(&1));
    }

    #[test]
    fn connection_config_adds_connect_timeout() {
        let config = connection_config("postgres://u:p@127.0.0.1:5432/db").unwrap();
        assert_eq!(config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
    }

    #[test]
    fn connection_config_keeps_url_timeout() {
        let config =
            connection_config("postgres://u:p@127.0.0.1:5432/db?connect_timeout=3").unwrap();
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(3)));
    }
}
