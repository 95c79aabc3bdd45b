//! What the kernel refuses: a job whose system calls fail where they normally succeed ends
//! with one clear line per rank, naming what failed, and no process hangs. The refusals are
//! real: a seccomp filter makes the kernel fail the call with `EPERM`.

use gallocy_testkit::*;
use std::os::unix::process::CommandExt;
use std::time::Duration;

/// `setsockopt(fd, SOL_SOCKET, SO_SNDBUF or SO_RCVBUF, ...)` fails with `EPERM` in the calling
/// process and everything it starts; every other system call goes through.
///
/// # Safety
/// Runs between fork and exec: only `prctl`, which is async-signal-safe.
unsafe fn refuse_socket_buffer_sizes() -> std::io::Result<()> {
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
                                   // Offsets in `struct seccomp_data`: nr, arch, then args[] from 16, 8 bytes each (the low
                                   // half first: little-endian).
    const NR: u32 = 0;
    const ARCH_AT: u32 = 4;
    const LEVEL_AT: u32 = 16 + 8;
    const NAME_AT: u32 = 16 + 2 * 8;
    let load =
        |at: u32| libc::sock_filter { code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, jt: 0, jf: 0, k: at };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let ret = |k: u32| libc::sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k };
    let filter = [
        load(ARCH_AT),
        jeq(ARCH, 0, 8),
        load(NR),
        jeq(libc::SYS_setsockopt as u32, 0, 6),
        load(LEVEL_AT),
        jeq(libc::SOL_SOCKET as u32, 0, 4),
        load(NAME_AT),
        jeq(libc::SO_SNDBUF as u32, 1, 0),
        jeq(libc::SO_RCVBUF as u32, 0, 1),
        ret(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        ret(libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
    // SAFETY: prctl with valid arguments; the filter outlives the call (the kernel copies it).
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The TCP links' socket buffer sizes cannot be set: before, the result was ignored and a link
/// could block both service threads in `send`; now every rank stops at start-up with a line
/// that names the option, and the launcher reports them.
#[test]
fn a_refused_socket_buffer_size_stops_the_job_with_a_clear_error() {
    let _g = serial();
    let label = "gallocy run -n 2 -- gallocy-scenario pingpong --rounds 100, setsockopt(SO_SNDBUF, SO_RCVBUF) refused";
    let mut cmd = launcher_cmd(2, &["pingpong", "--rounds", "100"]);
    // The RDMA transport's links carry no page traffic over TCP sockets of this kind.
    cmd.env("GALLOCY_TRANSPORT", "tcp");
    // SAFETY: the closure only calls prctl (see refuse_socket_buffer_sizes).
    unsafe { cmd.pre_exec(|| refuse_socket_buffer_sizes()) };
    let p = run(label, &mut cmd, limit(Duration::from_secs(60)));
    let report = p.report();
    assert!(p.status.is_some_and(|s| !s.success()), "{label}: must fail\n{report}");
    for r in 0..2 {
        let line = p
            .stderr
            .lines()
            .find(|l| l.starts_with(&format!("[rank {r}] ")) && l.contains(&format!("gallocy: rank {r}: ")));
        assert!(
            line.is_some_and(|l| l.contains("SO_SNDBUF") && l.contains("Operation not permitted")),
            "{label}: rank {r} must say that setting SO_SNDBUF was refused\n{report}"
        );
    }
    assert!(!p.stderr.contains("panicked"), "{label}: no panic\n{report}");
}
