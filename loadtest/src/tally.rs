//! What every claiming client counts (`claims`, `sale`, `groups`): requests sent, answers by
//! code, errors, answers that never came, latency (whole-run histogram and per-second
//! series) and the ids of successful claims; plus the wire pieces of a claim shared by the
//! scenarios — the HTTP request body, the WebSocket `claim` frame and the parsing of answers
//! (HTTP answers by a quick byte search for the one field needed, serde when that fails).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::http::Answer;
use crate::report::{Counts, Latency, LatencySummary, bump, format_counts, merge_counts};
use crate::series::Series;

/// One client's (or worker's) counts, merged at the end.
pub struct Tally {
    pub sent: u64,
    pub ok: u64,
    pub codes: Counts,
    pub errors: Counts,
    pub unknown: u64,
    pub latency: Latency,
    pub series: Series,
    pub claim_ids: Vec<String>,
}

impl Tally {
    /// An empty tally whose per-second series is named `series`.
    pub fn new(series: &str) -> Self {
        Self {
            sent: 0,
            ok: 0,
            codes: Counts::new(),
            errors: Counts::new(),
            unknown: 0,
            latency: Latency::new(),
            series: Series::new(series, "answers"),
            claim_ids: Vec::new(),
        }
    }

    /// Adds another tally's counts.
    pub fn merge(&mut self, o: Tally) {
        self.sent += o.sent;
        self.ok += o.ok;
        merge_counts(&mut self.codes, &o.codes);
        merge_counts(&mut self.errors, &o.errors);
        self.unknown += o.unknown;
        self.latency.merge(&o.latency);
        self.series.merge(&o.series);
        self.claim_ids.extend(o.claim_ids);
    }

    /// An answer to a request sent (or due) at `from`; `start` is second 0 of the series.
    pub fn answered(&mut self, start: Instant, from: Instant) {
        let now = Instant::now();
        let latency = now.saturating_duration_since(from);
        self.latency.record(latency);
        let at = now.saturating_duration_since(start).as_micros() as u64;
        self.series.record(at, latency.as_micros() as u64);
    }

    /// A success that carries no claim id (a health check, a group join).
    pub fn ok(&mut self) {
        self.ok += 1;
        bump(&mut self.codes, "ok");
    }

    /// A success, with the claim id when the answer carried one.
    pub fn success(&mut self, claim_id: Option<String>) {
        self.ok();
        match claim_id {
            Some(id) => self.claim_ids.push(id),
            None => bump(&mut self.errors, "success without claim_id"),
        }
    }

    /// Counts an outcome; true for a success.
    pub fn outcome(&mut self, o: Outcome) -> bool {
        match o {
            Ok(id) => {
                self.success(id);
                true
            }
            Err(code) => {
                self.refused(&code);
                false
            }
        }
    }

    /// A refusal (or any other answer) by its code.
    pub fn refused(&mut self, code: &str) {
        bump(&mut self.codes, code);
    }

    /// The tally as a summary: counts, answers by code, latency.
    pub fn stats(&self) -> TallyStats {
        TallyStats {
            sent: self.sent,
            answered: self.latency.count(),
            successes: self.ok,
            answers_by_code: self.codes.clone(),
            errors: self.errors.clone(),
            unanswered: self.unknown,
            latency: self.latency.summary(),
        }
    }

    /// A request whose answer never came (`why`): it may or may not have taken effect.
    pub fn lost(&mut self, why: &str) {
        self.unknown += 1;
        bump(&mut self.errors, why);
    }
}

/// A tally's figures, as summaries print and serialize them.
#[derive(Serialize, Debug, Clone)]
pub struct TallyStats {
    pub sent: u64,
    pub answered: u64,
    pub successes: u64,
    pub answers_by_code: Counts,
    pub errors: Counts,
    pub unanswered: u64,
    pub latency: LatencySummary,
}

impl std::fmt::Display for TallyStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} sent, {} answered, {} successes; answers: {}; errors: {} (unanswered {})\n      latency {}",
            self.sent,
            self.answered,
            self.successes,
            format_counts(&self.answers_by_code),
            format_counts(&self.errors),
            self.unanswered,
            self.latency
        )
    }
}

/// What a claim's answer says: `Ok(claim id)` for a success (the id when the answer carried
/// one), `Err(code)` for a refusal.
pub type Outcome = Result<Option<String>, String>;

