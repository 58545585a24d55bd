//! A flipped byte in a stored frame fails that read with EIO, is counted in
//! a metric, and leaves every other block readable.

use lifeboat_chaos_tests::nbd_client::NbdErrno;
use lifeboat_store::BlockNo;
use lifeboat_store::db::{Cf, Durability};
use lifeboat_store::keys;

use crate::{VOLUME, must_start, pseudo_random};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_frame_bytes_give_eio_and_everything_else_keeps_serving() {
    let node = must_start().await;
    let core = node.running().core.clone();
    let client = node.client().await;
    let data = pseudo_random(5, 16 * 4096);
    client.write(0, &data, true).await.unwrap().unwrap();

    let loc = core.locate_volume(VOLUME).unwrap();
    let (pg, volume) = (loc.group.pg(), loc.volume);
    let victim = BlockNo(3);
    let stored = core.volumes.latest_blocks(pg, volume, victim, 1).unwrap()[0]
        .clone()
        .unwrap();
    let key = keys::block_key(pg, volume, victim, stored.index);
    let frame = stored.value.clone();
    assert!(frame.len() > 60, "block 3 holds a frame");

    // Every region of the frame: header, salt, nonce, ciphertext, tag, CRC.
    let positions = [
        0,
        1,
        3,
        10,
        30,
        40,
        frame.len() / 2,
        frame.len() - 10,
        frame.len() - 1,
    ];
    for (n, pos) in positions.into_iter().enumerate() {
        let mut bad = frame.clone();
        bad[pos] ^= 0x40;
        let mut b = core.db.new_batch();
        b.put(Cf::Blocks, &key, &bad);
        core.db.write(b, Durability::Buffered).unwrap();

        let before = core.metrics.corrupt_frames.get();
        let r = client.read(3 * 4096, 4096).await.unwrap();
        assert_eq!(
            r,
            Err(NbdErrno::EIO),
            "flipped byte {pos} must fail the read"
        );
        // A read that covers the bad block among good ones fails too.
        assert_eq!(client.read(0, 8 * 4096).await.unwrap(), Err(NbdErrno::EIO));
        assert!(
            core.metrics.corrupt_frames.get() > before,
            "metric raised (round {n})"
        );
        // Other blocks, on this connection and a new one, still read back.
        assert_eq!(
            client.read(4 * 4096, 4096).await.unwrap().unwrap(),
            &data[4 * 4096..5 * 4096]
        );
        let other = node.client().await;
        assert_eq!(
            other.read(0, 3 * 4096).await.unwrap().unwrap(),
            &data[..3 * 4096]
        );
    }
    // A truncated frame is an error too, never a panic.
    let mut b = core.db.new_batch();
    b.put(Cf::Blocks, &key, &frame[..frame.len() / 3]);
    core.db.write(b, Durability::Buffered).unwrap();
    assert_eq!(
        client.read(3 * 4096, 4096).await.unwrap(),
        Err(NbdErrno::EIO)
    );

    // Rewriting the block heals it.
    client
        .write(3 * 4096, &data[3 * 4096..4 * 4096], true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(client.read(0, 16 * 4096).await.unwrap().unwrap(), data);

    // The log names the code and the location.
    let logs = crate::captured_logs();
    assert!(logs.contains("store.corrupt_frame"), "{logs}");
    assert!(
        logs.contains(&format!("volume={} block=3", volume.0)),
        "{logs}"
    );

    // The metric is exported.
    let text = core.metrics.render(&core, &node.running().nbd_stats);
    assert!(
        text.contains("lifeboat_store_corrupt_frames_total"),
        "{text}"
    );
    node.stop().await;
}
