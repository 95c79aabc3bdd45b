//! Sequential-consistency litmus tests across processes. Every shared variable lives on its own
//! page. Each round: one rank (rotating) resets the variables, barrier, the racing accesses (after
//! a small pseudo-random delay to vary interleavings), barrier. Every rank records what it read in
//! a local byte per round; at the end the records are exchanged with `broadcast` and every rank
//! checks every round for forbidden outcomes. Rank 0 prints the histograms.

use crate::util::{collective, mix, vread, vwrite, Args, Outcome, Shared};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Bit 7 of a record: this rank took part in the round.
const PART: u8 = 0x80;

struct Litmus {
    rank: usize,
    size: usize,
    rounds: usize,
    page: usize,
    vars: Shared,
}

impl Litmus {
    fn new(args: &Args, nvars: usize, min_ranks: usize) -> Result<Litmus, String> {
        let (rank, size) = (gallocy::rank(), gallocy::size());
        if size < min_ranks {
            return Err(format!("needs at least {min_ranks} ranks, the job has {size}"));
        }
        let page = gallocy::page_size();
        let vars = collective(nvars * page)?;
        Ok(Litmus { rank, size, rounds: args.usize_or("--rounds", 10_000), page, vars })
    }

    /// Variable `i`: the first word of page `i` of the collective block.
    fn var(&self, i: usize) -> *mut u64 {
        self.vars.at(i * self.page)
    }

    fn read(&self, i: usize) -> Result<u64, String> {
        // SAFETY: `var(i)` is an aligned word of the live collective block.
        let v = unsafe { vread(self.var(i)) };
        if v > 1 {
            return Err(format!("variable {i} holds {v}, only 0 or 1 are ever written"));
        }
        Ok(v)
    }

    fn write(&self, i: usize, v: u64) {
        // SAFETY: as in `read`.
        unsafe { vwrite(self.var(i), v) }
    }

    /// Run all rounds. `body(round)` does this rank's racing accesses and returns its record.
    fn run(
        &self,
        nvars: usize,
        mut body: impl FnMut(usize) -> Result<u8, String>,
    ) -> Result<(Vec<Vec<u8>>, Duration), String> {
        let mut mine = vec![0u8; self.rounds];
        gallocy::barrier();
        let t0 = Instant::now();
        for (round, rec) in mine.iter_mut().enumerate() {
            if round % self.size == self.rank {
                for i in 0..nvars {
                    self.write(i, 0);
                }
            }
            gallocy::barrier();
            delay(round, self.rank);
            *rec = body(round)?;
            gallocy::barrier();
        }
        let elapsed = t0.elapsed();
        // Exchange the records: every rank ends up with everybody's.
        let mut all = Vec::with_capacity(self.size);
        for root in 0..self.size {
            let mut buf = if root == self.rank { mine.clone() } else { vec![0u8; self.rounds] };
            gallocy::broadcast(&mut buf, root);
            all.push(buf);
        }
        if all[self.rank] != mine {
            return Err("broadcast changed this rank's own records".into());
        }
        Ok((all, elapsed))
    }
}

/// Busy-wait a pseudo-random 0..~60 us (half of the rounds not at all).
fn delay(round: usize, rank: usize) {
    let h = mix(((round as u64) << 8) ^ rank as u64);
    if h & 1 == 0 {
        return;
    }
    let us = (h >> 8) % 60;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_micros(us) {
        std::hint::spin_loop();
    }
}

fn histogram(rounds: usize, label: impl Fn(usize) -> (String, bool)) -> (BTreeMap<String, usize>, Vec<usize>) {
    let mut h = BTreeMap::new();
    let mut bad = Vec::new();
    for round in 0..rounds {
        let (l, forbidden) = label(round);
        *h.entry(l).or_insert(0) += 1;
        if forbidden {
            bad.push(round);
        }
    }
    (h, bad)
}

fn report(name: &str, rounds: usize, h: &BTreeMap<String, usize>, bad: &[usize], elapsed: Duration) -> Outcome {
    let hist: Vec<String> = h.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let hist = hist.join(", ");
    if gallocy::rank() == 0 {
        println!("rank 0: {name} histogram over {rounds} rounds: {hist}");
    }
    if !bad.is_empty() {
        let shown: Vec<String> = bad.iter().take(10).map(|r| r.to_string()).collect();
        return Err(format!(
            "forbidden outcome in {} of {rounds} rounds (first: {}); histogram: {hist}",
            bad.len(),
            shown.join(", ")
        ));
    }
    Ok(format!("{rounds} rounds, no forbidden outcome; {:.0} ms", elapsed.as_secs_f64() * 1e3))
}

