//! Shared helpers of the end-to-end tests: processes with hard timeouts, jobs whose ranks are
//! started directly, free ports, tokens and output checks.
//!
//! Nothing here can hang a test: every wait has a deadline, after which the processes involved
//! are killed with SIGKILL and the test fails with everything they printed.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const SCENARIO: &str = env!("CARGO_BIN_EXE_gallocy-scenario");
pub const LAUNCHER: &str = env!("CARGO_BIN_EXE_gallocy");

/// Jobs of one test binary run one at a time: the machine has 2 cores and every job already
/// runs several processes, so overlapping jobs would only make the timings erratic.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `GALLOCY_TEST_SLOW=1`: the suite runs on a machine many times slower than the 2-core host it
/// is sized for. CI sets it for its second run of this suite inside a QEMU TCG guest
/// (`.ci/guest-suite.sh`), where every instruction is emulated and a job's page transfers, locks
/// and barriers are several times slower. Then the tests whose work would not fit their limits do
/// less of it ([`count`]: fewer increments, rounds) and get more time ([`limit`]); what they check
/// stays the same (every increment counted, every round's outcome checked, every rank's exit),
/// and each count keeps enough iterations to contend. Unset (the host run), nothing changes.
pub fn slow() -> bool {
    std::env::var("GALLOCY_TEST_SLOW").is_ok_and(|v| v.trim() == "1")
}

/// How much longer a time limit is under [`slow`].
pub const SLOW_TIME_FACTOR: u32 = 3;

/// A time limit: `d`, or [`SLOW_TIME_FACTOR`] times `d` under [`slow`].
pub fn limit(d: Duration) -> Duration {
    if slow() {
        d * SLOW_TIME_FACTOR
    } else {
        d
    }
}

/// An iteration count (or a duration) as a scenario argument: `normal`, or `slow_count` under
/// [`slow`].
pub fn count(normal: usize, slow_count: usize) -> String {
    if slow() { slow_count } else { normal }.to_string()
}

/// The transport the tests' jobs use: the test process's own `GALLOCY_TRANSPORT` (CI's second
/// run in the Soft-RoCE guest, `.ci/guest-suite.sh`, sets `rdma`), else none, i.e. the runtime's
/// default. `clean_env` removes it from the children like every other GALLOCY_* variable; the
/// helpers that start jobs (`launcher_for`, `JobBuilder`) put it back explicitly, so every job of
/// the suite runs over it.
pub fn transport() -> Option<String> {
    std::env::var("GALLOCY_TRANSPORT").ok().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty())
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// A fresh job secret.
pub fn token() -> String {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).expect("getrandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Remove every variable the runtime (or its fallbacks) would read from the environment.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if ["GALLOCY_", "OMPI_", "PMI_", "PMIX_", "SLURM_", "SCENARIO_"].iter().any(|p| k.starts_with(p)) {
            cmd.env_remove(&k);
        }
    }
    cmd
}

/// Render an exit status like a shell would.
pub fn describe(status: Option<ExitStatus>) -> String {
    match status {
        None => "still running (killed by the test)".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
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
    format!("[... {} bytes cut ...]\n{}", start, &s[start..])
}

fn pump(mut src: impl Read + Send + 'static, buf: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match src.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.lock().unwrap_or_else(|e| e.into_inner()).push_str(&String::from_utf8_lossy(&chunk[..n])),
            }
        }
    })
}

/// A child process (and its process group) whose stdout and stderr are collected as they come.
pub struct Proc {
    pub label: String,
    child: Child,
    pid: u32,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
    /// Processes of the group were still holding the output pipes after the child exited.
    pub stragglers: bool,
}

impl Proc {
    /// Spawn `cmd` in a new process group with piped output.
    pub fn spawn(label: impl Into<String>, cmd: &mut Command) -> Proc {
        let label = label.into();
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{label}: cannot spawn {cmd:?}: {e}"));
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        let readers =
            vec![pump(child.stdout.take().unwrap(), out.clone()), pump(child.stderr.take().unwrap(), err.clone())];
        let pid = child.id();
        Proc { label, child, pid, out, err, readers, status: None, stragglers: false }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn stdout(&self) -> String {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn stderr(&self) -> String {
        self.err.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Poll for exit without blocking.
    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
                self.drain();
            }
        }
        self.status
    }

