//! `lifeboat up`: starts a node, writes up.env, serves demo/disk0; Ctrl-C
//! stops it cleanly and a second `up` resumes with the data intact.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lifeboat_chaos_tests::harness::lifeboat_bin;
use lifeboat_chaos_tests::nbd_client::NbdClient;

fn start_up(dir: &std::path::Path, port_offset: u16) -> Child {
    Command::new(lifeboat_bin())
        .args([
            "up",
            "--heartbeat-ms",
            "50",
            "--port-offset",
            &port_offset.to_string(),
            "--data-dir",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn wait_env(
    dir: &std::path::Path,
    up: &mut Child,
    pid_before: Option<&str>,
) -> HashMap<String, String> {
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(dir.join("up.env")) {
            let env: HashMap<String, String> = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            if env.get("PID_0").map(String::as_str) != pid_before && env.contains_key("NBD_URI") {
                return env;
            }
        }
        if up.try_wait().unwrap().is_some() {
            panic!("lifeboat up exited early; {}", node_logs(dir));
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "up.env not written"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last lines of every node's log under `dir` (they go with the
/// temporary directory when the test fails).
fn node_logs(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir.join("nodes"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let log = std::fs::read_to_string(entry.path().join("node.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        out.push_str(&format!(
            "\n--- {}:\n{}",
            entry.path().display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        ));
    }
    out
}

fn interrupt_and_wait(up: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(up.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = up.try_wait().unwrap() {
            assert!(status.success(), "lifeboat up exits 0 on Ctrl-C: {status}");
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "lifeboat up did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A port offset away from `make run`'s defaults, from the harness's
/// ports (below 24000) and from the kernel's ephemeral range (32768 and
/// up, where an outgoing connection can hold a port while `up` starts):
/// `up`'s ports, 7700 to 10812 plus the offset, stay in 24700..32768.
fn up_port_offset() -> u16 {
    17_000 + (std::process::id() % 4_000) as u16
}

fn pid_alive(pid: &str) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_demo_disk_and_resumes_after_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let offset = up_port_offset();
    let mut up = start_up(dir.path(), offset);
    let env = wait_env(dir.path(), &mut up, None);
    for key in [
        "LIFEBOAT_ENDPOINT",
        "LIFEBOAT_TOKEN",
        "NBD_URI",
        "SITE_0",
        "ROLE_0",
        "PID_0",
        "LIFEBOAT_ENDPOINT_0",
        "NBD_URI_0",
    ] {
        assert!(env.contains_key(key), "up.env lacks {key}: {env:?}");
    }
    assert_eq!(env["ROLE_0"], "data");
    // Three primary and two DR nodes, then the witness, last.
    assert_eq!(env["ROLE_5"], "witness");
    assert_eq!(env["SITE_5"], "witness");
    assert!(
        !env.contains_key("NBD_URI_5") && !env.contains_key("ROLE_6"),
        "the witness is last and serves no volumes: {env:?}"
    );
    assert!(
        env["NBD_URI"].ends_with("/demo/disk0"),
        "{}",
        env["NBD_URI"]
    );
    assert!(dir.path().join("keys/master.key").exists());
    assert!(
        !dir.path().join("nodes/0/keys").exists(),
        "master key outside the node's data dir"
    );

    // The CLI with the written credentials sees the demo volume.
    let list = Command::new(lifeboat_bin())
        .args(["volume", "list", "--output", "json"])
        .env("LIFEBOAT_ENDPOINT", &env["LIFEBOAT_ENDPOINT"])
        .env("LIFEBOAT_TOKEN", &env["LIFEBOAT_TOKEN"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success(), "{text}");
    assert!(
        text.contains("\"demo/disk0\"") && text.contains("1073741824"),
        "{text}"
    );

    let addr: std::net::SocketAddr = env["NBD_URI"]
        .trim_start_matches("nbd://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    let client = NbdClient::connect(addr, "demo/disk0").await.unwrap();
    client.write(7 << 20, &data, false).await.unwrap().unwrap();
    drop(client);

    let pid = env["PID_0"].clone();
    interrupt_and_wait(&mut up);
    assert!(!pid_alive(&pid), "the node process stopped with up");

    let mut up = start_up(dir.path(), offset);
    let env2 = wait_env(dir.path(), &mut up, Some(&pid));
    assert_eq!(
        env2["LIFEBOAT_TOKEN"], env["LIFEBOAT_TOKEN"],
        "same cluster, same token"
    );
    let client = NbdClient::connect(addr, "demo/disk0").await.unwrap();
    assert_eq!(
        client
            .read(7 << 20, data.len() as u32)
            .await
            .unwrap()
            .unwrap(),
        data
    );
    drop(client);
    interrupt_and_wait(&mut up);
}
