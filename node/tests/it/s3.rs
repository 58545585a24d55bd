//! The S3 gateway with the clients departments use: the AWS SDK (boto3,
//! through `s3_sdk.py`, which walks every operation, error code and
//! credential mode), aws-cli, rclone and restic; and what reaches the disk.

use std::path::Path;
use std::process::Command;

use lifeboat_node::core::CredentialMode;

use crate::confidentiality::files_containing;
use crate::{TestNode, must_have, must_start, must_start_with, pseudo_random};

const BUCKET: &str = "demo-backups";

/// A node with bucket `demo-backups` and credentials of every mode for
/// tenant `demo`, plus a full credential of tenant `other`.
struct S3Node {
    node: TestNode,
    endpoint: String,
    full: (String, String),
    read_only: (String, String),
    append_only: (String, String),
    other: (String, String),
}

async fn must_start_s3() -> S3Node {
    s3_node(must_start().await).await
}

async fn s3_node(node: TestNode) -> S3Node {
    let core = node.running().core.clone();
    core.create_bucket(&format!("demo/{BUCKET}"), "")
        .await
        .unwrap();
    core.create_tenant("other").await.unwrap();
    let credential = |tenant: &'static str, mode| {
        let core = core.clone();
        async move {
            let (info, secret) = core.create_credential(tenant, mode, None).await.unwrap();
            (info.access_key, secret)
        }
    };
    let full = credential("demo", CredentialMode::Full).await;
    let read_only = credential("demo", CredentialMode::ReadOnly).await;
    let append_only = credential("demo", CredentialMode::AppendOnly).await;
    let other = credential("other", CredentialMode::Full).await;
    let endpoint = format!("http://{}", node.running().s3_addr);
    S3Node {
        node,
        endpoint,
        full,
        read_only,
        append_only,
        other,
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// A command with the S3 endpoint and `creds` in the AWS variables every
/// client reads, and nothing of the caller's own AWS setup.
fn aws_env(program: &str, endpoint: &str, creds: &(String, String)) -> Command {
    must_have(program);
    let mut c = Command::new(program);
    c.env("AWS_ACCESS_KEY_ID", &creds.0)
        .env("AWS_SECRET_ACCESS_KEY", &creds.1)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", endpoint)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        // rclone refuses to start when this names a bundle it cannot load,
        // and plain-HTTP endpoints need none.
        .env_remove("AWS_CA_BUNDLE")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    c
}

fn must_succeed(mut c: Command) -> String {
    let out = c.output().expect("run client");
    assert!(
        out.status.success(),
        "{c:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Files of pseudo-random content (sizes around the 1 MiB chunk and the
/// clients' multipart thresholds) and a small text file.
fn make_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    for (name, size, seed) in [
        ("empty", 0usize, 1u64),
        ("small.bin", 1000, 2),
        ("chunk.bin", 1 << 20, 3),
        ("chunk-plus-one.bin", (1 << 20) + 1, 4),
        ("sub/seven-mib.bin", 7 << 20, 5),
        ("sub/deeper/twenty-mib.bin", 20 << 20, 6),
    ] {
        std::fs::write(dir.join(name), pseudo_random(seed, size)).unwrap();
    }
    std::fs::write(dir.join("sub/notes.txt"), "quarterly payroll backup\n").unwrap();
}

fn diff_trees(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .arg("-r")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "trees differ:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Every operation, error code and credential mode, through boto3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_sdk_sees_s3_semantics() {
    let s3 = must_start_s3().await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/s3_sdk.py");
    let mut c = Command::new("python3");
    c.arg(script)
        .env("S3_ENDPOINT", &s3.endpoint)
        .env("BUCKET", BUCKET)
        .env("FULL_KEY", &s3.full.0)
        .env("FULL_SECRET", &s3.full.1)
        .env("RO_KEY", &s3.read_only.0)
        .env("RO_SECRET", &s3.read_only.1)
        .env("AO_KEY", &s3.append_only.0)
        .env("AO_SECRET", &s3.append_only.1)
        .env("OTHER_KEY", &s3.other.0)
        .env("OTHER_SECRET", &s3.other.1)
        .env_remove("AWS_CA_BUNDLE")
        .env("AWS_CONFIG_FILE", "/dev/null");
    let out = blocking(move || must_succeed(c)).await;
    assert!(out.contains("all S3 checks passed"), "{out}");
    s3.node.stop().await;
}

/// aws-cli: a tree copied up (large files as multipart uploads), listed,
/// synced back down identical, and removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_cli_copies_a_tree_up_and_back() {
    let s3 = must_start_s3().await;
    let dir = s3.node.dir.path().to_owned();
    let (endpoint, full) = (s3.endpoint.clone(), s3.full.clone());
    blocking(move || {
        let (up, down) = (dir.join("up"), dir.join("down"));
        make_tree(&up);
        let aws = |args: &[&str]| {
            let mut c = aws_env("aws", &endpoint, &full);
            c.args(["--endpoint-url", &endpoint]).args(args);
            if matches!(args.get(1), Some(&"cp" | &"sync" | &"rm")) {
                c.arg("--only-show-errors");
            }
            must_succeed(c)
        };
        let target = format!("s3://{BUCKET}/tree");
        aws(&["s3", "cp", "--recursive", up.to_str().unwrap(), &target]);
        let listed = aws(&["s3", "ls", "--recursive", &format!("s3://{BUCKET}/")]);
        assert!(
            listed.contains("tree/sub/deeper/twenty-mib.bin"),
            "{listed}"
        );
        assert!(listed.contains(&format!("{} tree/sub/deeper/twenty-mib.bin", 20 << 20)));
        aws(&["s3", "sync", &target, down.to_str().unwrap()]);
        // `sync` does not create empty files' directories differently, but
        // it does skip nothing: the trees are identical.
        diff_trees(&up, &down);
        aws(&["s3", "rm", "--recursive", &target]);
        let after = aws(&["s3", "ls", "--recursive", &format!("s3://{BUCKET}/")]);
        assert!(!after.contains("tree/"), "{after}");
    })
    .await;
    s3.node.stop().await;
}

/// rclone: `sync` with multipart above a small cutoff, then `check`
/// compares every file's size and hash against the bucket; a second sync
/// after a change and a removal; a copy back is identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rclone_syncs_and_checks_a_tree() {
    let s3 = must_start_s3().await;
    let dir = s3.node.dir.path().to_owned();
    let (endpoint, full) = (s3.endpoint.clone(), s3.full.clone());
    blocking(move || {
        let up = dir.join("up");
        make_tree(&up);
        let rclone = |args: &[&str]| {
            let mut c = aws_env("rclone", &endpoint, &full);
            c.env("RCLONE_CONFIG", "/dev/null")
                .env("RCLONE_CONFIG_LB_TYPE", "s3")
                .env("RCLONE_CONFIG_LB_PROVIDER", "Other")
                .env("RCLONE_CONFIG_LB_ENDPOINT", &endpoint)
                .env("RCLONE_CONFIG_LB_ACCESS_KEY_ID", &full.0)
                .env("RCLONE_CONFIG_LB_SECRET_ACCESS_KEY", &full.1)
                .env("RCLONE_CONFIG_LB_FORCE_PATH_STYLE", "true")
                .args(args);
            must_succeed(c)
        };
        let remote = format!("lb:{BUCKET}/rclone");
        rclone(&[
            "sync",
            "--s3-upload-cutoff",
            "5M",
            "--s3-chunk-size",
            "5M",
            up.to_str().unwrap(),
            &remote,
        ]);
        rclone(&["check", up.to_str().unwrap(), &remote]);
        // A second sync after a change and a removal: only they move.
        std::fs::write(up.join("sub/notes.txt"), "changed\n").unwrap();
        std::fs::remove_file(up.join("small.bin")).unwrap();
        rclone(&["sync", up.to_str().unwrap(), &remote]);
        rclone(&["check", up.to_str().unwrap(), &remote]);
        let down = dir.join("down");
        rclone(&["copy", &remote, down.to_str().unwrap()]);
        diff_trees(&up, &down);
        rclone(&["purge", &remote]);
        let left = rclone(&["lsf", "-R", &format!("lb:{BUCKET}")]);
        assert!(!left.contains("rclone/"), "{left}");
    })
    .await;
    s3.node.stop().await;
}

