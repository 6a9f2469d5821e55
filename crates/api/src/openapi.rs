//! The OpenAPI 3 document, generated from the route table ([`crate::routes::ROUTES`]), so it
//! lists every route the server mounts, with its permission, and nothing else.

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, Paths};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, Content, InfoBuilder, OpenApi, OpenApiBuilder, Ref, RefOr, Required,
};

use chartlog_domain::patient::Demographics;
use utoipa::ToSchema;

use crate::handlers::commands::CommandBody;
use crate::routes::{self, Permission, ROUTES, Route, Verb};

/// The component every error response refers to.
const ERROR_SCHEMA: &str = "Error";

/// The document served at `/openapi.json`.
pub fn document() -> OpenApi {
    let mut paths = Paths::new();
    let mut components = ComponentsBuilder::new();
    let bodies = request_bodies();
    let answers = answers();
    let mut components_schemas: Vec<(String, RefOr<Schema>)> = Vec::new();
    for route in ROUTES {
        let mut operation = OperationBuilder::new()
            .summary(Some(route.summary))
            .description(Some(if BODILESS.iter().any(|r| std::ptr::eq(*r, *route)) {
                format!(
                    "{} Takes no request body.",
                    permission_text(route.permission)
                )
            } else {
                permission_text(route.permission)
            }))
            .operation_id(Some(format!(
                "{} {}",
                route.verb.as_str().to_lowercase(),
                route.path
            )))
            .tag(route.tag)
            .response(
                success_status(route),
                success_response(route, &answers, &mut components_schemas),
            )
            // Every other answer is an error in the one shape, whatever its status: the
            // fuzzer then checks each error body against the schema.
            .response("default", error_response());
        if let Some((_, body)) = bodies
            .iter()
            .find(|(with_body, _)| std::ptr::eq(*with_body, *route))
        {
            let mut schemas = Vec::new();
            let schema = body(&mut schemas);
            for (name, schema) in schemas {
                components = components.schema(name, schema);
            }
            operation = operation.request_body(Some(
                RequestBodyBuilder::new()
                    .content("application/json", Content::new(Some(schema)))
                    .required(Some(Required::True))
                    .build(),
            ));
        }
        for name in path_parameters(route.path) {
            operation = operation.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(path_parameter_schema(name))),
            );
        }
        for (name, description, schema) in query_parameters(route) {
            operation = operation.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Query)
                    .required(Required::False)
                    .description(Some(description))
                    .schema(Some(schema)),
            );
        }
        if route.permission != Permission::Public {
            operation = operation
                .security(SecurityRequirement::new("bearer", Vec::<String>::new()))
                .security(SecurityRequirement::new("cookie", Vec::<String>::new()));
        }
        let method = match route.verb {
            Verb::Get => HttpMethod::Get,
            Verb::Post => HttpMethod::Post,
        };
        paths.add_path_operation(route.path, vec![method], operation.build());
    }
    for (name, schema) in components_schemas {
        components = components.schema(name, schema);
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("chartlog")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "An event-sourced store for electronic health records. Every PHI read is \
                     audited; errors are {\"error\": code, \"message\": text}.",
                )),
        )
        .paths(paths)
        .components(Some(
            components
                .schema(ERROR_SCHEMA, error_schema())
                .security_scheme(
                    "bearer",
                    SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
                )
                .security_scheme(
                    "cookie",
                    SecurityScheme::ApiKey(utoipa::openapi::security::ApiKey::Cookie(
                        utoipa::openapi::security::ApiKeyValue::new(crate::guard::SESSION_COOKIE),
                    )),
                )
                .build(),
        ))
        .build()
}

/// Adds a body's schema and the ones it refers to to the list, and returns a reference to it.
type BodySchema = fn(&mut Vec<(String, RefOr<Schema>)>) -> RefOr<Schema>;

/// The [`BodySchema`] of `T`.
fn body<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) -> RefOr<Schema> {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
    Ref::from_schema_name(T::name()).into()
}

/// A command's body, with the route its `CommandBody` names (so the pairing cannot drift).
fn command<B: CommandBody + ToSchema>() -> (&'static Route, BodySchema) {
    (B::ROUTE, body::<B>)
}

