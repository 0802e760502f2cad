//! The gateway's status and header mappings, in process: requests go straight to the router
//! (tower's `oneshot`), over a real storage node on 127.0.0.1 and a scheduler client with no
//! scheduler behind it, so every answer that needs no executor is checked without sockets
//! between the test and the handlers.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use axum::Router;
use squall_gateway::api::status_of;
use squall_gateway::{Gateway, GatewayConfig, CONSISTENCY_HEADER, KEYS_HEADER, SESSION_HEADER};
use squall_kvs::{Config, Node};
use squall_proto::call::FailureCode;
use squall_proto::fabric::Fabric;
use squall_scheduler::SchedulerClient;
use squall_state::ClientPool;
use tower::ServiceExt;

const TOKEN: &str = "in-process-secret";

struct Setup {
    router: Router,
    _node: Node,
}

fn setup(runtime: &tokio::runtime::Runtime) -> Setup {
    let node = Node::start(Config {
        port: 0,
        shards: 1,
        ..Config::default()
    })
    .expect("storage node");
    let router = runtime.block_on(async {
        let pool = ClientPool::connect(node.address(), Duration::from_secs(2)).expect("pool");
        let fabric = Fabric::new();
        let mailbox = fabric.bind("127.0.0.1", 0).expect("mailbox");
        let client = SchedulerClient::start(mailbox, Vec::new());
        let gateway: Arc<Gateway> = Gateway::new(
            client,
            pool,
            GatewayConfig {
                token: Some(TOKEN.into()),
                max_body_bytes: 1024,
                default_timeout: Duration::from_millis(500),
                ..GatewayConfig::default()
            },
        );
        gateway.router()
    });
    Setup {
        router,
        _node: node,
    }
}

struct Answer {
    status: StatusCode,
    content_type: String,
    body: String,
}

impl Answer {
    fn code(&self) -> String {
        let json: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body));
        json["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

async fn send(router: &Router, request: Request<Body>) -> Answer {
    let response = router
        .clone()
        .oneshot(request)
        .await
        .expect("the router answers");
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("a body");
    Answer {
        status,
        content_type,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn request(method: &str, uri: &str, token: Option<&str>, body: &[u8]) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(Body::from(body.to_vec())).expect("request")
}

fn invoke_with(header_name: &str, value: &str) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri("/v1/functions/incr/invoke")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header_name, value)
        .body(Body::from("1"))
        .expect("request")
}

#[test]
fn every_failure_code_has_its_status() {
    let expected = [
        (FailureCode::NotFound, 404),
        (FailureCode::BadRequest, 400),
        (FailureCode::InvalidComponent, 422),
        (FailureCode::TooLarge, 413),
        (FailureCode::Timeout, 504),
        (FailureCode::NoCapacity, 503),
        (FailureCode::ExecutorLost, 503),
        (FailureCode::Unavailable, 503),
        (FailureCode::FunctionFailed, 500),
        (FailureCode::Trap, 500),
        (FailureCode::OutOfMemory, 500),
        (FailureCode::Internal, 500),
    ];
    for (code, status) in expected {
        assert_eq!(status_of(code).as_u16(), status, "{code:?}");
    }
}