/// restic with an append-only credential: init, two backups, check and a
/// restore identical to the source; it cannot forget its own snapshots;
/// an operator's full credential can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restic_backs_up_with_an_append_only_credential_that_cannot_destroy_history() {
    let s3 = must_start_s3().await;
    let dir = s3.node.dir.path().to_owned();
    let (endpoint, full, append_only) =
        (s3.endpoint.clone(), s3.full.clone(), s3.append_only.clone());
    blocking(move || {
        let source = dir.join("source");
        make_tree(&source);
        // At the bucket root: restic's lock files are then under `locks/`,
        // the append-only credential's default writable prefix.
        let repo = format!("s3:{endpoint}/{BUCKET}");
        let restic = |creds: &(String, String), args: &[&str]| {
            let mut c = aws_env("restic", &endpoint, creds);
            c.env("RESTIC_PASSWORD", "correct horse battery staple")
                .env("RESTIC_CACHE_DIR", dir.join("restic-cache"))
                .args(["-r", &repo, "-o", "s3.bucket-lookup=path", "--quiet"])
                .args(args);
            c
        };
        must_succeed(restic(&append_only, &["init"]));
        must_succeed(restic(&append_only, &["backup", source.to_str().unwrap()]));
        std::fs::write(
            source.join("sub/notes.txt"),
            "changed after the first backup\n",
        )
        .unwrap();
        must_succeed(restic(&append_only, &["backup", source.to_str().unwrap()]));
        must_succeed(restic(&append_only, &["check", "--read-data"]));
        let target = dir.join("restored");
        must_succeed(restic(
            &append_only,
            &["restore", "latest", "--target", target.to_str().unwrap()],
        ));
        diff_trees(&source, &target.join(source.strip_prefix("/").unwrap()));

        // The backup client cannot destroy its own history.
        let forget = restic(&append_only, &["forget", "--keep-last", "1", "--prune"])
            .output()
            .unwrap();
        assert!(!forget.status.success(), "append-only forget succeeded");
        let snapshots = must_succeed(restic(&append_only, &["snapshots", "--json"]));
        assert_eq!(snapshots.matches("\"short_id\"").count(), 2, "{snapshots}");
        // The department's full credential can.
        must_succeed(restic(&full, &["unlock"]));
        must_succeed(restic(&full, &["forget", "--keep-last", "1", "--prune"]));
        let snapshots = must_succeed(restic(&full, &["snapshots", "--json"]));
        assert_eq!(snapshots.matches("\"short_id\"").count(), 1, "{snapshots}");
        must_succeed(restic(&full, &["check"]));
    })
    .await;
    s3.node.stop().await;
}

