//! Logging in and out, passwords, second factors, and the administrator's user accounts.

use actix_web::cookie::{Cookie, SameSite};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use chartlog_access::{
    AccessError, LoginAttempt, LoginError, NewUser, Password, PasswordChangeError,
    SecondFactorCode, Session, UserAccount, Username,
};
use chartlog_domain::{Actor, PatientId, PurposeOfUse, Role, Timestamp, UserId};
use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome, AuditRow};
use serde::{Deserialize, Serialize};

use super::{internal, parse_body, require_json};
use crate::guard::{Caller, SESSION_COOKIE};
use crate::{ApiConfig, ApiError, audit};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginBody {
    username: String,
    #[schema(format = Password)]
    password: String,
    /// A 6-digit TOTP code or a recovery code.
    #[serde(default)]
    second_factor: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct SessionView {
    user_id: UserId,
    username: String,
    role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    patient_id: Option<PatientId>,
    /// `full`, `must_change_password` or `must_enroll_second_factor`.
    #[schema(value_type = String)]
    stage: &'static str,
    expires_at: String,
}

impl SessionView {
    fn of(session: &Session) -> Self {
        Self {
            user_id: session.user_id,
            username: session.username.as_str().to_owned(),
            role: session.role,
            patient_id: session.patient_id,
            stage: session.stage.as_str(),
            expires_at: session.expires_at.to_string(),
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct LoginAnswer {
    /// Send as `Authorization: Bearer <token>`; browsers use the cookie instead.
    token: String,
    session: SessionView,
}

fn session_actor(user_id: UserId, role: Role) -> Actor {
    Actor {
        user_id,
        role,
        purpose_of_use: PurposeOfUse::SystemAdministration,
        break_glass: false,
    }
}

fn session_row(
    actor: Option<Actor>,
    action: AuditAction,
    outcome: AuditOutcome,
    client_address: Option<std::net::IpAddr>,
) -> AuditRow {
    AuditRow {
        audit_id: uuid::Uuid::now_v7(),
        occurred_at: crate::now(),
        actor,
        patient_id: None,
        entity: Some(AuditEntity::Session),
        record_id: None,
        action,
        outcome,
        client_address,
        event_type: None,
    }
}

/// A failed login on the audit trail. The name typed is not kept: it may be a mistyped
/// password.
async fn audit_failed_login(
    config: &ApiConfig,
    client_address: Option<std::net::IpAddr>,
) -> Result<(), ApiError> {
    audit::record(
        config,
        vec![session_row(
            None,
            AuditAction::Login,
            AuditOutcome::Failure,
            client_address,
        )],
    )
    .await
}

fn session_cookie(token: &str, secure: bool) -> Cookie<'static> {
    Cookie::build(SESSION_COOKIE, token.to_owned())
        .path("/")
        .secure(secure)
        .http_only(true)
        .same_site(SameSite::Strict)
        .finish()
}

pub(crate) async fn login(
    config: web::Data<ApiConfig>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_json(request.headers())?;
    let body: LoginBody = parse_body(&body)?;
    let client_address = config.trusted_proxies.client_of(&request);
    let attempt = LoginAttempt {
        username: body.username,
        password: Password::new(body.password),
        // A malformed code fails exactly like a wrong one.
        second_factor: match body.second_factor {
            Some(raw) => match SecondFactorCode::parse(&raw) {
                Ok(code) => Some(code),
                Err(_) => {
                    audit_failed_login(&config, client_address).await?;
                    return Err(ApiError::InvalidCredentials);
                }
            },
            None => None,
        },
        client_address: crate::guard::failure_address(client_address),
    };
    let result = config.accounts.login(attempt, crate::now()).await;
    login_answer(&config, result, client_address).await
}

/// The answer to a login by password or by the identity provider: the session, or the
/// refusal once it is audited.
async fn login_answer(
    config: &ApiConfig,
    result: Result<chartlog_access::LoginSuccess, LoginError>,
    client_address: Option<std::net::IpAddr>,
) -> Result<HttpResponse, ApiError> {
    match result {
        Ok(success) => logged_in(config, success, client_address).await,
        Err(error) => {
            audit_failed_login(config, client_address).await?;
            Err(login_refusal(error))
        }
    }
}

/// The answer to a refused login or re-authentication, by password or by the identity provider.
pub(crate) fn login_refusal(error: LoginError) -> ApiError {
    match error {
        LoginError::InvalidCredentials => ApiError::InvalidCredentials,
        LoginError::SecondFactorRequired => ApiError::SecondFactorRequired,
        LoginError::IdentityProviderSecondFactorMissing => {
            ApiError::IdentityProviderSecondFactorMissing
        }
        LoginError::Throttled {
            retry_after_seconds,
        } => ApiError::Throttled {
            retry_after_seconds,
        },
        other => {
            tracing::error!(error = %other, "login failed unexpectedly");
            ApiError::Internal
        }
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SsoLoginBody {
    /// The OpenID Connect ID token the identity provider issued for this server.
    id_token: String,
}

/// Signs in with an ID token from the identity provider the server trusts.
pub(crate) async fn sso_login(
    config: web::Data<ApiConfig>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_json(request.headers())?;
    let body: SsoLoginBody = parse_body(&body)?;
    let Some(provider) = &config.identity_provider else {
        return Err(ApiError::unprocessable(
            "sso_not_configured",
            "this server trusts no identity provider: sign in with POST /auth/login",
        ));
    };
    let client_address = config.trusted_proxies.client_of(&request);
    let now = crate::now();
    let identity = match provider.verify(&body.id_token, now, crate::sso::TokenUse::Login) {
        Ok(identity) => identity,
        Err(refusal) => {
            // Why, for the operator; the client gets the one answer every failed login gets.
            tracing::warn!(%refusal, "identity-provider token refused");
            audit_failed_login(&config, client_address).await?;
            return Err(ApiError::InvalidCredentials);
        }
    };
    let address = crate::guard::failure_address(client_address);
    let result = config.accounts.sso_login(&identity, address, now).await;
    login_answer(&config, result, client_address).await
}

/// Audits a login and answers it with the session's token, as a cookie and in the body.
async fn logged_in(
    config: &ApiConfig,
    success: chartlog_access::LoginSuccess,
    client_address: Option<std::net::IpAddr>,
) -> Result<HttpResponse, ApiError> {
    let session = &success.session;
    let actor = session_actor(session.user_id, session.role);
    audit::record(
        config,
        vec![session_row(
            Some(actor),
            AuditAction::Login,
            AuditOutcome::Success,
            client_address,
        )],
    )
    .await?;
    let token = success.token.expose().to_owned();
    let secure = config.transport == crate::Transport::Tls;
    Ok(HttpResponse::Ok()
        .cookie(session_cookie(&token, secure))
        .json(LoginAnswer {
            token,
            session: SessionView::of(session),
        }))
}

pub(crate) async fn logout(
    config: web::Data<ApiConfig>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    config
        .accounts
        .logout(caller.token(), crate::now())
        .await
        .map_err(internal("logout"))?;
    audit::record(
        &config,
        vec![session_row(
            Some(caller.actor(None)),
            AuditAction::Logout,
            AuditOutcome::Success,
            caller.client_address,
        )],
    )
    .await?;
    let mut expired = session_cookie("", config.transport == crate::Transport::Tls);
    expired.make_removal();
    Ok(HttpResponse::NoContent().cookie(expired).finish())
}

pub(crate) async fn session(caller: Caller) -> HttpResponse {
    HttpResponse::Ok().json(SessionView::of(&caller.session))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PasswordChangeBody {
    #[schema(format = Password)]
    current_password: String,
    #[schema(format = Password)]
    new_password: String,
}

pub(crate) async fn change_password(
    config: web::Data<ApiConfig>,
    caller: Caller,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_json(request.headers())?;
    let body: PasswordChangeBody = parse_body(&body)?;
    let changed = config
        .accounts
        .change_password(
            caller.session.user_id,
            &Password::new(body.current_password),
            &Password::new(body.new_password),
            crate::now(),
        )
        .await;
    let outcome = AuditOutcome::of(changed.is_ok());
    audit::record(
        &config,
        vec![AuditRow {
            entity: Some(AuditEntity::User),
            record_id: Some(caller.session.user_id.as_uuid()),
            ..session_row(
                Some(caller.actor(None)),
                AuditAction::Update,
                outcome,
                caller.client_address,
            )
        }],
    )
    .await?;
    match changed {
        Ok(()) => Ok(HttpResponse::NoContent().finish()),
        Err(PasswordChangeError::CurrentPasswordIncorrect) => Err(ApiError::InvalidCredentials),
        Err(PasswordChangeError::Throttled {
            retry_after_seconds,
        }) => Err(ApiError::Throttled {
            retry_after_seconds,
        }),
        Err(PasswordChangeError::Access(error)) => Err(internal("password change")(error)),
        Err(rejected) => Err(ApiError::unprocessable(
            "password_rejected",
            rejected.to_string(),
        )),
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct EnrollmentAnswer {
    secret_base32: String,
    otpauth_uri: String,
}

pub(crate) async fn begin_enrollment(
    config: web::Data<ApiConfig>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let enrollment = config
        .accounts
        .begin_second_factor_enrollment(caller.session.user_id, crate::now())
        .await
        .map_err(access_error)?;
    Ok(HttpResponse::Ok().json(EnrollmentAnswer {
        secret_base32: enrollment.secret_base32.clone(),
        otpauth_uri: enrollment.otpauth_uri.clone(),
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfirmationBody {
    code: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct RecoveryCodesAnswer {
    /// Each works once in place of a TOTP code. Shown only now.
    recovery_codes: Vec<String>,
}

pub(crate) async fn confirm_enrollment(
    config: web::Data<ApiConfig>,
    caller: Caller,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_json(request.headers())?;
    let body: ConfirmationBody = parse_body(&body)?;
    let code = SecondFactorCode::parse(&body.code).map_err(|error| {
        ApiError::unprocessable("invalid_second_factor_code", error.to_string())
    })?;
    let codes = config
        .accounts
        .confirm_second_factor_enrollment(caller.session.user_id, &code, crate::now())
        .await
        .map_err(access_error)?;
    audit::record(
        &config,
        vec![AuditRow {
            entity: Some(AuditEntity::User),
            record_id: Some(caller.session.user_id.as_uuid()),
            ..session_row(
                Some(caller.actor(None)),
                AuditAction::Update,
                AuditOutcome::Success,
                caller.client_address,
            )
        }],
    )
    .await?;
    Ok(HttpResponse::Ok().json(RecoveryCodesAnswer {
        recovery_codes: codes.expose().to_vec(),
    }))
}

// ---- administrators ------------------------------------------------------------------

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct UserView {
    user_id: UserId,
    username: String,
    role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    patient_id: Option<PatientId>,
    disabled: bool,
    second_factor_enrolled: bool,
    must_change_password: bool,
    created_at: String,
    last_login_at: Option<String>,
    /// The identity provider's subject the account signs in as; absent for accounts that
    /// sign in with a password.
    #[serde(skip_serializing_if = "Option::is_none")]
    sso_subject: Option<String>,
}

impl UserView {
    fn of(user: &UserAccount) -> Self {
        Self {
            user_id: user.user_id,
            username: user.username.as_str().to_owned(),
            role: user.role,
            patient_id: user.patient_id,
            disabled: user.disabled,
            second_factor_enrolled: user.second_factor_enrolled,
            must_change_password: user.must_change_password,
            created_at: user.created_at.to_string(),
            last_login_at: user.last_login_at.map(|at: Timestamp| at.to_string()),
            sso_subject: user.sso_subject.clone(),
        }
    }
}

fn user_row(caller: &Caller, user: Option<UserId>, action: AuditAction) -> AuditRow {
    AuditRow {
        entity: Some(AuditEntity::User),
        record_id: user.map(|user| user.as_uuid()),
        ..session_row(
            Some(caller.actor(None)),
            action,
            AuditOutcome::Success,
            caller.client_address,
        )
    }
}

/// Every account, disabled ones included.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct UserList {
    users: Vec<UserView>,
}

/// A new one-time password, shown once.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct OneTimePassword {
    /// Give it to the user out of band; they must change it at first login.
    one_time_password: String,
}

pub(crate) async fn list_users(
    config: web::Data<ApiConfig>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let users = config.accounts.list_users().await.map_err(access_error)?;
    audit::record(&config, vec![user_row(&caller, None, AuditAction::Read)]).await?;
    let users: Vec<UserView> = users.iter().map(UserView::of).collect();
    Ok(HttpResponse::Ok().json(UserList { users }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewUserBody {
    username: String,
    role: Role,
    /// Required for, and only for, a patient's account: the record it may read.
    #[serde(default)]
    patient_id: Option<PatientId>,
    /// The identity provider's `sub` for this user: the account signs in there from the
    /// start (`POST /auth/sso`), as if linked with `POST /users/{id}/sso-subject`.
    #[serde(default)]
    sso_subject: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct NewUserAnswer {
    user: UserView,
    /// Give it to the user out of band; they must change it at first login.
    one_time_password: String,
}

pub(crate) async fn create_user(
    config: web::Data<ApiConfig>,
    caller: Caller,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_json(request.headers())?;
    let body: NewUserBody = parse_body(&body)?;
    let username = Username::parse(&body.username)
        .map_err(|error| ApiError::unprocessable("invalid_username", error.to_string()))?;
    let (user, one_time_password) = config
        .accounts
        .create_user(
            NewUser {
                username,
                role: body.role,
                patient_id: body.patient_id,
                sso_subject: body.sso_subject,
            },
            crate::now(),
        )
        .await
        .map_err(access_error)?;
    audit::record(
        &config,
        vec![user_row(&caller, Some(user.user_id), AuditAction::Create)],
    )
    .await?;
    Ok(HttpResponse::Created().json(NewUserAnswer {
        user: UserView::of(&user),
        one_time_password: one_time_password.expose().to_owned(),
    }))
}

#[derive(Deserialize)]
pub(crate) struct UserPath {
    user_id: UserId,
}

pub(crate) async fn disable_user(
    config: web::Data<ApiConfig>,
    caller: Caller,
    path: web::Path<UserPath>,
) -> Result<HttpResponse, ApiError> {
    if path.user_id == caller.session.user_id {
        return Err(ApiError::unprocessable(
            "cannot_disable_self",
            "an administrator cannot disable their own account",
        ));
    }
    config
        .accounts
        .disable_user(path.user_id, crate::now())
        .await
        .map_err(access_error)?;
    audit::record(
        &config,
        vec![user_row(&caller, Some(path.user_id), AuditAction::Update)],
    )
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

pub(crate) async fn reset_password(
    config: web::Data<ApiConfig>,
    caller: Caller,
    path: web::Path<UserPath>,
) -> Result<HttpResponse, ApiError> {
    let one_time_password = config
        .accounts
        .reset_password(path.user_id, crate::now())
        .await
        .map_err(access_error)?;
    audit::record(
        &config,
        vec![user_row(&caller, Some(path.user_id), AuditAction::Update)],
    )
    .await?;
    Ok(HttpResponse::Ok().json(OneTimePassword {
        one_time_password: one_time_password.expose().to_owned(),
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SsoSubjectBody {
    /// The identity provider's `sub` for this user; `null` unlinks the account.
    subject: Option<String>,
}

/// Links an account to the identity provider's subject, or unlinks it; its sessions end.
pub(crate) async fn link_sso_subject(
    config: web::Data<ApiConfig>,
    caller: Caller,
    path: web::Path<UserPath>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_json(request.headers())?;
    let body: SsoSubjectBody = parse_body(&body)?;
    let account = config
        .accounts
        .link_sso_subject(path.user_id, body.subject.as_deref(), crate::now())
        .await
        .map_err(access_error)?;
    audit::record(
        &config,
        vec![user_row(&caller, Some(path.user_id), AuditAction::Update)],
    )
    .await?;
    Ok(HttpResponse::Ok().json(UserView::of(&account)))
}

pub(crate) async fn reset_second_factor(
    config: web::Data<ApiConfig>,
    caller: Caller,
    path: web::Path<UserPath>,
) -> Result<HttpResponse, ApiError> {
    config
        .accounts
        .reset_second_factor(path.user_id, crate::now())
        .await
        .map_err(access_error)?;
    audit::record(
        &config,
        vec![user_row(&caller, Some(path.user_id), AuditAction::Update)],
    )
    .await?;
    Ok(HttpResponse::build(StatusCode::NO_CONTENT).finish())
}

/// Maps the accounts service's refusals; its messages name ids and rules, never secrets.
pub(crate) fn access_error(error: AccessError) -> ApiError {
    match error {
        AccessError::UsernameTaken => ApiError::Conflict {
            code: "username_taken",
            message: "an account with this user name exists".to_owned(),
        },
        AccessError::PatientAccountExists => ApiError::Conflict {
            code: "patient_account_exists",
            message: error.to_string(),
        },
        AccessError::BreakGlassAlreadyOpen {
            grant_id,
            expires_at,
        } => ApiError::BreakGlassAlreadyOpen {
            grant_id,
            expires_at: expires_at.to_string(),
        },
        AccessError::UserNotFound { .. } | AccessError::GrantNotFound { .. } => ApiError::NotFound,
        AccessError::PatientIdRequired
        | AccessError::PatientIdNotAllowed { .. }
        | AccessError::RoleNotAssignable { .. }
        | AccessError::SelfReview { .. }
        | AccessError::NoPendingEnrollment { .. }
        | AccessError::InvalidSecondFactorCode => {
            ApiError::unprocessable("invalid_request", error.to_string())
        }
        AccessError::InvalidSsoSubject => {
            ApiError::unprocessable("invalid_sso_subject", error.to_string())
        }
        AccessError::SsoSubjectTaken => ApiError::Conflict {
            code: "sso_subject_taken",
            message: error.to_string(),
        },
        AccessError::SecondFactorAlreadyEnrolled { .. } | AccessError::AlreadyReviewed { .. } => {
            ApiError::Conflict {
                code: "conflict",
                message: error.to_string(),
            }
        }
        other => internal("accounts")(other),
    }
}
