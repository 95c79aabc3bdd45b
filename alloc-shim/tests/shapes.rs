//! Process shapes around the preloaded shim's start-up: how `libgallocy.so` sets itself up (in its
//! ELF constructor, without the network), when a process joins the job (at its first job-wide C
//! API call: `gallocy_init`, `gallocy_barrier`, `gallocy_lock`/`unlock`, `gallocy_alloc_collective`,
//! `gallocy_broadcast`, `gallocy_finalize`), which processes are members (a process that execs
//! hands its rank on; a child it starts is a one-process job), and how a joined member leaves.
//!
//! Covered, each as a 2-rank job (`gallocy run -n 2 --preload`, 3 ranks for the exec wrapper) and
//! as a one-process run with only `LD_PRELOAD` set:
//! - a library preloaded next to libgallocy.so whose constructor dlopens libm, allocates and runs
//!   an allocating thread, in both `LD_PRELOAD` orders (tests/c/shapes/ctorlib.c);
//! - a dlopen'ed plugin whose constructor runs allocating threads, one of them waited for while
//!   dlopen holds the loader lock, with allocations through the plugin's dynamic TLS
//!   (plugin_thread.c, dlplug.c);
//! - dlopen/dlclose of a plugin from 4 threads in a loop while they allocate, before and after
//!   joining (plugin_small.c, dlloop.c);
//! - dash and bash running pipelines, subshells, command and process substitution (PIPESTATUS
//!   under bash), whose output must equal the same commands' without the shim;
//! - `make -j2` building a generated C tree in every rank, and the program it built;
//! - a forking server in a joined member: 20 children must each see the shared heap exactly as
//!   it was at fork while the parent's threads overwrite it and the other rank reads it, and
//!   the children's writes must never reach the parent (forkserver.c);
//! - a joined member forking 200 times while another thread keeps calling `fflush(NULL)` (stdio's
//!   list lock, which glibc's `fork` takes, held while it writes FILEs on the heap); the same
//!   with another library's fork child handler that reads and writes the heap (forkhook.c); and a
//!   child made by a raw `clone`, past the fork handlers, touching the heap (forkflush.c);
//! - `_exit` from a signal handler of a member while a thread of it waits in a barrier: from
//!   another thread it leaves the job; interrupting the barrier itself, the peer stops with a
//!   clear error (sigexit.c);
//! - leaving while a thread writes a page that moves between the ranks: exit(0) from a thread,
//!   main returning, _exit(0) and _Exit(0) from a thread (exit status 0, no "fatal" or "lost
//!   contact" anywhere), and exit(3) and _exit(3) from a thread of rank 1, which must fail the
//!   job naming rank 1 with exit code 3 (exitprog.c);
//! - exec hand-off: ranks started through a `#!/bin/sh` `exec "$@"` wrapper or `/usr/bin/env`
//!   are ranks 0..N-1 of N (and, when `mpirun` is installed, the wrapper under `mpirun -n 2`);
//!   a program started as a child by a shell member (`sh -c 'PROG; true'`, `$(PROG)`) is
//!   rank 0 of 1.
//!
//! Every C program (tests/c/shapes/shapes.h) first checks, before its first job-wide call, that
//! `gallocy_rank()`/`gallocy_size()` already say r/N, that `malloc` serves blocks from rank r's
//! arena, and that the process has not joined (one thread, no socket); after joining, a
//! shared-data check (rank 0 writes a collective block and a malloc'ed string, every rank reads
//! them, every rank writes a slot all others read). The shells print their own thread and socket
//! counts, which must be those of the run without the shim (a shell never joins).
//!
//! Output is checked exactly: every rank's stdout lines (without the launcher's `[rank i] `
//! prefix) and its stderr, where only gallocy's statistics line (`GALLOCY_STATS=1`) and its
//! transport note may appear besides what the program prints. The C programs use gallocy's C API
//! through weak references, so they stop with exit code 2 when the library is not preloaded.
//! Every process runs with a hard timeout (a hang fails the test), one job at a time, and what
//! is left of its process group afterwards is killed.
//!
//! Needs cc, make, dash and bash (Debian: gcc, make, dash, bash), the artifacts of
//! `cargo build --workspace --release`, and optionally Open MPI's `mpirun` (openmpi-bin).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gallocy_testkit::*;

/// Limit for one multi-process job.
const JOB_TIMEOUT: Duration = Duration::from_secs(90);
/// Limit for one single process (with or without the shim).
const SOLO_TIMEOUT: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------------------------- helpers

fn c_dir() -> PathBuf {
    workspace().join("alloc-shim/tests/c/shapes")
}

/// Compiles `tests/c/shapes/<name>.c` into `dir/<name>` (a program).
fn build_prog(dir: &TempDir, name: &str) -> PathBuf {
    compile(dir, name, false)
}

/// Compiles `tests/c/shapes/<name>.c` into `dir/<name>.so` (a shared library).
fn build_lib(dir: &TempDir, name: &str) -> PathBuf {
    compile(dir, name, true)
}

fn compile(dir: &TempDir, name: &str, shared: bool) -> PathBuf {
    let cc = require_tool("cc", "gcc");
    let out = dir.join(&if shared { format!("{name}.so") } else { name.to_string() });
    let mut cmd = Command::new(&cc);
    clean_env(&mut cmd).args(["-O2", "-pthread", "-Wall", "-Wextra"]);
    if shared {
        cmd.args(["-shared", "-fPIC"]);
    }
    cmd.arg("-I")
        .arg(c_dir())
        .arg("-I")
        .arg(workspace().join("alloc-shim/include"))
        .arg("-o")
        .arg(&out)
        .arg(c_dir().join(format!("{name}.c")))
        .arg("-ldl");
    let label = format!("cc {}{name}.c", if shared { "-shared " } else { "" });
    let f = run(&label, &mut cmd, Duration::from_secs(60));
    assert!(f.success(), "{label}: compilation failed\n{}", f.report());
    out
}

fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

/// A finished run and how to reproduce it.
struct Ran {
    f: Finished,
    how: String,
}

impl Ran {
    fn fail(&self, what: &str) -> ! {
        panic!("{what}\nreproduce: {}\n{}", self.how, self.f.report());
    }

    fn assert_success(&self) -> &Self {
        if !self.f.success() {
            self.fail("expected exit status 0");
        }
        self
    }
}

