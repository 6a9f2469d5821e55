//! [`Accounts`]: user accounts, passwords, the second factor, logins with throttling, and
//! sessions.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chartlog_domain::{Role, Timestamp, UserId};
use chartlog_projections::db::{Backend, DbRow, ProjectionDb, ProjectionTx, SqlArg};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::{AccessError, ExpiryReason, LoginError, PasswordChangeError, SessionError};
use crate::password::{self, generate_one_time_password, hash_blocking, verify_any_blocking};
use crate::rows::user_columns;
use crate::rows::{UserRow, at_arg, clamped_timestamp, minus, plus, timestamp, user_arg, uuid_arg};
use crate::second_factor;
use crate::secrets::AccessSecrets;
use crate::settings::{
    AccessSettings, LOGIN_ATTEMPT_IN_FLIGHT_MAX, LOGIN_FAILURE_WINDOW,
    LOGIN_FAILURES_PER_ACCOUNT_MAX, LOGIN_FAILURES_PER_ADDRESS_MAX,
    LOGIN_IN_FLIGHT_RETRY_AFTER_SECONDS, PASSWORD_HISTORY_GENERATIONS,
};
use crate::types::{
    IdentityAssertion, LoginAttempt, LoginSuccess, NewUser, OneTimePassword, Password,
    RecoveryCodes, SESSION_TOKEN_LENGTH, SecondFactorCode, SecondFactorEnrollment,
    SecondFactorKind, Session, SessionStage, SessionToken, UserAccount, Username,
};

/// A session's last activity is written at most this often: a request within this long of
/// the last write skips it (the idle deadline may then come up to this much early).
pub const SESSION_TOUCH_INTERVAL: Duration = Duration::from_secs(5);
/// Ended sessions, failed logins and expired idempotency records are kept this long past
/// their end before [`Accounts::prune`] deletes them.
pub const PRUNE_GRACE: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest identity-provider subject (OIDC caps `sub` at 255 ASCII characters).
pub const SSO_SUBJECT_LENGTH_MAX: usize = 255;

/// The first key of the advisory locks that order the creation of patient accounts (the
/// second is taken from the patient id). Two-key advisory locks are a space of their own: no
/// single-key lock, such as the projection runner's, can collide with them.
const PATIENT_ACCOUNT_LOCK_CLASS: i64 = 0x6368_6c70;

/// What the session table says about a token's session.
const END_LOGOUT: &str = "logout";
const END_EXPIRED: &str = "expired";
const END_REVOKED: &str = "revoked";

/// Accounts, sessions, break-glass grants and idempotency records over the chartlog database
/// (SQLite or PostgreSQL). Cheap to clone: the state is shared.
#[derive(Clone)]
pub struct Accounts {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub db: ProjectionDb,
    pub secrets: AccessSecrets,
    pub settings: AccessSettings,
    /// An argon2id hash of a password nobody knows, verified for unknown and disabled
    /// accounts so their logins take as long as a wrong password.
    dummy_hash: tokio::sync::OnceCell<String>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("backend", &self.inner.db.backend())
            .finish_non_exhaustive()
    }
}

impl Accounts {
    /// Panics on settings below the policy's floors (see [`AccessSettings`]).
    pub fn new(db: ProjectionDb, secrets: AccessSecrets, settings: AccessSettings) -> Self {
        settings.assert_valid();
        Self {
            inner: Arc::new(Inner {
                db,
                secrets,
                settings,
                dummy_hash: tokio::sync::OnceCell::new(),
            }),
        }
    }

    pub fn settings(&self) -> &AccessSettings {
        &self.inner.settings
    }

    pub(crate) fn db(&self) -> &ProjectionDb {
        &self.inner.db
    }

    pub(crate) fn secrets(&self) -> &AccessSecrets {
        &self.inner.secrets
    }

    // ---------------------------------------------------------------- accounts

    /// Creates the first administrator with a one-time password, if there is no account at
    /// all; otherwise does nothing and returns `None`.
    #[tracing::instrument(skip_all)]
    pub async fn bootstrap_administrator(
        &self,
        username: &Username,
        now: Timestamp,
    ) -> Result<Option<OneTimePassword>, AccessError> {
        if self.user_count().await? > 0 {
            return Ok(None);
        }
        let one_time = generate_one_time_password();
        let hash = hash_blocking(self.settings().password_hashing, &one_time.to_password()).await?;
        let mut tx = self.db().begin().await?;
        if tx.backend() == Backend::Postgres {
            // Two first starts racing must not both create an administrator: the second waits
            // here and then sees the first's account.
            tx.execute(
                "LOCK TABLE chartlog_access_users IN SHARE ROW EXCLUSIVE MODE",
                vec![],
            )
            .await?;
        }
        let row = tx
            .fetch_optional("SELECT COUNT(*) FROM chartlog_access_users", vec![])
            .await?;
        if row.map(|row| row.i64(0)).transpose()?.unwrap_or(0) > 0 {
            return Ok(None);
        }
        let user_id = UserId::from_uuid(Uuid::new_v4());
        if !insert_user(
            &mut tx,
            user_id,
            username,
            Role::Administrator,
            None,
            &hash,
            now,
        )
        .await?
        {
            return Err(AccessError::UsernameTaken);
        }
        tx.commit().await?;
        tracing::info!(user_id = %user_id, "bootstrap administrator created");
        Ok(Some(one_time))
    }

    /// Creates an account with a one-time password it must change at its first login. A
    /// patient has one account: a patient id an account (enabled or disabled) already reads
    /// as is refused with [`AccessError::PatientAccountExists`].
    #[tracing::instrument(skip_all, fields(role = new.role.as_str()))]
    pub async fn create_user(
        &self,
        new: NewUser,
        now: Timestamp,
    ) -> Result<(UserAccount, OneTimePassword), AccessError> {
        if new.role == Role::System {
            return Err(AccessError::RoleNotAssignable { role: new.role });
        }
        match (new.role == Role::Patient, new.patient_id.is_some()) {
            (true, false) => return Err(AccessError::PatientIdRequired),
            (false, true) => return Err(AccessError::PatientIdNotAllowed { role: new.role }),
            _ => {}
        }
        if let Some(subject) = &new.sso_subject {
            check_sso_subject(subject)?;
            if self.user_row_by_sso_subject(subject).await?.is_some() {
                return Err(AccessError::SsoSubjectTaken);
            }
        }
        let one_time = generate_one_time_password();
        let hash = hash_blocking(self.settings().password_hashing, &one_time.to_password()).await?;
        let user_id = UserId::from_uuid(Uuid::new_v4());
        let mut tx = self.db().begin().await?;
        if let Some(patient_id) = new.patient_id
            && patient_has_account(&mut tx, patient_id).await?
        {
            return Err(AccessError::PatientAccountExists);
        }
        if !insert_user(
            &mut tx,
            user_id,
            &new.username,
            new.role,
            new.patient_id,
            &hash,
            now,
        )
        .await?
        {
            return Err(AccessError::UsernameTaken);
        }
        if let Some(subject) = &new.sso_subject {
            // In the account's own transaction: a subject taken meanwhile (the column is
            // unique) fails the whole creation, never leaves an unlinked account behind.
            tx.execute(
                "UPDATE chartlog_access_users SET sso_subject = $1 WHERE user_id = $2",
                vec![SqlArg::Text(subject.clone()), user_arg(user_id)],
            )
            .await?;
        }
        tx.commit().await?;
        tracing::info!(user_id = %user_id, "user created");
        let account = UserAccount {
            user_id,
            username: new.username,
            role: new.role,
            patient_id: new.patient_id,
            disabled: false,
            second_factor_enrolled: false,
            must_change_password: true,
            created_at: now,
            last_login_at: None,
            sso_subject: new.sso_subject,
        };
        Ok((account, one_time))
    }

