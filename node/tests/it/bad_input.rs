//! Bad NBD input against the real node: each gets the protocol's error or a
//! clean disconnect, and other clients are unaffected.

use std::time::Duration;

use lifeboat_chaos_tests::nbd_client::{CMD_READ, CMD_WRITE, NbdClient, NbdErrno};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::{VOLUME_BYTES, must_start, pseudo_random};

const STEP: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_and_clean_disconnects() {
    let node = must_start().await;
    let good = node.client().await;
    let data = pseudo_random(3, 8192);
    good.write(0, &data, false).await.unwrap().unwrap();

    // A missing export is refused during the handshake.
    let missing = timeout(STEP, NbdClient::connect(node.nbd(), "demo/nope"))
        .await
        .unwrap();
    assert!(missing.is_err(), "missing export must be refused");
    let bad_name = timeout(STEP, NbdClient::connect(node.nbd(), "../../etc"))
        .await
        .unwrap();
    assert!(bad_name.is_err());

    // Garbage instead of a handshake: the server hangs up.
    let mut raw = TcpStream::connect(node.nbd()).await.unwrap();
    let mut greeting = [0u8; 18];
    raw.read_exact(&mut greeting).await.unwrap();
    raw.write_all(&[0xde; 64]).await.unwrap();
    let mut rest = Vec::new();
    // The server must hang up (EOF or reset), not wait for more.
    match timeout(STEP, raw.read_to_end(&mut rest))
        .await
        .expect("server closes a garbage handshake")
    {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }

    // Past the end: reads EINVAL, writes ENOSPC.
    let end = VOLUME_BYTES;
    assert_eq!(
        good.read(end - 512, 1024).await.unwrap(),
        Err(NbdErrno::EINVAL)
    );
    assert_eq!(
        good.write(end - 512, &[1u8; 1024], false).await.unwrap(),
        Err(NbdErrno::ENOSPC)
    );
    assert_eq!(good.read(end, 512).await.unwrap(), Err(NbdErrno::EINVAL));

    // A request over 32 MiB: an error reply for a read.
    let big = good
        .request(CMD_READ, 0, 0, (32 << 20) + 4096, None)
        .await
        .unwrap();
    assert_eq!(big, Err(NbdErrno::EINVAL));

    // A client that vanishes mid-request (half a WRITE payload).
    let mut vanisher = NbdClient::connect(node.nbd(), crate::VOLUME).await.unwrap();
    let half = vec![7u8; 2048];
    let _ = timeout(
        Duration::from_millis(200),
        vanisher.request(CMD_WRITE, 0, 0, 4096, Some(&half)),
    )
    .await;
    drop(vanisher);
    vanisher = NbdClient::connect(node.nbd(), crate::VOLUME).await.unwrap();
    drop(vanisher);

    // The first connection is still fine and nothing changed.
    assert_eq!(good.read(0, 8192).await.unwrap().unwrap(), data);
    let fresh = node.client().await;
    assert_eq!(fresh.read(0, 8192).await.unwrap().unwrap(), data);
    node.stop().await;
}
