//! Spawning copies of this executable on the local machine and collecting what they report.
//!
//! Children write human lines and result records on stdout. The launcher relays the human
//! lines (prefixed with the child's label) to its own stdout as they arrive, keeps the records
//! ([`crate::report::RECORD_PREFIX`], [`crate::report::SKIP_PREFIX`]) for the final report, and
//! lets stderr through untouched. If any child fails, the others are killed (by pid: only
//! processes we spawned) and the whole group fails.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One process to start: a label for messages, the arguments after the executable, extra env.
pub struct Spec {
    pub label: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// What a group of children printed as records, in arrival order (label, line).
pub type Records = Vec<(String, String)>;

/// A free loopback port: bind 127.0.0.1:0, read the port, close the socket.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A job token: hex of the clock, the pid and an address (unique enough for a local run).
pub fn token() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let stack_addr = &t as *const u128 as usize;
    format!("{:032x}{:08x}{:016x}", t, std::process::id(), stack_addr)
}

struct Running {
    label: String,
    child: Child,
    reader: Option<JoinHandle<()>>,
}

/// Start every spec, relay output, wait for all; fail (after killing the survivors) as soon as
/// one exits unsuccessfully or `timeout` passes. Returns the record lines.
pub fn run_group(specs: Vec<Spec>, timeout: Duration) -> Result<Records> {
    let exe = std::env::current_exe().context("current_exe")?;
    let (tx, rx) = mpsc::channel::<(String, String)>();
    let mut running: Vec<Running> = Vec::new();
    for spec in specs {
        let mut cmd = Command::new(&exe);
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                kill_all(&mut running);
                return Err(e).with_context(|| format!("spawn {}", spec.label));
            }
        };
        let stdout = child.stdout.take().expect("piped stdout");
        let tx = tx.clone();
        let label = spec.label.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with(crate::report::RECORD_PREFIX) || line.starts_with(crate::report::SKIP_PREFIX) {
                    let _ = tx.send((label.clone(), line));
                } else {
                    let out = std::io::stdout();
                    let mut out = out.lock();
                    let _ = writeln!(out, "[{label}] {line}");
                    let _ = out.flush();
                }
            }
        });
        running.push(Running { label: spec.label, child, reader: Some(reader) });
    }
    drop(tx);

    let start = Instant::now();
    let mut failure: Option<String> = None;
    let mut left = running.len();
    while left > 0 && failure.is_none() {
        left = 0;
        for r in running.iter_mut() {
            match r.child.try_wait() {
                Ok(Some(st)) if st.success() => {}
                Ok(Some(st)) => {
                    failure = Some(format!("{} exited with {st}", r.label));
                    break;
                }
                Ok(None) => left += 1,
                Err(e) => {
                    failure = Some(format!("{}: wait: {e}", r.label));
                    break;
                }
            }
        }
        if failure.is_none() && left > 0 {
            if start.elapsed() > timeout {
                failure = Some(format!("timed out after {} s", timeout.as_secs()));
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    if failure.is_some() {
        kill_all(&mut running);
    }
    for r in running.iter_mut() {
        if let Some(h) = r.reader.take() {
            let _ = h.join();
        }
    }
    if let Some(f) = failure {
        bail!("{f}");
    }
    Ok(rx.try_iter().collect())
}

/// Kill (SIGKILL, by pid) and reap every child that is still running.
fn kill_all(running: &mut [Running]) {
    for r in running.iter_mut() {
        if let Ok(None) = r.child.try_wait() {
            let _ = r.child.kill();
        }
        let _ = r.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_hex_and_port_is_nonzero() {
        let t = token();
        assert!(t.len() >= 32 && t.chars().all(|c| c.is_ascii_hexdigit()), "{t}");
        assert_ne!(free_port().unwrap(), 0);
    }
}