    pub async fn user(&self, id: UserId) -> Result<Option<UserAccount>, AccessError> {
        Ok(self.user_row(id).await?.map(|row| row.account()))
    }

    /// Every account, by username.
    pub async fn list_users(&self) -> Result<Vec<UserAccount>, AccessError> {
        self.db()
            .fetch_all(
                concat!(
                    "SELECT ",
                    user_columns!(),
                    " FROM chartlog_access_users ORDER BY username"
                ),
                vec![],
            )
            .await?
            .iter()
            .map(|row| UserRow::read(row, 0).map(|user| user.account()))
            .collect()
    }

    /// Disables an account and ends its sessions at once.
    #[tracing::instrument(skip_all, fields(user_id = %id))]
    pub async fn disable_user(&self, id: UserId, now: Timestamp) -> Result<(), AccessError> {
        let mut tx = self.db().begin().await?;
        let updated = tx
            .execute(
                "UPDATE chartlog_access_users SET disabled = $1, disabled_at_us = $2 \
                 WHERE user_id = $3 AND disabled = $4",
                vec![
                    SqlArg::Bool(true),
                    at_arg(now),
                    user_arg(id),
                    SqlArg::Bool(false),
                ],
            )
            .await?;
        if updated == 0 && !user_exists(&mut tx, id).await? {
            return Err(AccessError::UserNotFound { user_id: id });
        }
        revoke_sessions(&mut tx, id, now).await?;
        tx.commit().await?;
        tracing::info!("user disabled");
        Ok(())
    }

    /// Gives the account a new one-time password (to change at the next login) and ends its
    /// sessions.
    #[tracing::instrument(skip_all, fields(user_id = %id))]
    pub async fn reset_password(
        &self,
        id: UserId,
        now: Timestamp,
    ) -> Result<OneTimePassword, AccessError> {
        let user = self.existing_user(id).await?;
        let one_time = generate_one_time_password();
        let hash = hash_blocking(self.settings().password_hashing, &one_time.to_password()).await?;
        let mut tx = self.db().begin().await?;
        set_password(&mut tx, id, &hash, PasswordKind::OneTime, now).await?;
        revoke_sessions(&mut tx, id, now).await?;
        clear_account_failures(&mut tx, &user.username, now).await?;
        tx.commit().await?;
        tracing::info!("password reset");
        Ok(one_time)
    }

    /// Removes the account's second factor and recovery codes, and ends its sessions; the
    /// account enrolls again at its next login if its role needs a second factor.
    #[tracing::instrument(skip_all, fields(user_id = %id))]
    pub async fn reset_second_factor(&self, id: UserId, now: Timestamp) -> Result<(), AccessError> {
        let mut tx = self.db().begin().await?;
        let updated = tx
            .execute(
                "UPDATE chartlog_access_users \
                 SET totp_sealed = NULL, totp_pending_sealed = NULL, totp_last_step = NULL \
                 WHERE user_id = $1",
                vec![user_arg(id)],
            )
            .await?;
        if updated == 0 {
            return Err(AccessError::UserNotFound { user_id: id });
        }
        tx.execute(
            "DELETE FROM chartlog_access_recovery_codes WHERE user_id = $1",
            vec![user_arg(id)],
        )
        .await?;
        revoke_sessions(&mut tx, id, now).await?;
        tx.commit().await?;
        tracing::info!("second factor reset");
        Ok(())
    }

    /// Disables every account (not already disabled) whose last login, or creation if it
    /// never logged in, is older than the inactivity period; returns their ids.
    #[tracing::instrument(skip_all)]
    pub async fn deactivate_inactive(&self, now: Timestamp) -> Result<Vec<UserId>, AccessError> {
        let threshold = minus(now, self.settings().inactivity_deactivation);
        let mut tx = self.db().begin().await?;
        let ids = tx
            .fetch_all(
                "SELECT user_id FROM chartlog_access_users \
                 WHERE disabled = $1 AND COALESCE(last_login_at_us, created_at_us) < $2 \
                 ORDER BY user_id",
                vec![SqlArg::Bool(false), SqlArg::I64(threshold)],
            )
            .await?
            .iter()
            .map(|row| row.uuid(0).map(UserId::from_uuid))
            .collect::<Result<Vec<_>, _>>()?;
        for &id in &ids {
            tx.execute(
                "UPDATE chartlog_access_users SET disabled = $1, disabled_at_us = $2 \
                 WHERE user_id = $3",
                vec![SqlArg::Bool(true), at_arg(now), user_arg(id)],
            )
            .await?;
            revoke_sessions(&mut tx, id, now).await?;
        }
        tx.commit().await?;
        if !ids.is_empty() {
            tracing::info!(count = ids.len(), "inactive users disabled");
        }
        Ok(ids)
    }

    // ---------------------------------------------------------------- passwords