/// `gallocy run -n N --preload -- ARGV...` with a clean environment plus `env`.
fn job(n: usize, env: &[(&str, OsString)], argv: &[OsString]) -> Ran {
    let launcher = launcher();
    libgallocy();
    let mut cmd = Command::new(&launcher);
    clean_env_with_transport(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(["run", "-n", &n.to_string(), "--preload", "--"]).args(argv);
    let how = repro(&cmd);
    let label = format!(
        "gallocy run -n {n} --preload -- {}",
        argv.iter().map(|a| sh_quote(&a.to_string_lossy())).collect::<Vec<_>>().join(" ")
    );
    let _serial = serial();
    Ran { f: run_and_kill_group(&label, &mut cmd, JOB_TIMEOUT), how }
}

/// What a single process gets in `LD_PRELOAD`.
#[derive(Clone, Copy)]
enum Preload<'a> {
    /// `libgallocy.so`.
    Shim,
    /// This colon-separated list.
    List(&'a str),
    /// Nothing (the expected behaviour).
    Nothing,
}

/// ARGV as one process, with `preload` and `env` in a clean environment.
fn solo(preload: Preload, env: &[(&str, OsString)], argv: &[OsString]) -> Ran {
    let lib = libgallocy();
    let mut cmd = Command::new(&argv[0]);
    clean_env_with_transport(&mut cmd).args(&argv[1..]);
    let what = match preload {
        Preload::Shim => {
            cmd.env("LD_PRELOAD", &lib);
            "LD_PRELOAD=libgallocy.so ".to_string()
        }
        Preload::List(list) => {
            cmd.env("LD_PRELOAD", list);
            format!("LD_PRELOAD={list} ")
        }
        Preload::Nothing => "(no preload) ".to_string(),
    };
    for (k, v) in env {
        cmd.env(k, v);
    }
    let how = repro(&cmd);
    let label = format!("{what}{}", argv.iter().map(|a| sh_quote(&a.to_string_lossy())).collect::<Vec<_>>().join(" "));
    let _serial = serial();
    Ran { f: run_and_kill_group(&label, &mut cmd, SOLO_TIMEOUT), how }
}

/// The lines of `text` split by the launcher's `[rank i] ` prefix: per rank (prefix removed), and
/// the lines that belong to no rank.
fn split_ranks(text: &str, n: usize) -> (Vec<Vec<String>>, Vec<String>) {
    let mut ranks = vec![Vec::new(); n];
    let mut other = Vec::new();
    'lines: for line in text.lines() {
        for (r, lines) in ranks.iter_mut().enumerate() {
            if let Some(rest) = line.strip_prefix(&format!("[rank {r}] ")) {
                lines.push(rest.to_string());
                continue 'lines;
            }
        }
        other.push(line.to_string());
    }
    (ranks, other)
}

/// How a process's stderr may look besides its own lines.
#[derive(Clone, Copy, PartialEq)]
enum Stats {
    /// Exactly one `gallocy stats rank R:` line (GALLOCY_STATS=1, a member that joined).
    Required,
    /// At most one.
    Optional,
    /// None.
    Absent,
}

/// Checks the stderr lines of one process of rank `r`: exactly `expected` plus, as `stats` says,
/// its statistics line, and gallocy's transport note on rank 0; nothing with "fatal" or
/// "lost contact" in it.
fn check_stderr(ran: &Ran, who: &str, r: usize, lines: &[String], expected: &[&str], stats: Stats) {
    let stats_prefix = format!("gallocy stats rank {r}:");
    let mut own = Vec::new();
    let mut nstats = 0;
    for l in lines {
        let low = l.to_lowercase();
        if low.contains("fatal") || low.contains("lost contact") {
            ran.fail(&format!("{who}: error on stderr: {l:?}"));
        }
        if l.starts_with(&stats_prefix) {
            nstats += 1;
        } else if !(r == 0 && l.starts_with("gallocy: transport:")) {
            own.push(l.as_str());
        }
    }
    if own != expected {
        ran.fail(&format!("{who}: stderr lines (besides gallocy's statistics) are {own:?}, expected {expected:?}"));
    }
    let allowed = match stats {
        Stats::Required => 1..=1,
        Stats::Optional => 0..=1,
        Stats::Absent => 0..=0,
    };
    if !allowed.contains(&nstats) {
        ran.fail(&format!(
            "{who}: {nstats} lines starting with {stats_prefix:?} on stderr, expected {}..={}{}",
            allowed.start(),
            allowed.end(),
            if stats == Stats::Required { " (GALLOCY_STATS=1: did the member run its exit path?)" } else { "" }
        ));
    }
}

/// A job of `n` ranks that must exit 0 with, for every rank r, stdout lines exactly `out(r)` and
/// stderr lines exactly `err(r)` plus gallocy's lines as `stats` says; nothing outside the ranks.
fn check_job(
    ran: &Ran,
    n: usize,
    out: &dyn Fn(usize) -> Vec<String>,
    err: &dyn Fn(usize) -> Vec<String>,
    stats: Stats,
) {
    ran.assert_success();
    let (outs, other_out) = split_ranks(&ran.f.stdout, n);
    let (errs, other_err) = split_ranks(&ran.f.stderr, n);
    if !other_out.is_empty() || !other_err.is_empty() {
        ran.fail(&format!("lines that belong to no rank: {:?}", [other_out, other_err].concat()));
    }
    for r in 0..n {
        if outs[r] != out(r) {
            ran.fail(&format!("rank {r}: stdout lines are {:?}, expected {:?}", outs[r], out(r)));
        }
        let want = err(r);
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        check_stderr(ran, &format!("rank {r}"), r, &errs[r], &want, stats);
    }
}

/// A single process that must exit 0 with stdout lines exactly `out` and stderr lines exactly
/// `err` plus gallocy's lines as `stats` says.
fn check_solo(ran: &Ran, out: &[String], err: &[&str], stats: Stats) {
    ran.assert_success();
    let lines: Vec<String> = ran.f.stdout.lines().map(str::to_string).collect();
    if lines != out {
        ran.fail(&format!("stdout lines are {lines:?}, expected {out:?}"));
    }
    let errs: Vec<String> = ran.f.stderr.lines().map(str::to_string).collect();
    check_stderr(ran, "the process", 0, &errs, err, stats);
}

fn stats_on() -> (&'static str, OsString) {
    ("GALLOCY_STATS", os("1"))
}

