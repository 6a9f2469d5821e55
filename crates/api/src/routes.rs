//! The route table: every route, the permission it needs, and its handler.
//!
//! A handler is mounted only through [`Route`] entries listed in [`ROUTES`], and a `Route`
//! cannot be written without a [`Permission`], so "a route without a declared policy" cannot
//! be built. Every mounted resource is wrapped by the guard ([`crate::guard`]), which reads
//! the permission from this table before any handler runs; the tests call every entry without
//! a session and as the wrong role.

use actix_web::dev::HttpServiceFactory;
use actix_web::{FromRequest, Handler, Resource, Responder, web};

use crate::handlers::{access, meta, oversight, patients};
use crate::policy::{Action, Entity, Grant};

/// What a caller must hold to use a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// No authentication. Only for routes that reveal no PHI and no user data (probes, the
    /// OpenAPI document, login itself).
    Public,
    /// Any live session, whatever its stage: what a user needs to finish logging in (change
    /// a one-time password, enroll a second factor) and to log out.
    AnySession,
    /// A fully authenticated session whose role holds the grant. Routes on a patient's
    /// record add the attribute checks of [`crate::policy::reach_record`] in the handler.
    Grant(Grant),
    /// A fully authenticated session of a clinical role: patient look-up (which would tell a
    /// patient who else is a patient here) and break-glass.
    Clinician,
}

/// HTTP methods a route may answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// `GET`
    Get,
    /// `POST`
    Post,
}

impl Verb {
    /// The method name, as in a request line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
        }
    }
}

/// One entry of the route table.
#[derive(Debug)]
pub struct Route {
    /// The method the route answers.
    pub verb: Verb,
    /// The actix path pattern, e.g. `/patients/{patient_id}/chart`.
    pub path: &'static str,
    /// What the caller must hold.
    pub permission: Permission,
    /// One line for the OpenAPI document.
    pub summary: &'static str,
    /// The OpenAPI tag the route is listed under.
    pub tag: &'static str,
}

macro_rules! routes {
    ($($name:ident: $verb:ident $path:literal, $permission:expr, $tag:literal, $summary:literal;)*) => {
        $(
            #[doc = $summary]
            pub static $name: Route = Route {
                verb: Verb::$verb,
                path: $path,
                permission: $permission,
                summary: $summary,
                tag: $tag,
            };
        )*
        /// Every route the API serves, with its permission.
        pub static ROUTES: &[&Route] = &[$(&$name),*];
    };
}

const fn grant(entity: Entity, action: Action) -> Permission {
    Permission::Grant(Grant(entity, action))
}

use Action::{Create as C, Read as R, Update as U};
use Permission::{AnySession, Clinician, Public};