/// Object data and metadata are sealed before they reach RocksDB: neither
/// a compressible body, nor a random one, nor a metadata value is found in
/// any file of the data directory. (Object keys are visible by design.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_bodies_and_metadata_never_reach_the_disk_in_clear() {
    let s3 = must_start_s3().await;
    let dir = s3.node.dir.path().to_owned();
    let data_dir = s3.node.data_dir();
    let (endpoint, full) = (s3.endpoint.clone(), s3.full.clone());
    let phrase = "LIFEBOAT-CONFIDENTIAL-S3-PAYROLL-0042;";
    let secret_meta = "classified-metadata-value-7731";
    let random = pseudo_random(77, 3 << 20);
    let random_probe = random[(2 << 20) + 4096..(2 << 20) + 4160].to_vec();
    blocking(move || {
        let compressible: String = phrase.repeat(100_000);
        std::fs::write(dir.join("c.txt"), &compressible).unwrap();
        std::fs::write(dir.join("r.bin"), &random).unwrap();
        for (file, key) in [("c.txt", "c.txt"), ("r.bin", "r.bin")] {
            let mut c = aws_env("aws", &endpoint, &full);
            c.args([
                "--endpoint-url",
                &endpoint,
                "--only-show-errors",
                "s3",
                "cp",
            ])
            .arg(dir.join(file))
            .arg(format!("s3://{BUCKET}/{key}"))
            .args(["--metadata", &format!("owner={secret_meta}")]);
            must_succeed(c);
        }
    })
    .await;
    let core = s3.node.running().core.clone();
    core.db.flush().unwrap();
    for needle in [phrase.as_bytes(), secret_meta.as_bytes(), &random_probe] {
        assert_eq!(
            files_containing(&data_dir, needle),
            Vec::<std::path::PathBuf>::new(),
            "plaintext found on disk"
        );
    }
    s3.node.stop().await;
}

/// A flipped byte in a stored chunk: a GET of that object fails with
/// `InternalError` when the bad chunk comes first and is cut short when it
/// comes later (never served wrong), the corruption is counted and logged,
/// and every other object is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_chunk_byte_fails_that_object_only() {
    use lifeboat_store::db::{Cf, Durability};
    use lifeboat_store::keys::{self, ChunkPart};
    use lifeboat_store::{BucketId, PgId};

    let s3 = must_start_s3().await;
    let dir = s3.node.dir.path().to_owned();
    let (endpoint, full) = (s3.endpoint.clone(), s3.full.clone());
    let aws = move |args: Vec<String>| {
        let mut c = aws_env("aws", &endpoint, &full);
        // One attempt: a 500 is not retried into a slow test.
        c.env("AWS_MAX_ATTEMPTS", "1")
            .args(["--endpoint-url", &endpoint])
            .args(args);
        c.output().unwrap()
    };
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("small", pseudo_random(11, 1000)),
        ("big", pseudo_random(12, 3 << 20)),
        ("other", pseudo_random(13, 3 << 20)),
    ];
    for (key, data) in &files {
        let path = dir.join(key);
        std::fs::write(&path, data).unwrap();
        let aws = aws.clone();
        let args = [
            "s3api",
            "put-object",
            "--bucket",
            BUCKET,
            "--key",
            key,
            "--body",
        ]
        .into_iter()
        .map(String::from)
        .chain([path.to_str().unwrap().to_owned()])
        .collect();
        let out = blocking(move || aws(args)).await;
        assert!(out.status.success(), "{out:?}");
    }
    let core = s3.node.running().core.clone();
    let bound = core.bucket_binding(BUCKET).unwrap().unwrap();
    let (pg, bucket) = (PgId(bound.pg), BucketId(bound.bucket));
    let flip = |key: &str, nth: usize| {
        let (_, version) = core
            .objects
            .latest(pg, bucket, key.as_bytes())
            .unwrap()
            .unwrap();
        let chunk = version.chunks()[nth];
        let row = keys::chunk_key(pg, chunk, ChunkPart::Data);
        let mut frame = core.objects.chunk(pg, chunk).unwrap().unwrap();
        let at = frame.len() / 2;
        frame[at] ^= 0x20;
        let mut b = core.db.new_batch();
        b.put(Cf::Chunks, &row, &frame);
        core.db.write(b, Durability::Buffered).unwrap();
    };
    flip("small", 0);
    flip("big", 1);
    let before = core.metrics.corrupt_frames.get();
    let get = |key: &str| {
        let aws = aws.clone();
        let out = dir.join(format!("{key}.back"));
        let args: Vec<String> = ["s3api", "get-object", "--bucket", BUCKET, "--key", key]
            .into_iter()
            .map(String::from)
            .chain([out.to_str().unwrap().to_owned()])
            .collect();
        async move {
            let result = blocking(move || aws(args)).await;
            (result, std::fs::read(&out).unwrap_or_default())
        }
    };
    let (small, _) = get("small").await;
    assert!(!small.status.success());
    assert!(
        String::from_utf8_lossy(&small.stderr).contains("InternalError"),
        "{small:?}"
    );
    let (big, big_back) = get("big").await;
    assert!(
        !big.status.success() || big_back != files[1].1,
        "a corrupt object was served whole"
    );
    assert_ne!(big_back, files[1].1, "corrupt bytes were served");
    let (other, other_back) = get("other").await;
    assert!(other.status.success(), "{other:?}");
    assert_eq!(other_back, files[2].1);
    // The object's record is intact: HEAD still answers.
    let aws_head = aws.clone();
    let head = blocking(move || {
        aws_head(
            ["s3api", "head-object", "--bucket", BUCKET, "--key", "small"]
                .map(String::from)
                .to_vec(),
        )
    })
    .await;
    assert!(head.status.success(), "{head:?}");
    assert!(core.metrics.corrupt_frames.get() >= before + 2);
    assert!(crate::captured_logs().contains("store.corrupt_frame"));
    s3.node.stop().await;
}