fn none(_: usize) -> Vec<String> {
    Vec::new()
}

// ------------------------------------------------- a. preloaded library whose constructor dlopens

/// `rankprog` with `LD_PRELOAD` = ctorlib.so and libgallocy.so in the given order.
fn preloaded_constructor_that_dlopens(ctorlib_first: bool) {
    let dir = TempDir::new("shapes-ctorlib");
    let prog = build_prog(&dir, "rankprog");
    let ctorlib = build_lib(&dir, "ctorlib");
    let lib = libgallocy();
    let list = if ctorlib_first {
        format!("{}:{}", ctorlib.display(), lib.display())
    } else {
        format!("{}:{}", lib.display(), ctorlib.display())
    };
    // The launcher's --preload puts GALLOCY_PRELOAD_LIB, as it is, in every rank's LD_PRELOAD.
    let ran =
        job(2, &[("GALLOCY_PRELOAD_LIB", os(&list)), stats_on()], &[os(&prog), os("preloaded-ctor"), os("ctorlib")]);
    check_job(&ran, 2, &|r| vec![format!("rank {r} of 2: preloaded-ctor ok")], &none, Stats::Required);

    let ran = solo(Preload::List(&list), &[stats_on()], &[os(&prog), os("preloaded-ctor"), os("ctorlib")]);
    check_solo(&ran, &["rank 0 of 1: preloaded-ctor ok".into()], &[], Stats::Required);
}

#[test]
fn preloaded_library_whose_constructor_dlopens_listed_before_libgallocy() {
    preloaded_constructor_that_dlopens(true);
}

#[test]
fn preloaded_library_whose_constructor_dlopens_listed_after_libgallocy() {
    preloaded_constructor_that_dlopens(false);
}

// ------------------------------------------------------ b. plugin whose constructor starts threads

#[test]
fn plugin_constructor_threads_allocate_while_dlopen_holds_the_loader_lock() {
    let dir = TempDir::new("shapes-plugin-thread");
    let prog = build_prog(&dir, "dlplug");
    let plugin = build_lib(&dir, "plugin_thread");
    let argv = [os(&prog), os(&plugin)];
    let ran = job(2, &[stats_on()], &argv);
    check_job(&ran, 2, &|r| vec![format!("rank {r} of 2: plugin threads ok")], &none, Stats::Required);
    let ran = solo(Preload::Shim, &[stats_on()], &argv);
    check_solo(&ran, &["rank 0 of 1: plugin threads ok".into()], &[], Stats::Required);
}

// ----------------------------------------------------------- c. dlopen/dlclose from 4 threads

#[test]
fn dlopen_and_dlclose_from_4_threads_while_they_allocate() {
    let dir = TempDir::new("shapes-dlloop");
    let prog = build_prog(&dir, "dlloop");
    let plugin = build_lib(&dir, "plugin_small");
    let argv = [os(&prog), os(&plugin), os("150")];
    let ran = job(2, &[stats_on()], &argv);
    check_job(&ran, 2, &|r| vec![format!("rank {r} of 2: dlopen loop ok (1200 cycles)")], &none, Stats::Required);
    let ran = solo(Preload::Shim, &[stats_on()], &argv);
    check_solo(&ran, &["rank 0 of 1: dlopen loop ok (1200 cycles)".into()], &[], Stats::Required);
}

// ------------------------------------------------------------------------------------ d. shells

/// POSIX sh: pipelines, subshells, command substitution, exit statuses. The two lines on stderr
/// say whether the shell itself and a child of it have libgallocy.so mapped (nothing without it).
/// The shell never calls gallocy's API, so it never joins: like under glibc it has one thread and
/// no socket (the `threads=1 sockets=0` line).
const DASH_SCRIPT: &str = r#"
ls /usr/bin | sort | wc -l
echo hi | cat
printf 'a\nb\n' | sort -r | head -1
ls /usr/bin | sort -r | head -3 | tr a-z A-Z
( echo subshell; cd /usr && pwd; ls /usr/bin | head -2 )
( ( echo nested subshell ) | cat )
x=$(printf 'a\nb\n' | sort -r | head -1); echo "cs=$x"
y=$( (echo one; echo two; echo three) | wc -l ); echo "lines=$y"
z=$(echo $(echo deep $(echo deeper $(printf '%s' deepest)))); echo "$z"
n=$(ls /usr/bin | wc -l); echo "count=$n"
s=; i=0; while [ $i -lt 30 ]; do s="$s$(echo $i | tr 0-9 a-j)"; i=$((i+1)); done; echo "loop=$s"
false | true; echo "status1=$?"
true | false; echo "status2=$?"
( exit 7 ); echo "subshell-status=$?"
v=$(exit 9); echo "subst-status=$?"
{ echo grp1; echo grp2; echo grp3; } | sort -r | tr '\n' ' '; echo
seq 1 3000 | sort -n -r | head -2
grep -q libgallocy /proc/$$/maps && echo shell-has-shim >&2
( grep -q libgallocy /proc/self/maps && echo child-has-shim >&2 )
echo "threads=$(ls /proc/$$/task | wc -l) sockets=$(ls -l /proc/$$/fd | grep -c socket)"
echo done
"#;

/// bash: the same kinds of commands, with PIPESTATUS, pipefail and process substitution.
const BASH_SCRIPT: &str = r#"
ls /usr/bin | sort | wc -l; echo "ps=${PIPESTATUS[*]}"
echo hi | cat; echo "ps=${PIPESTATUS[*]}"
printf 'a\nb\n' | sort -r | head -1; echo "ps=${PIPESTATUS[*]}"
true | false | true; echo "ps=${PIPESTATUS[*]}"
(exit 3) | (exit 5) | true; echo "ps=${PIPESTATUS[*]}"
set -o pipefail; (exit 4) | true; echo "pipefail=$?"; set +o pipefail
( echo subshell; cd /usr && pwd; ls /usr/bin | head -2 ); echo "ps=${PIPESTATUS[*]}"
x=$(ls /usr/bin | sort | tail -1); echo "last=$x"
y=$( (echo one; echo two; echo three) | wc -l ); echo "lines=$y"
z=$(echo $(echo deep $(echo deeper $(printf '%s' deepest)))); echo "$z"
s=; for i in $(seq 0 29); do s+=$(echo $i | tr 0-9 a-j); done; echo "loop=$s"
while read -r l; do echo "read:$l"; done < <(printf 'p\nq\n' | sort -r)
mapfile -t arr < <(seq 1 5); echo "arr=${arr[*]} n=${#arr[@]}"
cat <(echo procsub1) <(echo procsub2)
v=$(exit 9); echo "subst-status=$?"
f() { local a; a=$(echo in-function | tr a-z A-Z); echo "$a"; }; f | cat; echo "ps=${PIPESTATUS[*]}"
grep -q libgallocy /proc/$$/maps && echo shell-has-shim >&2
( grep -q libgallocy /proc/self/maps && echo child-has-shim >&2 )
echo "threads=$(ls /proc/$$/task | wc -l) sockets=$(ls -l /proc/$$/fd | grep -c socket)"
echo done
"#;

