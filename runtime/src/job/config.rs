//! Job configuration from `GALLOCY_*` variables, with the launchers' rank variables as fallback.

use std::net::IpAddr;
use std::time::Duration;

use crate::error::Error;
use crate::fault::prefetch::MAX_BATCH;
use crate::protocol::placement::Policy;

/// Default heap base: 0x2000_0000_0000 (32 TiB).
///
/// Why here: on x86-64 Linux (47-bit user space), PIE executables and their brk heap land at
/// 0x55xx_xxxx_xxxx-0x56xx_xxxx_xxxx, shared libraries, `mmap` results and thread stacks grow
/// down from just below 0x7fxx_xxxx_xxxx (ASLR moves them by at most a few TiB), non-PIE
/// executables sit near 0x40_0000, and PMIx (used by `mpirun`/`srun`) places its shared segments
/// in the 0x3xxx_xxxx_xxxx range. ASan's shadow ends at 0x1000_7fff_7fff. 0x2000_0000_0000 plus
/// the default 16 GiB is far from all of them. On aarch64 with 48-bit addresses it is also valid.
pub const DEFAULT_HEAP_BASE: usize = 0x2000_0000_0000;
/// Default heap size: 16 GiB of address space; memory is only used for pages that are touched.
pub const DEFAULT_HEAP_SIZE: usize = 16 << 30;
/// Default time a waiter spins before it blocks.
pub const DEFAULT_SPIN_US: u64 = 100;
/// Highest user-space address we accept for the end of the heap (47-bit address space).
const USER_SPACE_END: usize = 0x7fff_ffff_f000;
/// Largest job: as many ranks as a copy set holds.
pub const MAX_PROCESSES: usize = crate::protocol::ranks::RankSet::CAPACITY;
/// `GALLOCY_RDMA_BUSY_PEERS` at most: every peer of the largest job.
pub const MAX_BUSY_PEERS: usize = MAX_PROCESSES - 1;

/// Which transport moves bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// TCP sockets on loopback or a cluster network.
    Tcp,
    /// RDMA (ibverbs): page copies by one-sided READ. Fails at start-up without a usable device.
    Rdma,
    /// RDMA when every process has a usable device, TCP otherwise (the default).
    Auto,
}

impl TransportKind {
    /// The name users write in GALLOCY_TRANSPORT.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
            TransportKind::Auto => "auto",
        }
    }
}

/// Where RDMA runs (`GALLOCY_RDMA_DEVICE`, `GALLOCY_RDMA_PORT`, `GALLOCY_RDMA_GID_INDEX`), and how
/// many peers may get the full set of message buffers (`GALLOCY_RDMA_BUSY_PEERS`).
#[derive(Clone, Debug, Default)]
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub struct RdmaSettings {
    pub device: Option<String>,
    pub port: Option<u8>,
    pub gid_index: Option<u32>,
    pub busy_peers: Option<usize>,
    /// `GALLOCY_RDMA_ODP`: `None` (auto) registers the heap with on-demand paging where the device
    /// serves READs of such memory, `Some(true)` (on) requires it, `Some(false)` (off) never.
    pub on_demand: Option<bool>,
}

/// Who this process is in which job, and how to reach rank 0.
#[derive(Clone, Debug)]
pub struct Identity {
    pub rank: usize,
    pub size: usize,
    /// `host:port` of rank 0's listener; `None` for a one-process job.
    pub coordinator: Option<String>,
    /// `GALLOCY_COORDINATOR_HELD=1`: the launcher holds the coordinator's port for the job (`gallocy
    /// run` does), and rank 0's listener joins that hold (`gallocy_transport::coordinator`).
    pub coordinator_held: bool,
    /// The job's secret.
    pub token: Vec<u8>,
    /// True when no GALLOCY_TOKEN was given and the token was derived from the job's identity.
    pub token_derived: bool,
    /// `GALLOCY_BIND`: where this process (if not rank 0) listens for its peers. `None` (unset):
    /// chosen when joining from the route to the coordinator (see `bootstrap::listen_address`).
    pub bind: Option<IpAddr>,
}