    /// Replaces the password after checking the current one and the policy: length for the
    /// account's role, not a common password, not containing the username, none of the last
    /// five. Ends all the account's sessions (the caller logs in again).
    #[tracing::instrument(skip_all, fields(user_id = %id))]
    pub async fn change_password(
        &self,
        id: UserId,
        current: &Password,
        new: &Password,
        now: Timestamp,
    ) -> Result<(), PasswordChangeError> {
        let user = self.existing_user(id).await?;
        if user.disabled {
            return Err(AccessError::UserDisabled { user_id: id }.into());
        }
        let attempt = match self.count_attempt(Some(&user.username), None, now).await? {
            Ok(attempt) => attempt,
            Err(retry_after_seconds) => {
                return Err(PasswordChangeError::Throttled {
                    retry_after_seconds,
                });
            }
        };
        let verified = match verify_any_blocking(current, vec![user.password_hash.clone()]).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(PasswordChangeError::CurrentPasswordIncorrect),
            Err(error) => Err(error.into()),
        };
        self.settle_attempt(attempt, verified).await?;
        // The current password was right: what follows is the new one's policy, not a guess.
        self.forget_attempt(attempt).await?;
        password::check_policy(self.settings(), user.role, &user.username, new)?;
        let mut refused = self.password_history(id).await?;
        // A one-time password stays out of the history, where it would push out one the user
        // chose; but the administrator who issued it has seen it, so it cannot become the
        // user's own either.
        if user.must_change_password {
            refused.push(user.password_hash.clone());
        }
        if verify_any_blocking(new, refused).await? {
            return Err(PasswordChangeError::Reused {
                generations: PASSWORD_HISTORY_GENERATIONS,
            });
        }
        let hash = hash_blocking(self.settings().password_hashing, new).await?;
        let mut tx = self.db().begin().await.map_err(AccessError::from)?;
        set_password(&mut tx, id, &hash, PasswordKind::Chosen, now).await?;
        revoke_sessions(&mut tx, id, now).await?;
        clear_account_failures(&mut tx, &user.username, now).await?;
        tx.commit().await.map_err(AccessError::from)?;
        tracing::info!("password changed");
        Ok(())
    }

    async fn password_history(&self, id: UserId) -> Result<Vec<String>, AccessError> {
        let rows = self
            .db()
            .fetch_all(
                "SELECT password_hash FROM chartlog_access_password_history \
                 WHERE user_id = $1 ORDER BY generation DESC LIMIT $2",
                vec![
                    user_arg(id),
                    SqlArg::I64(PASSWORD_HISTORY_GENERATIONS as i64),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| row.text(0))
            .collect::<Result<_, _>>()?)
    }

    // ---------------------------------------------------------------- second factor

    /// Starts TOTP enrollment: a fresh secret, kept sealed until
    /// [`Accounts::confirm_second_factor_enrollment`] proves the authenticator has it.
    /// Starting again replaces the pending secret.
    #[tracing::instrument(skip_all, fields(user_id = %id))]
    pub async fn begin_second_factor_enrollment(
        &self,
        id: UserId,
        _now: Timestamp,
    ) -> Result<SecondFactorEnrollment, AccessError> {
        let user = self.existing_user(id).await?;
        if user.disabled {
            return Err(AccessError::UserDisabled { user_id: id });
        }
        if user.totp_sealed.is_some() {
            return Err(AccessError::SecondFactorAlreadyEnrolled { user_id: id });
        }
        let secret = second_factor::generate_secret();
        let totp = second_factor::totp(&secret, user.username.as_str())?;
        let enrollment = SecondFactorEnrollment {
            secret_base32: totp.secret().to_base32(),
            otpauth_uri: totp
                .to_url()
                .map_err(|_| AccessError::Corrupt("TOTP account name"))?,
        };
        let sealed = self
            .secrets()
            .seal(&[b"totp-pending", id.as_uuid().as_bytes()], &secret);
        self.db()
            .execute(
                "UPDATE chartlog_access_users SET totp_pending_sealed = $1 \
                 WHERE user_id = $2 AND totp_sealed IS NULL",
                vec![SqlArg::Bytes(sealed), user_arg(id)],
            )
            .await?;
        Ok(enrollment)
    }

    /// Finishes enrollment with a code from the authenticator; returns ten recovery codes,
    /// shown once. Sessions stay open and move past the enrollment stage.
    #[tracing::instrument(skip_all, fields(user_id = %id))]
    pub async fn confirm_second_factor_enrollment(
        &self,
        id: UserId,
        code: &SecondFactorCode,
        now: Timestamp,
    ) -> Result<RecoveryCodes, AccessError> {
        let user = self.existing_user(id).await?;
        if user.disabled {
            return Err(AccessError::UserDisabled { user_id: id });
        }
        if user.totp_sealed.is_some() {
            return Err(AccessError::SecondFactorAlreadyEnrolled { user_id: id });
        }
        let Some(pending) = user.totp_pending_sealed else {
            return Err(AccessError::NoPendingEnrollment { user_id: id });
        };
        let secret = Zeroizing::new(
            self.secrets()
                .open(&[b"totp-pending", id.as_uuid().as_bytes()], &pending)?,
        );
        let totp = second_factor::totp(&secret, user.username.as_str())?;
        let Some(step) = second_factor::matching_step(&totp, code, unix_seconds(now)) else {
            return Err(AccessError::InvalidSecondFactorCode);
        };
        let sealed = self
            .secrets()
            .seal(&[b"totp", id.as_uuid().as_bytes()], &secret);
        let (codes, digests) = second_factor::generate_recovery_codes();
        let mut tx = self.db().begin().await?;
        let updated = tx
            .execute(
                "UPDATE chartlog_access_users \
                 SET totp_sealed = $1, totp_pending_sealed = NULL, totp_last_step = $2 \
                 WHERE user_id = $3 AND totp_sealed IS NULL AND totp_pending_sealed = $4",
                vec![
                    SqlArg::Bytes(sealed),
                    SqlArg::I64(step_i64(step)),
                    user_arg(id),
                    SqlArg::Bytes(pending),
                ],
            )
            .await?;
        if updated == 0 {
            // Another request enrolled or restarted enrollment meanwhile.
            return Err(AccessError::NoPendingEnrollment { user_id: id });
        }
        tx.execute(
            "DELETE FROM chartlog_access_recovery_codes WHERE user_id = $1",
            vec![user_arg(id)],
        )
        .await?;
        for digest in digests {
            tx.execute(
                "INSERT INTO chartlog_access_recovery_codes (user_id, code_hash, created_at_us) \
                 VALUES ($1, $2, $3)",
                vec![user_arg(id), SqlArg::Bytes(digest.to_vec()), at_arg(now)],
            )
            .await?;
        }
        tx.commit().await?;
        tracing::info!("second factor enrolled");
        Ok(codes)
    }

    /// Accepts a TOTP code once (its time step must be later than the last accepted one) or
    /// an unused recovery code, marking it used.
    async fn accept_second_factor(
        &self,
        user: &UserRow,
        code: &SecondFactorCode,
        now: Timestamp,
    ) -> Result<bool, AccessError> {
        let id = user.user_id;
        match code.kind() {
            SecondFactorKind::Totp => {
                let Some(sealed) = &user.totp_sealed else {
                    return Ok(false);
                };
                let secret = Zeroizing::new(
                    self.secrets()
                        .open(&[b"totp", id.as_uuid().as_bytes()], sealed)?,
                );
                let totp = second_factor::totp(&secret, user.username.as_str())?;
                let Some(step) = second_factor::matching_step(&totp, code, unix_seconds(now))
                else {
                    return Ok(false);
                };
                let updated = self
                    .db()
                    .execute(
                        "UPDATE chartlog_access_users SET totp_last_step = $1 \
                         WHERE user_id = $2 AND totp_sealed IS NOT NULL \
                           AND (totp_last_step IS NULL OR totp_last_step < $1)",
                        vec![SqlArg::I64(step_i64(step)), user_arg(id)],
                    )
                    .await?;
                Ok(updated == 1)
            }
            SecondFactorKind::Recovery => {
                let digest = second_factor::recovery_code_digest(code.expose());
                let updated = self
                    .db()
                    .execute(
                        "UPDATE chartlog_access_recovery_codes SET used_at_us = $1 \
                         WHERE user_id = $2 AND code_hash = $3 AND used_at_us IS NULL",
                        vec![at_arg(now), user_arg(id), SqlArg::Bytes(digest.to_vec())],
                    )
                    .await?;
                if updated == 1 {
                    tracing::info!(user_id = %id, "recovery code used");
                }
                Ok(updated == 1)
            }
        }
    }

    // ---------------------------------------------------------------- login

    /// Checks a login and opens a session. Unknown account, wrong password, disabled account
    /// and wrong second factor all answer [`LoginError::InvalidCredentials`] and count as a
    /// failure; too many recent failures for the account or the address answer
    /// [`LoginError::Throttled`] before any check. The attempt is counted before the password
    /// is verified (see [`Accounts::count_attempt`]).
    #[tracing::instrument(skip_all)]
    pub async fn login(
        &self,
        login: LoginAttempt,
        now: Timestamp,
    ) -> Result<LoginSuccess, LoginError> {
        let address = address_key(login.client_address);
        let username = Username::parse(&login.username).ok();
        let attempt = self
            .counted_attempt(username.as_ref(), Some(&address), now)
            .await
            .inspect_err(|_| tracing::warn!("login throttled"))?;
        // Every way out but a session or a request for the second factor leaves the attempt
        // counted as a failure.
        let outcome = self
            .counted_login(&login, username.as_ref(), attempt, now)
            .await;
        self.settle_attempt(attempt, outcome).await
    }

    /// The checks of a login, once its `attempt` is counted.
    async fn counted_login(
        &self,
        login: &LoginAttempt,
        username: Option<&Username>,
        attempt: Uuid,
        now: Timestamp,
    ) -> Result<LoginSuccess, LoginError> {
        let user = match username {
            Some(username) => self.user_row_by_name(username).await?,
            None => None,
        };
        let user = match user {
            // An account linked to the identity provider signs in there only.
            Some(user) if !user.disabled && user.sso_subject.is_none() => user,
            _ => {
                // The same argon2 work as a wrong password, so the answer's timing does not
                // tell unknown, disabled or identity-provider accounts apart.
                let dummy = self.dummy_hash().await?;
                verify_any_blocking(&login.password, vec![dummy]).await?;
                return Err(LoginError::InvalidCredentials);
            }
        };
        if !verify_any_blocking(&login.password, vec![user.password_hash.clone()]).await? {
            return Err(LoginError::InvalidCredentials);
        }
        if user.totp_sealed.is_some() {
            let Some(code) = &login.second_factor else {
                // The password was right: asking for the code is not a failure.
                self.forget_attempt(attempt).await?;
                return Err(LoginError::SecondFactorRequired);
            };
            if !self.accept_second_factor(&user, code, now).await? {
                return Err(LoginError::InvalidCredentials);
            }
        }
        self.open_session(user, attempt, now).await
    }

    /// Signs in the account linked to the subject of `assertion`, once the caller has
    /// verified the provider's token. Roles that need a second factor need the token to
    /// assert one. Throttled per client address like a login; a token already used (here or
    /// by another server on this database), an unknown subject and a disabled account answer
    /// [`LoginError::InvalidCredentials`].
    #[tracing::instrument(skip_all)]
    pub async fn sso_login(
        &self,
        assertion: &IdentityAssertion,
        client_address: IpAddr,
        now: Timestamp,
    ) -> Result<LoginSuccess, LoginError> {
        let address = address_key(client_address);
        let attempt = self
            .counted_attempt(None, Some(&address), now)
            .await
            .inspect_err(|_| tracing::warn!("identity-provider login throttled"))?;
        let outcome = self.counted_sso_login(assertion, attempt, now).await;
        self.settle_attempt(attempt, outcome).await
    }

    /// The checks of an identity-provider login, once its `attempt` is counted.
    async fn counted_sso_login(
        &self,
        assertion: &IdentityAssertion,
        attempt: Uuid,
        now: Timestamp,
    ) -> Result<LoginSuccess, LoginError> {
        let user = match self.user_row_by_sso_subject(&assertion.subject).await? {
            Some(user) if !user.disabled && self.claim_sso_token(assertion).await? => user,
            _ => return Err(LoginError::InvalidCredentials),
        };
        if self.settings().second_factor_required(user.role) && !assertion.second_factor {
            self.charge_attempt_to_account(attempt, &user.username)
                .await?;
            return Err(LoginError::IdentityProviderSecondFactorMissing);
        }
        self.open_session(user, attempt, now).await
    }

    /// Spends an identity-provider token: true the first time it is presented to any server
    /// on this database, false after.
    async fn claim_sso_token(&self, assertion: &IdentityAssertion) -> Result<bool, AccessError> {
        let inserted = self
            .db()
            .execute(
                "INSERT INTO chartlog_access_sso_tokens (token_digest, expires_at_us) \
                 VALUES ($1, $2) ON CONFLICT (token_digest) DO NOTHING",
                vec![
                    SqlArg::Bytes(assertion.token_digest.to_vec()),
                    at_arg(assertion.usable_until),
                ],
            )
            .await?;
        if inserted == 0 {
            tracing::warn!("identity-provider token presented again");
        }
        Ok(inserted == 1)
    }

    /// Links the account to identity-provider `subject` (or unlinks it, with `None`) and
    /// ends its sessions. A linked account signs in only through the identity provider; its
    /// chartlog password and second factor are no longer asked for.
    #[tracing::instrument(skip_all, fields(user_id = %id))]
    pub async fn link_sso_subject(
        &self,
        id: UserId,
        subject: Option<&str>,
        now: Timestamp,
    ) -> Result<UserAccount, AccessError> {
        if let Some(subject) = subject {
            check_sso_subject(subject)?;
        }
        let mut user = self.existing_user(id).await?;
        if let Some(subject) = subject
            && let Some(other) = self.user_row_by_sso_subject(subject).await?
            && other.user_id != id
        {
            return Err(AccessError::SsoSubjectTaken);
        }
        let mut tx = self.db().begin().await?;
        tx.execute(
            "UPDATE chartlog_access_users SET sso_subject = $1 WHERE user_id = $2",
            vec![SqlArg::OptText(subject.map(str::to_owned)), user_arg(id)],
        )
        .await?;
        revoke_sessions(&mut tx, id, now).await?;
        tx.commit().await?;
        tracing::info!(linked = subject.is_some(), "identity-provider link changed");
        user.sso_subject = subject.map(str::to_owned);
        Ok(user.account())
    }

    /// Re-authenticates (before signing a note) an account linked to the identity provider,
    /// throttled and counted like a password re-authentication. `assertion` is a fresh token
    /// the caller has verified, or `None` when the token was refused: that counts as a
    /// failure too, so a stream of bad tokens meets the same limit as a stream of wrong
    /// passwords. A token is spent here as at a login.
    #[tracing::instrument(skip_all, fields(user_id = %id))]
    pub async fn sso_reauthenticate(
        &self,
        id: UserId,
        assertion: Option<&IdentityAssertion>,
        client_address: IpAddr,
        now: Timestamp,
    ) -> Result<(), LoginError> {
        let (user, attempt) = self
            .reauthentication_allowed(id, client_address, now)
            .await?;
        let proved = match assertion {
            Some(assertion)
                if !user.disabled
                    && user.sso_subject.as_deref() == Some(assertion.subject.as_str()) =>
            {
                self.claim_sso_token(assertion).await
            }
            _ => Ok(false),
        };
        self.reauthentication_outcome(&user, attempt, proved, now)
            .await
    }

    /// Opens a session for `user`, who just proved who they are, and clears the failures of
    /// the account and the row of the `attempt` that proved it.
    async fn open_session(
        &self,
        user: UserRow,
        attempt: Uuid,
        now: Timestamp,
    ) -> Result<LoginSuccess, LoginError> {
        let token = SessionToken::generate();
        let session_id = Uuid::new_v4();
        let mut tx = self.db().begin().await.map_err(AccessError::from)?;
        clear_account_failures(&mut tx, &user.username, now).await?;
        // An identity-provider attempt is counted against the address only: clearing the
        // account's failures does not reach it.
        forget_attempt(&mut tx, attempt).await?;
        tx.execute(
            "UPDATE chartlog_access_users SET last_login_at_us = $1 WHERE user_id = $2",
            vec![at_arg(now), user_arg(user.user_id)],
        )
        .await
        .map_err(AccessError::from)?;
        tx.execute(
            "INSERT INTO chartlog_access_sessions \
             (session_id, token_hash, user_id, created_at_us, last_seen_at_us) \
             VALUES ($1, $2, $3, $4, $4)",
            vec![
                uuid_arg(session_id),
                SqlArg::Bytes(token_digest(token.expose()).to_vec()),
                user_arg(user.user_id),
                at_arg(now),
            ],
        )
        .await
        .map_err(AccessError::from)?;
        tx.commit().await.map_err(AccessError::from)?;
        let stage = self.stage(&user);
        tracing::info!(user_id = %user.user_id, stage = stage.as_str(), "login");
        let session = Session {
            session_id,
            user_id: user.user_id,
            username: user.username,
            role: user.role,
            patient_id: user.patient_id,
            stage,
            created_at: now,
            expires_at: self.session_deadline(now, now).0,
        };
        Ok(LoginSuccess { token, session })
    }

    /// Checks the account's password again (before signing a note), throttled like a login.
    #[tracing::instrument(skip_all, fields(user_id = %id))]
    pub async fn reauthenticate(
        &self,
        id: UserId,
        password: &Password,
        client_address: IpAddr,
        now: Timestamp,
    ) -> Result<(), LoginError> {
        let (user, attempt) = self
            .reauthentication_allowed(id, client_address, now)
            .await?;
        // An identity-provider account re-authenticates there (`sso_reauthenticate`), never
        // with a chartlog password.
        let refused = user.disabled || user.sso_subject.is_some();
        let proved = async {
            let stored = if refused {
                self.dummy_hash().await?
            } else {
                user.password_hash.clone()
            };
            Ok(!refused && verify_any_blocking(password, vec![stored]).await?)
        }
        .await;
        self.reauthentication_outcome(&user, attempt, proved, now)
            .await
    }

    /// The account about to re-authenticate, and its attempt, counted against the account
    /// and the address (see [`Accounts::count_attempt`]); refused while either is throttled.
    async fn reauthentication_allowed(
        &self,
        id: UserId,
        client_address: IpAddr,
        now: Timestamp,
    ) -> Result<(UserRow, Uuid), LoginError> {
        let user = self.existing_user(id).await?;
        let address = address_key(client_address);
        let attempt = self
            .counted_attempt(Some(&user.username), Some(&address), now)
            .await?;
        Ok((user, attempt))
    }

    /// Leaves a re-authentication that did not prove who is at the keyboard (or could not be
    /// checked) counted as a failure, or clears the account's failures (the attempt's own row
    /// with them) after one that `proved` it.
    async fn reauthentication_outcome(
        &self,
        user: &UserRow,
        attempt: Uuid,
        proved: Result<bool, AccessError>,
        now: Timestamp,
    ) -> Result<(), LoginError> {
        let outcome = match proved {
            Ok(true) => async {
                let mut tx = self.db().begin().await?;
                clear_account_failures(&mut tx, &user.username, now).await?;
                forget_attempt(&mut tx, attempt).await?;
                tx.commit().await?;
                Ok::<_, AccessError>(())
            }
            .await
            .map_err(LoginError::from),
            Ok(false) => Err(LoginError::InvalidCredentials),
            Err(error) => Err(error.into()),
        };
        self.settle_attempt(attempt, outcome).await
    }

    /// [`Accounts::count_attempt`], refused with [`LoginError::Throttled`].
    async fn counted_attempt(
        &self,
        username: Option<&Username>,
        address: Option<&str>,
        now: Timestamp,
    ) -> Result<Uuid, LoginError> {
        self.count_attempt(username, address, now)
            .await?
            .map_err(|retry_after_seconds| LoginError::Throttled {
                retry_after_seconds,
            })
    }

    /// Counts an attempt against the account name and the address before anything is
    /// verified, and returns its id; or, when either has reached its limit, the seconds until
    /// it may try again.
    ///
    /// The attempt's row is inserted first, in flight (its `attempt_id` set), and the window
    /// counted after, including it. Checking first and recording after the argon2
    /// verification let a burst of simultaneous attempts all pass the check before any was
    /// recorded; now each attempt sees the rows of every attempt that came before it, so at
    /// most the limit of them, failed or still in flight, go on to be verified, however many
    /// arrive at once. The row is then settled by the attempt's outcome: deleted if it proves
    /// who is there, else made a plain failure ([`Accounts::settle_attempt`]).
    ///
    /// Attempts in flight hold the limit but are no failures: an attempt refused only because
    /// of them is asked to wait [`LOGIN_IN_FLIGHT_RETRY_AFTER_SECONDS`], not the failure
    /// window, so a burst of right passwords (a clinic behind one NAT address, a user's
    /// clients retrying at once) gets through a second later. See [`Accounts::throttled`].
    ///
    /// An attempt over the limit deletes its row again: refused attempts are not failures,
    /// as when the throttle was checked before anything was recorded, so a user retrying
    /// during a lockout (or someone flooding the account) does not push its end further; the
    /// lockout ends when the oldest of the failures that caused it leaves the window.
    async fn count_attempt(
        &self,
        username: Option<&Username>,
        address: Option<&str>,
        now: Timestamp,
    ) -> Result<Result<Uuid, u64>, AccessError> {
        assert!(
            username.is_some() || address.is_some(),
            "an attempt is counted against an account name or an address"
        );
        let attempt = Uuid::new_v4();
        self.db()
            .execute(
                "INSERT INTO chartlog_access_login_failures \
                 (username, client_address, failed_at_us, attempt_id) VALUES ($1, $2, $3, $4)",
                vec![
                    SqlArg::OptText(username.map(|name| name.as_str().to_owned())),
                    SqlArg::OptText(address.map(str::to_owned)),
                    at_arg(now),
                    uuid_arg(attempt),
                ],
            )
            .await?;
        let throttled = self.throttled(attempt, username, address, now).await;
        match throttled {
            Ok(None) => Ok(Ok(attempt)),
            Ok(Some(retry_after_seconds)) => {
                self.forget_attempt(attempt).await?;
                Ok(Err(retry_after_seconds))
            }
            Err(error) => {
                // Unchecked, the attempt is no failure either; the error is the answer.
                if let Err(forget_error) = self.forget_attempt(attempt).await {
                    tracing::warn!(error = %forget_error, "login attempt not forgotten");
                }
                Err(error)
            }
        }
    }

    /// Seconds until the account name or the address may try again, if, besides `attempt`,
    /// either has reached its limit of failures and attempts in flight within the window.
    ///
    /// A row is in flight while its `attempt_id` is set and it is younger than
    /// [`LOGIN_ATTEMPT_IN_FLIGHT_MAX`]; a failure once its attempt cleared the id, or once it
    /// is older (its server stopped before settling it). When the failures alone reach the
    /// limit, the wait is until the oldest of the last `limit` of them leaves the window;
    /// when only attempts in flight make up the rest, it is
    /// [`LOGIN_IN_FLIGHT_RETRY_AFTER_SECONDS`]. One statement reads both kinds, so a row
    /// settled while it runs is seen once, either way: never in neither count.
    async fn throttled(
        &self,
        attempt: Uuid,
        username: Option<&Username>,
        address: Option<&str>,
        now: Timestamp,
    ) -> Result<Option<u64>, AccessError> {
        // Up to `$5` rows of each kind (failures, others in flight), newest first.
        macro_rules! recent_rows {
            ($column:literal) => {
                concat!(
                    "SELECT failed_at_us, attempt_id FROM (\
                     SELECT failed_at_us, attempt_id, ROW_NUMBER() OVER (\
                     PARTITION BY CASE WHEN attempt_id IS NOT NULL AND failed_at_us > $3 \
                     THEN 1 ELSE 0 END ORDER BY failed_at_us DESC) AS nth \
                     FROM chartlog_access_login_failures \
                     WHERE ",
                    $column,
                    " = $1 AND failed_at_us > $2 \
                     AND (attempt_id IS NULL OR attempt_id <> $4)\
                     ) AS recent WHERE nth <= $5 ORDER BY failed_at_us DESC"
                )
            };
        }
        let since = minus(now, LOGIN_FAILURE_WINDOW);
        let in_flight_since = minus(now, LOGIN_ATTEMPT_IN_FLIGHT_MAX);
        let mut retry_after: Option<u64> = None;
        let checks = [
            (
                recent_rows!("username"),
                username.map(|name| name.as_str().to_owned()),
                LOGIN_FAILURES_PER_ACCOUNT_MAX,
            ),
            (
                recent_rows!("client_address"),
                address.map(str::to_owned),
                LOGIN_FAILURES_PER_ADDRESS_MAX,
            ),
        ];
        for (sql, key, limit) in checks {
            let Some(key) = key else { continue };
            let rows = self
                .db()
                .fetch_all(
                    sql,
                    vec![
                        SqlArg::Text(key),
                        SqlArg::I64(since),
                        SqlArg::I64(in_flight_since),
                        uuid_arg(attempt),
                        SqlArg::I64(limit as i64),
                    ],
                )
                .await?;
            let (mut failures, mut in_flight) = (Vec::with_capacity(rows.len()), 0);
            for row in &rows {
                let at = row.i64(0)?;
                if row.opt_uuid(1)?.is_some() && at > in_flight_since {
                    in_flight += 1;
                } else {
                    failures.push(at);
                }
            }
            let retry = if failures.len() >= limit {
                // The oldest of the last `limit` failures leaves the window first.
                let oldest = failures[limit - 1];
                let micros =
                    plus(clamped_timestamp(oldest), LOGIN_FAILURE_WINDOW) - now.unix_micros();
                u64::try_from(micros.max(1))
                    .expect("positive")
                    .div_ceil(1_000_000)
            } else if failures.len() + in_flight >= limit {
                LOGIN_IN_FLIGHT_RETRY_AFTER_SECONDS
            } else {
                continue;
            };
            retry_after = Some(retry_after.map_or(retry, |r| r.max(retry)));
        }
        Ok(retry_after)
    }

    /// Settles a counted attempt by its `outcome`: one that failed, for whatever reason, is
    /// left counted as a failure, its row no longer in flight. One that succeeded, or that
    /// only asks for the second factor, has already deleted its row: the update finds none.
    /// Should the update fail, the row counts as a failure anyway once it is older than
    /// [`LOGIN_ATTEMPT_IN_FLIGHT_MAX`].
    async fn settle_attempt<T, E>(&self, attempt: Uuid, outcome: Result<T, E>) -> Result<T, E> {
        if outcome.is_err()
            && let Err(error) = self
                .db()
                .execute(
                    "UPDATE chartlog_access_login_failures SET attempt_id = NULL \
                     WHERE attempt_id = $1",
                    vec![uuid_arg(attempt)],
                )
                .await
        {
            tracing::warn!(%error, "failed login attempt left in flight");
        }
        outcome
    }

    /// Deletes the row of an attempt that turned out not to be a failure.
    async fn forget_attempt(&self, attempt: Uuid) -> Result<(), AccessError> {
        self.db()
            .execute(
                "DELETE FROM chartlog_access_login_failures WHERE attempt_id = $1",
                vec![uuid_arg(attempt)],
            )
            .await?;
        Ok(())
    }

    /// Counts an attempt made against the address only against `username` too, once it is
    /// known whose it was.
    async fn charge_attempt_to_account(
        &self,
        attempt: Uuid,
        username: &Username,
    ) -> Result<(), AccessError> {
        self.db()
            .execute(
                "UPDATE chartlog_access_login_failures SET username = $1 WHERE attempt_id = $2",
                vec![
                    SqlArg::Text(username.as_str().to_owned()),
                    uuid_arg(attempt),
                ],
            )
            .await?;
        Ok(())
    }

    async fn dummy_hash(&self) -> Result<String, AccessError> {
        let cost = self.settings().password_hashing;
        self.inner
            .dummy_hash
            .get_or_try_init(|| async move {
                let unknowable = Password::new(crate::random::string_from(
                    b"abcdefghijklmnopqrstuvwxyz",
                    32,
                ));
                hash_blocking(cost, &unknowable).await
            })
            .await
            .cloned()
    }

    // ---------------------------------------------------------------- sessions

    /// The open session of `token`. Each call counts as activity (the write is skipped within
    /// [`SESSION_TOUCH_INTERVAL`] of the last). A session past its idle timeout or absolute
    /// lifetime answers [`SessionError::Expired`] once, and is ended: later calls answer
    /// [`SessionError::Unknown`].
    pub async fn authenticate(&self, token: &str, now: Timestamp) -> Result<Session, SessionError> {
        if token.len() != SESSION_TOKEN_LENGTH {
            return Err(SessionError::Unknown);
        }
        let digest = token_digest(token);
        let sql = concat!(
            "SELECT s.session_id, s.created_at_us, s.last_seen_at_us, s.end_reason, ",
            user_columns!(u),
            " FROM chartlog_access_sessions s \
             JOIN chartlog_access_users u ON u.user_id = s.user_id \
             WHERE s.token_hash = $1"
        );
        let Some(row) = self
            .db()
            .fetch_optional(sql, vec![SqlArg::Bytes(digest.to_vec())])
            .await
            .map_err(AccessError::from)?
        else {
            return Err(SessionError::Unknown);
        };
        let session = SessionRow::read(&row)?;
        let user_id = session.user.user_id;
        match session.end_reason.as_deref() {
            None => {}
            Some(END_EXPIRED) => return Err(SessionError::Unknown),
            Some(END_LOGOUT | END_REVOKED) => return Err(SessionError::Revoked { user_id }),
            Some(_) => return Err(AccessError::Corrupt("session end reason").into()),
        }
        if session.user.disabled {
            return Err(SessionError::Revoked { user_id });
        }
        let (expires_at, reason) = self.session_deadline(session.created_at, session.last_seen_at);
        if now >= expires_at {
            let ended = self
                .db()
                .execute(
                    "UPDATE chartlog_access_sessions SET ended_at_us = $1, end_reason = $2 \
                     WHERE session_id = $3 AND ended_at_us IS NULL",
                    vec![
                        at_arg(now),
                        SqlArg::Text(END_EXPIRED.to_owned()),
                        uuid_arg(session.session_id),
                    ],
                )
                .await
                .map_err(AccessError::from)?;
            // Of two requests racing past the deadline, one reports the expiry.
            if ended == 0 {
                return Err(SessionError::Unknown);
            }
            tracing::info!(user_id = %user_id, reason = reason.as_str(), "session expired");
            return Err(SessionError::Expired { user_id, reason });
        }
        let mut last_seen_at = session.last_seen_at;
        if now.unix_micros() - last_seen_at.unix_micros()
            >= crate::rows::duration_micros(SESSION_TOUCH_INTERVAL)
        {
            self.db()
                .execute(
                    "UPDATE chartlog_access_sessions SET last_seen_at_us = $1 \
                     WHERE session_id = $2 AND ended_at_us IS NULL AND last_seen_at_us < $1",
                    vec![at_arg(now), uuid_arg(session.session_id)],
                )
                .await
                .map_err(AccessError::from)?;
            last_seen_at = now;
        }
        let stage = self.stage(&session.user);
        Ok(Session {
            session_id: session.session_id,
            user_id,
            username: session.user.username,
            role: session.user.role,
            patient_id: session.user.patient_id,
            stage,
            created_at: session.created_at,
            expires_at: self.session_deadline(session.created_at, last_seen_at).0,
        })
    }

    /// Ends the session of `token`. An unknown or already ended token is not an error.
    pub async fn logout(&self, token: &str, now: Timestamp) -> Result<(), AccessError> {
        if token.len() != SESSION_TOKEN_LENGTH {
            return Ok(());
        }
        self.db()
            .execute(
                "UPDATE chartlog_access_sessions SET ended_at_us = $1, end_reason = $2 \
                 WHERE token_hash = $3 AND ended_at_us IS NULL",
                vec![
                    at_arg(now),
                    SqlArg::Text(END_LOGOUT.to_owned()),
                    SqlArg::Bytes(token_digest(token).to_vec()),
                ],
            )
            .await?;
        Ok(())
    }

    /// Deletes what no longer serves: failed logins older than the throttling window, sessions
    /// past their absolute lifetime, and expired idempotency records, each kept
    /// [`PRUNE_GRACE`] longer. Returns the rows deleted.
    pub async fn prune(&self, now: Timestamp) -> Result<u64, AccessError> {
        let failures_before = minus(now, LOGIN_FAILURE_WINDOW + PRUNE_GRACE);
        let sessions_before = minus(now, self.settings().absolute_lifetime + PRUNE_GRACE);
        let records_before = minus(now, PRUNE_GRACE);
        let mut deleted = self
            .db()
            .execute(
                "DELETE FROM chartlog_access_login_failures WHERE failed_at_us < $1",
                vec![SqlArg::I64(failures_before)],
            )
            .await?;
        deleted += self
            .db()
            .execute(
                "DELETE FROM chartlog_access_sessions WHERE created_at_us < $1",
                vec![SqlArg::I64(sessions_before)],
            )
            .await?;
        deleted += self
            .db()
            .execute(
                "DELETE FROM chartlog_access_idempotency_records WHERE expires_at_us < $1",
                vec![SqlArg::I64(records_before)],
            )
            .await?;
        deleted += self
            .db()
            .execute(
                "DELETE FROM chartlog_access_sso_tokens WHERE expires_at_us < $1",
                vec![SqlArg::I64(records_before)],
            )
            .await?;
        Ok(deleted)
    }

    /// The session's deadline from its creation and last activity, and which limit it is.
    fn session_deadline(
        &self,
        created_at: Timestamp,
        last_seen_at: Timestamp,
    ) -> (Timestamp, ExpiryReason) {
        let idle = plus(last_seen_at, self.settings().idle_timeout);
        let absolute = plus(created_at, self.settings().absolute_lifetime);
        if absolute <= idle {
            (clamped_timestamp(absolute), ExpiryReason::Absolute)
        } else {
            (clamped_timestamp(idle), ExpiryReason::Idle)
        }
    }

    fn stage(&self, user: &UserRow) -> SessionStage {
        // The identity provider owns a linked account's password and second factor.
        if user.sso_subject.is_some() {
            SessionStage::Full
        } else if user.must_change_password {
            SessionStage::MustChangePassword
        } else if self.settings().second_factor_required(user.role) && user.totp_sealed.is_none() {
            SessionStage::MustEnrollSecondFactor
        } else {
            SessionStage::Full
        }
    }

    // ---------------------------------------------------------------- lookups

    async fn user_count(&self) -> Result<i64, AccessError> {
        let row = self
            .db()
            .fetch_optional("SELECT COUNT(*) FROM chartlog_access_users", vec![])
            .await?;
        Ok(row.map(|row| row.i64(0)).transpose()?.unwrap_or(0))
    }

    pub(crate) async fn user_row(&self, id: UserId) -> Result<Option<UserRow>, AccessError> {
        let sql = concat!(
            "SELECT ",
            user_columns!(),
            " FROM chartlog_access_users WHERE user_id = $1"
        );
        self.db()
            .fetch_optional(sql, vec![user_arg(id)])
            .await?
            .map(|row| UserRow::read(&row, 0))
            .transpose()
    }

    pub(crate) async fn existing_user(&self, id: UserId) -> Result<UserRow, AccessError> {
        self.user_row(id)
            .await?
            .ok_or(AccessError::UserNotFound { user_id: id })
    }

    async fn user_row_by_sso_subject(&self, subject: &str) -> Result<Option<UserRow>, AccessError> {
        let sql = concat!(
            "SELECT ",
            user_columns!(),
            " FROM chartlog_access_users WHERE sso_subject = $1"
        );
        self.db()
            .fetch_optional(sql, vec![SqlArg::Text(subject.to_owned())])
            .await?
            .map(|row| UserRow::read(&row, 0))
            .transpose()
    }

    async fn user_row_by_name(&self, username: &Username) -> Result<Option<UserRow>, AccessError> {
        let sql = concat!(
            "SELECT ",
            user_columns!(),
            " FROM chartlog_access_users WHERE username = $1"
        );
        self.db()
            .fetch_optional(sql, vec![SqlArg::Text(username.as_str().to_owned())])
            .await?
            .map(|row| UserRow::read(&row, 0))
            .transpose()
    }
}