routes! {
    HEALTHZ: Get "/healthz", Public, "operations", "Liveness: the process serves HTTP.";
    READYZ: Get "/readyz", Public, "operations", "Readiness: the database answers and projections are current.";
    OPENAPI: Get "/openapi.json", Public, "operations", "This API's OpenAPI 3 document.";

    LOGIN: Post "/auth/login", Public, "authentication", "Log in with user name, password and second factor; sets the session cookie and returns a bearer token.";
    SSO_LOGIN: Post "/auth/sso", Public, "authentication", "Sign in with an OpenID Connect ID token from the identity provider the server trusts, for an account linked to its subject; sets the session cookie and returns a bearer token.";
    LOGOUT: Post "/auth/logout", AnySession, "authentication", "End this session.";
    SESSION: Get "/auth/session", AnySession, "authentication", "Who this session belongs to, its stage and its expiry.";
    CHANGE_PASSWORD: Post "/auth/password", AnySession, "authentication", "Change the password; every session of the account ends.";
    ENROLL_SECOND_FACTOR: Post "/auth/second-factor/enrollment", AnySession, "authentication", "Start TOTP enrollment: returns the secret and an otpauth URI.";
    CONFIRM_SECOND_FACTOR: Post "/auth/second-factor/confirmation", AnySession, "authentication", "Finish TOTP enrollment with a current code: returns the recovery codes, once.";

    LIST_USERS: Get "/users", grant(Entity::User, R), "users", "List user accounts.";
    CREATE_USER: Post "/users", grant(Entity::User, C), "users", "Create a user account; returns its one-time password, once.";
    DISABLE_USER: Post "/users/{user_id}/disable", grant(Entity::User, U), "users", "Disable an account; its sessions end at once.";
    RESET_PASSWORD: Post "/users/{user_id}/password-reset", grant(Entity::User, U), "users", "Issue a new one-time password; the account's sessions end.";
    RESET_SECOND_FACTOR: Post "/users/{user_id}/second-factor-reset", grant(Entity::User, U), "users", "Remove the account's second factor; it must enroll again.";
    LINK_SSO_SUBJECT: Post "/users/{user_id}/sso-subject", grant(Entity::User, U), "users", "Link the account to an identity-provider subject (null unlinks): it then signs in only through the identity provider; its sessions end.";

    REGISTER_PATIENT: Post "/patients", grant(Entity::Demographics, C), "patients", "Register a patient; a registering clinician joins the care team.";
    SEARCH_PATIENTS: Post "/patients/search", Clinician, "patients", "Find patient ids by MRN, or by family name and birth date (in the body, never the URL).";
    CHART: Get "/patients/{patient_id}/chart", grant(Entity::Demographics, R), "patients", "The patient's current chart, limited to what the caller's role may read.";
    HISTORY: Get "/patients/{patient_id}/history", grant(Entity::History, R), "patients", "The record history, newest first, paginated by before_version.";
    DISCLOSURES: Get "/patients/{patient_id}/disclosures", grant(Entity::Disclosures, R), "patients", "The accounting of disclosures: who else read or changed this record.";
    CONSENT_RESTRICTIONS: Get "/patients/{patient_id}/consent-restrictions", grant(Entity::Consent, R), "patients", "The patient's consent restrictions, revoked ones included, with the record's stream version.";
    CARE_TEAM: Get "/patients/{patient_id}/care-team", grant(Entity::CareRelationship, R), "patients", "The clinicians in a care relationship with the patient, with the record's stream version.";
    BREAK_GLASS: Post "/patients/{patient_id}/break-glass", Clinician, "patients", "Emergency access to a patient outside the care relationship, with a stated reason.";

    CORRECT_DEMOGRAPHICS: Post "/patients/{patient_id}/correct-demographics", grant(Entity::Demographics, U), "commands", "Correct demographics.";
    RECORD_OBSERVATION: Post "/patients/{patient_id}/record-observation", grant(Entity::Observation, C), "commands", "Record an observation (LOINC).";
    RECORD_CONDITION: Post "/patients/{patient_id}/record-condition", grant(Entity::Condition, C), "commands", "Record a condition (ICD-10-CM or SNOMED CT).";
    RESOLVE_CONDITION: Post "/patients/{patient_id}/resolve-condition", grant(Entity::Condition, U), "commands", "Resolve a condition.";
    RECORD_ALLERGY: Post "/patients/{patient_id}/record-allergy", grant(Entity::Allergy, C), "commands", "Record an allergy.";
    REFUTE_ALLERGY: Post "/patients/{patient_id}/refute-allergy", grant(Entity::Allergy, U), "commands", "Refute an allergy.";
    PRESCRIBE_MEDICATION: Post "/patients/{patient_id}/prescribe-medication", grant(Entity::Medication, C), "commands", "Prescribe a medication (RxNorm).";
    DISCONTINUE_MEDICATION: Post "/patients/{patient_id}/discontinue-medication", grant(Entity::Medication, U), "commands", "Discontinue a medication order.";
    WRITE_NOTE: Post "/patients/{patient_id}/write-note", grant(Entity::Note, C), "commands", "Write a clinical note.";
    AMEND_NOTE: Post "/patients/{patient_id}/amend-note", grant(Entity::Note, U), "commands", "Amend an unsigned note.";
    SIGN_NOTE: Post "/patients/{patient_id}/sign-note", grant(Entity::Note, U), "commands", "Sign a note; needs the signer's password again.";
    ADD_NOTE_ADDENDUM: Post "/patients/{patient_id}/add-note-addendum", grant(Entity::Note, U), "commands", "Add an addendum to a signed note.";
    GRANT_CONSENT_RESTRICTION: Post "/patients/{patient_id}/grant-consent-restriction", grant(Entity::Consent, C), "commands", "Record a consent restriction (block a user, hide notes from a role).";
    REVOKE_CONSENT_RESTRICTION: Post "/patients/{patient_id}/revoke-consent-restriction", grant(Entity::Consent, U), "commands", "Revoke a consent restriction.";
    ASSIGN_CARE_RELATIONSHIP: Post "/patients/{patient_id}/assign-care-relationship", grant(Entity::CareRelationship, C), "commands", "Add a clinician to the patient's care team.";
    END_CARE_RELATIONSHIP: Post "/patients/{patient_id}/end-care-relationship", grant(Entity::CareRelationship, U), "commands", "Remove a clinician from the care team.";
    PLACE_LEGAL_HOLD: Post "/patients/{patient_id}/place-legal-hold", grant(Entity::LegalHold, C), "commands", "Place a legal hold: the record cannot be erased until it is released.";
    RELEASE_LEGAL_HOLD: Post "/patients/{patient_id}/release-legal-hold", grant(Entity::LegalHold, U), "commands", "Release a legal hold.";
    ERASE_PATIENT: Post "/patients/{patient_id}/erase", grant(Entity::Erasure, C), "commands", "Crypto-erase the patient: their key is destroyed. Refused under a legal hold, and for the reason retention_period_elapsed while the retention period runs.";

    AUDIT_TRAIL: Get "/audit-trail", grant(Entity::AuditTrail, R), "oversight", "The audit trail, filtered by user, patient, action and time, paginated.";
    BREAK_GLASS_REVIEWS: Get "/break-glass/reviews", grant(Entity::BreakGlassReview, R), "oversight", "Break-glass openings, pending review first, then newest first, paginated.";
    REVIEW_BREAK_GLASS: Post "/break-glass/reviews/{grant_id}", grant(Entity::BreakGlassReview, U), "oversight", "Close a break-glass review with a verdict.";
    DEIDENTIFIED_EXPORT: Get "/deidentified/{table}", grant(Entity::DeidentifiedData, R), "analytics", "Stream a de-identified (Safe Harbor) table as NDJSON or CSV.";
}

