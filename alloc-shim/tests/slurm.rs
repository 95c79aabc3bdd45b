//! gallocy jobs launched by a real Slurm `srun`, on a one-node Slurm cluster the test brings up
//! itself: `munged`, `slurmctld` and `slurmd` started as child processes with their own
//! configuration, key, state, spool, socket and log files in a scratch directory, on free ports
//! (nothing of the machine's own Slurm or munge set-up is used or touched).
//!
//! The ranks are given only `GALLOCY_COORDINATOR=127.0.0.1:<free port>` and `GALLOCY_TOKEN` (plus
//! `GALLOCY_STATS=1`, whose per-rank statistics line shows the rank gallocy took, and `LD_PRELOAD`
//! for preloaded programs): rank and size must come from Slurm's `SLURM_PROCID`/`SLURM_NTASKS`,
//! or from `PMI_RANK`/`PMI_SIZE` under `srun --mpi=pmi2`. No `GALLOCY_RANK`/`GALLOCY_SIZE` (nor
//! any other launcher's variable) reaches srun from the test's environment.
//!
//! Covered, each as `srun -n 2` and `srun -n 4` jobs:
//! - a C program LINKED with libgallocy (`cc linked.c $(pkg-config --cflags --libs gallocy)`,
//!   tests/c/slurm/linked.c): it prints the launcher variables it got, checks that its mallocs
//!   come from its rank's arena before joining, joins, checks data shared job-wide (a collective
//!   block and a broadcast malloc'ed string written by rank 0, a slot written by every rank) and
//!   a counter incremented under a global lock by every rank;
//! - unmodified programs under `LD_PRELOAD=libgallocy.so` (passed with `--export=ALL,LD_PRELOAD=`
//!   so that srun itself is not preloaded): examples/mt_malloc.c, built plainly, whose output
//!   must equal its glibc run's in every rank and whose sample block must lie in the rank's arena
//!   of the shared heap; and `sqlite3` (when installed), whose output must equal its glibc run's;
//! - with `srun --mpi=pmi2` (when `srun --mpi=list` has pmi2 and the ranks do get `PMI_RANK`,
//!   otherwise that test prints why it is skipped): both programs again, started through
//!   `env -u SLURM_PROCID -u SLURM_NTASKS` so that PMI_RANK/PMI_SIZE are all gallocy can go by.
//!
//! Every rank's stdout and stderr (from `srun --label`) are checked exactly: besides the
//! program's own lines, exactly one `gallocy stats rank R:` line naming the rank's own number,
//! gallocy's transport note on rank 0, nothing with "fatal" or "lost contact", and no line of
//! srun's own. Every job runs with a hard timeout (and a Slurm time limit); when the test ends,
//! also by a failure, every daemon and every process of theirs (the test process is their child
//! subreaper, so it finds the `slurmstepd`s too) is killed, and on a failure the daemons' log
//! tails are printed.
//!
//! Needs root (the daemons run as SlurmUser=root) and Debian's slurmctld, slurmd, slurm-client
//! and munge packages; without them, or with `GALLOCY_SKIP_SLURM=1`, every test prints
//! `SKIPPED <test>: <why>` on stderr and passes. With them, a Slurm that does not come up is a
//! failure (with the daemons' logs). Also needs cc and pkg-config (gcc, pkg-config) and the
//! artifacts of `cargo build --workspace --release`.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gallocy_testkit::*;

/// Limit for one srun job (they take well under a second here).
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// How long munged, slurmctld and slurmd get to bring the node to `idle`.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);
/// The name of the one node (slurmd is started with `-N` and `NodeAddr=127.0.0.1`: it needs no
/// name resolution).
const NODE: &str = "gallocy-node";

/// Heap range of a job with the default configuration; rank r of N allocates from the r-th of N
/// equal arenas (64 KiB-aligned; the last one takes the rest).
const HEAP_BASE: u64 = 0x2000_0000_0000;
const HEAP_SIZE: u64 = 16 << 30;

// ------------------------------------------------------------------------------------- helpers

fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

