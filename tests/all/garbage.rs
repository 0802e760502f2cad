//! Garbage on the wire gets error replies, and the node keeps serving with its data intact.

use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use squall_kvs::{Client, ClientConfig};
use squall_lattices::{LatticeValue, Lww, Timestamp};
use squall_proto::poll::Poll;
use squall_proto::{decode_response, encode_request, Request, RequestError, Response};

use crate::support::NodeProcess;

const LIMIT: usize = 64 << 10;

fn raw_socket(endpoint: &str) -> zmq::Socket {
    let socket = zmq::Context::new().socket(zmq::DEALER).expect("socket");
    socket.set_linger(0).expect("linger");
    socket.connect(endpoint).expect("connect");
    socket
}

/// Random frames of every kind of wrongness.
fn garbage(rng: &mut impl Rng, i: usize) -> Vec<Vec<u8>> {
    let valid = encode_request(
        i as u64,
        &Request::Put {
            entries: vec![(
                format!("victim-{}", i % 10),
                LatticeValue::Lww(Lww::new(
                    Timestamp::new(u64::MAX, u64::MAX),
                    Bytes::from_static(b"EVIL"),
                )),
            )],
        },
    )
    .expect("encode");
    let random = |rng: &mut dyn rand::RngCore, n: usize| {
        let mut bytes = vec![0u8; n];
        rng.fill_bytes(&mut bytes);
        bytes
    };
    match i % 7 {
        // Pure noise, short and long.
        0 => {
            let n = rng.random_range(0..64);
            vec![random(rng, n)]
        }
        1 => {
            let n = rng.random_range(64..4096);
            vec![random(rng, n)]
        }
        // A valid request cut short (never the whole of it).
        2 => vec![valid[..rng.random_range(0..valid.len())].to_vec()],
        // A valid header over a random body.
        3 => {
            let mut frame = valid[..squall_proto::HEADER_LEN].to_vec();
            let n = rng.random_range(0..256);
            frame.extend(random(rng, n));
            vec![frame]
        }
        // Another protocol version.
        4 => {
            let mut frame = valid.clone();
            frame[2..4].copy_from_slice(&rng.random_range(2u16..=u16::MAX).to_be_bytes());
            vec![frame]
        }
        // Too many frames.
        5 => vec![valid.clone(), random(rng, 8), random(rng, 8)],
        // Over the size limit (but under ZeroMQ's hard cut-off).
        _ => {
            let mut frame = valid.clone();
            frame.resize(LIMIT + 1 + rng.random_range(0..1024), 0);
            vec![frame]
        }
    }
}

#[test]
fn thousands_of_garbage_frames_get_errors_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let limit = LIMIT.to_string();
    let mut node = NodeProcess::start(
        dir.path(),
        &[
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--shards",
            "2",
            "--max-request-bytes",
            &limit,
        ],
    );
    let mut client = Client::connect(&node.addr, ClientConfig::default()).expect("connect");
    let keys: Vec<String> = (0..10).map(|i| format!("victim-{i}")).collect();
    for key in &keys {
        client
            .put_lww(key, Bytes::from(format!("good {key}")))
            .expect("put");
    }
    let before = client.get_many(&keys).expect("get");
    let shards = client.topology().expect("layout").shards.clone();

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0515_7a11);
    let sockets: Vec<zmq::Socket> = shards.iter().map(|s| raw_socket(s)).collect();
    let total = 4_000;
    let mut expected_replies = vec![0usize; sockets.len()];
    let mut replies = vec![0usize; sockets.len()];
    let mut too_large = 0;
    let drain = |socket: &zmq::Socket, count: &mut usize, too_large: &mut usize| {
        while let Ok(reply) = socket.recv_bytes(zmq::DONTWAIT) {
            let (_, response) = decode_response(&reply).expect("every reply decodes");
            match response {
                Response::Error(RequestError::TooLarge { .. }) => *too_large += 1,
                Response::Error(_) => {}
                other => panic!("garbage was accepted: {other:?}"),
            }
            *count += 1;
        }
    };
    for i in 0..total {
        let target = i % sockets.len();
        let frames = garbage(&mut rng, i);
        sockets[target].send_multipart(frames, 0).expect("send");
        expected_replies[target] += 1;
        if i % 64 == 0 {
            for (s, socket) in sockets.iter().enumerate() {
                drain(socket, &mut replies[s], &mut too_large);
            }
        }
    }
    // Every reply, or what came within the bound (the assertion below tells which).
    let _ = Poll::within(Duration::from_secs(5))
        .every(Duration::from_millis(25))
        .until(|| {
            for (s, socket) in sockets.iter().enumerate() {
                drain(socket, &mut replies[s], &mut too_large);
            }
            (replies == expected_replies).then_some(())
        });
    assert_eq!(
        replies, expected_replies,
        "every garbage frame gets exactly one error reply"
    );
    assert!(too_large > 0);

    // A frame far over the limit (more than 1 MiB over) is cut off by ZeroMQ without a reply;
    // the node carries on.
    let huge = raw_socket(&shards[0]);
    huge.send(vec![0u8; LIMIT + (2 << 20)], 0).expect("send");
    assert_eq!(huge.poll(zmq::POLLIN, 300).expect("poll"), 0);

    assert!(node.is_alive());
    assert_eq!(
        client.get_many(&keys).expect("get after garbage"),
        before,
        "stored data changed"
    );
    client
        .put_lww("after", Bytes::from_static(b"still serving"))
        .expect("put after garbage");
    assert!(
        matches!(client.get("after").expect("get"), Some(LatticeValue::Lww(v)) if v.value == "still serving")
    );
}