/// The POST routes that take none: the path and the session say it all.
const BODILESS: [&Route; 5] = [
    &routes::LOGOUT,
    &routes::ENROLL_SECOND_FACTOR,
    &routes::DISABLE_USER,
    &routes::RESET_PASSWORD,
    &routes::RESET_SECOND_FACTOR,
];

/// The JSON body each other POST route reads, as the type its handler parses.
fn request_bodies() -> Vec<(&'static Route, BodySchema)> {
    use crate::handlers::commands as c;
    use crate::handlers::{access, oversight, patients};
    vec![
        (&routes::LOGIN, body::<access::LoginBody>),
        (&routes::SSO_LOGIN, body::<access::SsoLoginBody>),
        (&routes::LINK_SSO_SUBJECT, body::<access::SsoSubjectBody>),
        (&routes::CHANGE_PASSWORD, body::<access::PasswordChangeBody>),
        (
            &routes::CONFIRM_SECOND_FACTOR,
            body::<access::ConfirmationBody>,
        ),
        (&routes::CREATE_USER, body::<access::NewUserBody>),
        (&routes::REGISTER_PATIENT, body::<Demographics>),
        (&routes::SEARCH_PATIENTS, body::<patients::SearchBody>),
        (&routes::BREAK_GLASS, body::<patients::BreakGlassBody>),
        (&routes::REVIEW_BREAK_GLASS, body::<oversight::VerdictBody>),
        command::<c::CorrectDemographics>(),
        command::<c::RecordObservation>(),
        command::<c::RecordCondition>(),
        command::<c::ResolveCondition>(),
        command::<c::RecordAllergy>(),
        command::<c::RefuteAllergy>(),
        command::<c::PrescribeMedication>(),
        command::<c::DiscontinueMedication>(),
        command::<c::WriteNote>(),
        command::<c::AmendNote>(),
        command::<c::SignNote>(),
        command::<c::AddNoteAddendum>(),
        command::<c::GrantConsentRestriction>(),
        command::<c::RevokeConsentRestriction>(),
        command::<c::AssignCareRelationship>(),
        command::<c::EndCareRelationship>(),
        command::<c::PlaceLegalHold>(),
        command::<c::ReleaseLegalHold>(),
        command::<c::ErasePatient>(),
    ]
}

fn permission_text(permission: Permission) -> String {
    match permission {
        Permission::Public => "Permission: none (public).".to_owned(),
        Permission::AnySession => "Permission: any session, even one that must first change its password or enroll a second factor.".to_owned(),
        Permission::Grant(crate::policy::Grant(entity, action)) => format!(
            "Permission: {} on {} (see the role table), plus the record-level checks for a patient's record.",
            action.as_str(),
            entity.as_str()
        ),
        Permission::Clinician => "Permission: a clinical role (physician, nurse, radiologist, lab technician).".to_owned(),
    }
}

/// The `{name}` segments of an actix path pattern.
fn path_parameters(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
}

/// The status a route answers with on success.
fn success_status(route: &Route) -> &'static str {
    let is = |listed: &[&Route]| listed.iter().any(|other| std::ptr::eq(*other, route));
    if is(&[
        &routes::CREATE_USER,
        &routes::REGISTER_PATIENT,
        &routes::BREAK_GLASS,
    ]) {
        "201"
    } else if is(&[
        &routes::LOGOUT,
        &routes::CHANGE_PASSWORD,
        &routes::DISABLE_USER,
        &routes::RESET_SECOND_FACTOR,
        &routes::REVIEW_BREAK_GLASS,
    ]) {
        "204"
    } else {
        "200"
    }
}

