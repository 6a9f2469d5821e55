//! Idempotency records: the response to a request sent with an `Idempotency-Key`, kept
//! sealed so that the same request sent again gets the same answer instead of acting twice.
//!
//! A request is named by its fingerprint: the caller's digest of it, stored only as an HMAC
//! under a key derived from the access key ([`AccessSecrets`](crate::AccessSecrets)). The
//! digest is a plain hash of the request, password and all when a note is signed; kept for
//! the retention period, it would let anyone with a copy of the database test guesses.
//!
//! A request claims its key before it acts ([`Accounts::reserve_idempotency_key`]): one
//! `INSERT .. ON CONFLICT` decides, on either backend, which of several simultaneous requests
//! runs. The claim is a row without an answer (status and body NULL) that lives for
//! [`IDEMPOTENCY_IN_PROGRESS_TIMEOUT`]; the request that holds it then stores its answer in
//! it ([`Accounts::complete_idempotency_key`]) or, when it failed, gives it up
//! ([`Accounts::release_idempotency_key`]) so that a retry may run. A claim whose holder
//! died (a crash between claiming and answering) expires, and the key may be claimed anew.

use std::time::Duration;

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

/// How long a claim on a key holds without an answer. Commands take milliseconds; a claim
/// this old belongs to a server that stopped mid-request, and must not lock the key until
/// the retention period ends.
pub const IDEMPOTENCY_IN_PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);

/// What a request learns when it claims its key.
#[derive(Debug)]
pub enum IdempotencyClaim {
    /// The key is this request's: run it, then complete or release the reservation.
    Reserved(IdempotencyReservation),
    /// The request ran before: send this answer again.
    Replay(StoredResponse),
    /// The same request, under the same key, is running now and has not answered yet.
    InProgress,
}

/// A claim on a key, held by the one request that runs. It names the claim's row exactly
/// (its reservation time as well as the key), so that a holder whose claim expired and was
/// taken over cannot complete or release the newer claim.
#[derive(Debug)]
pub struct IdempotencyReservation {
    user: UserId,
    key_hash: [u8; 32],
    fingerprint: [u8; 32],
    reserved_at_us: i64,
}

/// What the row under a key holds.
enum Recorded {
    /// No row, or an expired one.
    Nothing,
    Pending,
    Answered(StoredResponse),
}

impl Accounts {
    /// The response stored for `user`'s `key`, if one is kept and unexpired (`None` too while
    /// the request that claimed the key has not answered). The same key with another
    /// request's fingerprint is refused.
    pub async fn idempotent_replay(
        &self,
        user: UserId,
        key: &str,
        request_fingerprint: [u8; 32],
        now: Timestamp,
    ) -> Result<Option<StoredResponse>, IdempotencyError> {
        let key_hash = key_digest(key)?;
        let request_fingerprint = self.secrets().request_fingerprint(&request_fingerprint);
        match self
            .recorded(user, &key_hash, request_fingerprint, now)
            .await?
        {
            Recorded::Answered(stored) => Ok(Some(stored)),
            Recorded::Nothing | Recorded::Pending => Ok(None),
        }
    }

    /// Claims `user`'s `key` for the request with `request_fingerprint`, unless the key holds
    /// a live answer (replayed), a live claim (in progress), or another request's fingerprint
    /// (refused). An expired answer or claim is replaced.
    pub async fn reserve_idempotency_key(
        &self,
        user: UserId,
        key: &str,
        request_fingerprint: [u8; 32],
        now: Timestamp,
    ) -> Result<IdempotencyClaim, IdempotencyError> {
        let key_hash = key_digest(key)?;
        let request_fingerprint = self.secrets().request_fingerprint(&request_fingerprint);
        let reserved_at_us = now.unix_micros();
        let expires_at_us = plus(now, IDEMPOTENCY_IN_PROGRESS_TIMEOUT);
        // A look first: a replay, and a request polling a key in progress, then only read,
        // and leave SQLite's one write lock to the commands. Between a refused claim and the
        // look after it the row may expire or be released: claim again then. Twice is enough
        // for a row that changes once per request; a key still churning after that is
        // answered as in progress.
        for _ in 0..2 {
            match self
                .recorded(user, &key_hash, request_fingerprint, now)
                .await?
            {
                Recorded::Answered(stored) => return Ok(IdempotencyClaim::Replay(stored)),
                Recorded::Pending => return Ok(IdempotencyClaim::InProgress),
                Recorded::Nothing => {}
            }
            let claimed = self
                .db()
                .execute(
                    "INSERT INTO chartlog_access_idempotency_records \
                     (user_id, key_hash, fingerprint, status, body_sealed, created_at_us, \
                      expires_at_us) \
                     VALUES ($1, $2, $3, NULL, NULL, $4, $5) \
                     ON CONFLICT (user_id, key_hash) DO UPDATE SET \
                         fingerprint = excluded.fingerprint, status = NULL, body_sealed = NULL, \
                         created_at_us = excluded.created_at_us, \
                         expires_at_us = excluded.expires_at_us \
                     WHERE chartlog_access_idempotency_records.expires_at_us <= $4",
                    vec![
                        user_arg(user),
                        SqlArg::Bytes(key_hash.to_vec()),
                        SqlArg::Bytes(request_fingerprint.to_vec()),
                        SqlArg::I64(reserved_at_us),
                        SqlArg::I64(expires_at_us),
                    ],
                )
                .await
                .map_err(AccessError::from)?;
            if claimed == 1 {
                return Ok(IdempotencyClaim::Reserved(IdempotencyReservation {
                    user,
                    key_hash,
                    fingerprint: request_fingerprint,
                    reserved_at_us,
                }));
            }
        }
        Ok(IdempotencyClaim::InProgress)
    }

