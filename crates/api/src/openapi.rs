//! The OpenAPI 3 document, generated from the route table ([`crate::routes::ROUTES`]), so it
//! lists every route the server mounts, with its permission, and nothing else.

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, Paths};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::Response;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, Content, InfoBuilder, OpenApi, OpenApiBuilder, Required};

use crate::routes::{Permission, ROUTES, Verb};

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
            .response(
                "default",
                Response::new("An error: {\"error\": code, \"message\": text}"),
            );
        operation = match route.verb {
            Verb::Get => operation.response("200", Response::new("Success")),
            Verb::Post => operation
                .response("200", Response::new("Success"))
                .request_body(Some(
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
                    .required(Required::True),
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
