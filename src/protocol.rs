//! The WebSocket wire protocol: what clients may send, what the server sends back, and the
//! validation rules for ids and chat text that keep bad input out of the store (and out of
//! Redis key names). `docs/protocol.md` is the human version of this file.

use serde::{Deserialize, Serialize};

use crate::error::AppError;
use crate::model::{ChatMessage, Room};

/// Longest chat message, in characters.
pub const MAX_CHAT_CHARS: usize = 500;
/// Longest id (room, drop, user, idempotency key), in bytes.
pub const MAX_ID_LEN: usize = 64;

/// True for `[A-Za-z0-9_-]{1,64}`: the only ids that may become part of a store key.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Refuses an id that does not match `[A-Za-z0-9_-]{1,64}`.
pub fn check_id(what: &'static str, s: &str) -> Result<(), AppError> {
    if is_valid_id(s) {
        Ok(())
    } else {
        Err(AppError::bad_request(
            "bad_id",
            format!("{what} must match [A-Za-z0-9_-]{{1,64}}"),
        ))
    }
}

/// Chat text must be non-empty (after trimming), at most 500 characters, without control
/// characters (newlines included: chat is one line).
pub fn check_chat_text(text: &str) -> Result<(), AppError> {
    if text.trim().is_empty() {
        return Err(AppError::bad_request("bad_message", "chat text is empty"));
    }
    if text.chars().count() > MAX_CHAT_CHARS {
        return Err(AppError::bad_request(
            "bad_message",
            format!("chat text is longer than {MAX_CHAT_CHARS} characters"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(AppError::bad_request(
            "bad_message",
            "chat text contains control characters",
        ));
    }
    Ok(())
}

/// A frame from a client. Unknown `type`s and wrong shapes are refused with `bad_message`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Chat {
        text: String,
    },
    Like {
        #[serde(default = "one")]
        count: u32,
    },
    Ping,
    Claim {
        drop: String,
        /// Kept raw so that `0`, `-1`, `1.5` and `1e30` all get `bad_quantity`, not a
        /// generic parse error.
        qty: serde_json::Value,
        key: String,
    },
    Confirm {
        claim: String,
    },
    Release {
        claim: String,
    },
    /// Opens a group buy on `drop`; answered by `group_result` with `key` (the
    /// idempotency key).
    OpenGroup {
        drop: String,
        key: String,
    },
    /// Joins a group; answered by `group_result` with `key` (the idempotency key).
    JoinGroup {
        group: String,
        key: String,
    },
}

fn one() -> u32 {
    1
}

/// Most likes one `like` frame may carry: a client batching taps, not a counter to inflate.
pub const MAX_LIKES_PER_FRAME: u32 = 100;

/// What a viewer sees on joining, and again on `resync` after falling behind.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub room: Room,
    pub viewers: u64,
    pub likes: u64,
    /// The most recent chat (or, on a recovered reconnect, every message after `since`).
    pub chat: Vec<ChatMessage>,
    /// The room's latest chat seq: hand it back as `?since=` after a reconnect.
    pub seq: u64,
    /// Present when the client asked for `since`: whether every missed message is in `chat`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// Live drops, in the same JSON shape as `GET /api/drops/{drop}`.
    pub drops: Vec<serde_json::Value>,
    /// Open groups of the live group drops (each drop's fullest first), as
    /// `GET /api/groups/{group}`: what a newcomer needs to join one.
    pub groups: Vec<serde_json::Value>,
    /// The viewer's own identity, so a page can tell its messages apart.
    pub you: crate::model::User,
}

/// Outcome of a WebSocket `claim`/`confirm`/`release`, correlated by `key`.
#[derive(Debug, Serialize)]
pub struct CommandResult {
    pub key: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim: Option<serde_json::Value>,
    /// The group, in `group_result` frames.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A frame from the server.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome(Snapshot),
    Resync(Snapshot),
    Chat(ChatMessage),
    Likes {
        total: u64,
    },
    Presence {
        viewers: u64,
    },
    Pong,
    Error {
        code: &'static str,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after: Option<u64>,
    },
    DropLive(serde_json::Value),
    DropEnded {
        drop: String,
    },
    Stock {
        drop: String,
        remaining: u64,
        reserved: u64,
        sold: u64,
        total: u64,
    },
    SoldOut {
        drop: String,
    },
    Purchase {
        drop: String,
        user: String,
        qty: u64,
    },
    ClaimResult(CommandResult),
    /// A host deleted a chat message: clients remove it.
    ChatDeleted {
        id: String,
    },

    /// Outcome of `open_group` / `join_group`, with the group in `group`.
    GroupResult(CommandResult),
    /// A group's members/size changed; conflated per group.
    GroupProgress(serde_json::Value),
    /// A group filled: every member's unit is sold at the group price.
    GroupCompleted(serde_json::Value),
    /// A group's deadline passed: every member's unit went back to stock.
    GroupFailed(serde_json::Value),
}

impl CommandResult {
    /// The answer to a command correlated by `key`: the value (put in `claim`, or in
    /// `group` when `group` is true) or the refusal's code and message.
    pub fn new(key: String, result: Result<serde_json::Value, AppError>, group: bool) -> Self {
        let (ok, value, code, message) = match result {
            Ok(v) => (true, Some(v), None, None),
            Err(e) => (false, None, Some(e.code), Some(e.message)),
        };
        let (claim, group) = if group { (None, value) } else { (value, None) };
        CommandResult {
            key,
            ok,
            claim,
            group,
            code,
            message,
        }
    }
}

impl ServerMessage {
    /// The `error` frame for a refusal.
    pub fn error(err: &AppError) -> Self {
        ServerMessage::Error {
            code: err.code,
            message: err.message.clone(),
            retry_after: err.retry_after,
        }
    }

    /// Serializes the frame once; the result is shared by every recipient.
    pub fn to_text(&self) -> String {
        // Serializing these plain structs cannot fail (no maps with non-string keys).
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"type\":\"error\"}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_valid_id("demo"));
        assert!(is_valid_id("a-b_C9"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a:b"));
        assert!(!is_valid_id("{x}"));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id(&"x".repeat(65)));
        assert!(is_valid_id(&"x".repeat(64)));
    }

    #[test]
    fn chat_text() {
        assert!(check_chat_text("hello").is_ok());
        assert!(check_chat_text("").is_err());
        assert!(check_chat_text("   ").is_err());
        assert!(check_chat_text("a\u{0007}b").is_err());
        assert!(check_chat_text(&"字".repeat(500)).is_ok());
        assert!(check_chat_text(&"字".repeat(501)).is_err());
    }

    #[test]
    fn client_messages_parse() {
        let m: ClientMessage = serde_json::from_str(r#"{"type":"like"}"#).unwrap();
        assert!(matches!(m, ClientMessage::Like { count: 1 }));
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"nope"}"#).is_err());
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"chat","text":5}"#).is_err());
    }
}
