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

use crate::routes::{self, Permission, ROUTES, Route, Verb};

/// The component every error response refers to.
const ERROR_SCHEMA: &str = "Error";

/// The document served at `/openapi.json`.
pub fn document() -> OpenApi {
    let mut paths = Paths::new();
    for route in ROUTES {
        let mut operation = OperationBuilder::new()
            .summary(Some(route.summary))
            .description(Some(permission_text(route.permission)))
            .operation_id(Some(format!(
                "{} {}",
                route.verb.as_str().to_lowercase(),
                route.path
            )))
            .tag(route.tag)
            .response(success_status(route), success_response(route))
            // Every other answer is an error in the one shape, whatever its status: the
            // fuzzer then checks each error body against the schema.
            .response("default", error_response());
        operation = match route.verb {
            Verb::Get => operation,
            Verb::Post => operation.request_body(Some(
                RequestBodyBuilder::new()
                    .content(
                        "application/json",
                        Content::new(
                            None::<utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>>,
                        ),
                    )
                    .required(Some(Required::True))
                    .build(),
            )),
        };
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
            ComponentsBuilder::new()
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

/// The success response: no body for 204, NDJSON or CSV for the de-identified export, JSON
/// otherwise.
fn success_response(route: &Route) -> Response {
    let builder = ResponseBuilder::new().description("Success");
    if success_status(route) == "204" {
        builder.build()
    } else if std::ptr::eq(route, &routes::DEIDENTIFIED_EXPORT) {
        builder
            .content("application/x-ndjson", Content::new(None::<RefOr<Schema>>))
            .content("text/csv", Content::new(None::<RefOr<Schema>>))
            .build()
    } else {
        builder
            .content("application/json", Content::new(None::<RefOr<Schema>>))
            .build()
    }
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

/// The query parameters of the routes that take some. Chart and history (`min_position`,
/// `before_version`) are not listed yet: their pagination is being reworked.
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
    if std::ptr::eq(route, &routes::AUDIT_TRAIL) {
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
        vec![(
            "pending",
            "Only the reviews still open (default true).",
            ObjectBuilder::new().schema_type(Type::Boolean).into(),
        )]
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
