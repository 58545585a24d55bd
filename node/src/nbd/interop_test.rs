//! Interoperability: real NBD clients (libnbd's nbdinfo and nbdcopy, qemu's
//! qemu-io and qemu-img) against `serve` with the in-memory provider.
//!
//! The clients are required: `make test` installs them (libnbd-bin,
//! qemu-utils), and a missing one fails the test rather than skipping it.

use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use super::server::tests::{TestServer, step, test_provider};
use super::test_provider::{MemoryExport, MemoryProvider};

const NBDINFO: &str = "/usr/bin/nbdinfo";
const NBDCOPY: &str = "/usr/bin/nbdcopy";
const QEMU_IO: &str = "/usr/bin/qemu-io";
const QEMU_IMG: &str = "/usr/bin/qemu-img";
const BIG_EXPORT_BYTES: usize = 8 << 20;

fn installed(program: &str) -> bool {
    assert!(
        Path::new(program).exists(),
        "{program} is not installed: run `make test`, which installs it"
    );
    true
}

/// Run a client to completion; panic with its output unless it succeeds.
async fn must_run(program: &str, args: &[&str]) -> String {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = step(program, child)
        .await
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    stdout
}

fn uri(server: &TestServer, export: &str) -> String {
    format!("nbd://{}/{export}", server.addr)
}

/// Deterministic pseudo-random bytes, so failures reproduce.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    lifeboat_chaos_tests::data::pseudo_random(seed, len)
}

fn big_provider() -> MemoryProvider {
    MemoryProvider::default().with_export("t/big", MemoryExport::new(BIG_EXPORT_BYTES))
}

#[tokio::test]
async fn nbdinfo_lists_exports_with_sizes() {
    if !installed(NBDINFO) {
        return;
    }
    let server = TestServer::start(test_provider()).await;
    let listing = must_run(NBDINFO, &["--list", &format!("nbd://{}", server.addr)]).await;
    assert!(listing.contains("export=\"t/v\""), "{listing}");
    assert!(listing.contains("export=\"t/ro\""), "{listing}");
    assert!(listing.contains("description: test volume"), "{listing}");
    assert!(listing.contains("export-size: 1048576"), "{listing}");
    assert!(listing.contains("export-size: 65536"), "{listing}");
    server.must_stop().await;
}

#[tokio::test]
async fn nbdinfo_shows_block_sizes_and_flags() {
    if !installed(NBDINFO) {
        return;
    }
    let server = TestServer::start(test_provider()).await;
    let info = must_run(NBDINFO, &[&uri(&server, "t/v")]).await;
    for expected in [
        "using structured packets",
        "export-size: 1048576",
        "description: test volume",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
        "can_multi_conn: true",
        "can_fua: true",
        "can_flush: true",
        "can_trim: true",
        "can_zero: true",
        "can_df: true",
        "is_read_only: false",
    ] {
        assert!(info.contains(expected), "missing {expected:?} in:\n{info}");
    }
    let read_only = must_run(NBDINFO, &[&uri(&server, "t/ro")]).await;
    assert!(read_only.contains("is_read_only: true"), "{read_only}");
    server.must_stop().await;
}

#[tokio::test]
async fn qemu_io_writes_and_reads_back_a_pattern() {
    if !installed(QEMU_IO) {
        return;
    }
    let server = TestServer::start(test_provider()).await;
    let output = must_run(
        QEMU_IO,
        &[
            "-f",
            "raw",
            &uri(&server, "t/v"),
            "-c",
            "write -P 0xab 1000 5000",
            "-c",
            "read -P 0xab 1000 5000",
            "-c",
            "write -z 8192 4096",
            "-c",
            "read -P 0 8192 4096",
            "-c",
            "flush",
        ],
    )
    .await;
    assert!(!output.contains("failed"), "{output}");
    assert!(
        output.contains("wrote 5000/5000 bytes at offset 1000"),
        "{output}"
    );
    assert!(
        output.contains("read 5000/5000 bytes at offset 1000"),
        "{output}"
    );
    let data = server.provider.export("t/v").snapshot();
    assert!(data[1000..6000].iter().all(|&b| b == 0xab));
    assert!(data[8192..12288].iter().all(|&b| b == 0));
    server.must_stop().await;
}

#[tokio::test]
async fn qemu_img_converts_a_file_in_and_compares_equal() {
    if !installed(QEMU_IMG) {
        return;
    }
    let server = TestServer::start(big_provider()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.raw");
    let content = noise(BIG_EXPORT_BYTES, 0x5eed);
    std::fs::write(&source, &content).expect("write source image");
    let source = source.to_str().expect("utf-8 path");
    let target = uri(&server, "t/big");
    must_run(
        QEMU_IMG,
        &["convert", "-n", "-f", "raw", "-O", "raw", source, &target],
    )
    .await;
    assert!(
        server.provider.export("t/big").snapshot() == content,
        "export differs from source"
    );
    let compared = must_run(
        QEMU_IMG,
        &["compare", "-f", "raw", "-F", "raw", source, &target],
    )
    .await;
    assert!(compared.contains("Images are identical"), "{compared}");
    server.must_stop().await;
}

#[tokio::test]
async fn nbdcopy_round_trips_over_several_connections() {
    if !installed(NBDCOPY) {
        return;
    }
    let server = TestServer::start(big_provider()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.raw");
    let back = dir.path().join("back.raw");
    let content = noise(BIG_EXPORT_BYTES, 0xc0ffee);
    std::fs::write(&source, &content).expect("write source image");
    let target = uri(&server, "t/big");
    let source = source.to_str().expect("utf-8 path");
    // CAN_MULTI_CONN lets nbdcopy spread requests over 4 connections.
    must_run(
        NBDCOPY,
        &["--connections=4", "--requests=32", source, &target],
    )
    .await;
    assert!(
        server.provider.export("t/big").snapshot() == content,
        "export differs from source"
    );
    must_run(
        NBDCOPY,
        &[
            "--connections=4",
            &target,
            back.to_str().expect("utf-8 path"),
        ],
    )
    .await;
    assert!(
        std::fs::read(&back).expect("read copy") == content,
        "copy differs from source"
    );
    assert!(server.stats.snapshot().connections_accepted >= 2);
    server.must_stop().await;
}