    /// Wait for exit until `deadline`; None if still running.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(s) = self.poll() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// After the child exited: let the readers reach EOF; if something else in the process
    /// group still holds the pipes after a grace period, kill the group.
    fn drain(&mut self) {
        let t0 = Instant::now();
        while self.readers.iter().any(|r| !r.is_finished()) {
            if t0.elapsed() > Duration::from_secs(3) {
                self.stragglers = true;
                self.kill_group();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for r in self.readers.drain(..) {
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }

    /// SIGKILL the child's whole process group.
    pub fn kill_group(&self) {
        // SAFETY: kill(2) with a negative pid signals the process group we created for the child;
        // it has no memory-safety preconditions.
        unsafe { libc::kill(-(self.pid as i32), libc::SIGKILL) };
    }

    /// SIGKILL just the child (Child::kill).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Wait until `pred(stdout)` holds; false on exit or timeout.
    pub fn wait_for_stdout(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.stdout()) {
                return true;
            }
            if self.poll().is_some() || Instant::now() >= deadline {
                return pred(&self.stdout());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything known about the process, for failure messages.
    pub fn report(&self) -> String {
        format!(
            "--- {} (pid {}): {}{}\n--- stdout:\n{}\n--- stderr:\n{}\n",
            self.label,
            self.pid,
            describe(self.status),
            if self.stragglers { " [left processes behind holding its output]" } else { "" },
            tail(&self.stdout(), 6000),
            tail(&self.stderr(), 6000)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill_group();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run `cmd` to completion with a hard timeout: on timeout the process group is killed and the
/// test fails with the output.
pub fn run(label: &str, cmd: &mut Command, timeout: Duration) -> Proc {
    let mut p = Proc::spawn(label, cmd);
    let t0 = Instant::now();
    if p.wait_until(t0 + timeout).is_none() {
        p.kill_group();
        let _ = p.wait_until(Instant::now() + Duration::from_secs(5));
        panic!("{label}: did not finish within {timeout:?}; killed.\n{}", p.report());
    }
    eprintln!("{label}: {} after {:.1} s", describe(p.status()), t0.elapsed().as_secs_f64());
    p
}

/// `gallocy run -n N [--transport T] -- PROGRAM` with a clean environment (T: [`transport`]);
/// append PROGRAM's arguments.
pub fn launcher_for(n: usize, program: &str) -> Command {
    let mut cmd = Command::new(LAUNCHER);
    clean_env(&mut cmd);
    cmd.arg("run").arg("-n").arg(n.to_string());
    if let Some(t) = transport() {
        cmd.arg("--transport").arg(t);
    }
    cmd.arg("--").arg(program);
    cmd
}

/// `gallocy run -n N -- gallocy-scenario ARGS...` with a clean environment.
pub fn launcher_cmd(n: usize, scenario_args: &[&str]) -> Command {
    let mut cmd = launcher_for(n, SCENARIO);
    cmd.args(scenario_args);
    cmd
}

/// Run a scenario through the launcher and require success plus the PASS line of every rank.
pub fn launch_ok(n: usize, scenario_args: &[&str], timeout: Duration) -> Proc {
    let name = scenario_args[0];
    let label = format!("gallocy run -n {n} -- gallocy-scenario {}", scenario_args.join(" "));
    let p = run(&label, &mut launcher_cmd(n, scenario_args), timeout);
    let status = p.status().unwrap();
    assert!(status.success(), "{label}: expected exit 0, got {}\n{}", describe(Some(status)), p.report());
    let all = format!("{}{}", p.stdout(), p.stderr());
    for r in 0..n {
        let pass = format!("rank {r}: {name} ok");
        assert!(all.contains(&pass), "{label}: no {pass:?} line\n{}", p.report());
    }
    assert!(!p.stragglers, "{label}: the launcher exited but left processes behind\n{}", p.report());
    p
}

/// The ranks of one job started directly (no launcher), each with its own environment.
pub struct Job {
    pub ranks: Vec<Proc>,
    pub coordinator: String,
    pub token: String,
}

impl Job {
    /// Describe the job: `n` ranks, a fresh coordinator port and token.
    pub fn builder(n: usize) -> JobBuilder {
        JobBuilder { n, coordinator: format!("127.0.0.1:{}", free_port()), token: token(), extra: vec![Vec::new(); n] }
    }

    pub fn wait_all(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut all = true;
        for p in &mut self.ranks {
            all &= p.wait_until(deadline).is_some();
        }
        all
    }

    pub fn report(&self) -> String {
        let mut s = format!("job: coordinator {}\n", self.coordinator);
        for p in &self.ranks {
            s.push_str(&p.report());
        }
        s
    }

    /// Wait for every rank; on timeout kill everything and fail with the output.
    pub fn wait_or_fail(&mut self, what: &str, timeout: Duration) {
        if !self.wait_all(timeout) {
            let running: Vec<String> =
                self.ranks.iter().filter(|p| p.status().is_none()).map(|p| p.label.clone()).collect();
            for p in &self.ranks {
                p.kill_group();
            }
            let msg =
                format!("{what}: {} still running after {timeout:?} (killed)\n{}", running.join(", "), self.report());
            for p in &mut self.ranks {
                let _ = p.wait_until(Instant::now() + Duration::from_secs(5));
            }
            panic!("{msg}");
        }
    }

    pub fn assert_all_ok(&self, what: &str, name: &str) {
        for (r, p) in self.ranks.iter().enumerate() {
            let st = p.status();
            assert!(
                st.is_some_and(|s| s.success()),
                "{what}: rank {r} {}, expected exit 0\n{}",
                describe(st),
                self.report()
            );
            let pass = format!("rank {r}: {name} ok");
            assert!(p.stdout().contains(&pass), "{what}: rank {r} printed no {pass:?}\n{}", self.report());
        }
    }
}

pub struct JobBuilder {
    pub n: usize,
    pub coordinator: String,
    pub token: String,
    extra: Vec<Vec<(String, String)>>,
}

impl JobBuilder {
    /// Set `key=value` for rank `r` (overrides the defaults).
    pub fn env(mut self, r: usize, key: &str, value: &str) -> Self {
        self.extra[r].push((key.into(), value.into()));
        self
    }

    /// Set `key=value` for every rank.
    pub fn env_all(mut self, key: &str, value: &str) -> Self {
        for e in &mut self.extra {
            e.push((key.into(), value.into()));
        }
        self
    }

    /// The command for rank `r` (GALLOCY_RANK/SIZE/COORDINATOR/TOKEN, GALLOCY_TRANSPORT if the
    /// suite runs over a chosen [`transport`], plus the extras).
    pub fn command(&self, r: usize, args: &[&str]) -> Command {
        let mut cmd = Command::new(SCENARIO);
        clean_env(&mut cmd);
        cmd.args(args)
            .env("GALLOCY_RANK", r.to_string())
            .env("GALLOCY_SIZE", self.n.to_string())
            .env("GALLOCY_COORDINATOR", &self.coordinator)
            .env("GALLOCY_TOKEN", &self.token);
        if let Some(t) = transport() {
            cmd.env("GALLOCY_TRANSPORT", t);
        }
        for (k, v) in &self.extra[r] {
            cmd.env(k, v);
        }
        cmd
    }

    /// Start ranks `ranks` (e.g. all, or all but one to start later) into `job`.
    pub fn spawn_rank(&self, r: usize, args: &[&str]) -> Proc {
        Proc::spawn(format!("rank {r}"), &mut self.command(r, args))
    }

    /// Start every rank.
    pub fn spawn(self, args: &[&str]) -> Job {
        let ranks = (0..self.n).map(|r| self.spawn_rank(r, args)).collect();
        Job { ranks, coordinator: self.coordinator, token: self.token }
    }
}

/// Count lines of `text` that start with `prefix`.
pub fn count_lines(text: &str, prefix: &str) -> usize {
    text.lines().filter(|l| l.starts_with(prefix)).count()
}
