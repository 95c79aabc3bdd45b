//! The harness of gallocy's end-to-end tests (this package's `tests/`, alloc-shim's `tests/`):
//! processes with hard timeouts, jobs whose ranks are started directly or through the launcher,
//! the build's artifacts, free ports, tokens, scratch directories and output checks.
//!
//! Nothing here can hang a test: every wait has a deadline, after which the processes involved
//! (their whole process group) are killed with SIGKILL and the test fails with everything they
//! printed.
//!
//! The package also holds the test programs the tests run (`src/bin/`): `gallocy-scenario` and
//! `gallocy-global-alloc`. It is not published: nothing here is part of what gallocy ships.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gallocy_transport::coordinator::PortHold;

// ------------------------------------------------------------------------------ the build's artifacts

/// The workspace root (runtime/testkit/../..).
pub fn workspace() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors().nth(2).expect("runtime/testkit lies two levels below the workspace").to_path_buf()
}

/// `target/<profile>` of the build that made the running test executable (it lives in
/// `target/<profile>/deps/`), so debug tests use debug artifacts and release tests release ones.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("test executable lives in target/<profile>/deps").to_path_buf()
}

fn profile_name() -> String {
    profile_dir().file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "release".into())
}

/// What to run when an artifact of `package` is missing.
fn build_hint(package: &str) -> String {
    let flag = if profile_name() == "release" { " --release" } else { "" };
    format!("build it first: `cargo build{flag} -p {package}` in {}", workspace().display())
}

/// The build artifact `name` in `target/<profile>`, made by `package`; fails the test with a build
/// hint when it is missing.
pub fn artifact(name: &str, package: &str) -> PathBuf {
    let p = profile_dir().join(name);
    assert!(p.exists(), "{} does not exist; {}", p.display(), build_hint(package));
    p
}

/// `target/<profile>/libgallocy.so` (package gallocy-shim).
pub fn libgallocy() -> PathBuf {
    artifact("libgallocy.so", "gallocy-shim")
}

/// `target/<profile>/gallocy`, the launcher (package gallocy-cli).
pub fn launcher() -> PathBuf {
    artifact("gallocy", "gallocy-cli")
}

/// `target/<profile>/gallocy-scenario`, the scenario program of this package (cargo builds it for
/// this package's tests).
pub fn scenario() -> PathBuf {
    artifact("gallocy-scenario", "gallocy-testkit")
}

/// `target/<profile>/pkgconfig` (holds gallocy.pc, written by gallocy-shim's build).
pub fn pkgconfig_dir() -> PathBuf {
    let d = profile_dir().join("pkgconfig");
    let pc = d.join("gallocy.pc");
    assert!(pc.exists(), "{} does not exist; {}", pc.display(), build_hint("gallocy-shim"));
    d
}

// ------------------------------------------------------------------------------------ tools

/// The first executable file `prog` in `dirs`.
pub fn find_in(dirs: impl IntoIterator<Item = PathBuf>, prog: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    dirs.into_iter()
        .map(|d| d.join(prog))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The directories of PATH.
pub fn path_dirs() -> Vec<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect()
}

/// The full path of the executable `prog` on PATH.
pub fn find_in_path(prog: &str) -> Option<PathBuf> {
    find_in(path_dirs(), prog)
}

/// The full path of `tool` on PATH; fails the test naming the Debian package that provides it.
pub fn require_tool(tool: &str, debian_package: &str) -> PathBuf {
    find_in_path(tool).unwrap_or_else(|| {
        panic!("`{tool}` is not installed (not on PATH); install it with `apt-get install {debian_package}`")
    })
}