/// Runs `SHELL -c SCRIPT` without the shim (the expected output), as every rank of a 2-rank job,
/// and as one process with LD_PRELOAD: every run must print exactly the same stdout.
fn shell_case(shell: &str, script: &str) {
    let sh = require_tool(shell, shell);
    let argv = [os(&sh), os("-c"), os(script)];
    let plain = solo(Preload::Nothing, &[], &argv);
    if !plain.f.success() || !plain.f.stderr.is_empty() {
        plain.fail(&format!(
            "{shell}: the script fails or writes to stderr even without the shim (a problem of the test or of this \
             machine, not of gallocy)"
        ));
    }
    let expected: Vec<String> = plain.f.stdout.lines().map(str::to_string).collect();
    assert!(expected.last().map(String::as_str) == Some("done"), "{}", plain.f.report());
    let has_shim = ["shell-has-shim", "child-has-shim"];

    let ran = job(2, &[], &argv);
    check_job(&ran, 2, &|_| expected.clone(), &|_| has_shim.iter().map(|s| s.to_string()).collect(), Stats::Absent);

    let ran = solo(Preload::Shim, &[], &argv);
    check_solo(&ran, &expected, &has_shim, Stats::Absent);
}

#[test]
fn dash_pipelines_subshells_and_command_substitution() {
    shell_case("dash", DASH_SCRIPT);
}

#[test]
fn bash_pipelines_pipestatus_subshells_and_substitutions() {
    shell_case("bash", BASH_SCRIPT);
}

// ------------------------------------------------------------------------------------ e. make -j2

const MAKE_FILES: usize = 6;
const MAKE_SCALE: i64 = 3;

/// A C tree: f1.c..f6.c, main.c, a header made by a make rule, and a Makefile with a link step.
fn write_make_tree(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let w = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    let mut decls = String::from("#include \"gen.h\"\n");
    let mut calls = String::new();
    for i in 1..=MAKE_FILES {
        w(
            &format!("f{i}.c"),
            format!(
                "#include \"funcs.h\"\nint f{i}(int x) {{\n    int s = 0;\n    for (int k = 0; k < x; k++)\n        \
                 s += k % ({i} + 2);\n    return s * SCALE + {i};\n}}\n"
            ),
        );
        decls.push_str(&format!("int f{i}(int x);\n"));
        calls.push_str(&format!("    sum += f{i}(1000 + {i});\n"));
    }
    w("funcs.h", decls);
    w(
        "main.c",
        format!(
            "#include <stdio.h>\n#include <string.h>\n#include \"funcs.h\"\n\
             int main(void) {{\n    long sum = 0;\n{calls}    printf(\"sum=%ld\\n\", sum);\n\
             \x20   FILE *m = fopen(\"/proc/self/maps\", \"r\");\n    char line[4096];\n    int shim = 0;\n\
             \x20   while (m && fgets(line, sizeof line, m))\n        if (strstr(line, \"libgallocy\"))\n            shim = 1;\n\
             \x20   if (shim)\n        fprintf(stderr, \"prog-has-shim\\n\");\n    return 0;\n}}\n"
        ),
    );
    let objs: Vec<String> = (1..=MAKE_FILES).map(|i| format!("f{i}.o")).chain(["main.o".to_string()]).collect();
    w(
        "Makefile",
        format!(
            "OBJS = {}\n\nprog: $(OBJS)\n\tcc -o $@ $(OBJS)\n\n%.o: %.c funcs.h gen.h\n\tcc -O2 -Wall -c -o $@ $<\n\n\
             gen.h:\n\tprintf '#define SCALE %d\\n' {MAKE_SCALE} > gen.h\n",
            objs.join(" ")
        ),
    );
}

/// What the generated program prints.
fn make_expected() -> String {
    let mut sum = 0i64;
    for i in 1..=MAKE_FILES as i64 {
        let x = 1000 + i;
        let s: i64 = (0..x).map(|k| k % (i + 2)).sum();
        sum += s * MAKE_SCALE + i;
    }
    format!("sum={sum}")
}

#[test]
fn make_j2_builds_a_c_tree_in_every_rank() {
    require_tool("make", "make");
    require_tool("cc", "gcc");
    let dir = TempDir::new("shapes-make");
    write_make_tree(&dir.join("src"));
    let expected = make_expected();
    // Every run copies the tree into a fresh directory `$1/build.XXXXXX` of its own, builds it
    // there with make -j2 and runs the result.
    let script = r#"d=$(mktemp -d "$1/build.XXXXXX") && cp "$1"/src/* "$d" && cd "$d" && make -s -j2 && ./prog"#;
    let argv = [os("/bin/sh"), os("-c"), os(script), os("sh"), os(dir.path())];
    let builds = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("build."))
            .collect();
        v.sort();
        v
    };

    let plain = solo(Preload::Nothing, &[], &argv);
    if !plain.f.success() || plain.f.stdout.trim() != expected {
        plain.fail(
            "make -j2 without the shim does not build a working program (a problem of the test or of this machine)",
        );
    }
    let before = builds();

    let ran = job(2, &[], &argv);
    check_job(&ran, 2, &|_| vec![expected.clone()], &|_| vec!["prog-has-shim".to_string()], Stats::Absent);
    let made: Vec<PathBuf> = builds().into_iter().filter(|p| !before.contains(p)).collect();
    if made.len() != 2 {
        ran.fail(&format!("expected 2 build directories (one per rank), found {made:?}"));
    }
    for d in &made {
        for f in ["prog", "main.o", "f1.o", "f6.o", "gen.h"] {
            if !d.join(f).exists() {
                ran.fail(&format!("a rank did not make {}", d.join(f).display()));
            }
        }
    }

    let ran = solo(Preload::Shim, &[], &argv);
    check_solo(&ran, std::slice::from_ref(&expected), &["prog-has-shim"], Stats::Absent);
}

