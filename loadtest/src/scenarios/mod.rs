//! The load scenarios, one module each: `claims` (the claim path over HTTP or WebSocket,
//! ending with the invariant check), `viewers` (chat fan-out to many WebSocket viewers, or
//! to a plain reference peer), `sale` (the whole live sale: viewers, a drop, a rush of
//! claims over both transports, chat during it) and `groups` (group buys filling at once).

pub mod claims;
pub mod groups;
pub mod sale;
pub mod viewers;

use serde::Serialize;

use crate::series::Series;

/// What every scenario's summary offers the entry point.
pub trait Outcome: Serialize {
    /// The scenario's name.
    fn name(&self) -> &'static str;
    /// Prints the summary for people.
    fn print(&self);
    /// Per-second charts for `--report`.
    fn series(&self) -> &[Series];
    /// False when an invariant broke.
    fn passed(&self) -> bool;
}

/// Implements `Outcome` for a summary with `scenario`, `series` (and `passed`) fields and a
/// `print` function in its module.
macro_rules! outcome {
    ($summary:ty, $print:path, $passed:expr) => {
        impl Outcome for $summary {
            fn name(&self) -> &'static str {
                self.scenario
            }
            fn print(&self) {
                $print(self)
            }
            fn series(&self) -> &[Series] {
                &self.series
            }
            fn passed(&self) -> bool {
                let f: fn(&$summary) -> bool = $passed;
                f(self)
            }
        }
    };
}

outcome!(claims::ClaimsSummary, claims::print, |s| s.passed);
outcome!(viewers::ViewersSummary, viewers::print, |_| true);
outcome!(sale::SaleSummary, sale::print, |s| s.passed);
outcome!(groups::GroupsSummary, groups::print, |s| s.passed);