/// The success response: no body for 204, NDJSON or CSV for the de-identified export, and
/// otherwise JSON of the type the handler answers with (see [`answers`]).
fn success_response(
    route: &Route,
    answers: &[(&'static Route, BodySchema)],
    schemas: &mut Vec<(String, RefOr<Schema>)>,
) -> Response {
    let builder = ResponseBuilder::new().description("Success");
    if success_status(route) == "204" {
        builder.build()
    } else if std::ptr::eq(route, &routes::DEIDENTIFIED_EXPORT) {
        builder
            .content("application/x-ndjson", Content::new(None::<RefOr<Schema>>))
            .content("text/csv", Content::new(None::<RefOr<Schema>>))
            .build()
    } else {
        let schema = answers
            .iter()
            .find(|(answered, _)| std::ptr::eq(*answered, route))
            .map(|(_, answer)| answer(schemas));
        builder
            .content("application/json", Content::new(schema))
            .build()
    }
}

/// The type each JSON-answering route answers with on success. Every command answers
/// [`patients::CommandAnswer`]; `/openapi.json` answers this document, which describes
/// itself.
fn answers() -> Vec<(&'static Route, BodySchema)> {
    use crate::handlers::{access, meta, oversight, patients};
    let mut answers: Vec<(&'static Route, BodySchema)> = vec![
        (&routes::HEALTHZ, body::<meta::Status>),
        (&routes::READYZ, body::<meta::Status>),
        (&routes::LOGIN, body::<access::LoginAnswer>),
        (&routes::SSO_LOGIN, body::<access::LoginAnswer>),
        (&routes::LINK_SSO_SUBJECT, body::<access::UserView>),
        (&routes::SESSION, body::<access::SessionView>),
        (
            &routes::ENROLL_SECOND_FACTOR,
            body::<access::EnrollmentAnswer>,
        ),
        (
            &routes::CONFIRM_SECOND_FACTOR,
            body::<access::RecoveryCodesAnswer>,
        ),
        (&routes::LIST_USERS, body::<access::UserList>),
        (&routes::CREATE_USER, body::<access::NewUserAnswer>),
        (&routes::RESET_PASSWORD, body::<access::OneTimePassword>),
        (&routes::REGISTER_PATIENT, body::<patients::CommandAnswer>),
        (&routes::SEARCH_PATIENTS, body::<patients::PatientIds>),
        (&routes::CHART, body::<patients::ChartView>),
        (&routes::HISTORY, body::<patients::HistoryPage>),
        (&routes::DISCLOSURES, body::<oversight::AuditPageView>),
        (
            &routes::CONSENT_RESTRICTIONS,
            body::<patients::ConsentRestrictions>,
        ),
        (&routes::CARE_TEAM, body::<patients::CareTeam>),
        (&routes::BREAK_GLASS, body::<patients::BreakGlassAnswer>),
        (&routes::AUDIT_TRAIL, body::<oversight::AuditPageView>),
        (&routes::BREAK_GLASS_REVIEWS, body::<oversight::ReviewList>),
    ];
    answers.extend(
        ROUTES
            .iter()
            .copied()
            .filter(|route| route.tag == "commands")
            .map(|route| (route, body::<patients::CommandAnswer> as BodySchema)),
    );
    answers
}

fn error_response() -> Response {
    ResponseBuilder::new()
        .description("An error: {\"error\": code, \"message\": text}")
        .content(
            "application/json",
            Content::new(Some(Ref::from_schema_name(ERROR_SCHEMA))),
        )
        .build()
}

/// `{"error": code, "message": text}`, as [`crate::ApiError`] renders it.
fn error_schema() -> Schema {
    ObjectBuilder::new()
        .property(
            "error",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some("A stable, machine-readable code.")),
        )
        .property(
            "message",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some("For people; never carries PHI.")),
        )
        .property(
            "grant_id",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
                .description(Some(
                    "With `break_glass_already_open`: the caller's grant to this patient that \
                     is still open.",
                )),
        )
        .property(
            "expires_at",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
                .description(Some(
                    "With `break_glass_already_open`: when that grant ends (RFC 3339).",
                )),
        )
        .required("error")
        .required("message")
        .additional_properties(Some(
            utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
        ))
        .into()
}

/// Ids are UUIDs; the de-identified export's `{table}` is one of its table names.
fn path_parameter_schema(name: &str) -> Schema {
    if name == "table" {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(
                chartlog_projections::deid::export::DeidTable::ALL
                    .iter()
                    .map(|table| table.as_str()),
            ))
            .into()
    } else {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
            .into()
    }
}

fn string_schema() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