/// With a certificate and key configured, the S3 port speaks HTTPS only:
/// aws-cli works against it trusting that certificate, and plain HTTP gets
/// no S3 answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_served_when_configured() {
    let node = must_start_with(|c, dir| {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        std::fs::write(dir.join("s3-cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("s3-key.pem"), cert.signing_key.serialize_pem()).unwrap();
        c.s3.tls_cert_file = Some(dir.join("s3-cert.pem"));
        c.s3.tls_key_file = Some(dir.join("s3-key.pem"));
    })
    .await;
    let s3 = s3_node(node).await;
    let addr = s3.node.running().s3_addr;
    let https = format!("https://{addr}");
    let ca = s3.node.dir.path().join("s3-cert.pem");
    let full = s3.full.clone();
    let dir = s3.node.dir.path().to_owned();
    blocking(move || {
        std::fs::write(dir.join("hello.txt"), "over TLS\n").unwrap();
        let aws = |args: &[&str]| {
            let mut c = aws_env("aws", &https, &full);
            c.args([
                "--endpoint-url",
                &https,
                "--ca-bundle",
                ca.to_str().unwrap(),
            ])
            .args(args);
            c
        };
        let mut cp = aws(&["s3", "cp", "--only-show-errors"]);
        cp.arg(dir.join("hello.txt"))
            .arg(format!("s3://{BUCKET}/tls/hello.txt"));
        must_succeed(cp);
        let listed = must_succeed(aws(&[
            "s3",
            "ls",
            "--recursive",
            &format!("s3://{BUCKET}/"),
        ]));
        assert!(listed.contains("tls/hello.txt"), "{listed}");
        // Plain HTTP on the HTTPS port: the handshake fails, no S3 answer.
        let out = aws_env("aws", &format!("http://{addr}"), &full)
            .env("AWS_MAX_ATTEMPTS", "1")
            .args(["--endpoint-url", &format!("http://{addr}"), "s3", "ls"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "plain HTTP was answered: {out:?}");
    })
    .await;
    s3.node.stop().await;
}

fn code<E: aws_sdk_s3::error::ProvideErrorMetadata>(e: &E) -> String {
    e.code().unwrap_or("(no code)").to_owned()
}

/// Puts `body` as `key`; its version id.
async fn put_body(c: &aws_sdk_s3::Client, bucket: &str, key: &str, body: Vec<u8>) -> String {
    c.put_object()
        .bucket(bucket)
        .key(key)
        .body(aws_sdk_s3::primitives::ByteStream::from(body))
        .send()
        .await
        .unwrap()
        .version_id()
        .unwrap()
        .to_owned()
}

async fn get_body(c: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
    let out = c.get_object().bucket(bucket).key(key).send().await.unwrap();
    out.body.collect().await.unwrap().into_bytes().to_vec()
}

/// Every key and common prefix of a ListObjectsV2 walk two at a time,
/// sorted.
async fn list_keys(c: &aws_sdk_s3::Client, bucket: &str, delimiter: Option<&str>) -> Vec<String> {
    let mut keys = Vec::new();
    let mut token = None;
    loop {
        let out = c
            .list_objects_v2()
            .bucket(bucket)
            .max_keys(2)
            .set_delimiter(delimiter.map(str::to_owned))
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        keys.extend(out.contents().iter().map(|o| o.key().unwrap().to_owned()));
        keys.extend(
            out.common_prefixes()
                .iter()
                .map(|p| p.prefix().unwrap().to_owned()),
        );
        token = out.next_continuation_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    keys.sort();
    keys
}

/// The error code a GET of `key` fails with.
async fn get_error(c: &aws_sdk_s3::Client, bucket: &str, key: &str) -> String {
    let e = c
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_err();
    code(&e)
}

/// A new multipart upload's id.
async fn start_upload(c: &aws_sdk_s3::Client, bucket: &str, key: &str) -> String {
    let created = c
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await;
    created.unwrap().upload_id().unwrap().to_owned()
}

/// The AWS SDK for Rust through each operation: buckets, objects with
/// metadata, ranges and conditions, versions, listings with pagination,
/// copy, batch delete, multipart (with a part copied from an object), and
/// the refusals clients act on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_sdk_drives_every_operation() {
    use aws_sdk_s3::primitives::ByteStream;
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};

    let s3 = must_start_s3().await;
    let client = |creds: &(String, String)| {
        lifeboat_chaos_tests::s3_client::client(&s3.endpoint, &creds.0, &creds.1)
    };
    let (c, other) = (client(&s3.full), client(&s3.other));
    let b = "rust-sdk";

    c.create_bucket().bucket(b).send().await.unwrap();
    let again = c.create_bucket().bucket(b).send().await.unwrap_err();
    assert_eq!(code(&again), "BucketAlreadyOwnedByYou");
    let taken = other.create_bucket().bucket(b).send().await.unwrap_err();
    assert_eq!(code(&taken), "BucketAlreadyExists");
    c.head_bucket().bucket(b).send().await.unwrap();
    let listed = c.list_buckets().send().await.unwrap();
    let names: Vec<&str> = listed.buckets().iter().filter_map(|x| x.name()).collect();
    assert!(names.contains(&b) && names.contains(&BUCKET), "{names:?}");
    let others = other.list_buckets().send().await.unwrap();
    assert!(
        others.buckets().is_empty(),
        "another tenant sees no bucket of ours"
    );
    c.get_bucket_location().bucket(b).send().await.unwrap();

    // Objects: a body over two chunks, metadata, ranges, conditions.
    let data = pseudo_random(21, (2 << 20) + 5);
    let v1 = c
        .put_object()
        .bucket(b)
        .key("docs/report")
        .body(ByteStream::from(data.clone()))
        .metadata("owner", "finance")
        .content_type("application/x-report")
        .send()
        .await
        .unwrap()
        .version_id()
        .unwrap()
        .to_owned();
    let got = c
        .get_object()
        .bucket(b)
        .key("docs/report")
        .send()
        .await
        .unwrap();
    assert_eq!(got.content_type(), Some("application/x-report"));
    assert_eq!(
        got.metadata()
            .and_then(|m| m.get("owner"))
            .map(String::as_str),
        Some("finance")
    );
    let etag = got.e_tag().unwrap().to_owned();
    assert_eq!(got.body.collect().await.unwrap().into_bytes(), data);
    let across = (1 << 20) - 3..(1 << 20) + 4;
    let ranged = c
        .get_object()
        .bucket(b)
        .key("docs/report")
        .range(format!("bytes={}-{}", across.start, across.end - 1))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ranged.body.collect().await.unwrap().into_bytes(),
        &data[across]
    );
    let past_end = c
        .get_object()
        .bucket(b)
        .key("docs/report")
        .range("bytes=99999999-")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&past_end), "InvalidRange");
    let unchanged = c
        .get_object()
        .bucket(b)
        .key("docs/report")
        .if_none_match(&etag)
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        unchanged.raw_response().map(|r| r.status().as_u16()),
        Some(304)
    );
    let mismatch = c
        .get_object()
        .bucket(b)
        .key("docs/report")
        .if_match("\"0123\"")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&mismatch), "PreconditionFailed");
    let head = c
        .head_object()
        .bucket(b)
        .key("docs/report")
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length(), Some(data.len() as i64));

    // Versions: an overwrite keeps the first at its id.
    c.put_object()
        .bucket(b)
        .key("docs/report")
        .body(ByteStream::from_static(b"second"))
        .send()
        .await
        .unwrap();
    let first = c
        .get_object()
        .bucket(b)
        .key("docs/report")
        .version_id(&v1)
        .send()
        .await
        .unwrap();
    assert_eq!(first.body.collect().await.unwrap().into_bytes(), data);
    let versions = c.list_object_versions().bucket(b).send().await.unwrap();
    assert_eq!(versions.versions().len(), 2);
    let unknown = c
        .delete_object()
        .bucket(b)
        .key("docs/report")
        .version_id("999999999")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&unknown), "NoSuchVersion");

    // Listings: a delimiter and pages of two.
    for k in ["docs/a", "docs/b", "docs/sub/c", "docs/sub/d", "top"] {
        c.put_object()
            .bucket(b)
            .key(k)
            .body(ByteStream::from_static(b"x"))
            .send()
            .await
            .unwrap();
    }
    let rolled = c
        .list_objects_v2()
        .bucket(b)
        .prefix("docs/")
        .delimiter("/")
        .send()
        .await
        .unwrap();
    let prefixes: Vec<&str> = rolled
        .common_prefixes()
        .iter()
        .filter_map(|p| p.prefix())
        .collect();
    assert_eq!(prefixes, ["docs/sub/"]);
    let mut pages = c
        .list_objects_v2()
        .bucket(b)
        .max_keys(2)
        .into_paginator()
        .send();
    let mut keys = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.unwrap();
        assert!(page.contents().len() <= 2);
        keys.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key())
                .map(String::from),
        );
    }
    assert_eq!(
        keys,
        [
            "docs/a",
            "docs/b",
            "docs/report",
            "docs/sub/c",
            "docs/sub/d",
            "top"
        ]
    );

    // Copy, then a batch delete.
    c.copy_object()
        .bucket(b)
        .key("copy/report")
        .copy_source(format!("{b}/docs/report?versionId={v1}"))
        .send()
        .await
        .unwrap();
    let copied = c
        .get_object()
        .bucket(b)
        .key("copy/report")
        .send()
        .await
        .unwrap();
    assert_eq!(copied.body.collect().await.unwrap().into_bytes(), data);
    let ids = ["docs/a", "docs/b", "missing"]
        .map(|k| ObjectIdentifier::builder().key(k).build().unwrap())
        .to_vec();
    let deleted = c
        .delete_objects()
        .bucket(b)
        .delete(Delete::builder().set_objects(Some(ids)).build().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.deleted().len(), 3);
    assert_eq!(get_error(&c, b, "docs/a").await, "NoSuchKey");

    // Multipart: a 5 MiB part, then a part copied from an object as the
    // last part; a third part, uploaded but not named, is dropped.
    let up = start_upload(&c, b, "big").await;
    let part1 = pseudo_random(22, 5 << 20);
    let e1 = c
        .upload_part()
        .bucket(b)
        .key("big")
        .upload_id(&up)
        .part_number(1)
        .body(ByteStream::from(part1.clone()))
        .send()
        .await
        .unwrap()
        .e_tag()
        .unwrap()
        .to_owned();
    let e2 = c
        .upload_part_copy()
        .bucket(b)
        .key("big")
        .upload_id(&up)
        .part_number(2)
        .copy_source(format!("{b}/copy/report"))
        .copy_source_range("bytes=0-5242879")
        .send()
        .await
        .unwrap_err();
    // The source has only 2 MiB: the range is refused.
    assert_eq!(code(&e2), "InvalidRange");
    let e2 = c
        .upload_part_copy()
        .bucket(b)
        .key("big")
        .upload_id(&up)
        .part_number(2)
        .copy_source(format!("{b}/copy/report"))
        .send()
        .await
        .unwrap()
        .copy_part_result()
        .and_then(|r| r.e_tag())
        .unwrap()
        .to_owned();
    let e3 = c
        .upload_part()
        .bucket(b)
        .key("big")
        .upload_id(&up)
        .part_number(3)
        .body(ByteStream::from_static(b"tail"))
        .send()
        .await
        .unwrap()
        .e_tag()
        .unwrap()
        .to_owned();
    let parts = c
        .list_parts()
        .bucket(b)
        .key("big")
        .upload_id(&up)
        .send()
        .await
        .unwrap();
    assert_eq!(parts.parts().len(), 3);
    let uploads = c.list_multipart_uploads().bucket(b).send().await.unwrap();
    assert_eq!(uploads.uploads().len(), 1);
    let part = |n: i32, e: &str| CompletedPart::builder().part_number(n).e_tag(e).build();
    let wrong = c
        .complete_multipart_upload()
        .bucket(b)
        .key("big")
        .upload_id(&up)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .parts(part(1, &e1))
                .parts(part(2, "\"00000000000000000000000000000000\""))
                .build(),
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&wrong), "InvalidPart");
    let done = c
        .complete_multipart_upload()
        .bucket(b)
        .key("big")
        .upload_id(&up)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .parts(part(1, &e1))
                .parts(part(2, &e2))
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(
        done.e_tag().unwrap().ends_with("-2\""),
        "{:?}",
        done.e_tag()
    );
    let big = c.get_object().bucket(b).key("big").send().await.unwrap();
    let mut want = part1;
    want.extend_from_slice(&data);
    assert_ne!(e3, e2);
    assert_eq!(big.body.collect().await.unwrap().into_bytes(), want);
    let aborted = start_upload(&c, b, "never").await;
    c.abort_multipart_upload()
        .bucket(b)
        .key("never")
        .upload_id(&aborted)
        .send()
        .await
        .unwrap();
    let no_upload = c
        .list_parts()
        .bucket(b)
        .key("never")
        .upload_id(&aborted)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&no_upload), "NoSuchUpload");

    // Isolation, then the bucket goes once empty.
    assert_eq!(get_error(&other, b, "big").await, "AccessDenied");
    let full = c.delete_bucket().bucket(b).send().await.unwrap_err();
    assert_eq!(code(&full), "BucketNotEmpty");
    for k in [
        "docs/report",
        "docs/sub/c",
        "docs/sub/d",
        "top",
        "copy/report",
        "big",
    ] {
        c.delete_object().bucket(b).key(k).send().await.unwrap();
    }
    c.delete_bucket().bucket(b).send().await.unwrap();
    let no_bucket = c.head_bucket().bucket(b).send().await.unwrap_err();
    assert_eq!(
        no_bucket.raw_response().map(|r| r.status().as_u16()),
        Some(404)
    );
    s3.node.stop().await;
}

