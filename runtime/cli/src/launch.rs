//! Local launcher: runs N ranks of a program on this machine (`gallocy run`), and the
//! process-group runner it is built on ([`run_group`]), which the benchmarks use too.
//!
//! [`run`]: every rank gets the environment contract of the runtime (`GALLOCY_RANK`,
//! `GALLOCY_SIZE`, `GALLOCY_COORDINATOR`, `GALLOCY_TOKEN`, `GALLOCY_TRANSPORT`)
//! on top of the launcher's own environment and [`LaunchSpec::env`]. The
//! launcher forwards each rank's stdout/stderr line by line with a `[rank i] `
//! prefix, waits for all ranks, and when one fails gives the others
//! [`LaunchSpec::grace`] to exit by themselves before killing them.
//!
//! [`run_group`]: starts any set of processes ([`Member`]s) with their own arguments,
//! environment and label, forwards their lines with a `[label] ` prefix or keeps some of them
//! ([`Lines::Collect`]), and stops the others after the first failure ([`GroupOptions::grace`])
//! or when a time limit passes ([`GroupOptions::timeout`]). It reports what happens as
//! [`GroupEvent`]s and returns a [`GroupReport`].
//!
//! Children get `PR_SET_PDEATHSIG = SIGKILL`, so they die with the thread that
//! called [`run`] or [`run_group`]; call them from a thread that outlives the job (normally
//! the main thread). Children's stdin is `/dev/null`.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gallocy_transport::coordinator::PortHold;

/// Largest number of ranks the launcher starts: the largest job.
pub const MAX_RANKS: usize = gallocy::MAX_PROCESSES;
/// Transports built into this build (`auto`: RDMA when every rank has a usable device, else TCP;
/// without the RDMA transport, `auto` means TCP). Follows the runtime's build
/// ([`gallocy::RDMA_BUILT`], the cargo feature `rdma`).
pub const TRANSPORTS: &[&str] = if gallocy::RDMA_BUILT { &["auto", "tcp", "rdma"] } else { &["auto", "tcp"] };
/// Default time the other ranks get to exit after one rank failed.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for a rank's pipes to close after all ranks exited
/// (a process started by a rank may keep them open).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Interval at which the launcher checks on its children.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Longest line forwarded in one piece; longer output is cut into pieces.
const MAX_LINE: usize = 1 << 20;

/// What to launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// Number of ranks (1..=[`MAX_RANKS`]).
    pub nprocs: usize,
    /// Program every rank runs (looked up in `PATH` like a shell does).
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Value of `GALLOCY_TRANSPORT`; one of [`TRANSPORTS`].
    pub transport: String,
    /// Extra environment for every rank (the `GALLOCY_*` contract wins over it).
    pub env: Vec<(OsString, OsString)>,
    /// Time the other ranks get to exit after one rank failed.
    pub grace: Duration,
}

impl LaunchSpec {
    /// `nprocs` ranks of `program args` over the default transport (`GALLOCY_TRANSPORT`, else
    /// auto), no extra env, default grace.
    pub fn new(nprocs: usize, program: impl Into<OsString>, args: Vec<OsString>) -> Self {
        LaunchSpec {
            nprocs,
            program: program.into(),
            args,
            transport: default_transport(),
            env: Vec::new(),
            grace: DEFAULT_GRACE,
        }
    }

    /// Checks the rank count, the program and the transport.
    pub fn validate(&self) -> Result<(), LaunchError> {
        if self.nprocs == 0 || self.nprocs > MAX_RANKS {
            return Err(LaunchError::RankCount { nprocs: self.nprocs, max: MAX_RANKS });
        }
        if self.program.is_empty() {
            return Err(LaunchError::NoProgram);
        }
        check_transport(&self.transport)
    }
}

/// Raises the soft limit on open files to `need`, or as near as the hard limit allows.
fn raise_open_files(need: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit take one valid rlimit pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < need {
            lim.rlim_cur = need.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Errors of the launcher itself (a failing rank is not an error: see [`run`]).
///
/// In the variants about one process, `rank` is its index in the group (its rank for [`run`])
/// and `label` its [`Member::label`] (`rank i` for [`run`]).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("the number of processes must be between 1 and {max}, not {nprocs}")]
    RankCount { nprocs: usize, max: usize },
    #[error("no program to run")]
    NoProgram,
    #[error("transport \"{0}\" is not built in this build (available: {list}; rebuild with the cargo feature `rdma`)", list = TRANSPORTS.join(", "))]
    TransportNotBuilt(String),
    #[error("unknown transport \"{0}\" (available: {list})", list = TRANSPORTS.join(", "))]
    UnknownTransport(String),
    #[error("cannot reserve a loopback port for the coordinator: {0}")]
    Port(#[source] io::Error),
    #[error("cannot generate the job token: {0}")]
    Token(String),
    #[error("cannot start {label} ({program}): {source}")]
    Spawn {
        rank: usize,
        label: String,
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the output thread of {label}: {source}")]
    Thread {
        rank: usize,
        label: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot wait for {label}: {source}")]
    Wait {
        rank: usize,
        label: String,
        #[source]
        source: io::Error,
    },
}

impl LaunchError {
    /// True for errors in the request (bad count, program or transport).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            LaunchError::RankCount { .. }
                | LaunchError::NoProgram
                | LaunchError::TransportNotBuilt(_)
                | LaunchError::UnknownTransport(_)
        )
    }

    /// Exit code for a command-line launcher: 2 for usage errors, 127 when the
    /// program does not exist, 126 when it cannot be executed, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            e if e.is_usage() => 2,
            LaunchError::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound => 127,
            LaunchError::Spawn { .. } => 126,
            _ => 1,
        }
    }
}

