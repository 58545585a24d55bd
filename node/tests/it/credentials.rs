//! S3 credentials through the admin API: created with a mode, the secret
//! shown once and stored only sealed (nothing in the data directory holds
//! it in clear), listed without secrets, revoked; refusals with clear codes.

use lifeboat_node::core::CredentialMode;
use lifeboat_proto::admin as api;
use lifeboat_proto::admin::admin_client::AdminClient;
use tonic::Code;

use crate::confidentiality::files_containing;
use crate::{must_start, with_token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_created_sealed_listed_and_revoked() {
    let node = must_start().await;
    let endpoint = format!("http://{}", node.running().admin_addr);
    let mut c = AdminClient::connect(endpoint).await.unwrap();
    let t = node.token.clone();
    let create = |tenant: &str, mode: &str, prefix: Option<&str>| {
        with_token(
            api::CreateCredentialRequest {
                tenant: tenant.into(),
                mode: mode.into(),
                writable_prefix: prefix.map(str::to_owned),
            },
            &t,
        )
    };

    let full = c
        .create_credential(create("demo", "", None))
        .await
        .unwrap()
        .into_inner();
    let cred = full.credential.clone().unwrap();
    assert_eq!((cred.tenant.as_str(), cred.mode.as_str()), ("demo", "full"));
    assert_eq!(cred.access_key.len(), 20, "{cred:?}");
    assert!(cred.access_key.starts_with("LB"));
    assert_eq!(full.secret_key.len(), 40);
    let restic = c
        .create_credential(create("demo", "append-only", None))
        .await
        .unwrap()
        .into_inner()
        .credential
        .unwrap();
    assert_eq!(
        (restic.mode.as_str(), restic.writable_prefix.as_str()),
        ("append-only", "locks/")
    );
    let custom = c
        .create_credential(create("demo", "append-only", Some("leases/")))
        .await
        .unwrap()
        .into_inner()
        .credential
        .unwrap();
    assert_eq!(custom.writable_prefix, "leases/");
    let reader = c
        .create_credential(create("demo", "read-only", None))
        .await
        .unwrap()
        .into_inner()
        .credential
        .unwrap();
    assert_eq!(reader.mode, "read-only");

    // The node opens the sealed secret for signature checks; the catalog
    // and every file of the data directory hold it only sealed.
    let (info, secret) = node
        .running()
        .core
        .credential(&cred.access_key)
        .unwrap()
        .unwrap();
    assert_eq!(secret, full.secret_key);
    assert_eq!(info.mode, CredentialMode::Full);
    let record = node
        .running()
        .core
        .catalog
        .credential(&cred.access_key)
        .unwrap()
        .unwrap();
    assert!(!record.secret_sealed.is_empty());
    assert!(
        !record
            .secret_sealed
            .windows(40)
            .any(|w| w == full.secret_key.as_bytes()),
        "the catalog holds the secret in clear"
    );
    let leaks = files_containing(&node.data_dir(), full.secret_key.as_bytes());
    assert!(leaks.is_empty(), "secret in clear in {leaks:?}");
    // The scan does see what is stored in clear: the access key.
    assert!(!files_containing(&node.data_dir(), cred.access_key.as_bytes()).is_empty());

    // Listing never shows a secret.
    let listed = c
        .list_credentials(with_token(
            api::ListCredentialsRequest {
                tenant: "demo".into(),
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner()
        .credentials;
    let mut keys: Vec<&str> = listed.iter().map(|c| c.access_key.as_str()).collect();
    keys.sort();
    let mut expected = [
        cred.access_key.as_str(),
        restic.access_key.as_str(),
        custom.access_key.as_str(),
        reader.access_key.as_str(),
    ];
    expected.sort();
    assert_eq!(keys, expected);

    for (tenant, mode, prefix, code) in [
        ("nobody", "full", None, Code::NotFound),
        ("demo", "admin", None, Code::InvalidArgument),
        ("demo", "read-only", Some("x/"), Code::InvalidArgument),
    ] {
        let e = c
            .create_credential(create(tenant, mode, prefix))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{tenant} {mode} {prefix:?}: {e:?}");
        assert!(!e.message().is_empty());
    }
    let e = c
        .create_credential(api::CreateCredentialRequest {
            tenant: "demo".into(),
            mode: String::new(),
            writable_prefix: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let revoke = |access_key: &str| {
        with_token(
            api::RevokeCredentialRequest {
                access_key: access_key.into(),
            },
            &t,
        )
    };
    c.revoke_credential(revoke(&cred.access_key)).await.unwrap();
    assert!(
        node.running()
            .core
            .credential(&cred.access_key)
            .unwrap()
            .is_none()
    );
    let e = c
        .revoke_credential(revoke(&cred.access_key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .revoke_credential(revoke("LBNOSUCHKEY234567ABC"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    node.stop().await;
}