/// Message passing. Variables: 0 = data, 1 = flag (different pages). Rank 1 writes data=1 then
/// flag=1; every other rank reads flag then data. Forbidden: flag=1 && data=0.
pub fn mp(args: &Args) -> Outcome {
    const DATA: usize = 0;
    const FLAG: usize = 1;
    let t = Litmus::new(args, 2, 2)?;
    let (all, elapsed) = t.run(2, |_| {
        if t.rank == 1 {
            t.write(DATA, 1);
            t.write(FLAG, 1);
            Ok(PART)
        } else {
            let f = t.read(FLAG)?;
            let d = t.read(DATA)?;
            Ok(PART | f as u8 | (d as u8) << 1)
        }
    })?;
    let readers: Vec<usize> = (0..t.size).filter(|&r| r != 1).collect();
    let (h, bad) = histogram(t.rounds * readers.len(), |i| {
        let (round, r) = (i / readers.len(), readers[i % readers.len()]);
        let rec = all[r][round];
        let (f, d) = (rec & 1, (rec >> 1) & 1);
        let forbidden = rec & PART == 0 || (f == 1 && d == 0);
        let tag = if forbidden { " (FORBIDDEN)" } else { "" };
        (format!("flag={f},data={d}{tag}"), forbidden)
    });
    report("litmus-mp", t.rounds, &h, &bad, elapsed)
}

/// Store buffering, one instance per pair of ranks (2p, 2p+1) on its own two variables.
/// Rank 2p: x=1; a=y. Rank 2p+1: y=1; b=x. Forbidden: a=0 && b=0.
pub fn sb(args: &Args) -> Outcome {
    let pairs = gallocy::size() / 2;
    let t = Litmus::new(args, 2 * pairs, 2)?;
    let (all, elapsed) = t.run(2 * pairs, |_| {
        let p = t.rank / 2;
        if p >= pairs {
            return Ok(0); // odd rank out
        }
        let (x, y) = (2 * p, 2 * p + 1);
        if t.rank % 2 == 0 {
            t.write(x, 1);
            Ok(PART | t.read(y)? as u8)
        } else {
            t.write(y, 1);
            Ok(PART | t.read(x)? as u8)
        }
    })?;
    let (h, bad) = histogram(t.rounds * pairs, |i| {
        let (round, p) = (i / pairs, i % pairs);
        let (ra, rb) = (all[2 * p][round], all[2 * p + 1][round]);
        let (a, b) = (ra & 1, rb & 1);
        let forbidden = ra & PART == 0 || rb & PART == 0 || (a == 0 && b == 0);
        let tag = if forbidden { " (FORBIDDEN)" } else { "" };
        (format!("a={a},b={b}{tag}"), forbidden)
    });
    report("litmus-sb", t.rounds, &h, &bad, elapsed)
}

/// Independent reads of independent writes. Rank 0: x=1. Rank 1: y=1. Rank 2 reads x then y,
/// rank 3 reads y then x (ranks >= 4 watch). Forbidden: rank 2 sees x=1,y=0 while rank 3 sees
/// y=1,x=0 (the two writes observed in opposite orders).
pub fn iriw(args: &Args) -> Outcome {
    const X: usize = 0;
    const Y: usize = 1;
    let t = Litmus::new(args, 2, 4)?;
    let (all, elapsed) = t.run(2, |_| match t.rank {
        0 => {
            t.write(X, 1);
            Ok(PART)
        }
        1 => {
            t.write(Y, 1);
            Ok(PART)
        }
        2 => {
            let x = t.read(X)?;
            let y = t.read(Y)?;
            Ok(PART | x as u8 | (y as u8) << 1)
        }
        3 => {
            let y = t.read(Y)?;
            let x = t.read(X)?;
            Ok(PART | y as u8 | (x as u8) << 1)
        }
        _ => Ok(0),
    })?;
    let (h, bad) = histogram(t.rounds, |round| {
        let (r2, r3) = (all[2][round], all[3][round]);
        let (x2, y2) = (r2 & 1, (r2 >> 1) & 1);
        let (y3, x3) = (r3 & 1, (r3 >> 1) & 1);
        let forbidden = r2 & PART == 0 || r3 & PART == 0 || (x2 == 1 && y2 == 0 && y3 == 1 && x3 == 0);
        let tag = if forbidden { " (FORBIDDEN)" } else { "" };
        (format!("r2:x={x2},y={y2} r3:y={y3},x={x3}{tag}"), forbidden)
    });
    report("litmus-iriw", t.rounds, &h, &bad, elapsed)
}
