//! Local launcher: runs N ranks of a program on this machine (`gallocy run`).
//!
//! Every rank gets the environment contract of the runtime (`GALLOCY_RANK`,
//! `GALLOCY_SIZE`, `GALLOCY_COORDINATOR`, `GALLOCY_TOKEN`, `GALLOCY_TRANSPORT`)
//! on top of the launcher's own environment and [`LaunchSpec::env`]. The
//! launcher forwards each rank's stdout/stderr line by line with a `[rank i] `
//! prefix, waits for all ranks, and when one fails gives the others
//! [`LaunchSpec::grace`] to exit by themselves before killing them.
//!
//! Children get `PR_SET_PDEATHSIG = SIGKILL`, so they die with the thread that
//! called [`run`]; call it from a thread that outlives the job (normally the
//! main thread). Children's stdin is `/dev/null`.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest number of ranks the launcher starts.
pub const MAX_RANKS: usize = 64;
/// Transports built into this build (`auto`: RDMA when every rank has a usable device, else TCP).
#[cfg(feature = "rdma")]
pub const TRANSPORTS: &[&str] = &["auto", "tcp", "rdma"];
/// Transports built into this build (`auto` means TCP here: the RDMA transport is not built).
#[cfg(not(feature = "rdma"))]
pub const TRANSPORTS: &[&str] = &["auto", "tcp"];
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

