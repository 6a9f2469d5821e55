//! Idempotency records: the response to a request sent with an `Idempotency-Key`, kept
//! sealed so that the same request sent again gets the same answer instead of acting twice.

use chartlog_domain::{Timestamp, UserId};
use chartlog_projections::db::SqlArg;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::accounts::Accounts;
use crate::error::{AccessError, IdempotencyError};
use crate::rows::{at_arg, plus, user_arg};
use crate::types::StoredResponse;

/// Longest idempotency key, in characters.
pub const IDEMPOTENCY_KEY_LENGTH_MAX: usize = 255;

impl Accounts {
    /// The response stored for `user`'s `key`, if one is kept and unexpired. The same key
    /// with another request's fingerprint is refused.
    pub async fn idempotent_replay(
        &self,
        user: UserId,
        key: &str,
        request_fingerprint: [u8; 32],
        now: Timestamp,
    ) -> Result<Option<StoredResponse>, IdempotencyError> {
        let key_hash = key_digest(key)?;
        let Some(row) = self
            .db()
            .fetch_optional(
                "SELECT fingerprint, status, body_sealed, expires_at_us \
                 FROM chartlog_access_idempotency_records WHERE user_id = $1 AND key_hash = $2",
                vec![user_arg(user), SqlArg::Bytes(key_hash.to_vec())],
            )
            .await
            .map_err(AccessError::from)?
        else {
            return Ok(None);
        };
        let expires_at_us = row.i64(3).map_err(AccessError::from)?;
        if expires_at_us <= now.unix_micros() {
            return Ok(None);
        }
        let fingerprint = row.bytes(0).map_err(AccessError::from)?;
        if !bool::from(fingerprint.as_slice().ct_eq(&request_fingerprint)) {
            return Err(IdempotencyError::KeyReusedForDifferentRequest);
        }
        let status = u16::try_from(row.i64(1).map_err(AccessError::from)?)
            .map_err(|_| AccessError::Corrupt("idempotent response status"))?;
        let sealed = row.bytes(2).map_err(AccessError::from)?;
        let body = self.secrets().open(
            &associated_data(user, &key_hash, status, &request_fingerprint)
                .iter()
                .map(Vec::as_slice)
                .collect::<Vec<_>>(),
            &sealed,
        )?;
        Ok(Some(StoredResponse { status, body }))
    }

    /// Keeps `response` for `user`'s `key` for the retention period. A live record under the
    /// key is kept as it is; an expired one is replaced.
    pub async fn remember_response(
        &self,
        user: UserId,
        key: &str,
        request_fingerprint: [u8; 32],
        response: &StoredResponse,
        now: Timestamp,
    ) -> Result<(), AccessError> {
        let key_hash = key_digest(key)?;
        assert!(
            (100..=599).contains(&response.status),
            "an HTTP status is between 100 and 599"
        );
        let sealed = self.secrets().seal(
            &associated_data(user, &key_hash, response.status, &request_fingerprint)
                .iter()
                .map(Vec::as_slice)
                .collect::<Vec<_>>(),
            &response.body,
        );
        let expires_at_us = plus(now, self.settings().idempotency_retention);
        self.db()
            .execute(
                "INSERT INTO chartlog_access_idempotency_records \
                 (user_id, key_hash, fingerprint, status, body_sealed, created_at_us, expires_at_us) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (user_id, key_hash) DO UPDATE SET \
                     fingerprint = excluded.fingerprint, status = excluded.status, \
                     body_sealed = excluded.body_sealed, created_at_us = excluded.created_at_us, \
                     expires_at_us = excluded.expires_at_us \
                 WHERE chartlog_access_idempotency_records.expires_at_us <= $6",
                vec![
                    user_arg(user),
                    SqlArg::Bytes(key_hash.to_vec()),
                    SqlArg::Bytes(request_fingerprint.to_vec()),
                    SqlArg::I64(i64::from(response.status)),
                    SqlArg::Bytes(sealed),
                    at_arg(now),
                    SqlArg::I64(expires_at_us),
                ],
            )
            .await?;
        Ok(())
    }
}

/// SHA-256 of the key: the client's text is not stored as sent.
fn key_digest(key: &str) -> Result<[u8; 32], AccessError> {
    let length = key.chars().count();
    if length == 0 || length > IDEMPOTENCY_KEY_LENGTH_MAX {
        return Err(AccessError::InvalidIdempotencyKey);
    }
    let mut hasher = Sha256::new();
    hasher.update(b"chartlog-access/idempotency-key/v1\0");
    hasher.update(key.as_bytes());
    Ok(hasher.finalize().into())
}

/// What a sealed body is bound to: its owner, key, status and request, so a body moved to
/// another row, or a status changed, fails to open.
fn associated_data(
    user: UserId,
    key_hash: &[u8; 32],
    status: u16,
    fingerprint: &[u8; 32],
) -> [Vec<u8>; 5] {
    [
        b"idempotent-response".to_vec(),
        user.as_uuid().as_bytes().to_vec(),
        key_hash.to_vec(),
        status.to_be_bytes().to_vec(),
        fingerprint.to_vec(),
    ]
}
