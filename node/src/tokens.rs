//! Admin tokens of tenants (role `tenant:NAME`) and drill teams (role
//! `drill`): created and revoked by an operator, stored as SHA-256 hashes in the catalog, named by an id that
//! is the first [`TOKEN_ID_HEX`] hex digits of that hash.

use lifeboat_proto::raft as pb;

use crate::core::{NodeCore, random_hex, sha256};
use crate::error::{NodeError, NodeResult};

/// Hex digits of a token's SHA-256 that name it.
pub const TOKEN_ID_HEX: usize = 12;

/// A token as the admin API reports it (never the token itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub role: String,
    pub created_ms: u64,
}

impl NodeCore {
    /// Creates a token for `tenant` and returns it with its info; the
    /// token is shown this once.
    pub async fn create_tenant_token(&self, tenant: &str) -> NodeResult<(String, TokenInfo)> {
        self.tenant(tenant)?;
        self.create_token(format!("tenant:{tenant}")).await
    }

    /// Creates a drill token (role `drill`: it starts, lists, reports and
    /// stops drills, and nothing else).
    pub async fn create_drill_token(&self) -> NodeResult<(String, TokenInfo)> {
        self.create_token("drill".to_owned()).await
    }

    async fn create_token(&self, role: String) -> NodeResult<(String, TokenInfo)> {
        let token = format!("lbt_{}", random_hex(32));
        let digest = sha256(token.as_bytes());
        self.propose_catalog(pb::command::Kind::CreateToken(pb::CreateToken {
            token_sha256: digest.clone().into(),
            role: role.clone(),
        }))
        .await?;
        let id = hex::encode(&digest)[..TOKEN_ID_HEX].to_owned();
        let created_ms = self
            .catalog
            .token(&digest)
            .map_err(NodeError::io("read catalog"))?
            .map_or(0, |r| r.created_ms);
        tracing::info!(role, id, "token created");
        Ok((
            token,
            TokenInfo {
                id,
                role,
                created_ms,
            },
        ))
    }

    /// Every token, or those of `tenant`.
    pub fn list_tokens(&self, tenant: Option<&str>) -> NodeResult<Vec<TokenInfo>> {
        let wanted = tenant.map(|t| format!("tenant:{t}"));
        Ok(self
            .catalog
            .tokens()
            .map_err(NodeError::io("read catalog"))?
            .into_iter()
            .filter(|(_, r)| wanted.as_ref().is_none_or(|w| *w == r.role))
            .map(|(sha, r)| TokenInfo {
                id: sha[..TOKEN_ID_HEX.min(sha.len())].to_owned(),
                role: r.role,
                created_ms: r.created_ms,
            })
            .collect())
    }

    /// Revokes the tenant or drill token named `id`: later requests with
    /// it are unauthenticated. Operator tokens are not revoked this way, so
    /// an operator cannot lock everyone out by mistake.
    pub async fn revoke_tenant_token(&self, id: &str) -> NodeResult<TokenInfo> {
        let not_found = || NodeError::TokenNotFound(id.to_owned());
        if id.len() != TOKEN_ID_HEX {
            return Err(not_found());
        }
        let (sha, record) = self
            .catalog
            .tokens()
            .map_err(NodeError::io("read catalog"))?
            .into_iter()
            .find(|(sha, r)| {
                sha.starts_with(id) && (r.role.starts_with("tenant:") || r.role == "drill")
            })
            .ok_or_else(not_found)?;
        let digest = hex::decode(&sha).map_err(|e| NodeError::Io {
            op: "read catalog".into(),
            source: std::io::Error::other(format!("token key is not hex: {e}")),
        })?;
        self.propose_catalog(pb::command::Kind::RevokeToken(pb::RevokeToken {
            token_sha256: digest.into(),
        }))
        .await?;
        tracing::info!(id, role = record.role, "token revoked");
        Ok(TokenInfo {
            id: id.to_owned(),
            role: record.role,
            created_ms: record.created_ms,
        })
    }
}