/// Objects through time: a read-only bucket clone at a snapshot or a time
/// lists and reads exactly that moment's objects (overwritten, deleted,
/// deleted by version id or created later alike), and refuses writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_bucket_clones_show_exactly_one_moment() {
    use aws_sdk_s3::primitives::ByteStream;

    let s3 = must_start_s3().await;
    let core = s3.node.running().core.clone();
    let c = lifeboat_chaos_tests::s3_client::client(&s3.endpoint, &s3.full.0, &s3.full.1);
    let put = |key: &'static str, body: Vec<u8>| put_body(&c, BUCKET, key, body);
    let get = |bucket: &'static str, key: &'static str| get_body(&c, bucket, key);
    let list =
        |bucket: &'static str, delimiter: Option<&'static str>| list_keys(&c, bucket, delimiter);

    // The moment: a (1.5 MiB, two chunks), dir/b, dir/c, e.
    let a_then = pseudo_random(31, 3 << 19);
    put("a", a_then.clone()).await;
    put("dir/b", b"b then".to_vec()).await;
    let c_version = put("dir/c", b"c then".to_vec()).await;
    put("e", b"e then".to_vec()).await;
    core.create_snapshot("demo/main", "moment", "", "")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let moment = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    // Afterwards: a overwritten, dir/b deleted, dir/c's version removed by
    // id, e deleted, f created.
    put("a", b"a later".to_vec()).await;
    c.delete_object()
        .bucket(BUCKET)
        .key("dir/b")
        .send()
        .await
        .unwrap();
    c.delete_object()
        .bucket(BUCKET)
        .key("dir/c")
        .version_id(&c_version)
        .send()
        .await
        .unwrap();
    c.delete_object()
        .bucket(BUCKET)
        .key("e")
        .send()
        .await
        .unwrap();
    put("f", b"f later".to_vec()).await;

    for (clone, at, snapshot) in [
        ("demo/then-snap", "", "moment"),
        ("demo/then-time", moment.as_str(), ""),
    ] {
        core.clone_bucket(&format!("demo/{BUCKET}"), clone, at, snapshot, true)
            .await
            .unwrap();
    }
    for bucket in ["then-snap", "then-time"] {
        assert_eq!(list(bucket, None).await, ["a", "dir/b", "dir/c", "e"]);
        assert_eq!(list(bucket, Some("/")).await, ["a", "dir/", "e"]);
        assert!(get(bucket, "a").await == a_then, "{bucket}: a as it was");
        assert_eq!(get(bucket, "dir/c").await, b"c then");
        assert_eq!(get(bucket, "e").await, b"e then");
        assert_eq!(get_error(&c, bucket, "f").await, "NoSuchKey");
        // Read-only: writes and deletes are refused.
        let e = c
            .put_object()
            .bucket(bucket)
            .key("x")
            .body(ByteStream::from_static(b"x"))
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&e), "AccessDenied");
        let e = c
            .delete_object()
            .bucket(bucket)
            .key("a")
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&e), "AccessDenied");
        // Its versions are those of the moment: one per key, each the
        // latest, dir/c's as it was before its removal by id.
        let versions = c
            .list_object_versions()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
        let listed: Vec<(&str, bool)> = versions
            .versions()
            .iter()
            .map(|v| (v.key().unwrap(), v.is_latest().unwrap_or(false)))
            .collect();
        assert_eq!(
            listed,
            [("a", true), ("dir/b", true), ("dir/c", true), ("e", true)],
            "{bucket}"
        );
        assert!(versions.delete_markers().is_empty(), "{bucket}");
        let by_id = c
            .get_object()
            .bucket(bucket)
            .key("dir/c")
            .version_id(&c_version)
            .send()
            .await
            .unwrap();
        assert!(by_id.body.collect().await.unwrap().into_bytes() == b"c then".as_slice());
    }
    // The source is as it is now.
    assert_eq!(list(BUCKET, None).await, ["a", "f"]);
    assert_eq!(get(BUCKET, "a").await, b"a later");
    // A clone of the clone shows the same moment.
    core.clone_bucket("demo/then-snap", "demo/then-again", "-0s", "", true)
        .await
        .unwrap();
    assert_eq!(list("then-again", None).await, ["a", "dir/b", "dir/c", "e"]);
    // Refusals: another tenant, no such snapshot.
    for (new, at, snapshot, read_only, says) in [
        (
            "other/xx-2",
            "-0s",
            "",
            true,
            "stays in its source's tenant",
        ),
        ("demo/xx-3", "", "nope", true, "does not exist"),
    ] {
        let e = core
            .clone_bucket(&format!("demo/{BUCKET}"), new, at, snapshot, read_only)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{e}");
    }
    s3.node.stop().await;
}