/// An HTTP claim answer: 201 is a success, anything else is its problem `code`.
pub fn http_claim_outcome(a: &Answer<'_>) -> Outcome {
    if a.status == 201 {
        let quick = top_level_string(a.body, b"claim_id");
        Ok(quick.map(str::to_string).or_else(|| {
            serde_json::from_slice::<ClaimAnswer>(a.body)
                .ok()
                .map(|c| c.claim_id)
        }))
    } else {
        Err(problem_code(a))
    }
}

/// A successful claim's body (only the id is read).
#[derive(Deserialize)]
pub struct ClaimAnswer {
    pub claim_id: String,
}

#[derive(Deserialize)]
struct Problem {
    code: String,
}

/// The problem+json `code` of an answer, or `http_STATUS` when the body has none.
pub fn problem_code(a: &Answer<'_>) -> String {
    if let Some(code) = top_level_string(a.body, b"code") {
        return code.to_string();
    }
    match serde_json::from_slice::<Problem>(a.body) {
        Ok(p) => p.code,
        Err(_) => format!("http_{}", a.status),
    }
}

/// The value of the string member `key` of the flat JSON object `body`, found without
/// parsing the whole body: the first `"key":"` right after a `{` or a `,`. (Written that way
/// the bytes can only be a member name: a quote inside a JSON string is escaped; and with no
/// `{` or `[` past the first byte, every member is the object's own.) `None` — parse
/// properly then — when it is not there in exactly that spelling, when the value holds an
/// escape, or when `body` is not such a compact flat object.
fn top_level_string<'a>(body: &'a [u8], key: &[u8]) -> Option<&'a str> {
    let inner = body.strip_prefix(b"{")?.strip_suffix(b"}")?;
    if inner.iter().any(|&b| b == b'{' || b == b'[') {
        return None;
    }
    let mut from = 0;
    loop {
        let at = from + find(&body[from..], key)?;
        from = at + key.len();
        let before = at.checked_sub(2).map(|i| &body[i..at]);
        let after = body.get(from..from + 3);
        if !matches!(before, Some(b"{\"" | b",\"")) || after != Some(b"\":\"") {
            continue;
        }
        let value = &body[from + 3..];
        let end = value.iter().position(|&b| b == b'"' || b == b'\\')?;
        if value[end] == b'\\' {
            return None;
        }
        return std::str::from_utf8(&value[..end]).ok();
    }
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The first part of an error's message, for counting errors by kind.
pub fn short_error(e: &anyhow::Error) -> String {
    let s = e.to_string();
    s.split(':').next().unwrap_or("error").trim().to_string()
}

/// The body of a one-unit claim.
pub const CLAIM_BODY: &[u8] = b"{\"qty\":1}";

/// The WebSocket frame claiming one unit of `drop` with idempotency key `key`.
pub fn claim_frame(drop: &str, key: &str) -> String {
    format!("{{\"type\":\"claim\",\"drop\":\"{drop}\",\"qty\":1,\"key\":\"{key}\"}}")
}

/// A `claim_result` (or `error`) frame.
#[derive(Deserialize)]
pub struct ClaimResult {
    #[serde(rename = "type")]
    pub kind: String,
    pub key: Option<String>,
    pub ok: Option<bool>,
    pub claim: Option<ClaimAnswer>,
    pub code: Option<String>,
}

impl ClaimResult {
    /// Parses a frame that is a `claim_result` or an `error`; `None` for any other frame.
    pub fn parse(text: &str) -> Option<Result<Self, serde_json::Error>> {
        if text.starts_with("{\"type\":\"claim_result\"") || text.starts_with("{\"type\":\"error\"")
        {
            Some(serde_json::from_str(text))
        } else {
            None
        }
    }