/// The transport when none is asked for: `GALLOCY_TRANSPORT` if set, else `auto`.
pub fn default_transport() -> String {
    std::env::var("GALLOCY_TRANSPORT")
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "auto".into())
}

/// Checks that `transport` is built into this build.
pub fn check_transport(transport: &str) -> Result<(), LaunchError> {
    match transport {
        t if TRANSPORTS.contains(&t) => Ok(()),
        "rdma" => Err(LaunchError::TransportNotBuilt(transport.to_string())),
        _ => Err(LaunchError::UnknownTransport(transport.to_string())),
    }
}

/// How one rank (or group member) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankOutcome {
    /// Exited by itself with this code.
    Exited(i32),
    /// Killed by this signal (not sent by the launcher).
    Signaled { signal: i32, core_dumped: bool },
    /// Killed by the launcher after the grace period (or the group's time limit).
    StoppedByLauncher,
}

impl RankOutcome {
    /// True unless the rank exited with code 0.
    pub fn failed(&self) -> bool {
        *self != RankOutcome::Exited(0)
    }

    /// Exit code the launcher reports for this outcome (128 + signal if killed).
    pub fn exit_code(&self) -> i32 {
        match *self {
            RankOutcome::Exited(code) => code,
            RankOutcome::Signaled { signal, .. } => 128 + signal,
            RankOutcome::StoppedByLauncher => 128 + libc::SIGKILL,
        }
    }

    /// "rank i exited with code C" and friends (without the "gallocy run: " prefix).
    pub fn describe(&self, rank: usize) -> String {
        self.describe_as(&format!("rank {rank}"))
    }

    /// "WHO exited with code C", "WHO was killed by signal 11 (SIGSEGV)", "WHO was stopped by
    /// the launcher".
    pub fn describe_as(&self, who: &str) -> String {
        match *self {
            RankOutcome::Exited(code) => format!("{who} exited with code {code}"),
            RankOutcome::Signaled { signal, core_dumped } => format!(
                "{who} was killed by signal {signal} ({}){}",
                signal_name(signal),
                if core_dumped { " (core dumped)" } else { "" }
            ),
            RankOutcome::StoppedByLauncher => format!("{who} was stopped by the launcher"),
        }
    }

    fn from_status(status: ExitStatus, killed_by_us: bool) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => RankOutcome::Exited(code),
            (None, Some(libc::SIGKILL)) if killed_by_us => RankOutcome::StoppedByLauncher,
            (None, Some(signal)) => RankOutcome::Signaled { signal, core_dumped: status.core_dumped() },
            (None, None) => RankOutcome::Exited(1), // not reachable on Unix
        }
    }
}

/// Name of a signal number, e.g. "SIGSEGV" for 11.
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGCONT => "SIGCONT",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return format!("SIG{signal}"),
    };
    name.to_string()
}

// ---------------------------------------------------------------- gallocy run

