//! Unmodified programs under `LD_PRELOAD=libgallocy.so`.
//!
//! Each program runs twice, with no GALLOCY_* variable (so the preloaded process is a one-process
//! job and gallocy is simply its malloc): once as it is and once with the shim preloaded (and
//! `GALLOCY_STATS=1`, whose "gallocy stats" line at exit proves the shim was loaded and started).
//! Both runs must exit 0 and print exactly the same stdout; every run has a hard timeout after
//! which its process group is killed and the test fails.
//!
//! Also: `fork()` with threads allocating (examples/fork_malloc.c, and Python's os.fork and
//! multiprocessing), where a child must get a private copy of the heap and a working allocator.
//!
//! Needs python3, git, sqlite3 and cc (Debian packages python3, git, sqlite3, gcc), and the
//! artifacts of `cargo build --release -p gallocy-shim -p gallocy-cli`.

use std::process::Command;
use std::time::Duration;

use gallocy_testkit::*;

/// Heap range of a one-process job with the default configuration.
const HEAP_BASE: u64 = 0x2000_0000_0000;
const HEAP_SIZE: u64 = 16 << 30;

/// Both runs of one program.
struct Pair {
    plain: Finished,
    preloaded: Finished,
}

/// Run `make(variant)` without and with the preloaded shim (`variant` is "plain" or "preload",
/// for commands that need a separate scratch area per run) and check both runs as described at
/// the top of this file.
fn compare(name: &str, make: &dyn Fn(&str) -> Command, stdin: Option<&[u8]>, timeout: Duration) -> Pair {
    let lib = libgallocy();
    let _serial = serial();

    let mut plain_cmd = make("plain");
    clean_env_with_transport(&mut plain_cmd);
    let plain = run_with_stdin(&format!("{name} (glibc malloc)"), &mut plain_cmd, stdin, timeout);
    assert!(
        plain.success(),
        "{name} fails even without the shim (a problem of the test or of this machine, not of gallocy)\n\
         reproduce: {}\n{}",
        repro(&plain_cmd),
        plain.report()
    );

    let mut pre_cmd = make("preload");
    clean_env_with_transport(&mut pre_cmd);
    pre_cmd.env("LD_PRELOAD", &lib).env("GALLOCY_STATS", "1");
    let preloaded = run_with_stdin(&format!("{name} (LD_PRELOAD=libgallocy.so)"), &mut pre_cmd, stdin, timeout);
    let how = format!("reproduce: {}", repro(&pre_cmd));
    assert!(preloaded.success(), "{name} under the shim: expected exit 0\n{how}\n{}", preloaded.report());
    assert!(
        plain.stdout == preloaded.stdout,
        "{name}: stdout differs with the shim preloaded; {}\n{how}\n{}{}",
        first_difference(&plain.stdout, &preloaded.stdout),
        plain.report(),
        preloaded.report()
    );
    assert!(
        preloaded.stderr.contains("gallocy stats"),
        "{name}: no \"gallocy stats\" line on stderr with LD_PRELOAD and GALLOCY_STATS=1: was the shim loaded \
         and did it run at exit?\n{how}\n{}",
        preloaded.report()
    );
    assert!(
        !plain.stderr.contains("gallocy stats"),
        "{name}: the run without the shim printed \"gallocy stats\" (is LD_PRELOAD set globally?)\n{}",
        plain.report()
    );
    eprintln!(
        "{name}: identical output ({} bytes); {:.2} s with glibc, {:.2} s with gallocy",
        plain.stdout.len(),
        plain.elapsed.as_secs_f64(),
        preloaded.elapsed.as_secs_f64()
    );
    Pair { plain, preloaded }
}