/// The query parameters of the routes that take some.
fn query_parameters(route: &Route) -> Vec<(&'static str, &'static str, Schema)> {
    let uuid = || {
        string_schema()
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
            .into()
    };
    let time = || {
        string_schema()
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .into()
    };
    let page = || {
        vec![
            (
                "after",
                "The `next` value of the previous page.",
                string_schema().into(),
            ),
            (
                "limit",
                "Rows per page.",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0))
                    .maximum(Some(u32::MAX))
                    .into(),
            ),
        ]
    };
    let count = || {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(0))
            .maximum(Some(u64::MAX))
            .into()
    };
    let min_position = (
        "min_position",
        "Answer once the read model has applied the log up to this global position (503 \
         `not_ready` after 5 s).",
        count(),
    );
    if std::ptr::eq(route, &routes::CHART) {
        vec![min_position]
    } else if std::ptr::eq(route, &routes::HISTORY) {
        vec![
            (
                "before_version",
                "Entries older than this stream version: the `next_before_version` of the \
                 previous page.",
                count(),
            ),
            (
                "limit",
                "Entries per page (1-200, default 50).",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0))
                    .maximum(Some(u32::MAX))
                    .into(),
            ),
            min_position,
        ]
    } else if std::ptr::eq(route, &routes::AUDIT_TRAIL) {
        let mut parameters = vec![
            ("user_id", "Only this user's accesses.", uuid()),
            (
                "patient_id",
                "Only accesses to this patient's record.",
                uuid(),
            ),
            (
                "action",
                "Only this kind of access.",
                string_schema()
                    .enum_values(Some([
                        "create",
                        "read",
                        "update",
                        "delete",
                        "login",
                        "logout",
                        "session_expiry",
                        "break_glass",
                        "export",
                        "search",
                    ]))
                    .into(),
            ),
            ("from", "RFC 3339, inclusive.", time()),
            ("to", "RFC 3339, exclusive.", time()),
        ];
        parameters.extend(page());
        parameters
    } else if std::ptr::eq(route, &routes::DISCLOSURES) {
        page()
    } else if std::ptr::eq(route, &routes::BREAK_GLASS_REVIEWS) {
        vec![
            (
                "pending",
                "Only the reviews still open (default true).",
                ObjectBuilder::new().schema_type(Type::Boolean).into(),
            ),
            (
                "after",
                "The `next` value of the previous page.",
                string_schema().into(),
            ),
            (
                "limit",
                "Reviews per page (1-1000, default 100).",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0))
                    .maximum(Some(u32::MAX))
                    .into(),
            ),
        ]
    } else if std::ptr::eq(route, &routes::DEIDENTIFIED_EXPORT) {
        vec![(
            "format",
            "`ndjson` (default) or `csv`.",
            string_schema().enum_values(Some(["ndjson", "csv"])).into(),
        )]
    } else {
        Vec::new()
    }
}

/// A checker of JSON values against this document's schemas, for the tests that hold the
/// document to what the handlers parse and answer.
#[cfg(test)]
pub(crate) mod schema_check {
    use serde_json::{Value, json};

    /// Checks a request body `value` against `schema` for the parts of JSON Schema this document
    /// uses: `$ref`, `oneOf`, `type` (one or a list), `enum`, `properties`, `required`,
    /// `additionalProperties: false`, `items`, `maxLength` and `pattern` (whole-string `^...$`
    /// patterns of digit runs only, as `Decimal`'s). Returns where the first mismatch is.
    pub(crate) fn conforms(
        document: &Value,
        schema: &Value,
        value: &Value,
        at: &str,
    ) -> Result<(), String> {
        check(document, schema, value, at, Objects::AsDeclared)
    }

