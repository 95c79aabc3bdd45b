//! Result summaries: histogram -> percentiles, the line format children use to hand results to
//! the launcher, the human table and the JSON result lines (serde_json).

use hdrhistogram::Histogram;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{json, Value};

/// Prefix of a result record on a child's stdout; the launcher collects these lines instead of
/// relaying them.
pub const RECORD_PREFIX: &str = "@@rec ";
/// Prefix of a "case skipped" notice on a child's stdout.
pub const SKIP_PREFIX: &str = "@@skip ";

/// A latency histogram in nanoseconds, 1 ns .. 100 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// Percentiles of one measured series.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub name: String,
    pub count: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    pub mean_ns: u64,
    /// Free-form remark (may contain spaces), shown after the numbers.
    pub note: String,
}

impl Summary {
    pub fn from_histogram(name: &str, h: &Histogram<u64>, note: &str) -> Self {
        Summary {
            name: name.to_string(),
            count: h.len(),
            p50_ns: h.value_at_quantile(0.50),
            p90_ns: h.value_at_quantile(0.90),
            p99_ns: h.value_at_quantile(0.99),
            max_ns: h.max(),
            mean_ns: h.mean().round() as u64,
            note: note.to_string(),
        }
    }

    /// One line: `@@rec name count p50 p90 p99 max mean note...` (nanoseconds).
    pub fn to_record(&self) -> String {
        format!(
            "{RECORD_PREFIX}{} {} {} {} {} {} {} {}",
            self.name, self.count, self.p50_ns, self.p90_ns, self.p99_ns, self.max_ns, self.mean_ns, self.note
        )
        .trim_end()
        .to_string()
    }

    /// Inverse of [`Summary::to_record`].
    pub fn parse_record(line: &str) -> Option<Self> {
        let rest = line.strip_prefix(RECORD_PREFIX)?;
        let mut it = rest.splitn(8, ' ');
        let name = it.next()?.to_string();
        let mut num = || it.next()?.parse::<u64>().ok();
        let (count, p50_ns, p90_ns, p99_ns, max_ns, mean_ns) = (num()?, num()?, num()?, num()?, num()?, num()?);
        let note = it.next().unwrap_or("").to_string();
        Some(Summary { name, count, p50_ns, p90_ns, p99_ns, max_ns, mean_ns, note })
    }

    pub fn p50_us(&self) -> f64 {
        us(self.p50_ns)
    }
    pub fn p99_us(&self) -> f64 {
        us(self.p99_ns)
    }
}

pub fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// Fixed-width table, times in microseconds.
pub fn table(rows: &[Summary]) -> String {
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    let mut s = format!(
        "{:<w$} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}  (µs)\n",
        "case", "count", "p50", "p90", "p99", "max", "mean"
    );
    for r in rows {
        s += &format!(
            "{:<w$} {:>7} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}  {}\n",
            r.name,
            r.count,
            us(r.p50_ns),
            us(r.p90_ns),
            us(r.p99_ns),
            us(r.max_ns),
            us(r.mean_ns),
            r.note
        );
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The JSON result lines (serde_json). Every benchmark prints one as the last line of its stdout;
// the keys come in the order below.

/// A float in a result line: rounded to 3 decimals, `null` when not finite (a case that did not
/// run, a ratio with a failed side).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Num(pub f64);

impl Serialize for Num {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Three decimals, but never fewer than three significant digits: a tiny ratio (a
        // speedup of 0.0002) must not print as 0.
        let x = self.0;
        let decimals = if x != 0.0 && x.abs() < 0.1 { (2 - x.abs().log10().floor() as i32).min(15) } else { 3 };
        let scale = 10f64.powi(decimals);
        let rounded = (x * scale).round() / scale;
        if rounded.is_finite() {
            s.serialize_f64(rounded)
        } else {
            s.serialize_none()
        }
    }
}

/// The keys of a result line that depend on what ran (`<case>_p50_us`, `<workload>_<side>_ns`,
/// ...), in the order they were added (serde_json's own map would sort them).
#[derive(Debug, Clone, PartialEq)]
pub struct Fields<V = Value>(pub Vec<(String, V)>);

impl<V> Default for Fields<V> {
    fn default() -> Self {
        Fields(Vec::new())
    }
}

impl<V: Serialize> Serialize for Fields<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<V> Fields<V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, key: impl Into<String>, v: V) -> &mut Self {
        self.0.push((key.into(), v));
        self
    }
}

impl Fields {
    /// A float ([`Num`]: 3 decimals, `null` if not finite).
    pub fn num(&mut self, key: impl Into<String>, v: f64) -> &mut Self {
        self.insert(key, json!(Num(v)))
    }