// ------------------------------------------------------------------------- f. a forking server

#[test]
fn forking_server_children_see_the_heap_as_it_was_at_fork() {
    let dir = TempDir::new("shapes-forkserver");
    let prog = build_prog(&dir, "forkserver");
    let argv = [os(&prog), os("20")];
    // As a one-process job first, then as a joined member of a 2-rank job that holds some pages
    // read-only and some writable at each fork.
    let ran = solo(Preload::Shim, &[], &argv);
    check_solo(&ran, &["rank 0 of 1: forking server ok (20 children)".into()], &[], Stats::Absent);
    let ran = job(2, &[], &argv);
    check_job(
        &ran,
        2,
        &|r| vec![format!("rank {r} of 2: forking server ok ({} children)", if r == 0 { 20 } else { 0 })],
        &none,
        Stats::Absent,
    );
}

/// A joined member forks while another thread flushes every stdio stream (`fflush(NULL)` holds
/// stdio's list lock, which glibc's `fork` takes after the fork handlers, while it writes FILE
/// structures on heap pages). Both ranks fork 200 times; every fork must complete (freezing the
/// heap while the flushing thread held that lock deadlocked: it waited for the heap, the fork for
/// the lock) and every child must see whole data.
#[test]
fn a_member_forks_while_another_thread_flushes_stdio() {
    let dir = TempDir::new("shapes-forkflush");
    let prog = build_prog(&dir, "forkflush");
    let argv = [os(&prog), os("200")];
    let ran = job(2, &[], &argv);
    check_job(&ran, 2, &|r| vec![format!("rank {r} of 2: fork beside fflush ok (200 forks)")], &none, Stats::Absent);
}

/// Another library's fork child handler reads and writes the heap: it must read what the parent
/// had at the fork, its write must stay in the child, and the parent must not see it.
#[test]
fn another_librarys_fork_child_handler_touches_the_heap() {
    let dir = TempDir::new("shapes-forkhook");
    let prog = build_prog(&dir, "forkflush");
    let hook = build_lib(&dir, "forkhook");
    let list = format!("{}:{}", hook.display(), libgallocy().display());
    let ran = job(2, &[("GALLOCY_PRELOAD_LIB", os(&list))], &[os(&prog), os("50"), os("hook")]);
    check_job(
        &ran,
        2,
        &|r| vec![format!("rank {r} of 2: fork beside fflush ok (50 forks) with a hook")],
        &none,
        Stats::Absent,
    );
}

/// A child made by a raw `clone` system call runs no fork handler, so it gets no copy of the heap
/// (the shared view is not inherited): touching the heap ends it with one clear line and exit
/// code 1, and its parent's job goes on.
#[test]
fn a_raw_clone_child_of_a_member_that_touches_the_heap_stops_with_a_clear_error() {
    let dir = TempDir::new("shapes-rawclone");
    let prog = build_prog(&dir, "forkflush");
    let ran = job(2, &[], &[os(&prog), os("0"), os("clone")]);
    ran.assert_success();
    let (outs, other_out) = split_ranks(&ran.f.stdout, 2);
    let (errs, other_err) = split_ranks(&ran.f.stderr, 2);
    if !other_out.is_empty() || !other_err.is_empty() {
        ran.fail(&format!("lines that belong to no rank: {:?}", [other_out, other_err].concat()));
    }
    for r in 0..2 {
        let prefix = format!("rank {r} of 2: raw clone child stopped (page ");
        let Some(page) = outs[r].first().and_then(|l| l.strip_prefix(&prefix)?.strip_suffix(')')) else {
            ran.fail(&format!("rank {r}: stdout lines are {:?}, expected one starting with {prefix:?}", outs[r]));
        };
        if outs[r].len() != 1 {
            ran.fail(&format!("rank {r}: stdout lines are {:?}, expected one", outs[r]));
        }
        let want = format!(
            "gallocy: rank {r}: fatal: a child process made without fork's handlers touched the shared heap: page {page}"
        );
        let own: Vec<&String> = errs[r].iter().filter(|l| !(r == 0 && l.starts_with("gallocy: transport:"))).collect();
        if own != [&want] {
            ran.fail(&format!("rank {r}: stderr lines are {own:?}, expected [{want:?}]"));
        }
    }
}

/// `_exit(0)` from a signal handler on rank 0's main thread while another thread of rank 0 waits
/// in a barrier for rank 1: the process leaves the job properly (its leaving barrier is the next
/// one), and the job ends with status 0 once rank 1 came and left.
#[test]
fn exit_from_a_signal_handler_beside_a_thread_in_a_barrier_leaves_the_job() {
    let dir = TempDir::new("shapes-sigexit-thread");
    let prog = build_prog(&dir, "sigexit");
    let ran = job(2, &[], &[os(&prog), os("thread")]);
    check_job(&ran, 2, &|r| vec![format!("rank {r} of 2: barrier passed")], &none, Stats::Absent);
}

/// `_exit(0)` from a signal handler that interrupted rank 0 inside its own barrier wait
/// (gallocy's code cannot be entered again there): rank 0 ends at once without leaving the job,
/// and rank 1 stops with a clear error naming rank 0, within the test's time limit.
#[test]
fn exit_from_a_signal_handler_inside_a_barrier_ends_the_job_with_a_clear_error() {
    let dir = TempDir::new("shapes-sigexit-interrupted");
    let prog = build_prog(&dir, "sigexit");
    let ran = job(2, &[], &[os(&prog), os("interrupted")]);
    if ran.f.success() {
        ran.fail("the job succeeded, though rank 0 ended without leaving it");
    }
    let (outs, _) = split_ranks(&ran.f.stdout, 2);
    let (errs, _) = split_ranks(&ran.f.stderr, 2);
    if outs.iter().any(|o| !o.is_empty()) {
        ran.fail(&format!("expected no output from the ranks, got {outs:?}"));
    }
    if !errs[1].iter().any(|l| l.starts_with("gallocy: rank 1: fatal: lost contact with rank 0")) {
        ran.fail("rank 1 did not report that it lost contact with rank 0");
    }
}