/// Runs the job described by `spec` and returns the exit code the launcher
/// should exit with: 0 when every rank exited 0, otherwise the code of the
/// first rank (in time) that failed (128 + signal if it was killed).
pub fn run(spec: &LaunchSpec) -> Result<i32, LaunchError> {
    spec.validate()?;
    // Two pipes per rank stay open here: room for them as far as the hard limit allows (beyond
    // it, starting a rank fails and says so).
    raise_open_files(2 * spec.nprocs as u64 + 256);
    catch_stop_signals();
    let job = LocalJob::new()?;
    let members = (0..spec.nprocs)
        .map(|rank| {
            let mut env = spec.env.clone();
            env.extend(job.rank_env(rank, spec.nprocs));
            env.push(("GALLOCY_TRANSPORT".into(), spec.transport.clone().into()));
            Member { label: format!("rank {rank}"), program: spec.program.clone(), args: spec.args.clone(), env }
        })
        .collect();
    let opts = GroupOptions { grace: spec.grace, ..GroupOptions::default() };
    let mut told = vec![false; spec.nprocs];
    let report = run_group(members, &opts, &mut |event| {
        match event {
        GroupEvent::Failed { index, outcome, .. } => {
            told[index] = true;
            say(&outcome.describe(index))
        }
        GroupEvent::Stopping { index, .. } => say(&format!("stopping rank {index}")),
        GroupEvent::OutputStillOpen { streams } => say(&format!(
            "{streams} output stream(s) still open after all ranks exited (held by a process a rank started); not waiting for them"
        )),
        GroupEvent::TimedOut => {}
    }
    })?;
    if let Some(sig) = interrupted() {
        say(&format!("stopped by signal {sig} ({}): every rank was stopped", signal_name(sig)));
        return Ok(128 + sig);
    }
    // One line per failed rank (those not reported as they failed), then the exit code of the
    // first failure.
    if report.first_failure.is_some() {
        for (rank, outcome) in report.outcomes.iter().enumerate().filter(|(r, o)| o.failed() && !told[*r]) {
            say(&outcome.describe(rank));
        }
    }
    Ok(report.exit_code())
}

