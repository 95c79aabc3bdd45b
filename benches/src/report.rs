//! Result summaries: histogram -> percentiles, the line format children use to hand results to
//! the launcher, the human table and the hand-written JSON line.

use hdrhistogram::Histogram;

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

/// A flat JSON object written by hand: keys in insertion order, values already encoded.
#[derive(Default)]
pub struct JsonObject {
    fields: Vec<(String, String)>,
}

impl JsonObject {
    pub fn new() -> Self {
        Self::default()
    }
    /// A finite float with 3 decimals (non-finite values become `null`).
    pub fn num(&mut self, key: &str, v: f64) -> &mut Self {
        let enc = if v.is_finite() { format!("{v:.3}") } else { "null".into() };
        self.raw(key, enc)
    }
    pub fn int(&mut self, key: &str, v: u64) -> &mut Self {
        self.raw(key, v.to_string())
    }
    pub fn str(&mut self, key: &str, v: &str) -> &mut Self {
        self.raw(key, json_string(v))
    }
    /// `v` must already be valid JSON.
    pub fn raw(&mut self, key: &str, v: String) -> &mut Self {
        self.fields.push((key.to_string(), v));
        self
    }
    pub fn render(&self) -> String {
        let body: Vec<String> = self.fields.iter().map(|(k, v)| format!("{}:{}", json_string(k), v)).collect();
        format!("{{{}}}", body.join(","))
    }
}

/// JSON string literal with the escapes RFC 8259 requires.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `{"count":..,"p50_us":..,"p90_us":..,"p99_us":..,"max_us":..,"mean_us":..}`
pub fn summary_json(s: &Summary) -> String {
    let mut o = JsonObject::new();
    o.int("count", s.count)
        .num("p50_us", us(s.p50_ns))
        .num("p90_us", us(s.p90_ns))
        .num("p99_us", us(s.p99_ns))
        .num("max_us", us(s.max_ns))
        .num("mean_us", us(s.mean_ns));
    o.render()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut o = JsonObject::new();
        o.str("a\"b", "x\ny").int("n", 3).num("f", 1.5).num("bad", f64::NAN);
        assert_eq!(o.render(), r#"{"a\"b":"x\ny","n":3,"f":1.500,"bad":null}"#);
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
