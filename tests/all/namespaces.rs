//! Two tenants, each trying against the other and failing (403, 404 or a key that is simply
//! its own) while its own work succeeds: keys from functions and over HTTP (by plain name, by
//! `../`, by percent-encoding, by the reserved prefix, by the other namespace's mapped name),
//! functions, DAGs, triggers, results, activations, listings, registrations over the other's
//! names, keys of the wrong namespace, role or age; both tenants' calls at once on one shared
//! executor; and a namespace deleted with everything it owned.

use std::time::Duration;

use squall_executor::testing::guest;
use squall_proto::poll::Poll;

use crate::support::{self, http, Answer};

const TOKEN: &str = "the-bootstrap-admin-token-of-32ch";

/// Makes a key with `role` acting in `namespace`: the key and its id.
fn make_key(
    base: &str,
    namespace: &str,
    role: &str,
    expires_in_s: Option<u64>,
) -> (String, String) {
    let body = serde_json::json!({
        "name": format!("{namespace}-{role}"), "role": role,
        "namespace": namespace, "expires_in_s": expires_in_s,
    });
    let made = http(
        "POST",
        &format!("{base}/v1/keys"),
        Some(TOKEN),
        body.to_string().as_bytes(),
    );
    assert_eq!(made.status, 201, "{}", made.text());
    let made = made.json();
    assert_eq!(made["namespace"], namespace);
    (
        made["key"].as_str().expect("key").to_string(),
        made["id"].as_str().expect("id").to_string(),
    )
}

/// A tenant: its namespace's URL prefix and its keys.
struct Tenant {
    url: String,
    deploy: String,
    invoke: String,
    read: String,
}

impl Tenant {
    fn new(base: &str, namespace: &str) -> Self {
        let created = http(
            "POST",
            &format!("{base}/v1/namespaces"),
            Some(TOKEN),
            format!(r#"{{"name":"{namespace}"}}"#).as_bytes(),
        );
        assert_eq!(created.status, 201, "{}", created.text());
        Self {
            url: format!("{base}/v1/ns/{namespace}"),
            deploy: make_key(base, namespace, "deploy", None).0,
            invoke: make_key(base, namespace, "invoke", None).0,
            read: make_key(base, namespace, "read", None).0,
        }
    }

    /// Calls `misbehave` with `input` as this tenant; its output (which must be a 200).
    fn call(&self, input: &str) -> String {
        let answer = self.invoke_as(&self.invoke, input);
        assert_eq!(answer.status, 200, "{input}: {}", answer.text());
        answer.text()
    }

    fn invoke_as(&self, key: &str, input: &str) -> Answer {
        http(
            "POST",
            &format!("{}/functions/misbehave/invoke", self.url),
            Some(key),
            input.as_bytes(),
        )
    }
}

fn status(method: &str, url: &str, key: &str, body: &[u8]) -> u16 {
    http(method, url, Some(key), body).status
}

#[test]
fn two_tenants_reach_nothing_of_each_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    let alpha = Tenant::new(&base, "alpha");
    let beta = Tenant::new(&base, "beta");
    let misbehave = guest("misbehave");
    for tenant in [&alpha, &beta] {
        let url = format!("{}/functions/misbehave", tenant.url);
        assert_eq!(status("PUT", &url, &tenant.deploy, &misbehave), 201);
    }
    // A function only alpha has.
    let incr = guest("incr");
    let url = format!("{}/functions/only-alpha", alpha.url);
    assert_eq!(status("PUT", &url, &alpha.deploy, &incr), 201);

