//! API keys with roles: made with the gateway's token, each role doing what it allows and
//! refused (403) past it; revoked or expired keys refused (401) on every gateway.

use std::time::{Duration, Instant};

use serde_json::Value;
use squall_executor::testing::guest;
use squall_proto::poll::Poll;

use crate::support::{self, http, http_with};

const TOKEN: &str = "the-bootstrap-admin-token-of-32ch";

/// Makes a key with `role` through `base` as `by`: the key and its id.
fn make_key(base: &str, by: &str, role: &str, expires_in_s: Option<u64>) -> (String, String) {
    let body = serde_json::json!({"name": format!("{role}-key"), "role": role, "expires_in_s": expires_in_s});
    let made = http(
        "POST",
        &format!("{base}/v1/keys"),
        Some(by),
        body.to_string().as_bytes(),
    );
    assert_eq!(made.status, 201, "{}", made.text());
    let made = made.json();
    let key = made["key"].as_str().expect("the key, once").to_string();
    let id = made["id"].as_str().expect("an id").to_string();
    assert!(key.starts_with(&format!("sqk_{id}_")), "{key}");
    (key, id)
}

fn status(method: &str, url: &str, key: Option<&str>, body: &[u8]) -> u16 {
    http(method, url, key, body).status
}

#[test]
fn keys_do_what_their_role_allows_and_stop_when_revoked_or_expired_on_every_gateway() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    let second = support::second_gateway(dir.path(), &up, TOKEN);
    let other = second.field("http");

    let (read, _) = make_key(&base, TOKEN, "read", None);
    let (invoke, invoke_id) = make_key(&base, TOKEN, "invoke", None);
    let (deploy, _) = make_key(&base, TOKEN, "deploy", None);
    let (admin, _) = make_key(&base, TOKEN, "admin", None);
    // An admin key makes keys too; weaker ones cannot.
    let (_, _) = make_key(&other, &admin, "read", None);
    for weaker in [&read, &invoke, &deploy] {
        let refused = http(
            "POST",
            &format!("{base}/v1/keys"),
            Some(weaker),
            br#"{"name":"x","role":"admin"}"#,
        );
        assert_eq!(refused.status, 403, "{}", refused.text());
        assert_eq!(refused.error_code(), "forbidden");
        assert_eq!(
            status("GET", &format!("{base}/v1/keys"), Some(weaker), b""),
            403
        );
    }

    // Deploy registers; invoke and read cannot.
    let incr = guest("incr");
    for weaker in [&read, &invoke] {
        assert_eq!(
            status(
                "PUT",
                &format!("{base}/v1/functions/incr"),
                Some(weaker),
                &incr
            ),
            403
        );
    }
    // A refusal comes back whole while a large body is still being sent (read, not a broken
    // pipe), with a key too weak and with none.
    let large = vec![0u8; 16 << 20];
    let url = format!("{base}/v1/functions/large");
    assert_eq!(status("PUT", &url, Some(&read), &large), 403);
    assert_eq!(status("PUT", &url, None, &large), 401);
    assert_eq!(
        status(
            "PUT",
            &format!("{other}/v1/functions/incr"),
            Some(&deploy),
            &incr
        ),
        201
    );
    // Invoke calls and writes keys; read cannot.
    let call = format!("{base}/v1/functions/incr/invoke");
    assert_eq!(status("POST", &call, Some(&read), b"1"), 403);
    let called = http("POST", &call, Some(&invoke), b"41");
    assert_eq!((called.status, called.text().as_str()), (200, "42"));
    assert_eq!(
        status("PUT", &format!("{base}/v1/kv/k"), Some(&read), b"v"),
        403
    );
    assert_eq!(
        status("PUT", &format!("{base}/v1/kv/k"), Some(&invoke), b"v"),
        204
    );
    // Read reads.
    let got = http("GET", &format!("{other}/v1/kv/k"), Some(&read), b"");
    assert_eq!((got.status, got.text().as_str()), (200, "v"));

    // Bad keys: none, garbage, a real id with another secret.
    let mut forged = invoke.clone();
    forged.pop();
    forged.push(if invoke.ends_with('0') { '1' } else { '0' });
    for bad in [None, Some("sqk_garbage"), Some(forged.as_str())] {
        assert_eq!(
            status("GET", &format!("{base}/v1/functions"), bad, b""),
            401,
            "{bad:?}"
        );
    }

    // The listing names every key, never a secret or its hash.
    let listed = http("GET", &format!("{base}/v1/keys"), Some(&admin), b"");
    assert_eq!(listed.status, 200, "{}", listed.text());
    let text = listed.text();
    assert!(!text.contains(&invoke[invoke.len() - 64..]), "{text}");
    assert!(!text.contains("sha256"), "{text}");
    let keys: Vec<Value> = listed.json()["keys"].as_array().expect("keys").clone();
    assert_eq!(keys.len(), 5);

    // Revoked through one gateway, refused by the other once it reads the keys again (the
    // other used it just before, so it holds the key's record).
    assert_eq!(
        status(
            "POST",
            &format!("{other}/v1/functions/incr/invoke"),
            Some(&invoke),
            b"1"
        ),
        200
    );
    let revoked = http(
        "DELETE",
        &format!("{base}/v1/keys/{invoke_id}"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    assert!(revoked.json()["revoked_ms"].is_u64());
    assert_eq!(status("POST", &call, Some(&invoke), b"1"), 401);
    let at = Instant::now();
    let refused = Poll::within(Duration::from_secs(10)).until(|| {
        let answer = http(
            "POST",
            &format!("{other}/v1/functions/incr/invoke"),
            Some(&invoke),
            b"1",
        );
        (answer.status == 401).then(|| answer.text())
    });
    let said = refused.expect("the revoked key was refused by the other gateway");
    assert!(said.contains("revoked"), "{said}");
    println!(
        "a revoked key was refused by the other gateway {:.0} ms after the revocation",
        at.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(
        status(
            "DELETE",
            &format!("{base}/v1/keys/{}", "0".repeat(16)),
            Some(TOKEN),
            b""
        ),
        404
    );

    // An expiring key works until it expires.
    let (brief, _) = make_key(&base, TOKEN, "read", Some(3));
    assert_eq!(
        status("GET", &format!("{base}/v1/functions"), Some(&brief), b""),
        200
    );
    let expired = Poll::within(Duration::from_secs(10)).until(|| {
        let answer = http("GET", &format!("{base}/v1/functions"), Some(&brief), b"");
        (answer.status == 401).then(|| answer.text())
    });
    let said = expired.expect("the key expired");
    assert!(said.contains("expired"), "{said}");

    // The scheme's name is case-insensitive.
    let lower = http_with(
        "GET",
        &format!("{base}/v1/functions"),
        None,
        &[("Authorization", &format!("bearer {deploy}"))],
        b"",
    );
    assert_eq!(lower.status, 200, "{}", lower.text());

    // Bad requests to make a key.
    for bad in [
        r#"{"name":"x","role":"root"}"#,
        r#"{"name":"a b","role":"read"}"#,
        r#"{"name":"x","role":"read","expires_in_s":0}"#,
        r#"{"name":"x","role":"read","secret":"mine"}"#,
        "not json",
    ] {
        assert_eq!(
            status(
                "POST",
                &format!("{base}/v1/keys"),
                Some(TOKEN),
                bad.as_bytes()
            ),
            400,
            "{bad}"
        );
    }
}

#[test]
fn a_gateway_without_a_token_makes_no_keys() {
    // Keys work on every gateway of the cluster: one made through an open gateway would open
    // the others.
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &[]);
    let base = up.field("http");
    let refused = http(
        "POST",
        &format!("{base}/v1/keys"),
        None,
        br#"{"name":"x","role":"admin"}"#,
    );
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(status("GET", &format!("{base}/v1/keys"), None, b""), 403);
    assert_eq!(
        status("GET", &format!("{base}/v1/functions"), None, b""),
        200
    );
}

#[test]
fn the_cli_makes_lists_and_revokes_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    let cli = |token: &str, args: &[&str]| {
        let output = support::squall()
            .args(args)
            .args(["--gateway", &base, "--token", token])
            .output()
            .expect("run squall");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).trim().to_string(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, key, record) = cli(TOKEN, &["key", "create", "ci", "--role", "deploy"]);
    assert!(ok, "{record}");
    assert!(key.starts_with("sqk_"), "{key}");
    assert!(record.contains("\"role\": \"deploy\""), "{record}");
    // The new key registers a function through the CLI.
    let incr = squall_executor::testing::guests().join("incr.wasm");
    let (ok, _, said) = cli(
        &key,
        &["fn", "register", "incr", incr.to_str().expect("path")],
    );
    assert!(ok, "{said}");
    let (ok, listed, said) = cli(TOKEN, &["key", "ls"]);
    assert!(ok, "{said}");
    let id = &key[4..20];
    assert_eq!(listed, format!("{id}  deploy  active   ci  default"));
    let (ok, _, said) = cli(TOKEN, &["key", "revoke", id]);
    assert!(ok, "{said}");
    let (ok, listed, _) = cli(TOKEN, &["key", "ls"]);
    assert!(ok);
    assert_eq!(listed, format!("{id}  deploy  revoked  ci  default"));
    // The trail, newest first: the revocation, the registration, the key made.
    let (ok, trail, said) = cli(TOKEN, &["audit"]);
    assert!(ok, "{said}");
    let lines: Vec<&str> = trail.lines().collect();
    assert_eq!(lines.len(), 3, "{trail}");
    assert!(
        lines[0].contains("token") && lines[0].contains(&format!("200  DELETE /v1/keys/{id}")),
        "{trail}"
    );
    assert!(
        lines[1].contains(id) && lines[1].contains("deploy  201  PUT /v1/functions/incr"),
        "{trail}"
    );
    assert!(
        lines[2].contains(&format!("201  POST /v1/keys  (made key {id} (deploy))")),
        "{trail}"
    );
    let (ok, _, said) = cli(&key, &["fn", "ls"]);
    assert!(!ok);
    assert!(said.contains("revoked"), "{said}");
    // Only an id is sent, never a path or a whole key.
    for bad in ["../functions/incr", key.as_str(), "0123456789ABCDEF"] {
        let (ok, _, said) = cli(TOKEN, &["key", "revoke", bad]);
        assert!(!ok && said.contains("16 lowercase hex digits"), "{said}");
    }
}

