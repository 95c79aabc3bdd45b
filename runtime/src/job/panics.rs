//! What a panic in one of the runtime's own threads does: it ends the process with one line.
//!
//! The runtime's threads (the service thread, the transports' dialer, keeper and RDMA connector,
//! all named `gallocy-…`) hold the job together: if one of them unwound and died, the process's
//! other threads would wait for it for ever, and so would its peers. So a panic there (a bug of
//! ours) prints `gallocy: rank R: fatal: internal error: thread T panicked at FILE:LINE: MESSAGE`
//! and ends the process with [`EXIT_INTERNAL`]; its peers then report it lost. A panic in any
//! other thread is the program's own business and goes to the hook that was there before.
//!
//! Two layers, since a program may install its own panic hook after joining: the hook
//! ([`install`]) catches the panic before it unwinds, and [`guarded`] catches the unwinding at the
//! bottom of a runtime thread.

use std::any::Any;
use std::panic::{self, PanicHookInfo};

use crate::sys::rawio::{exit_now, write_stderr};

/// Exit status of a process ended by a panic in a runtime thread (`EX_SOFTWARE`).
pub const EXIT_INTERNAL: i32 = 70;

/// Prefix of the names of the runtime's threads.
pub const THREAD_PREFIX: &str = "gallocy-";

/// Installs the panic hook that ends the process on a panic in a runtime thread, in front of the
/// hook already there (which keeps every other thread's panics). Call once, when joining.
pub fn install(rank: usize) {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info: &PanicHookInfo<'_>| {
        let thread = std::thread::current();
        match thread.name() {
            Some(name) if name.starts_with(THREAD_PREFIX) => {
                let at = info.location().map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()));
                end(rank, name, &at.unwrap_or_default(), info.payload_as_str())
            }
            _ => previous(info),
        }
    }));
}

/// Runs `body`, the whole of runtime thread `name`: a panic that unwinds out of it (one the hook
/// of [`install`] did not see, because the program replaced it) ends the process as that hook
/// would.
pub fn guarded<T>(rank: usize, name: &str, body: impl FnOnce() -> T) -> T {
    match panic::catch_unwind(panic::AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(payload) => end(rank, name, "", message(payload.as_ref())),
    }
}

/// The message of a panic's payload, if it has one.
fn message(payload: &(dyn Any + Send)) -> Option<&str> {
    payload.downcast_ref::<&str>().copied().or_else(|| payload.downcast_ref::<String>().map(String::as_str))
}

/// Prints the one line and ends the process.
fn end(rank: usize, thread: &str, at: &str, what: Option<&str>) -> ! {
    let what = what.unwrap_or("(a panic without a message)");
    let line = format!(
        "gallocy: rank {rank}: fatal: internal error: thread {thread} panicked{at}: {}\n",
        what.replace('\n', " ")
    );
    write_stderr(line.as_bytes());
    exit_now(EXIT_INTERNAL)
}

#[cfg(test)]
mod tests {
    //! Each case runs in a child process (this test binary again, running one ignored `child_`
    //! test), since a case that passes ends its process.
    use super::*;
    use std::process::Command;

    const CHILD: &str = "GALLOCY_PANICS_CHILD";

    fn run_child(test: &str) -> (Option<i32>, String) {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &format!("job::panics::tests::{test}"), "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn in_child() -> bool {
        std::env::var_os(CHILD).is_some()
    }

    /// Runs `body` in a thread named `name` and joins it; true if it panicked.
    fn in_thread(name: &str, body: impl FnOnce() + Send + 'static) -> bool {
        std::thread::Builder::new().name(name.into()).spawn(body).unwrap().join().is_err()
    }

    fn fatal_lines(stderr: &str) -> Vec<&str> {
        stderr.lines().filter(|l| l.starts_with("gallocy: ")).collect()
    }

    #[test]
    fn a_panic_in_a_runtime_thread_ends_the_process_with_one_line() {
        let (code, err) = run_child("child_runtime_thread_panics");
        assert_eq!(code, Some(EXIT_INTERNAL), "{err}");
        let lines = fatal_lines(&err);
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].starts_with("gallocy: rank 7: fatal: internal error: thread gallocy-test panicked at ")
                && lines[0].contains("panics.rs:")
                && lines[0].ends_with(": boom in the service: index 3"),
            "{err}"
        );
        assert!(!err.contains("thread 'gallocy-test'"), "the default hook must not print too:\n{err}");
    }

    #[test]
    #[ignore = "run in a child process by a_panic_in_a_runtime_thread_ends_the_process_with_one_line"]
    fn child_runtime_thread_panics() {
        if !in_child() {
            return;
        }
        install(7);
        in_thread("gallocy-test", || panic!("boom in the service: index {}", 3));
        eprintln!("the process went on after a runtime thread panicked");
    }

    #[test]
    fn a_panic_in_a_program_thread_is_left_to_the_program() {
        let (code, err) = run_child("child_program_thread_panics");
        assert_eq!(code, Some(0), "{err}");
        assert!(fatal_lines(&err).is_empty(), "{err}");
        assert!(
            err.contains("thread 'worker'") && err.contains("the program's own"),
            "the default hook prints it:\n{err}"
        );
        assert!(err.contains("joined: the program caught it"), "{err}");
    }

    #[test]
    #[ignore = "run in a child process by a_panic_in_a_program_thread_is_left_to_the_program"]
    fn child_program_thread_panics() {
        if !in_child() {
            return;
        }
        install(7);
        assert!(in_thread("worker", || panic!("the program's own")));
        eprintln!("joined: the program caught it");
    }

    #[test]
    fn a_runtime_thread_ends_the_process_even_under_a_programs_own_hook() {
        let (code, err) = run_child("child_hook_replaced");
        assert_eq!(code, Some(EXIT_INTERNAL), "{err}");
        let lines = fatal_lines(&err);
        assert_eq!(lines, ["gallocy: rank 2: fatal: internal error: thread gallocy-test panicked: replaced"], "{err}");
    }

    #[test]
    #[ignore = "run in a child process by a_runtime_thread_ends_the_process_even_under_a_programs_own_hook"]
    fn child_hook_replaced() {
        if !in_child() {
            return;
        }
        install(2);
        // The program installs a hook of its own after joining.
        panic::set_hook(Box::new(|_| {}));
        in_thread("gallocy-test", || guarded(2, "gallocy-test", || -> () { panic!("replaced") }));
        eprintln!("the process went on after a runtime thread panicked");
    }
}