    // The same key name, each tenant its own value.
    assert_eq!(alpha.call("state:secret=alpha-value"), "alpha-value");
    assert_eq!(beta.call("state:secret=beta-value"), "beta-value");
    assert_eq!(alpha.call("read:secret"), "alpha-value");
    assert_eq!(beta.call("read:secret"), "beta-value");
    // From a function, every other way to name alpha's key finds nothing of alpha's.
    for name in [
        "../alpha/kv/secret",
        "../../ns/alpha/kv/secret",
        "%2e%2e/alpha/kv/secret",
        "squall/ns/alpha/kv/secret",
        "alpha/secret",
        "/secret",
    ] {
        let read = beta.call(&format!("read:{name}"));
        assert!(!read.contains("alpha"), "{name}: {read}");
    }
    // Over HTTP: its own key, and none of alpha's.
    let own = http(
        "GET",
        &format!("{}/kv/secret", beta.url),
        Some(&beta.read),
        b"",
    );
    assert_eq!((own.status, own.text()), (200, "beta-value".to_string()));
    assert_eq!(
        status("GET", &format!("{}/kv/secret", alpha.url), &beta.read, b""),
        403
    );
    assert_eq!(
        status(
            "PUT",
            &format!("{}/kv/secret", alpha.url),
            &beta.invoke,
            b"x"
        ),
        403
    );
    for path in [
        "..%2Falpha%2Fkv%2Fsecret",
        "%2e%2e%2F%2e%2e%2Falpha%2Fkv%2Fsecret",
    ] {
        let answer = http(
            "GET",
            &format!("{}/kv/{path}", beta.url),
            Some(&beta.read),
            b"",
        );
        assert_eq!(answer.status, 404, "{path}: {}", answer.text());
    }
    let reserved = format!("{}/kv/squall%2Fns%2Falpha%2Fkv%2Fsecret", beta.url);
    assert_eq!(status("GET", &reserved, &beta.read, b""), 400);
    // The default namespace's URLs are another namespace's too.
    let default_url = format!("{base}/v1/kv/secret");
    assert_eq!(status("GET", &default_url, &beta.read, b""), 403);
    assert_eq!(status("GET", &default_url, TOKEN, b""), 404);
    // A listing shows the tenant's keys, named as it names them.
    let listed = http("GET", &format!("{}/kv", beta.url), Some(&beta.read), b"");
    assert_eq!(listed.json()["keys"], serde_json::json!(["secret"]));

