//! A PostgreSQL database of a test's own on the server at `DATABASE_URL` (the one the store
//! tests use), dropped at the end. Shared by the end-to-end test files that run the binary
//! against PostgreSQL.

/// A scratch database: `url` points the binary at it.
pub struct FreshPostgresDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl FreshPostgresDatabase {
    pub async fn create() -> Self {
        let admin_url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let name = format!("chartlog_test_{}", uuid::Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(&admin_url)
            .await
            .expect("PostgreSQL at DATABASE_URL");
        // The name is ours: a fixed prefix and a UUID's hex digits.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .expect("create the test database");
        pool.close().await;
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url.as_str(), |(base, _)| base);
        let url = format!("{base}/{name}");
        Self {
            admin_url,
            name,
            url,
        }
    }

    pub async fn drop(self) {
        let pool = sqlx::PgPool::connect(&self.admin_url)
            .await
            .expect("reconnect");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&pool)
        .await
        .expect("drop the test database");
        pool.close().await;
    }
}