#[test]
fn administrative_requests_leave_an_audit_trail_and_calls_do_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    let (deploy, deploy_id) = make_key(&base, TOKEN, "deploy", None);
    let incr = guest("incr");
    let url = format!("{base}/v1/functions/incr");
    assert_eq!(status("PUT", &url, Some(&deploy), &incr), 201);
    // Not administrative: a call, a read; refused: a deploy key making keys.
    assert_eq!(
        status("POST", &format!("{url}/invoke"), Some(&deploy), b"1"),
        200
    );
    assert_eq!(status("GET", &url, Some(&deploy), b""), 200);
    let body = br#"{"name":"x","role":"admin"}"#;
    assert_eq!(
        status("POST", &format!("{base}/v1/keys"), Some(&deploy), body),
        403
    );
    assert_eq!(status("DELETE", &url, Some(&deploy), b""), 204);
    // Only admins read the trail.
    let audit = format!("{base}/v1/audit");
    assert_eq!(status("GET", &audit, Some(&deploy), b""), 403);
    let page = http("GET", &audit, Some(TOKEN), b"").json();
    let entries = page["entries"].as_array().expect("entries");
    let seen: Vec<(String, String, String, u64, String)> = entries
        .iter()
        .map(|e| {
            let text = |field: &str| e[field].as_str().unwrap_or_default().to_string();
            (
                text("by"),
                text("role"),
                text("method"),
                e["status"].as_u64().unwrap_or(0),
                text("path"),
            )
        })
        .collect();
    let entry = |by: &str, role: &str, method: &str, status: u64, path: &str| {
        (
            by.to_string(),
            role.to_string(),
            method.to_string(),
            status,
            path.to_string(),
        )
    };
    // Newest first.
    assert_eq!(
        seen,
        vec![
            entry(&deploy_id, "deploy", "DELETE", 204, "/v1/functions/incr"),
            entry(&deploy_id, "deploy", "PUT", 201, "/v1/functions/incr"),
            entry("token", "admin", "POST", 201, "/v1/keys"),
        ]
    );
    assert_eq!(
        entries[2]["detail"],
        format!("made key {deploy_id} (deploy)"),
        "{page}"
    );
    assert!(!page.to_string().contains(&deploy[21..]), "no secret kept");
    // Paged: one at a time, resuming after the last.
    let first = http("GET", &format!("{audit}?limit=1"), Some(TOKEN), b"").json();
    assert_eq!(first["entries"][0]["method"], "DELETE");
    let next = first["next"].as_str().expect("a next page");
    let second = http(
        "GET",
        &format!("{audit}?limit=1&after={next}"),
        Some(TOKEN),
        b"",
    )
    .json();
    assert_eq!(second["entries"][0]["method"], "PUT");
    assert_eq!(
        status("GET", &format!("{audit}?after=../x"), Some(TOKEN), b""),
        400
    );
    // No route: no entry. A whole key where its id belongs: refused, and kept as its id.
    assert_eq!(
        status("POST", &format!("{base}/v1/nothing"), Some(&deploy), b""),
        404
    );
    let whole = format!("{base}/v1/keys/{deploy}");
    assert_eq!(status("DELETE", &whole, Some(TOKEN), b""), 400);
    let newest = http("GET", &format!("{audit}?limit=2"), Some(TOKEN), b"").json();
    assert_eq!(newest["entries"][0]["status"], 400, "{newest}");
    assert_eq!(
        newest["entries"][0]["path"],
        format!("/v1/keys/sqk_{deploy_id}_…")
    );
    assert_eq!(newest["entries"][1]["method"], "DELETE");
    assert_eq!(newest["entries"][1]["path"], "/v1/functions/incr");
    assert!(
        !newest.to_string().contains(&deploy[21..]),
        "no secret kept"
    );
}

#[test]
fn the_bootstrap_key_comes_from_a_file_and_a_short_one_stops_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).expect("a token file");
    let up = support::up(
        dir.path(),
        &["--token-file", file.to_str().expect("a path")],
    );
    let base = up.field("http");
    let url = format!("{base}/v1/functions");
    assert_eq!(status("GET", &url, Some(TOKEN), b""), 200);
    assert_eq!(status("GET", &url, None, b""), 401);
    for (name, text) in [("short", "short\n"), ("empty", "")] {
        let bad = dir.path().join(name);
        std::fs::write(&bad, text).expect("a token file");
        let output = support::squall()
            .args(["gateway", "--http-port", "0", "--token-file"])
            .arg(&bad)
            .output()
            .expect("squall gateway runs");
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{said}");
        assert!(
            said.contains("--token-file") && said.contains("16"),
            "{said}"
        );
    }
}