/// A session row joined with its account.
struct SessionRow {
    session_id: Uuid,
    created_at: Timestamp,
    last_seen_at: Timestamp,
    end_reason: Option<String>,
    user: UserRow,
}

impl SessionRow {
    fn read(row: &DbRow) -> Result<Self, AccessError> {
        Ok(Self {
            session_id: row.uuid(0)?,
            created_at: timestamp(row.i64(1)?)?,
            last_seen_at: timestamp(row.i64(2)?)?,
            end_reason: row.opt_text(3)?,
            user: UserRow::read(row, 4)?,
        })
    }
}

/// Inserts an account with a one-time password (not entered in the history); `false` if the
/// name is taken.
async fn insert_user(
    tx: &mut ProjectionTx,
    user_id: UserId,
    username: &Username,
    role: Role,
    patient_id: Option<chartlog_domain::PatientId>,
    password_hash: &str,
    now: Timestamp,
) -> Result<bool, AccessError> {
    let inserted = tx
        .execute(
            "INSERT INTO chartlog_access_users \
             (user_id, username, role, patient_id, password_hash, must_change_password, \
              disabled, created_at_us, password_changed_at_us) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
             ON CONFLICT (username) DO NOTHING",
            vec![
                user_arg(user_id),
                SqlArg::Text(username.as_str().to_owned()),
                SqlArg::Text(role.as_str().to_owned()),
                SqlArg::OptUuid(patient_id.map(|id| id.as_uuid())),
                SqlArg::Text(password_hash.to_owned()),
                SqlArg::Bool(true),
                SqlArg::Bool(false),
                at_arg(now),
            ],
        )
        .await?;
    Ok(inserted == 1)
}