/// A writable bucket clone: it shows its moment, takes writes, overwrites,
/// copies and deletes of its own that never reach its source (nor do the
/// source's later changes reach it), lists its versions over its base's,
/// and refuses to change its base's versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writable_bucket_clones_write_over_their_moment() {
    let s3 = must_start_s3().await;
    let core = s3.node.running().core.clone();
    let c = lifeboat_chaos_tests::s3_client::client(&s3.endpoint, &s3.full.0, &s3.full.1);
    let append_only =
        lifeboat_chaos_tests::s3_client::client(&s3.endpoint, &s3.append_only.0, &s3.append_only.1);
    let a_then = pseudo_random(41, 3 << 19);
    let a_version = put_body(&c, BUCKET, "a", a_then.clone()).await;
    put_body(&c, BUCKET, "dir/b", b"b then".to_vec()).await;
    let c_version = put_body(&c, BUCKET, "dir/c", b"c then".to_vec()).await;
    core.create_snapshot("demo/main", "moment", "", "")
        .await
        .unwrap();
    put_body(&c, BUCKET, "a", b"a later".to_vec()).await;
    c.delete_object()
        .bucket(BUCKET)
        .key("dir/b")
        .send()
        .await
        .unwrap();
    put_body(&c, BUCKET, "f", b"f later".to_vec()).await;

    let clone = core
        .clone_bucket(&format!("demo/{BUCKET}"), "demo/drill", "", "moment", false)
        .await
        .unwrap();
    assert!(clone.base.is_some_and(|b| b.writable), "{clone:?}");
    const DRILL: &str = "drill";
    assert_eq!(list_keys(&c, DRILL, None).await, ["a", "dir/b", "dir/c"]);
    assert!(get_body(&c, DRILL, "a").await == a_then);

    // Writes of its own: a new key, an overwrite, a copy of a base object,
    // a delete of a key only the base has.
    let g_version = put_body(&c, DRILL, "g", b"g in the clone".to_vec()).await;
    put_body(&c, DRILL, "a", b"a in the clone".to_vec()).await;
    c.copy_object()
        .bucket(DRILL)
        .key("dir/b2")
        .copy_source(format!("{DRILL}/dir/b"))
        .send()
        .await
        .unwrap();
    let removed = c
        .delete_object()
        .bucket(DRILL)
        .key("dir/c")
        .send()
        .await
        .unwrap();
    assert_eq!(removed.delete_marker(), Some(true));
    assert_eq!(
        list_keys(&c, DRILL, None).await,
        ["a", "dir/b", "dir/b2", "g"]
    );
    assert_eq!(list_keys(&c, DRILL, Some("/")).await, ["a", "dir/", "g"]);
    assert_eq!(get_body(&c, DRILL, "a").await, b"a in the clone");
    assert_eq!(get_body(&c, DRILL, "dir/b2").await, b"b then");
    assert_eq!(get_error(&c, DRILL, "dir/c").await, "NoSuchKey");
    assert_eq!(get_error(&c, DRILL, "f").await, "NoSuchKey");
    // The source is as it was left, and the clone's base stays its moment.
    assert_eq!(list_keys(&c, BUCKET, None).await, ["a", "dir/c", "f"]);
    assert_eq!(get_body(&c, BUCKET, "a").await, b"a later");
    put_body(&c, BUCKET, "dir/c", b"c even later".to_vec()).await;
    assert_eq!(get_error(&c, DRILL, "dir/c").await, "NoSuchKey");
    assert_eq!(get_body(&c, DRILL, "dir/b").await, b"b then");

    // An append-only credential cannot overwrite what the clone shows
    // from its base either.
    let e = append_only
        .put_object()
        .bucket(DRILL)
        .key("dir/b")
        .body(aws_sdk_s3::primitives::ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "AccessDenied");

    // Versions: the clone's own, then the base's of the moment.
    let versions = c
        .list_object_versions()
        .bucket(DRILL)
        .prefix("a")
        .send()
        .await
        .unwrap();
    let listed: Vec<(&str, bool)> = versions
        .versions()
        .iter()
        .map(|v| (v.version_id().unwrap(), v.is_latest().unwrap_or(false)))
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed[0].1 && !listed[1].1, "{listed:?}");
    assert_eq!(listed[1].0, a_version);
    let then = c
        .get_object()
        .bucket(DRILL)
        .key("a")
        .version_id(&a_version)
        .send()
        .await
        .unwrap();
    assert!(then.body.collect().await.unwrap().into_bytes() == a_then.as_slice());
    let markers = c
        .list_object_versions()
        .bucket(DRILL)
        .prefix("dir/c")
        .send()
        .await
        .unwrap();
    assert_eq!(markers.delete_markers().len(), 1);
    assert_eq!(markers.delete_markers()[0].is_latest(), Some(true));
    assert_eq!(markers.versions()[0].version_id(), Some(c_version.as_str()));
    // The base's versions are not the clone's to remove; its own are.
    let e = c
        .delete_object()
        .bucket(DRILL)
        .key("a")
        .version_id(&a_version)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "AccessDenied");
    c.delete_object()
        .bucket(DRILL)
        .key("g")
        .version_id(&g_version)
        .send()
        .await
        .unwrap();
    assert_eq!(get_error(&c, DRILL, "g").await, "NoSuchKey");

    // A clone is empty once nothing of its own is live: deleting it drops
    // its writes and never its base.
    let e = c.delete_bucket().bucket(DRILL).send().await.unwrap_err();
    assert_eq!(code(&e), "BucketNotEmpty");
    for key in ["a", "dir/b2"] {
        c.delete_object()
            .bucket(DRILL)
            .key(key)
            .send()
            .await
            .unwrap();
    }
    c.delete_bucket().bucket(DRILL).send().await.unwrap();
    assert_eq!(list_keys(&c, BUCKET, None).await, ["a", "dir/c", "f"]);
    s3.node.stop().await;
}

