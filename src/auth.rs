//! Who is calling: HS256 JWT verification and issuing. A token carries `sub` (user id),
//! `name`, `role` and `exp`; only HS256 is accepted, so `alg: none` and algorithm-confusion
//! tokens are refused before any claim is read.

use crate::hashing::FastDashMap;
use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::AppError;
use crate::model::User;
use crate::protocol::is_valid_id;

/// What a caller may do. Ordered: an admin can do what a host can, a host what a viewer can.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Guest,
    Viewer,
    Host,
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "host" => Ok(Role::Host),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?} (viewer, host or admin)")),
        }
    }
}

/// The JWT claims livedrop reads and writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub name: String,
    pub role: Role,
    pub exp: u64,
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Identity {
    pub user: User,
    pub role: Role,
    /// When the token stops being valid (Unix seconds); re-checked on every WebSocket command.
    pub expires_at: u64,
}

impl Identity {
    /// An anonymous watcher (only with `--allow-guests`): a fresh id, the `Guest` role.
    pub fn guest() -> Self {
        let id = format!("guest-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        Identity {
            user: User {
                name: "guest".into(),
                id,
            },
            role: Role::Guest,
            expires_at: u64::MAX,
        }
    }

    /// Refuses a token that expired while its connection stayed open (`token_expired`, 401).
    pub fn check_live(&self) -> Result<(), AppError> {
        let now = (crate::model::now_millis() / 1000) as u64;
        if now > self.expires_at {
            Err(AppError::new(
                axum::http::StatusCode::UNAUTHORIZED,
                "token_expired",
                "the token expired; reconnect with a fresh one",
            ))
        } else {
            Ok(())
        }
    }

    /// Refuses anyone below `role`.
    pub fn require(&self, role: Role) -> Result<(), AppError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(AppError::forbidden(format!(
                "this needs the {role:?} role",
                role = role
            )))
        }
    }

    /// Hosts manage only their own rooms; admins manage all.
    pub fn require_owner(&self, owner: &str) -> Result<(), AppError> {
        self.require(Role::Host)?;
        if self.role == Role::Admin || self.user.id == owner {
            Ok(())
        } else {
            Err(AppError::forbidden("you do not own this room"))
        }
    }
}

/// Signs and verifies tokens with one shared secret.
#[derive(Clone)]
pub struct Authenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// Tokens already verified, by their exact text: a viewer sends the same token with
    /// every request, and HMAC + base64 + JSON was ~14 % of the claim path's CPU. Only the
    /// expiry is re-checked on a hit; a token that differs in any byte is verified afresh.
    verified: FastDashMap<Box<str>, Identity>,
}

/// Seconds of clock skew allowed on `exp` (as the JWT library is told).
const LEEWAY_SECS: u64 = 5;
/// Most verified tokens remembered; when full the cache starts over (bounded memory
/// whatever tokens clients send: only valid, signed tokens are ever stored).
const VERIFIED_MAX: usize = 65_536;