/// Writes "gallocy run: MSG" to stderr as one line.
fn say(msg: &str) {
    let line = format!("gallocy run: {msg}\n");
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

/// The rendezvous of a job on this machine: the coordinator's loopback address, held for the job
/// while this lives, and the job's token, i.e. what [`LocalJob::rank_env`] hands every rank.
#[derive(Debug)]
pub struct LocalJob {
    /// `127.0.0.1:PORT` (rank 0 listens there).
    pub coordinator: String,
    /// The job's secret (`GALLOCY_TOKEN`).
    pub token: String,
    /// Keeps the coordinator's port from every other socket until rank 0 listens on it (see
    /// `gallocy_transport::coordinator`); dropped with this, when the job is over.
    hold: PortHold,
}

impl LocalJob {
    /// A coordinator on a 127.0.0.1 port held for the job, and [`job_token`].
    pub fn new() -> Result<Self, LaunchError> {
        let hold = PortHold::loopback().map_err(LaunchError::Port)?;
        Ok(LocalJob { coordinator: hold.addr().to_string(), token: job_token()?, hold })
    }

    /// The port held for the coordinator.
    pub fn port(&self) -> u16 {
        self.hold.port()
    }

    /// `GALLOCY_RANK`, `GALLOCY_SIZE`, `GALLOCY_COORDINATOR`, `GALLOCY_COORDINATOR_HELD` and
    /// `GALLOCY_TOKEN` of rank `rank` of a `size`-rank job (`GALLOCY_TRANSPORT` is left to the
    /// caller). The ranks must start while this lives.
    pub fn rank_env(&self, rank: usize, size: usize) -> Vec<(OsString, OsString)> {
        vec![
            ("GALLOCY_RANK".into(), rank.to_string().into()),
            ("GALLOCY_SIZE".into(), size.to_string().into()),
            ("GALLOCY_COORDINATOR".into(), self.coordinator.clone().into()),
            ("GALLOCY_COORDINATOR_HELD".into(), "1".into()),
            ("GALLOCY_TOKEN".into(), self.token.clone().into()),
        ]
    }
}

/// `GALLOCY_TOKEN` from the launcher's environment, or 32 fresh hex digits.
pub fn job_token() -> Result<String, LaunchError> {
    if let Some(token) = std::env::var("GALLOCY_TOKEN").ok().filter(|t| !t.is_empty()) {
        return Ok(token);
    }
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|e| LaunchError::Token(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

// ---------------------------------------------------------------- process groups

/// One process of a group started by [`run_group`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Names the process in [`GroupEvent`]s and errors, and prefixes its forwarded lines
    /// (`[label] `); `rank i` for [`run`].
    pub label: String,
    /// Program to run (looked up in `PATH` like a shell does).
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Set on top of the launcher's environment, in order (a later entry wins).
    pub env: Vec<(OsString, OsString)>,
}

impl Member {
    /// `program args` named `label`, with the launcher's environment.
    pub fn new<A: Into<OsString>>(
        label: impl Into<String>,
        program: impl Into<OsString>,
        args: impl IntoIterator<Item = A>,
    ) -> Self {
        Member {
            label: label.into(),
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
        }
    }

    /// Adds `key=value` to the member's environment.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Adds every pair of `vars` to the member's environment.
    pub fn envs<K: Into<OsString>, V: Into<OsString>>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Self {
        self.env.extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }
}

/// What happens to the lines a group member writes on one of its output streams.
#[derive(Debug, Clone, Copy)]
pub enum Lines {
    /// Not captured: the member writes straight to the launcher's stream of the same kind.
    Inherit,
    /// Forwarded line by line to the launcher's stream of the same kind, prefixed with
    /// `[label] `. Lines of different members never mix; a last line without newline gets one.
    Prefixed,
    /// Lines (without their newline) for which the function is true are kept
    /// ([`GroupReport::collected`]) instead of forwarded; the others are forwarded as with
    /// [`Lines::Prefixed`].
    Collect(fn(&str) -> bool),
}

/// How [`run_group`] treats its members.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// The members' stdout.
    pub stdout: Lines,
    /// The members' stderr.
    pub stderr: Lines,
    /// After the first failure, the time the others get to exit by themselves before they are
    /// killed (SIGKILL). Zero: at once.
    pub grace: Duration,
    /// Time limit for the whole group: when it passes, every member still running is killed.
    pub timeout: Option<Duration>,
    /// How long to wait for the members' output streams to close after all exited (a process a
    /// member started may hold them open).
    pub drain: Duration,
}

impl Default for GroupOptions {
    /// Both streams [`Lines::Prefixed`], [`DEFAULT_GRACE`], no time limit, [`DRAIN_TIMEOUT`].
    fn default() -> Self {
        GroupOptions {
            stdout: Lines::Prefixed,
            stderr: Lines::Prefixed,
            grace: DEFAULT_GRACE,
            timeout: None,
            drain: DRAIN_TIMEOUT,
        }
    }
}

/// What happens while a group runs, as it happens (see [`run_group`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupEvent<'a> {
    /// The group's first failure (of the members found failed at the same time, the likeliest
    /// cause: a member killed by a signal, then one that failed by itself, then one that exited
    /// with [`gallocy::EXIT_PEER_LOST`]); the grace period starts.
    Failed { index: usize, label: &'a str, outcome: RankOutcome },
    /// The group's time limit passed; the members still running are stopped next.
    TimedOut,
    /// A member still running after the grace period or the time limit is killed.
    Stopping { index: usize, label: &'a str },
    /// All members exited but `streams` of their output streams are still open (held by a
    /// process a member started); they are not waited for.
    OutputStillOpen { streams: usize },
}

/// How a group ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupReport {
    /// How each member ended, in member order.
    pub outcomes: Vec<RankOutcome>,
    /// Index of the member of the first failure ([`GroupEvent::Failed`]), if any.
    pub first_failure: Option<usize>,
    /// True when the time limit passed.
    pub timed_out: bool,
    /// Lines kept by [`Lines::Collect`]: (member index, line without its newline), in the order
    /// they arrived.
    pub collected: Vec<(usize, String)>,
}

impl GroupReport {
    /// True when every member exited with code 0.
    pub fn success(&self) -> bool {
        self.first_failure.is_none() && !self.timed_out
    }

    /// 0 on success, else the exit code of the first failure (128 + signal if it was killed; 1
    /// if that would be 0).
    pub fn exit_code(&self) -> i32 {
        match self.first_failure {
            Some(first) => match self.outcomes[first].exit_code() {
                0 => 1,
                code => code,
            },
            None if self.timed_out => 128 + libc::SIGKILL,
            None => 0,
        }
    }
}

/// Starts every member, handles their output as `opts` says, and waits for all of them. After
/// the first failure the others get [`GroupOptions::grace`] and are then killed; when
/// [`GroupOptions::timeout`] passes, all that still run are killed. `on_event` hears of the
/// first failure, a time-out and every kill when they happen (and of output streams left
/// open at the end).
///
/// A member that cannot be started is an error (the members already started are killed); a
/// member that fails is not: see [`GroupReport`].
pub fn run_group(
    members: Vec<Member>,
    opts: &GroupOptions,
    on_event: &mut dyn FnMut(GroupEvent<'_>),
) -> Result<GroupReport, LaunchError> {
    let mut group = Group::new();
    for (index, member) in members.into_iter().enumerate() {
        group.spawn(index, member, opts)?;
    }
    let (outcomes, first_failure, timed_out) = group.wait_all(opts.grace, opts.timeout, on_event)?;
    group.drain_output(opts.drain, on_event);
    let collected = group.take_collected();
    Ok(GroupReport { outcomes, first_failure, timed_out, collected })
}

/// Signals that stop a job: the launcher stops every rank and exits with 128 + the signal.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The stop signal the launcher received, or 0.
static INTERRUPTED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    INTERRUPTED.store(sig, std::sync::atomic::Ordering::SeqCst);
}

/// Whether (and by which signal) the launcher was told to stop.
fn interrupted() -> Option<i32> {
    Some(INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)).filter(|s| *s != 0)
}