/// Errors of the launcher itself (a failing rank is not an error: see [`run`]).
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
    #[error("cannot start rank {rank} ({program}): {source}")]
    Spawn {
        rank: usize,
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the output thread of rank {rank}: {source}")]
    Thread {
        rank: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot wait for rank {rank}: {source}")]
    Wait {
        rank: usize,
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

/// How one rank ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankOutcome {
    /// Exited by itself with this code.
    Exited(i32),
    /// Killed by this signal (not sent by the launcher).
    Signaled { signal: i32, core_dumped: bool },
    /// Killed by the launcher after the grace period.
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
        match *self {
            RankOutcome::Exited(code) => format!("rank {rank} exited with code {code}"),
            RankOutcome::Signaled { signal, core_dumped } => format!(
                "rank {rank} was killed by signal {signal} ({}){}",
                signal_name(signal),
                if core_dumped { " (core dumped)" } else { "" }
            ),
            RankOutcome::StoppedByLauncher => format!("rank {rank} was stopped by the launcher"),
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

/// Runs the job described by `spec` and returns the exit code the launcher
/// should exit with: 0 when every rank exited 0, otherwise the code of the
/// first rank (in time) that failed (128 + signal if it was killed).
pub fn run(spec: &LaunchSpec) -> Result<i32, LaunchError> {
    spec.validate()?;
    let coordinator = format!("127.0.0.1:{}", free_loopback_port().map_err(LaunchError::Port)?);
    let token = job_token()?;
    let mut job = Job::default();
    for rank in 0..spec.nprocs {
        let cmd = rank_command(spec, rank, &coordinator, &token);
        job.spawn(rank, cmd, &spec.program)?;
    }
    let outcomes = job.wait_all(spec.grace)?;
    job.drain_output(DRAIN_TIMEOUT);
    Ok(report(&outcomes))
}

/// A port on 127.0.0.1 that was free a moment ago (the listener is dropped).
fn free_loopback_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// `GALLOCY_TOKEN` from the launcher's environment, or 32 fresh hex digits.
fn job_token() -> Result<String, LaunchError> {
    if let Some(token) = std::env::var("GALLOCY_TOKEN").ok().filter(|t| !t.is_empty()) {
        return Ok(token);
    }
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|e| LaunchError::Token(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The command for one rank: program, args, environment, pipes, death signal.
fn rank_command(spec: &LaunchSpec, rank: usize, coordinator: &str, token: &str) -> Command {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env("GALLOCY_RANK", rank.to_string())
        .env("GALLOCY_SIZE", spec.nprocs.to_string())
        .env("GALLOCY_COORDINATOR", coordinator)
        .env("GALLOCY_TOKEN", token)
        .env("GALLOCY_TRANSPORT", &spec.transport)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_launcher(&mut cmd);
    cmd
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

/// One started rank.
struct RankProc {
    rank: usize,
    child: Child,
    /// Set once reaped.
    outcome: Option<RankOutcome>,
    killed_by_us: bool,
}

/// The running job; killing and reaping leftover children on drop.
#[derive(Default)]
struct Job {
    ranks: Vec<RankProc>,
    readers: Vec<JoinHandle<()>>,
    /// Each reader thread sends one message when its pipe reached EOF.
    done_tx: Option<mpsc::Sender<()>>,
    done_rx: Option<mpsc::Receiver<()>>,
}

impl Job {
    /// Starts `cmd` as rank `rank` and the reader threads for its pipes.
    fn spawn(&mut self, rank: usize, mut cmd: Command, program: &OsString) -> Result<(), LaunchError> {
        let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            rank,
            program: program.to_string_lossy().into_owned(),
            source,
        })?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        self.ranks.push(RankProc { rank, child, outcome: None, killed_by_us: false });
        if let Some(out) = stdout {
            self.start_reader(rank, Pipe::Out(out))?;
        }
        if let Some(err) = stderr {
            self.start_reader(rank, Pipe::Err(err))?;
        }
        Ok(())
    }

    fn start_reader(&mut self, rank: usize, pipe: Pipe) -> Result<(), LaunchError> {
        if self.done_tx.is_none() {
            let (tx, rx) = mpsc::channel();
            self.done_tx = Some(tx);
            self.done_rx = Some(rx);
        }
        let done = self.done_tx.clone().expect("channel created above");
        let handle = std::thread::Builder::new()
            .name(format!("gallocy-run-rank{rank}-{}", pipe.label()))
            .spawn(move || {
                pipe.forward(rank);
                let _ = done.send(());
            })
            .map_err(|source| LaunchError::Thread { rank, source })?;
        self.readers.push(handle);
        Ok(())
    }

    /// Waits for every rank; after the first failure the others get `grace`,
    /// then are killed. Returns the outcomes in rank order and the index of
    /// the first failure.
    fn wait_all(&mut self, grace: Duration) -> Result<Outcomes, LaunchError> {
        let mut first_failure = None;
        let mut deadline: Option<Instant> = None;
        loop {
            // Of the ranks found failed in one round, report the likeliest cause first: a rank
            // killed by a signal, then one that failed by itself, then those that only stopped
            // because they lost a peer (exit status EXIT_PEER_LOST).
            let mut failed_now = Vec::new();
            for idx in 0..self.ranks.len() {
                if let Some(outcome) = self.poll(idx)? {
                    if outcome.failed() {
                        failed_now.push((idx, outcome));
                    }
                }
            }
            failed_now.sort_by_key(|(_, o)| match o {
                RankOutcome::Signaled { .. } => 0,
                RankOutcome::Exited(code) if *code != crate::runtime::EXIT_PEER_LOST => 1,
                _ => 2,
            });
            if let (Some(&(idx, outcome)), None) = (failed_now.first(), first_failure) {
                first_failure = Some(idx);
                say(&outcome.describe(self.ranks[idx].rank));
                deadline = Some(Instant::now() + grace);
            }
            if self.ranks.iter().all(|r| r.outcome.is_some()) {
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.stop_remaining();
                deadline = None;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        let all = self.ranks.iter().map(|r| r.outcome.expect("all reaped")).collect();
        Ok(Outcomes { all, first_failure })
    }

    /// Reaps rank `idx` if it has exited; returns its outcome only when it
    /// exited during this call.
    fn poll(&mut self, idx: usize) -> Result<Option<RankOutcome>, LaunchError> {
        let proc = &mut self.ranks[idx];
        if proc.outcome.is_some() {
            return Ok(None);
        }
        let rank = proc.rank;
        let status = proc.child.try_wait().map_err(|source| LaunchError::Wait { rank, source })?;
        let outcome = status.map(|s| RankOutcome::from_status(s, proc.killed_by_us));
        proc.outcome = outcome;
        Ok(outcome)
    }

    /// SIGKILLs every rank still running.
    fn stop_remaining(&mut self) {
        for proc in self.ranks.iter_mut().filter(|r| r.outcome.is_none()) {
            say(&format!("stopping rank {}", proc.rank));
            proc.killed_by_us = true;
            let _ = proc.child.kill();
        }
    }

    /// Waits up to `timeout` for the reader threads to see EOF, joins those
    /// that finished, and leaves the rest (held open by some other process).
    fn drain_output(&mut self, timeout: Duration) {
        drop(self.done_tx.take());
        let deadline = Instant::now() + timeout;
        let mut pending = self.readers.len();
        if let Some(rx) = self.done_rx.take() {
            while pending > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if rx.recv_timeout(left).is_err() {
                    break;
                }
                pending -= 1;
            }
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
        say(&format!(
            "{pending} output stream(s) still open after all ranks exited (held by a process a rank started); not waiting for them"
        ));
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for proc in self.ranks.iter_mut().filter(|r| r.outcome.is_none()) {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
    }
}

/// Outcomes of all ranks (rank order) and which failed first.
struct Outcomes {
    all: Vec<RankOutcome>,
    first_failure: Option<usize>,
}

/// Prints one line per failed rank and returns the launcher's exit code.
fn report(outcomes: &Outcomes) -> i32 {
    let Some(first) = outcomes.first_failure else {
        return 0;
    };
    for (rank, outcome) in outcomes.all.iter().enumerate().filter(|(_, o)| o.failed()) {
        say(&outcome.describe(rank));
    }
    match outcomes.all[first].exit_code() {
        0 => 1,
        code => code,
    }
}

/// Writes "gallocy run: MSG" to stderr as one line.
fn say(msg: &str) {
    let line = format!("gallocy run: {msg}\n");
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

/// A pipe of a rank and where its lines go.
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

    /// Copies the pipe to the launcher's stdout/stderr until EOF.
    fn forward(self, rank: usize) {
        let prefix = format!("[rank {rank}] ");
        match self {
            Pipe::Out(p) => forward_lines(p, &prefix, &mut io::stdout()),
            Pipe::Err(p) => forward_lines(p, &prefix, &mut io::stderr()),
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
/// stderr are locked per line, so lines from different threads never mix).
/// A last line without newline gets one. After a write error the rest is read
/// and dropped, so the rank never blocks on a full pipe.
fn forward_lines<R: Read>(input: R, prefix: &str, sink: &mut dyn LineSink) {
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
        forward_lines(input, "[rank 3] ", &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lines_get_prefixed_and_terminated() {
        assert_eq!(forwarded(b""), "");
        assert_eq!(forwarded(b"a\nb\n"), "[rank 3] a\n[rank 3] b\n");
        assert_eq!(forwarded(b"a\n\nlast"), "[rank 3] a\n[rank 3] \n[rank 3] last\n");
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
        if cfg!(feature = "rdma") {
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
}
