//! The S3 gateway of every node, on the `s3s` crate: SigV4 (headers and
//! presigned URLs) against the tenants' credentials, path-style and
//! virtual-host-style addressing, and the operations in [`gateway`] and
//! [`multipart`] over the object data path in [`objects`]. Errors map to
//! S3 codes in one place, [`errors`].

pub mod errors;
pub mod gateway;
pub mod multipart;
pub mod objects;
pub mod sweep;

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use s3s::auth::{S3Auth, SecretKey};
use s3s::host::{S3Host, VirtualHost};
use s3s::service::S3ServiceBuilder;
use s3s::{S3Result, s3_error};
use tokio::net::TcpListener;

use crate::core::NodeCore;
use crate::server::Shutdown;

/// Checks signatures against the credentials in the catalog (secrets
/// opened with the master key, never stored in clear).
struct CatalogAuth(Arc<NodeCore>);

#[async_trait::async_trait]
impl S3Auth for CatalogAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        let mut found = self.0.credential(access_key).map_err(errors::from_node)?;
        if found.is_none()
            && let Ok(catalog) = self.0.catalog_group()
            && catalog.read_barrier().await.is_ok()
        {
            // A credential just created through another node may not be
            // applied here yet: look again at a linearizable point.
            found = self.0.credential(access_key).map_err(errors::from_node)?;
        }
        match found {
            Some((_, secret)) => Ok(SecretKey::from(secret)),
            None => Err(s3_error!(
                InvalidAccessKeyId,
                "the access key does not exist or was revoked"
            )),
        }
    }
}

/// Virtual-host-style addressing under the configured domains
/// (`BUCKET.DOMAIN[:PORT]`); any other host is path-style.
struct Domains(Vec<String>);

impl S3Host for Domains {
    fn parse_host_header<'a>(&'a self, host: &'a str) -> S3Result<VirtualHost<'a>> {
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        };
        for domain in &self.0 {
            if let Some(bucket) = name
                .strip_suffix(domain.as_str())
                .and_then(|rest| rest.strip_suffix('.'))
                .filter(|b| !b.is_empty())
            {
                return Ok(VirtualHost::new(domain.as_str()).with_bucket(bucket));
            }
        }
        Ok(VirtualHost::new(name))
    }
}

/// Whether a request asked for `100 Continue` and, if so, whether its
/// body is empty.
///
/// The answer to such a request closes the connection when the body is
/// empty (hyper answers without a `100 Continue`, correctly, as it never
/// needs the body) or the answer is an error (which may come before the
/// body was asked for). Either way the client may not have sent its body,
/// and the connection cannot carry another request: the server could take
/// the next request's bytes for the unsent body, and botocore (aws-cli,
/// boto3) keeps the early-answer state on a reused connection and misreads
/// the next response. RFC 9110 §10.1.1 lets a server close here; S3 does.
fn expects_continue<B>(req: &hyper::Request<B>) -> Option<bool> {
    let expects = req
        .headers()
        .get(hyper::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let empty = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() == b"0");
    expects.then_some(empty)
}

const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves S3 on `listener` until `shutdown`; connections in progress are
/// told to finish their current request and close.
pub async fn serve(
    listener: TcpListener,
    core: Arc<NodeCore>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: Shutdown,
) {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut builder = S3ServiceBuilder::new(gateway::Gateway::new(core.clone()));
    builder.set_auth(CatalogAuth(core.clone()));
    builder.set_host(Domains(core.config.s3.domains.clone()));
    let service = builder.build();
    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "S3 accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // hyper writes a response's head and its body separately: with
        // Nagle's algorithm on, a small body waits for the client's delayed
        // ACK of the head (~40 ms on Linux).
        if let Err(e) = socket.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "S3: TCP_NODELAY not set");
        }
        let service = service.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(socket, service, shutdown).await,
                Some(acceptor) => {
                    let handshake = acceptor.accept(socket);
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => serve_connection(stream, service, shutdown).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "S3 TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "S3 TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Serves one client connection (plain or TLS) until it closes, or until
/// `shutdown`, after its current request.
async fn serve_connection<I>(io: I, service: s3s::service::S3Service, shutdown: Shutdown)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let expects = expects_continue(&req);
        let response = hyper::service::Service::call(&service, req);
        async move {
            let mut response = response.await?;
            let close = expects.is_some_and(|empty| empty || !response.status().is_success());
            if close {
                response.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, s3s::HttpError>(response)
        }
    });
    let served =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
    let result = tokio::select! {
        r = served.as_mut() => r,
        _ = shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "S3 connection ended with an error");
    }
}