    /// Stores `response` as the answer of the request that holds `reservation`, kept for the
    /// retention period. `false`: the claim was no longer this request's (it outlived
    /// [`IDEMPOTENCY_IN_PROGRESS_TIMEOUT`] and another request took the key over), so
    /// nothing was stored.
    pub async fn complete_idempotency_key(
        &self,
        reservation: IdempotencyReservation,
        response: &StoredResponse,
        now: Timestamp,
    ) -> Result<bool, AccessError> {
        assert!(
            (100..=599).contains(&response.status),
            "an HTTP status is between 100 and 599"
        );
        let sealed = self.secrets().seal(
            &associated_data(
                reservation.user,
                &reservation.key_hash,
                response.status,
                &reservation.fingerprint,
            )
            .iter()
            .map(Vec::as_slice)
            .collect::<Vec<_>>(),
            &response.body,
        );
        let stored = self
            .db()
            .execute(
                "UPDATE chartlog_access_idempotency_records \
                 SET status = $5, body_sealed = $6, expires_at_us = $7 \
                 WHERE user_id = $1 AND key_hash = $2 AND fingerprint = $3 \
                   AND created_at_us = $4 AND status IS NULL",
                vec![
                    user_arg(reservation.user),
                    SqlArg::Bytes(reservation.key_hash.to_vec()),
                    SqlArg::Bytes(reservation.fingerprint.to_vec()),
                    SqlArg::I64(reservation.reserved_at_us),
                    SqlArg::I64(i64::from(response.status)),
                    SqlArg::Bytes(sealed),
                    SqlArg::I64(plus(now, self.settings().idempotency_retention)),
                ],
            )
            .await?;
        Ok(stored == 1)
    }

    /// Gives up the claim of a request that did not act (it was refused or failed), so that
    /// the key is free for a retry at once. A claim already taken over is left alone.
    pub async fn release_idempotency_key(
        &self,
        reservation: IdempotencyReservation,
    ) -> Result<(), AccessError> {
        self.db()
            .execute(
                "DELETE FROM chartlog_access_idempotency_records \
                 WHERE user_id = $1 AND key_hash = $2 AND fingerprint = $3 \
                   AND created_at_us = $4 AND status IS NULL",
                vec![
                    user_arg(reservation.user),
                    SqlArg::Bytes(reservation.key_hash.to_vec()),
                    SqlArg::Bytes(reservation.fingerprint.to_vec()),
                    SqlArg::I64(reservation.reserved_at_us),
                ],
            )
            .await?;
        Ok(())
    }

    /// The live row under `user`'s key, checked against the request's fingerprint.
    async fn recorded(
        &self,
        user: UserId,
        key_hash: &[u8; 32],
        request_fingerprint: [u8; 32],
        now: Timestamp,
    ) -> Result<Recorded, IdempotencyError> {
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
            return Ok(Recorded::Nothing);
        };
        let expires_at_us = row.i64(3).map_err(AccessError::from)?;
        if expires_at_us <= now.unix_micros() {
            return Ok(Recorded::Nothing);
        }
        let fingerprint = row.bytes(0).map_err(AccessError::from)?;
        if !bool::from(fingerprint.as_slice().ct_eq(&request_fingerprint)) {
            return Err(IdempotencyError::KeyReusedForDifferentRequest);
        }
        let Some(status) = row.opt_i64(1).map_err(AccessError::from)? else {
            return Ok(Recorded::Pending);
        };
        let status = u16::try_from(status)
            .map_err(|_| AccessError::Corrupt("idempotent response status"))?;
        let sealed = row
            .opt_bytes(2)
            .map_err(AccessError::from)?
            .ok_or(AccessError::Corrupt("idempotent response without a body"))?;
        let body = self.secrets().open(
            &associated_data(user, key_hash, status, &request_fingerprint)
                .iter()
                .map(Vec::as_slice)
                .collect::<Vec<_>>(),
            &sealed,
        )?;
        Ok(Recorded::Answered(StoredResponse { status, body }))
    }

    /// Keeps `response` for `user`'s `key` for the retention period. A live record under the
    /// key (an answer, or a claim in progress) is kept as it is; an expired one is replaced.
    pub async fn remember_response(
        &self,
        user: UserId,
        key: &str,
        request_fingerprint: [u8; 32],
        response: &StoredResponse,
        now: Timestamp,
    ) -> Result<(), AccessError> {
        let key_hash = key_digest(key)?;
        let request_fingerprint = self.secrets().request_fingerprint(&request_fingerprint);
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
