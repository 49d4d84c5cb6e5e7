//! Mints the HS256 tokens the server accepts (`sub`, `name`, `role`, `exp`), signed with the
//! server's `--jwt-secret`, so a run needs no other setup.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// Token lifetime: far longer than any run.
const TTL_SECS: u64 = 3600;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    name: &'a str,
    role: &'a str,
    exp: u64,
}

/// Signs tokens with one secret.
pub struct Minter {
    key: EncodingKey,
    header: Header,
    exp: u64,
}

impl Minter {
    pub fn new(secret: &str) -> anyhow::Result<Self> {
        if secret.len() < 16 {
            anyhow::bail!("--jwt-secret must be at least 16 bytes (as the server requires)");
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        Ok(Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::new(Algorithm::HS256),
            exp: now + TTL_SECS,
        })
    }

    /// A token for user `sub` (`[A-Za-z0-9_-]{1,64}`) with role `viewer`, `host` or `admin`.
    pub fn mint(&self, sub: &str, role: &str) -> anyhow::Result<String> {
        let claims = Claims {
            sub,
            name: sub,
            role,
            exp: self.exp,
        };
        Ok(jsonwebtoken::encode(&self.header, &claims, &self.key)?)
    }
}
