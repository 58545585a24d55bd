//! Tests of the master key file, DEK wrapping, `TenantKeys` and `Keyring`.

use std::os::unix::fs::PermissionsExt;

use super::*;

fn must_create(dir: &tempfile::TempDir) -> (PathBuf, MasterKey) {
    let path = dir.path().join("master.key");
    let key = MasterKey::create(&path).expect("create master key");
    (path, key)
}

#[test]
fn create_then_load_gives_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let (path, created) = must_create(&dir);
    let loaded = MasterKey::load(&path).expect("load master key");
    assert_eq!(created.bytes, loaded.bytes);

    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.len(), MASTER_KEY_HEX_CHARS + 1);
    assert!(text.ends_with('\n'));
    assert_eq!(text.trim_end(), hex::encode(created.bytes));
}

#[test]
fn create_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let (path, created) = must_create(&dir);
    let err = MasterKey::create(&path).unwrap_err();
    assert!(matches!(err, KeyringError::AlreadyExists { .. }), "{err:?}");
    // The original key is untouched.
    assert_eq!(MasterKey::load(&path).unwrap().bytes, created.bytes);

    let other = dir.path().join("other.key");
    std::fs::write(&other, "not a key").unwrap();
    let err = MasterKey::create(&other).unwrap_err();
    assert!(matches!(err, KeyringError::AlreadyExists { .. }), "{err:?}");
    assert_eq!(std::fs::read_to_string(&other).unwrap(), "not a key");
}

#[test]
fn create_makes_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = must_create(&dir);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn create_in_missing_dir_is_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/master.key");
    let err = MasterKey::create(&path).unwrap_err();
    assert!(matches!(err, KeyringError::Io { .. }), "{err:?}");
}

#[test]
fn load_missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.key");
    let err = MasterKey::load(&path).unwrap_err();
    match &err {
        KeyringError::Io { path: p, source } => {
            assert_eq!(p, &path);
            assert_eq!(source.kind(), io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(err.to_string().contains("missing.key"), "{err}");
}

#[test]
fn load_rejects_malformed_files_without_quoting_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.key");
    let secretish = "ab".repeat(31); // 62 hex characters: too short
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"".to_vec(), "found 0"),
        (format!("{secretish}\n").into_bytes(), "found 62"),
        (format!("{secretish}abcd\n").into_bytes(), "found 66"),
        (format!("{secretish}zz\n").into_bytes(), "offset 62"),
        (format!("  {}\n", "ab".repeat(32)).into_bytes(), "found 66"),
        (vec![b'a'; 4096], "larger than"),
        ([0xffu8; 64].to_vec(), "not hexadecimal"),
    ];
    for (content, expected) in cases {
        std::fs::write(&path, &content).unwrap();
        let err = MasterKey::load(&path).unwrap_err();
        assert!(matches!(err, KeyringError::Malformed { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        assert!(
            !message.contains(&secretish),
            "error quotes the key: {message}"
        );
    }
}

#[test]
fn load_accepts_trailing_whitespace_and_uppercase() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.key");
    std::fs::write(&path, format!("{}\r\n\n", "AB".repeat(32))).unwrap();
    assert_eq!(MasterKey::load(&path).unwrap().bytes, [0xab; 32]);
}

#[test]
fn load_of_group_readable_file_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (path, created) = must_create(&dir);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(MasterKey::load(&path).unwrap().bytes, created.bytes);
}

#[test]
fn debug_never_prints_key_material() {
    let master = MasterKey::from_bytes([0x5a; 32]);
    let dek = Dek::from_bytes(KeyId(7), [0x5a; 32]);
    let keys = TenantKeys::new(dek.clone());
    let keyring = Keyring::new();
    keyring.insert("acme", keys.clone());
    for text in [
        format!("{master:?}"),
        format!("{dek:?}"),
        format!("{keys:?}"),
        format!("{keyring:?}"),
    ] {
        assert!(!text.contains("5a5a"), "{text}");
        assert!(!text.contains("90, 90"), "{text}");
    }
    assert!(format!("{dek:?}").contains("KeyId(7)"));
}

#[test]
fn wrap_unwrap_round_trip() {
    let master = MasterKey::from_bytes([1; 32]);
    let dek = Dek::generate(KeyId(3));
    let wrapped = master.wrap_dek("acme", &dek);
    assert_eq!(wrapped.len(), WRAPPED_DEK_BYTES);
    assert_eq!(wrapped[0], WRAPPED_DEK_VERSION);
    assert_eq!(wrapped[1..5], 3u32.to_be_bytes());
    let unwrapped = master.unwrap_dek("acme", &wrapped).expect("unwrap");
    assert_eq!(unwrapped.key_id(), KeyId(3));
    assert_eq!(unwrapped.bytes, dek.bytes);

    // Two wraps of one key differ (random nonce) and both open.
    let again = master.wrap_dek("acme", &dek);
    assert_ne!(wrapped, again);
    assert_eq!(master.unwrap_dek("acme", &again).unwrap().bytes, dek.bytes);
}