/// Which rank's arena `addr` lies in (of a job of n), or None outside the shared heap.
fn arena_of(addr: u64, n: usize) -> Option<usize> {
    if !(HEAP_BASE..HEAP_BASE + HEAP_SIZE).contains(&addr) {
        return None;
    }
    let arena = HEAP_SIZE / n as u64 / 65536 * 65536;
    Some((((addr - HEAP_BASE) / arena) as usize).min(n - 1))
}

/// `tool` on PATH, or in /usr/sbin or /sbin (daemons; a non-root PATH may not have them).
fn find_tool(tool: &str) -> Option<PathBuf> {
    find_in(path_dirs().into_iter().chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")]), tool)
}

/// The host name as slurmctld compares it with SlurmctldHost (up to the first dot).
fn short_hostname() -> String {
    let full = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("read /proc/sys/kernel/hostname");
    full.trim().split('.').next().unwrap_or_default().to_string()
}

/// Why the Slurm tests cannot run here, or None (then they must, and a set-up failure fails).
fn skip_reason() -> Option<String> {
    if let Some(v) = std::env::var("GALLOCY_SKIP_SLURM").ok().filter(|v| !v.is_empty() && v != "0") {
        return Some(format!("GALLOCY_SKIP_SLURM={v} is set"));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (the test starts munged, slurmctld and slurmd itself, with SlurmUser=root)".into());
    }
    let missing: Vec<String> = [
        ("munged", "munge"),
        ("slurmctld", "slurmctld"),
        ("slurmd", "slurmd"),
        ("srun", "slurm-client"),
        ("sinfo", "slurm-client"),
    ]
    .iter()
    .filter(|(tool, _)| find_tool(tool).is_none())
    .map(|(tool, package)| format!("`{tool}` (package {package})"))
    .collect();
    if !missing.is_empty() {
        return Some(format!(
            "Slurm is not installed: no {} (install with `apt-get install -y slurmctld slurmd slurm-client munge`)",
            missing.join(", ")
        ));
    }
    None
}

/// Whether `test` must be skipped (after printing why).
fn skipped(test: &str) -> bool {
    let why = skip_reason();
    if let Some(why) = &why {
        eprintln!("SKIPPED {test}: {why}");
    }
    why.is_some()
}

/// Runs `cmd` (stdout and stderr captured) for at most `timeout`; None when it had to be killed.
/// For quick client commands whose failure is not yet an error (polling the controller).
fn try_output(cmd: &mut Command, timeout: Duration) -> Option<(bool, String)> {
    let label = cmd.get_program().to_string_lossy().into_owned();
    let mut p = Proc::spawn(label, cmd);
    if !p.wait_or_kill(timeout) {
        return None;
    }
    Some((p.status().is_some_and(|s| s.success()), p.stdout() + &p.stderr()))
}

/// Parent pid of `pid` from /proc/PID/stat (the field after the parenthesised name).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Every live process descended from this one (a child subreaper: this includes the daemons'
/// double-forked `slurmstepd`s and the ranks they started).
fn descendants() -> Vec<u32> {
    let me = std::process::id();
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
            if let Some(pp) = parent_of(pid) {
                parent.insert(pid, pp);
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![me];
    while let Some(p) = frontier.pop() {
        for (&c, &pp) in &parent {
            if pp == p && c != me && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// SIGKILLs every descendant of this process (by pid) and reaps those that are its children,
/// until none is left (or 10 s have passed).
fn kill_descendants() {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = descendants();
        if pids.is_empty() || Instant::now() > deadline {
            if !pids.is_empty() {
                eprintln!("(processes still alive after killing: {pids:?})");
            }
            return;
        }
        for &pid in &pids {
            // SAFETY: plain system calls on pids that are this process's descendants; waitpid
            // only reaps a child (ECHILD otherwise), WNOHANG never blocks.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
                let mut status = 0;
                libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        for &pid in &pids {
            // SAFETY: as above (zombies that were still dying a moment ago).
            unsafe {
                let mut status = 0;
                libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG);
            }
        }
    }
}

// ------------------------------------------------------------------------------- the cluster

/// munged, slurmctld and slurmd, running from a scratch directory until dropped; dropping kills
/// them and everything they started (and prints their log tails if the test is failing).
struct Slurm {
    dir: TempDir,
    conf: PathBuf,
    daemons: Vec<(&'static str, Child)>,
}

impl Slurm {
    /// Brings the cluster up and waits for the node to be idle; fails the test (with the logs)
    /// if it does not come up.
    fn start() -> Slurm {
        let t0 = Instant::now();
        // Orphans among our descendants (slurmd double-forks its slurmstepds) become our
        // children, so that the end of the test finds and kills them.
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only sets a flag of this process.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
        assert_eq!(rc, 0, "prctl(PR_SET_CHILD_SUBREAPER): {}", std::io::Error::last_os_error());

        let dir = TempDir::new("slurm");
        let conf = dir.join("slurm.conf");
        let mut s = Slurm { dir, conf, daemons: Vec::new() };
        for (sub, mode) in [("munge", 0o700), ("sock", 0o755), ("state", 0o755), ("spool", 0o755), ("log", 0o755)] {
            let d = s.dir.join(sub);
            std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        s.start_munged();
        s.write_conf();
        s.spawn("slurmctld", &[os("-D"), os("-i"), os("-f"), os(&s.conf)]);
        s.spawn("slurmd", &[os("-D"), os("-N"), os(NODE), os("-f"), os(&s.conf)]);
        s.wait_idle();
        eprintln!(
            "slurm: node {NODE} idle {:.1} s after start ({})",
            t0.elapsed().as_secs_f64(),
            s.dir.path().display()
        );
        s
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("sock/munge.socket.2")
    }

    /// Starts `name` (a daemon in the foreground) with a clean environment, its stdout and stderr
    /// in log/NAME.out.
    fn spawn(&mut self, name: &'static str, args: &[OsString]) {
        let exe = find_tool(name).unwrap_or_else(|| panic!("{name} is not installed"));
        let out = std::fs::File::create(self.dir.join(&format!("log/{name}.out"))).unwrap();
        let mut cmd = Command::new(&exe);
        clean_env_with_transport(&mut cmd)
            .env("SLURM_CONF", &self.conf)
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        self.daemons.push((name, child));
    }

    /// munged with a fresh key, its socket, pid, seed and log files all in the scratch directory;
    /// waits for its socket.
    fn start_munged(&mut self) {
        let mut key = vec![0u8; 1024];
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key)).expect("read /dev/urandom");
        let key_file = self.dir.join("munge/munge.key");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_file)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &key))
            .unwrap_or_else(|e| panic!("write {}: {e}", key_file.display()));
        let arg = |opt: &str, p: PathBuf| os(format!("--{opt}={}", p.display()));
        let args = [
            os("-F"),
            arg("socket", self.socket()),
            arg("key-file", key_file),
            arg("pid-file", self.dir.join("munge/munged.pid")),
            arg("log-file", self.dir.join("log/munged.log")),
            arg("seed-file", self.dir.join("munge/munged.seed")),
        ];
        self.spawn("munged", &args);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket().exists() {
            self.assert_daemons_alive("munged start-up");
            assert!(Instant::now() < deadline, "munged did not create {} within 20 s", self.socket().display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn write_conf(&self) {
        let [ctld_port, slurmd_port] = free_ports(2)[..] else { unreachable!() };
        let d = self.dir.path().display();
        let text = format!(
            "# A one-node cluster for alloc-shim/tests/slurm.rs.\n\
             ClusterName=gallocytest\n\
             SlurmctldHost={host}(127.0.0.1)\n\
             SlurmctldPort={ctld_port}\n\
             SlurmdPort={slurmd_port}\n\
             SlurmUser=root\n\
             SlurmdUser=root\n\
             AuthType=auth/munge\n\
             CredType=cred/munge\n\
             AuthInfo=socket={socket}\n\
             StateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool\n\
             SlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd.pid\n\
             SlurmctldLogFile={d}/log/slurmctld.log\n\
             SlurmdLogFile={d}/log/slurmd.log\n\
             SlurmctldDebug=info\n\
             SlurmdDebug=info\n\
             MailProg=/bin/true\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\n\
             JobCompType=jobcomp/none\n\
             SwitchType=switch/none\n\
             MpiDefault=none\n\
             SchedulerType=sched/builtin\n\
             SelectType=select/cons_tres\n\
             SelectTypeParameters=CR_Core\n\
             SlurmdParameters=config_overrides\n\
             ReturnToService=2\n\
             InactiveLimit=0\n\
             KillWait=2\n\
             MessageTimeout=10\n\
             SlurmdTimeout=300\n\
             NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={NODE} CPUs=8 State=UNKNOWN\n\
             PartitionName=gallocy Nodes={NODE} Default=YES MaxTime=INFINITE State=UP\n",
            host = short_hostname(),
            socket = self.socket().display(),
        );
        std::fs::write(&self.conf, text).unwrap_or_else(|e| panic!("write {}: {e}", self.conf.display()));
    }

    /// Fails the test if a daemon has exited.
    fn assert_daemons_alive(&mut self, when: &str) {
        for (name, child) in &mut self.daemons {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited during {when}: {} (its log is below)", describe(Some(status)));
            }
        }
    }

    /// A Slurm client command (sinfo, srun, ...) pointed at this cluster.
    fn client(&self, tool: &str) -> Command {
        let mut cmd = Command::new(find_tool(tool).unwrap_or_else(|| panic!("{tool} is not installed")));
        clean_env_with_transport(&mut cmd).env("SLURM_CONF", &self.conf);
        cmd
    }

    /// Polls `sinfo` until the node is idle.
    fn wait_idle(&mut self) {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        let mut last = String::new();
        loop {
            self.assert_daemons_alive("start-up");
            let mut cmd = self.client("sinfo");
            cmd.args(["-h", "-o", "%t"]);
            if let Some((_, text)) = try_output(&mut cmd, Duration::from_secs(15)) {
                if text.trim() == "idle" {
                    return;
                }
                last = text.trim().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "Slurm did not come up: node {NODE} not idle within {STARTUP_DEADLINE:?} (last `sinfo -h -o %t`: \
                 {last:?}); the daemons' logs are below"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The MPI plugin types srun offers (`srun --mpi=list`).
    fn mpi_types(&self) -> String {
        let mut cmd = self.client("srun");
        cmd.arg("--mpi=list");
        try_output(&mut cmd, Duration::from_secs(30)).map(|(_, t)| t).unwrap_or_default()
    }

    /// The last lines of every daemon's log: its log file, or what it printed (NAME.out: with
    /// -D, slurmctld and slurmd copy their log there) when it has no log file yet.
    fn log_tails(&self) -> String {
        let log = self.dir.join("log");
        let mut s = String::new();
        for name in ["munged", "slurmctld", "slurmd"] {
            let file = [log.join(format!("{name}.log")), log.join(format!("{name}.out"))]
                .into_iter()
                .find(|f| f.metadata().is_ok_and(|m| m.len() > 0));
            let Some(file) = file else {
                s.push_str(&format!("--- {name}: no log\n"));
                continue;
            };
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s.push_str(&format!("--- {} (last 30 of {} lines):\n", file.display(), lines.len()));
            for l in &lines[lines.len().saturating_sub(30)..] {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// `srun -n N` of `argv` (`what`, for messages) with `--mpi=MPI`, the ranks given a fresh
    /// coordinator and token (and LD_PRELOAD when `preload`), with a hard timeout.
    fn srun(&self, what: &str, n: usize, mpi: &str, preload: bool, argv: &[OsString]) -> Ran {
        let coordinator = format!("127.0.0.1:{}", free_port());
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let token = format!("slurm-test-{}-{nanos}", std::process::id());
        let mut cmd = self.client("srun");
        cmd.env("GALLOCY_COORDINATOR", &coordinator).env("GALLOCY_TOKEN", &token).env("GALLOCY_STATS", "1");
        let mut export = os("--export=ALL");
        if preload {
            // Only in the ranks: srun itself must not run on gallocy's malloc.
            export.push(",LD_PRELOAD=");
            export.push(libgallocy());
        }
        cmd.args(["--quiet", "--label", "--kill-on-bad-exit=1", "--time=2", "--job-name=gallocy-test"])
            .arg(format!("--ntasks={n}"))
            .arg(format!("--mpi={mpi}"))
            .arg(export)
            .args(argv);
        let how = repro(&cmd);
        let label = format!("srun -n {n} --mpi={mpi} {}{what}", if preload { "LD_PRELOAD=libgallocy.so " } else { "" });
        Ran { f: run_and_kill_group(&label, &mut cmd, JOB_TIMEOUT), how, n }
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("===== Slurm daemon logs ({}):\n{}", self.dir.path().display(), self.log_tails());
        }
        // The daemons are among them (and are reaped there).
        kill_descendants();
    }
}

// ------------------------------------------------------------------------------ checking jobs

/// A finished srun of `n` tasks and how to reproduce it.
struct Ran {
    f: Finished,
    how: String,
    n: usize,
}

/// One rank's own lines (srun's `R: ` label removed; from stderr, gallocy's lines removed).
struct Rank {
    out: Vec<String>,
    err: Vec<String>,
}

impl Ran {
    fn fail(&self, what: &str) -> ! {
        panic!("{what}\nreproduce (while the cluster is up): {}\n{}", self.how, self.f.report());
    }

    /// `text` split by srun's `R: ` labels; fails on a line of no rank (srun's own).
    fn split(&self, text: &str, stream: &str) -> Vec<Vec<String>> {
        let mut ranks = vec![Vec::new(); self.n];
        for line in text.lines() {
            let rank = line.split_once(": ").and_then(|(l, rest)| Some((l.trim().parse::<usize>().ok()?, rest)));
            match rank {
                Some((r, rest)) if r < self.n => ranks[r].push(rest.to_string()),
                _ => self.fail(&format!("a line on {stream} that belongs to no rank (srun's own?): {line:?}")),
            }
        }
        ranks
    }

    /// Requires exit status 0 and, in every rank r's stderr, exactly one `gallocy stats rank r:`
    /// line (GALLOCY_STATS=1: gallocy was loaded and took rank r), the transport note at most on
    /// rank 0, nothing with "fatal" or "lost contact"; returns every rank's other lines.
    fn ranks(&self) -> Vec<Rank> {
        if !self.f.success() {
            self.fail("srun: expected exit status 0 (every rank exiting 0)");
        }
        let outs = self.split(&self.f.stdout, "stdout");
        let errs = self.split(&self.f.stderr, "stderr");
        let mut ranks = Vec::new();
        for (r, (out, err)) in outs.into_iter().zip(errs).enumerate() {
            let stats = format!("gallocy stats rank {r}:");
            let mut own = Vec::new();
            let mut nstats = 0;
            for l in err {
                let low = l.to_lowercase();
                if low.contains("fatal") || low.contains("lost contact") {
                    self.fail(&format!("rank {r}: error on stderr: {l:?}"));
                }
                if l.starts_with(&stats) {
                    nstats += 1;
                } else if l.starts_with("gallocy stats rank ") {
                    self.fail(&format!("task {r} reports statistics as another rank: {l:?} (expected {stats:?})"));
                } else if !(r == 0 && l.starts_with("gallocy: transport:")) {
                    own.push(l);
                }
            }
            if nstats != 1 {
                self.fail(&format!(
                    "rank {r}: {nstats} lines starting with {stats:?} on stderr, expected 1 (GALLOCY_STATS=1: was \
                     libgallocy loaded, and did it take its rank from Slurm?)"
                ));
            }
            ranks.push(Rank { out, err: own });
        }
        ranks
    }
}

// ---------------------------------------------------------------------------------- programs

/// tests/c/slurm/linked.c linked with libgallocy the documented way, into `dir/linked`.
fn build_linked(dir: &TempDir) -> PathBuf {
    let cc = require_tool("cc", "gcc");
    libgallocy();
    let flags = pkg_config_flags();
    let tests = workspace().join("alloc-shim/tests/c");
    let bin = dir.join("linked");
    let mut cmd = Command::new(&cc);
    clean_env(&mut cmd)
        .args(["-O2", "-Wall", "-Wextra", "-I"])
        .arg(tests.join("shapes"))
        .arg("-o")
        .arg(&bin)
        .arg(tests.join("slurm/linked.c"))
        .args(&flags);
    let label = format!("cc -o linked tests/c/slurm/linked.c {}", flags.join(" "));
    let f = run(&label, &mut cmd, Duration::from_secs(60));
    assert!(f.success(), "{label}: compilation failed\n{}", f.report());
    bin
}

/// examples/mt_malloc.c built plainly (it knows nothing of gallocy) into `dir/mt_malloc`.
fn build_mt_malloc(dir: &TempDir) -> PathBuf {
    let cc = require_tool("cc", "gcc");
    let bin = dir.join("mt_malloc");
    let mut cmd = Command::new(&cc);
    clean_env(&mut cmd)
        .args(["-O2", "-pthread", "-Wall", "-o"])
        .arg(&bin)
        .arg(workspace().join("examples/mt_malloc.c"));
    run("cc -O2 -pthread mt_malloc.c", &mut cmd, Duration::from_secs(60)).assert_success();
    bin
}

/// Arguments of mt_malloc in every job: 4 threads, 200,000 malloc/free pairs.
const MT_ARGS: [&str; 2] = ["200000", "4"];

/// What `argv` prints on stdout with glibc's malloc, run as a plain process (the expected
/// output of every rank).
fn glibc_output(argv: &[OsString]) -> String {
    let mut cmd = Command::new(&argv[0]);
    clean_env(&mut cmd).args(&argv[1..]);
    let label = format!("{} (glibc malloc)", Path::new(&argv[0]).display());
    let f = run(&label, &mut cmd, Duration::from_secs(60));
    assert!(f.success(), "{label} fails without gallocy (a problem of the test or of this machine)\n{}", f.report());
    assert!(!f.stdout.trim().is_empty(), "{label} printed nothing\n{}", f.report());
    f.stdout
}

/// The launcher variables linked.c prints on its first line.
fn env_line(slurm: Option<(usize, usize)>, pmi: Option<(usize, usize)>) -> String {
    let pair = |v: Option<(usize, usize)>| v.map_or(("-".into(), "-".into()), |(r, n)| (r.to_string(), n.to_string()));
    let ((sr, sn), (pr, pn)) = (pair(slurm), pair(pmi));
    format!(
        "env: SLURM_PROCID={sr} SLURM_NTASKS={sn} PMI_RANK={pr} PMI_SIZE={pn} GALLOCY_RANK=- GALLOCY_SIZE=- \
         LD_PRELOAD=-"
    )
}

/// The linked program as an `srun -n N` job: under `--mpi=none` with SLURM_PROCID/SLURM_NTASKS,
/// or under `--mpi=pmi2` through `env -u SLURM_PROCID -u SLURM_NTASKS` (PMI_RANK/PMI_SIZE only).
fn linked_job(slurm: &Slurm, prog: &Path, n: usize, pmi2: bool) {
    let tag = format!("srun-n{n}{}", if pmi2 { "-pmi2" } else { "" });
    let mut argv = Vec::new();
    if pmi2 {
        argv.extend([os("/usr/bin/env"), os("-u"), os("SLURM_PROCID"), os("-u"), os("SLURM_NTASKS")]);
    }
    argv.extend([os(prog), os(&tag)]);
    let what = if pmi2 { "env -u SLURM_PROCID -u SLURM_NTASKS linked" } else { "linked" };
    let ran = slurm.srun(what, n, if pmi2 { "pmi2" } else { "none" }, false, &argv);
    for (r, rank) in ran.ranks().iter().enumerate() {
        let env = if pmi2 { env_line(None, Some((r, n))) } else { env_line(Some((r, n)), None) };
        let want = vec![env, format!("rank {r} of {n}: {tag} ok")];
        if rank.out != want {
            ran.fail(&format!("rank {r}: stdout lines are {:?}, expected {want:?}", rank.out));
        }
        if !rank.err.is_empty() {
            ran.fail(&format!("rank {r}: unexpected stderr lines {:?}", rank.err));
        }
    }
}

/// The sample block mt_malloc reports on stderr, from `mt_malloc: sample block 0x...; K blocks
/// freed by another thread`.
fn sample_block(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("mt_malloc: sample block 0x")?;
    let (hex, tail) = rest.split_once(';')?;
    tail.ends_with("blocks freed by another thread").then_some(())?;
    u64::from_str_radix(hex, 16).ok()
}

/// mt_malloc preloaded as an `srun -n N` job: every rank prints what glibc's run printed, and its
/// sample block lies in its own arena of the shared heap. Under pmi2 it is started through a
/// shell that first prints PMI_RANK/PMI_SIZE and then runs it without SLURM_PROCID/SLURM_NTASKS.
fn mt_malloc_job(slurm: &Slurm, prog: &Path, expected: &str, n: usize, pmi2: bool) {
    let mut argv = Vec::new();
    if pmi2 {
        let script = r#"echo "pmi: PMI_RANK=${PMI_RANK--} PMI_SIZE=${PMI_SIZE--}"; exec /usr/bin/env -u SLURM_PROCID -u SLURM_NTASKS "$@""#;
        argv.extend([os("/bin/sh"), os("-c"), os(script), os("sh")]);
    }
    argv.push(os(prog));
    argv.extend(MT_ARGS.iter().map(os));
    let what =
        if pmi2 { "sh -c 'echo PMI_*; exec env -u SLURM_PROCID -u SLURM_NTASKS mt_malloc'" } else { "mt_malloc" };
    let ran = slurm.srun(what, n, if pmi2 { "pmi2" } else { "none" }, true, &argv);
    for (r, rank) in ran.ranks().iter().enumerate() {
        let mut want: Vec<String> = expected.lines().map(str::to_string).collect();
        if pmi2 {
            want.insert(0, format!("pmi: PMI_RANK={r} PMI_SIZE={n}"));
        }
        if rank.out != want {
            ran.fail(&format!("rank {r}: stdout lines are {:?}, expected {want:?} (as with glibc)", rank.out));
        }
        let [line] = &rank.err[..] else {
            ran.fail(&format!("rank {r}: stderr lines {:?}, expected one \"mt_malloc: sample block ...\"", rank.err))
        };
        let Some(addr) = sample_block(line) else {
            ran.fail(&format!("rank {r}: cannot read the sample block's address in {line:?}"))
        };
        if arena_of(addr, n) != Some(r) {
            ran.fail(&format!(
                "rank {r}: mt_malloc's sample block {addr:#x} is {}, expected rank {r}'s arena of {n}: its malloc \
                 is not gallocy's, or gallocy did not take its rank from Slurm",
                match arena_of(addr, n) {
                    None => "outside gallocy's shared heap".to_string(),
                    Some(a) => format!("in rank {a}'s arena"),
                }
            ));
        }
    }
}

/// A SQL script for sqlite3 that allocates a fair amount (a table, an index, a sort, a big
/// group_concat) and prints a few aggregates.
const SQL: &str = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 30000) \
                   SELECT count(*), sum(x) FROM c;\n\
                   CREATE TABLE t(k TEXT, v INTEGER);\n\
                   WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 30000) \
                   INSERT INTO t SELECT printf('%08x-%d', (x * 2654435761) % 4294967296, x), x FROM c;\n\
                   CREATE INDEX tk ON t(k);\n\
                   SELECT count(DISTINCT k), min(k), max(k), length(group_concat(k, ',')) FROM t;\n\
                   SELECT k, v FROM t ORDER BY k LIMIT 1 OFFSET 15000;\n";

// ------------------------------------------------------------------------------------- tests

#[test]
fn linked_program_runs_as_srun_n2_and_n4_jobs() {
    if skipped("linked_program_runs_as_srun_n2_and_n4_jobs") {
        return;
    }
    // For the whole test: the cluster's clean-up kills every descendant of this process, so no
    // other test of this file may have a process (a compiler, a glibc run) going meanwhile.
    let _serial = serial();
    let dir = TempDir::new("slurm-linked");
    let prog = build_linked(&dir);
    let slurm = Slurm::start();
    for n in [2, 4] {
        linked_job(&slurm, &prog, n, false);
    }
}

#[test]
fn unmodified_programs_run_preloaded_as_srun_n2_and_n4_jobs() {
    if skipped("unmodified_programs_run_preloaded_as_srun_n2_and_n4_jobs") {
        return;
    }
    // For the whole test: the cluster's clean-up kills every descendant of this process, so no
    // other test of this file may have a process (a compiler, a glibc run) going meanwhile.
    let _serial = serial();
    let dir = TempDir::new("slurm-preload");
    let mt = build_mt_malloc(&dir);
    let mut mt_argv = vec![os(&mt)];
    mt_argv.extend(MT_ARGS.iter().map(os));
    let mt_expected = glibc_output(&mt_argv);
    // A distribution's binary as well: sqlite3, when installed.
    let sqlite3 = find_tool("sqlite3").map(|p| [os(p), os(":memory:"), os(SQL)]);
    let sql_expected = sqlite3.as_ref().map(|argv| glibc_output(argv));

    let slurm = Slurm::start();
    for n in [2, 4] {
        mt_malloc_job(&slurm, &mt, &mt_expected, n, false);
    }
    let (Some(argv), Some(expected)) = (sqlite3, sql_expected) else {
        eprintln!("note: sqlite3 is not installed (package sqlite3): its srun jobs are left out");
        return;
    };
    for n in [2, 4] {
        let ran = slurm.srun("sqlite3 :memory: SQL", n, "none", true, &argv);
        for (r, rank) in ran.ranks().iter().enumerate() {
            let want: Vec<String> = expected.lines().map(str::to_string).collect();
            if rank.out != want || !rank.err.is_empty() {
                ran.fail(&format!(
                    "rank {r}: stdout {:?} and stderr {:?}; expected stdout {want:?} (as with glibc) and no stderr \
                     besides gallocy's",
                    rank.out, rank.err
                ));
            }
        }
    }
}

#[test]
fn srun_mpi_pmi2_ranks_take_rank_and_size_from_pmi() {
    const TEST: &str = "srun_mpi_pmi2_ranks_take_rank_and_size_from_pmi";
    if skipped(TEST) {
        return;
    }
    // For the whole test: the cluster's clean-up kills every descendant of this process, so no
    // other test of this file may have a process (a compiler, a glibc run) going meanwhile.
    let _serial = serial();
    let dir = TempDir::new("slurm-pmi2");
    let linked = build_linked(&dir);
    let mt = build_mt_malloc(&dir);
    let mut mt_argv = vec![os(&mt)];
    mt_argv.extend(MT_ARGS.iter().map(os));
    let mt_expected = glibc_output(&mt_argv);

    let slurm = Slurm::start();
    let types = slurm.mpi_types();
    if !types.lines().any(|l| l.trim() == "pmi2") {
        eprintln!("SKIPPED {TEST}: `srun --mpi=list` has no pmi2 plugin; it lists: {:?}", types.trim());
        return;
    }
    // Does the plugin put PMI_RANK/PMI_SIZE into the ranks' environment?
    let script = r#"echo "PMI_RANK=${PMI_RANK--} PMI_SIZE=${PMI_SIZE--}""#;
    let probe = slurm.srun("sh -c 'echo PMI_*'", 2, "pmi2", false, &[os("/bin/sh"), os("-c"), os(script)]);
    if !probe.f.success() {
        probe.fail("srun --mpi=pmi2 of a shell failed");
    }
    let mut seen: Vec<&str> = probe.f.stdout.lines().collect();
    seen.sort();
    if seen != ["0: PMI_RANK=0 PMI_SIZE=2", "1: PMI_RANK=1 PMI_SIZE=2"] {
        eprintln!("SKIPPED {TEST}: the ranks of `srun --mpi=pmi2 -n 2` get no PMI_RANK/PMI_SIZE (they print {seen:?})");
        return;
    }
    for n in [2, 4] {
        linked_job(&slurm, &linked, n, true);
        mt_malloc_job(&slurm, &mt, &mt_expected, n, true);
    }
}