/// Everything else, checked against rank 0's copy at start-up.
#[derive(Clone, Debug)]
pub struct Settings {
    pub heap_base: usize,
    pub heap_size: usize,
    pub spin: Duration,
    pub hold: Duration,
    pub stats: bool,
    pub transport: TransportKind,
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub rdma: RdmaSettings,
    pub setup_timeout: Duration,
    pub peer_timeout: Duration,
    /// How collective allocations are placed (`GALLOCY_PLACEMENT`).
    pub placement: Policy,
    /// Most pages one read miss asks for, itself included (`GALLOCY_PREFETCH`; 1: no prefetch).
    pub prefetch: u32,
    /// The memory model (`GALLOCY_CONSISTENCY`).
    pub consistency: Consistency,
    /// The time slice the service thread asks the kernel for (`GALLOCY_SERVICE_SLICE_US`);
    /// `None`: the kernel's default.
    pub service_slice: Option<Duration>,
    /// The nice value the service thread asks for (`GALLOCY_SERVICE_NICE`); `None`: the process's.
    pub service_nice: Option<i32>,
    /// Most kernel mappings the heap's application view may use before it is closed
    /// (`GALLOCY_HEAP_MAPPINGS`); `None`: derived from `vm.max_map_count` when joining.
    pub heap_mappings: Option<usize>,
    /// Whether this process copies pages straight out of the heaps of its same-host peers
    /// (`GALLOCY_SAME_HOST_READS`, default 1), instead of receiving them over the transport.
    pub same_host_reads: bool,
}

/// The memory model a job gives its programs (`GALLOCY_CONSISTENCY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Sequential consistency: one writer or many readers per page (the default).
    Sequential,
    /// Release consistency for data-race-free programs: several writers per page, their changes
    /// reach the page's home at release (`gallocy_unlock`, `gallocy_barrier`, `gallocy_finalize`)
    /// and other ranks see them after their next acquire (`gallocy_lock`, `gallocy_barrier`).
    Release,
}

impl Consistency {
    pub fn parse(s: &str) -> Option<Consistency> {
        match s {
            "sequential" => Some(Consistency::Sequential),
            "release" => Some(Consistency::Release),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Consistency::Sequential => "sequential",
            Consistency::Release => "release",
        }
    }
}

/// Reads a variable: `Ok(None)` when unset.
fn var(name: &str) -> Result<Option<String>, Error> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::config(name, "<not UTF-8>", "is not valid UTF-8")),
    }
}

/// Parses a size: decimal or 0x-hex, with an optional K/M/G/T (binary) suffix.
pub fn parse_size(s: &str) -> Option<usize> {
    let t = s.trim();
    let (digits, mult) = match t.chars().last()? {
        'k' | 'K' => (&t[..t.len() - 1], 1usize << 10),
        'm' | 'M' => (&t[..t.len() - 1], 1 << 20),
        'g' | 'G' => (&t[..t.len() - 1], 1 << 30),
        't' | 'T' => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v = match digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        Some(hex) => usize::from_str_radix(&hex.replace('_', ""), 16).ok()?,
        None => digits.replace('_', "").parse::<usize>().ok()?,
    };
    v.checked_mul(mult)
}

/// A whole number from `name`, `default` when unset, refused outside `min..=max` (`unit` names
/// what it counts, for the message).
fn parse_number(name: &str, default: u64, min: u64, max: u64, unit: &str) -> Result<u64, Error> {
    let Some(v) = var(name)? else { return Ok(default) };
    let why = || format!("must be a whole number of {unit} from {min} to {max}");
    let n: u64 = v.trim().parse().map_err(|_| Error::config(name, &v, &why()))?;
    if !(min..=max).contains(&n) {
        return Err(Error::config(name, &v, &why()));
    }
    Ok(n)
}

