//! Helpers of the shim's end-to-end tests: where the build put `libgallocy.so` and the launcher,
//! required tools, scratch directories, and processes run with a hard timeout.
//!
//! Nothing here can hang a test: a process that outlives its timeout is killed (its whole
//! process group, with SIGKILL) and the test fails with everything it printed.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The workspace root (alloc-shim/..).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("alloc-shim has a parent").to_path_buf()
}

/// `target/<profile>` of the build that made this test executable (it lives in
/// `target/<profile>/deps/`), so debug tests use debug artifacts and release tests release ones.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("test executable lives in target/<profile>/deps").to_path_buf()
}

fn profile_name() -> String {
    profile_dir().file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "release".into())
}

fn build_hint() -> String {
    let flag = if profile_name() == "release" { " --release" } else { "" };
    format!("build it first: `cargo build{flag} -p gallocy-shim -p gallocy` in {}", workspace().display())
}

/// A build artifact in `target/<profile>`; fails the test with a build hint when it is missing.
pub fn artifact(name: &str) -> PathBuf {
    let p = profile_dir().join(name);
    assert!(p.exists(), "{} does not exist; {}", p.display(), build_hint());
    p
}

/// `target/<profile>/libgallocy.so`.
pub fn libgallocy() -> PathBuf {
    artifact("libgallocy.so")
}

/// `target/<profile>/gallocy` (the launcher).
pub fn launcher() -> PathBuf {
    artifact("gallocy")
}

/// `target/<profile>/pkgconfig` (holds gallocy.pc).
pub fn pkgconfig_dir() -> PathBuf {
    let d = profile_dir().join("pkgconfig");
    assert!(d.join("gallocy.pc").exists(), "{} does not exist; {}", d.join("gallocy.pc").display(), build_hint());
    d
}

/// The full path of `tool` on PATH; fails the test naming the Debian package that provides it.
pub fn require_tool(tool: &str, debian_package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(tool);
        if let Ok(meta) = p.metadata() {
            use std::os::unix::fs::PermissionsExt;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return p;
            }
        }
    }
    panic!("`{tool}` is not installed (not on PATH); install it with `apt-get install {debian_package}`");
}

/// Tests of one binary run their processes one at a time: the machine has 2 cores, and the
/// timeouts assume a process is not competing with another test's.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Remove every variable gallocy (or a launcher it recognizes) would read, and any preload; but
/// keep `GALLOCY_TRANSPORT`, with which the suite runs every job over one transport (the
/// Soft-RoCE guest sets `rdma`, .ci/guest-suite.sh).
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k == "GALLOCY_TRANSPORT" {
            continue;
        }
        if k == "LD_PRELOAD" || ["GALLOCY_", "OMPI_", "PMI_", "PMIX_", "SLURM_"].iter().any(|p| k.starts_with(p)) {
            cmd.env_remove(&k);
        }
    }
    cmd
}

/// A scratch directory, removed when dropped (kept when the test fails, for inspection).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let p = std::env::temp_dir().join(format!("gallocy-shim-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("(scratch directory kept: {})", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Render an exit status like a shell would.
pub fn describe(status: Option<ExitStatus>) -> String {
    match status {
        None => "still running (killed by the test)".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => {
                format!("killed by signal {sig}{}", if s.core_dumped() { " (core dumped)" } else { "" })
            }
            _ => format!("{s:?}"),
        },
    }
}

/// Keep the end of long outputs readable in panic messages.
pub fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("[... {start} bytes cut ...]\n{}", &s[start..])
}

/// A finished (or killed) process: what it printed and how it ended.
pub struct Finished {
    pub label: String,
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Everything known about the process, for failure messages.
    pub fn report(&self) -> String {
        format!(
            "--- {}: {} after {:.1} s\n--- stdout:\n{}\n--- stderr:\n{}\n",
            self.label,
            describe(self.status),
            self.elapsed.as_secs_f64(),
            tail(&self.stdout, 4000),
            tail(&self.stderr, 6000)
        )
    }

    /// Fail unless the process exited with status 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "{}: expected exit status 0\n{}", self.label, self.report());
        self
    }
}

fn pump(mut src: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            match src.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&chunk[..n]),
            }
        }
        all
    })
}

