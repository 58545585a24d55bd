//! Disjoint sub-block writes into the same 4 KiB blocks never erase each
//! other (DESIGN.md "Write path", step 3), on one connection and on many.

use std::sync::Arc;

use lifeboat_chaos_tests::nbd_client::NbdClient;

use crate::{block_content, must_node_with_volume};

const BLOCKS: u64 = 16;
const SECTOR: usize = 512;

fn expected() -> Vec<u8> {
    let mut data = Vec::new();
    for b in 0..BLOCKS {
        for s in 0..8u64 {
            data.extend(block_content(b, s, SECTOR));
        }
    }
    data
}

async fn write_all_sectors(clients: &[Arc<NbdClient>], base: u64) {
    let mut tasks = Vec::new();
    let mut i = 0;
    // Interleave sectors so that every block has writes in flight together.
    for s in 0..8u64 {
        for b in 0..BLOCKS {
            let c = clients[i % clients.len()].clone();
            i += 1;
            tasks.push(tokio::spawn(async move {
                let data = block_content(b, s, SECTOR);
                c.write(base + b * 4096 + s * SECTOR as u64, &data, false)
                    .await
                    .unwrap()
                    .unwrap();
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_disjoint_sector_writes_all_survive() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = must_node_with_volume(dir.path(), &dir.path().join("data"), "", "16MiB");
    let one = vec![Arc::new(NbdClient::connect(node.nbd, "t/v").await.unwrap())];
    let mut many = Vec::new();
    for _ in 0..6 {
        many.push(Arc::new(NbdClient::connect(node.nbd, "t/v").await.unwrap()));
    }
    let want = expected();
    // Region A through one connection (128 requests in flight), region B
    // through six connections.
    let region_b = 1 << 20;
    write_all_sectors(&one, 0).await;
    write_all_sectors(&many, region_b).await;
    let reader = NbdClient::connect(node.nbd, "t/v").await.unwrap();
    let a = reader.read(0, want.len() as u32).await.unwrap().unwrap();
    let b = reader
        .read(region_b, want.len() as u32)
        .await
        .unwrap()
        .unwrap();
    for (name, got) in [("one connection", &a), ("six connections", &b)] {
        if let Some(i) = got.iter().zip(&want).position(|(x, y)| x != y) {
            panic!(
                "{name}: first difference at byte {i} (block {}, sector {})",
                i / 4096,
                (i % 4096) / SECTOR
            );
        }
    }
    drop((one, many, reader));
    // And they are durable.
    node.kill9();
    node.start().unwrap();
    let reader = NbdClient::connect(node.nbd, "t/v").await.unwrap();
    assert_eq!(
        reader.read(0, want.len() as u32).await.unwrap().unwrap(),
        want
    );
    assert_eq!(
        reader
            .read(region_b, want.len() as u32)
            .await
            .unwrap()
            .unwrap(),
        want
    );
}
