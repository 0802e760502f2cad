//! HTTPS on the gateway: `squall up --tls-cert --tls-key` serves TLS only, the CLI verifies
//! the gateway's certificate (against `--ca-cert`, else the system's CAs), and bad
//! certificates, keys and secrets stop the start with a clear error.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::support::{self, squall};

const TOKEN: &str = "a-tls-test-token-of-enough-length";

/// A certificate authority: its certificate (PEM) and what signs with it.
struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Authority {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("a CA certificate");
        Self { cert, key }
    }

    /// A server certificate for `localhost` and 127.0.0.1 and its key, as PEM.
    fn server(&self) -> (String, String) {
        let key = KeyPair::generate().expect("a server key");
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server params");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("a server certificate");
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a PEM file");
    path
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// Runs the CLI with `args` against `gateway`, trusting the CA certificates in `ca` if given.
fn cli(gateway: &str, ca: Option<&Path>, args: &[&str]) -> Output {
    let mut command = squall();
    command
        .args(args)
        .args(["--gateway", gateway, "--token", TOKEN]);
    if let Some(ca) = ca {
        command.arg("--ca-cert").arg(ca);
    }
    command
        .env_remove("SQUALL_CA_CERT")
        .env_remove("SQUALL_TOKEN")
        .output()
        .expect("run squall")
}

/// `GET /healthz` over TLS to `address`, trusting `ca`, offering `alpn`: the protocol
/// agreed and the answer.
fn healthz_over_tls(address: &str, ca: &Path, alpn: &[&[u8]]) -> (Option<Vec<u8>>, String) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("a root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
    let mut connection =
        rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("TLS client");
    let mut tcp = TcpStream::connect(address).expect("connect");
    let mut answer = Vec::new();
    {
        let mut tls = rustls::Stream::new(&mut connection, &mut tcp);
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .expect("send over TLS");
        let _ = tls.read_to_end(&mut answer);
    }
    (
        connection.alpn_protocol().map(<[u8]>::to_vec),
        String::from_utf8_lossy(&answer).into_owned(),
    )
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn the_gateway_serves_https_that_the_cli_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let authority = Authority::new("Squall test CA");
    let (cert, key) = authority.server();
    let cert = write(dir.path(), "gateway.pem", &cert);
    let key = write(dir.path(), "gateway-key.pem", &key);
    let ca = write(dir.path(), "ca.pem", &authority.cert.pem());
    let up = support::up(
        dir.path(),
        &[
            "--token",
            TOKEN,
            "--tls-cert",
            arg(&cert),
            "--tls-key",
            arg(&key),
        ],
    );
    let base = up.field("http");
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");

    // The CLI trusts the gateway through the CA given to it, by address and by name.
    let incr = squall_executor::testing::guests().join("incr.wasm");
    let registered = cli(&base, Some(&ca), &["fn", "register", "incr", arg(&incr)]);
    assert!(registered.status.success(), "{}", text(&registered));
    let called = cli(&base, Some(&ca), &["call", "incr", "41"]);
    assert!(called.status.success(), "{}", text(&called));
    assert_eq!(String::from_utf8_lossy(&called.stdout).trim(), "42");
    let by_name = base.replace("127.0.0.1", "localhost");
    let called = cli(&by_name, Some(&ca), &["call", "incr", "1"]);
    assert_eq!(
        String::from_utf8_lossy(&called.stdout).trim(),
        "2",
        "{}",
        text(&called)
    );

    // A client that does not trust the CA refuses the gateway: the system's CAs, or another
    // CA, do not vouch for it.
    for refused in [
        cli(&base, None, &["call", "incr", "41"]),
        cli(
            &base,
            Some(&write(
                dir.path(),
                "other-ca.pem",
                &Authority::new("Another CA").cert.pem(),
            )),
            &["call", "incr", "41"],
        ),
    ] {
        assert!(!refused.status.success(), "{}", text(&refused));
        let said = text(&refused);
        // (A system without CA certificates says so instead.)
        assert!(
            said.contains("invalid peer certificate") || said.contains("no CA certificate found"),
            "{said}"
        );
    }

    // A client offering HTTP/2 first (as curl and browsers do) agrees on HTTP/1.1, which is
    // what the gateway serves.
    let address = base.trim_start_matches("https://");
    for alpn in [&[&b"h2"[..], b"http/1.1"][..], &[]] {
        let (agreed, answer) = healthz_over_tls(address, &ca, alpn);
        assert_eq!(
            agreed.as_deref(),
            (!alpn.is_empty()).then_some(&b"http/1.1"[..])
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    // Plain HTTP on the port gets no HTTP answer, and the gateway goes on serving.
    let mut plain = TcpStream::connect(address).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let called = cli(&base, Some(&ca), &["call", "incr", "9"]);
    assert_eq!(
        String::from_utf8_lossy(&called.stdout).trim(),
        "10",
        "{}",
        text(&called)
    );
}

/// Runs `squall up` with `extra`, which must fail at start: its output.
fn refused_start(dir: &Path, extra: &[&str]) -> String {
    let mut child = squall()
        .args(support::UP)
        .args(extra)
        .env_remove("SQUALL_TOKEN")
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn squall up");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("squall up {extra:?} did not stop: it should refuse to start");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let output = child.wait_with_output().expect("output");
    assert!(
        !output.status.success(),
        "{extra:?} started: {}",
        text(&output)
    );
    text(&output)
}

#[test]
fn bad_certificates_keys_and_secrets_stop_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let authority = Authority::new("Squall test CA");
    let (cert, key) = authority.server();
    let (_, other_key) = authority.server();
    let cert = write(dir.path(), "gateway.pem", &cert);
    let key = write(dir.path(), "gateway-key.pem", &key);
    let other_key = write(dir.path(), "other-key.pem", &other_key);
    let missing = dir.path().join("missing.pem");

    let said = refused_start(
        dir.path(),
        &["--tls-cert", arg(&missing), "--tls-key", arg(&key)],
    );
    assert!(said.contains("reading the TLS certificate chain"), "{said}");
    let said = refused_start(
        dir.path(),
        &["--tls-cert", arg(&cert), "--tls-key", arg(&cert)],
    );
    assert!(said.contains("reading the TLS private key"), "{said}");
    let said = refused_start(
        dir.path(),
        &["--tls-cert", arg(&cert), "--tls-key", arg(&other_key)],
    );
    assert!(said.contains("cannot serve"), "{said}");
    let said = refused_start(dir.path(), &["--tls-cert", arg(&cert)]);
    assert!(said.contains("--tls-key"), "{said}");
    // Half of the pair in the config file is no silent fall-back to plain HTTP either.
    let config = write(
        dir.path(),
        "squall.toml",
        &format!("tls-cert = {:?}\n", arg(&cert)),
    );
    let said = refused_start(dir.path(), &["--config", arg(&config)]);
    assert!(said.contains("go together"), "{said}");

    // A short or empty secret is refused, and never printed.
    let said = refused_start(dir.path(), &["--token", "hunter2"]);
    assert!(said.contains("too short"), "{said}");
    assert!(!said.contains("hunter2"), "{said}");
    let said = refused_start(dir.path(), &["--token", ""]);
    assert!(said.contains("empty secret"), "{said}");
}
