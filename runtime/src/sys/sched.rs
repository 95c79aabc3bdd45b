//! Scheduling the service thread: a time slice of its own (`GALLOCY_SERVICE_SLICE_US`), and a
//! priority above the application's when asked for and allowed (`GALLOCY_SERVICE_NICE`).
//!
//! The service thread answers peers (revocations, grants, diffs) for a process whose
//! application threads may hold every CPU, for example spinning on a shared flag. Under the
//! kernel's EEVDF scheduler (Linux 6.12 and later) a task with a shorter slice than the default
//! gets an earlier deadline, and a woken task with a shorter slice preempts the running one, so
//! the service thread answers sooner. Asking needs no privilege; older kernels refuse or
//! ignore the request and nothing changes.

use std::time::Duration;

/// `struct sched_attr` of `<linux/sched/types.h>`, first version (48 bytes).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Asks for a slice of `slice` for the calling thread, keeping its policy (normal) and nice
/// value. Returns whether the kernel took the request.
pub fn request_slice(slice: Duration) -> bool {
    let nice = thread_nice();
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime: slice.as_nanos() as u64,
        deadline: 0,
        period: 0,
    };
    // SAFETY: pid 0 is the calling thread; `attr` is a valid sched_attr of the size it states,
    // alive for the call.
    unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) == 0 }
}

/// Sets the calling thread's nice value to `wanted`, or, where the process may not go that low
/// (no `CAP_SYS_NICE`), to the lowest that `RLIMIT_NICE` allows, if that is below the thread's
/// current one. Returns the nice value the thread has afterwards.
pub fn request_nice(wanted: i32) -> i32 {
    let now = thread_nice();
    if set_thread_nice(wanted) {
        return wanted;
    }
    // RLIMIT_NICE r lets an unprivileged process go down to 20 - r (getrlimit(2)).
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid rlimit for the call to fill.
    let floor = if unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut lim) } == 0 {
        20 - lim.rlim_cur.min(40) as i32
    } else {
        now
    };
    let allowed = wanted.max(floor);
    if allowed < now && set_thread_nice(allowed) {
        return allowed;
    }
    now
}

/// The calling thread's nice value.
fn thread_nice() -> i32 {
    // SAFETY: getpriority has no memory arguments; errno is thread-local. PRIO_PROCESS with the
    // thread's id names that thread alone (Linux).
    unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t)
    }
}

fn set_thread_nice(nice: i32) -> bool {
    // SAFETY: setpriority has no memory arguments; PRIO_PROCESS with the thread's id names that
    // thread alone (Linux).
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) == 0 }
}

/// The slice the calling thread has, in ns (0 where the kernel does not report one).
#[cfg(test)]
pub fn current_slice_ns() -> u64 {
    let mut attr = SchedAttr { size: 0, policy: 0, flags: 0, nice: 0, priority: 0, runtime: 0, deadline: 0, period: 0 };
    // SAFETY: pid 0 is the calling thread; `attr` has room for the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            std::mem::size_of::<SchedAttr>() as u32,
            0,
        )
    };
    if rc == 0 {
        attr.runtime
    } else {
        0
    }
}

/// Whether a CPU is free for the calling thread to spin on, from the kernel's count of runnable
/// threads (`/proc/loadavg`, which counts the caller too) and the CPUs this process may use. A
/// service thread that spins while every CPU has work takes one from a thread that computes or
/// answers.
pub struct RunQueue {
    loadavg: Option<std::fs::File>,
    cpus: usize,
}

impl RunQueue {
    /// Opens `/proc/loadavg` once; without it (no `/proc`) a CPU always counts as free, and the
    /// service thread spins as configured.
    pub fn open() -> RunQueue {
        RunQueue {
            loadavg: std::fs::File::open("/proc/loadavg").ok(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Whether the runnable threads of the system, the caller included, are no more than the
    /// CPUs this process may use (true when the kernel does not say). One `pread`.
    pub fn cpu_free(&self) -> bool {
        use std::os::unix::fs::FileExt;
        let Some(f) = &self.loadavg else { return true };
        let mut buf = [0u8; 128];
        let Ok(n) = f.read_at(&mut buf, 0) else { return true };
        runnable(&buf[..n]).is_none_or(|r| r <= self.cpus)
    }
}

/// The runnable threads in a `/proc/loadavg` line: `R` of its fourth field `R/T`.
fn runnable(line: &[u8]) -> Option<usize> {
    let field = line.split(|b| *b == b' ').nth(3)?;
    let r = field.split(|b| *b == b'/').next()?;
    std::str::from_utf8(r).ok()?.parse().ok()
}

/// Gives the CPU to another runnable thread (`sched_yield`). Async-signal-safe.
pub fn yield_cpu() {
    // SAFETY: sched_yield has no arguments and cannot fail in a way that matters.
    unsafe { libc::sched_yield() };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (major, minor) of the running kernel.
    fn kernel_version() -> (u32, u32) {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse().ok());
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    }

    #[test]
    fn a_thread_gets_the_nice_value_it_may_have_and_only_it_changes() {
        let outside = thread_nice();
        let (lower, higher) = std::thread::spawn(|| {
            let before = thread_nice();
            let got = request_nice(-20);
            assert_eq!(got, thread_nice(), "the value returned is the thread's");
            assert!(got <= before, "asking for -20 never raises the nice value ({before} -> {got})");
            // SAFETY: geteuid has no arguments.
            if unsafe { libc::geteuid() } == 0 {
                assert_eq!(got, -20, "root may take -20");
            }
            // Going up is always allowed.
            (got, request_nice(19))
        })
        .join()
        .unwrap();
        assert!(lower <= outside);
        assert_eq!(higher, 19);
        assert_eq!(thread_nice(), outside, "other threads keep theirs");
    }

    #[test]
    fn the_runnable_count_is_read_from_loadavg() {
        assert_eq!(runnable(b"0.52 0.58 0.59 3/467 12345\n"), Some(3));
        assert_eq!(runnable(b"0.52 0.58 0.59\n"), None);
        assert_eq!(runnable(b"a b c x/1 2"), None);
        // This thread runs, so the kernel counts at least one runnable thread.
        let q = RunQueue::open();
        let line = std::fs::read("/proc/loadavg").unwrap();
        assert!(runnable(&line).is_some_and(|r| r >= 1), "{}", String::from_utf8_lossy(&line));
        // With every CPU busy spinning (and this thread too), none is free.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinners: Vec<_> = (0..q.cpus)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || while !stop.load(std::sync::atomic::Ordering::Relaxed) {})
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let busy = (0..20).filter(|_| !q.cpu_free()).count();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in spinners {
            t.join().unwrap();
        }
        assert!(busy >= 15, "a CPU looked free while every CPU spun: {busy} of 20 reads said busy");
    }

    #[test]
    fn a_slice_is_taken_where_the_kernel_offers_slices() {
        std::thread::spawn(|| {
            let took = request_slice(Duration::from_micros(250));
            if kernel_version() >= (6, 12) {
                // Custom slices for normal tasks (and preemption by a shorter one) exist here.
                assert!(took, "sched_setattr refused the slice");
                assert_eq!(current_slice_ns(), 250_000);
            } else {
                // Older kernels accept or refuse the request, and keep their own slices.
                eprintln!("kernel {:?}: no custom slices; request taken: {took}", kernel_version());
            }
        })
        .join()
        .unwrap();
    }
}