/// Catches [`STOP_SIGNALS`] (even if the launcher inherited them ignored): the job is stopped,
/// not left running without its launcher.
fn catch_stop_signals() {
    for sig in STOP_SIGNALS {
        // SAFETY: installing a handler that only stores to an atomic (async-signal-safe).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Makes the child receive SIGKILL when the spawning thread dies.
#[cfg(target_os = "linux")]
fn die_with_launcher(cmd: &mut Command) {
    // SAFETY: getpid has no preconditions.
    let launcher = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and only calls
    // async-signal-safe functions (prctl, getppid) and builds an io::Error
    // from an errno value, which does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Default dispositions for the signals that stop a job, whatever the launcher
            // inherited (a background job of a script starts with SIGINT ignored).
            for sig in STOP_SIGNALS {
                libc::signal(sig, libc::SIG_DFL);
            }
            // The launcher may have died before prctl took effect.
            if libc::getppid() != launcher {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_launcher(_cmd: &mut Command) {}

/// One started member.
struct Proc {
    label: String,
    child: Child,
    /// Set once reaped.
    outcome: Option<RankOutcome>,
    killed_by_us: bool,
}

/// A running group; kills and reaps leftover children on drop.
struct Group {
    procs: Vec<Proc>,
    readers: Vec<JoinHandle<()>>,
    /// Each reader thread sends one message when its pipe reached EOF.
    done_tx: Option<mpsc::Sender<()>>,
    done_rx: mpsc::Receiver<()>,
    /// Lines kept by [`Lines::Collect`].
    collected_tx: Option<mpsc::Sender<(usize, String)>>,
    collected_rx: mpsc::Receiver<(usize, String)>,
}

impl Group {
    fn new() -> Self {
        let (done_tx, done_rx) = mpsc::channel();
        let (collected_tx, collected_rx) = mpsc::channel();
        Group {
            procs: Vec::new(),
            readers: Vec::new(),
            done_tx: Some(done_tx),
            done_rx,
            collected_tx: Some(collected_tx),
            collected_rx,
        }
    }

    /// Starts `member` as member `index` and the reader threads for its pipes.
    fn spawn(&mut self, index: usize, member: Member, opts: &GroupOptions) -> Result<(), LaunchError> {
        let stdio = |lines: Lines| match lines {
            Lines::Inherit => Stdio::inherit(),
            Lines::Prefixed | Lines::Collect(_) => Stdio::piped(),
        };
        let mut cmd = Command::new(&member.program);
        cmd.args(&member.args)
            .envs(member.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdio(opts.stdout))
            .stderr(stdio(opts.stderr));
        die_with_launcher(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            rank: index,
            label: member.label.clone(),
            program: member.program.to_string_lossy().into_owned(),
            source,
        })?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let label = member.label;
        self.procs.push(Proc { label: label.clone(), child, outcome: None, killed_by_us: false });
        if let Some(out) = stdout {
            self.start_reader(index, &label, Pipe::Out(out), opts.stdout)?;
        }
        if let Some(err) = stderr {
            self.start_reader(index, &label, Pipe::Err(err), opts.stderr)?;
        }
        Ok(())
    }

    fn start_reader(&mut self, index: usize, label: &str, pipe: Pipe, lines: Lines) -> Result<(), LaunchError> {
        let done = self.done_tx.clone().expect("readers start before the drain");
        let prefix = format!("[{label}] ");
        let collector = match lines {
            Lines::Collect(filter) => {
                Some((filter, self.collected_tx.clone().expect("readers start before the collection")))
            }
            Lines::Inherit | Lines::Prefixed => None,
        };
        let handle = std::thread::Builder::new()
            .name(format!("gallocy-run-{index}-{}", pipe.label()))
            .spawn(move || {
                let mut keep = |body: &[u8]| match &collector {
                    Some((filter, tx)) => {
                        let line = String::from_utf8_lossy(body);
                        let line = line.trim_end_matches(['\n', '\r']);
                        filter(line) && {
                            let _ = tx.send((index, line.to_string()));
                            true
                        }
                    }
                    None => false,
                };
                pipe.forward(&prefix, &mut keep);
                let _ = done.send(());
            })
            .map_err(|source| LaunchError::Thread { rank: index, label: label.to_string(), source })?;
        self.readers.push(handle);
        Ok(())
    }

    /// Waits for every member; after the first failure the others get `grace`,
    /// then are killed, and when `timeout` passes all are killed. Returns the outcomes in
    /// member order, the index of the first failure and whether the time limit passed.
    fn wait_all(
        &mut self,
        grace: Duration,
        timeout: Option<Duration>,
        on_event: &mut dyn FnMut(GroupEvent<'_>),
    ) -> Result<(Vec<RankOutcome>, Option<usize>, bool), LaunchError> {
        let started = Instant::now();
        let mut first_failure = None;
        let mut deadline: Option<Instant> = None;
        let mut timed_out = false;
        loop {
            // Of the members found failed in one round, report the likeliest cause first: one
            // killed by a signal, then one that failed by itself, then those that only stopped
            // because they lost a peer (exit status EXIT_PEER_LOST).
            let mut failed_now = Vec::new();
            for idx in 0..self.procs.len() {
                if let Some(outcome) = self.poll(idx)? {
                    if outcome.failed() {
                        failed_now.push((idx, outcome));
                    }
                }
            }
            failed_now.sort_by_key(|(_, o)| match o {
                RankOutcome::Signaled { .. } => 0,
                RankOutcome::Exited(code) if *code != gallocy::EXIT_PEER_LOST => 1,
                _ => 2,
            });
            if let (Some(&(idx, outcome)), None) = (failed_now.first(), first_failure) {
                first_failure = Some(idx);
                on_event(GroupEvent::Failed { index: idx, label: &self.procs[idx].label, outcome });
                deadline = Some(Instant::now() + grace);
            }
            if self.procs.iter().all(|p| p.outcome.is_some()) {
                break;
            }
            if interrupted().is_some() && deadline != Some(started) {
                // The launcher was told to stop (SIGINT, SIGTERM, SIGHUP): so is every member.
                self.stop_remaining(on_event);
                deadline = Some(started);
            } else if !timed_out && timeout.is_some_and(|t| started.elapsed() >= t) {
                timed_out = true;
                on_event(GroupEvent::TimedOut);
                self.stop_remaining(on_event);
                deadline = None;
            } else if deadline.is_some_and(|d| d != started && Instant::now() >= d) {
                self.stop_remaining(on_event);
                deadline = None;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        let all = self.procs.iter().map(|p| p.outcome.expect("all reaped")).collect();
        Ok((all, first_failure, timed_out))
    }

    /// Reaps member `idx` if it has exited; returns its outcome only when it
    /// exited during this call.
    fn poll(&mut self, idx: usize) -> Result<Option<RankOutcome>, LaunchError> {
        let proc = &mut self.procs[idx];
        if proc.outcome.is_some() {
            return Ok(None);
        }
        let status = proc.child.try_wait().map_err(|source| LaunchError::Wait {
            rank: idx,
            label: proc.label.clone(),
            source,
        })?;
        let outcome = status.map(|s| RankOutcome::from_status(s, proc.killed_by_us));
        proc.outcome = outcome;
        Ok(outcome)
    }

    /// SIGKILLs every member still running.
    fn stop_remaining(&mut self, on_event: &mut dyn FnMut(GroupEvent<'_>)) {
        for (index, proc) in self.procs.iter_mut().enumerate().filter(|(_, p)| p.outcome.is_none()) {
            on_event(GroupEvent::Stopping { index, label: &proc.label });
            proc.killed_by_us = true;
            let _ = proc.child.kill();
        }
    }

    /// Waits up to `timeout` for the reader threads to see EOF, joins those
    /// that finished, and leaves the rest (held open by some other process).
    fn drain_output(&mut self, timeout: Duration, on_event: &mut dyn FnMut(GroupEvent<'_>)) {
        drop(self.done_tx.take());
        let deadline = Instant::now() + timeout;
        let mut pending = self.readers.len();
        while pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.done_rx.recv_timeout(left).is_err() {
                break;
            }
            pending -= 1;
        }
        if pending == 0 {
            // Every reader saw its end of file and is returning: joining waits for nothing.
            for handle in std::mem::take(&mut self.readers) {
                let _ = handle.join();
            }
            return;
        }
        // Join those that are done; the `pending` others are held open by some other process.
        let (finished, _open): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.readers).into_iter().partition(|h| h.is_finished());
        for handle in finished {
            let _ = handle.join();
        }
        on_event(GroupEvent::OutputStillOpen { streams: pending });
    }

    /// The lines kept so far, in arrival order.
    fn take_collected(&mut self) -> Vec<(usize, String)> {
        drop(self.collected_tx.take());
        self.collected_rx.try_iter().collect()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for proc in self.procs.iter_mut().filter(|p| p.outcome.is_none()) {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
    }
}

/// A pipe of a member and where its lines go.
enum Pipe {
    Out(ChildStdout),
    Err(ChildStderr),
}

impl Pipe {
    fn label(&self) -> &'static str {
        match self {
            Pipe::Out(_) => "stdout",
            Pipe::Err(_) => "stderr",
        }
    }

    /// Copies the pipe to the launcher's stdout/stderr until EOF, except the lines `keep`
    /// takes.
    fn forward(self, prefix: &str, keep: &mut dyn FnMut(&[u8]) -> bool) {
        match self {
            Pipe::Out(p) => forward_lines(p, prefix, &mut io::stdout(), keep),
            Pipe::Err(p) => forward_lines(p, prefix, &mut io::stderr(), keep),
        }
    }
}

/// Destination of forwarded lines; each call writes one whole line.
trait LineSink {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()>;
}

impl LineSink for io::Stdout {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let mut out = self.lock();
        out.write_all(line)?;
        out.flush()
    }
}

impl LineSink for io::Stderr {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        self.lock().write_all(line)
    }
}

impl LineSink for Vec<u8> {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        self.extend_from_slice(line);
        Ok(())
    }
}

/// Reads `input` to EOF and writes every line, prefixed, to `sink` (stdout and
/// stderr are locked per line, so lines from different threads never mix),
/// except those for which `keep(line)` (the line as read, without prefix) takes them.
/// A last line without newline gets one. After a write error the rest is read
/// and dropped (but still offered to `keep`), so the member never blocks on a full pipe.
fn forward_lines<R: Read>(input: R, prefix: &str, sink: &mut dyn LineSink, keep: &mut dyn FnMut(&[u8]) -> bool) {
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    let mut line = Vec::with_capacity(256);
    let mut healthy = true;
    loop {
        line.clear();
        line.extend_from_slice(prefix.as_bytes());
        match read_line_capped(&mut reader, &mut line, MAX_LINE) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        if keep(&line[prefix.len()..]) {
            continue;
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        if healthy {
            healthy = sink.write_line(&line).is_ok();
        }
    }
}

/// Appends bytes up to and including the next newline (or at most `cap`
/// bytes) to `buf`; returns how many were appended (0 at EOF).
fn read_line_capped<R: BufRead>(reader: &mut R, buf: &mut Vec<u8>, cap: usize) -> io::Result<usize> {
    let mut total = 0;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(total);
        }
        let room = cap - total;
        let window = &available[..available.len().min(room)];
        let (take, done) = match window.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (window.len(), window.len() == room),
        };
        buf.extend_from_slice(&window[..take]);
        reader.consume(take);
        total += take;
        if done {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(input: &[u8]) -> String {
        let mut out = Vec::new();
        forward_lines(input, "[rank 3] ", &mut out, &mut |_| false);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lines_get_prefixed_and_terminated() {
        assert_eq!(forwarded(b""), "");
        assert_eq!(forwarded(b"a\nb\n"), "[rank 3] a\n[rank 3] b\n");
        assert_eq!(forwarded(b"a\n\nlast"), "[rank 3] a\n[rank 3] \n[rank 3] last\n");
    }

    #[test]
    fn kept_lines_are_not_forwarded() {
        let mut out = Vec::new();
        let mut kept = Vec::new();
        forward_lines(&b"a\n@keep 1\nb\n@keep 2"[..], "[x] ", &mut out, &mut |l| {
            l.starts_with(b"@keep") && {
                kept.push(String::from_utf8_lossy(l).into_owned());
                true
            }
        });
        assert_eq!(String::from_utf8(out).unwrap(), "[x] a\n[x] b\n");
        assert_eq!(kept, ["@keep 1\n", "@keep 2"]);
    }

    #[test]
    fn overlong_lines_are_cut() {
        let mut reader = BufReader::with_capacity(4, &b"abcdefghij\nk"[..]);
        let mut buf = Vec::new();
        assert_eq!(read_line_capped(&mut reader, &mut buf, 6).unwrap(), 6);
        assert_eq!(buf, b"abcdef");
        buf.clear();
        assert_eq!(read_line_capped(&mut reader, &mut buf, 6).unwrap(), 5);
        assert_eq!(buf, b"ghij\n");
        buf.clear();
        assert_eq!(read_line_capped(&mut reader, &mut buf, 6).unwrap(), 1);
        assert_eq!(read_line_capped(&mut reader, &mut buf, 6).unwrap(), 0);
    }

    #[test]
    fn outcomes_describe_themselves() {
        assert!(!RankOutcome::Exited(0).failed());
        assert_eq!(RankOutcome::Exited(3).describe(1), "rank 1 exited with code 3");
        let segv = RankOutcome::Signaled { signal: libc::SIGSEGV, core_dumped: false };
        assert_eq!(segv.describe(0), "rank 0 was killed by signal 11 (SIGSEGV)");
        assert_eq!(segv.exit_code(), 139);
        assert_eq!(RankOutcome::StoppedByLauncher.describe(2), "rank 2 was stopped by the launcher");
        assert_eq!(RankOutcome::Exited(1).describe_as("floor-server"), "floor-server exited with code 1");
        assert_eq!(signal_name(64), "SIG64");
    }

    #[test]
    fn spec_validation() {
        let ok = LaunchSpec::new(2, "true", vec![]);
        assert!(ok.validate().is_ok());
        let bad = |f: &dyn Fn(&mut LaunchSpec)| {
            let mut s = ok.clone();
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert!(matches!(bad(&|s| s.nprocs = 0), LaunchError::RankCount { .. }));
        assert!(matches!(bad(&|s| s.nprocs = MAX_RANKS + 1), LaunchError::RankCount { .. }));
        assert!(matches!(bad(&|s| s.program = OsString::new()), LaunchError::NoProgram));
        if gallocy::RDMA_BUILT {
            assert!(check_transport("rdma").is_ok());
        } else {
            let rdma = bad(&|s| s.transport = "rdma".into());
            assert!(rdma.to_string().contains("not built"), "{rdma}");
            assert_eq!(rdma.exit_code(), 2);
        }
        assert!(check_transport("auto").is_ok() && check_transport("tcp").is_ok());
        assert!(matches!(bad(&|s| s.transport = "udp".into()), LaunchError::UnknownTransport(_)));
    }

    #[test]
    fn token_is_32_hex_digits() {
        if std::env::var_os("GALLOCY_TOKEN").is_some() {
            return;
        }
        let t = job_token().unwrap();
        assert_eq!(t.len(), 32);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(t, job_token().unwrap());
    }

    #[test]
    fn rank_env_is_the_contract() {
        let job = LocalJob::new().unwrap();
        let env: Vec<(String, String)> =
            job.rank_env(1, 3).into_iter().map(|(k, v)| (k.into_string().unwrap(), v.into_string().unwrap())).collect();
        let coordinator = format!("127.0.0.1:{}", job.port());
        let want = [
            ("GALLOCY_RANK", "1"),
            ("GALLOCY_SIZE", "3"),
            ("GALLOCY_COORDINATOR", coordinator.as_str()),
            ("GALLOCY_COORDINATOR_HELD", "1"),
            ("GALLOCY_TOKEN", job.token.as_str()),
        ];
        assert_eq!(env, want.map(|(k, v)| (k.to_string(), v.to_string())));
        assert_ne!(job.port(), 0);
    }

    #[test]
    fn the_coordinator_port_is_held_while_the_job_lives() {
        let job = LocalJob::new().unwrap();
        let addr: std::net::SocketAddr = job.coordinator.parse().unwrap();
        let e = std::net::TcpListener::bind(addr).expect_err("a held port must refuse a plain bind");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        drop(gallocy_transport::coordinator::listen(addr, true).expect("rank 0 joins the hold"));
        drop(job);
        drop(std::net::TcpListener::bind(addr).expect("free once the job is over"));
    }

    fn sh(label: &str, script: &str) -> Member {
        Member::new(label, "sh", ["-c", script])
    }

    #[test]
    fn group_collects_lines_and_reports_success() {
        let opts = GroupOptions { stdout: Lines::Collect(|l| l.starts_with("@rec ")), ..GroupOptions::default() };
        let members = vec![
            sh("a", r#"echo "@rec $WHO"; echo human"#).env("WHO", "first"),
            sh("b", r#"echo "@rec $WHO""#).env("WHO", "second"),
        ];
        let mut events = Vec::new();
        let report = run_group(members, &opts, &mut |e| events.push(format!("{e:?}"))).unwrap();
        assert!(report.success() && report.exit_code() == 0, "{report:?}");
        let mut lines: Vec<_> = report.collected.clone();
        lines.sort();
        assert_eq!(lines, [(0, "@rec first".to_string()), (1, "@rec second".to_string())]);
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn group_stops_the_others_at_once_with_zero_grace() {
        let opts = GroupOptions { grace: Duration::ZERO, ..GroupOptions::default() };
        let members = vec![sh("sleeper", "exec sleep 30"), sh("failer", "sleep 0.2; exit 3")];
        let started = Instant::now();
        let mut events = Vec::new();
        let report = run_group(members, &opts, &mut |e| events.push(format!("{e:?}"))).unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(report.first_failure, Some(1));
        assert_eq!(report.outcomes, [RankOutcome::StoppedByLauncher, RankOutcome::Exited(3)]);
        assert_eq!(report.exit_code(), 3);
        assert!(events[0].contains("Failed") && events[0].contains("failer"), "{events:?}");
        assert!(events[1].contains("Stopping") && events[1].contains("sleeper"), "{events:?}");
    }

    #[test]
    fn group_time_limit_kills_everyone() {
        let opts = GroupOptions { timeout: Some(Duration::from_millis(300)), ..GroupOptions::default() };
        let started = Instant::now();
        let mut events = Vec::new();
        let report =
            run_group(vec![sh("slow", "exec sleep 30")], &opts, &mut |e| events.push(format!("{e:?}"))).unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(report.timed_out && !report.success());
        assert_eq!(report.outcomes, [RankOutcome::StoppedByLauncher]);
        assert_eq!(events[0], "TimedOut");
    }

    #[test]
    fn group_spawn_error_names_the_member() {
        let err = run_group(
            vec![sh("ok", "exec sleep 30"), Member::new("missing", "/nonexistent/gallocy-test-program", [""; 0])],
            &GroupOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, LaunchError::Spawn { rank: 1, .. }), "{err:?}");
        assert!(err.to_string().starts_with("cannot start missing (/nonexistent/"), "{err}");
        assert_eq!(err.exit_code(), 127);
    }
}