    /// A whole number, or `null`.
    pub fn int(&mut self, key: impl Into<String>, v: Option<u64>) -> &mut Self {
        self.insert(key, json!(v))
    }
}

/// Renders a result line (one line of JSON).
pub fn to_line(v: &impl Serialize) -> String {
    serde_json::to_string(v).expect("result lines serialize")
}

/// `{"count":..,"p50_us":..,"p90_us":..,"p99_us":..,"max_us":..,"mean_us":..}`
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SummaryJson {
    pub count: u64,
    pub p50_us: Num,
    pub p90_us: Num,
    pub p99_us: Num,
    pub max_us: Num,
    pub mean_us: Num,
}

impl From<&Summary> for SummaryJson {
    fn from(s: &Summary) -> Self {
        SummaryJson {
            count: s.count,
            p50_us: Num(us(s.p50_ns)),
            p90_us: Num(us(s.p90_ns)),
            p99_us: Num(us(s.p99_ns)),
            max_us: Num(us(s.max_ns)),
            mean_us: Num(us(s.mean_ns)),
        }
    }
}

/// `gallocy-bench floor`: `floor_p50_us`, `floor_p99_us`, `floor_tcp_rtt_*`, `floor_segv_*` in
/// `floor`.
#[derive(Debug, Clone, Serialize)]
pub struct FloorLine {
    pub bench: &'static str,
    pub iters: usize,
    pub spin_us: u64,
    pub load_avg_1m: Num,
    pub floor_pinned: bool,
    #[serde(flatten)]
    pub floor: Fields,
}

/// `gallocy-bench fault`: the header, the read/write fault of `read_home_owner`/`write_0`
/// (`null` if not run), then in `results` the floor keys, `ratio`, `write_ratio` and
/// `<case>_p50_us`/`<case>_p99_us` per case that ran, then every row of the table in `cases`.
#[derive(Debug, Clone, Serialize)]
pub struct FaultLine {
    pub bench: &'static str,
    pub procs: usize,
    pub iters: usize,
    pub spin_us: u64,
    pub transport: String,
    pub load_avg_1m: Num,
    pub idle_before_pct: Num,
    pub floor_pinned: bool,
    pub read_fault_p50_us: Num,
    pub read_fault_p99_us: Num,
    pub write_fault_p50_us: Num,
    pub write_fault_p99_us: Num,
    #[serde(flatten)]
    pub results: Fields,
    pub cases: Fields<SummaryJson>,
}

/// `gallocy-bench malloc`: per workload `<w>_glibc_ops`, `<w>_gallocy_ops`, `<w>_ratio`,
/// `<w>_glibc_maxrss_kb`, `<w>_gallocy_maxrss_kb` in `workloads`.
#[derive(Debug, Clone, Serialize)]
pub struct MallocLine {
    pub bench: &'static str,
    pub seconds: Num,
    pub warmup_s: Num,
    pub reps: usize,
    pub slots: usize,
    pub lib: Option<String>,
    pub glibc_only: bool,
    pub load_avg_1m: Num,
    pub idle_before_pct: Num,
    #[serde(flatten)]
    pub workloads: Fields,
    pub min_ratio: Num,
    pub errors: Vec<String>,
}

/// `gallocy-bench syscalls`: per workload and side `<w>_<side>_ns`, `<w>_<side>_p99_ns` and (not
/// for glibc) `<w>_<side>_ratio` in `results`.
#[derive(Debug, Clone, Serialize)]
pub struct SyscallsLine {
    pub bench: &'static str,
    pub iters: usize,
    pub batch: usize,
    pub warmup: usize,
    pub reps: usize,
    pub len: usize,
    pub lib: Option<String>,
    pub load_avg_1m: Num,
    pub idle_before_pct: Num,
    #[serde(flatten)]
    pub results: Fields,
    pub errors: Vec<String>,
}

/// `gallocy-bench fork`: per side and P `<side>_p<P>_us`, `<side>_p<P>_p99_us`,
/// `<side>_p<P>_us_per_page`, and `ratio_p<P>` in `results`.
#[derive(Debug, Clone, Serialize)]
pub struct ForkLine {
    pub bench: &'static str,
    pub pages: Vec<usize>,
    pub ro_div: usize,
    pub iters: usize,
    pub max_seconds: Num,
    pub reps: usize,
    pub page_size: usize,
    pub lib: Option<String>,
    pub load_avg_1m: Num,
    pub idle_before_pct: Num,
    #[serde(flatten)]
    pub results: Fields,
    pub errors: Vec<String>,
}

