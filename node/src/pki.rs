//! The cluster's certificates (DESIGN.md "Security"): `cluster init` makes a
//! cluster CA whose private key lives in the catalog sealed by the master
//! key; it issues
//! - a node certificate to every node (at init, or when it joins with a
//!   one-time token), used both ways on the Raft port (mutual TLS) and as
//!   the NBD server's certificate;
//! - tenant client certificates (`lifeboat tenant cert create`) for NBD over
//!   TLS.
//!
//! The role of a certificate is its subject's organization: a tenant
//! certificate can never pass for a node on the Raft port.
//!
//! Private keys are made where they are used: a joining node and a tenant's
//! CLI send a certificate signing request and get back only a certificate.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::error::{NodeError, NodeResult};

/// The DNS name in every node certificate, which peers verify: nodes are
/// dialled by address (possibly through NAT or a relay), so the name says
/// "a node of this cluster", and the CA says which cluster.
pub const NODE_SERVER_NAME: &str = "lifeboat-node";

/// Subject organization of node certificates.
const NODE_ORG: &str = "lifeboat node";
/// Subject organization of tenant client certificates.
const TENANT_ORG: &str = "lifeboat tenant";

/// Validity of issued certificates. Rotation is an operator action for now.
const CERT_DAYS: i64 = 3650;

fn pki_err(what: &str) -> impl FnOnce(rcgen::Error) -> NodeError + '_ {
    move |e| NodeError::Pki {
        reason: format!("{what}: {e}"),
    }
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that are behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(CERT_DAYS);
}

/// The cluster CA: certificate and private key (held in memory only while
/// issuing).
pub struct ClusterCa {
    cert_pem: String,
    key: KeyPair,
}

impl ClusterCa {
    pub fn generate(cluster_id: &str) -> NodeResult<ClusterCa> {
        let key = KeyPair::generate().map_err(pki_err("generate CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("Lifeboat cluster {cluster_id} CA"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params);
        let cert = params.self_signed(&key).map_err(pki_err("self-sign CA"))?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key,
        })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> NodeResult<ClusterCa> {
        Ok(ClusterCa {
            cert_pem: cert_pem.to_owned(),
            key: KeyPair::from_pem(key_pem).map_err(pki_err("read CA key"))?,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Signs a node's request: whatever the request asks for, the
    /// certificate says `node-ID` of organization "lifeboat node", names
    /// [`NODE_SERVER_NAME`], `localhost` and `ips`, and serves both ways.
    pub fn sign_node(&self, csr_pem: &str, node_id: u64, ips: &[IpAddr]) -> NodeResult<String> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("node-{node_id}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, NODE_ORG);
        params.subject_alt_names = vec![
            SanType::DnsName(NODE_SERVER_NAME.try_into().expect("valid DNS name")),
            SanType::DnsName("localhost".try_into().expect("valid DNS name")),
        ];
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(csr_pem, params)
    }

    /// Signs a tenant's request: a client certificate for `tenant` only.
    pub fn sign_tenant(&self, csr_pem: &str, tenant: &str) -> NodeResult<String> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, tenant);
        params
            .distinguished_name
            .push(DnType::OrganizationName, TENANT_ORG);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(csr_pem, params)
    }

    fn sign(&self, csr_pem: &str, mut params: CertificateParams) -> NodeResult<String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            NodeError::InvalidName {
                what: "certificate signing request",
                name: String::new(),
                reason: e.to_string(),
            }
        })?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        // Only the requester's public key is taken from the request.
        csr.params = params;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .map_err(pki_err("read CA certificate"))?;
        Ok(csr.signed_by(&issuer).map_err(pki_err("sign"))?.pem())
    }
}

/// A new private key and a signing request for it, as PEM.
pub fn new_key_and_csr(common_name: &str) -> NodeResult<(String, String)> {
    let key = KeyPair::generate().map_err(pki_err("generate key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let csr = params
        .serialize_request(&key)
        .map_err(pki_err("make signing request"))?;
    Ok((
        key.serialize_pem(),
        csr.pem().map_err(pki_err("encode signing request"))?,
    ))
}

/// SHA-256 of the public key (SubjectPublicKeyInfo DER) a signing request
/// asks a certificate for.
pub fn csr_key_sha256(csr_pem: &str) -> NodeResult<Vec<u8>> {
    use rcgen::PublicKeyData;
    let csr =
        CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| NodeError::InvalidName {
            what: "certificate signing request",
            name: String::new(),
            reason: e.to_string(),
        })?;
    Ok(Sha256::digest(csr.public_key.subject_public_key_info()).to_vec())
}

/// SHA-256 of the public key (SubjectPublicKeyInfo DER) a PEM certificate
/// is for: equal to [`csr_key_sha256`] of the request it was signed from.
pub fn cert_key_sha256(cert_pem: &str) -> NodeResult<Vec<u8>> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| NodeError::Pki {
        reason: format!("read certificate: {e}"),
    })?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| NodeError::Pki {
            reason: format!("parse certificate: {e}"),
        })?;
    Ok(Sha256::digest(cert.public_key().raw).to_vec())
}

