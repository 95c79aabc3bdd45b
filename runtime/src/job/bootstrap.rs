//! Joining a job: every rank reserves its heap, reports what it has to rank 0, and rank 0 stops
//! the whole job with one message if anything disagrees or failed.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use gallocy_transport::tcp::{self, TcpConfig};
use gallocy_transport::{MemoryView, Transport};
use serde::{Deserialize, Serialize};

use crate::error::Error;
#[cfg(feature = "rdma")]
use crate::job::config::TransportKind;
use crate::job::config::{Identity, Settings};
use crate::job::runtime::PROTOCOL_VERSION;
use gallocy_transport::local::{ViewId, VIEW_ID_LEN};

/// What each rank reports when it joins.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol: u32,
    pub heap_base: u64,
    pub heap_size: u64,
    pub page_size: u64,
    pub transport: String,
    /// `GALLOCY_CONSISTENCY` and `GALLOCY_PLACEMENT`: every rank must run the same protocol.
    pub consistency: String,
    pub placement: String,
    pub host: String,
    pub pid: u32,
    /// What went wrong on this rank before joining (bad setting, occupied heap range).
    pub problem: Option<String>,
    /// The id of this rank's heap memfd (`gallocy_transport::local`), for same-host reads.
    pub view: Option<Vec<u8>>,
}

/// The heap ids of every rank, as rank 0 saw them in the hellos (rank 0 only).
static VIEW_IDS: std::sync::Mutex<Vec<Option<ViewId>>> = std::sync::Mutex::new(Vec::new());

