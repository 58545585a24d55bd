//! Nothing acknowledged is lost: writers record every acknowledged write
//! while the node is killed with SIGKILL at random moments; after each
//! restart every block reads back as its last acknowledged write (or a
//! write that was in flight when the node died, which may or may not have
//! landed).

use std::time::Duration;

use lifeboat_chaos_tests::ledger::Ledger;
use lifeboat_chaos_tests::nbd_client::NbdClient;
use rand::{Rng, SeedableRng};

use crate::{block_content, must_node_with_volume};

const WRITERS: u64 = 8;
const BLOCKS_PER_WRITER: u64 = 32;
const ROUNDS: usize = 4;

async fn writer(client: NbdClient, id: u64, ledger: Ledger, seed: u64, first_seq: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seq = first_seq;
    loop {
        let block = id * BLOCKS_PER_WRITER + rng.gen_range(0..BLOCKS_PER_WRITER);
        // Mostly one block; sometimes a multi-block run (several entries).
        let blocks = if rng.gen_ratio(1, 8) {
            3.min(BLOCKS_PER_WRITER - block % BLOCKS_PER_WRITER)
        } else {
            1
        };
        let mut data = Vec::new();
        for b in block..block + blocks {
            data.extend(block_content(b, seq, 4096));
            ledger.sending(b, seq);
        }
        let fua = rng.gen_ratio(1, 2);
        match client.write(block * 4096, &data, fua).await {
            Ok(Ok(())) => {
                for b in block..block + blocks {
                    ledger.acked(b, seq);
                }
            }
            // An error reply or a dead connection: not acknowledged.
            _ => return,
        }
        seq += 1;
    }
}

/// Reads back every block the ledger knows through a new connection and
/// checks it; what landed becomes the truth for the next round.
async fn verify(node_nbd: std::net::SocketAddr, ledger: &Ledger) -> usize {
    let client = NbdClient::connect(node_nbd, "t/v")
        .await
        .expect("reconnect after restart");
    let blocks = ledger.blocks();
    for &block in &blocks {
        let got = client
            .read(block * 4096, 4096)
            .await
            .unwrap()
            .expect("read after restart");
        let landed = ledger.check(block, &got).unwrap_or_else(|e| panic!("{e}"));
        ledger.settle(block, landed);
    }
    blocks.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = must_node_with_volume(dir.path(), &dir.path().join("data"), "", "64MiB");
    let ledger = Ledger::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x11fe_b0a7);
    let mut total_acked = 0;
    for round in 0..ROUNDS {
        let mut tasks = Vec::new();
        for id in 0..WRITERS {
            let client = NbdClient::connect(node.nbd, "t/v").await.unwrap();
            let seed = rng.r#gen::<u64>();
            tasks.push(tokio::spawn(writer(
                client,
                id,
                ledger.clone(),
                seed,
                (round as u64 + 1) << 32,
            )));
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1500))).await;
        node.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            ledger.acked_blocks() > 0,
            "round {round}: some writes were acknowledged before the kill"
        );
        node.start().unwrap();
        total_acked = verify(node.nbd, &ledger).await;
    }
    assert!(
        total_acked >= 32,
        "enough distinct blocks were exercised: {total_acked}"
    );
    assert!(node.stop().unwrap(), "clean exit on SIGTERM");
}