/// The first line where `a` and `b` differ, for failure messages.
fn first_difference(a: &str, b: &str) -> String {
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

// ------------------------------------------------------------------------------------------ python

const PYTHON_SCRIPT: &str = r#"
import hashlib, json, sys
d = {"k%d" % i: [i, i * 0.5, "v%x" % i] for i in range(1_000_000)}
s = json.dumps(d)
digest = hashlib.sha256(s.encode()).hexdigest()
sample = {k: d[k] for k in list(d)[::10]}
back = json.loads(json.dumps(sample, sort_keys=True))
assert back == sample, "json round trip"
del d, back
print(len(s), len(sample), digest)
sys.stdout.flush()
"#;

/// The interpreter itself rather than a wrapper (pyenv's shims are bash scripts).
fn python_executable() -> String {
    let py = require_tool("python3", "python3");
    let mut cmd = Command::new(&py);
    clean_env(&mut cmd).args(["-c", "import sys; print(sys.executable)"]);
    let f = run("python3 -c 'print(sys.executable)'", &mut cmd, Duration::from_secs(30));
    f.assert_success();
    let exe = f.stdout.trim().to_string();
    if exe.is_empty() {
        py.to_string_lossy().into_owned()
    } else {
        exe
    }
}

#[test]
fn python_dict_of_a_million_objects_to_json() {
    let python = python_executable();
    let make = |_: &str| {
        let mut c = Command::new(&python);
        // PYTHONMALLOC=malloc: every object comes from malloc (not from pymalloc's arenas).
        c.env("PYTHONMALLOC", "malloc").env("PYTHONHASHSEED", "0").args(["-c", PYTHON_SCRIPT]);
        c
    };
    let pair = compare("python3 json", &make, None, Duration::from_secs(120));
    let fields: Vec<&str> = pair.plain.stdout.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "unexpected python output {:?}", pair.plain.stdout);
    assert_eq!(fields[1], "100000");
}

// ------------------------------------------------------------------------------------------- git

const GIT_SCRIPT: &str = r#"
set -e
git init -q -b main repo
cd repo
printf 'hello\nworld\n' > hello.txt
i=1; : > numbers.txt
while [ $i -le 3000 ]; do echo "line $i $((i * i % 1009))" >> numbers.txt; i=$((i + 1)); done
mkdir -p src
for f in a b c d e; do printf 'int %s(void) { return %d; }\n' "$f" "${#f}" > "src/$f.c"; done
git add -A
git commit -q -m "first commit"
sed 's/7/seven/g' numbers.txt > numbers.new && mv numbers.new numbers.txt
printf 'hello\nthere\nworld\n' > hello.txt
git mv src/a.c src/alpha.c
git rm -q src/e.c
echo 'more' > NEWS
git add -A
git commit -q -m "second commit" -m "renames, edits, a deletion"
git tag -a v1 -m "version one"
git gc -q
echo "== log"; git log --oneline --decorate
echo "== stat"; git diff --stat HEAD~1 HEAD
echo "== diff"; git diff -M HEAD~1 HEAD -- hello.txt src NEWS
echo "== numstat"; git diff --numstat HEAD~1 HEAD
echo "== show"; git show --stat --format='%H %an %ad %s' HEAD
echo "== ls-tree"; git ls-tree -r HEAD
echo "== blame"; git blame -s hello.txt
echo "== grep"; git grep -c seven HEAD -- numbers.txt
echo "== fsck"; git fsck --strict --no-progress
echo "== status"; git status --short --branch
"#;

#[test]
fn git_repository_operations() {
    require_tool("git", "git");
    let scratch = TempDir::new("git");
    let make = |variant: &str| {
        let dir = scratch.join(variant);
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Command::new("sh");
        c.args(["-c", GIT_SCRIPT])
            .current_dir(&dir)
            .env("HOME", &dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "A U Thor")
            .env("GIT_AUTHOR_EMAIL", "author@example.com")
            .env("GIT_AUTHOR_DATE", "2024-01-02T03:04:05+00:00")
            .env("GIT_COMMITTER_NAME", "C O Mitter")
            .env("GIT_COMMITTER_EMAIL", "committer@example.com")
            .env("GIT_COMMITTER_DATE", "2024-01-02T03:04:05+00:00")
            .env("TZ", "UTC")
            .env("LC_ALL", "C")
            .env("GIT_PAGER", "cat")
            .env("PAGER", "cat");
        c
    };
    let pair = compare("git", &make, None, Duration::from_secs(120));
    assert!(pair.plain.stdout.contains("second commit"), "git log lacks the commit:\n{}", pair.plain.stdout);
}

