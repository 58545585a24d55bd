//! Real NBD clients against the real node.

use crate::{VOLUME, VOLUME_BYTES, must_run, must_start, pseudo_random};

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_then_compare_says_identical() {
    let node = must_start().await;
    let image = node.dir.path().join("random.img");
    std::fs::write(&image, pseudo_random(42, VOLUME_BYTES as usize)).unwrap();
    let uri = node.nbd_uri();
    let img = image.to_str().unwrap().to_owned();
    blocking(move || {
        must_run(
            "qemu-img",
            &["convert", "-n", "-f", "raw", "-O", "raw", &img, &uri],
        );
        let out = must_run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", &img, &uri],
        );
        assert!(out.contains("identical"), "qemu-img compare: {out}");
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_at_unaligned_offsets_and_lengths() {
    let node = must_start().await;
    let uri = node.nbd_uri();
    blocking(move || {
        // Offsets and lengths that start and end inside blocks, span several
        // blocks, and overlap each other.
        let writes = [
            (1000u64, 5000u64, 0xab),
            (4095, 2, 0x11),
            (12_345, 70_001, 0x5c),
            (8191, 4099, 0xe7),
        ];
        let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
        for (off, len, pat) in writes {
            args.push("-c".into());
            args.push(format!("write -P {pat:#x} {off} {len}"));
        }
        // Read back what each region holds now (later writes win on overlap).
        args.extend(
            [
                "read -P 0xab 1000 3095",
                "read -P 0x11 4095 2",
                "read -P 0xab 4097 1903",
                "read -P 0x00 6000 2191",
                "read -P 0x00 12290 55",
                "read -P 0xe7 8191 4099",
                "read -P 0x5c 12345 70001",
                "read -P 0x00 0 1000",
                "read -P 0x00 82346 4000",
            ]
            .iter()
            .flat_map(|c| ["-c".to_string(), c.to_string()]),
        );
        args.push(uri);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = must_run("qemu-io", &args);
        assert!(!out.contains("Pattern verification failed"), "{out}");
        assert_eq!(out.matches("read ").count(), 9, "{out}");
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_volumes_with_sizes_and_block_size() {
    let node = must_start().await;
    node.running()
        .core
        .create_volume("demo/second", 8 << 20, "")
        .await
        .unwrap();
    let base = format!("nbd://{}", node.nbd());
    let uri = node.nbd_uri();
    blocking(move || {
        let list = must_run("nbdinfo", &["--list", "--json", &base]);
        assert!(
            list.contains(&format!("\"export-name\": \"{VOLUME}\"")),
            "{list}"
        );
        assert!(list.contains("\"export-name\": \"demo/second\""), "{list}");
        assert!(
            list.contains(&format!("\"export-size\": {VOLUME_BYTES}")),
            "{list}"
        );
        assert!(list.contains("\"export-size\": 8388608"), "{list}");
        let info = must_run("nbdinfo", &["--json", &uri]);
        assert!(info.contains("\"block_size_preferred\": 4096"), "{info}");
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trip() {
    let node = must_start().await;
    let dir = node.dir.path().to_owned();
    let uri = node.nbd_uri();
    blocking(move || {
        let src = dir.join("src.img");
        // Mixed content: random, zero runs and a compressible run.
        let mut data = pseudo_random(7, VOLUME_BYTES as usize);
        data[1 << 20..3 << 20].fill(0);
        for (i, b) in data[5 << 20..6 << 20].iter_mut().enumerate() {
            *b = (i % 7) as u8;
        }
        std::fs::write(&src, &data).unwrap();
        let back = dir.join("back.img");
        must_run("nbdcopy", &[src.to_str().unwrap(), &uri]);
        must_run("nbdcopy", &[&uri, back.to_str().unwrap()]);
        assert!(
            std::fs::read(&back).unwrap() == data,
            "nbdcopy round trip differs"
        );
    })
    .await;
    node.stop().await;
}