#[test]
fn unwrap_with_other_master_key_or_tenant_fails() {
    let master = MasterKey::from_bytes([1; 32]);
    let other_master = MasterKey::from_bytes([2; 32]);
    let dek = Dek::generate(KeyId(1));
    let wrapped = master.wrap_dek("acme", &dek);

    let err = other_master.unwrap_dek("acme", &wrapped).unwrap_err();
    assert!(
        matches!(&err, KeyringError::UnwrapFailed { tenant } if tenant == "acme"),
        "{err:?}"
    );
    for tenant in ["acm", "acme2", "Acme", ""] {
        let err = master.unwrap_dek(tenant, &wrapped).unwrap_err();
        assert!(matches!(err, KeyringError::UnwrapFailed { .. }), "{err:?}");
    }
}

#[test]
fn corrupted_wrapped_blob_fails_cleanly() {
    let master = MasterKey::from_bytes([1; 32]);
    let wrapped = master.wrap_dek("acme", &Dek::generate(KeyId(9)));

    // Every single-bit flip fails: the version byte as malformed, the rest
    // (key id, nonce, ciphertext, tag) as an authentication failure.
    for bit in 0..wrapped.len() * 8 {
        let mut bad = wrapped.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let err = master.unwrap_dek("acme", &bad).unwrap_err();
        if bit < 8 {
            assert!(
                matches!(err, KeyringError::WrappedMalformed { .. }),
                "{err:?}"
            );
        } else {
            assert!(matches!(err, KeyringError::UnwrapFailed { .. }), "{err:?}");
        }
    }
    // Every truncation and an extension fail as malformed.
    for len in 0..wrapped.len() {
        let err = master.unwrap_dek("acme", &wrapped[..len]).unwrap_err();
        assert!(
            matches!(err, KeyringError::WrappedMalformed { .. }),
            "{err:?}"
        );
    }
    let mut longer = wrapped.clone();
    longer.push(0);
    let err = master.unwrap_dek("acme", &longer).unwrap_err();
    assert!(
        matches!(err, KeyringError::WrappedMalformed { .. }),
        "{err:?}"
    );
}

#[test]
fn tenant_keys_rotation_keeps_old_keys() {
    let mut keys = TenantKeys::new(Dek::generate(KeyId(1)));
    assert_eq!(keys.len(), 1);
    assert!(!keys.is_empty());
    assert_eq!(keys.current().key_id(), KeyId(1));

    keys.add(Dek::generate(KeyId(2)));
    keys.add(Dek::generate(KeyId(5)));
    assert_eq!(keys.len(), 3);
    assert_eq!(keys.current().key_id(), KeyId(5));
    for id in [1, 2, 5] {
        assert_eq!(keys.get(KeyId(id)).map(Dek::key_id), Some(KeyId(id)));
    }
    assert!(keys.get(KeyId(3)).is_none());
    let ids: Vec<KeyId> = keys.iter().map(Dek::key_id).collect();
    assert_eq!(ids, [KeyId(1), KeyId(2), KeyId(5)]);
}

#[test]
#[should_panic(expected = "only rise")]
fn tenant_keys_refuse_a_lower_key_id() {
    let mut keys = TenantKeys::new(Dek::generate(KeyId(2)));
    keys.add(Dek::generate(KeyId(2)));
}

#[test]
fn keyring_insert_get_remove() {
    let keyring = Keyring::new();
    assert!(keyring.get("acme").is_none());

    keyring.insert("acme", TenantKeys::new(Dek::generate(KeyId(1))));
    let held = keyring.get("acme").expect("inserted");
    assert_eq!(held.current().key_id(), KeyId(1));

    // A rotation replaces the set; a reader's old Arc stays valid.
    let mut rotated = (*held).clone();
    rotated.add(Dek::generate(KeyId(2)));
    keyring.insert("acme", rotated);
    assert_eq!(held.current().key_id(), KeyId(1));
    assert_eq!(keyring.get("acme").unwrap().current().key_id(), KeyId(2));
    assert!(keyring.get("other").is_none());

    let removed = keyring.remove("acme").expect("was present");
    assert_eq!(removed.len(), 2);
    assert!(keyring.get("acme").is_none());
    assert!(keyring.remove("acme").is_none());
}

#[test]
fn sealed_secrets_open_only_for_their_purpose_and_key() {
    let master = MasterKey::from_bytes([7; 32]);
    let sealed = master.seal_secret("cluster-ca", b"private key bytes");
    assert_ne!(&sealed[13..30], b"private key bytes");
    assert_eq!(
        master.open_secret("cluster-ca", &sealed).unwrap(),
        b"private key bytes"
    );
    assert!(master.open_secret("other", &sealed).is_err());
    assert!(
        MasterKey::from_bytes([8; 32])
            .open_secret("cluster-ca", &sealed)
            .is_err()
    );
    let mut flipped = sealed.clone();
    *flipped.last_mut().unwrap() ^= 1;
    assert!(master.open_secret("cluster-ca", &flipped).is_err());
    assert!(master.open_secret("cluster-ca", &sealed[..10]).is_err());
}
