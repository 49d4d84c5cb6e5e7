//! A progress bar on stderr (indicatif) fed by a shared answer counter; hidden with
//! `--quiet` or when stderr is not a terminal (indicatif's own check).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Shows elapsed time against the run's duration, and the answers so far.
pub struct Progress {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// `duration` None: a spinner (the run is bounded by a count instead).
    pub fn start(
        label: &str,
        duration: Option<Duration>,
        counter: Arc<AtomicU64>,
        quiet: bool,
    ) -> Self {
        let bar = match duration {
            Some(d) => ProgressBar::new(d.as_millis() as u64),
            None => ProgressBar::new_spinner(),
        };
        if quiet {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed:>4} {msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(label.to_string());
        let b = bar.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let n = counter.load(Ordering::Relaxed);
                let secs = start.elapsed().as_secs_f64().max(0.001);
                b.set_position(start.elapsed().as_millis() as u64);
                b.set_message(format!("{n} answers, {:.0}/s", n as f64 / secs));
            }
        });
        Self { bar, task }
    }

    pub fn finish(self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}