/// Whose choice a password is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PasswordKind {
    /// Issued by chartlog (at creation or an administrator's reset), to be changed at the next
    /// login.
    OneTime,
    /// Chosen by the user.
    Chosen,
}

/// Sets the account's password hash; a one-time password must be changed at the next login,
/// and only a chosen one enters the history: the history is the passwords the user chose, so
/// that a reset cannot push one of them out and let it back in.
async fn set_password(
    tx: &mut ProjectionTx,
    id: UserId,
    password_hash: &str,
    kind: PasswordKind,
    now: Timestamp,
) -> Result<(), AccessError> {
    // The UPDATE comes first: on PostgreSQL its row lock orders concurrent changes of one
    // account, so their history generations do not collide.
    let updated = tx
        .execute(
            "UPDATE chartlog_access_users \
             SET password_hash = $1, must_change_password = $2, password_changed_at_us = $3 \
             WHERE user_id = $4",
            vec![
                SqlArg::Text(password_hash.to_owned()),
                SqlArg::Bool(kind == PasswordKind::OneTime),
                at_arg(now),
                user_arg(id),
            ],
        )
        .await?;
    if updated == 0 {
        return Err(AccessError::UserNotFound { user_id: id });
    }
    match kind {
        PasswordKind::OneTime => Ok(()),
        PasswordKind::Chosen => add_password_history(tx, id, password_hash, now).await,
    }
}

