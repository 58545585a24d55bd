//! The frame codec suite: round trips over every flag, negative space
//! (truncation, bit flips, wrong place, wrong key), and the layout.

use proptest::prelude::*;
use rand::{RngCore, SeedableRng};

use super::*;
use crate::ids::BLOCK_BYTES;

const SIZES_BYTES: [usize; 5] = [0, 1, BLOCK_BYTES, 64 << 10, 1 << 20];

fn must_keys(ids: &[u32]) -> TenantKeys {
    let mut keys = TenantKeys::new(Dek::generate(KeyId(ids[0])));
    for id in &ids[1..] {
        keys.add(Dek::generate(KeyId(*id)));
    }
    keys
}

fn block_aad(tenant: u64, pg: u64, volume: u64, block: u64) -> FrameAad {
    FrameAad::Block {
        tenant: TenantId(tenant),
        pg: PgId(pg),
        volume: VolumeId(volume),
        block: BlockNo(block),
    }
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

/// Text-like data that zstd shrinks well but not to nothing.
fn compressible_bytes(len: usize) -> Vec<u8> {
    let line = b"lifeboat block 0042: the quick brown fox jumps over the lazy dog\n";
    line.iter().copied().cycle().take(len).collect()
}

fn must_decode(codec: &FrameCodec, keys: &TenantKeys, aad: &FrameAad, frame: &[u8]) -> Vec<u8> {
    codec.decode(keys, aad, frame).expect("decode")
}

/// Recomputes a frame's CRC after a deliberate edit, so the edit reaches the
/// checks behind the CRC.
fn reseal_crc(frame: &mut [u8]) {
    let len = frame.len();
    let crc = crc32fast::hash(&frame[..len - FRAME_CRC_BYTES]);
    frame[len - FRAME_CRC_BYTES..].copy_from_slice(&crc.to_be_bytes());
}

#[test]
fn round_trip_every_flag_size_and_level() {
    let keys = must_keys(&[1]);
    let aad = block_aad(1, 2, 3, 4);
    for level in [0, 1, 3, -5] {
        let codec = FrameCodec::new(level);
        for size in SIZES_BYTES {
            for (kind, data) in [
                ("compressible", compressible_bytes(size)),
                ("random", random_bytes(size, size as u64)),
            ] {
                let frame = codec.encode(keys.current(), &aad, &data);
                let compressed = frame[OFFSET_FLAGS] & FLAG_COMPRESSED != 0;
                let expect_compressed = level != 0 && kind == "compressible" && size >= BLOCK_BYTES;
                assert_eq!(
                    compressed, expect_compressed,
                    "level {level} size {size} {kind}"
                );
                if compressed {
                    assert!(frame.len() < data.len(), "level {level} size {size}");
                } else {
                    assert_eq!(frame.len(), data.len() + FRAME_OVERHEAD_BYTES);
                }
                assert!(frame.len() <= FRAME_BYTES_MAX);
                assert_eq!(must_decode(&codec, &keys, &aad, &frame), data);
                // The level matters only to encode.
                assert_eq!(must_decode(&FrameCodec::new(0), &keys, &aad, &frame), data);
            }
        }
    }
}

#[test]
fn chunk_frames_round_trip() {
    let keys = must_keys(&[1]);
    let codec = FrameCodec::new(1);
    let aad = FrameAad::Chunk {
        tenant: TenantId(1),
        pg: PgId(2),
        chunk: 99,
    };
    let data = compressible_bytes(1 << 20);
    let frame = codec.encode(keys.current(), &aad, &data);
    assert_eq!(must_decode(&codec, &keys, &aad, &frame), data);
    let other = FrameAad::Chunk {
        tenant: TenantId(1),
        pg: PgId(2),
        chunk: 100,
    };
    assert_eq!(
        codec.decode(&keys, &other, &frame),
        Err(FrameError::AuthenticationFailed)
    );
}

#[test]
fn compressible_data_gets_the_flag_and_random_data_does_not() {
    let keys = must_keys(&[1]);
    let codec = FrameCodec::new(1);
    let aad = block_aad(1, 1, 1, 1);

    let zeros_like = compressible_bytes(BLOCK_BYTES);
    let frame = codec.encode(keys.current(), &aad, &zeros_like);
    assert_eq!(frame[OFFSET_FLAGS], FLAG_COMPRESSED);

    let random = random_bytes(BLOCK_BYTES, 7);
    let frame = codec.encode(keys.current(), &aad, &random);
    assert_eq!(frame[OFFSET_FLAGS], 0);

    // A block with a random head and a zero tail (a file's last block)
    // samples as compressible, and is.
    let mut zero_tail = random_bytes(3 << 10, 10);
    zero_tail.resize(BLOCK_BYTES, 0);
    let frame = codec.encode(keys.current(), &aad, &zero_tail);
    assert_eq!(frame[OFFSET_FLAGS], FLAG_COMPRESSED);
    assert_eq!(must_decode(&codec, &keys, &aad, &frame), zero_tail);

    // Where the stripes of a large input's sample lie.
    let len = 64 << 10;
    let stripes: Vec<usize> = (0..COMPRESS_STRIPES_LARGE)
        .map(|i| (len - COMPRESS_STRIPE_BYTES) * i / (COMPRESS_STRIPES_LARGE - 1))
        .collect();
    // `data` with its stripes taken from `stripes_from`.
    let with_stripes = |mut data: Vec<u8>, stripes_from: &[u8]| {
        for &start in &stripes {
            let stripe = start..start + COMPRESS_STRIPE_BYTES;
            data[stripe.clone()].copy_from_slice(&stripes_from[stripe]);
        }
        data
    };

    // A large input whose stripes are random is not compressed, even though
    // the rest would be: the sample decides.
    let mixed = with_stripes(compressible_bytes(len), &random_bytes(len, 8));
    let mut buf = [0u8; COMPRESS_SAMPLE_BYTES_MAX];
    assert_eq!(compress_sample(&mixed, &mut buf).len(), 4 << 10);
    let frame = codec.encode(keys.current(), &aad, &mixed);
    assert_eq!(frame[OFFSET_FLAGS], 0);
    assert_eq!(must_decode(&codec, &keys, &aad, &frame), mixed);

    // A large input whose sample compresses but whose whole does not save
    // 1/8 is stored as is.
    let tail_random = with_stripes(random_bytes(len, 9), &vec![0; len]);
    let frame = codec.encode(keys.current(), &aad, &tail_random);
    assert_eq!(frame[OFFSET_FLAGS], 0);
    assert_eq!(must_decode(&codec, &keys, &aad, &frame), tail_random);
}

/// Frames sealed before the codec moved from the `aes-gcm` crate to ring
/// (and any frame on disk today) stay readable, and the reverse: both are
/// AES-256-GCM over the same key, nonce and associated data.
#[test]
fn frames_of_the_aes_gcm_crate_and_of_ring_are_the_same_bytes() {
    use aes_gcm::{AeadInPlace, Aes256Gcm, KeyInit};
    let keys = must_keys(&[1]);
    let dek = keys.current();
    let aad = block_aad(1, 2, 3, 4);
    let codec = FrameCodec::new(1);
    let crate_cipher = |salt: &[u8; FRAME_SALT_BYTES]| {
        let mut key = [0u8; KEY_BYTES];
        Hkdf::<Sha256>::new(Some(salt), dek.secret_bytes())
            .expand(FRAME_HKDF_INFO, &mut key)
            .unwrap();
        Aes256Gcm::new(&key.into())
    };
    for plain in [random_bytes(BLOCK_BYTES, 7), compressible_bytes(64 << 10)] {
        // Ring seals, the crate opens.
        let frame = codec.encode(dek, &aad, &plain);
        let parsed = parse(&frame).unwrap();
        let mut payload = parsed.ciphertext.to_vec();
        crate_cipher(parsed.salt)
            .decrypt_in_place_detached(
                parsed.nonce.into(),
                &associated_data(&aad, parsed.header),
                &mut payload,
                parsed.tag.into(),
            )
            .expect("the aes-gcm crate opens a ring-sealed frame");
        if parsed.flags & FLAG_COMPRESSED != 0 {
            payload = decompress(&payload).unwrap();
        }
        assert_eq!(payload, plain);

        // The crate seals (as the codec did before), ring opens.
        let mut old = frame[..FRAME_HEADER_BYTES].to_vec();
        old[OFFSET_FLAGS] = 0;
        let header: [u8; FRAME_HEADER_BYTES] = array(&old);
        let salt: [u8; FRAME_SALT_BYTES] = array(&header[OFFSET_SALT..OFFSET_NONCE]);
        let nonce: [u8; FRAME_NONCE_BYTES] = array(&header[OFFSET_NONCE..]);
        old.extend_from_slice(&plain);
        let tag = crate_cipher(&salt)
            .encrypt_in_place_detached(
                (&nonce).into(),
                &associated_data(&aad, &header),
                &mut old[FRAME_HEADER_BYTES..],
            )
            .unwrap();
        old.extend_from_slice(&tag);
        old.extend_from_slice(&[0; FRAME_CRC_BYTES]);
        reseal_crc(&mut old);
        assert_eq!(must_decode(&codec, &keys, &aad, &old), plain);
    }
}

#[test]
fn layout_header_fields_are_where_the_diagram_says() {
    let dek = Dek::generate(KeyId(0x0102_0304));
    let keys = TenantKeys::new(dek);
    let frame = FrameCodec::new(0).encode(keys.current(), &block_aad(1, 1, 1, 1), b"abc");
    assert_eq!(frame.len(), FRAME_OVERHEAD_BYTES + 3);
    assert_eq!(frame[0], FRAME_VERSION);
    assert_eq!(frame[1], 0);
    assert_eq!(frame[2..6], [1, 2, 3, 4]);
    assert_eq!(frame_key_id(&frame), Ok(KeyId(0x0102_0304)));
    let crc = crc32fast::hash(&frame[..frame.len() - 4]);
    assert_eq!(frame[frame.len() - 4..], crc.to_be_bytes());
    // Salt and nonce are each fresh per frame (one random read fills both),
    // never left as the zeros the header starts from.
    let again = FrameCodec::new(0).encode(keys.current(), &block_aad(1, 1, 1, 1), b"abc");
    for field in [OFFSET_SALT..OFFSET_NONCE, OFFSET_NONCE..FRAME_HEADER_BYTES] {
        assert_ne!(frame[field.clone()], again[field.clone()]);
        assert!(frame[field.clone()].iter().any(|&b| b != 0));
        assert!(again[field].iter().any(|&b| b != 0));
    }
}

#[test]
fn aad_encoding_is_fixed() {
    let block = block_aad(1, 2, 3, 0x0a0b);
    let mut expected = vec![AAD_TAG_BLOCK];
    for field in [1u64, 2, 3, 0x0a0b] {
        expected.extend_from_slice(&field.to_be_bytes());
    }
    assert_eq!(block.encode(), expected);
    assert_eq!(block.encode().len(), FRAME_AAD_BYTES_MAX);

    let chunk = FrameAad::Chunk {
        tenant: TenantId(1),
        pg: PgId(2),
        chunk: 3,
    };
    let mut expected = vec![AAD_TAG_CHUNK];
    for field in [1u64, 2, 3] {
        expected.extend_from_slice(&field.to_be_bytes());
    }
    assert_eq!(chunk.encode(), expected);

    let record = FrameAad::Record {
        tenant: TenantId(1),
        pg: PgId(2),
        bucket: 3,
    };
    let mut expected = vec![AAD_TAG_RECORD];
    for field in [1u64, 2, 3] {
        expected.extend_from_slice(&field.to_be_bytes());
    }
    assert_eq!(record.encode(), expected);
}

#[test]
fn wrong_place_fails_authentication() {
    let keys = must_keys(&[1]);
    let codec = FrameCodec::new(1);
    let aad = block_aad(1, 2, 3, 4);
    for data in [
        compressible_bytes(BLOCK_BYTES),
        random_bytes(BLOCK_BYTES, 1),
    ] {
        let frame = codec.encode(keys.current(), &aad, &data);
        for (what, other) in [
            ("other block", block_aad(1, 2, 3, 5)),
            ("other volume", block_aad(1, 2, 4, 4)),
            ("other pg", block_aad(1, 3, 3, 4)),
            ("other tenant", block_aad(2, 2, 3, 4)),
            (
                "a chunk",
                FrameAad::Chunk {
                    tenant: TenantId(1),
                    pg: PgId(2),
                    chunk: 3,
                },
            ),
            (
                "a bucket's record",
                FrameAad::Record {
                    tenant: TenantId(1),
                    pg: PgId(2),
                    bucket: 3,
                },
            ),
        ] {
            assert_eq!(
                codec.decode(&keys, &other, &frame),
                Err(FrameError::AuthenticationFailed),
                "{what}"
            );
        }
    }
}

#[test]
fn other_tenants_key_with_same_id_fails_authentication() {
    let ours = must_keys(&[1]);
    let theirs = must_keys(&[1]);
    let codec = FrameCodec::new(1);
    let aad = block_aad(1, 1, 1, 1);
    let frame = codec.encode(ours.current(), &aad, &compressible_bytes(100));
    assert_eq!(
        codec.decode(&theirs, &aad, &frame),
        Err(FrameError::AuthenticationFailed)
    );
}

#[test]
fn frame_sealed_before_rotation_still_opens() {
    let mut keys = must_keys(&[1]);
    let codec = FrameCodec::new(1);
    let aad = block_aad(1, 1, 1, 1);
    let data = compressible_bytes(BLOCK_BYTES);
    let old = codec.encode(keys.current(), &aad, &data);

    keys.add(Dek::generate(KeyId(2)));
    let new = codec.encode(keys.current(), &aad, &data);
    assert_eq!(frame_key_id(&old), Ok(KeyId(1)));
    assert_eq!(frame_key_id(&new), Ok(KeyId(2)));
    assert_eq!(must_decode(&codec, &keys, &aad, &old), data);
    assert_eq!(must_decode(&codec, &keys, &aad, &new), data);
}

#[test]
fn unknown_key_id_fails_with_unknown_key() {
    let sealing = must_keys(&[1, 2, 3]);
    let opening = must_keys(&[1, 2]);
    let codec = FrameCodec::new(1);
    let aad = block_aad(1, 1, 1, 1);
    let frame = codec.encode(sealing.current(), &aad, b"data");
    assert_eq!(
        codec.decode(&opening, &aad, &frame),
        Err(FrameError::UnknownKey { key_id: KeyId(3) })
    );
}

#[test]
fn header_errors_are_reported_as_facts() {
    let keys = must_keys(&[1]);
    let codec = FrameCodec::new(1);
    let aad = block_aad(1, 1, 1, 1);
    let frame = codec.encode(keys.current(), &aad, &compressible_bytes(BLOCK_BYTES));

    for len in [0, 1, FRAME_OVERHEAD_BYTES - 1] {
        assert_eq!(
            frame_key_id(&frame[..len]),
            Err(FrameError::TooShort { len })
        );
    }

    let mut bad = frame.clone();
    bad[0] = 2;
    let stored = u32::from_be_bytes(array(&frame[frame.len() - 4..]));
    let computed = crc32fast::hash(&bad[..bad.len() - 4]);
    assert_eq!(
        codec.decode(&keys, &aad, &bad),
        Err(FrameError::CrcMismatch { stored, computed })
    );
    reseal_crc(&mut bad);
    assert_eq!(
        codec.decode(&keys, &aad, &bad),
        Err(FrameError::UnknownVersion { version: 2 })
    );

    // Every flag combination but the known one is refused before any key
    // is used.
    for flags in 0..=u8::MAX {
        let mut edited = frame.clone();
        edited[OFFSET_FLAGS] = flags;
        reseal_crc(&mut edited);
        let result = codec.decode(&keys, &aad, &edited);
        match flags {
            FLAG_COMPRESSED => assert!(result.is_ok()),
            // Claiming "not compressed" is caught by the AEAD (flags are in
            // the associated data).
            0 => assert_eq!(result, Err(FrameError::AuthenticationFailed)),
            _ => assert_eq!(result, Err(FrameError::UnknownFlags { flags })),
        }
    }
}

#[test]
fn oversized_frame_is_too_large() {
    let keys = must_keys(&[1]);
    let frame = vec![0u8; FRAME_BYTES_MAX + 1];
    assert_eq!(
        FrameCodec::new(1).decode(&keys, &block_aad(1, 1, 1, 1), &frame),
        Err(FrameError::TooLarge {
            len: FRAME_BYTES_MAX + 1
        })
    );
}

#[test]
#[should_panic(expected = "exceeds")]
fn encode_refuses_oversized_plaintext() {
    let keys = must_keys(&[1]);
    let data = vec![0u8; FRAME_PLAINTEXT_BYTES_MAX + 1];
    FrameCodec::new(1).encode(keys.current(), &block_aad(1, 1, 1, 1), &data);
}

#[test]
fn largest_plaintext_round_trips() {
    let keys = must_keys(&[1]);
    let aad = block_aad(1, 1, 1, 1);
    let data = random_bytes(FRAME_PLAINTEXT_BYTES_MAX, 3);
    let codec = FrameCodec::new(1);
    let frame = codec.encode(keys.current(), &aad, &data);
    assert_eq!(frame.len(), FRAME_BYTES_MAX);
    assert_eq!(must_decode(&codec, &keys, &aad, &frame), data);
}

#[test]
fn authentic_but_bad_compressed_payloads_fail_cleanly() {
    let keys = must_keys(&[1]);
    let codec = FrameCodec::new(1);
    let aad = block_aad(1, 1, 1, 1);

    // Not zstd at all.
    let frame = seal(keys.current(), &aad, FLAG_COMPRESSED, b"not zstd");
    assert!(matches!(
        codec.decode(&keys, &aad, &frame),
        Err(FrameError::Decompress { .. })
    ));

    // A decompression bomb: 16 MiB of zeros declared in the zstd header.
    let bomb = zstd::bulk::compress(&vec![0u8; 16 << 20], 1).unwrap();
    let frame = seal(keys.current(), &aad, FLAG_COMPRESSED, &bomb);
    assert_eq!(
        codec.decode(&keys, &aad, &frame),
        Err(FrameError::TooLarge { len: 16 << 20 })
    );

    // The same bomb as a streamed zstd frame, whose header has no content
    // size: the capacity still bounds it.
    let streamed = zstd::stream::encode_all(&vec![0u8; 4 << 20][..], 1).unwrap();
    assert!(matches!(
        zstd::zstd_safe::get_frame_content_size(&streamed),
        Ok(None)
    ));
    let frame = seal(keys.current(), &aad, FLAG_COMPRESSED, &streamed);
    assert!(matches!(
        codec.decode(&keys, &aad, &frame),
        Err(FrameError::Decompress { .. })
    ));

    // A header that understates the content size.
    let mut understated = zstd::bulk::compress(&compressible_bytes(BLOCK_BYTES), 1).unwrap();
    understated.extend(zstd::bulk::compress(&compressible_bytes(BLOCK_BYTES), 1).unwrap());
    let frame = seal(keys.current(), &aad, FLAG_COMPRESSED, &understated);
    assert!(matches!(
        codec.decode(&keys, &aad, &frame),
        Err(FrameError::Decompress { .. })
    ));
}

/// Every single-bit flip and every truncation of `frame` is an error (never
/// a panic, never the plaintext). With `fix_crc`, flips are re-CRC'd so they
/// reach the header checks and the AEAD.
fn must_reject_all_damage(keys: &TenantKeys, aad: &FrameAad, frame: &[u8], fix_crc: bool) {
    let codec = FrameCodec::new(1);
    for len in 0..frame.len() {
        assert!(
            codec.decode(keys, aad, &frame[..len]).is_err(),
            "truncated to {len}"
        );
    }
    for bit in 0..frame.len() * 8 {
        let mut bad = frame.to_vec();
        bad[bit / 8] ^= 1 << (bit % 8);
        let in_crc = bit / 8 >= frame.len() - FRAME_CRC_BYTES;
        if fix_crc && !in_crc {
            reseal_crc(&mut bad);
        }
        let result = codec.decode(keys, aad, &bad);
        assert!(result.is_err(), "bit {bit} flipped still decodes");
        if !fix_crc || in_crc {
            assert!(
                matches!(result, Err(FrameError::CrcMismatch { .. })),
                "bit {bit}: {result:?}"
            );
        }
    }
}

#[test]
fn every_bit_flip_and_truncation_fails_exhaustively() {
    let keys = must_keys(&[1]);
    let aad = block_aad(1, 1, 1, 1);
    let codec = FrameCodec::new(1);
    for data in [compressible_bytes(300), random_bytes(64, 5), Vec::new()] {
        let frame = codec.encode(keys.current(), &aad, &data);
        must_reject_all_damage(&keys, &aad, &frame, false);
        must_reject_all_damage(&keys, &aad, &frame, true);
    }
}

fn arbitrary_plaintext() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..20_000),
        // Runs of few symbols: compressible, so the zstd path is exercised.
        proptest::collection::vec(0u8..4, 0..20_000),
        (any::<u8>(), 0usize..70_000).prop_map(|(byte, len)| vec![byte; len]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn prop_round_trip(
        data in arbitrary_plaintext(),
        level in prop_oneof![Just(0), Just(1), Just(3), Just(-1)],
        block in any::<u64>(),
    ) {
        let keys = must_keys(&[1]);
        let codec = FrameCodec::new(level);
        let aad = block_aad(1, 2, 3, block);
        let frame = codec.encode(keys.current(), &aad, &data);
        prop_assert!(frame.len() <= data.len() + FRAME_OVERHEAD_BYTES);
        prop_assert_eq!(codec.decode(&keys, &aad, &frame), Ok(data));
    }

    #[test]
    fn prop_truncation_or_bit_flip_fails(
        data in proptest::collection::vec(0u8..8, 0..2_000),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        fix_crc in any::<bool>(),
    ) {
        let keys = must_keys(&[1]);
        let codec = FrameCodec::new(1);
        let aad = block_aad(1, 1, 1, 1);
        let frame = codec.encode(keys.current(), &aad, &data);

        let len = cut.index(frame.len());
        let truncated = codec.decode(&keys, &aad, &frame[..len]);
        prop_assert!(truncated.is_err());

        let bit = flip.index(frame.len() * 8);
        let mut bad = frame.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        if fix_crc && bit / 8 < frame.len() - FRAME_CRC_BYTES {
            reseal_crc(&mut bad);
        }
        let flipped = codec.decode(&keys, &aad, &bad);
        prop_assert!(flipped.is_err(), "bit {} decoded", bit);
    }

    #[test]
    fn prop_decode_of_arbitrary_bytes_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        fix_crc in any::<bool>(),
    ) {
        let keys = must_keys(&[1]);
        let mut bytes = bytes;
        if fix_crc && bytes.len() >= FRAME_CRC_BYTES {
            reseal_crc(&mut bytes);
        }
        let _ = frame_key_id(&bytes);
        prop_assert!(FrameCodec::new(1).decode(&keys, &block_aad(1, 1, 1, 1), &bytes).is_err());
    }
}