/// SIGKILL a whole process group (std has no killpg; the shell's kill does it).
fn kill_group(pgid: u32) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -KILL -- -{pgid} 2>/dev/null"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn wait_deadline(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Run `cmd` (in its own process group, stdin from `stdin` or /dev/null) to completion, killing
/// its process group and failing the test if it takes longer than `timeout`. The exit status is
/// not checked here.
pub fn run(label: &str, cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Finished {
    run_in_group(label, cmd, stdin, timeout, false)
}

/// [`run`]; with `kill_leftovers`, also kills whatever of the process group is still alive once
/// `cmd` ended.
fn run_in_group(
    label: &str,
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
    kill_leftovers: bool,
) -> Finished {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let t0 = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{label}: cannot start {cmd:?}: {e}"));
    let pid = child.id();
    let feeder = stdin.map(|data| {
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        })
    });
    let out = pump(child.stdout.take().unwrap());
    let err = pump(child.stderr.take().unwrap());
    let status = wait_deadline(&mut child, t0 + timeout);
    let elapsed = t0.elapsed();
    if status.is_none() {
        kill_group(pid);
        let _ = child.kill();
        let _ = child.wait();
    } else {
        // Processes the child left behind in its group must not hold the pipes forever.
        let grace = Instant::now() + Duration::from_secs(5);
        while !(out.is_finished() && err.is_finished()) && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(5));
        }
        if kill_leftovers || !(out.is_finished() && err.is_finished()) {
            kill_group(pid);
        }
    }
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let fin = Finished {
        label: label.to_string(),
        status,
        stdout: String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned(),
        elapsed,
    };
    assert!(status.is_some(), "{label}: did not finish within {timeout:?}; killed its process group\n{}", fin.report());
    eprintln!("{label}: {} after {:.2} s", describe(status), elapsed.as_secs_f64());
    fin
}

/// The first line where `a` and `b` differ, for failure messages.
pub fn first_difference(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    for i in 0..la.len().max(lb.len()) {
        let (x, y) = (la.get(i), lb.get(i));
        if x != y {
            return format!(
                "first difference at line {}:\n  without preload: {:?}\n  with preload:    {:?}",
                i + 1,
                x,
                y
            );
        }
    }
    if a != b {
        "outputs differ only in line endings or a trailing newline".into()
    } else {
        "no difference".into()
    }
}

/// A shell command line that reproduces `cmd` (its directory, its environment changes, its
/// arguments), for failure messages.
pub fn repro(cmd: &Command) -> String {
    let mut s = String::new();
    if let Some(d) = cmd.get_current_dir() {
        s.push_str(&format!("cd {} && ", sh_quote(&d.to_string_lossy())));
    }
    s.push_str("env");
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => s.push_str(&format!(" {}={}", k.to_string_lossy(), sh_quote(&v.to_string_lossy()))),
            None if std::env::var_os(k).is_some() => s.push_str(&format!(" -u {}", k.to_string_lossy())),
            None => {}
        }
    }
    s.push(' ');
    s.push_str(&sh_quote(&cmd.get_program().to_string_lossy()));
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&sh_quote(&a.to_string_lossy()));
    }
    s
}

/// `pkg-config --cflags --libs gallocy` against this build's .pc file.
pub fn pkg_config_flags() -> Vec<String> {
    require_tool("pkg-config", "pkg-config");
    let dir = pkgconfig_dir();
    let mut cmd = Command::new("pkg-config");
    clean_env(&mut cmd).env("PKG_CONFIG_PATH", &dir).args(["--cflags", "--libs", "gallocy"]);
    let f = run("pkg-config --cflags --libs gallocy", &mut cmd, None, Duration::from_secs(30));
    assert!(f.success(), "pkg-config cannot find gallocy with PKG_CONFIG_PATH={}\n{}", dir.display(), f.report());
    f.stdout.split_whitespace().map(str::to_string).collect()
}

/// Shell-quote a path or argument for reproduction commands in messages.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-=:,+@%".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Like [`run`], and then SIGKILLs whatever is left of the process group `cmd` ran in (e.g. the
/// forked children of a rank that died, which no longer hold the pipes `run` waits for), so that
/// nothing a test started outlives it.
pub fn run_and_kill_group(label: &str, cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Finished {
    run_in_group(label, cmd, stdin, timeout, true)
}