/// Appends a hash to the account's history and drops all but the last
/// [`PASSWORD_HISTORY_GENERATIONS`].
async fn add_password_history(
    tx: &mut ProjectionTx,
    id: UserId,
    password_hash: &str,
    now: Timestamp,
) -> Result<(), AccessError> {
    let row = tx
        .fetch_optional(
            "SELECT COALESCE(MAX(generation), 0) FROM chartlog_access_password_history \
             WHERE user_id = $1",
            vec![user_arg(id)],
        )
        .await?;
    let generation = row.map(|row| row.i64(0)).transpose()?.unwrap_or(0) + 1;
    tx.execute(
        "INSERT INTO chartlog_access_password_history \
         (user_id, generation, password_hash, set_at_us) VALUES ($1, $2, $3, $4)",
        vec![
            user_arg(id),
            SqlArg::I64(generation),
            SqlArg::Text(password_hash.to_owned()),
            at_arg(now),
        ],
    )
    .await?;
    tx.execute(
        "DELETE FROM chartlog_access_password_history WHERE user_id = $1 AND generation <= $2",
        vec![
            user_arg(id),
            SqlArg::I64(generation - PASSWORD_HISTORY_GENERATIONS as i64),
        ],
    )
    .await?;
    Ok(())
}

/// Ends every open session of the account.
async fn revoke_sessions(
    tx: &mut ProjectionTx,
    id: UserId,
    now: Timestamp,
) -> Result<u64, AccessError> {
    Ok(tx
        .execute(
            "UPDATE chartlog_access_sessions SET ended_at_us = $1, end_reason = $2 \
             WHERE user_id = $3 AND ended_at_us IS NULL",
            vec![
                at_arg(now),
                SqlArg::Text(END_REVOKED.to_owned()),
                user_arg(id),
            ],
        )
        .await?)
}