// --------------------------------------------------------------------------------------- sqlite3

const SQL: &str = r#"
CREATE TABLE t(id INTEGER PRIMARY KEY, grp INTEGER NOT NULL, name TEXT NOT NULL, val REAL NOT NULL);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000)
INSERT INTO t SELECT x, x % 17, 'name-' || ((x * 7919) % 10007), ((x * 104729) % 1000) / 10.0 FROM c;
CREATE INDEX t_grp_val ON t(grp, val);
CREATE INDEX t_name ON t(name);
SELECT count(*), sum(id), min(val), max(val), printf('%.4f', avg(val)) FROM t;
SELECT grp, count(*), printf('%.2f', sum(val)), min(name), max(name) FROM t GROUP BY grp ORDER BY grp;
SELECT id, name, val FROM t WHERE grp = 3 ORDER BY val DESC, id LIMIT 5;
SELECT group_concat(id, ',') FROM (SELECT id FROM t ORDER BY name, id LIMIT 20);
SELECT count(*), sum(a.id * b.id) FROM t a JOIN t b ON a.grp = b.grp AND a.id < b.id WHERE a.id <= 600 AND b.id <= 600;
SELECT length(group_concat(name || ':' || val, ';')) FROM t;
BEGIN;
UPDATE t SET val = val + 1 WHERE grp = 0;
DELETE FROM t WHERE id % 5 = 0;
INSERT INTO t SELECT id + 20000, grp, upper(name), val * 2 FROM t WHERE id % 7 = 0;
COMMIT;
VACUUM;
SELECT count(*), printf('%.2f', sum(val)), count(DISTINCT name) FROM t;
SELECT grp, printf('%.3f', avg(val)) FROM t GROUP BY grp HAVING count(*) > 500 ORDER BY 2 DESC LIMIT 5;
PRAGMA integrity_check;
"#;

#[test]
fn sqlite3_table_of_ten_thousand_rows() {
    let sqlite = require_tool("sqlite3", "sqlite3");
    let scratch = TempDir::new("sqlite");
    std::fs::write(scratch.join("script.sql"), SQL).unwrap();
    let make = |variant: &str| {
        let db = scratch.join(&format!("{variant}.db"));
        let _ = std::fs::remove_file(&db);
        let mut c = Command::new(&sqlite);
        c.arg("-batch").arg("-bail").arg(&db).arg(format!(".read {}", scratch.join("script.sql").display()));
        c
    };
    let pair = compare("sqlite3", &make, None, Duration::from_secs(120));
    assert!(pair.plain.stdout.contains("10000|50005000|"), "unexpected sqlite3 output:\n{}", pair.plain.stdout);
    assert!(pair.plain.stdout.trim_end().ends_with("ok"), "integrity_check did not say ok:\n{}", pair.plain.stdout);
}

// -------------------------------------------------------------------------------------------- cc

const C_PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct entry { char *key; unsigned count; struct entry *next; };

static unsigned hash(const char *s) {
    unsigned h = 2166136261u;
    while (*s) { h ^= (unsigned char)*s++; h *= 16777619u; }
    return h;
}

static int by_count(const void *a, const void *b) {
    const struct entry *x = *(const struct entry *const *)a, *y = *(const struct entry *const *)b;
    if (x->count != y->count) return x->count < y->count ? 1 : -1;
    return strcmp(x->key, y->key);
}