    /// [`conforms`] for an answer: an object may hold only the properties its schema lists, so a
    /// field the handler sends and the document leaves out is found.
    pub(crate) fn answer_conforms(
        document: &Value,
        schema: &Value,
        value: &Value,
        at: &str,
    ) -> Result<(), String> {
        check(document, schema, value, at, Objects::Closed)
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Objects {
        AsDeclared,
        Closed,
    }

    fn check(
        document: &Value,
        schema: &Value,
        value: &Value,
        at: &str,
        objects: Objects,
    ) -> Result<(), String> {
        if let Some(reference) = schema["$ref"].as_str() {
            let name = reference.trim_start_matches("#/components/schemas/");
            let target = &document["components"]["schemas"][name];
            if target.is_null() {
                return Err(format!("{at}: {reference} is not in the components"));
            }
            return check(document, target, value, at, objects);
        }
        if let Some(choices) = schema["oneOf"].as_array() {
            let matching = choices
                .iter()
                .filter(|choice| check(document, choice, value, at, objects).is_ok())
                .count();
            return match matching {
                1 => Ok(()),
                count => Err(format!("{at}: {value} matches {count} of oneOf")),
            };
        }
        let types: Vec<&str> = match &schema["type"] {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let type_of = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(number) if number.is_i64() || number.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        if !types.is_empty() && !types.contains(&type_of) {
            return Err(format!("{at}: {type_of} where {types:?} is expected"));
        }
        if let Some(allowed) = schema["enum"].as_array()
            && !allowed.contains(value)
        {
            return Err(format!("{at}: {value} is not one of {allowed:?}"));
        }
        match value {
            Value::String(text) => {
                if let Some(length_max) = schema["maxLength"].as_u64()
                    && text.chars().count() as u64 > length_max
                {
                    return Err(format!("{at}: longer than {length_max}"));
                }
                if schema["pattern"].is_string() && !decimal_like(text) {
                    return Err(format!("{at}: {text:?} does not match the pattern"));
                }
            }
            Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    check(
                        document,
                        &schema["items"],
                        item,
                        &format!("{at}[{index}]"),
                        objects,
                    )?;
                }
            }
            Value::Object(fields) => {
                for required in schema["required"].as_array().into_iter().flatten() {
                    let name = required.as_str().unwrap_or_default();
                    if !fields.contains_key(name) {
                        return Err(format!("{at}: required {name} is missing"));
                    }
                }
                for (name, field) in fields {
                    match schema["properties"].get(name) {
                        Some(property) => {
                            check(document, property, field, &format!("{at}.{name}"), objects)?;
                        }
                        None if schema["additionalProperties"] == json!(false)
                            || (objects == Objects::Closed && schema["properties"].is_object()) =>
                        {
                            return Err(format!("{at}: {name} is not a property"));
                        }
                        None => {}
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn decimal_like(text: &str) -> bool {
        let unsigned = text.strip_prefix('-').unwrap_or(text);
        let (integer, fraction) = unsigned.split_once('.').unwrap_or((unsigned, "0"));
        [integer, fraction]
            .iter()
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
    }
}

#[cfg(test)]
mod tests {
    use chartlog_domain::{PatientCommand, synthetic};
    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};

    use super::schema_check::conforms;
    use super::*;
    use crate::handlers::commands as c;
    use crate::handlers::{access, oversight, patients};

    fn parses<T: DeserializeOwned>(body: &Value) -> bool {
        serde_json::from_value::<T>(body.clone()).is_ok()
    }

    const ID: &str = "0190a6f4-0000-7000-8000-00000000000a";
    const AT: &str = "2026-11-27T08:30:00Z";

    /// A route, a body, and whether the parser its handler uses accepts that body.
    type Example = (&'static Route, Value, fn(&Value) -> bool);

    /// A body each route with one accepts, and the parser its handler uses.
    fn examples() -> Vec<Example> {
        let PatientCommand::RegisterPatient { demographics, .. } = synthetic::registration(7)
        else {
            unreachable!("a registration")
        };
        let loinc =
            json!({ "system": "http://loinc.org", "code": "8867-4", "display": "Heart rate" });
        let rxnorm =
            json!({ "system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975" });
        vec![
            (
                &routes::LOGIN,
                json!({ "username": "dr.grey", "password": "a long passphrase here", "second_factor": "123456" }),
                parses::<access::LoginBody>,
            ),
            (
                &routes::SSO_LOGIN,
                json!({ "id_token": "eyJhbGciOiJFZERTQSJ9.e30.c2ln" }),
                parses::<access::SsoLoginBody>,
            ),
            (
                &routes::LINK_SSO_SUBJECT,
                json!({ "subject": "00u1a2b3c4d5e6f7g8h9" }),
                parses::<access::SsoSubjectBody>,
            ),
            (
                &routes::LINK_SSO_SUBJECT,
                json!({ "subject": null }),
                parses::<access::SsoSubjectBody>,
            ),
            (
                &routes::CHANGE_PASSWORD,
                json!({ "current_password": "old one", "new_password": "a new long passphrase" }),
                parses::<access::PasswordChangeBody>,
            ),
            (
                &routes::CONFIRM_SECOND_FACTOR,
                json!({ "code": "123456" }),
                parses::<access::ConfirmationBody>,
            ),
            (
                &routes::CREATE_USER,
                json!({ "username": "pat.jones", "role": "patient", "patient_id": ID }),
                parses::<access::NewUserBody>,
            ),
            (
                &routes::REGISTER_PATIENT,
                serde_json::to_value(&demographics).unwrap(),
                parses::<Demographics>,
            ),
            (
                &routes::SEARCH_PATIENTS,
                json!({ "family_name": "Doe", "birth_date": "1980-01-02" }),
                parses::<patients::SearchBody>,
            ),
            (
                &routes::SEARCH_PATIENTS,
                json!({ "mrn": "MRN-0042" }),
                parses::<patients::SearchBody>,
            ),
            (
                &routes::BREAK_GLASS,
                json!({ "reason": "unconscious in the emergency department" }),
                parses::<patients::BreakGlassBody>,
            ),
            (
                &routes::REVIEW_BREAK_GLASS,
                json!({ "verdict": "justified" }),
                parses::<oversight::VerdictBody>,
            ),
            (
                &routes::CORRECT_DEMOGRAPHICS,
                json!({ "address": null, "sex": "female" }),
                parses::<c::CorrectDemographics>,
            ),
            (
                &routes::RECORD_OBSERVATION,
                json!({ "code": loinc, "value": { "quantity": { "value": "72", "unit": "/min" } }, "effective_at": AT }),
                parses::<c::RecordObservation>,
            ),
            (
                &routes::RECORD_OBSERVATION,
                json!({ "code": loinc, "value": { "text": "regular rhythm" }, "effective_at": AT }),
                parses::<c::RecordObservation>,
            ),
            (
                &routes::RECORD_CONDITION,
                json!({ "code": { "system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9" }, "onset_at": AT }),
                parses::<c::RecordCondition>,
            ),
            (
                &routes::RESOLVE_CONDITION,
                json!({ "condition_id": ID, "resolved_at": AT }),
                parses::<c::ResolveCondition>,
            ),
            (
                &routes::RECORD_ALLERGY,
                json!({ "substance": rxnorm, "criticality": "high", "reaction": "anaphylaxis" }),
                parses::<c::RecordAllergy>,
            ),
            (
                &routes::REFUTE_ALLERGY,
                json!({ "allergy_id": ID }),
                parses::<c::RefuteAllergy>,
            ),
            (
                &routes::PRESCRIBE_MEDICATION,
                json!({ "medication": rxnorm, "dose": { "value": "500", "unit": "mg" }, "route": "oral", "frequency": "twice_daily" }),
                parses::<c::PrescribeMedication>,
            ),
            (
                &routes::DISCONTINUE_MEDICATION,
                json!({ "medication_order_id": ID, "reason": "course_completed" }),
                parses::<c::DiscontinueMedication>,
            ),
            (
                &routes::WRITE_NOTE,
                json!({ "text": "Seen for follow-up.\nDoing well." }),
                parses::<c::WriteNote>,
            ),
            (
                &routes::AMEND_NOTE,
                json!({ "note_id": ID, "text": "Seen for follow-up." }),
                parses::<c::AmendNote>,
            ),
            (
                &routes::SIGN_NOTE,
                json!({ "note_id": ID, "password": "a long passphrase here" }),
                parses::<c::SignNote>,
            ),
            (
                &routes::SIGN_NOTE,
                json!({ "note_id": ID, "id_token": "eyJhbGciOiJFZERTQSJ9.e30.c2ln" }),
                parses::<c::SignNote>,
            ),
            (
                &routes::ADD_NOTE_ADDENDUM,
                json!({ "note_id": ID, "text": "Labs came back normal." }),
                parses::<c::AddNoteAddendum>,
            ),
            (
                &routes::GRANT_CONSENT_RESTRICTION,
                json!({ "kind": { "block_user": ID } }),
                parses::<c::GrantConsentRestriction>,
            ),
            (
                &routes::GRANT_CONSENT_RESTRICTION,
                json!({ "kind": { "hide_notes_from_role": "nurse" } }),
                parses::<c::GrantConsentRestriction>,
            ),
            (
                &routes::REVOKE_CONSENT_RESTRICTION,
                json!({ "restriction_id": ID }),
                parses::<c::RevokeConsentRestriction>,
            ),
            (
                &routes::ASSIGN_CARE_RELATIONSHIP,
                json!({ "clinician": ID }),
                parses::<c::AssignCareRelationship>,
            ),
            (
                &routes::END_CARE_RELATIONSHIP,
                json!({ "clinician": ID }),
                parses::<c::EndCareRelationship>,
            ),
            (
                &routes::PLACE_LEGAL_HOLD,
                json!({ "reason": "litigation" }),
                parses::<c::PlaceLegalHold>,
            ),
            (
                &routes::RELEASE_LEGAL_HOLD,
                json!({ "hold_id": ID }),
                parses::<c::ReleaseLegalHold>,
            ),
            (
                &routes::ERASE_PATIENT,
                json!({ "reason": "patient_request" }),
                parses::<c::ErasePatient>,
            ),
        ]
    }

    fn body_schema(document: &Value, route: &Route) -> Value {
        document["paths"][route.path]["post"]["requestBody"]["content"]["application/json"]
            ["schema"]
            .clone()
    }

    #[test]
    fn every_post_route_declares_its_body_or_that_it_takes_none() {
        let bodies = request_bodies();
        for route in ROUTES {
            let with_body = bodies
                .iter()
                .filter(|(r, _)| std::ptr::eq(*r, *route))
                .count();
            let bodiless = BODILESS.iter().any(|r| std::ptr::eq(*r, *route));
            match route.verb {
                Verb::Post => assert!(
                    with_body + usize::from(bodiless) == 1,
                    "POST {}: declare its body once, or list it as bodiless",
                    route.path
                ),
                Verb::Get => assert!(with_body == 0 && !bodiless, "GET {}", route.path),
            }
        }
    }

    #[test]
    fn every_body_the_handlers_accept_conforms_to_its_schema() {
        let document = serde_json::to_value(document()).unwrap();
        let examples = examples();
        for (route, _) in request_bodies() {
            assert!(
                examples.iter().any(|(r, _, _)| std::ptr::eq(*r, route)),
                "POST {}: no example body",
                route.path
            );
        }
        for (route, body, parses) in examples {
            assert!(
                parses(&body),
                "POST {}: the handler refuses {body}",
                route.path
            );
            let schema = body_schema(&document, route);
            assert!(schema.is_object(), "POST {}: no body schema", route.path);
            if let Err(mismatch) = conforms(&document, &schema, &body, "body") {
                panic!("POST {}: {mismatch}", route.path);
            }
        }
    }

    /// The validator above can fail: bodies the handlers refuse break the schema too.
    #[test]
    fn bodies_the_handlers_refuse_break_the_schema() {
        let document = serde_json::to_value(document()).unwrap();
        let refused = [
            (
                &routes::RECORD_OBSERVATION,
                json!({ "code": { "system": "http://loinc.org", "code": "8867-4" }, "value": { "quantity": { "value": "72", "unit": "/min" } }, "effective_at": AT, "extra": 1 }),
                parses::<c::RecordObservation> as fn(&Value) -> bool,
            ),
            (
                &routes::RECORD_OBSERVATION,
                json!({ "code": { "system": "http://loinc.org", "code": "8867-4" }, "effective_at": AT }),
                parses::<c::RecordObservation>,
            ),
            (
                &routes::RECORD_ALLERGY,
                json!({ "substance": { "system": "http://example.org", "code": "1" }, "criticality": "high" }),
                parses::<c::RecordAllergy>,
            ),
            (
                &routes::PRESCRIBE_MEDICATION,
                json!({ "medication": { "system": "http://loinc.org", "code": "8867-4" }, "dose": { "value": "1e3", "unit": "mg" }, "route": "oral", "frequency": "daily" }),
                parses::<c::PrescribeMedication>,
            ),
            (
                &routes::ERASE_PATIENT,
                json!({ "reason": "because" }),
                parses::<c::ErasePatient>,
            ),
            (
                &routes::CREATE_USER,
                json!({ "username": "x", "role": "janitor" }),
                parses::<access::NewUserBody>,
            ),
        ];
        for (route, body, parses) in refused {
            assert!(
                !parses(&body),
                "POST {}: the handler accepts {body}",
                route.path
            );
            let schema = body_schema(&document, route);
            assert!(
                conforms(&document, &schema, &body, "body").is_err(),
                "POST {}: {body} conforms",
                route.path
            );
        }
    }
}