/// Deletes the account's failures (its rows in flight too, once they count as failures),
/// keeping the rows of attempts still being checked: they hold the limit until they settle,
/// and stay failures if they fail.
async fn clear_account_failures(
    tx: &mut ProjectionTx,
    username: &Username,
    now: Timestamp,
) -> Result<(), AccessError> {
    tx.execute(
        "DELETE FROM chartlog_access_login_failures \
         WHERE username = $1 AND (attempt_id IS NULL OR failed_at_us <= $2)",
        vec![
            SqlArg::Text(username.as_str().to_owned()),
            SqlArg::I64(minus(now, LOGIN_ATTEMPT_IN_FLIGHT_MAX)),
        ],
    )
    .await?;
    Ok(())
}

async fn forget_attempt(tx: &mut ProjectionTx, attempt: Uuid) -> Result<(), AccessError> {
    tx.execute(
        "DELETE FROM chartlog_access_login_failures WHERE attempt_id = $1",
        vec![uuid_arg(attempt)],
    )
    .await?;
    Ok(())
}

/// Whether an account (enabled or disabled) reads as `patient_id`. On PostgreSQL the
/// transaction first takes a lock on the patient id, held until it ends, so two creations for
/// one patient cannot both find none: there is no unique index to decide, since databases
/// made before the rule may hold two accounts for a patient. On SQLite the file's write lock
/// already orders the transactions.
async fn patient_has_account(
    tx: &mut ProjectionTx,
    patient_id: chartlog_domain::PatientId,
) -> Result<bool, AccessError> {
    if tx.backend() == Backend::Postgres {
        let id = patient_id.as_uuid();
        let bytes = id.as_bytes();
        tx.execute(
            "SELECT pg_advisory_xact_lock(CAST($1 AS integer), CAST($2 AS integer))",
            vec![
                SqlArg::I64(PATIENT_ACCOUNT_LOCK_CLASS),
                SqlArg::I64(i64::from(i32::from_be_bytes([
                    bytes[0], bytes[1], bytes[2], bytes[3],
                ]))),
            ],
        )
        .await?;
    }
    Ok(tx
        .fetch_optional(
            "SELECT 1 FROM chartlog_access_users WHERE patient_id = $1 LIMIT 1",
            vec![SqlArg::Uuid(patient_id.as_uuid())],
        )
        .await?
        .is_some())
}