/// SHA-256 of a PEM certificate's DER, hex: what a join token pins.
pub fn fingerprint(cert_pem: &str) -> NodeResult<String> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| NodeError::Pki {
        reason: format!("read certificate: {e}"),
    })?;
    Ok(hex::encode(Sha256::digest(der.as_ref())))
}

/// What a certificate issued by the cluster CA is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertRole {
    Node(String),
    Tenant(String),
}

/// The role of a certificate, from its subject (organization and common
/// name). Only meaningful once the chain to the CA is verified.
pub fn cert_role(der: &[u8]) -> Option<CertRole> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let org = subject.iter_organization().next()?.as_str().ok()?;
    let cn = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    match org {
        NODE_ORG => Some(CertRole::Node(cn)),
        TENANT_ORG => Some(CertRole::Tenant(cn)),
        _ => None,
    }
}

/// This node's TLS material, in `DATA_DIR/tls/` (the key mode 0600).
#[derive(Clone, Debug)]
pub struct NodeTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl NodeTls {
    pub fn dir(data_dir: &Path) -> PathBuf {
        data_dir.join("tls")
    }

    /// The material saved in `data_dir`, if this node has been certified.
    pub fn load(data_dir: &Path) -> NodeResult<Option<NodeTls>> {
        let dir = NodeTls::dir(data_dir);
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(NodeError::io(format!("read {}", dir.join(name).display())))
        };
        if !dir.join("node.key").exists() {
            return Ok(None);
        }
        Ok(Some(NodeTls {
            ca_pem: read("ca.crt")?,
            cert_pem: read("node.crt")?,
            key_pem: read("node.key")?,
        }))
    }

    /// Writes the files (key last, each fsynced and renamed into place), so
    /// that a crash leaves either no key or a complete set.
    pub fn save(&self, data_dir: &Path) -> NodeResult<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = NodeTls::dir(data_dir);
        std::fs::create_dir_all(&dir)
            .map_err(NodeError::io(format!("create {}", dir.display())))?;
        for (name, text, mode) in [
            ("ca.crt", &self.ca_pem, 0o644),
            ("node.crt", &self.cert_pem, 0o644),
            ("node.key", &self.key_pem, 0o600),
        ] {
            let tmp = dir.join(format!("{name}.tmp"));
            let io = NodeError::io(format!("write {}", tmp.display()));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(NodeError::io(format!("write {}", tmp.display())))?;
            std::fs::rename(&tmp, dir.join(name))
                .map_err(NodeError::io(format!("rename {}", tmp.display())))?;
        }
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(NodeError::io(format!("sync {}", dir.display())))
    }

    fn certs(&self) -> NodeResult<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let bad = |what: &str, e: rustls::pki_types::pem::Error| NodeError::Pki {
            reason: format!("read {what}: {e}"),
        };
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("node certificate", e))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| bad("node key", e))?;
        Ok((certs, key))
    }

    fn roots(&self) -> NodeResult<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let ca = ca.map_err(|e| NodeError::Pki {
                reason: format!("read CA certificate: {e}"),
            })?;
            roots.add(ca).map_err(|e| NodeError::Pki {
                reason: format!("use CA certificate: {e}"),
            })?;
        }
        Ok(Arc::new(roots))
    }

    /// The Raft port's TLS: this node's certificate, and only clients with
    /// a node certificate of this cluster's CA; anything else fails the
    /// handshake, before a byte of gRPC is read.
    pub fn raft_server_config(&self) -> NodeResult<Arc<rustls::ServerConfig>> {
        self.server_config(PeerRule::Node, true, vec![b"h2".to_vec()])
    }

    /// NBD's TLS: this node's certificate, and a tenant certificate of this
    /// cluster's CA (its tenant is read after the handshake).
    pub fn nbd_server_config(&self) -> NodeResult<Arc<rustls::ServerConfig>> {
        self.server_config(PeerRule::Tenant, true, Vec::new())
    }

    fn server_config(
        &self,
        rule: PeerRule,
        mandatory: bool,
        alpn: Vec<Vec<u8>>,
    ) -> NodeResult<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(|e| NodeError::Pki {
                reason: format!("client verifier: {e}"),
            })?;
        let verifier = Arc::new(RoleVerifier {
            inner,
            rule,
            mandatory,
        });
        let (certs, key) = self.certs()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| NodeError::Pki {
                reason: format!("TLS versions: {e}"),
            })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| NodeError::Pki {
                reason: format!("node certificate: {e}"),
            })?;
        config.alpn_protocols = alpn;
        Ok(Arc::new(config))
    }

    /// Client TLS for dialling peers' Raft ports.
    pub fn raft_client_config(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .domain_name(NODE_SERVER_NAME)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerRule {
    Node,
    Tenant,
}

/// The CA's verdict, then the certificate's role.
#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    rule: PeerRule,
    mandatory: bool,
}

