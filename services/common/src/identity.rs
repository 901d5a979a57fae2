//! Who is asking: the caller's user id, as the original's services receive it.
//!
//! The original's API Gateway authenticates the user (a JWT), drops any identity header the
//! client sent, and passes the user id on to the services in `X-User-ID` (percent-encoded when
//! it adds `X-Identity-Encoding: url`). The services trust that header and check ownership
//! themselves: every batch, file, class, student and result is its creator's, and anyone else
//! is refused (403). A public request without the header is refused (401).
//!
//! What a deployment must put in front of the services, then, is such a gateway: it
//! authenticates, sets `X-User-ID` on every request it forwards, and never forwards a
//! client's own `X-User-ID` or any `/internal/...` path. The services check everything else.
//!
//! Two kinds of endpoint take no user: `/internal/v1/...` (service to service, e.g. File
//! Service asking Batch Orchestrator about a batch) and Class Management's class roster, which
//! the original lets its NLP service read without one ([`OptionalCaller`]: with a user, only
//! the owner may read it).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;

use crate::util::ApiError;

/// The header the gateway sets.
pub const USER_HEADER: &str = "x-user-id";
/// Set to `url` when the gateway percent-encoded the user id.
pub const ENCODING_HEADER: &str = "x-identity-encoding";

/// The authenticated caller of a public endpoint: a 401 without `X-User-ID`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller(pub String);

/// The caller if the request names one (internal callers do not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionalCaller(pub Option<Caller>);

impl Caller {
    pub fn user_id(&self) -> &str {
        &self.0
    }

    /// The caller named by `headers`, if any; a malformed header is the client's error.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, ApiError> {
        let Some(raw) = headers.get(USER_HEADER) else {
            return Ok(None);
        };
        let raw = raw
            .to_str()
            .map_err(|_| ApiError::bad_request("X-User-ID must be visible ASCII"))?;
        let url_encoded = headers
            .get(ENCODING_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("url"));
        let user = if url_encoded {
            percent_encoding::percent_decode_str(raw)
                .decode_utf8()
                .map_err(|_| {
                    ApiError::bad_request("X-User-ID is not valid UTF-8 once percent-decoded")
                })?
                .into_owned()
        } else {
            raw.to_owned()
        };
        let user = user.trim();
        if user.is_empty() {
            return Ok(None);
        }
        if user.len() > 255 {
            return Err(ApiError::bad_request("X-User-ID is longer than 255 bytes"));
        }
        Ok(Some(Self(user.to_owned())))
    }

    /// Ok if `owner` is this caller; 403 naming `what` otherwise. A record without an owner
    /// (written before owners were kept) is nobody's to touch over the public API.
    pub fn must_own(&self, owner: Option<&str>, what: &str) -> Result<(), ApiError> {
        match owner {
            Some(o) if o == self.0 => Ok(()),
            Some(_) => Err(ApiError::forbidden(format!(
                "{what} belongs to another user"
            ))),
            None => Err(ApiError::forbidden(format!(
                "{what} has no owner on record; only an operator can reach it"
            ))),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Self::from_headers(&parts.headers)?.ok_or_else(|| {
            ApiError::unauthorized(
                "X-User-ID is required: requests reach this service through a gateway that \
                 authenticates the user and passes the user id on",
            )
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for OptionalCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(Caller::from_headers(&parts.headers)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_user_is_read_as_the_gateway_sends_it() {
        let plain = Caller::from_headers(&headers(&[("X-User-ID", "teacher-1")])).unwrap();
        assert_eq!(plain, Some(Caller("teacher-1".into())));
        let encoded = Caller::from_headers(&headers(&[
            ("X-User-ID", "anna%40school.se"),
            ("X-Identity-Encoding", "url"),
        ]))
        .unwrap();
        assert_eq!(encoded, Some(Caller("anna@school.se".into())));
        // Not encoded: taken as it is.
        let literal = Caller::from_headers(&headers(&[("X-User-ID", "a%40b")])).unwrap();
        assert_eq!(literal, Some(Caller("a%40b".into())));
        assert_eq!(Caller::from_headers(&headers(&[])).unwrap(), None);
        assert_eq!(
            Caller::from_headers(&headers(&[("X-User-ID", "  ")])).unwrap(),
            None
        );
    }

    #[test]
    fn only_the_owner_passes() {
        let me = Caller("t1".into());
        assert!(me.must_own(Some("t1"), "batch b").is_ok());
        let other = me.must_own(Some("t2"), "batch b").unwrap_err();
        assert_eq!(other.0, axum::http::StatusCode::FORBIDDEN);
        assert_eq!(
            me.must_own(None, "batch b").unwrap_err().0,
            axum::http::StatusCode::FORBIDDEN
        );
    }
}
