//! Which namespace a request addresses, and the names it uses there.
//!
//! `/v1/ns/{ns}/...` addresses namespace `ns`; every other `/v1/...` URL addresses
//! [`keys::DEFAULT_NAMESPACE`], so URLs from before namespaces keep working. Before routing,
//! [`scope`] rewrites `/v1/ns/{ns}/rest` to `/v1/rest` and puts the [`Namespace`] into the
//! request's extensions: one set of routes and handlers serves every namespace, and a handler
//! cannot forget to look at it, since names reach it through the API's `Named` (the path's
//! name, checked, qualified with the namespace by [`keys::qualify`]) and `Ns` extractors
//! (which read [`of`]). Whether the
//! namespace exists and whether the request's key may act in it is the admission's to decide
//! (`api::admit`), with [`Existing`], before any handler runs.
//!
//! # Cost
//! The rewrite is a string split and one allocation per request under `/v1/ns/`; nothing for
//! the others. [`Existing`] answers from a copy at most [`Existing::FRESH_FOR`] old, so a
//! request to a namespace costs a store read once a second per namespace and gateway, and a
//! namespace deleted through any gateway is refused by every gateway within that time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::Uri;
use squall_proto::keys;
use squall_state::namespaces::Namespaces;

/// The namespace a request addresses (absent: the default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace(pub String);

/// The prefix of the URLs that name a namespace.
pub const PREFIX: &str = "/v1/ns/";

/// Rewrites `/v1/ns/{ns}/rest` to `/v1/rest` with [`Namespace`] `ns` in the extensions. A
/// request to `/v1/ns/{ns}` alone, or with a segment that is no namespace's name, is left
/// with a namespace that admission refuses (404), never routed to the default.
pub fn scope(mut request: Request) -> Request {
    let Some(rest) = request.uri().path().strip_prefix(PREFIX) else {
        return request;
    };
    let (namespace, path) = match rest.split_once('/') {
        Some((namespace, path)) => (namespace.to_string(), format!("/v1/{path}")),
        None => (rest.to_string(), "/v1/".to_string()),
    };
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = request.uri().clone().into_parts();
    match path_and_query.parse() {
        Ok(parsed) => parts.path_and_query = Some(parsed),
        // A path that parsed once parses again with a segment fewer; should it not, the
        // request goes on unrewritten, to the 404 of no route.
        Err(_) => return request,
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    request.extensions_mut().insert(Namespace(namespace));
    request
}

/// The namespace of a request's parts.
pub fn of(parts: &Parts) -> &str {
    parts
        .extensions
        .get::<Namespace>()
        .map_or(keys::DEFAULT_NAMESPACE, |n| n.0.as_str())
}

/// Which namespaces exist, as a gateway last read them.
#[derive(Debug)]
pub struct Existing {
    namespaces: Namespaces,
    known: Mutex<HashMap<String, (Instant, bool)>>,
}

impl Existing {
    /// How old an answer may be.
    pub const FRESH_FOR: Duration = Duration::from_secs(1);

    /// The namespaces of `namespaces`' store.
    pub fn new(namespaces: Namespaces) -> Self {
        Self {
            namespaces,
            known: Mutex::default(),
        }
    }

    /// The namespaces themselves (to create, list and delete).
    pub fn namespaces(&self) -> &Namespaces {
        &self.namespaces
    }

    /// Whether `name` exists (`default` always does; a name that is no namespace's does not).
    pub async fn exists(&self, name: &str) -> Result<bool, squall_state::Error> {
        if name == keys::DEFAULT_NAMESPACE {
            return Ok(true);
        }
        if keys::validate_namespace(name).is_err() {
            return Ok(false);
        }
        if let Some((at, exists)) = self.lock().get(name) {
            if at.elapsed() < Self::FRESH_FOR {
                return Ok(*exists);
            }
        }
        let read_at = Instant::now();
        let exists = self.namespaces.exists(name).await?;
        let mut known = self.lock();
        // Forgotten names stay bounded by those asked for in the last second or so.
        known.retain(|_, (at, _)| at.elapsed() < Self::FRESH_FOR * 4);
        known.insert(name.to_string(), (read_at, exists));
        Ok(exists)
    }

    /// Takes a change made through this gateway at once.
    pub fn learn(&self, name: &str, exists: bool) {
        self.lock()
            .insert(name.to_string(), (Instant::now(), exists));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, bool)>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scoped(uri: &str) -> (String, Option<String>) {
        let request = Request::builder()
            .uri(uri)
            .body(axum::body::Body::empty())
            .expect("request");
        let request = scope(request);
        (
            request.uri().to_string(),
            request.extensions().get::<Namespace>().map(|n| n.0.clone()),
        )
    }

    #[test]
    fn a_namespaced_url_is_routed_as_the_plain_one_with_its_namespace() {
        assert_eq!(
            scoped("/v1/ns/team-a/functions/incr/invoke?timeout_ms=5"),
            (
                "/v1/functions/incr/invoke?timeout_ms=5".into(),
                Some("team-a".into())
            )
        );
        assert_eq!(
            scoped("/v1/functions/incr"),
            ("/v1/functions/incr".into(), None)
        );
        assert_eq!(
            scoped("/v1/ns/b/kv/a%2Fb"),
            ("/v1/kv/a%2Fb".into(), Some("b".into()))
        );
        // No namespace's name: kept as given, for admission to refuse.
        assert_eq!(
            scoped("/v1/ns/%2e%2e/functions"),
            ("/v1/functions".into(), Some("%2e%2e".into()))
        );
        assert_eq!(scoped("/v1/ns/a"), ("/v1/".into(), Some("a".into())));
        assert_eq!(scoped("/healthz"), ("/healthz".into(), None));
    }
}