impl ClientCertVerifier for RoleVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let ok = matches!(
            (self.rule, cert_role(end_entity)),
            (PeerRule::Node, Some(CertRole::Node(_)))
                | (PeerRule::Tenant, Some(CertRole::Tenant(_)))
        );
        if !ok {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A TLS server config for a public endpoint (S3 over HTTPS): the
/// operator's certificate chain and key from PEM files, no client
/// certificates (S3 clients authenticate by signature).
pub fn public_server_config(
    cert_file: &Path,
    key_file: &Path,
) -> NodeResult<Arc<rustls::ServerConfig>> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(NodeError::io(format!("read {}", path.display())))
    };
    let bad = |path: &Path, e: rustls::pki_types::pem::Error| NodeError::Pki {
        reason: format!("read {}: {e}", path.display()),
    };
    let certs = CertificateDer::pem_slice_iter(&read(cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert_file, e))?;
    let key = PrivateKeyDer::from_pem_slice(&read(key_file)?).map_err(|e| bad(key_file, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| NodeError::Pki {
            reason: format!("TLS versions: {e}"),
        })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| NodeError::Pki {
            reason: format!("certificate {}: {e}", cert_file.display()),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_and_tenant_certificates_carry_their_role_and_verify_against_the_ca() {
        let ca = ClusterCa::generate("c1").unwrap();
        let (node_key, node_csr) = new_key_and_csr("anything").unwrap();
        let node_cert = ca
            .sign_node(&node_csr, 7, &["127.0.0.1".parse().unwrap()])
            .unwrap();
        let (_, tenant_csr) = new_key_and_csr("finance").unwrap();
        let tenant_cert = ca.sign_tenant(&tenant_csr, "finance").unwrap();
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(
            cert_role(&der(&node_cert)),
            Some(CertRole::Node("node-7".into()))
        );
        assert_eq!(
            cert_role(&der(&tenant_cert)),
            Some(CertRole::Tenant("finance".into()))
        );
        // The CA key survives a round trip through PEM and still signs.
        let again = ClusterCa::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert!(again.sign_tenant(&tenant_csr, "finance").is_ok());
        assert_eq!(fingerprint(ca.cert_pem()).unwrap().len(), 64);
        assert!(ca.sign_node("not a csr", 1, &[]).is_err());
        // A certificate names the key of the request it was signed from,
        // and no other.
        assert_eq!(
            cert_key_sha256(&node_cert).unwrap(),
            csr_key_sha256(&node_csr).unwrap()
        );
        assert_ne!(
            cert_key_sha256(&node_cert).unwrap(),
            csr_key_sha256(&tenant_csr).unwrap()
        );

        // The Raft verifier takes the node certificate and refuses the
        // tenant's and one from another CA.
        let tls = NodeTls {
            ca_pem: ca.cert_pem().into(),
            cert_pem: node_cert.clone(),
            key_pem: node_key,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = WebPkiClientVerifier::builder_with_provider(tls.roots().unwrap(), provider)
            .build()
            .unwrap();
        let raft = RoleVerifier {
            inner,
            rule: PeerRule::Node,
            mandatory: true,
        };
        let now = UnixTime::now();
        assert!(raft.verify_client_cert(&der(&node_cert), &[], now).is_ok());
        assert!(
            raft.verify_client_cert(&der(&tenant_cert), &[], now)
                .is_err()
        );
        let other = ClusterCa::generate("c2").unwrap();
        let (_, csr) = new_key_and_csr("x").unwrap();
        let foreign = other.sign_node(&csr, 7, &[]).unwrap();
        assert!(raft.verify_client_cert(&der(&foreign), &[], now).is_err());
        assert!(tls.raft_server_config().is_ok());
        assert!(tls.nbd_server_config().is_ok());
    }
}