/// Requires that rank 0's statistics (`GALLOCY_STATS=1`) count at least one close of its heap's
/// view: a test of what happens after a close must have one.
fn require_view_closes(ran: &Ran) {
    let closes = ran
        .f
        .stderr
        .lines()
        .find(|l| l.contains("gallocy stats rank 0:"))
        .and_then(|l| l.split("view closes ").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    if closes == 0 {
        ran.fail("rank 0's view never closed: the test did not test what it is for");
    }
}

/// The forking server again, with the heap's view allowed only 64 mappings: rank 0's view keeps
/// closing (its pages alternate between read-only and writable), so at forks some held pages
/// show no access in the parent. Each child must still get every page its parent holds, as it
/// was at the fork.
#[test]
fn forking_server_children_get_pages_the_parents_view_had_closed() {
    let dir = TempDir::new("shapes-forkserver-closed");
    let prog = build_prog(&dir, "forkserver");
    // Rank 1 reads every other page of the first half: rank 0's pages there alternate.
    let argv = [os(&prog), os("20"), os("2")];
    let env = [("GALLOCY_HEAP_MAPPINGS", os("64")), ("GALLOCY_STATS", os("1"))];
    let ran = job(2, &env, &argv);
    check_job(
        &ran,
        2,
        &|r| vec![format!("rank {r} of 2: forking server ok ({} children)", if r == 0 { 20 } else { 0 })],
        &none,
        Stats::Required,
    );
    require_view_closes(&ran);
}

/// A preloaded member holding more scattered pages than `vm.max_map_count` allows mappings
/// (two ranks write interleaved pages of a block of 1.5 × that many pages) forks: its view had
/// closed most of them, and the child cannot open them all at once either; the child must still
/// read every page its parent wrote, and the job every page afterwards. In the emulated guest
/// (`GALLOCY_TEST_SLOW`), 3000 pages against a budget of 2000 mappings (`GALLOCY_HEAP_MAPPINGS`).
#[test]
fn a_member_with_more_scattered_pages_than_mappings_forks() {
    let dir = TempDir::new("shapes-interleavefork");
    let prog = build_prog(&dir, "interleavefork");
    let limit: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap().trim().parse().unwrap();
    let mut env = vec![("GALLOCY_STATS", os("1"))];
    let pages = if slow() {
        env.push(("GALLOCY_HEAP_MAPPINGS", os("2000")));
        3000
    } else if limit > 262_144 {
        eprintln!("skipped: vm.max_map_count is {limit}; 1.5 times that many pages would take too long here");
        return;
    } else {
        limit + limit / 2
    };
    let argv = [os(&prog), os(pages.to_string())];
    let ran = job(2, &env, &argv);
    check_job(
        &ran,
        2,
        &|r| vec![format!("rank {r} of 2: interleaved fork ok ({pages} pages)")],
        &none,
        Stats::Required,
    );
    require_view_closes(&ran);
}

/// A Python member that joins the job through the C API (ctypes), moves pages between the ranks,
/// forks and execs (a shell pipeline through `subprocess`, `git` and `cc`, a `multiprocessing`
/// pool of forked workers that read the shared data), and moves pages again afterwards: the
/// children must see the heap as it was, and the parent's transport (its queue pairs and
/// registered memory, over RDMA) must keep working after they exit.
const JOINED_PYTHON: &str = r#"
import ctypes, multiprocessing, os, subprocess, sys
g = ctypes.CDLL(None)
g.gallocy_alloc_collective.restype = ctypes.c_void_p
g.gallocy_alloc_collective.argtypes = [ctypes.c_size_t]
r, n = g.gallocy_rank(), g.gallocy_size()
N = 64 * 4096

def pattern(i, round_):
    return (i * 7 + round_ * 13 + i // 4096) % 251

def exchange(round_):
    # Rank round_ % n writes a block every rank then reads (pages move between the ranks).
    p = g.gallocy_alloc_collective(N)
    buf = (ctypes.c_ubyte * N).from_address(p)
    writer = round_ % n
    if r == writer:
        buf[:] = bytes(pattern(i, round_) for i in range(N))
    g.gallocy_barrier()
    want = bytes(pattern(i, round_) for i in range(N))
    if bytes(buf) != want:
        sys.exit(f"round {round_}: the block rank {writer} wrote reads differently")
    g.gallocy_barrier()
    return buf, want

def worker(k):
    # A forked child: reads the parent's copy of the shared block, writes its own copy of it.
    # (A worker runs several tasks: bytes 0..15 are the tasks' own.)
    buf, want = SHARED
    if bytes(buf)[16:] != want[16:]:
        return "a child does not see the heap as it was at the fork"
    buf[k] = (want[k] + 1) % 251
    if buf[k] == want[k]:
        return "a child cannot write its copy of the heap"
    # The parent's registered memory (the heap's runtime view, a memfd; RDMA's message buffers,
    # shared anonymous memory) must not be in the child at all (MADV_DONTFORK).
    for line in open("/proc/self/maps"):
        if "gallocy-heap" in line or "/dev/zero (deleted)" in line:
            return "a child has the parent's mapping " + line.strip()
    return ""

if g.gallocy_init() != 0:
    sys.exit("gallocy_init failed")
SHARED = exchange(0)
out = subprocess.run("printf 'b\\na\\nc\\n' | sort | tr a-z A-Z | head -2 | wc -l", shell=True,
                     capture_output=True, text=True, check=True).stdout.strip()
git = subprocess.run(["git", "--version"], capture_output=True, text=True, check=True).stdout.split()[0]
cc = subprocess.run(["cc", "-dumpmachine"], capture_output=True, text=True, check=True).stdout.strip() != ""
with multiprocessing.get_context("fork").Pool(2) as pool:
    problems = [p for p in pool.map(worker, range(16)) if p]
if problems:
    sys.exit("pool: " + problems[0])
workers = True
if bytes(SHARED[0]) != SHARED[1]:
    sys.exit("a child's write reached the parent's heap")
for round_ in range(1, 5):
    exchange(round_)
print(f"rank {r} of {n}: pipeline={out} {git} cc={cc} pool={workers} after=ok")
"#;

fn joined_python_case(env: &[(&str, OsString)]) {
    let python = require_tool("python3", "python3");
    require_tool("git", "git");
    require_tool("cc", "gcc");
    let argv = [os(&python), os("-c"), os(JOINED_PYTHON)];
    let ran = job(2, env, &argv);
    check_job(
        &ran,
        2,
        &|r| vec![format!("rank {r} of 2: pipeline=2 git cc=True pool=True after=ok")],
        &none,
        Stats::Absent,
    );
}

#[test]
fn joined_python_forks_and_execs_and_its_transport_works_after() {
    joined_python_case(&[]);
}

/// The same with libibverbs' fork protection asked for (it changes how registrations are made on
/// kernels without copy-on-fork for pinned pages; gallocy's must work either way).
#[test]
fn joined_python_forks_and_execs_with_rdmav_fork_safe() {
    joined_python_case(&[("RDMAV_FORK_SAFE", os("1"))]);
}

// ------------------------------------------------------------------- g. leaving from a thread

/// `exitprog MODE` as a 2-rank job and as one process; every process must exit 0 and print
/// `line(r, n)`; `stats` as for check_job (GALLOCY_STATS=1 is set).
fn exit_case(mode: &str, line: &dyn Fn(usize, usize) -> String, stats: Stats) {
    let dir = TempDir::new("shapes-exit");
    let prog = build_prog(&dir, "exitprog");
    let argv = [os(&prog), os(mode)];
    let ran = job(2, &[stats_on()], &argv);
    check_job(&ran, 2, &|r| vec![line(r, 2)], &none, stats);
    let ran = solo(Preload::Shim, &[stats_on()], &argv);
    check_solo(&ran, &[line(0, 1)], &[], stats);
}

#[test]
fn exit_0_from_a_thread_while_another_writes_the_shared_heap() {
    exit_case("exit", &|r, n| format!("rank {r} of {n}: leaving by exit(0) from a thread"), Stats::Required);
}

#[test]
fn main_returning_while_a_thread_writes_the_shared_heap() {
    exit_case("return", &|r, n| format!("rank {r} of {n}: leaving by returning from main"), Stats::Required);
}

#[test]
fn underscore_exit_from_a_thread_while_another_writes_the_shared_heap() {
    exit_case("_exit", &|r, n| format!("rank {r} of {n}: leaving by _exit(0) from a thread"), Stats::Optional);
}

#[test]
fn underscore_capital_exit_from_a_thread_while_another_writes_the_shared_heap() {
    exit_case("_Exit", &|r, n| format!("rank {r} of {n}: leaving by _Exit(0) from a thread"), Stats::Optional);
}

/// `exitprog MODE 1`: rank 1 ends with code 3 by `how` (exit or _exit) from a thread, rank 0
/// with 0. `gallocy run` must exit 3, naming rank 1 only. Then as one process ending with 3.
fn exit_3_case(mode: &str, how: &str, stats: Stats) {
    let dir = TempDir::new("shapes-exit3");
    let prog = build_prog(&dir, "exitprog");
    let ran = job(2, &[stats_on()], &[os(&prog), os(mode), os("1")]);
    let code = ran.f.status.and_then(|s| s.code());
    if code != Some(3) {
        ran.fail(&format!("gallocy run must exit with rank 1's code 3, got {}", describe(ran.f.status)));
    }
    let (outs, other_out) = split_ranks(&ran.f.stdout, 2);
    let (errs, other_err) = split_ranks(&ran.f.stderr, 2);
    if !other_out.is_empty() {
        ran.fail(&format!("stdout lines that belong to no rank: {other_out:?}"));
    }
    for r in 0..2 {
        let want = vec![format!("rank {r} of 2: leaving by {how}({}) from a thread", if r == 1 { 3 } else { 0 })];
        if outs[r] != want {
            ran.fail(&format!("rank {r}: stdout lines are {:?}, expected {want:?}", outs[r]));
        }
        check_stderr(&ran, &format!("rank {r}"), r, &errs[r], &[], stats);
    }
    // The launcher's own lines: rank 1 named with its code, and nothing about rank 0 (which
    // exited 0 by itself, not stopped by the launcher).
    let named = "gallocy run: rank 1 exited with code 3";
    if !other_err.iter().any(|l| l == named) {
        ran.fail(&format!("no line {named:?} from the launcher"));
    }
    if let Some(l) = other_err.iter().find(|l| l.as_str() != named) {
        ran.fail(&format!("unexpected launcher line {l:?} (only rank 1 may be reported, exiting with code 3)"));
    }

    // One process: its own exit status is 3.
    let ran = solo(Preload::Shim, &[stats_on()], &[os(&prog), os(mode), os("0")]);
    if ran.f.status.and_then(|s| s.code()) != Some(3) {
        ran.fail(&format!("{how}(3) from a thread of a one-process job must end it with exit code 3"));
    }
    let want = format!("rank 0 of 1: leaving by {how}(3) from a thread");
    if ran.f.stdout.lines().collect::<Vec<_>>() != [want.as_str()] {
        ran.fail(&format!("stdout must be exactly {want:?}"));
    }
    let errs: Vec<String> = ran.f.stderr.lines().map(str::to_string).collect();
    check_stderr(&ran, "the process", 0, &errs, &[], stats);
}

#[test]
fn exit_3_from_a_thread_of_rank_1_fails_the_job_naming_rank_1() {
    exit_3_case("exit3", "exit", Stats::Required);
}

#[test]
fn underscore_exit_3_from_a_thread_of_rank_1_fails_the_job_naming_rank_1() {
    exit_3_case("_exit3", "_exit", Stats::Optional);
}

// --------------------------------------------------------------------- h. exec hand-off, children

/// `#!/bin/sh` + `exec "$@"` in `dir/wrap`.
fn write_wrapper(dir: &TempDir) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let w = dir.join("wrap");
    std::fs::write(&w, "#!/bin/sh\nexec \"$@\"\n").unwrap();
    std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755)).unwrap();
    w
}