/// The table entry for `verb path`, if such a route exists.
pub fn route_for(verb: Verb, path: &str) -> Option<&'static Route> {
    ROUTES
        .iter()
        .copied()
        .find(|route| route.verb == verb && route.path == path)
}

/// The permission declared for `verb path`, if such a route exists.
pub fn permission_for(verb: Verb, path: &str) -> Option<Permission> {
    route_for(verb, path).map(|route| route.permission)
}

pub(crate) fn register(config: &mut web::ServiceConfig) {
    config.service(Mount::new(&HEALTHZ, meta::healthz).finish());
    config.service(Mount::new(&READYZ, meta::readyz).finish());
    config.service(Mount::new(&OPENAPI, meta::openapi).finish());

    config.service(Mount::new(&LOGIN, access::login).finish());
    config.service(Mount::new(&SSO_LOGIN, access::sso_login).finish());
    config.service(Mount::new(&LOGOUT, access::logout).finish());
    config.service(Mount::new(&SESSION, access::session).finish());
    config.service(Mount::new(&CHANGE_PASSWORD, access::change_password).finish());
    config.service(Mount::new(&ENROLL_SECOND_FACTOR, access::begin_enrollment).finish());
    config.service(Mount::new(&CONFIRM_SECOND_FACTOR, access::confirm_enrollment).finish());

    config.service(
        Mount::new(&LIST_USERS, access::list_users)
            .and(&CREATE_USER, access::create_user)
            .finish(),
    );
    config.service(Mount::new(&DISABLE_USER, access::disable_user).finish());
    config.service(Mount::new(&RESET_PASSWORD, access::reset_password).finish());
    config.service(Mount::new(&RESET_SECOND_FACTOR, access::reset_second_factor).finish());
    config.service(Mount::new(&LINK_SSO_SUBJECT, access::link_sso_subject).finish());

    config.service(Mount::new(&REGISTER_PATIENT, patients::register).finish());
    config.service(Mount::new(&SEARCH_PATIENTS, patients::search).finish());
    config.service(Mount::new(&CHART, patients::chart).finish());
    config.service(Mount::new(&HISTORY, patients::history).finish());
    config.service(Mount::new(&DISCLOSURES, patients::disclosures).finish());
    config.service(Mount::new(&CONSENT_RESTRICTIONS, patients::consent_restrictions).finish());
    config.service(Mount::new(&CARE_TEAM, patients::care_team).finish());
    config.service(Mount::new(&BREAK_GLASS, patients::break_glass).finish());

    use crate::handlers::commands::{self as c, execute};
    config.service(Mount::new(&CORRECT_DEMOGRAPHICS, execute::<c::CorrectDemographics>).finish());
    config.service(Mount::new(&RECORD_OBSERVATION, execute::<c::RecordObservation>).finish());
    config.service(Mount::new(&RECORD_CONDITION, execute::<c::RecordCondition>).finish());
    config.service(Mount::new(&RESOLVE_CONDITION, execute::<c::ResolveCondition>).finish());
    config.service(Mount::new(&RECORD_ALLERGY, execute::<c::RecordAllergy>).finish());
    config.service(Mount::new(&REFUTE_ALLERGY, execute::<c::RefuteAllergy>).finish());
    config.service(Mount::new(&PRESCRIBE_MEDICATION, execute::<c::PrescribeMedication>).finish());
    config
        .service(Mount::new(&DISCONTINUE_MEDICATION, execute::<c::DiscontinueMedication>).finish());
    config.service(Mount::new(&WRITE_NOTE, execute::<c::WriteNote>).finish());
    config.service(Mount::new(&AMEND_NOTE, execute::<c::AmendNote>).finish());
    config.service(Mount::new(&SIGN_NOTE, execute::<c::SignNote>).finish());
    config.service(Mount::new(&ADD_NOTE_ADDENDUM, execute::<c::AddNoteAddendum>).finish());
    config.service(
        Mount::new(
            &GRANT_CONSENT_RESTRICTION,
            execute::<c::GrantConsentRestriction>,
        )
        .finish(),
    );
    config.service(
        Mount::new(
            &REVOKE_CONSENT_RESTRICTION,
            execute::<c::RevokeConsentRestriction>,
        )
        .finish(),
    );
    config.service(
        Mount::new(
            &ASSIGN_CARE_RELATIONSHIP,
            execute::<c::AssignCareRelationship>,
        )
        .finish(),
    );
    config.service(Mount::new(&END_CARE_RELATIONSHIP, execute::<c::EndCareRelationship>).finish());
    config.service(Mount::new(&PLACE_LEGAL_HOLD, execute::<c::PlaceLegalHold>).finish());
    config.service(Mount::new(&RELEASE_LEGAL_HOLD, execute::<c::ReleaseLegalHold>).finish());
    config.service(Mount::new(&ERASE_PATIENT, execute::<c::ErasePatient>).finish());

    config.service(Mount::new(&AUDIT_TRAIL, oversight::audit_trail).finish());
    config.service(Mount::new(&BREAK_GLASS_REVIEWS, oversight::break_glass_reviews).finish());
    config.service(Mount::new(&REVIEW_BREAK_GLASS, oversight::review_break_glass).finish());
    config.service(Mount::new(&DEIDENTIFIED_EXPORT, oversight::deidentified_export).finish());
}

