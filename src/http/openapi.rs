//! `GET /openapi.json`: an OpenAPI 3 description of exactly this port's
//! routes, for client generators and API explorers.

use axum::Json;
use serde_json::{json, Value};

/// The document; built per request (it is small and rarely asked for).
pub async fn openapi() -> Json<Value> {
    Json(document())
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

/// The OpenAPI document of the side port.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "notify-bridge HTTP side port",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Send notifications (republished onto the exchange with publisher confirms), inspect and close WebSocket connections, and check health. Every error is {\"error\": CODE, \"detail\": TEXT}."
        },
        "paths": {
            "/api/notifications/send": {
                "post": {
                    "summary": "Queue a notification",
                    "description": "Validated like a broker message, published to the notifications exchange with publisher confirms; 202 only after the broker confirmed. The trailing-slash form /api/notifications/send/ is accepted too.",
                    "operationId": "sendNotification",
                    "security": [{"apiKey": []}],
                    "requestBody": {
                        "required": true,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Notification"}}}
                    },
                    "responses": {
                        "202": {
                            "description": "Queued: the broker confirmed the message",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Queued"}}}
                        },
                        "400": error_response("Invalid body (the detail says what is wrong)"),
                        "401": error_response("No or bad API key"),
                        "413": error_response("Body larger than amqp.max_message_bytes"),
                        "503": error_response("Broker unavailable or no confirm in time: nothing was queued, retry")
                    }
                }
            },
            "/api/connections": {
                "get": {
                    "summary": "List this instance's open WebSocket connections",
                    "operationId": "listConnections",
                    "security": [{"adminKey": []}],
                    "parameters": [{
                        "name": "user_id", "in": "query", "required": false,
                        "schema": {"type": "string"},
                        "description": "Only this user's connections"
                    }],
                    "responses": {
                        "200": {
                            "description": "The connections",
                            "content": {"application/json": {"schema": {
                                "type": "object",
                                "required": ["connections"],
                                "properties": {"connections": {"type": "array", "items": {"$ref": "#/components/schemas/Connection"}}}
                            }}}
                        },
                        "400": error_response("Bad query"),
                        "401": error_response("No admin key")
                    }
                }
            },
            "/api/connections/{id}": {
                "delete": {
                    "summary": "Close one connection with WebSocket close code 1008",
                    "operationId": "closeConnection",
                    "security": [{"adminKey": []}],
                    "parameters": [{
                        "name": "id", "in": "path", "required": true,
                        "schema": {"type": "string", "example": "c-1"}
                    }],
                    "responses": {
                        "204": {"description": "Closed"},
                        "401": error_response("No admin key"),
                        "404": error_response("No open connection has that id")
                    }
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness: 200 while the process serves",
                    "operationId": "healthz",
                    "responses": {"200": {"description": "Alive", "content": {"application/json": {"schema": {"type": "object"}}}}}
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: 200 while consuming from the broker",
                    "operationId": "readyz",
                    "responses": {
                        "200": {"description": "Consuming", "content": {"application/json": {"schema": {"type": "object"}}}},
                        "503": error_response("Not consuming; error is not_ready and detail says why")
                    }
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text format 0.0.4)",
                    "operationId": "metrics",
                    "responses": {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "responses": {"200": {"description": "OpenAPI 3 document", "content": {"application/json": {"schema": {"type": "object"}}}}}
                }
            }
        },
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "A key from http.api_keys (or http.admin_keys); `Authorization: Token KEY` is accepted too"},
                "adminKey": {"type": "http", "scheme": "bearer", "description": "A key from http.admin_keys; `Authorization: Token KEY` is accepted too"}
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {
                        "error": {"type": "string", "enum": ["bad_request", "unauthorized", "forbidden", "not_found", "method_not_allowed", "too_large", "unavailable", "not_ready"]},
                        "detail": {"type": "string"}
                    }
                },
                "Queued": {
                    "type": "object",
                    "required": ["status", "id"],
                    "properties": {
                        "status": {"type": "string", "enum": ["queued"]},
                        "id": {"type": "string", "description": "The body's id, else a new UUID v7; the AMQP message_id and the id of the notification frame"}
                    }
                },
                "UserId": {"oneOf": [{"type": "integer"}, {"type": "string", "minLength": 1}]},
                "Notification": {
                    "type": "object",
                    "description": "Exactly one kind of target: user_id, user_ids, channel, or broadcast: true.",
                    "required": ["payload"],
                    "properties": {
                        "user_id": {"$ref": "#/components/schemas/UserId"},
                        "user_ids": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/UserId"}},
                        "channel": {"type": "string", "minLength": 1},
                        "broadcast": {"type": "boolean"},
                        "payload": {"description": "Any JSON value (null included), forwarded as received"},
                        "event": {"type": "string", "default": "notification"},
                        "id": {"type": "string", "minLength": 1},
                        "store": {"type": "boolean", "default": true}
                    },
                    "example": {"user_id": 1, "payload": {"text": "hello"}}
                },
                "Connection": {
                    "type": "object",
                    "required": ["id", "user_id", "channels", "remote_addr", "connected_at"],
                    "properties": {
                        "id": {"type": "string", "example": "c-1"},
                        "user_id": {"type": "string"},
                        "channels": {"type": "array", "items": {"type": "string"}},
                        "remote_addr": {"type": "string", "example": "127.0.0.1:50000"},
                        "connected_at": {"type": "string", "format": "date-time"}
                    }
                }
            }
        }
    })
}
