//! The ring-buffer reader's own thread, scheduled ahead of the node's ordinary threads (`--reader-nice`).
//!
//! The kernel holds records only as long as the ring has room (4 MiB: ~150 ms of the bench's fast
//! HTTP/1 server at 110k req/s, seconds at TorchServe's rates). On a node whose CPUs are all busy the
//! reader, at the default priority, waits its turn behind every runnable thread of the traced server
//! — the wakeup lands on the CPU whose server thread just wrote the record — and stalls of 50–400 ms
//! were measured: counted `ringbuf_full` drops, so request counters that undercount exactly when the
//! node is loaded (docs/decisions.md R42). Its CPU is the same either way (it handles what the kernel
//! recorded); the priority only decides whether it gets it within the ring's time or after the loss.
//! The rest of the agent (discovery, samplers, /metrics, log writers) stays at the priority the agent
//! was started with.
//!
//! Raising a priority needs `CAP_SYS_NICE` (or RLIMIT_NICE, e.g. systemd's `LimitNICE=`), which the
//! agent has only until it drops its load-time capabilities ([`crate::privileges`]). Linux keeps the
//! nice value per thread and a new thread inherits its creator's: so, while the agent is still one
//! thread, [`Boost::raise`] lowers the main thread's nice value, the capabilities are dropped,
//! [`Boost::spawn`] starts the reader's thread (inheriting both) and puts the main thread back before
//! it creates any other.

use std::{future::Future, io, pin::Pin, sync::mpsc as std_mpsc, thread};

use anyhow::Context;
use tokio::sync::oneshot;

/// Name of the reader's thread (`/proc/<pid>/task/<tid>/comm`, at most 15 bytes).
pub const THREAD_NAME: &str = "ss-reader";

/// The main thread's nice value, lowered for the reader's thread to inherit.
#[derive(Debug)]
pub struct Boost {
    /// The nice value the agent was started with; the main thread returns to it.
    base: i32,
    /// The reader's nice value: the one asked for, or `base` when it could not be set.
    reader: i32,
}

impl Boost {
    /// Sets the calling thread's nice value to `nice` when that is a higher priority than it has;
    /// call it while the agent is one thread and still holds its load-time capabilities. Not being
    /// allowed to is logged and leaves the priority as it was: the agent works without, and says
    /// what it risks.
    pub fn raise(nice: i32) -> Boost {
        let base = thread_nice().unwrap_or(0);
        if nice >= base {
            return Boost { base, reader: base };
        }
        match set_thread_nice(nice) {
            Ok(()) => Boost { base, reader: nice },
            Err(e) => {
                tracing::warn!(
                    wanted = nice,
                    running = base,
                    "cannot raise the event reader's priority ({e}; needs CAP_SYS_NICE): on a node \
                     whose CPUs are all busy the kernel may drop records \
                     (servescope_kernel_lost_events_total)"
                );
                Boost { base, reader: base }
            }
        }
    }

    /// The reader's nice value.
    pub fn reader_nice(&self) -> i32 {
        self.reader
    }

    /// Starts the reader's thread (it inherits the calling thread's nice value and capabilities) and
    /// puts the calling thread back at the agent's own priority.
    pub fn spawn(self) -> anyhow::Result<ReaderThread> {
        let (tx, rx) = std_mpsc::sync_channel::<Job>(1);
        let spawned = thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || run_jobs(rx));
        if self.reader != self.base {
            // Only ever a lower priority than now: always allowed.
            if let Err(e) = set_thread_nice(self.base) {
                tracing::warn!("cannot put the main thread back at nice {}: {e}", self.base);
            }
        }
        // Detached: closing the queue (dropping the ReaderThread) ends it once its job has returned,
        // and a stuck job cannot hold up the agent's exit.
        spawned.context("starting the event reader's thread")?;
        Ok(ReaderThread { tx })
    }
}

/// A future for the reader's thread, with where to send its outcome.
type Job = (
    Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>,
    oneshot::Sender<anyhow::Result<()>>,
);

/// The reader's thread: runs what it is given on a single-threaded runtime of its own, so that no
/// other task of the agent ever waits in front of it.
fn run_jobs(rx: std_mpsc::Receiver<Job>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    // Each job's own error is sent back; a runtime that cannot start fails every job.
    for (job, done) in rx {
        let outcome = match &rt {
            Ok(rt) => rt.block_on(job),
            Err(e) => Err(anyhow::anyhow!(
                "cannot start the event reader's runtime: {e}"
            )),
        };
        let _ = done.send(outcome);
    }
}

/// The reader's thread, waiting for its work.
#[derive(Debug)]
pub struct ReaderThread {
    tx: std_mpsc::SyncSender<Job>,
}

impl ReaderThread {
    /// Runs `job` on the reader's thread; the receiver gets its outcome when it ends, and is closed
    /// without one if it panicked.
    pub fn run(
        &self,
        job: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) -> anyhow::Result<oneshot::Receiver<anyhow::Result<()>>> {
        let (done, outcome) = oneshot::channel();
        self.tx
            .send((Box::pin(job), done))
            .map_err(|_| anyhow::anyhow!("the event reader's thread has stopped"))?;
        Ok(outcome)
    }
}

/// The calling thread's nice value (Linux keeps one per thread: `PRIO_PROCESS` with a thread id).
pub fn thread_nice() -> io::Result<i32> {
    // getpriority returns the nice value itself, which may be -1: errno tells an error apart.
    // SAFETY: plain syscalls on the calling thread; errno is thread-local.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, gettid());
        if n == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n)
    }
}

/// Sets the calling thread's nice value.
fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: a plain syscall on the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, gettid(), nice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn gettid() -> libc::id_t {
    // SAFETY: gettid cannot fail.
    let tid = unsafe { libc::gettid() };
    libc::id_t::try_from(tid).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The boost is per thread: the reader's thread gets it, the spawning thread goes back to its
    /// own, and asking for a lower priority than a thread has changes nothing. On a thread of its own,
    /// so that the test harness's threads keep their priority.
    #[test]
    fn reader_inherits_the_boost_and_the_spawner_goes_back() -> anyhow::Result<()> {
        thread::spawn(|| -> anyhow::Result<()> {
            let base = thread_nice()?;
            assert_eq!(Boost::raise(base + 1).reader_nice(), base);
            let boost = Boost::raise(base - 3);
            // SAFETY: geteuid cannot fail.
            if unsafe { libc::geteuid() } == 0 {
                assert_eq!(boost.reader_nice(), base - 3, "root may raise a priority");
            }
            let want = boost.reader_nice();
            let reader = boost.spawn()?;
            assert_eq!(
                thread_nice()?,
                base,
                "the spawning thread is back at its own"
            );
            let outcome = reader.run(async move {
                let name = thread::current().name().map(str::to_owned);
                anyhow::ensure!(name.as_deref() == Some(THREAD_NAME), "ran on {name:?}");
                let n = thread_nice()?;
                anyhow::ensure!(n == want, "the reader runs at nice {n}, not {want}");
                Ok(())
            })?;
            outcome
                .blocking_recv()
                .context("the reader's thread ended")?
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the test's thread panicked"))?
    }
}