/// Builds the actix resource for one path from its table entries.
///
/// actix matches the path first and then the method *within* that resource, so every verb
/// of a path must be mounted on the same resource: `Mount::new(&A, a).and(&B, b).finish()`.
struct Mount {
    path: &'static str,
    resource: Resource,
}

impl Mount {
    fn new<F, Args>(route: &'static Route, handler: F) -> Mount
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        Mount {
            path: route.path,
            // Other methods get 405 in our error shape rather than actix's empty body.
            resource: web::resource(route.path)
                .default_service(web::to(crate::handlers::meta::method_not_allowed)),
        }
        .and(route, handler)
    }

    fn and<F, Args>(self, route: &'static Route, handler: F) -> Mount
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        // A handler mounted from a Route that is not in the table would escape the guard,
        // which reads the table.
        assert!(
            ROUTES.iter().any(|listed| std::ptr::eq(*listed, route)),
            "route {} is mounted but not listed in ROUTES",
            route.path
        );
        assert_eq!(route.path, self.path, "one Mount serves one path");
        let method = match route.verb {
            Verb::Get => web::get(),
            Verb::Post => web::post(),
        };
        Mount {
            path: self.path,
            resource: self.resource.route(method.to(handler)),
        }
    }

    /// The resource, behind the guard: no request reaches a handler without the guard
    /// having checked the table's permission for its method and path.
    fn finish(self) -> impl HttpServiceFactory {
        let path = self.path;
        self.resource
            .wrap(actix_web::middleware::from_fn(move |request, next| {
                crate::guard::guard(path, request, next)
            }))
    }
}
