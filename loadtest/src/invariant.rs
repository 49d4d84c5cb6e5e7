//! The invariant check that ends a claims run: what the clients were told against what the
//! server holds. Conservation (`remaining + reserved + sold == total`), no oversell, every
//! acknowledged claim in the ledger exactly once, the ledger agreeing with the counters, and
//! the per-user limit held — by the answers the clients saw and by the ledger.
//!
//! A claim whose answer never arrived (connection error, timeout) may or may not have
//! happened: those make the unit counts a range instead of an equality.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::api::{LedgerEntry, Levels};

/// What the clients saw.
pub struct Seen<'a> {
    /// Claims answered with success.
    pub successes: u64,
    /// Claims sent whose answer never came: each may or may not have reserved a unit.
    pub unknown: u64,
    /// Claim ids of the successes (qty 1 each).
    pub claim_ids: &'a [String],
    /// Successes per user index.
    pub per_user: &'a [u32],
    pub per_user_limit: u64,
}

/// The result: empty `violations` means every invariant held.
#[derive(Serialize, Debug)]
pub struct Verdict {
    pub levels: Levels,
    pub ledger_claims: u64,
    pub violations: Vec<String>,
}

/// Conservation (`remaining + reserved + sold == total`) and no oversell, from the counters
/// alone: the part of the check every drop kind shares.
pub fn check_levels(levels: &Levels) -> Vec<String> {
    let mut v = Vec::new();
    let held = levels.reserved + levels.sold;
    if levels.remaining + levels.reserved + levels.sold != levels.total {
        v.push(format!(
            "conservation: remaining {} + reserved {} + sold {} != total {}",
            levels.remaining, levels.reserved, levels.sold, levels.total
        ));
    }
    if held > levels.total {
        v.push(format!(
            "oversell: reserved + sold = {held} > total {}",
            levels.total
        ));
    }
    v
}

/// Compares what the clients saw with the drop's counters and ledger.
pub fn check(seen: &Seen<'_>, levels: Levels, ledger: &[LedgerEntry]) -> Verdict {
    let mut v = check_levels(&levels);
    let held = levels.reserved + levels.sold;
    if seen.unknown == 0 && seen.successes != held {
        v.push(format!(
            "successes {} != reserved + sold {held}",
            seen.successes
        ));
    } else if seen.successes > held || held > seen.successes + seen.unknown {
        v.push(format!(
            "reserved + sold {held} outside successes {} ..= successes + unanswered {}",
            seen.successes,
            seen.successes + seen.unknown
        ));
    }

    // The ledger: claims (minus anything that returned units, which a short run should not
    // see) must match the counters, and hold every acknowledged claim exactly once.
    let mut ledger_ids: HashSet<&str> = HashSet::new();
    let mut ledger_units = 0u64;
    let mut ledger_claims = 0u64;
    let mut returned = 0u64;
    let mut per_user_ledger: HashMap<&str, u64> = HashMap::new();
    for e in ledger {
        match e.op.as_str() {
            "claim" => {
                ledger_claims += 1;
                ledger_units += e.qty;
                if let Some(u) = &e.user {
                    *per_user_ledger.entry(u.as_str()).or_insert(0) += e.qty;
                }
                if let Some(id) = &e.claim_id
                    && !ledger_ids.insert(id.as_str())
                {
                    v.push(format!("ledger: claim {id} appears twice"));
                }
            }
            "release" | "expire" => returned += e.qty,
            _ => {}
        }
    }
    if ledger_units - returned.min(ledger_units) != held {
        v.push(format!(
            "ledger: claimed {ledger_units} - returned {returned} != reserved + sold {held}"
        ));
    }
    let missing: Vec<&String> = seen
        .claim_ids
        .iter()
        .filter(|id| !ledger_ids.contains(id.as_str()))
        .collect();
    if !missing.is_empty() {
        v.push(format!(
            "ledger: {} acknowledged claims are missing (first: {})",
            missing.len(),
            missing[0]
        ));
    }
    let distinct: HashSet<&str> = seen.claim_ids.iter().map(String::as_str).collect();
    if distinct.len() != seen.claim_ids.len() {
        v.push(format!(
            "answers: {} successes carry only {} distinct claim ids",
            seen.claim_ids.len(),
            distinct.len()
        ));
    }

    let over: Vec<(usize, u32)> = seen
        .per_user
        .iter()
        .enumerate()
        .filter(|(_, n)| u64::from(**n) > seen.per_user_limit)
        .map(|(i, n)| (i, *n))
        .collect();
    if let Some((i, n)) = over.first() {
        v.push(format!(
            "per-user limit {}: {} users got more (user index {i} got {n})",
            seen.per_user_limit,
            over.len()
        ));
    }
    if let Some((u, n)) = per_user_ledger
        .iter()
        .find(|(_, n)| **n > seen.per_user_limit)
    {
        v.push(format!(
            "per-user limit {} in the ledger: user {u} claimed {n}",
            seen.per_user_limit
        ));
    }

    Verdict {
        levels,
        ledger_claims,
        violations: v,
    }
}

