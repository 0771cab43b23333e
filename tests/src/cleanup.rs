//! Process-wide list of "stop what I started" actions.
//!
//! Guards ([`crate::Agent`], [`crate::TorchServe`]) run their action when dropped. The list exists for the
//! one case where drops do not run: a signal. `cargo xtask demo` waits for SIGINT/SIGTERM on its own thread
//! and calls [`run_all`] before exiting, so Ctrl-C never leaves a TorchServe or an agent behind.

use std::sync::{
    Mutex, PoisonError,
    atomic::{AtomicU64, Ordering},
};

type Action = Box<dyn FnOnce() + Send>;

static ACTIONS: Mutex<Vec<(u64, Action)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A registered action. Dropping it runs the action (if nobody ran it yet).
#[must_use = "dropping a Registration runs its action at once"]
#[derive(Debug)]
pub struct Registration(u64);

/// Registers `action` to be run exactly once: by [`Registration::run`], by dropping the registration, or
/// by [`run_all`], whichever comes first.
pub fn register(action: impl FnOnce() + Send + 'static) -> Registration {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    lock().push((id, Box::new(action)));
    Registration(id)
}

impl Registration {
    /// Runs the action now (no-op if it already ran, e.g. from a signal handler).
    pub fn run(self) {
        // Drop does the work; this name just says it at the call site.
        drop(self);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let action = {
            let mut actions = lock();
            actions
                .iter()
                .position(|(id, _)| *id == self.0)
                .map(|i| actions.remove(i).1)
        };
        // Run outside the lock: an action may take seconds (stopping TorchServe) and must not block others.
        if let Some(action) = action {
            action();
        }
    }
}

/// Runs every registered action, newest first (the agent before the server it watches).
pub fn run_all() {
    loop {
        let Some((_, action)) = lock().pop() else {
            return;
        };
        action();
    }
}

fn lock() -> std::sync::MutexGuard<'static, Vec<(u64, Action)>> {
    // A panic inside an action must not stop the others from running.
    ACTIONS.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, atomic::AtomicUsize};

    use super::*;

    #[test]
    fn each_action_runs_once() {
        let count = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&count);
        let reg = register(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        run_all();
        reg.run();
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let c = Arc::clone(&count);
        drop(register(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        run_all();
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