#[test]
fn requests_map_to_their_statuses_and_codes() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let setup = setup(&runtime);
    let router = &setup.router;
    runtime.block_on(async {
        // Health needs no token. With no scheduler to send calls to, the gateway is not
        // healthy.
        let health = send(router, request("GET", "/healthz", None, b"")).await;
        assert_eq!(
            (health.status, health.code().as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            "{}",
            health.body
        );
        let metrics = send(router, request("GET", "/metrics", Some(TOKEN), b"")).await;
        assert_eq!(metrics.status, StatusCode::OK);
        assert!(
            metrics
                .content_type
                .starts_with("application/openmetrics-text"),
            "{}",
            metrics.content_type
        );
        assert!(metrics.body.ends_with("# EOF\n"), "{}", metrics.body);
        let openapi = send(router, request("GET", "/v1/openapi.json", Some(TOKEN), b"")).await;
        assert_eq!(openapi.status, StatusCode::OK);
        assert!(openapi.body.contains("\"/v1/dags/{name}/invoke\""));

        // Every other request needs the token, reads included.
        for token in [None, Some("wrong")] {
            for (method, path) in [
                ("PUT", "/v1/kv/k"),
                ("GET", "/v1/kv/k"),
                ("GET", "/metrics"),
            ] {
                let refused = send(router, request(method, path, token, b"v")).await;
                assert_eq!(
                    (refused.status, refused.code().as_str()),
                    (StatusCode::UNAUTHORIZED, "unauthorized"),
                    "{method} {path} {token:?}"
                );
            }
        }

        // Routing.
        let nowhere = send(router, request("GET", "/v1/nowhere", Some(TOKEN), b"")).await;
        assert_eq!(
            (nowhere.status, nowhere.code().as_str()),
            (StatusCode::NOT_FOUND, "not_found")
        );
        let method = send(router, request("PATCH", "/v1/functions", Some(TOKEN), b"")).await;
        assert_eq!(
            (method.status, method.code().as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
        );

        // Names, records and results that do not exist.
        let bad_name = send(
            router,
            request("GET", "/v1/functions/a%20b", Some(TOKEN), b""),
        )
        .await;
        assert_eq!(
            (bad_name.status, bad_name.code().as_str()),
            (StatusCode::BAD_REQUEST, "bad_request")
        );
        for path in ["/v1/functions/nope", "/v1/models/nope", "/v1/dags/nope"] {
            let missing = send(router, request("GET", path, Some(TOKEN), b"")).await;
            assert_eq!(
                (missing.status, missing.code().as_str()),
                (StatusCode::NOT_FOUND, "not_found"),
                "{path}"
            );
        }
        let result = send(
            router,
            request("GET", "/v1/results/0123abcd", Some(TOKEN), b""),
        )
        .await;
        assert_eq!(result.status, StatusCode::NOT_FOUND, "{}", result.body);

        // DAGs are checked at registration.
        for bad in [
            "not json",
            r#"{"functions":"incr"}"#,
            r#"{"functions":["nope"]}"#,
        ] {
            let refused = send(
                router,
                request("PUT", "/v1/dags/d", Some(TOKEN), bad.as_bytes()),
            )
            .await;
            assert_eq!(
                (refused.status, refused.code().as_str()),
                (StatusCode::BAD_REQUEST, "bad_request"),
                "{bad}: {}",
                refused.body
            );
        }

        // Bodies over the limit.
        let huge = vec![b'x'; 4096];
        let too_large = send(
            router,
            request("POST", "/v1/functions/incr/invoke", Some(TOKEN), &huge),
        )
        .await;
        assert_eq!(
            (too_large.status, too_large.code().as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
        );

        // The store over HTTP: values, lattice types, reserved and oversized keys.
        let put = send(
            router,
            request("PUT", "/v1/kv/users/1", Some(TOKEN), b"ada"),
        )
        .await;
        assert_eq!(put.status, StatusCode::NO_CONTENT, "{}", put.body);
        let got = send(router, request("GET", "/v1/kv/users/1", Some(TOKEN), b"")).await;
        assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "ada"));
        let absent = send(router, request("GET", "/v1/kv/users/2", Some(TOKEN), b"")).await;
        assert_eq!(absent.status, StatusCode::NOT_FOUND);
        let bad_type = send(
            router,
            request("PUT", "/v1/kv/k?type=tree", Some(TOKEN), b"1"),
        )
        .await;
        assert_eq!(
            (bad_type.status, bad_type.code().as_str()),
            (StatusCode::BAD_REQUEST, "bad_request")
        );
        let reserved = send(router, request("PUT", "/v1/kv/squall/x", Some(TOKEN), b"1")).await;
        assert_eq!(
            (reserved.status, reserved.code().as_str()),
            (StatusCode::BAD_REQUEST, "bad_request")
        );
        let long_key = format!("/v1/kv/{}", "k".repeat(1025));
        let long = send(router, request("GET", &long_key, Some(TOKEN), b"")).await;
        assert_eq!(long.status, StatusCode::BAD_REQUEST, "{}", long.body);

        // Deletes, expiries and listings.
        for (uri, token, status) in [
            (
                "/v1/kv/users/3?ttl=3600",
                Some(TOKEN),
                StatusCode::NO_CONTENT,
            ),
            ("/v1/kv/users/4?ttl=0", Some(TOKEN), StatusCode::BAD_REQUEST),
            (
                "/v1/kv/users/4?ttl=-1",
                Some(TOKEN),
                StatusCode::BAD_REQUEST,
            ),
            (
                "/v1/kv/users/4?ttl=soon",
                Some(TOKEN),
                StatusCode::BAD_REQUEST,
            ),
            ("/v1/kv/users/4", None, StatusCode::UNAUTHORIZED),
        ] {
            let put = send(router, request("PUT", uri, token, b"x")).await;
            assert_eq!(put.status, status, "PUT {uri}: {}", put.body);
        }
        let listed = send(
            router,
            request("GET", "/v1/kv?prefix=users/", Some(TOKEN), b""),
        )
        .await;
        assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
        assert_eq!(listed.body, r#"{"keys":["users/1","users/3"]}"#);
        let page = send(
            router,
            request("GET", "/v1/kv?prefix=users/&limit=1", Some(TOKEN), b""),
        )
        .await;
        assert_eq!(page.body, r#"{"keys":["users/1"],"next":"users/1"}"#);
        let next = send(
            router,
            request(
                "GET",
                "/v1/kv?prefix=users/&limit=1&after=users/1",
                Some(TOKEN),
                b"",
            ),
        )
        .await;
        assert_eq!(next.body, r#"{"keys":["users/3"]}"#);
        for uri in [
            "/v1/kv?limit=0",
            "/v1/kv?limit=1001",
            "/v1/kv?prefix=squall/",
        ] {
            let refused = send(router, request("GET", uri, Some(TOKEN), b"")).await;
            assert_eq!(
                refused.status,
                StatusCode::BAD_REQUEST,
                "{uri}: {}",
                refused.body
            );
        }
        let unauthorized = send(router, request("DELETE", "/v1/kv/users/1", None, b"")).await;
        assert_eq!(unauthorized.status, StatusCode::UNAUTHORIZED);
        let reserved = send(
            router,
            request("DELETE", "/v1/kv/squall/x", Some(TOKEN), b""),
        )
        .await;
        assert_eq!(reserved.status, StatusCode::BAD_REQUEST);
        let deleted = send(
            router,
            request("DELETE", "/v1/kv/users/1", Some(TOKEN), b""),
        )
        .await;
        assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.body);
        let gone = send(router, request("GET", "/v1/kv/users/1", Some(TOKEN), b"")).await;
        assert_eq!(gone.status, StatusCode::NOT_FOUND);
        let listed = send(
            router,
            request("GET", "/v1/kv?prefix=users/", Some(TOKEN), b""),
        )
        .await;
        assert_eq!(listed.body, r#"{"keys":["users/3"]}"#);
    });
}

#[test]
fn invocation_headers_are_checked_before_any_call() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let setup = setup(&runtime);
    let router = &setup.router;
    runtime.block_on(async {
        let too_many = (0..1025)
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let long_session = "s".repeat(257);
        for (name, value) in [
            (CONSISTENCY_HEADER, "serializable"),
            (KEYS_HEADER, too_many.as_str()),
            (SESSION_HEADER, long_session.as_str()),
        ] {
            let refused = send(router, invoke_with(name, value)).await;
            assert_eq!(
                (refused.status, refused.code().as_str()),
                (StatusCode::BAD_REQUEST, "bad_request"),
                "{name}: {}",
                refused.body
            );
        }
        let not_text = Request::builder()
            .method("POST")
            .uri("/v1/functions/incr/invoke")
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .header(CONSISTENCY_HEADER, &b"caus\xffal"[..])
            .body(Body::from("1"))
            .expect("request");
        let refused = send(router, not_text).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
        // Accepted headers reach the call, which no scheduler answers here.
        let unanswered = send(router, invoke_with(CONSISTENCY_HEADER, "causal")).await;
        assert!(
            unanswered.status.is_server_error(),
            "{}: {}",
            unanswered.status,
            unanswered.body
        );
    });
}