/// Largest `GALLOCY_SPIN_US` and `GALLOCY_HOLD_US`: one second.
pub const MAX_SPIN_HOLD_US: u64 = 1_000_000;
/// Bounds of `GALLOCY_SERVICE_SLICE_US`: the slices the kernel accepts (0.1 ms to 100 ms).
pub const SERVICE_SLICE_US: std::ops::RangeInclusive<u64> = 100..=100_000;

/// Fewest mappings `GALLOCY_HEAP_MAPPINGS` may give the heap.
pub const MIN_HEAP_MAPPINGS: u64 = 64;

/// `GALLOCY_HEAP_MAPPINGS`: unset for the default, else from [`MIN_HEAP_MAPPINGS`] to
/// `vm.max_map_count` (the kernel refuses more anyway).
fn heap_mappings() -> Result<Option<usize>, Error> {
    const NAME: &str = "GALLOCY_HEAP_MAPPINGS";
    if var(NAME)?.is_none() {
        return Ok(None);
    }
    let max = crate::heap::region::max_map_count().map_or(u64::from(u32::MAX), |m| m as u64);
    Ok(Some(parse_number(NAME, 0, MIN_HEAP_MAPPINGS, max, "mappings")? as usize))
}

/// The service thread's slice when `GALLOCY_SERVICE_SLICE_US` is unset: the shortest the kernel
/// accepts, so that a message wakes the service thread in front of an application thread that
/// spins or computes on the same CPU (Linux 6.12 and later let a waking task with a shorter
/// slice preempt; older kernels ignore the request).
pub const DEFAULT_SERVICE_SLICE_US: u64 = 100;

/// `GALLOCY_SERVICE_NICE`: unset (`None`) to keep the process's own nice value, else -20 to 19.
/// Unset by default: a raised priority made 2 ranks on 2 CPUs faster (Jacobi, pointer chasing)
/// but 4 ranks on 2 CPUs (oversubscribed) 2.5 to 4 times slower.
fn service_nice() -> Result<Option<i32>, Error> {
    const NAME: &str = "GALLOCY_SERVICE_NICE";
    let Some(v) = var(NAME)? else { return Ok(None) };
    match v.trim().parse::<i32>() {
        Ok(n) if (-20..=19).contains(&n) => Ok(Some(n)),
        _ => Err(Error::config(NAME, &v, "must be a nice value, a whole number from -20 to 19")),
    }
}

/// `GALLOCY_SERVICE_SLICE_US`: unset for [`DEFAULT_SERVICE_SLICE_US`], 0 for the kernel's
/// default, else a slice it accepts.
fn service_slice() -> Result<Option<Duration>, Error> {
    const NAME: &str = "GALLOCY_SERVICE_SLICE_US";
    let Some(v) = var(NAME)? else { return Ok(Some(Duration::from_micros(DEFAULT_SERVICE_SLICE_US))) };
    let why = format!(
        "must be 0 (the kernel's default) or a whole number of microseconds from {} to {}",
        SERVICE_SLICE_US.start(),
        SERVICE_SLICE_US.end()
    );
    match v.trim().parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(us) if SERVICE_SLICE_US.contains(&us) => Ok(Some(Duration::from_micros(us))),
        _ => Err(Error::config(NAME, &v, &why)),
    }
}

/// Largest `GALLOCY_SETUP_TIMEOUT` and `GALLOCY_PEER_TIMEOUT`: one day.
pub const MAX_TIMEOUT_S: u64 = 86_400;