/// The drill the clones are for: a restic repository is wiped out; a
/// writable clone of its bucket at a snapshot from before is a whole
/// repository again, which restic checks, restores from and backs up to
/// (its locks and new data land in the clone), while the wiped bucket
/// stays as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restic_works_on_a_writable_clone_of_a_wiped_repository() {
    let s3 = must_start_s3().await;
    let core = s3.node.running().core.clone();
    let dir = s3.node.dir.path().to_owned();
    let (endpoint, full) = (s3.endpoint.clone(), s3.full.clone());
    let source = dir.join("source");
    std::fs::create_dir_all(source.join("sub")).unwrap();
    std::fs::write(source.join("ledger.bin"), pseudo_random(7, 3 << 20)).unwrap();
    std::fs::write(source.join("sub/notes.txt"), "before the attack\n").unwrap();
    let restic = {
        let (dir, endpoint, full) = (dir.clone(), endpoint.clone(), full.clone());
        move |bucket: &str, args: &[&str]| {
            let mut c = aws_env("restic", &endpoint, &full);
            c.env("RESTIC_PASSWORD", "correct horse battery staple")
                .env("RESTIC_CACHE_DIR", dir.join(format!("cache-{bucket}")))
                .args(["-r", &format!("s3:{endpoint}/{bucket}")])
                .args(["-o", "s3.bucket-lookup=path", "--quiet"])
                .args(args);
            must_succeed(c)
        }
    };
    {
        let (restic, source) = (restic.clone(), source.clone());
        blocking(move || {
            restic(BUCKET, &["init"]);
            restic(BUCKET, &["backup", source.to_str().unwrap()]);
        })
        .await;
    }
    core.create_snapshot("demo/main", "before-attack", "", "")
        .await
        .unwrap();
    // The attack: every object of the repository deleted.
    let mut rm = aws_env("aws", &endpoint, &full);
    rm.args(["s3", "rm", "--recursive", &format!("s3://{BUCKET}/")]);
    blocking(move || must_succeed(rm)).await;

    core.clone_bucket(
        &format!("demo/{BUCKET}"),
        "demo/drill-restic",
        "",
        "before-attack",
        false,
    )
    .await
    .unwrap();
    blocking(move || {
        let snapshots = restic("drill-restic", &["snapshots", "--json"]);
        assert_eq!(snapshots.matches("\"short_id\"").count(), 1, "{snapshots}");
        restic("drill-restic", &["check", "--read-data"]);
        let target = dir.join("restored");
        restic(
            "drill-restic",
            &["restore", "latest", "--target", target.to_str().unwrap()],
        );
        diff_trees(&source, &target.join(source.strip_prefix("/").unwrap()));
        // The drill goes on writing into the clone.
        std::fs::write(source.join("sub/notes.txt"), "during the drill\n").unwrap();
        restic("drill-restic", &["backup", source.to_str().unwrap()]);
        restic("drill-restic", &["check"]);
        let snapshots = restic("drill-restic", &["snapshots", "--json"]);
        assert_eq!(snapshots.matches("\"short_id\"").count(), 2, "{snapshots}");
    })
    .await;
    let c = lifeboat_chaos_tests::s3_client::client(&s3.endpoint, &s3.full.0, &s3.full.1);
    assert!(
        list_keys(&c, BUCKET, None).await.is_empty(),
        "the wiped bucket is as it was left"
    );
    s3.node.stop().await;
}
