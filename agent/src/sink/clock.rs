//! Kernel timestamps → wall-clock time.
//!
//! The kernel stamps records with `bpf_ktime_get_ns`, i.e. `CLOCK_MONOTONIC`; logs want UTC. The offset
//! between the two clocks changes when NTP steps or slews the real-time clock, so it is sampled again
//! whenever the stamps move past [`RESAMPLE_NS`] from the last sample.

/// How long one offset sample is trusted, in monotonic nanoseconds.
const RESAMPLE_NS: u64 = 1_000_000_000;

/// Maps `CLOCK_MONOTONIC` nanoseconds to nanoseconds since the Unix epoch.
#[derive(Debug)]
pub struct WallClock {
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC` at the last sample, in nanoseconds.
    offset_ns: i128,
    sampled_at_mono_ns: u64,
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

impl WallClock {
    pub fn new() -> Self {
        let (offset_ns, sampled_at_mono_ns) = sample();
        WallClock {
            offset_ns,
            sampled_at_mono_ns,
        }
    }

    /// A clock with a fixed offset, for tests.
    pub fn fixed(offset_ns: i128) -> Self {
        WallClock {
            offset_ns,
            sampled_at_mono_ns: u64::MAX,
        }
    }

    /// Nanoseconds since the Unix epoch for monotonic time `mono_ns`.
    pub fn to_unix_ns(&mut self, mono_ns: u64) -> i128 {
        if self.sampled_at_mono_ns != u64::MAX
            && mono_ns > self.sampled_at_mono_ns.saturating_add(RESAMPLE_NS)
        {
            (self.offset_ns, self.sampled_at_mono_ns) = sample();
        }
        i128::from(mono_ns) + self.offset_ns
    }
}

/// `(CLOCK_REALTIME - CLOCK_MONOTONIC, CLOCK_MONOTONIC)` now. The monotonic read sits between two
/// real-time reads and is paired with their midpoint, which halves the error a preemption between the
/// reads could add.
fn sample() -> (i128, u64) {
    let before = now_ns(libc::CLOCK_REALTIME);
    let mono = now_ns(libc::CLOCK_MONOTONIC);
    let after = now_ns(libc::CLOCK_REALTIME);
    let real = before + (after - before) / 2;
    (real - mono, u64::try_from(mono).unwrap_or(0))
}

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; both clock ids exist on every Linux kernel, so the
    // call cannot fail (and on failure `ts` stays zero, which only skews a timestamp).
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;

    #[test]
    fn maps_now_to_now() {
        let mut clock = WallClock::new();
        let mono = u64::try_from(now_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0);
        let wall = clock.to_unix_ns(mono);
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i128::try_from(d.as_nanos()).unwrap_or(0))
            .unwrap_or(0);
        // Same instant within a generous scheduling margin.
        assert!((sys - wall).abs() < 50_000_000, "{sys} vs {wall}");
    }

    #[test]
    fn fixed_offset() {
        let mut clock = WallClock::fixed(1_000);
        assert_eq!(clock.to_unix_ns(5), 1_005);
        assert_eq!(
            clock.to_unix_ns(u64::MAX - 1),
            i128::from(u64::MAX - 1) + 1_000
        );
    }
}