async fn user_exists(tx: &mut ProjectionTx, id: UserId) -> Result<bool, AccessError> {
    Ok(tx
        .fetch_optional(
            "SELECT 1 FROM chartlog_access_users WHERE user_id = $1",
            vec![user_arg(id)],
        )
        .await?
        .is_some())
}

/// SHA-256 of a session token: what the session table stores and looks up by.
fn token_digest(token: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"chartlog-access/session-token/v1\0");
    hasher.update(token.as_bytes());
    hasher.finalize().into()
}

/// An identity provider's subject as chartlog stores it: 1 to [`SSO_SUBJECT_LENGTH_MAX`]
/// characters, none of them control characters.
fn check_sso_subject(subject: &str) -> Result<(), AccessError> {
    if subject.is_empty()
        || subject.chars().count() > SSO_SUBJECT_LENGTH_MAX
        || subject.chars().any(char::is_control)
    {
        return Err(AccessError::InvalidSsoSubject);
    }
    Ok(())
}

/// The key failures of a client address are counted under: the IPv4 address, or the /64 of
/// an IPv6 address (one host usually holds a whole /64).
pub(crate) fn address_key(address: IpAddr) -> String {
    match address.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

fn unix_seconds(now: Timestamp) -> u64 {
    u64::try_from(now.unix_micros().div_euclid(1_000_000)).unwrap_or(0)
}

fn step_i64(step: u64) -> i64 {
    i64::try_from(step).expect("a TOTP step of a time before 9999 fits in i64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_group_ipv6_by_64() {
        assert_eq!(address_key("192.0.2.7".parse().unwrap()), "192.0.2.7");
        assert_eq!(
            address_key("::ffff:192.0.2.7".parse().unwrap()),
            "192.0.2.7"
        );
        assert_eq!(
            address_key("2001:db8:1:2:3:4:5:6".parse().unwrap()),
            address_key("2001:db8:1:2:ffff::1".parse().unwrap())
        );
        assert_ne!(
            address_key("2001:db8:1:2::1".parse().unwrap()),
            address_key("2001:db8:1:3::1".parse().unwrap())
        );
    }
}
