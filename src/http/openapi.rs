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

fn list_parameters() -> Vec<Value> {
    vec![
        json!({"name": "unread", "in": "query", "required": false, "schema": {"type": "boolean"}, "description": "Only unread entries"}),
        json!({"name": "before", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0}, "description": "Only entries with seq < before (paging)"}),
        json!({"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}}),
    ]
}

fn inbox_listing() -> Value {
    json!({
        "description": "Entries newest first; total and unread count the whole inbox",
        "content": {"application/json": {"schema": {
            "type": "object",
            "required": ["total", "unread", "notifications"],
            "properties": {
                "total": {"type": "integer"},
                "unread": {"type": "integer"},
                "notifications": {"type": "array", "items": {"$ref": "#/components/schemas/InboxEntry"}}
            }
        }}}
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
                        "408": error_response("The body did not arrive within http.request_timeout (code `timeout`)"),
                        "413": error_response("Body larger than amqp.max_message_bytes"),
                        "503": error_response("Broker unavailable or no confirm in time: nothing was queued, retry")
                    }
                }
            },
            "/api/connections": {
                "get": {
                    "summary": "List the open WebSocket connections (of every instance, in cluster mode)",
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
                        "401": error_response("No admin key"),
                        "503": error_response("Cluster mode: the other instances cannot be asked")
                    }
                }
            },
            "/api/connections/{id}": {
                "delete": {
                    "summary": "Close one connection with WebSocket close code 1008, on whichever instance holds it",
                    "operationId": "closeConnection",
                    "security": [{"adminKey": []}],
                    "parameters": [{
                        "name": "id", "in": "path", "required": true,
                        "schema": {"type": "string", "example": "c-1"}
                    }],
                    "responses": {
                        "204": {"description": "Closed"},
                        "401": error_response("No admin key"),
                        "404": error_response("No open connection has that id (in cluster mode: no live instance has it)"),
                        "503": error_response("Cluster mode: the instance holding it cannot be asked")
                    }
                }
            },
            "/api/ws-ticket": {
                "post": {
                    "summary": "Trade your JWT for a one-time WebSocket ticket",
                    "description": "Connect with ws://HOST/ws?ticket=K within expires_in seconds (auth.ticket_ttl); the ticket works once, for the token's user and channels, so no token stands in a URL. 404 in auth.mode = \"none\".",
                    "operationId": "issueWsTicket",
                    "security": [{"userToken": []}],
                    "responses": {
                        "201": {
                            "description": "A ticket",
                            "content": {"application/json": {"schema": {
                                "type": "object",
                                "required": ["ticket", "expires_in"],
                                "properties": {
                                    "ticket": {"type": "string"},
                                    "expires_in": {"type": "integer", "description": "seconds"}
                                }
                            }}}
                        },
                        "401": error_response("No or bad token"),
                        "404": error_response("auth.mode = \"none\": there are no tokens to trade"),
                        "503": error_response("Too many tickets waiting to be used")
                    }
                }
            },
            "/api/me/notifications": {
                "get": {
                    "summary": "List your own inbox, newest first (inbox.enabled only; 404 otherwise)",
                    "operationId": "listMyNotifications",
                    "security": [{"userToken": []}],
                    "parameters": list_parameters(),
                    "responses": {
                        "200": inbox_listing(),
                        "400": error_response("Bad unread, before or limit"),
                        "401": error_response("No or bad token"),
                        "404": error_response("The inbox is disabled")
                    }
                },
                "patch": {
                    "summary": "Mark read or remove entries; every socket of the user gets the new counts",
                    "operationId": "changeMyNotifications",
                    "security": [{"userToken": []}],
                    "requestBody": {
                        "required": true,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InboxChange"}}}
                    },
                    "responses": {
                        "200": {
                            "description": "The inbox's counts after the change",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InboxCounts"}}}
                        },
                        "400": error_response("Not JSON, unknown or missing action, or missing ids"),
                        "401": error_response("No or bad token"),
                        "404": error_response("The inbox is disabled")
                    }
                }
            },
            "/api/users/{user}/notifications": {
                "get": {
                    "summary": "List any user's inbox (admin)",
                    "operationId": "listUserNotifications",
                    "security": [{"adminKey": []}],
                    "parameters": [
                        {"name": "user", "in": "path", "required": true, "schema": {"type": "string"}},
                        list_parameters()[0], list_parameters()[1], list_parameters()[2]
                    ],
                    "responses": {
                        "200": inbox_listing(),
                        "400": error_response("Bad unread, before or limit"),
                        "401": error_response("No admin key"),
                        "404": error_response("The inbox is disabled")
                    }
                }
            },
            "/": {
                "get": {
                    "summary": "The demo page (?token=T, or ?user_id=U in auth.mode none, connects at once)",
                    "operationId": "demoPage",
                    "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}
                }
            },
            "/assets/demo.js": {
                "get": {
                    "summary": "The demo page's script",
                    "operationId": "demoScript",
                    "responses": {"200": {"description": "JavaScript", "content": {"text/javascript": {"schema": {"type": "string"}}}}}
                }
            },
            "/assets/demo.css": {
                "get": {
                    "summary": "The demo page's stylesheet",
                    "operationId": "demoStyle",
                    "responses": {"200": {"description": "CSS", "content": {"text/css": {"schema": {"type": "string"}}}}}
                }
            },
            "/api/dev/token": {
                "get": {
                    "summary": "Mint a one-hour token (only with http.dev_tokens = true; 404 otherwise)",
                    "operationId": "devToken",
                    "parameters": [
                        {"name": "user_id", "in": "query", "required": true, "schema": {"type": "string"}},
                        {"name": "channel", "in": "query", "required": false, "schema": {"type": "string"}, "description": "Repeatable"}
                    ],
                    "responses": {
                        "200": {"description": "A token", "content": {"application/json": {"schema": {
                            "type": "object",
                            "properties": {"token": {"type": "string"}, "user_id": {"type": "string"}, "expires_in": {"type": "integer"}}
                        }}}},
                        "400": error_response("No user_id"),
                        "404": error_response("Development tokens are off")
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
                "adminKey": {"type": "http", "scheme": "bearer", "description": "A key from http.admin_keys; `Authorization: Token KEY` is accepted too"},
                "userToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": "The user's own JWT, as for the WebSocket"}
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
                    "description": "Exactly one kind of target: user_id, user_ids (at most amqp.max_recipients distinct users), channel, connection_id, or broadcast: true.",
                    "required": ["payload"],
                    "properties": {
                        "user_id": {"$ref": "#/components/schemas/UserId"},
                        "user_ids": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/UserId"}},
                        "channel": {"type": "string", "minLength": 1},
                        "broadcast": {"type": "boolean"},
                        "connection_id": {"type": "string", "minLength": 1, "description": "One connection, by the welcome frame's connection_id; never stored"},
                        "payload": {"description": "Any JSON value (null included), forwarded as received"},
                        "event": {"type": "string", "default": "notification"},
                        "id": {"type": "string", "minLength": 1},
                        "store": {"type": "boolean", "default": true},
                        "receipt": {"type": "boolean", "default": true, "description": "false: no delivery receipts for this message (receipts.enabled or an AMQP reply_to)"}
                    },
                    "example": {"user_id": 1, "payload": {"text": "hello"}}
                },
                "InboxCounts": {
                    "type": "object",
                    "required": ["total", "unread"],
                    "properties": {"total": {"type": "integer"}, "unread": {"type": "integer"}}
                },
                "InboxEntry": {
                    "type": "object",
                    "required": ["id", "seq", "event", "payload", "created_at", "read"],
                    "properties": {
                        "id": {"type": "string"},
                        "seq": {"type": "integer", "description": "Per-user position: 1, 2, 3, … never reused"},
                        "event": {"type": "string"},
                        "payload": {"description": "The payload as published"},
                        "created_at": {"type": "string", "format": "date-time"},
                        "read": {"type": "boolean"}
                    }
                },
                "InboxChange": {
                    "type": "object",
                    "required": ["action"],
                    "properties": {
                        "action": {"type": "string", "enum": ["mark_read", "remove", "mark_all_read", "remove_all"]},
                        "ids": {"type": "array", "items": {"type": "string"}, "description": "Required for mark_read and remove; unknown ids are ignored"}
                    }
                },
                "Connection": {
                    "type": "object",
                    "required": ["id", "user_id", "channels", "remote_addr", "connected_at"],
                    "properties": {
                        "id": {"type": "string", "example": "c-1", "description": "c-<n>; in cluster mode c-<instance>-<n>"},
                        "instance": {"type": "string", "description": "Cluster mode: the instance holding the connection"},
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
