//! The frame codec (zstd → AES-256-GCM with a per-frame HKDF key → CRC-32)
//! beside bare AES-256-GCM (ring's, which the codec uses, and the `aes-gcm`
//! crate's, which it used before) and bare zstd level 1 on the same data, for
//! 4 KiB, 64 KiB and 1 MiB frames of compressible and random data.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lifeboat_benches::{DataKind, data};
use lifeboat_store::frame::{FrameAad, FrameCodec};
use lifeboat_store::keyring::{Dek, TenantKeys};
use lifeboat_store::{BlockNo, KeyId, PgId, TenantId, VolumeId};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, UnboundKey};

const SIZES: [(usize, &str); 3] = [(4 << 10, "4KiB"), (64 << 10, "64KiB"), (1 << 20, "1MiB")];

fn codec(c: &mut Criterion) {
    let codec = FrameCodec::new(1);
    let keys = TenantKeys::new(Dek::generate(KeyId(1)));
    let aad = FrameAad::Block {
        tenant: TenantId(1),
        pg: PgId(1),
        volume: VolumeId(1),
        block: BlockNo(1),
    };
    let aes = Aes256Gcm::new_from_slice(&[7u8; 32]).unwrap();
    let nonce = Nonce::from_slice(&[1u8; 12]);
    let ring_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap());
    let ring_nonce = || ring::aead::Nonce::assume_unique_for_key([1u8; 12]);
    for kind in [DataKind::Compressible, DataKind::Random] {
        let mut g = c.benchmark_group(format!("{kind:?}").to_lowercase());
        for (size, label) in SIZES {
            let plain = data(kind, size);
            g.throughput(Throughput::Bytes(size as u64));
            g.bench_with_input(BenchmarkId::new("frame_encode", label), &plain, |b, p| {
                b.iter(|| codec.encode(keys.current(), &aad, p))
            });
            let frame = codec.encode(keys.current(), &aad, &plain);
            g.bench_with_input(BenchmarkId::new("frame_decode", label), &frame, |b, f| {
                b.iter(|| codec.decode(&keys, &aad, f).unwrap())
            });
            g.bench_with_input(BenchmarkId::new("aes256gcm_seal", label), &plain, |b, p| {
                b.iter(|| aes.encrypt(nonce, p.as_slice()).unwrap())
            });
            let sealed = aes.encrypt(nonce, plain.as_slice()).unwrap();
            g.bench_with_input(
                BenchmarkId::new("aes256gcm_open", label),
                &sealed,
                |b, s| b.iter(|| aes.decrypt(nonce, s.as_slice()).unwrap()),
            );
            g.bench_with_input(
                BenchmarkId::new("ring_aes256gcm_seal", label),
                &plain,
                |b, p| {
                    b.iter(|| {
                        let mut buf = p.clone();
                        ring_key
                            .seal_in_place_append_tag(ring_nonce(), Aad::empty(), &mut buf)
                            .unwrap();
                        buf
                    })
                },
            );
            g.bench_with_input(
                BenchmarkId::new("ring_aes256gcm_open", label),
                &sealed,
                |b, s| {
                    b.iter(|| {
                        let mut buf = s.clone();
                        let len = ring_key
                            .open_in_place(ring_nonce(), Aad::empty(), &mut buf)
                            .unwrap()
                            .len();
                        buf.truncate(len);
                        buf
                    })
                },
            );
            g.bench_with_input(BenchmarkId::new("zstd1_compress", label), &plain, |b, p| {
                b.iter(|| zstd::bulk::compress(p, 1).unwrap())
            });
            let z = zstd::bulk::compress(&plain, 1).unwrap();
            g.bench_with_input(BenchmarkId::new("zstd1_decompress", label), &z, |b, z| {
                b.iter(|| zstd::bulk::decompress(z, size).unwrap())
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = codec
}
criterion_main!(benches);