/// `pkg-config --cflags --libs gallocy` against this build's .pc file.
pub fn pkg_config_flags() -> Vec<String> {
    require_tool("pkg-config", "pkg-config");
    let dir = pkgconfig_dir();
    let mut cmd = Command::new("pkg-config");
    clean_env(&mut cmd).env("PKG_CONFIG_PATH", &dir).args(["--cflags", "--libs", "gallocy"]);
    let f = run("pkg-config --cflags --libs gallocy", &mut cmd, Duration::from_secs(30));
    assert!(f.success(), "pkg-config cannot find gallocy with PKG_CONFIG_PATH={}\n{}", dir.display(), f.report());
    f.stdout.split_whitespace().map(str::to_string).collect()
}

// --------------------------------------------------------------------------- the suite's settings

/// The processes of one test binary run one job at a time: the machine has 2 cores, every job
/// already runs several processes, and the timeouts assume a process does not compete with
/// another test's.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `GALLOCY_TEST_SLOW=1`: the suite runs on a machine many times slower than the 2-core host it
/// is sized for. CI sets it for its second run of the suites inside a QEMU TCG guest
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

/// Whether the runtime registers the heap with on-demand paging by default here
/// (`GALLOCY_RDMA_ODP=auto`), and so gives memory back over RDMA as over TCP: the first RDMA
/// device (`ibv_devinfo -v`) serves RDMA READs of on-demand-paging memory on reliable connections
/// (`SUPPORT_READ` under `rc_odp_caps`; Soft-RoCE from Linux 6.14 on), and is not Soft-RoCE
/// (vendor id 0xffffff) with an active MTU below 4096 (its on-demand copy is wrong for packets that
/// start inside a page). False without a device or without `ibv_devinfo`.
pub fn rdma_on_demand_reads() -> bool {
    let Ok(out) = Command::new("ibv_devinfo").arg("-v").output() else { return false };
    let text = String::from_utf8_lossy(&out.stdout);
    // The first device only (the runtime takes the first with an active port, which the guest's
    // one device is).
    let first = text.split("hca_id:").nth(1).unwrap_or("");
    let value = |key: &str| {
        first.lines().find_map(|l| l.trim().strip_prefix(key)).map(|v| v.trim().to_owned()).unwrap_or_default()
    };
    let soft_roce = value("vendor_id:") == "0xffffff";
    let mtu: u32 = value("active_mtu:").split_whitespace().next().and_then(|m| m.parse().ok()).unwrap_or(0);
    let mut in_rc = false;
    let mut reads = false;
    for line in first.lines() {
        let t = line.trim();
        if t.ends_with(':') || t.contains(":\t") || t.contains(": ") {
            in_rc = t.starts_with("rc_odp_caps:");
            continue;
        }
        reads |= in_rc && t == "SUPPORT_READ";
    }
    reads && !(soft_roce && mtu < 4096)
}

/// The transport the tests' jobs use: the test process's own `GALLOCY_TRANSPORT` (CI's second
/// run in the Soft-RoCE guest, `.ci/guest-suite.sh`, sets `rdma`), else none, i.e. the runtime's
/// default. [`clean_env`] removes it from the children like every other GALLOCY_* variable; what
/// starts a job puts it back explicitly ([`clean_env_with_transport`], [`launcher_for`],
/// [`JobBuilder`]), so every job of the suite runs over it.
pub fn transport() -> Option<String> {
    std::env::var("GALLOCY_TRANSPORT").ok().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty())
}

// ---------------------------------------------------------------------------------- environment

/// Remove every variable the runtime (or a launcher it recognizes, or the scenario program) would
/// read from the environment, and any preload.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k == "LD_PRELOAD"
            || ["GALLOCY_", "OMPI_", "PMI_", "PMIX_", "SLURM_", "SCENARIO_"].iter().any(|p| k.starts_with(p))
        {
            cmd.env_remove(&k);
        }
    }
    cmd
}

/// [`clean_env`], then `GALLOCY_TRANSPORT` set to the suite's [`transport`] if it has one: for a
/// command that starts or joins a job, which then runs over the suite's transport.
pub fn clean_env_with_transport(cmd: &mut Command) -> &mut Command {
    clean_env(cmd);
    if let Some(t) = transport() {
        cmd.env("GALLOCY_TRANSPORT", t);
    }
    cmd
}