impl Authenticator {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            verified: FastDashMap::default(),
        }
    }

    /// Issues a token valid for `ttl_secs`.
    pub fn issue(
        &self,
        sub: &str,
        name: &str,
        role: Role,
        ttl_secs: u64,
    ) -> Result<String, AppError> {
        let exp = (crate::model::now_millis() / 1000) as u64 + ttl_secs;
        let claims = Claims {
            sub: sub.to_string(),
            name: name.to_string(),
            role,
            exp,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(AppError::internal)
    }

    /// Verifies a token and returns who it names.
    pub fn verify(&self, token: &str) -> Result<Identity, AppError> {
        if let Some(known) = self.remembered(token) {
            return Ok(known);
        }
        // Expired (or never seen): whatever was remembered goes.
        self.verified.remove(token);
        let identity = self.verify_signed(token)?;
        if self.verified.len() >= VERIFIED_MAX {
            self.verified.clear();
        }
        self.verified.insert(token.into(), identity.clone());
        Ok(identity)
    }

    /// Like [`Self::verify`] but never adds to the cache: a WebSocket verifies its token
    /// once, and thousands of viewers' tokens would only crowd out the HTTP callers'.
    pub fn verify_once(&self, token: &str) -> Result<Identity, AppError> {
        match self.remembered(token) {
            Some(known) => Ok(known),
            None => self.verify_signed(token),
        }
    }

    /// A verified token's identity from the cache, while it is still within its expiry.
    fn remembered(&self, token: &str) -> Option<Identity> {
        self.verified
            .get(token)
            .filter(|known| known.expires_at.saturating_add(LEEWAY_SECS) >= unix_now())
            .map(|known| known.clone())
    }

    fn verify_signed(&self, token: &str) -> Result<Identity, AppError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| AppError::unauthorized(format!("invalid token: {e}")))?;
        let c = data.claims;
        if !is_valid_id(&c.sub) {
            return Err(AppError::unauthorized(
                "token sub must match [A-Za-z0-9_-]{1,64}",
            ));
        }
        if c.role == Role::Guest {
            return Err(AppError::unauthorized("guest tokens are not issued"));
        }
        let name = sanitize_name(&c.name, &c.sub);
        Ok(Identity {
            user: User { id: c.sub, name },
            role: c.role,
            expires_at: c.exp,
        })
    }

    /// Reads the token from `Authorization: Bearer` or, for browsers that cannot set
    /// headers on a WebSocket, from the `token` query parameter.
    pub fn from_request(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<Identity, AppError> {
        self.verify(request_token(headers, query_token)?)
    }

    /// [`Self::from_request`] for a WebSocket upgrade: the token is checked once, not cached.
    pub fn from_upgrade(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<Identity, AppError> {
        self.verify_once(request_token(headers, query_token)?)
    }
}

fn request_token<'a>(
    headers: &'a HeaderMap,
    query_token: Option<&'a str>,
) -> Result<&'a str, AppError> {
    let header_token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    header_token
        .or(query_token)
        .map(str::trim)
        .ok_or_else(|| AppError::unauthorized("a bearer token is required"))
}

fn unix_now() -> u64 {
    (crate::model::now_millis() / 1000) as u64
}

/// Display names are at most 64 characters without control characters; a bad one falls
/// back to the user id rather than refusing the token.
fn sanitize_name(name: &str, sub: &str) -> String {
    let n = name.trim();
    if n.is_empty() || n.chars().count() > 64 || n.chars().any(char::is_control) {
        sub.to_string()
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_forgery() {
        let a = Authenticator::new(b"secret");
        let t = a.issue("alice", "Alice", Role::Host, 60).unwrap();
        let id = a.verify(&t).unwrap();
        assert_eq!(id.user.id, "alice");
        assert_eq!(id.role, Role::Host);
        let b = Authenticator::new(b"other");
        assert!(b.verify(&t).is_err());
        assert!(a.verify("not.a.token").is_err());
    }

    #[test]
    fn remembered_tokens_still_expire_and_the_cache_is_exact() {
        let a = Authenticator::new(b"secret");
        let t = a.issue("alice", "Alice", Role::Viewer, 60).unwrap();
        assert!(a.verify(&t).is_ok());
        assert!(a.verify(&t).is_ok(), "second time from the cache");
        // One byte changed in the signature: verified afresh, and refused.
        let mut forged = t.clone();
        let last = if forged.ends_with('A') { 'B' } else { 'A' };
        forged.pop();
        forged.push(last);
        assert!(a.verify(&forged).is_err());
        // A remembered identity past exp + leeway is refused (and forgotten).
        if let Some(mut known) = a.verified.get_mut(t.as_str()) {
            known.expires_at = unix_now() - LEEWAY_SECS - 1;
        }
        assert!(
            a.verify(&t).is_ok(),
            "the token itself is still valid: re-verified"
        );
        let old = Claims {
            sub: "bob".into(),
            name: "Bob".into(),
            role: Role::Viewer,
            exp: unix_now() - LEEWAY_SECS - 10,
        };
        let expired =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &old, &a.encoding).unwrap();
        a.verified.insert(
            expired.as_str().into(),
            Identity {
                user: User {
                    id: "bob".into(),
                    name: "Bob".into(),
                },
                role: Role::Viewer,
                expires_at: old.exp,
            },
        );
        assert!(a.verify(&expired).is_err());
        assert!(!a.verified.contains_key(expired.as_str()));
    }

    #[test]
    fn roles_order() {
        assert!(Role::Admin > Role::Host && Role::Host > Role::Viewer);
    }
}
