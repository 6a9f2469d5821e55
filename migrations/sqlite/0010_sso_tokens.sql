-- Identity-provider ID tokens already accepted, by SHA-256 digest, each kept until it
-- expires: a token is accepted once by every server on this database, not once per process.
-- Pruned with the other access records; not in backups (a restored token is long past the
-- age a token may have).
CREATE TABLE chartlog_access_sso_tokens (
    token_digest BLOB PRIMARY KEY CHECK (length(token_digest) = 32),
    expires_at_us INTEGER NOT NULL
) WITHOUT ROWID;