// ------------------------------------------------------------------------------------- odds and ends

/// A TCP port on 127.0.0.1 that was free a moment ago, for a server this test does not start
/// itself (one that cannot join a [`PortHold`]: `mpirun`'s ranks given only
/// `GALLOCY_COORDINATOR`, slurmctld). See [`free_ports`].
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `k` TCP ports on 127.0.0.1 that were free a moment ago, all different (the listeners are held
/// until all are found). They are drawn at random from outside the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), which every outgoing connection and every bind to port 0
/// of the host draws from: only another explicit bind to the same port can take one before the
/// server binds it.
pub fn free_ports(k: usize) -> Vec<u16> {
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut w = s.split_whitespace().map(|w| w.parse::<u32>().ok());
            Some((w.next()??, w.next()??))
        })
        .unwrap_or((32768, 60999));
    // Below the range if there is room (ports under 10000 are left to well-known services), else
    // above it.
    let (from, to) = if low >= 12_000 { (10_000, low) } else { (high + 1, 65_536) };
    assert!(to > from + 1000, "no room for test ports outside the ephemeral range {low}-{high}");
    let mut listeners: Vec<std::net::TcpListener> = Vec::new();
    let mut tries = 0;
    while listeners.len() < k {
        tries += 1;
        assert!(tries < 10_000, "no free port found in {from}..{to}");
        let mut b = [0u8; 4];
        getrandom::getrandom(&mut b).expect("getrandom");
        let port = from + u32::from_le_bytes(b) % (to - from);
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            listeners.push(l);
        }
    }
    listeners.iter().map(|l| l.local_addr().expect("local_addr").port()).collect()
}

/// A fresh job secret.
pub fn token() -> String {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).expect("getrandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A scratch directory, removed when dropped (kept when the test fails, for inspection).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let p = std::env::temp_dir().join(format!("gallocy-test-{name}-{}-{nanos}", std::process::id()));
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

/// Count lines of `text` that start with `prefix`.
pub fn count_lines(text: &str, prefix: &str) -> usize {
    text.lines().filter(|l| l.starts_with(prefix)).count()
}

/// Shell-quote a path or argument for reproduction commands in messages.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-=:,+@%".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
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

// ---------------------------------------------------------------------------------- processes

/// How long the processes a child left in its group may keep its output pipes open after it
/// exited, before the group is killed.
const PIPE_GRACE: Duration = Duration::from_secs(5);

fn pump(mut src: impl Read + Send + 'static, buf: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 65536];
        loop {
            match src.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]),
            }
        }
    })
}

