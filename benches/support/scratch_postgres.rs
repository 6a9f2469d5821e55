//! A PostgreSQL database of a bench's own, created on the server `DATABASE_URL` names and
//! dropped when the bench is done, so a bench never writes into a database someone uses.

use anyhow::Context;
use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

pub struct ScratchDatabase {
    admin: PgConnection,
    name: String,
    /// The scratch database's URL: the server's, with the database name replaced.
    pub url: String,
}

impl ScratchDatabase {
    /// Creates `chartlog_bench_<random>` on the server of `server_url`.
    pub async fn create(server_url: &str) -> anyhow::Result<Self> {
        let name = format!("chartlog_bench_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(server_url)
            .await
            .context("connect to DATABASE_URL")?;
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .context("create the scratch database")?;
        let (base, _) = server_url
            .rsplit_once('/')
            .context("DATABASE_URL has no database path")?;
        let url = format!("{base}/{name}");
        Ok(Self { admin, name, url })
    }

    /// Drops the database, whoever is still connected to it.
    pub async fn drop(mut self) -> anyhow::Result<()> {
        self.admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE {} WITH (FORCE)",
                self.name
            )))
            .await
            .context("drop the scratch database")?;
        Ok(())
    }
}