/// The heap ids rank 0 collected at start-up (empty elsewhere).
pub fn view_ids() -> Vec<Option<ViewId>> {
    VIEW_IDS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

impl Hello {
    pub fn new(settings: Option<&Settings>, problem: Option<String>, view: Option<ViewId>) -> Hello {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_owned();
        Hello {
            protocol: PROTOCOL_VERSION,
            heap_base: settings.map_or(0, |s| s.heap_base as u64),
            heap_size: settings.map_or(0, |s| s.heap_size as u64),
            page_size: crate::heap::region::page_size() as u64,
            transport: settings.map_or("tcp", |s| s.transport.name()).into(),
            consistency: settings.map_or("sequential", |s| s.consistency.name()).into(),
            placement: settings.map_or("block", |s| s.placement.name()).into(),
            host,
            pid: std::process::id(),
            problem,
            view: view.map(|v| v.encode().to_vec()),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a hello always encodes")
    }
}

/// Rank 0's judgement of all hellos: every problem, each naming its rank.
pub fn judge(hellos: &[Vec<u8>]) -> Result<(), String> {
    let mut decoded = Vec::with_capacity(hellos.len());
    for (rank, h) in hellos.iter().enumerate() {
        match serde_json::from_slice::<Hello>(h) {
            Ok(h) => decoded.push(h),
            Err(e) => return Err(format!("rank {rank} sent an unreadable report ({e}): a different gallocy version?")),
        }
    }
    *VIEW_IDS.lock().unwrap_or_else(|p| p.into_inner()) = decoded
        .iter()
        .map(|h| {
            let bytes: Option<[u8; VIEW_ID_LEN]> = h.view.as_deref().and_then(|v| v.try_into().ok());
            bytes.and_then(|b| ViewId::decode(&b))
        })
        .collect();
    let mut problems = Vec::new();
    for (rank, h) in decoded.iter().enumerate() {
        if let Some(p) = &h.problem {
            problems.push(format!("rank {rank} (pid {} on {}): {p}", h.pid, h.host));
        }
    }
    let zero = &decoded[0];
    for (rank, h) in decoded.iter().enumerate().skip(1) {
        if h.problem.is_some() || zero.problem.is_some() {
            continue;
        }
        let mut diff = Vec::new();
        if h.protocol != zero.protocol {
            diff.push(format!("protocol version {} vs {}", h.protocol, zero.protocol));
        }
        if h.heap_base != zero.heap_base {
            diff.push(format!("GALLOCY_HEAP_BASE {:#x} vs {:#x}", h.heap_base, zero.heap_base));
        }
        if h.heap_size != zero.heap_size {
            diff.push(format!("GALLOCY_HEAP_SIZE {} vs {}", h.heap_size, zero.heap_size));
        }
        if h.page_size != zero.page_size {
            diff.push(format!("page size {} vs {}", h.page_size, zero.page_size));
        }
        if h.transport != zero.transport {
            diff.push(format!("transport {} vs {}", h.transport, zero.transport));
        }
        if h.consistency != zero.consistency {
            diff.push(format!("GALLOCY_CONSISTENCY {} vs {}", h.consistency, zero.consistency));
        }
        if h.placement != zero.placement {
            diff.push(format!("GALLOCY_PLACEMENT {} vs {}", h.placement, zero.placement));
        }
        if !diff.is_empty() {
            problems.push(format!("rank {rank} (pid {}) disagrees with rank 0: {}", h.pid, diff.join(", ")));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Open files a process keeps for itself and the runtime besides one connection per peer.
const FILES_BESIDES_PEERS: u64 = 256;

/// How long a sender waits for a connection made on first use: half the peer timeout (at least
/// a second, at most the start-up timeout). A peer that cannot be reached in that time is lost,
/// and the waiting service thread gives up before its own neighbours would find it silent.
fn link_timeout(s: &Settings) -> Duration {
    (s.peer_timeout / 2).max(Duration::from_secs(1)).min(s.setup_timeout)
}

/// Makes room for a connection to every peer of a job of `size`: raises the soft limit on open
/// files (`ulimit -n`) as far as the job needs, up to the hard limit. The error says what is
/// missing.
pub fn room_for_connections(size: usize) -> Result<(), String> {
    let need = size as u64 + FILES_BESIDES_PEERS;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(format!("cannot read the open-file limit: {}", std::io::Error::last_os_error()));
    }
    if lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max < need {
        return Err(format!(
            "a job of {size} processes needs {need} open files per process, but the hard limit is {} (ulimit -Hn)",
            lim.rlim_max
        ));
    }
    lim.rlim_cur = need;
    // SAFETY: setrlimit reads one rlimit through a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(format!("cannot raise the open-file limit to {need}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Connects this rank to the job. `problem` is this rank's own start-up failure, reported to
/// rank 0 so that the whole job stops with it.
pub fn connect(
    id: &Identity,
    settings: Option<&Settings>,
    view: MemoryView,
    view_id: Option<ViewId>,
    problem: Option<String>,
) -> Result<Box<dyn Transport>, Error> {
    let problem = problem.or_else(|| room_for_connections(id.size).err());
    #[cfg(feature = "rdma")]
    let (port, problem) = rdma_port(settings, problem);
    let hello = Hello::new(settings, problem, view_id);
    let coordinator = id.coordinator.clone().expect("a multi-process job has a coordinator");
    let bind = if id.rank == 0 { LOOPBACK } else { listen_address(id.bind, &coordinator)? };
    let cfg = TcpConfig {
        rank: id.rank,
        size: id.size,
        coordinator,
        coordinator_held: id.coordinator_held,
        bind,
        token: id.token.clone(),
        view,
        setup_timeout: settings.map_or(Duration::from_secs(30), |s| s.setup_timeout),
        link_timeout: settings.map_or(Duration::from_secs(5), link_timeout),
        // The transport's threads are the runtime's: their allocations never come from the heap.
        thread_start: || std::mem::forget(crate::heap::alloc::RuntimeScope::enter()),
        owed: Some(crate::engine::contents_owed),
        serves: Some(crate::engine::read_owed),
    };
    let tcp = match tcp::establish(&cfg, &hello.encode(), &judge) {
        Ok(t) => t,
        Err(gallocy_transport::TransportError::JobAborted(msg)) => return Err(Error::JobStopped(msg)),
        Err(e) => return Err(e.into()),
    };
    #[cfg(feature = "rdma")]
    if let Some(port) = port {
        let required = settings.is_some_and(|s| s.transport == TransportKind::Rdma);
        return upgrade_to_rdma(id.rank, tcp, view, port, required, cfg.setup_timeout, cfg.link_timeout);
    }
    Ok(Box::new(tcp))
}

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Where a rank other than 0 listens for its peers; the roster gives them this address (rank 0
/// listens on the coordinator address).
///
/// - `GALLOCY_BIND`, when set, exactly as given (`0.0.0.0`/`::`: every interface, advertising
///   this host's address on its connection to rank 0).
/// - A loopback coordinator (127.x, `::1`, or the unspecified address, which also means this
///   host): every rank runs on this host, so 127.0.0.1, as always.
/// - Otherwise this host's address on its route to the coordinator (the source address the
///   kernel picks for it; no packet is sent). That is the address this host has on the network
///   where every rank reaches rank 0, so on a cluster network the other ranks reach it too, and
///   a job started by `mpirun`/`srun` across hosts needs nothing but the coordinator. (Where the
///   peers must use another address, e.g. behind NAT, `GALLOCY_BIND` sets it.)
///
/// Why listen on that one address rather than on the wildcard with that address advertised:
/// peers only ever connect to the advertised address, so the wildcard would add nothing but an
/// open port on every other interface of the host (a public one, a container bridge), and a
/// listener that cannot be made fails here, naming the address, instead of as a peer's
/// connection timing out. `GALLOCY_BIND=0.0.0.0` still chooses the wildcard.
fn listen_address(bind: Option<IpAddr>, coordinator: &str) -> Result<IpAddr, Error> {
    if let Some(ip) = bind {
        return Ok(ip);
    }
    let bad = |why: String| Error::config("GALLOCY_COORDINATOR", coordinator, &why);
    let to = tcp::resolve(coordinator).map_err(|e| bad(format!("is not usable on this host ({e})")))?;
    let ip = to.ip().to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        return Ok(LOOPBACK);
    }
    let here = tcp::route_source(&to).map_err(|e| match e.raw_os_error() {
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => {
            bad(format!("cannot be reached from this host: there is no route to {} ({e})", to.ip()))
        }
        _ => bad(format!(
            "cannot be reached from this host: finding this host's address on the route to {} failed ({e}); \
             set GALLOCY_BIND to the address other ranks reach this host at",
            to.ip()
        )),
    })?;
    if let IpAddr::V6(v6) = here {
        if v6.is_unicast_link_local() {
            // Peers could not use it: a link-local address means nothing without its interface.
            return Err(bad(format!(
                "leaves this host only through the link-local address {v6}, which other hosts cannot \
                 be given; use a global or unique-local address for rank 0, or set GALLOCY_BIND"
            )));
        }
    }
    Ok(here)
}

/// Opens this rank's RDMA port when the transport may be RDMA. With `--transport rdma`, having
/// none is this rank's problem: rank 0 then stops the whole job with the reason.
#[cfg(feature = "rdma")]
fn rdma_port(
    settings: Option<&Settings>,
    problem: Option<String>,
) -> (Option<Result<gallocy_transport::rdma::Port, gallocy_transport::rdma::RdmaError>>, Option<String>) {
    use gallocy_transport::rdma;
    let Some(s) = settings.filter(|s| s.transport != TransportKind::Tcp) else { return (None, problem) };
    let cfg = rdma::RdmaConfig {
        device: s.rdma.device.clone(),
        port: s.rdma.port,
        gid_index: s.rdma.gid_index,
        busy_peers: s.rdma.busy_peers,
        on_demand: match s.rdma.on_demand {
            None => rdma::OnDemand::Auto,
            Some(true) => rdma::OnDemand::Required,
            Some(false) => rdma::OnDemand::Off,
        },
    };
    let port = rdma::open(&cfg);
    let problem = match (&port, problem) {
        (_, Some(p)) => Some(p),
        (Err(e), None) if s.transport == TransportKind::Rdma => Some(format!("--transport rdma: {e}")),
        _ => None,
    };
    (Some(port), problem)
}

/// Brings the job up on RDMA if every rank can (or must), and says on rank 0 which transport runs.
#[cfg(feature = "rdma")]
fn upgrade_to_rdma(
    rank: usize,
    tcp: gallocy_transport::tcp::TcpTransport,
    view: MemoryView,
    port: Result<gallocy_transport::rdma::Port, gallocy_transport::rdma::RdmaError>,
    required: bool,
    timeout: Duration,
    link_timeout: Duration,
) -> Result<Box<dyn Transport>, Error> {
    use gallocy_transport::rdma::{self, Connected};
    match rdma::connect(tcp, view, port, required, timeout, link_timeout)? {
        Connected::Rdma(t) => {
            if rank == 0 {
                eprintln!("gallocy: transport: rdma ({})", t.describe());
            }
            Ok(t)
        }
        Connected::Tcp(t, why) => {
            if rank == 0 {
                eprintln!("gallocy: transport: tcp (auto: {why})");
            }
            Ok(Box::new(t))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(base: u64, problem: Option<&str>) -> Vec<u8> {
        Hello {
            protocol: 1,
            heap_base: base,
            heap_size: 1 << 30,
            page_size: 4096,
            transport: "tcp".into(),
            consistency: "sequential".into(),
            placement: "block".into(),
            host: "h".into(),
            pid: 7,
            problem: problem.map(str::to_owned),
            view: None,
        }
        .encode()
    }

    #[test]
    fn judge_names_the_rank_at_fault() {
        assert!(judge(&[hello(1 << 40, None), hello(1 << 40, None)]).is_ok());
        let e = judge(&[hello(1 << 40, None), hello(1 << 40, None), hello(2 << 40, None)]).unwrap_err();
        assert!(e.contains("rank 2") && e.contains("GALLOCY_HEAP_BASE"), "{e}");
        let e = judge(&[hello(1 << 40, None), hello(1 << 40, Some("heap range occupied"))]).unwrap_err();
        assert!(e.contains("rank 1") && e.contains("occupied"), "{e}");
        assert!(judge(&[hello(1 << 40, None), vec![1, 2, 3]]).unwrap_err().contains("rank 1"));
    }
}
