//! An S3 client of the AWS SDK for Rust for one endpoint and credential:
//! path-style (Lifeboat and s3s-fs on 127.0.0.1), HTTP or HTTPS with rustls
//! on ring, the SDK's default checksums on.

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region};

pub fn client(endpoint: &str, access_key: &str, secret: &str) -> Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_sdk_s3::Config::builder()
        .behavior_version_latest()
        .http_client(http)
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(access_key, secret, None, None, "lifeboat"))
        .build();
    Client::from_conf(config)
}
