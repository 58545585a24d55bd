//! A known plaintext written through NBD never appears in any file under
//! the data dir: not in the Raft log, the WAL, SST or blob files.

use std::path::Path;

use crate::{must_start, pseudo_random};

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir` that holds `needle`.
pub(crate) fn files_containing(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| std::fs::read(p).is_ok_and(|bytes| contains(&bytes, needle)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_never_reaches_the_disk() {
    let node = must_start().await;
    let client = node.client().await;
    // Compressible: a readable phrase repeated; incompressible: random.
    let phrase = b"LIFEBOAT-CONFIDENTIAL-PAYROLL-RECORD-0042;";
    let compressible: Vec<u8> = phrase.iter().copied().cycle().take(64 << 10).collect();
    let random = pseudo_random(99, 64 << 10);
    client.write(0, &compressible, true).await.unwrap().unwrap();
    client.write(1 << 20, &random, true).await.unwrap().unwrap();
    // A sub-block write goes through the leader's merge path too.
    client
        .write((2 << 20) + 100, &compressible[..1000], false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        client.read(0, 64 << 10).await.unwrap().unwrap(),
        compressible
    );

    let core = node.running().core.clone();
    // Everything in memtables goes to SST and blob files as well, so that
    // both the WAL and the table files are searched.
    core.db.flush().unwrap();
    let needles: Vec<&[u8]> = vec![
        &phrase[..],
        &random[..32],
        &random[4096..4128],
        &random[(60 << 10)..(60 << 10) + 32],
    ];
    let files = files_under(&node.data_dir());
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "log")),
        "a WAL exists"
    );
    let mut bytes_searched = 0;
    for f in &files {
        let data = std::fs::read(f).unwrap();
        bytes_searched += data.len();
        for n in &needles {
            assert!(!contains(&data, n), "plaintext found in {}", f.display());
        }
    }
    assert!(
        bytes_searched > 128 << 10,
        "the data went somewhere: {bytes_searched} bytes"
    );
    node.stop().await;
}
