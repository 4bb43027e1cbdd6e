//! `GET /openapi.json`: an OpenAPI 3 description of exactly this port's
//! routes, for client generators and API explorers. The paths are the
//! handlers' own `#[utoipa::path]` attributes, collected by the route table
//! itself (`super::documented_routes`, utoipa-axum's `OpenApiRouter`), so a
//! route cannot be served undocumented. This file keeps what no handler
//! owns: the info block, the security schemes, and the schemas of bodies
//! the handlers write as JSON without a Rust type of their own.

use std::sync::LazyLock;

use axum::Json;
use utoipa::{
    openapi::{
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
        OpenApi,
    },
    Modify,
};

/// The document, generated once from the route table.
static DOCUMENT: LazyLock<OpenApi> = LazyLock::new(|| super::documented_routes().into_openapi());

/// `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", summary = "This document",
    responses((status = 200, description = "OpenAPI 3 document", body = Object)))]
pub async fn openapi() -> Json<&'static OpenApi> {
    Json(&DOCUMENT)
}

/// What the document says before the paths: `documented_routes` starts
/// from it and adds each route's operation and the schemas it names.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "notify-bridge HTTP side port", description = "Send notifications (republished onto the exchange with publisher confirms), inspect and close WebSocket connections, and check health. Every error is {\"error\": CODE, \"detail\": TEXT}."),
    modifiers(&SecuritySchemes)
)]
pub struct Base;

/// The three credentials the handlers' `security(...)` names.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut OpenApi) {
        let bearer = |description: &str| {
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(description))
        };
        let schemes = [
            ("apiKey", bearer("A key from http.api_keys (or http.admin_keys); `Authorization: Token KEY` is accepted too")),
            ("adminKey", bearer("A key from http.admin_keys; `Authorization: Token KEY` is accepted too")),
            ("userToken", bearer("The user's own JWT, as for the WebSocket").bearer_format("JWT")),
        ];
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, http) in schemes {
            components.add_security_scheme(name, SecurityScheme::Http(http.build()));
        }
    }
}

/// Schema-only types: the JSON bodies handlers build with `json!` (or that
/// belong to modules outside `http`), described here; never constructed.
#[allow(dead_code)]
pub mod schemas {
    use serde_json::Value;
    use utoipa::{
        openapi::{schema::OneOfBuilder, Object, ObjectBuilder, RefOr, Schema, Type},
        ToSchema,
    };

    // Every error body.
    #[derive(ToSchema)]
    pub struct Error {
        #[schema(inline)]
        error: ErrorCode,
        detail: String,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "snake_case")]
    enum ErrorCode {
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        TooLarge,
        Unavailable,
        NotReady,
    }

    // The send endpoint's 202.
    #[derive(ToSchema)]
    pub struct Queued {
        #[schema(inline)]
        status: QueuedStatus,
        /// The body's id, else a new UUID v7; the AMQP message_id and the id of the notification frame
        id: String,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "snake_case")]
    enum QueuedStatus {
        Queued,
    }

    // A number or a non-empty string (`message::UserId` as decoded).
    struct UserId;

    impl utoipa::PartialSchema for UserId {
        fn schema() -> RefOr<Schema> {
            let string = ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1));
            let one_of = OneOfBuilder::new()
                .item(Object::with_type(Type::Integer))
                .item(string);
            Schema::OneOf(one_of.build()).into()
        }
    }

    impl ToSchema for UserId {}

    /// Exactly one kind of target: user_id, user_ids (at most amqp.max_recipients distinct users), channel, connection_id, or broadcast: true.
    #[derive(ToSchema)]
    #[schema(example = json!({"user_id": 1, "payload": {"text": "hello"}}))]
    pub struct Notification {
        #[serde(default)]
        user_id: UserId,
        #[schema(min_items = 1)]
        #[serde(default)]
        user_ids: Vec<UserId>,
        #[schema(min_length = 1)]
        #[serde(default)]
        channel: String,
        #[serde(default)]
        broadcast: bool,
        /// One connection, by the welcome frame's connection_id; never stored
        #[schema(min_length = 1)]
        #[serde(default)]
        connection_id: String,
        /// Any JSON value (null included), forwarded as received
        payload: Value,
        #[schema(default = "notification")]
        #[serde(default)]
        event: String,
        #[schema(min_length = 1)]
        #[serde(default)]
        id: String,
        #[schema(default = true)]
        #[serde(default)]
        store: bool,
        /// false: no delivery receipts for this message (receipts.enabled or an AMQP reply_to)
        #[schema(default = true)]
        #[serde(default)]
        receipt: bool,
    }

    // `GET /api/connections`' 200.
    #[derive(ToSchema)]
    pub struct Connections {
        connections: Vec<Connection>,
    }

    #[derive(ToSchema)]
    pub struct Connection {
        /// c-<n>; in cluster mode c-<instance>-<n>
        #[schema(example = "c-1")]
        id: String,
        /// Cluster mode: the instance holding the connection
        #[serde(default)]
        instance: String,
        user_id: String,
        channels: Vec<String>,
        #[schema(example = "127.0.0.1:50000")]
        remote_addr: String,
        #[schema(format = DateTime)]
        connected_at: String,
    }

    // `POST /api/ws-ticket`'s 201.
    #[derive(ToSchema)]
    pub struct Ticket {
        ticket: String,
        /// seconds
        expires_in: u64,
    }

    // `GET /api/dev/token`'s 200.
    #[derive(ToSchema)]
    pub struct DevToken {
        #[serde(default)]
        token: String,
        #[serde(default)]
        user_id: String,
        #[serde(default)]
        expires_in: u64,
    }

    // An inbox listing's 200.
    #[derive(ToSchema)]
    pub struct InboxListing {
        total: u64,
        unread: u64,
        notifications: Vec<InboxEntry>,
    }

    #[derive(ToSchema)]
    pub struct InboxCounts {
        total: u64,
        unread: u64,
    }

    #[derive(ToSchema)]
    pub struct InboxEntry {
        id: String,
        /// Per-user position: 1, 2, 3, … never reused
        seq: u64,
        event: String,
        /// The payload as published
        payload: Value,
        #[schema(format = DateTime)]
        created_at: String,
        read: bool,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// Names the attributes spell as strings (security schemes) or that
    /// utoipa collects on its own (schemas) all resolve in the document, and
    /// every operation has its own id: what a typo in an attribute would break.
    #[test]
    fn every_name_in_the_document_resolves() {
        fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
            match value {
                Value::Object(map) => {
                    out.extend(map.get("$ref").and_then(Value::as_str));
                    map.values().for_each(|v| refs(v, out));
                }
                Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let doc = serde_json::to_value(&*super::DOCUMENT).unwrap();
        let mut names = Vec::new();
        refs(&doc, &mut names);
        for name in names {
            let name = name.strip_prefix("#/components/schemas/").unwrap();
            assert!(doc["components"]["schemas"][name].is_object(), "{name}");
        }
        let mut ids = std::collections::HashSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let id = operation["operationId"].as_str().unwrap();
                assert!(ids.insert(id), "{method} {path}: {id} twice");
                for requirement in operation["security"].as_array().into_iter().flatten() {
                    for scheme in requirement.as_object().unwrap().keys() {
                        let schemes = &doc["components"]["securitySchemes"];
                        assert!(schemes[scheme].is_object(), "{method} {path}: {scheme}");
                    }
                }
            }
        }
        assert_eq!(ids.len(), 15);
    }
}