int main(void) {
    enum { BUCKETS = 1024 };
    struct entry *table[BUCKETS] = {0};
    unsigned distinct = 0;
    char word[32];
    for (unsigned i = 0; i < 200000; i++) {
        unsigned x = (i * 2654435761u) >> 20;
        snprintf(word, sizeof word, "w%u", x % 5000);
        unsigned b = hash(word) % BUCKETS;
        struct entry *e = table[b];
        while (e && strcmp(e->key, word) != 0) e = e->next;
        if (!e) {
            e = malloc(sizeof *e);
            e->key = strdup(word);
            e->count = 0;
            e->next = table[b];
            table[b] = e;
            distinct++;
        }
        e->count++;
    }
    struct entry **all = malloc(distinct * sizeof *all);
    unsigned n = 0;
    for (unsigned b = 0; b < BUCKETS; b++)
        for (struct entry *e = table[b]; e; e = e->next) all[n++] = e;
    qsort(all, n, sizeof *all, by_count);
    printf("%u distinct words\n", distinct);
    for (unsigned i = 0; i < 5; i++) printf("%s %u\n", all[i]->key, all[i]->count);
    for (unsigned i = 0; i < n; i++) { free(all[i]->key); free(all[i]); }
    free(all);
    return 0;
}
"#;

#[test]
fn cc_compiles_a_program() {
    let cc = require_tool("cc", "gcc");
    let scratch = TempDir::new("cc");
    std::fs::write(scratch.join("prog.c"), C_PROGRAM).unwrap();
    let make = |variant: &str| {
        let mut c = Command::new(&cc);
        c.current_dir(scratch.path())
            .args(["-O3", "-g3", "-Wall", "-Wextra", "-o"])
            .arg(format!("prog-{variant}"))
            .arg("prog.c");
        c
    };
    compare("cc -O3 -g3", &make, None, Duration::from_secs(120));

    // The binary the compiler made under the shim is the very same file, and runs the same.
    let plain_bin = std::fs::read(scratch.join("prog-plain")).unwrap();
    let pre_bin = std::fs::read(scratch.join("prog-preload")).unwrap();
    assert!(
        plain_bin == pre_bin,
        "cc produced different binaries with and without the shim ({} vs {} bytes); compare {} and {}",
        plain_bin.len(),
        pre_bin.len(),
        scratch.join("prog-plain").display(),
        scratch.join("prog-preload").display()
    );
    let mut outputs = Vec::new();
    for variant in ["plain", "preload"] {
        let mut c = Command::new(scratch.join(&format!("prog-{variant}")));
        clean_env(&mut c);
        let f = run(&format!("prog-{variant}"), &mut c, Duration::from_secs(30));
        f.assert_success();
        outputs.push(f.stdout);
    }
    assert_eq!(outputs[0], outputs[1], "the two compiled programs print different things");
    assert!(
        outputs[0].starts_with("4096 distinct words\n"),
        "unexpected output of the compiled program:\n{}",
        outputs[0]
    );
}

// ------------------------------------------------------------------------ multi-threaded malloc

/// The address mt_malloc prints on stderr ("sample block 0x...").
fn sample_address(stderr: &str) -> Option<u64> {
    let at = stderr.find("sample block ")? + "sample block ".len();
    let word = stderr[at..].split(|c: char| c == ';' || c.is_whitespace()).next()?;
    u64::from_str_radix(word.trim_start_matches("0x"), 16).ok()
}

#[test]
fn multithreaded_malloc_free_stress() {
    let cc = require_tool("cc", "gcc");
    let scratch = TempDir::new("mt");
    let src = workspace().join("examples/mt_malloc.c");
    let bin = scratch.join("mt_malloc");
    let mut build = Command::new(&cc);
    clean_env(&mut build).args(["-O2", "-pthread", "-Wall", "-o"]).arg(&bin).arg(&src);
    run("cc -O2 -pthread mt_malloc.c", &mut build, Duration::from_secs(60)).assert_success();

    let make = |_: &str| {
        let mut c = Command::new(&bin);
        c.args(["10000000", "4"]);
        c
    };
    let pair = compare("mt_malloc (4 threads, 10M malloc/free)", &make, None, Duration::from_secs(150));
    assert!(
        pair.plain.stdout.starts_with("mt_malloc: 4 threads, 10000000 malloc/free pairs, checksum "),
        "unexpected mt_malloc output:\n{}",
        pair.plain.stdout
    );
    // Where the blocks came from: gallocy's heap with the shim, anywhere else without.
    let heap = HEAP_BASE..HEAP_BASE + HEAP_SIZE;
    let pre = sample_address(&pair.preloaded.stderr).expect("mt_malloc printed no sample block address");
    let plain = sample_address(&pair.plain.stderr).expect("mt_malloc printed no sample block address");
    assert!(
        heap.contains(&pre),
        "with the shim, mt_malloc's first block is at {pre:#x}, outside gallocy's heap {:#x}..{:#x}\n{}",
        heap.start,
        heap.end,
        pair.preloaded.report()
    );
    assert!(!heap.contains(&plain), "without the shim a block is at {plain:#x}, inside gallocy's heap range?");
}

