//! The side port's extractors: what a handler needs from a request (its
//! query, its JSON body, who is asking, whether the inbox is on), each
//! refusing with the contract's error body, so a handler's arguments say
//! what it requires and in which order it is checked (axum runs them left
//! to right, as axum's `jwt` and `customize-extractor-error` examples do).

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::request::Parts,
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;

use super::{ApiError, HttpState};
use crate::{auth::Identity, config::AuthMode, inbox::Inbox, message::UserId, query};

/// `axum::extract::Query` whose refusal is the contract's 400.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Self(value))
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
    }
}

/// A JSON object body read whatever its `Content-Type` (clients of the
/// PATCH route send none, and axum's `Json` would answer 415); anything
/// else, an array included (which serde would take for a tagged enum), is
/// the contract's 400.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Response> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let object = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes);
        object
            .and_then(|o| T::deserialize(serde_json::Value::Object(o)))
            .map(Self)
            .map_err(|e| {
                ApiError::bad_request(format!("the body is not what this route takes: {e}"))
                    .into_response()
            })
    }
}

/// `?user_id=U` by the one rule of `query::user_id`; `None` when absent.
pub struct UserIdParam(pub Option<UserId>);

impl<S: Send + Sync> FromRequestParts<S> for UserIdParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(pairs) = Query::<Vec<(String, String)>>::from_request_parts(parts, state).await?;
        Ok(Self(query::user_id(&pairs)))
    }
}

/// A user's own JWT, `Authorization: Bearer T`, verified.
pub struct UserToken(pub Identity);

impl FromRequestParts<Arc<HttpState>> for UserToken {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<HttpState>,
    ) -> Result<Self, ApiError> {
        let token = crate::auth::bearer_token(&parts.headers)
            .ok_or_else(|| ApiError::unauthorized("send your token as Authorization: Bearer T"))?;
        state
            .auth
            .verify(token)
            .map(Self)
            .map_err(ApiError::unauthorized)
    }
}

/// The user a request speaks for: the JWT's user, or in `auth.mode =
/// "none"` `?user_id=`.
pub struct Caller(pub UserId);

impl FromRequestParts<Arc<HttpState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<HttpState>,
    ) -> Result<Self, ApiError> {
        if state.auth.mode() == AuthMode::None {
            let UserIdParam(user) = UserIdParam::from_request_parts(parts, state).await?;
            return user
                .map(Self)
                .ok_or_else(|| ApiError::unauthorized("auth.mode is \"none\": give ?user_id=U"));
        }
        let UserToken(identity) = UserToken::from_request_parts(parts, state).await?;
        Ok(Self(identity.user))
    }
}

/// An API key (or an admin key) for the send endpoint, or nothing when
/// `http.allow_anonymous` is set.
pub struct ApiKey;

impl FromRequestParts<Arc<HttpState>> for ApiKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<HttpState>,
    ) -> Result<Self, ApiError> {
        state.keys.check_sender(&parts.headers).map(|()| Self)
    }
}

/// An admin key, for the admin routes.
pub struct AdminKey;

impl FromRequestParts<Arc<HttpState>> for AdminKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<HttpState>,
    ) -> Result<Self, ApiError> {
        state.keys.check_admin(&parts.headers).map(|()| Self)
    }
}

/// The inbox, or 404 while it is disabled: first in an inbox route's
/// arguments, so a disabled inbox answers 404 before any auth check.
pub struct EnabledInbox(pub Inbox);

impl FromRequestParts<Arc<HttpState>> for EnabledInbox {
    type Rejection = ApiError;

    async fn from_request_parts(
        _parts: &mut Parts,
        state: &Arc<HttpState>,
    ) -> Result<Self, ApiError> {
        state.inbox.clone().map(Self).ok_or_else(|| {
            ApiError::not_found("the inbox is not enabled on this server (inbox.enabled = false)")
        })
    }
}