/// Prints the verdict for people: the drop's counters and every violation.
pub fn print(v: &Verdict) {
    let l = v.levels;
    println!(
        "  drop: total {} remaining {} reserved {} sold {}; ledger claims {}",
        l.total, l.remaining, l.reserved, l.sold, v.ledger_claims
    );
    print_violations(&v.violations);
}

/// Prints the check's outcome: passed, or every violation.
pub fn print_violations(violations: &[String]) {
    if violations.is_empty() {
        println!("  INVARIANT CHECK: passed");
    } else {
        println!("  INVARIANT CHECK: FAILED");
        for x in violations {
            println!("    - {x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, user: &str) -> LedgerEntry {
        LedgerEntry {
            op: "claim".into(),
            claim_id: Some(id.into()),
            user: Some(user.into()),
            qty: 1,
        }
    }

    fn levels(total: u64, remaining: u64, reserved: u64, sold: u64) -> Levels {
        Levels {
            total,
            remaining,
            reserved,
            sold,
        }
    }

    #[test]
    fn a_clean_run_passes() {
        let ids = vec!["d.1".to_string(), "d.2".to_string()];
        let seen = Seen {
            successes: 2,
            unknown: 0,
            claim_ids: &ids,
            per_user: &[1, 1],
            per_user_limit: 1,
        };
        let ledger = vec![entry("d.1", "u0"), entry("d.2", "u1")];
        let v = check(&seen, levels(5, 3, 2, 0), &ledger);
        assert!(v.violations.is_empty(), "{:?}", v.violations);
    }

    #[test]
    fn every_broken_rule_is_named() {
        let ids = vec!["d.1".to_string(), "d.9".to_string(), "d.9".to_string()];
        let seen = Seen {
            successes: 3,
            unknown: 0,
            claim_ids: &ids,
            per_user: &[3],
            per_user_limit: 1,
        };
        let ledger = vec![entry("d.1", "u0"), entry("d.1", "u0")];
        let v = check(&seen, levels(5, 4, 2, 0), &ledger).violations;
        let all = v.join("\n");
        for needle in [
            "conservation",
            "successes 3 != reserved + sold 2",
            "appears twice",
            "missing",
            "distinct",
            "per-user limit 1:",
            "in the ledger",
        ] {
            assert!(all.contains(needle), "{needle} not in {all}");
        }
    }

    #[test]
    fn unanswered_claims_widen_the_range() {
        let ids = vec!["d.1".to_string()];
        let seen = Seen {
            successes: 1,
            unknown: 1,
            claim_ids: &ids,
            per_user: &[1, 0],
            per_user_limit: 1,
        };
        let ledger = vec![entry("d.1", "u0"), entry("d.2", "u1")];
        assert!(
            check(&seen, levels(2, 0, 2, 0), &ledger)
                .violations
                .is_empty()
        );
    }
}