#[test]
fn exec_wrapper_script_hands_its_rank_to_the_program() {
    let dir = TempDir::new("shapes-wrapper");
    let prog = build_prog(&dir, "rankprog");
    let wrap = write_wrapper(&dir);
    let argv = [os(&wrap), os(&prog), os("wrapped")];
    let ran = job(3, &[stats_on()], &argv);
    check_job(&ran, 3, &|r| vec![format!("rank {r} of 3: wrapped ok")], &none, Stats::Required);
    let ran = solo(Preload::Shim, &[stats_on()], &argv);
    check_solo(&ran, &["rank 0 of 1: wrapped ok".into()], &[], Stats::Required);
}

#[test]
fn env_hands_its_rank_to_the_program() {
    let dir = TempDir::new("shapes-env");
    let prog = build_prog(&dir, "rankprog");
    let argv = [os("/usr/bin/env"), os(&prog), os("via-env")];
    let ran = job(2, &[stats_on()], &argv);
    check_job(&ran, 2, &|r| vec![format!("rank {r} of 2: via-env ok")], &none, Stats::Required);
    let ran = solo(Preload::Shim, &[stats_on()], &argv);
    check_solo(&ran, &["rank 0 of 1: via-env ok".into()], &[], Stats::Required);
}

#[test]
fn program_started_by_a_shell_member_is_a_one_process_job() {
    // The shell is the member (it never joins); PROG runs as its child, once plainly and once
    // inside $(...): both times rank 0 of 1, joining only its own one-process job.
    let dir = TempDir::new("shapes-shell-child");
    let prog = build_prog(&dir, "rankprog");
    let script = r#""$1" child; out=$("$1" substituted); echo "captured: $out"; true"#;
    let argv = [os("/bin/sh"), os("-c"), os(script), os("sh"), os(&prog)];
    let expected = vec!["rank 0 of 1: child ok".to_string(), "captured: rank 0 of 1: substituted ok".to_string()];
    let ran = job(2, &[], &argv);
    check_job(&ran, 2, &|_| expected.clone(), &none, Stats::Absent);
    let ran = solo(Preload::Shim, &[], &argv);
    check_solo(&ran, &expected, &[], Stats::Absent);
}