/// Finds rank and size: GALLOCY_*, then mpirun (Open MPI), PMI, Slurm. `None`: a one-process job.
fn rank_and_size() -> Result<Option<(usize, usize, &'static str)>, Error> {
    const SOURCES: [(&str, &str); 4] = [
        ("GALLOCY_RANK", "GALLOCY_SIZE"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
    ];
    for (rank_var, size_var) in SOURCES {
        let (r, s) = (var(rank_var)?, var(size_var)?);
        match (r, s) {
            (None, None) => continue,
            (Some(_), None) => return Err(Error::config(size_var, "", &format!("must be set when {rank_var} is"))),
            (None, Some(_)) => return Err(Error::config(rank_var, "", &format!("must be set when {size_var} is"))),
            (Some(r), Some(s)) => {
                let rank: usize = r.trim().parse().map_err(|_| Error::config(rank_var, &r, "is not a whole number"))?;
                let size: usize = s.trim().parse().map_err(|_| Error::config(size_var, &s, "is not a whole number"))?;
                if size == 0 || size > MAX_PROCESSES {
                    return Err(Error::config(size_var, &s, &format!("must be between 1 and {MAX_PROCESSES}")));
                }
                if rank >= size {
                    return Err(Error::config(rank_var, &r, &format!("must be below {size_var}={size}")));
                }
                return Ok(Some((rank, size, rank_var)));
            }
        }
    }
    Ok(None)
}

/// A token for jobs started without GALLOCY_TOKEN (e.g. by `mpirun`): derived from what every
/// process of the job shares. It keeps other jobs out but is not a secret.
/// Whether `host:port` names this host's loopback (`127.0.0.0/8`, `::1`, `localhost`): then every
/// rank is on this host, and a token derived from the job's identity keeps other jobs out.
fn is_loopback(coordinator: &str) -> bool {
    let host = coordinator.rsplit_once(':').map_or(coordinator, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn derived_token(coordinator: &str) -> Vec<u8> {
    let mut t = format!("gallocy-derived|uid={}|coord={coordinator}", {
        // SAFETY: getuid has no preconditions.
        unsafe { libc::getuid() }
    });
    for v in ["PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "SLURM_JOB_ID", "SLURM_STEP_ID"] {
        if let Ok(x) = std::env::var(v) {
            t.push_str(&format!("|{v}={x}"));
        }
    }
    t.into_bytes()
}

/// The identity of a one-process job.
pub fn single_identity() -> Identity {
    one_process(0, 1, None)
}

/// Rank `rank` of `size` of a job without a coordinator (one process).
fn one_process(rank: usize, size: usize, bind: Option<IpAddr>) -> Identity {
    Identity { rank, size, coordinator: None, coordinator_held: false, token: Vec::new(), token_derived: false, bind }
}

/// A 0/1 variable: unset, empty or `0` is false.
fn flag(name: &str) -> Result<bool, Error> {
    flag_or(name, false)
}

/// `name` as 0 or 1; `default` when unset or empty.
fn flag_or(name: &str, default: bool) -> Result<bool, Error> {
    match var(name)?.as_deref().map(str::trim) {
        None | Some("") => Ok(default),
        Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(Error::config(name, other, "must be 0 or 1")),
    }
}

/// Reads this process's identity in the job.
pub fn identity() -> Result<Identity, Error> {
    // Only parsed here: the default depends on the route to the coordinator, which is looked up
    // when the process joins (this runs in the shim's ELF constructor, which talks to nobody).
    let bind = match var("GALLOCY_BIND")? {
        None => None,
        Some(v) => Some(v.trim().parse().map_err(|_| Error::config("GALLOCY_BIND", &v, "is not an IP address"))?),
    };
    let Some((rank, size, _)) = rank_and_size()? else {
        return Ok(one_process(0, 1, bind));
    };
    if size == 1 {
        return Ok(one_process(rank, size, bind));
    }
    let coordinator = var("GALLOCY_COORDINATOR")?.ok_or_else(|| {
        Error::config("GALLOCY_COORDINATOR", "", "must be set (host:port of rank 0) for a job of more than one process")
    })?;
    // The rule every rank applies to rank 0's roster, whose first entry is this text.
    if !gallocy_transport::tcp::is_host_port(&coordinator) {
        return Err(Error::config(
            "GALLOCY_COORDINATOR",
            &coordinator,
            "must look like host:port, with a port from 1 to 65535",
        ));
    }
    let coordinator_held = flag("GALLOCY_COORDINATOR_HELD")?;
    let (token, token_derived) = match var("GALLOCY_TOKEN")? {
        Some(t) if t.is_empty() => return Err(Error::config("GALLOCY_TOKEN", "", "must not be empty")),
        Some(t) => (t.into_bytes(), false),
        None if is_loopback(&coordinator) => (derived_token(&coordinator), true),
        None => {
            return Err(Error::config(
                "GALLOCY_TOKEN",
                "",
                &format!(
                    "must be set: the coordinator {coordinator} is not a loopback address, so the job may span \
                     hosts, and a job that spans hosts needs a secret every rank shares (for example \
                     `export GALLOCY_TOKEN=$(openssl rand -hex 16)`, passed on with `mpirun -x GALLOCY_TOKEN`; \
                     srun passes the environment on)"
                ),
            ))
        }
    };
    Ok(Identity { rank, size, coordinator: Some(coordinator), coordinator_held, token, token_derived, bind })
}

/// Reads the settings every rank must agree on (and some local tuning).
pub fn settings() -> Result<Settings, Error> {
    let heap_base = match var("GALLOCY_HEAP_BASE")? {
        None => DEFAULT_HEAP_BASE,
        Some(v) => parse_size(&v).ok_or_else(|| Error::config("GALLOCY_HEAP_BASE", &v, "is not an address"))?,
    };
    let heap_size = match var("GALLOCY_HEAP_SIZE")? {
        None => DEFAULT_HEAP_SIZE,
        Some(v) => parse_size(&v)
            .ok_or_else(|| Error::config("GALLOCY_HEAP_SIZE", &v, "is not a size (e.g. 4G, 512M, 0x40000000)"))?,
    };
    let page = crate::heap::region::page_size();
    if heap_base == 0 || heap_base % (64 << 10) != 0 {
        return Err(Error::config(
            "GALLOCY_HEAP_BASE",
            &format!("{heap_base:#x}"),
            "must be a non-zero multiple of 64 KiB",
        ));
    }
    if heap_size < (16 << 20) || heap_size % (64 << 10) != 0 {
        return Err(Error::config(
            "GALLOCY_HEAP_SIZE",
            &heap_size.to_string(),
            "must be at least 16M and a multiple of 64K",
        ));
    }
    if heap_base.checked_add(heap_size).is_none_or(|end| end > USER_SPACE_END) {
        // Blame the variable the user set (the base, when the size is the default or the base
        // alone is already beyond user space).
        let size_set = var("GALLOCY_HEAP_SIZE")?.is_some();
        if !size_set || heap_base >= USER_SPACE_END {
            return Err(Error::config(
                "GALLOCY_HEAP_BASE",
                &format!("{heap_base:#x}"),
                &format!("puts the end of a heap of {heap_size:#x} bytes beyond user space ({USER_SPACE_END:#x})"),
            ));
        }
        return Err(Error::config(
            "GALLOCY_HEAP_SIZE",
            &heap_size.to_string(),
            &format!("puts the heap end beyond user space ({USER_SPACE_END:#x}) from GALLOCY_HEAP_BASE={heap_base:#x}"),
        ));
    }
    debug_assert!(page <= 64 << 10);
    let transport = match var("GALLOCY_TRANSPORT")?.as_deref().map(str::trim) {
        Some("tcp") => TransportKind::Tcp,
        // Without the RDMA transport built in, auto can only mean TCP.
        None | Some("auto") | Some("") if cfg!(feature = "rdma") => TransportKind::Auto,
        None | Some("auto") | Some("") => TransportKind::Tcp,
        Some("rdma") if cfg!(feature = "rdma") => TransportKind::Rdma,
        Some("rdma") => {
            return Err(Error::config(
                "GALLOCY_TRANSPORT",
                "rdma",
                "this build has no RDMA transport (rebuild with the cargo feature `rdma`)",
            ))
        }
        Some(other) => return Err(Error::config("GALLOCY_TRANSPORT", other, "must be tcp, rdma or auto")),
    };
    let rdma =
        RdmaSettings {
            device: var("GALLOCY_RDMA_DEVICE")?.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()),
            port: match var("GALLOCY_RDMA_PORT")? {
                None => None,
                Some(v) => {
                    Some(
                        v.trim().parse::<u8>().ok().filter(|p| *p >= 1).ok_or_else(|| {
                            Error::config("GALLOCY_RDMA_PORT", &v, "must be a port number from 1 to 255")
                        })?,
                    )
                }
            },
            gid_index: match var("GALLOCY_RDMA_GID_INDEX")? {
                None => None,
                Some(v) => Some(v.trim().parse::<u32>().map_err(|_| {
                    Error::config("GALLOCY_RDMA_GID_INDEX", &v, "must be a GID table index (0, 1, ...)")
                })?),
            },
            busy_peers: match var("GALLOCY_RDMA_BUSY_PEERS")? {
                None => None,
                Some(v) => Some(v.trim().parse::<usize>().ok().filter(|n| *n <= MAX_BUSY_PEERS).ok_or_else(|| {
                    Error::config(
                        "GALLOCY_RDMA_BUSY_PEERS",
                        &v,
                        &format!("must be a number of peers from 0 to {MAX_BUSY_PEERS}"),
                    )
                })?),
            },
            on_demand: match var("GALLOCY_RDMA_ODP")?.as_deref().map(str::trim) {
                None | Some("") | Some("auto") => None,
                Some("on") => Some(true),
                Some("off") => Some(false),
                Some(other) => return Err(Error::config("GALLOCY_RDMA_ODP", other, "must be auto, on or off")),
            },
        };
    let consistency = match var("GALLOCY_CONSISTENCY")? {
        None => Consistency::Sequential,
        Some(v) => Consistency::parse(v.trim())
            .ok_or_else(|| Error::config("GALLOCY_CONSISTENCY", &v, "must be sequential or release"))?,
    };
    let placement = match var("GALLOCY_PLACEMENT")? {
        None => Policy::Block,
        Some(v) => Policy::parse(v.trim())
            .ok_or_else(|| Error::config("GALLOCY_PLACEMENT", &v, &format!("must be {}", Policy::NAMES)))?,
    };
    let stats = flag("GALLOCY_STATS")?;
    Ok(Settings {
        heap_base,
        heap_size,
        spin: Duration::from_micros(parse_number(
            "GALLOCY_SPIN_US",
            DEFAULT_SPIN_US,
            0,
            MAX_SPIN_HOLD_US,
            "microseconds",
        )?),
        hold: Duration::from_micros(parse_number("GALLOCY_HOLD_US", 0, 0, MAX_SPIN_HOLD_US, "microseconds")?),
        stats,
        transport,
        rdma,
        setup_timeout: Duration::from_secs(parse_number("GALLOCY_SETUP_TIMEOUT", 30, 1, MAX_TIMEOUT_S, "seconds")?),
        peer_timeout: Duration::from_secs(parse_number("GALLOCY_PEER_TIMEOUT", 10, 1, MAX_TIMEOUT_S, "seconds")?),
        placement,
        consistency,
        prefetch: parse_number("GALLOCY_PREFETCH", MAX_BATCH as u64, 1, MAX_BATCH as u64, "pages")? as u32,
        service_slice: service_slice()?,
        service_nice: service_nice()?,
        heap_mappings: heap_mappings()?,
        same_host_reads: flag_or("GALLOCY_SAME_HOST_READS", true)?,
    })
}

#[cfg(test)]
mod tests {
    use super::{is_loopback, parse_size};

    #[test]
    fn loopback_coordinators() {
        for c in ["127.0.0.1:5000", "127.3.4.5:1", "[::1]:80", "localhost:9", "LOCALHOST:9"] {
            assert!(is_loopback(c), "{c}");
        }
        for c in ["10.0.0.1:5000", "node7:5000", "[fe80::1]:80", "0.0.0.0:1"] {
            assert!(!is_loopback(c), "{c}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("16M"), Some(16 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("0x2000_0000_0000"), Some(0x2000_0000_0000));
        assert_eq!(parse_size("banana"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999T"), None);
    }
}