// ------------------------------------------------------------------------------------------ fork

#[test]
fn fork_while_other_threads_allocate() {
    // examples/fork_malloc.c: 40 children (some with a grandchild) forked while 2 threads
    // allocate; each child checks and scribbles over its copy of the parent's blocks, the parent
    // checks that its blocks are untouched afterwards.
    let cc = require_tool("cc", "gcc");
    let scratch = TempDir::new("fork");
    let bin = scratch.join("fork_malloc");
    let mut build = Command::new(&cc);
    clean_env(&mut build)
        .args(["-O2", "-pthread", "-Wall", "-o"])
        .arg(&bin)
        .arg(workspace().join("examples/fork_malloc.c"));
    run("cc -O2 -pthread fork_malloc.c", &mut build, Duration::from_secs(60)).assert_success();
    let make = |_: &str| {
        let mut c = Command::new(&bin);
        c.arg("40");
        c
    };
    let pair = compare("fork_malloc (40 forks, 2 threads allocating)", &make, None, Duration::from_secs(90));
    assert!(pair.plain.stdout.starts_with("fork_malloc: 40 children ok"), "{}", pair.plain.stdout);
}

const PYTHON_FORK_SCRIPT: &str = r#"
import hashlib, multiprocessing as mp, os, threading
N = 200_000
data = {i: ("x%d" % i) * 3 for i in range(N)}

def work(k):
    local = [str(j) * 2 for j in range(5000)]
    return sum(len(data[i]) for i in range(k, N, 97)) + len(local)

def churn(stop):
    while not stop.is_set():
        junk = [{"a": [j] * 10} for j in range(1000)]
        del junk

if __name__ == "__main__":
    stop = threading.Event()
    threads = [threading.Thread(target=churn, args=(stop,)) for _ in range(2)]
    for t in threads:
        t.start()
    for round in range(5):
        pid = os.fork()
        if pid == 0:
            ok = all(data[i] == ("x%d" % i) * 3 for i in range(0, N, 101))
            for i in range(0, N, 2):
                data[i] = "changed"
            extra = [bytearray(1000) for _ in range(10000)]
            os._exit(0 if ok and data[0] == "changed" and len(extra) == 10000 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "child %d failed: %r" % (round, status)
        assert data[0] == "x0x0x0" and data[N - 2] == ("x%d" % (N - 2)) * 3, "the child's writes reached the parent"
    with mp.get_context("fork").Pool(4) as pool:
        results = pool.map(work, range(97))
    stop.set()
    for t in threads:
        t.join()
    digest = hashlib.sha256(repr(sorted(data.items())).encode()).hexdigest()
    print(len(results), sum(results), digest)
"#;

#[test]
fn python_fork_and_multiprocessing_pool() {
    // os.fork() while two threads allocate (the child's writes must stay in the child), then a
    // multiprocessing pool of 4 forked workers.
    let python = python_executable();
    let scratch = TempDir::new("pyfork");
    std::fs::write(scratch.join("forks.py"), PYTHON_FORK_SCRIPT).unwrap();
    let make = |_: &str| {
        let mut c = Command::new(&python);
        c.env("PYTHONMALLOC", "malloc").env("PYTHONHASHSEED", "0").arg(scratch.join("forks.py"));
        c
    };
    let pair = compare("python3 fork + multiprocessing", &make, None, Duration::from_secs(90));
    assert!(pair.plain.stdout.starts_with("97 "), "unexpected python output {:?}", pair.plain.stdout);
}