/// A preloaded member that joins runs on the transport the suite asks for, and rank 0 says which
/// at start-up. With `GALLOCY_TRANSPORT=rdma` (the Soft-RoCE guest, libgallocy.so built with RDMA):
/// the job runs on RDMA, and a device that does not exist stops every rank at start with the
/// transport's clear error, as it does a linked program.
#[test]
fn preloaded_member_says_which_transport_runs() {
    let dir = TempDir::new("shapes-transport");
    let prog = build_prog(&dir, "rankprog");
    let argv = [os(&prog), os("transport")];
    let ran = job(2, &[], &argv);
    check_job(&ran, 2, &|r| vec![format!("rank {r} of 2: transport ok")], &none, Stats::Absent);
    let wanted = std::env::var("GALLOCY_TRANSPORT").unwrap_or_default();
    let has_device = std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some());
    let note = ran.f.stderr.lines().find(|l| l.starts_with("[rank 0] gallocy: transport:"));
    let rdma_build = std::fs::read(libgallocy())
        .is_ok_and(|b| b.windows(b"rdma_mummy_load_ibverbs".len()).any(|w| w == b"rdma_mummy_load_ibverbs"));
    if wanted.is_empty() && !has_device && rdma_build {
        // A library built with RDMA, on `auto` without a device, says that it fell back to TCP
        // and why (.ci/guest-suite.sh runs this on the host too).
        if !note.is_some_and(|n| n.starts_with("[rank 0] gallocy: transport: tcp (auto: rank 0: no RDMA")) {
            ran.fail("without an RDMA device, `auto` must say it runs on TCP and why");
        }
    }
    if wanted != "rdma" {
        eprintln!(
            "(GALLOCY_TRANSPORT is not rdma: the job ran on the default transport ({}); the RDMA cases run in the guest)",
            note.unwrap_or("TCP-only build: no transport note")
        );
        return;
    }
    if !ran.f.stderr.contains("[rank 0] gallocy: transport: rdma (") {
        ran.fail("GALLOCY_TRANSPORT=rdma: rank 0 must say `gallocy: transport: rdma (...)`");
    }
    let ran = job(2, &[("GALLOCY_RDMA_DEVICE", os("gallocy_no_such_device"))], &argv);
    if ran.f.success() {
        ran.fail("GALLOCY_TRANSPORT=rdma with a device that does not exist must fail");
    }
    for needle in ["--transport rdma", "no device named \"gallocy_no_such_device\""] {
        if !ran.f.stderr.contains(needle) {
            ran.fail(&format!("the error must say {needle:?}"));
        }
    }
}

#[test]
fn exec_wrapper_under_mpirun() {
    let Some(mpirun) = find_in_path("mpirun") else {
        eprintln!(
            "SKIPPED exec_wrapper_under_mpirun: `mpirun` is not on PATH (install Open MPI: `apt-get install -y \
             openmpi-bin`)"
        );
        return;
    };
    let dir = TempDir::new("shapes-mpirun");
    let prog = build_prog(&dir, "rankprog");
    let wrap = write_wrapper(&dir);
    let lib = libgallocy();
    let coordinator = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(&mpirun);
    clean_env_with_transport(&mut cmd).env("GALLOCY_COORDINATOR", &coordinator).env("GALLOCY_STATS", "1");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    }
    // LD_PRELOAD only in the ranks (-x NAME=value), not in mpirun itself.
    cmd.args(["-n", "2", "--oversubscribe", "--bind-to", "none", "-x", "GALLOCY_COORDINATOR", "-x", "GALLOCY_STATS"])
        .arg("-x")
        .arg(format!("LD_PRELOAD={}", lib.display()))
        .arg(&wrap)
        .arg(&prog)
        .arg("mpirun-wrapped");
    let how = repro(&cmd);
    let label = format!("mpirun -n 2 (GALLOCY_COORDINATOR={coordinator}) wrap rankprog");
    let ran = {
        let _serial = serial();
        Ran { f: run_and_kill_group(&label, &mut cmd, JOB_TIMEOUT), how }
    };
    ran.assert_success();
    let mut lines: Vec<&str> = ran.f.stdout.lines().collect();
    lines.sort();
    if lines != ["rank 0 of 2: mpirun-wrapped ok", "rank 1 of 2: mpirun-wrapped ok"] {
        ran.fail(&format!("stdout lines are {lines:?}, expected rank 0 and rank 1 of 2"));
    }
    for r in 0..2 {
        let stats = format!("gallocy stats rank {r}:");
        if ran.f.stderr.lines().filter(|l| l.starts_with(&stats)).count() != 1 {
            ran.fail(&format!("expected one line starting with {stats:?} on stderr"));
        }
    }
    let low = ran.f.stderr.to_lowercase();
    if low.contains("fatal") || low.contains("lost contact") {
        ran.fail("error on stderr");
    }
}