    // Calls: not alpha's functions, by URL or from a function.
    let alpha_fn = format!("{}/functions/only-alpha/invoke", alpha.url);
    assert_eq!(status("POST", &alpha_fn, &beta.invoke, b"1"), 403);
    let own_ns = format!("{}/functions/only-alpha/invoke", beta.url);
    assert_eq!(status("POST", &own_ns, &beta.invoke, b"1"), 404);
    let encoded = format!("{}/functions/alpha%2Fonly-alpha/invoke", beta.url);
    assert_eq!(status("POST", &encoded, &beta.invoke, b"1"), 400);
    for name in ["only-alpha", "alpha/only-alpha"] {
        let nested = beta.invoke_as(&beta.invoke, &format!("recurse:{name}"));
        assert_ne!(nested.status, 200, "{name}: {}", nested.text());
        assert!(nested.text().contains("not"), "{name}: {}", nested.text());
    }
    // DAGs and triggers name functions of their own namespace only.
    for functions in [r#"["only-alpha"]"#, r#"["alpha/only-alpha"]"#] {
        let dag = format!(r#"{{"functions":{functions},"edges":[]}}"#);
        let answer = http(
            "PUT",
            &format!("{}/dags/d", beta.url),
            Some(&beta.deploy),
            dag.as_bytes(),
        );
        assert_eq!(answer.status, 400, "{functions}: {}", answer.text());
    }
    let trigger = br#"{"kind":"cron","schedule":"* * * * *","function":"only-alpha"}"#;
    let answer = http(
        "PUT",
        &format!("{}/triggers/t", beta.url),
        Some(&beta.deploy),
        trigger,
    );
    assert_eq!(answer.status, 400, "{}", answer.text());
    // Listings show each its own.
    let names = |tenant: &Tenant| -> Vec<String> {
        let listed = http(
            "GET",
            &format!("{}/functions", tenant.url),
            Some(&tenant.read),
            b"",
        );
        assert_eq!(listed.status, 200, "{}", listed.text());
        let mut names: Vec<String> = listed
            .json()
            .as_array()
            .expect("a list")
            .iter()
            .map(|f| f["name"].as_str().expect("name").to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&alpha), ["misbehave", "only-alpha"]);
    assert_eq!(names(&beta), ["misbehave"]);
    assert_eq!(
        status("GET", &format!("{}/functions", alpha.url), &beta.read, b""),
        403
    );
    // Registering over alpha's names, or with a key of another role.
    let over = format!("{}/functions/only-alpha", alpha.url);
    assert_eq!(status("PUT", &over, &beta.deploy, &incr), 403);
    assert_eq!(
        status(
            "PUT",
            &format!("{}/functions/x", beta.url),
            &beta.invoke,
            &incr
        ),
        403
    );
    assert_eq!(
        status(
            "PUT",
            &format!("{}/functions/x", beta.url),
            &beta.read,
            &incr
        ),
        403
    );

    // Results and activation records: alpha's are alpha's.
    let accepted = http(
        "POST",
        &format!("{}/functions/misbehave/invoke?async=true", alpha.url),
        Some(&alpha.invoke),
        b"echo:for-alpha-only",
    );
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    let id = accepted.json()["id"].as_str().expect("id").to_string();
    assert_eq!(
        accepted.json()["result"],
        format!("/v1/ns/alpha/results/{id}")
    );
    let result = Poll::within(Duration::from_secs(30))
        .until(|| {
            let answer = http(
                "GET",
                &format!("{}/results/{id}", alpha.url),
                Some(&alpha.read),
                b"",
            );
            (answer.status == 200).then(|| answer.text())
        })
        .expect("alpha's result");
    assert_eq!(result, "for-alpha-only");
    assert_eq!(
        status(
            "GET",
            &format!("{}/results/{id}", beta.url),
            &beta.read,
            b""
        ),
        404
    );
    assert_eq!(
        status(
            "GET",
            &format!("{}/results/{id}", alpha.url),
            &beta.read,
            b""
        ),
        403
    );
    let record = Poll::within(Duration::from_secs(30))
        .until(|| {
            let answer = http(
                "GET",
                &format!("{}/activations/{id}", alpha.url),
                Some(&alpha.read),
                b"",
            );
            (answer.status == 200 && answer.json()["status"] == "succeeded").then(|| answer.json())
        })
        .expect("alpha's record");
    assert_eq!(record["name"], "misbehave");
    for path in [
        format!("activations/{id}"),
        format!("activations/{id}/logs"),
    ] {
        assert_eq!(
            status("GET", &format!("{}/{path}", beta.url), &beta.read, b""),
            404,
            "{path}"
        );
        assert_eq!(
            status("GET", &format!("{}/{path}", alpha.url), &beta.read, b""),
            403,
            "{path}"
        );
    }
    let theirs = http(
        "GET",
        &format!("{}/activations?limit=500", beta.url),
        Some(&beta.read),
        b"",
    );
    assert!(!theirs.text().contains(&id), "{}", theirs.text());
    assert!(!theirs.text().contains("only-alpha"), "{}", theirs.text());

    // Keys of the default namespace act there only; an unknown namespace is 404.
    let (default_deploy, _) = make_key(&base, "default", "deploy", None);
    assert_eq!(
        status(
            "GET",
            &format!("{}/functions", alpha.url),
            &default_deploy,
            b""
        ),
        403
    );
    assert_eq!(
        status("GET", &format!("{base}/v1/ns/gamma/functions"), TOKEN, b""),
        404
    );
    assert_eq!(
        status("GET", &format!("{base}/v1/namespaces"), &alpha.deploy, b""),
        403
    );

    // Both tenants at once on the one executor: each reads only what it wrote.
    let threads: Vec<_> = [
        ("alpha", alpha.url.clone(), alpha.invoke.clone()),
        ("beta", beta.url.clone(), beta.invoke.clone()),
    ]
    .into_iter()
    .map(|(name, url, key)| {
        std::thread::spawn(move || {
            let call = |input: &str| {
                http(
                    "POST",
                    &format!("{url}/functions/misbehave/invoke"),
                    Some(&key),
                    input.as_bytes(),
                )
            };
            for i in 0..150 {
                let wrote = call(&format!("state:shared={name}-{i}"));
                assert_eq!(wrote.status, 200, "{}", wrote.text());
                assert_eq!(wrote.text(), format!("{name}-{i}"));
                let read = call("read:shared");
                assert!(read.text().starts_with(name), "{name} read {}", read.text());
            }
        })
    })
    .collect();
    for thread in threads {
        thread.join().expect("a tenant's calls");
    }

    // A key revoked, and one expired, stop working.
    let (doomed, doomed_id) = make_key(&base, "beta", "invoke", None);
    assert_eq!(beta.invoke_as(&doomed, "ok").status, 200);
    let revoked = http(
        "DELETE",
        &format!("{base}/v1/keys/{doomed_id}"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    assert_eq!(beta.invoke_as(&doomed, "ok").status, 401);
    let (brief, _) = make_key(&base, "beta", "invoke", Some(1));
    Poll::within(Duration::from_secs(10))
        .until(|| (beta.invoke_as(&brief, "ok").status == 401).then_some(()))
        .expect("the expired key refused");

    // Deleting beta: its keys stop working, its data is gone, alpha is untouched; its name
    // is not used again (late writes of the deleted namespace would land in a new one).
    let deleted = http(
        "DELETE",
        &format!("{base}/v1/namespaces/beta"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert!(deleted.json()["keys_deleted"].as_u64().expect("a count") > 0);
    assert_eq!(beta.invoke_as(&beta.invoke, "ok").status, 401);
    assert_eq!(
        status("GET", &format!("{}/functions", beta.url), TOKEN, b""),
        404
    );
    assert_eq!(alpha.call("read:secret"), "alpha-value");
    let again = http(
        "POST",
        &format!("{base}/v1/namespaces"),
        Some(TOKEN),
        br#"{"name":"beta"}"#,
    );
    assert_eq!(again.status, 409, "{}", again.text());
    assert!(again.text().contains("not used again"), "{}", again.text());
    let mut store =
        squall_kvs::Client::connect(&up.field("kvs"), squall_kvs::ClientConfig::default())
            .expect("a store client");
    let (left, _) = store
        .list(&squall_proto::keys::namespace_root("beta"), None, 10)
        .expect("a listing");
    assert!(left.is_empty(), "beta left {left:?}");
    let gamma = Tenant::new(&base, "gamma");
    let listed = http("GET", &format!("{base}/v1/namespaces"), Some(TOKEN), b"");
    let names: Vec<String> = listed
        .json()
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|n| n["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, ["default", "alpha", "gamma"]);

    // The executors each namespace sees serve and keep warm its own functions only.
    let seen = http(
        "GET",
        &format!("{}/executors", gamma.url),
        Some(&gamma.read),
        b"",
    );
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert!(
        !seen.text().contains("misbehave") && !seen.text().contains("alpha"),
        "{}",
        seen.text()
    );
    let seen = http(
        "GET",
        &format!("{}/executors", alpha.url),
        Some(&alpha.read),
        b"",
    );
    assert!(!seen.text().contains("alpha/"), "{}", seen.text());
    // Metrics: a key of the default namespace reads the default namespace's series only;
    // the token reads every namespace's, labelled.
    let (default_read, _) = make_key(&base, "default", "read", None);
    let scraped = http("GET", &format!("{base}/metrics"), Some(&default_read), b"");
    assert_eq!(scraped.status, 200, "{}", scraped.text());
    assert!(!scraped.text().contains("alpha"), "{}", scraped.text());
    let scraped = http("GET", &format!("{base}/metrics"), Some(TOKEN), b"");
    assert!(
        scraped
            .text()
            .contains(r#"namespace="alpha",name="misbehave""#),
        "{}",
        scraped.text()
    );
    // Causal sessions are a namespace's own: the same session name in two namespaces is two
    // sessions (each call runs from its own floors, never the other tenant's keys).
    let url = format!("{}/functions/misbehave", gamma.url);
    assert_eq!(status("PUT", &url, &gamma.deploy, &misbehave), 201);
    for (tenant, value) in [(&alpha, "a"), (&gamma, "g"), (&alpha, "a2")] {
        let answer = support::http_with(
            "POST",
            &format!("{}/functions/misbehave/invoke", tenant.url),
            Some(&tenant.invoke),
            &[
                ("squall-consistency", "causal"),
                ("squall-session", "shared-session"),
            ],
            format!("state:causal-key={value}").as_bytes(),
        );
        assert_eq!((answer.status, answer.text()), (200, value.to_string()));
    }
    let stored = store
        .get(&squall_proto::keys::user("gamma", "causal-key"))
        .expect("a read");
    let Some(squall_lattices::LatticeValue::MultiCausal(written)) = stored else {
        panic!("a causal write, not {stored:?}");
    };
    let depends: Vec<String> = written.dependencies().into_keys().collect();
    assert!(
        depends
            .iter()
            .all(|key| key.starts_with(&squall_proto::keys::user_prefix("gamma"))),
        "gamma's write depends on {depends:?}"
    );
}

#[test]
fn quotas_bound_a_namespace_and_its_burst_leaves_the_executor_to_others() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    let noisy = Tenant::new(&base, "noisy");
    let quiet = Tenant::new(&base, "quiet");
    let misbehave = guest("misbehave");
    for tenant in [&noisy, &quiet] {
        let url = format!("{}/functions/misbehave", tenant.url);
        assert_eq!(status("PUT", &url, &tenant.deploy, &misbehave), 201);
    }
    let set = |namespace: &str, quotas: &str, key: &str| {
        http(
            "PUT",
            &format!("{base}/v1/namespaces/{namespace}/quotas"),
            Some(key),
            quotas.as_bytes(),
        )
    };
    // Only an admin sets quotas; nonsense is refused.
    assert_eq!(
        set("noisy", r#"{"max_in_flight":2}"#, &noisy.deploy).status,
        403
    );
    assert_eq!(set("noisy", r#"{"max_in_flight":0}"#, TOKEN).status, 400);
    assert_eq!(set("noisy", r#"{"max_inflight":2}"#, TOKEN).status, 400);
    let answer = set("noisy", r#"{"max_in_flight":2,"max_functions":1}"#, TOKEN);
    assert_eq!(answer.status, 200, "{}", answer.text());

    // A burst of eight slow calls: two run, six are refused at once, naming the quota.
    let finished = Arc::new(AtomicUsize::new(0));
    let refusals = Arc::new(Mutex::new(Vec::new()));
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let (url, key) = (noisy.url.clone(), noisy.invoke.clone());
            let (finished, refusals) = (finished.clone(), refusals.clone());
            std::thread::spawn(move || {
                let answer = http(
                    "POST",
                    &format!("{url}/functions/misbehave/invoke"),
                    Some(&key),
                    b"sleep:8000",
                );
                if answer.status == 200 {
                    finished.fetch_add(1, Ordering::SeqCst);
                } else {
                    refusals.lock().expect("refusals").push(answer);
                }
            })
        })
        .collect();
    Poll::within(Duration::from_secs(30))
        .until(|| (refusals.lock().expect("refusals").len() >= 6).then_some(()))
        .expect("six refusals");
    for refused in refusals.lock().expect("refusals").iter() {
        assert_eq!(refused.status, 429, "{}", refused.text());
        assert_eq!(refused.error_code(), "quota_exceeded");
        assert!(
            refused.text().contains("max_in_flight (2)"),
            "{}",
            refused.text()
        );
        assert_eq!(refused.retry_after.as_deref(), Some("1"));
    }
    // While its two run, the other tenant's calls go through on the same executor, which
    // runs no more of the burst than the quota.
    for i in 0..5 {
        assert_eq!(quiet.call(&format!("echo:{i}")), i.to_string());
    }
    let executors = http("GET", &format!("{base}/v1/executors"), Some(TOKEN), b"").json();
    let running: u64 = executors
        .as_array()
        .expect("executors")
        .iter()
        .map(|e| e["running"].as_u64().unwrap_or(0))
        .sum();
    assert!(running <= 2, "{executors}");
    assert_eq!(
        finished.load(Ordering::SeqCst),
        0,
        "the burst's calls ended before the other tenant's: the check proves nothing"
    );
    for thread in burst {
        thread.join().expect("a burst call");
    }
    assert_eq!(finished.load(Ordering::SeqCst), 2);
    // A client that hangs up leaves its call's slot taken until the call ends.
    let answer = set("noisy", r#"{"max_in_flight":1,"max_functions":1}"#, TOKEN);
    assert_eq!(answer.status, 200, "{}", answer.text());
    let hasty = ureq::AgentBuilder::new()
        .timeout(Duration::from_millis(500))
        .build();
    let gone = hasty
        .post(&format!("{}/functions/misbehave/invoke", noisy.url))
        .set("Authorization", &format!("Bearer {}", noisy.invoke))
        .send_bytes(b"sleep:6000");
    assert!(gone.is_err(), "the client was to give up first: {gone:?}");
    let refused = noisy.invoke_as(&noisy.invoke, "ok");
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(
        refused.text().contains("max_in_flight (1)"),
        "{}",
        refused.text()
    );

    // Sizes: a second function, more memory or time than allowed: 403 naming the quota.
    let incr = guest("incr");
    let second = http(
        "PUT",
        &format!("{}/functions/incr", noisy.url),
        Some(&noisy.deploy),
        &incr,
    );
    assert_eq!(second.status, 403, "{}", second.text());
    assert!(
        second.text().contains("max_functions (1)"),
        "{}",
        second.text()
    );
    // A new version of the function it has is no new function.
    let again = format!("{}/functions/misbehave", noisy.url);
    assert_eq!(status("PUT", &again, &noisy.deploy, &misbehave), 201);
    assert_eq!(
        set(
            "quiet",
            r#"{"max_memory_mb":16,"max_timeout_ms":2000,"max_calls_per_s":0.05}"#,
            TOKEN
        )
        .status,
        200
    );
    let big = http(
        "PUT",
        &format!("{}/functions/incr?memory_mb=64", quiet.url),
        Some(&quiet.deploy),
        &incr,
    );
    assert_eq!(big.status, 403, "{}", big.text());
    assert!(big.text().contains("max_memory_mb (16)"), "{}", big.text());
    let slow = http(
        "PUT",
        &format!("{}/functions/incr?timeout_ms=5000", quiet.url),
        Some(&quiet.deploy),
        &incr,
    );
    assert_eq!(slow.status, 403, "{}", slow.text());
    // The rate: one call per 20 s, so the first goes and the next is refused.
    assert_eq!(quiet.call("ok"), "ok");
    let refused = quiet.invoke_as(&quiet.invoke, "ok");
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(
        refused.text().contains("max_calls_per_s"),
        "{}",
        refused.text()
    );
    let read = http(
        "GET",
        &format!("{base}/v1/namespaces/quiet/quotas"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(read.json()["max_memory_mb"], 16);
}

#[test]
fn a_namespace_at_its_stored_bytes_quota_writes_nothing_until_it_deletes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    let hoarder = Tenant::new(&base, "hoarder");
    let other = Tenant::new(&base, "other");
    let misbehave = guest("misbehave");
    for tenant in [&hoarder, &other] {
        let url = format!("{}/functions/misbehave", tenant.url);
        assert_eq!(status("PUT", &url, &tenant.deploy, &misbehave), 201);
    }
    let quotas = http(
        "PUT",
        &format!("{base}/v1/namespaces/hoarder/quotas"),
        Some(TOKEN),
        br#"{"max_stored_bytes":4000}"#,
    );
    assert_eq!(quotas.status, 200, "{}", quotas.text());
    // Five values of 1 000 bytes: accepted, since nothing measured reached the quota yet.
    let blob = vec![b'x'; 1000];
    for i in 0..5 {
        let url = format!("{}/kv/blob/{i}", hoarder.url);
        assert_eq!(status("PUT", &url, &hoarder.invoke, &blob), 204);
    }
    // A tenant reads what it stores (a read key of its own suffices).
    let usage = http(
        "GET",
        &format!("{}/usage", hoarder.url),
        Some(&hoarder.read),
        b"",
    );
    assert_eq!(usage.status, 200, "{}", usage.text());
    let usage = usage.json();
    assert_eq!(usage["keys"], 5, "{usage}");
    assert!(usage["bytes"].as_u64().unwrap_or(0) >= 5000, "{usage}");
    assert_eq!(usage["max_stored_bytes"], 4000);
    // Measured over it: writes over HTTP and from its functions are refused, naming the
    // quota, while the other tenant writes on.
    let refused = Poll::within(Duration::from_secs(30))
        .every(Duration::from_millis(200))
        .until(|| {
            let url = format!("{}/kv/more", hoarder.url);
            let answer = http("PUT", &url, Some(&hoarder.invoke), b"1");
            (answer.status != 204).then_some(answer)
        })
        .expect("refused once measured over its quota");
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(refused.error_code(), "quota_exceeded");
    assert!(
        refused.text().contains("max_stored_bytes is 4000"),
        "{}",
        refused.text()
    );
    let from_function = hoarder.invoke_as(&hoarder.invoke, "state:k=v");
    assert_ne!(from_function.status, 200, "{}", from_function.text());
    assert!(
        from_function.text().contains("max_stored_bytes"),
        "{}",
        from_function.text()
    );
    assert_eq!(hoarder.call("read:blob/0").len(), 1000, "reads go on");
    assert_eq!(other.call("state:k=v"), "v");
    let url = format!("{}/kv/more", other.url);
    assert_eq!(status("PUT", &url, &other.invoke, &blob), 204);
    // Deletes always pass; once a measurement finds it under, it writes again.
    for i in 0..3 {
        let url = format!("{}/kv/blob/{i}", hoarder.url);
        assert_eq!(status("DELETE", &url, &hoarder.invoke, b""), 204);
    }
    Poll::within(Duration::from_secs(30))
        .every(Duration::from_millis(200))
        .until(|| (hoarder.invoke_as(&hoarder.invoke, "state:k=v").status == 200).then_some(()))
        .expect("writes again once measured under its quota");
}

#[test]
fn new_names_registered_at_once_pass_max_functions_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    let tenant = Tenant::new(&base, "racer");
    let quotas = http(
        "PUT",
        &format!("{base}/v1/namespaces/racer/quotas"),
        Some(TOKEN),
        br#"{"max_functions":2}"#,
    );
    assert_eq!(quotas.status, 200, "{}", quotas.text());
    let misbehave = std::sync::Arc::new(guest("misbehave"));
    let url = format!("{}/functions/first", tenant.url);
    assert_eq!(status("PUT", &url, &tenant.deploy, &misbehave), 201);
    // Four new names at once for the one place left: one gets it.
    let racers: Vec<_> = (0..4)
        .map(|i| {
            let url = format!("{}/functions/racer-{i}", tenant.url);
            let (key, code) = (tenant.deploy.clone(), misbehave.clone());
            std::thread::spawn(move || http("PUT", &url, Some(&key), &code))
        })
        .collect();
    let answers: Vec<_> = racers
        .into_iter()
        .map(|racer| racer.join().expect("a registration"))
        .collect();
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    for refused in answers.iter().filter(|a| a.status != 201) {
        assert_eq!(refused.status, 403, "{}", refused.text());
        assert!(
            refused.text().contains("max_functions (2)"),
            "{}",
            refused.text()
        );
    }
    let listed = http(
        "GET",
        &format!("{}/functions", tenant.url),
        Some(&tenant.read),
        b"",
    );
    assert_eq!(
        listed.json().as_array().map(Vec::len),
        Some(2),
        "{}",
        listed.text()
    );
}