    /// What the answer says.
    pub fn outcome(self) -> Outcome {
        if self.ok == Some(true) {
            Ok(self.claim.map(|c| c.claim_id))
        } else {
            Err(self.code.unwrap_or_else(|| "refused_without_code".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer<'_> {
        Answer {
            status,
            body: body.as_bytes(),
            keep_alive: true,
        }
    }

    #[test]
    fn http_answers_become_outcomes() {
        let ok = answer(201, r#"{"claim_id":"d.1","status":"reserved"}"#);
        assert_eq!(http_claim_outcome(&ok), Ok(Some("d.1".into())));
        let refused = answer(409, r#"{"code":"sold_out","status":409}"#);
        assert_eq!(http_claim_outcome(&refused), Err("sold_out".into()));
        assert_eq!(http_claim_outcome(&answer(502, "")), Err("http_502".into()));
        assert_eq!(http_claim_outcome(&answer(201, "")), Ok(None));
        assert_eq!(http_claim_outcome(&answer(201, "{}")), Ok(None));
    }

    #[test]
    fn the_quick_parse_reads_what_the_server_sends() {
        let claimed = r#"{"claim_id":"d4f2.17","drop":"d4f2","qty":1,"status":"reserved","expires_at":"2026-12-01T09:00:00Z"}"#;
        assert_eq!(
            top_level_string(claimed.as_bytes(), b"claim_id"),
            Some("d4f2.17")
        );
        assert_eq!(
            http_claim_outcome(&answer(201, claimed)),
            Ok(Some("d4f2.17".into()))
        );
        let problem = r#"{"code":"limit_reached","detail":"at most 1 per user","status":409,"title":"limit_reached","type":"https://livedrop.dev/errors/limit_reached"}"#;
        assert_eq!(
            top_level_string(problem.as_bytes(), b"code"),
            Some("limit_reached")
        );
        assert_eq!(
            http_claim_outcome(&answer(409, problem)),
            Err("limit_reached".into())
        );
    }

    #[test]
    fn anything_unusual_falls_back_to_serde() {
        // Spacing, escapes, a key inside a string, a non-string value: the quick parse
        // declines, serde decides, and the outcome is what serde alone gave.
        let cases = [
            (
                201,
                r#"{ "claim_id" : "d.1" }"#,
                Ok(Some("d.1".to_string())),
            ),
            (201, "{\n  \"claim_id\": \"d.2\"\n}", Ok(Some("d.2".into()))),
            (201, r#"{"claim_id":"d\u002e3"}"#, Ok(Some("d.3".into()))),
            (
                201,
                r#"{"note":"x\",\"claim_id\":\"fake","claim_id":"d.4"}"#,
                Ok(Some("d.4".into())),
            ),
            (201, r#"{"claim_id":7}"#, Ok(None)),
            (
                409,
                r#"{"detail":"a \"code\":\"fake\"", "code" :"sold_out"}"#,
                Err("sold_out".into()),
            ),
            (409, r#"{"code":"sold\"out"}"#, Err("sold\"out".into())),
            (429, "not json", Err("http_429".into())),
        ];
        for (status, body, want) in cases {
            assert_eq!(http_claim_outcome(&answer(status, body)), want, "{body}");
        }
        let nested = r#"{"inner":{"claim_id":"d.5"},"claim_id":"d.6"}"#;
        assert_eq!(
            http_claim_outcome(&answer(201, nested)),
            Ok(Some("d.6".into()))
        );
        assert_eq!(top_level_string(nested.as_bytes(), b"claim_id"), None);
        assert_eq!(
            top_level_string(br#"{ "claim_id" : "d.1" }"#, b"claim_id"),
            None
        );
        assert_eq!(
            top_level_string(br#"{"a":"\",\"code\":\"x"}"#, b"code"),
            None
        );
    }

    #[test]
    fn ws_frames_become_outcomes() {
        assert!(ClaimResult::parse(r#"{"type":"stock","drop":"d"}"#).is_none());
        let ok = ClaimResult::parse(
            r#"{"type":"claim_result","key":"k1","ok":true,"claim":{"claim_id":"d.7"}}"#,
        );
        let ok = ok.and_then(Result::ok).map(ClaimResult::outcome);
        assert_eq!(ok, Some(Ok(Some("d.7".into()))));
        let no = ClaimResult::parse(
            r#"{"type":"claim_result","key":"k2","ok":false,"code":"limit_reached"}"#,
        )
        .and_then(Result::ok)
        .map(ClaimResult::outcome);
        assert_eq!(no, Some(Err("limit_reached".into())));
        assert_eq!(
            claim_frame("d", "k"),
            r#"{"type":"claim","drop":"d","qty":1,"key":"k"}"#
        );
    }

    #[test]
    fn tallies_count_and_merge() {
        let mut a = Tally::new("x");
        a.sent = 3;
        assert!(a.outcome(Ok(Some("c1".into()))));
        assert!(!a.outcome(Err("sold_out".into())));
        a.lost("timeout");
        let mut b = Tally::new("x");
        b.outcome(Ok(None));
        a.merge(b);
        let s = a.stats();
        assert_eq!((s.successes, s.unanswered), (2, 1));
        assert_eq!(s.answers_by_code.get("ok"), Some(&2));
        assert_eq!(s.answers_by_code.get("sold_out"), Some(&1));
        assert_eq!(s.errors.get("success without claim_id"), Some(&1));
        assert_eq!(a.claim_ids, vec!["c1".to_string()]);
    }
}