fn text(buf: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// A child process (and its process group) whose stdout and stderr are collected as they come.
pub struct Proc {
    pub label: String,
    child: Child,
    pid: u32,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
    started: Instant,
    ended: Option<Instant>,
    /// Processes of the group were still holding the output pipes after the child exited.
    pub stragglers: bool,
}

impl Proc {
    /// Spawn `cmd` in a new process group with piped output and stdin from /dev/null.
    pub fn spawn(label: impl Into<String>, cmd: &mut Command) -> Proc {
        Proc::spawn_with_stdin(label, cmd, None)
    }

    /// Spawn `cmd` in a new process group with piped output and `stdin` (or /dev/null) as its
    /// standard input.
    pub fn spawn_with_stdin(label: impl Into<String>, cmd: &mut Command, stdin: Option<&[u8]>) -> Proc {
        let label = label.into();
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let started = Instant::now();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{label}: cannot spawn {cmd:?}: {e}"));
        if let Some(data) = stdin {
            let mut w = child.stdin.take().unwrap();
            let data = data.to_vec();
            // Detached: it ends when the data is written or the reader is gone (EPIPE).
            std::thread::spawn(move || {
                let _ = w.write_all(&data);
            });
        }
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let readers =
            vec![pump(child.stdout.take().unwrap(), out.clone()), pump(child.stderr.take().unwrap(), err.clone())];
        let pid = child.id();
        Proc { label, child, pid, out, err, readers, status: None, started, ended: None, stragglers: false }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What it printed on stdout so far.
    pub fn stdout(&self) -> String {
        text(&self.out)
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        text(&self.err)
    }

    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Time from the start to the exit (or until now).
    pub fn elapsed(&self) -> Duration {
        self.ended.unwrap_or_else(Instant::now) - self.started
    }

    /// Poll for exit without blocking.
    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
                self.ended = Some(Instant::now());
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

    /// Wait up to `timeout` for exit; if it is still running then, kill its process group, give
    /// it 5 s to go, and return false.
    pub fn wait_or_kill(&mut self, timeout: Duration) -> bool {
        if self.wait_until(Instant::now() + timeout).is_some() {
            return true;
        }
        self.kill_group();
        let _ = self.wait_until(Instant::now() + Duration::from_secs(5));
        false
    }

    /// After the child exited: let the readers reach EOF; if something else in the process
    /// group still holds the pipes after a grace period, kill the group.
    fn drain(&mut self) {
        let t0 = Instant::now();
        while self.readers.iter().any(|r| !r.is_finished()) {
            if t0.elapsed() > PIPE_GRACE {
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

    /// The record of the process as it is now (its output so far).
    pub fn snapshot(&self) -> Finished {
        Finished {
            label: self.label.clone(),
            pid: self.pid,
            status: self.status,
            stdout: self.stdout(),
            stderr: self.stderr(),
            elapsed: self.elapsed(),
            stragglers: self.stragglers,
        }
    }

    /// Everything known about the process, for failure messages.
    pub fn report(&self) -> String {
        self.snapshot().report()
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

/// A process that ended (or was killed): what it printed and how it ended.
pub struct Finished {
    pub label: String,
    pub pid: u32,
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// Processes of its group were still holding the output pipes after it exited (and were
    /// killed).
    pub stragglers: bool,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// The exit code (None if it was killed by a signal, or is still running).
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Everything known about the process, for failure messages.
    pub fn report(&self) -> String {
        format!(
            "--- {} (pid {}): {} after {:.1} s{}\n--- stdout:\n{}\n--- stderr:\n{}\n",
            self.label,
            self.pid,
            describe(self.status),
            self.elapsed.as_secs_f64(),
            if self.stragglers { " [left processes behind holding its output]" } else { "" },
            tail(&self.stdout, 6000),
            tail(&self.stderr, 6000)
        )
    }

    /// Fail unless the process exited with status 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "{}: expected exit status 0\n{}", self.label, self.report());
        self
    }
}

/// `p` to completion within `timeout` (else its group is killed and the test fails with its
/// output); with `kill_leftovers`, whatever is left of its process group is killed afterwards.
fn complete(mut p: Proc, timeout: Duration, kill_leftovers: bool) -> Finished {
    if !p.wait_or_kill(timeout) {
        panic!("{}: did not finish within {timeout:?}; killed its process group\n{}", p.label, p.report());
    }
    if kill_leftovers {
        p.kill_group();
    }
    let f = p.snapshot();
    eprintln!("{}: {} after {:.2} s", f.label, describe(f.status), f.elapsed.as_secs_f64());
    f
}

/// Run `cmd` (in its own process group, stdin from /dev/null) to completion with a hard timeout:
/// on timeout the process group is killed and the test fails with the output. The exit status
/// is not checked here.
pub fn run(label: &str, cmd: &mut Command, timeout: Duration) -> Finished {
    complete(Proc::spawn(label, cmd), timeout, false)
}

/// [`run`] with `stdin` (or /dev/null) as the standard input.
pub fn run_with_stdin(label: &str, cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Finished {
    complete(Proc::spawn_with_stdin(label, cmd, stdin), timeout, false)
}

/// Like [`run`], and then SIGKILLs whatever is left of the process group `cmd` ran in (e.g. the
/// forked children of a rank that died, which no longer hold the pipes `run` waits for), so that
/// nothing a test started outlives it.
pub fn run_and_kill_group(label: &str, cmd: &mut Command, timeout: Duration) -> Finished {
    complete(Proc::spawn(label, cmd), timeout, true)
}

// --------------------------------------------------------------------------------------- jobs

/// `gallocy run -n N [--transport T] -- PROGRAM` with a clean environment (T: [`transport`]);
/// append PROGRAM's arguments.
pub fn launcher_for(n: usize, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(launcher());
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
    let mut cmd = launcher_for(n, scenario());
    cmd.args(scenario_args);
    cmd
}

/// Run a scenario through the launcher and require success plus the PASS line of every rank.
pub fn launch_ok(n: usize, scenario_args: &[&str], timeout: Duration) -> Finished {
    let name = scenario_args[0];
    let label = format!("gallocy run -n {n} -- gallocy-scenario {}", scenario_args.join(" "));
    let p = run(&label, &mut launcher_cmd(n, scenario_args), timeout);
    assert!(p.success(), "{label}: expected exit 0, got {}\n{}", describe(p.status), p.report());
    let all = format!("{}{}", p.stdout, p.stderr);
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
    /// The coordinator's port, held for the job as `gallocy run` holds it (none for a coordinator
    /// that is not on this host's loopback).
    _hold: Option<Arc<PortHold>>,
}

impl Job {
    /// Describe the job: `n` ranks, a coordinator port held for it (`GALLOCY_COORDINATOR_HELD=1`)
    /// and a fresh token.
    pub fn builder(n: usize) -> JobBuilder {
        let hold = PortHold::loopback().expect("hold a loopback port for the coordinator");
        JobBuilder {
            n,
            coordinator: hold.addr().to_string(),
            token: token(),
            extra: vec![Vec::new(); n],
            hold: Arc::new(hold),
        }
    }

    /// A job of `ranks` started by the caller, whose coordinator's port no [`PortHold`] of this
    /// process holds (another network namespace's, say).
    pub fn of(ranks: Vec<Proc>, coordinator: &str, token: &str) -> Job {
        Job { ranks, coordinator: coordinator.to_owned(), token: token.to_owned(), _hold: None }
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
    hold: Arc<PortHold>,
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
        let mut cmd = Command::new(scenario());
        clean_env_with_transport(&mut cmd)
            .args(args)
            .env("GALLOCY_RANK", r.to_string())
            .env("GALLOCY_SIZE", self.n.to_string())
            .env("GALLOCY_COORDINATOR", &self.coordinator)
            .env("GALLOCY_COORDINATOR_HELD", "1")
            .env("GALLOCY_TOKEN", &self.token);
        for (k, v) in &self.extra[r] {
            cmd.env(k, v);
        }
        cmd
    }

    /// Start rank `r` (e.g. the one left out of [`spawn`](Self::spawn)'s, to start later).
    pub fn spawn_rank(&self, r: usize, args: &[&str]) -> Proc {
        Proc::spawn(format!("rank {r}"), &mut self.command(r, args))
    }

    /// Start every rank.
    pub fn spawn(self, args: &[&str]) -> Job {
        let ranks = (0..self.n).map(|r| self.spawn_rank(r, args)).collect();
        self.job(ranks)
    }

    /// The job of `ranks`, started from this description (it holds the coordinator's port as
    /// long as it lives).
    pub fn job(&self, ranks: Vec<Proc>) -> Job {
        Job { ranks, coordinator: self.coordinator.clone(), token: self.token.clone(), _hold: Some(self.hold.clone()) }
    }
}