/// `gallocy-bench preload-fault`.
#[derive(Debug, Clone, Serialize)]
pub struct PreloadFaultLine {
    pub bench: &'static str,
    pub transport: String,
    pub lib: String,
    pub iters: usize,
    pub pages: usize,
    pub read_p50_us: Num,
    pub read_p99_us: Num,
    pub read: SummaryJson,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_three_decimals_or_three_significant_digits() {
        let j = |x: f64| serde_json::to_string(&Num(x)).unwrap();
        assert_eq!(j(1.23456), "1.235");
        assert_eq!(j(12345.6789), "12345.679");
        assert_eq!(j(0.000226123), "0.000226", "a tiny speedup is not 0");
        assert_eq!(j(-0.0123456), "-0.0123");
        assert_eq!(j(0.0), "0.0");
        assert_eq!(j(f64::NAN), "null");
    }

    #[test]
    fn record_round_trip() {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let s = Summary::from_histogram("read_home_owner", &h, "faults=1000 ok");
        assert_eq!(s.count, 1000);
        assert!((s.p50_us() - 500.0).abs() < 1.0, "{}", s.p50_us());
        assert!((s.p99_us() - 990.0).abs() < 2.0, "{}", s.p99_us());
        let back = Summary::parse_record(&s.to_record()).unwrap();
        assert_eq!(back, s);
        let no_note = Summary { note: String::new(), ..s };
        assert_eq!(Summary::parse_record(&no_note.to_record()).unwrap(), no_note);
        assert!(Summary::parse_record("hello").is_none());
    }

    #[test]
    fn json_is_escaped_and_ordered() {
        let mut o = Fields::new();
        o.insert("a\"b", json!("x\ny")).int("n", Some(3)).num("f", 1.5).num("bad", f64::NAN).int("none", None);
        o.num("r", 2.0 / 3.0).num("big", 12345.6789);
        assert_eq!(to_line(&o), r#"{"a\"b":"x\ny","n":3,"f":1.5,"bad":null,"none":null,"r":0.667,"big":12345.679}"#);
    }

    #[test]
    fn lines_keep_their_shape() {
        let s = Summary {
            name: "floor".into(),
            count: 2,
            p50_ns: 1500,
            p90_ns: 2000,
            p99_ns: 3000,
            max_ns: 4000,
            mean_ns: 1600,
            note: String::new(),
        };
        let mut floor = Fields::new();
        floor.num("floor_p50_us", s.p50_us()).num("floor_p99_us", s.p99_us());
        let line =
            FloorLine { bench: "floor", iters: 10, spin_us: 20, load_avg_1m: Num(f64::NAN), floor_pinned: true, floor };
        assert_eq!(
            to_line(&line),
            r#"{"bench":"floor","iters":10,"spin_us":20,"load_avg_1m":null,"floor_pinned":true,"floor_p50_us":1.5,"floor_p99_us":3.0}"#
        );
        assert_eq!(
            to_line(&SummaryJson::from(&s)),
            r#"{"count":2,"p50_us":1.5,"p90_us":2.0,"p99_us":3.0,"max_us":4.0,"mean_us":1.6}"#
        );
        let mut cases = Fields::new();
        cases.insert("floor", SummaryJson::from(&s));
        let mut results = Fields::new();
        results.num("ratio", 2.0);
        let fault = FaultLine {
            bench: "fault",
            procs: 5,
            iters: 10,
            spin_us: 20,
            transport: "tcp".into(),
            load_avg_1m: Num(0.5),
            idle_before_pct: Num(99.0),
            floor_pinned: false,
            read_fault_p50_us: Num(1.0),
            read_fault_p99_us: Num(2.0),
            write_fault_p50_us: Num(f64::NAN),
            write_fault_p99_us: Num(f64::NAN),
            results,
            cases,
        };
        let text = to_line(&fault);
        assert!(text.starts_with(r#"{"bench":"fault","procs":5,"iters":10,"spin_us":20,"transport":"tcp","#), "{text}");
        assert!(text.contains(r#""write_fault_p99_us":null,"ratio":2.0,"cases":{"floor":{"count":2,"#), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["cases"]["floor"]["p50_us"], json!(1.5));
    }

    #[test]
    fn table_has_header_and_rows() {
        let s = Summary {
            name: "x".into(),
            count: 1,
            p50_ns: 1500,
            p90_ns: 2000,
            p99_ns: 3000,
            max_ns: 4000,
            mean_ns: 1600,
            note: String::new(),
        };
        let t = table(&[s]);
        assert!(t.starts_with("case"));
        assert!(t.contains("1.50"));
    }
}
