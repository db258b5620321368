//! Progress of long operations (`lab up`, `lab down`): a spinner per step on a
//! terminal, one plain line per step otherwise (CI logs, pipes), so the output
//! of a non-interactive run is still a readable record.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Reports the steps of one operation on stderr.
#[derive(Debug)]
pub struct Progress {
    terminal: bool,
    quiet: bool,
}

/// One running step; finish it with [`Step::done`] or [`Step::fail`]. A step
/// dropped without either is reported as failed.
#[derive(Debug)]
pub struct Step {
    message: String,
    started: Instant,
    spinner: Option<ProgressBar>,
    quiet: bool,
    finished: bool,
}

impl Progress {
    /// Progress on stderr: a spinner when stderr is a terminal.
    pub fn stderr() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            quiet: false,
        }
    }

    /// No output at all (library use, tests).
    pub fn quiet() -> Self {
        Self {
            terminal: false,
            quiet: true,
        }
    }

    /// Starts a step.
    pub fn step(&self, message: impl Into<String>) -> Step {
        let message = message.into();
        let spinner = (self.terminal && !self.quiet).then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .expect("static template is valid"),
            );
            bar.set_message(message.clone());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        if spinner.is_none() && !self.quiet {
            eprintln!("... {message}");
        }
        Step {
            message,
            started: Instant::now(),
            spinner,
            quiet: self.quiet,
            finished: false,
        }
    }

    /// A one-off note between steps.
    pub fn note(&self, message: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("    {}", message.as_ref());
        }
    }
}

impl Step {
    fn finish(&mut self, mark: &str, detail: &str) {
        self.finished = true;
        if self.quiet {
            return;
        }
        let line = format!(
            "{mark} {}{detail} ({:.1}s)",
            self.message,
            self.started.elapsed().as_secs_f64()
        );
        match self.spinner.take() {
            Some(bar) => {
                bar.set_style(
                    ProgressStyle::with_template("{msg}").expect("static template is valid"),
                );
                bar.finish_with_message(line);
            }
            None => eprintln!("{line}"),
        }
    }

    /// Marks the step done.
    pub fn done(mut self) {
        self.finish("ok ", "");
    }

    /// Marks the step failed with a reason.
    pub fn fail(mut self, reason: impl std::fmt::Display) {
        self.finish("ERR", &format!(": {reason}"));
    }

    /// Runs `f` as this step: done on `Ok`, failed with the error on `Err`.
    ///
    /// # Errors
    ///
    /// Whatever `f` returns.
    pub fn run<T, E: std::fmt::Display>(self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        match f() {
            Ok(v) => {
                self.done();
                Ok(v)
            }
            Err(e) => {
                self.fail(&e);
                Err(e)
            }
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if !self.finished {
            self.finish("ERR", ": interrupted");
        }
    }
}
