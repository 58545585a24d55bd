//! NBD over TLS with real clients (qemu-io, qemu-img, nbdinfo): with
//! `tls_required = "always"` a plain client is refused; a tenant's client
//! certificate (signed by the cluster CA) gets that tenant's volumes only,
//! in LIST and on open.

use lifeboat_node::server;

use crate::{must_run, test_config};

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    lifeboat_chaos_tests::harness::must_have_tool(program);
    std::process::Command::new(program)
        .args(args)
        .output()
        .expect("run tool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_certificates_gate_nbd_over_tls_for_real_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.nbd.tls_required = lifeboat_node::config::NbdTlsRequired::Always;
    let node = server::start(config).await.unwrap();
    let core = node.core.clone();
    core.cluster_init("primary").await.unwrap();
    for (tenant, volume) in [("demo", "demo/disk0"), ("other", "other/secret")] {
        core.create_tenant(tenant).await.unwrap();
        core.create_volume(volume, 4 << 20, "").await.unwrap();
    }
    // What `lifeboat tenant cert create demo --out DIR` writes.
    let certs = dir.path().join("demo-certs");
    std::fs::create_dir_all(&certs).unwrap();
    let (key, csr) = lifeboat_node::pki::new_key_and_csr("demo").unwrap();
    let (cert, ca) = core.create_tenant_cert("demo", &csr).unwrap();
    std::fs::write(certs.join("client-key.pem"), key).unwrap();
    std::fs::write(certs.join("client-cert.pem"), cert).unwrap();
    std::fs::write(certs.join("ca-cert.pem"), ca).unwrap();
    let e = core.create_tenant_cert("nobody", &csr).unwrap_err();
    assert!(e.to_string().contains("nobody"), "{e}");

    let port = node.nbd_addr.port();
    let certs = certs.to_str().unwrap().to_owned();
    blocking(move || {
        // Plain NBD is refused where TLS is required.
        let plain = run("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}")]);
        assert!(!plain.status.success(), "plain LIST refused: {plain:?}");
        let plain = run(
            "qemu-img",
            &["info", &format!("nbd://127.0.0.1:{port}/demo/disk0")],
        );
        assert!(!plain.status.success(), "plain open refused: {plain:?}");

        // LIST over TLS shows the tenant's volumes only.
        let tls_uri = format!("nbds://127.0.0.1:{port}/?tls-certificates={certs}");
        let listed = must_run("nbdinfo", &["--list", &tls_uri]);
        assert!(listed.contains("demo/disk0"), "{listed}");
        assert!(!listed.contains("other/secret"), "{listed}");

        // qemu writes and reads back through TLS.
        let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={certs}");
        let image = |export: &str| {
            format!("driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0")
        };
        let out = must_run(
            "qemu-io",
            &[
                "--object",
                &object,
                "--image-opts",
                &image("demo/disk0"),
                "-c",
                "write -P 0xab 4096 65536",
                "-c",
                "read -P 0xab 4096 65536",
                "-c",
                "read -P 0 0 4096",
            ],
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
        let info = must_run(
            "qemu-img",
            &[
                "info",
                "--object",
                &object,
                "--image-opts",
                &image("demo/disk0"),
            ],
        );
        assert!(info.contains("4 MiB"), "{info}");
        // Another tenant's volume does not exist for this certificate.
        let other = run(
            "qemu-img",
            &[
                "info",
                "--object",
                &object,
                "--image-opts",
                &image("other/secret"),
            ],
        );
        assert!(!other.status.success(), "{other:?}");
        let err = String::from_utf8_lossy(&other.stderr);
        assert!(err.contains("other/secret"), "{err}");
    })
    .await;
    node.stop().await;
}
