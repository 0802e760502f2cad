//! Micro-benchmarks of lattice merges (the work the KVS does on every PUT) and of the wire
//! codec. Run with `cargo bench -p squall-bench --bench lattice_merge`.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use squall_lattices::{
    Counter, Lattice, LatticeValue, Lww, MapLattice, SetLattice, SingleKeyCausal, Timestamp,
    VectorClock,
};
use squall_proto::{decode_request, encode_request, Request};

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("value-{i:0>250}"))
}

fn merges(c: &mut Criterion) {
    let mut group = c.benchmark_group("merge");
    let stored = Lww::new(Timestamp::new(10, 1), payload(1));
    let newer = Lww::new(Timestamp::new(11, 2), payload(2));
    group.bench_function("lww_256B_newer", |b| {
        b.iter_batched(
            || (stored.clone(), newer.clone()),
            |(mut a, b)| black_box(a.merge(b)),
            BatchSize::SmallInput,
        )
    });
    let set_a: SetLattice<Bytes> = (0..100).map(payload).collect();
    let set_b: SetLattice<Bytes> = (50..150).map(payload).collect();
    group.bench_function("set_100_overlapping_100", |b| {
        b.iter_batched(
            || (set_a.clone(), set_b.clone()),
            |(mut a, b)| black_box(a.merge(b)),
            BatchSize::SmallInput,
        )
    });
    let mut counter_a = Counter::new();
    let mut counter_b = Counter::new();
    for writer in 0..10 {
        counter_a.add(writer, 5);
        counter_b.add(writer, if writer % 2 == 0 { 7 } else { 3 });
    }
    group.bench_function("counter_10_writers", |b| {
        b.iter_batched(
            || (counter_a.clone(), counter_b.clone()),
            |(mut a, b)| black_box(a.merge(b)),
            BatchSize::SmallInput,
        )
    });
    let clock_a: VectorClock = (0..10).map(|w| (w, w + 1)).collect();
    let clock_b: VectorClock = (0..10).map(|w| (w, 10 - w)).collect();
    group.bench_function("vector_clock_10", |b| {
        b.iter_batched(
            || (clock_a.clone(), clock_b.clone()),
            |(mut a, b)| black_box(a.merge(b)),
            BatchSize::SmallInput,
        )
    });
    let causal_a = SingleKeyCausal::with_version(clock_a.clone(), (), payload(1));
    let causal_b = SingleKeyCausal::with_version(clock_b.clone(), (), payload(2));
    group.bench_function("single_causal_concurrent", |b| {
        b.iter_batched(
            || (causal_a.clone(), causal_b.clone()),
            |(mut a, b)| black_box(a.merge(b)),
            BatchSize::SmallInput,
        )
    });
    let map = |t: u64| {
        LatticeValue::Map(MapLattice::from_iter((0..10).map(|f| {
            (
                Bytes::from(format!("field-{f}")),
                LatticeValue::Lww(Lww::new(Timestamp::new(t + f, 1), payload(f))),
            )
        })))
    };
    let (map_a, map_b) = (map(1), map(5));
    group.bench_function("map_10_lww_fields_checked", |b| {
        b.iter_batched(
            || (map_a.clone(), map_b.clone()),
            |(mut a, b)| black_box(a.try_merge(b)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    let request = Request::Put {
        entries: vec![(
            "key00001".to_string(),
            LatticeValue::Lww(Lww::new(Timestamp::new(1, 1), payload(1))),
        )],
    };
    let frame = encode_request(1, &request).expect("encode");
    c.bench_function("codec/encode_put_256B", |b| {
        b.iter(|| black_box(encode_request(1, black_box(&request))))
    });
    c.bench_function("codec/decode_put_256B", |b| {
        b.iter(|| black_box(decode_request(black_box(&frame))))
    });
}

criterion_group!(benches, merges, codec);
criterion_main!(benches);
