//! Nothing acknowledged is lost: writers record every acknowledged write
//! while the node is killed with SIGKILL at random moments; after each
//! restart every block reads back as its last acknowledged write (or a
//! write that was in flight when the node died, which may or may not have
//! landed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifeboat_chaos_tests::nbd_client::NbdClient;
use rand::{Rng, SeedableRng};

use crate::{block_content, must_node_with_volume};

const WRITERS: u64 = 8;
const BLOCKS_PER_WRITER: u64 = 32;
const ROUNDS: usize = 4;

#[derive(Default, Clone)]
struct BlockState {
    acked: Option<u64>,
    /// Sequences sent but not acknowledged when the node died.
    in_flight: Vec<u64>,
}

type Ledger = Arc<Mutex<HashMap<u64, BlockState>>>;

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
            ledger
                .lock()
                .unwrap()
                .entry(b)
                .or_default()
                .in_flight
                .push(seq);
        }
        let fua = rng.gen_ratio(1, 2);
        match client.write(block * 4096, &data, fua).await {
            Ok(Ok(())) => {
                let mut l = ledger.lock().unwrap();
                for b in block..block + blocks {
                    let s = l.get_mut(&b).unwrap();
                    s.in_flight.retain(|x| *x != seq);
                    s.acked = Some(seq);
                }
            }
            // An error reply or a dead connection: not acknowledged.
            _ => return,
        }
        seq += 1;
    }
}

async fn verify(node_nbd: std::net::SocketAddr, ledger: &Ledger) -> usize {
    let client = NbdClient::connect(node_nbd, "t/v")
        .await
        .expect("reconnect after restart");
    let snapshot: Vec<(u64, BlockState)> = ledger
        .lock()
        .unwrap()
        .iter()
        .map(|(b, s)| (*b, s.clone()))
        .collect();
    let mut checked = 0;
    for (block, state) in snapshot {
        let got = client
            .read(block * 4096, 4096)
            .await
            .unwrap()
            .expect("read after restart");
        let mut allowed: Vec<u64> = state.in_flight.clone();
        allowed.extend(state.acked);
        let ok = allowed
            .iter()
            .any(|seq| got == block_content(block, *seq, 4096));
        let newest_allowed = allowed.iter().copied().max();
        assert!(
            ok || (state.acked.is_none() && got.iter().all(|b| *b == 0)),
            "block {block}: content matches none of acked {:?} / in flight {:?} (newest {newest_allowed:?})",
            state.acked,
            state.in_flight
        );
        checked += 1;
        // Whatever landed is now the truth for the next round.
        let mut l = ledger.lock().unwrap();
        let s = l.get_mut(&block).unwrap();
        if let Some(seq) = allowed
            .into_iter()
            .find(|seq| got == block_content(block, *seq, 4096))
        {
            s.acked = Some(seq);
        }
        s.in_flight.clear();
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = must_node_with_volume(dir.path(), &dir.path().join("data"), "", "64MiB");
    let ledger: Ledger = Arc::default();
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
        let acked = ledger
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.acked.is_some())
            .count();
        assert!(
            acked > 0,
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
