//! Finding a usable RDMA port: the verbs library, the device, the port, the GID, the memlock
//! limit. Every failure is an [`RdmaError`] whose message names what is missing.

use std::sync::Arc;

use sideway::ibverbs::address::{Gid, GidType};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, LinkLayer, Mtu, PortState};

/// What the RDMA transport needs to be told (the runtime reads these from `GALLOCY_RDMA_*`).
#[derive(Clone, Debug, Default)]
pub struct RdmaConfig {
    /// Device name (`GALLOCY_RDMA_DEVICE`); `None`: the first device with an active port.
    pub device: Option<String>,
    /// Port number (`GALLOCY_RDMA_PORT`); `None`: 1.
    pub port: Option<u8>,
    /// GID index (`GALLOCY_RDMA_GID_INDEX`); `None`: the IPv4-mapped RoCE v2 GID, else index 0.
    pub gid_index: Option<u32>,
    /// Peers that may get the full set of message buffers (`GALLOCY_RDMA_BUSY_PEERS`); `None`:
    /// [`super::BUSY_PEERS`].
    pub busy_peers: Option<usize>,
    /// Whether the heap is registered with on-demand paging (`GALLOCY_RDMA_ODP`).
    pub on_demand: OnDemand,
}

/// Whether the heap's registrations use on-demand paging (ODP): a registration that follows the
/// process's page tables instead of pinning the physical pages, so that memory given back (a
/// hole punched in the heap's memfd) is given back for real and a peer's READ sees the page
/// that is there now. Not on Soft-RoCE with an RDMA MTU below 4096 bytes, whose on-demand copy
/// is wrong for packets that start inside a page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnDemand {
    /// Where the device can serve RDMA READs of on-demand memory on reliable connections.
    #[default]
    Auto,
    /// Always: a device that cannot is refused at start-up.
    Required,
    /// Never: registrations pin the heap's pages, and no memory of the heap is given back.
    Off,
}

/// Why RDMA cannot be used here. The message says what is missing and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// libibverbs.so.1 could not be loaded.
    #[error(
        "no RDMA: libibverbs.so.1 cannot be loaded ({0}; install libibverbs1 and ibverbs-providers, or rdma-core)"
    )]
    NoLibrary(String),
    /// libibverbs loads, but lacks what the transport calls (an rdma-core too old or broken).
    #[error("no RDMA: libibverbs.so.1 loads, but {0} (install a current rdma-core: libibverbs1, ibverbs-providers)")]
    IncompleteLibrary(String),
    /// No RDMA device exists.
    #[error("no RDMA: no RDMA device found (ibv_devices lists none; for Soft-RoCE see soft-roce-setup/)")]
    NoDevice,
    /// `GALLOCY_RDMA_ODP=on`, but the device cannot serve READs of on-demand memory.
    #[error(
        "no RDMA: GALLOCY_RDMA_ODP=on, but {device} cannot serve RDMA READs of on-demand-paging memory on reliable connections (ibv_devinfo -v: rc_odp_caps lacks SUPPORT_READ); use auto or off"
    )]
    NoOnDemandPaging {
        /// The device in use.
        device: String,
    },
    /// `GALLOCY_RDMA_ODP=on` on Soft-RoCE with an RDMA MTU below the page size.
    #[error(
        "no RDMA: GALLOCY_RDMA_ODP=on, but {device} is Soft-RoCE with an RDMA MTU of {mtu} bytes: its on-demand-paging copy ignores where a packet starts inside a page (seen on Linux 6.16) and would corrupt pages; give its network device an MTU of 4200 or more (RDMA MTU 4096), or use auto or off"
    )]
    SoftRoceOnDemandMtu {
        /// The device in use.
        device: String,
        /// Its active RDMA MTU in bytes.
        mtu: u32,
    },
    /// GALLOCY_RDMA_DEVICE names a device that does not exist.
    #[error("no RDMA: no device named {wanted:?} (GALLOCY_RDMA_DEVICE); devices here: {have}")]
    NoSuchDevice {
        /// The name asked for.
        wanted: String,
        /// The devices that exist.
        have: String,
    },
    /// The port is not active.
    #[error("no RDMA: port {port} of {device} is {state} (want ACTIVE; check the link, or GALLOCY_RDMA_PORT)")]
    PortDown {
        /// Device name.
        device: String,
        /// Port number.
        port: u8,
        /// Its state.
        state: String,
    },
    /// No device has an active port.
    #[error("no RDMA: no device has an active port ({0})")]
    NoActivePort(String),
    /// The GID index asked for does not exist or holds no GID.
    #[error(
        "no RDMA: GID index {index} is not valid on {device} port {port} (GALLOCY_RDMA_GID_INDEX; valid: {valid})"
    )]
    BadGidIndex {
        /// Device name.
        device: String,
        /// Port number.
        port: u8,
        /// The index asked for.
        index: u32,
        /// The indices that hold a GID.
        valid: String,
    },
    /// The locked-memory limit is too small to register the transport's buffers or a piece of the heap.
    #[error(
        "RDMA: the locked-memory limit (RLIMIT_MEMLOCK) is {have_kib} KiB but RDMA needs at least {need_kib} KiB \
         to register memory: raise `ulimit -l` (e.g. `ulimit -l unlimited`, or memlock in /etc/security/limits.conf)"
    )]
    Memlock {
        /// The current soft limit in KiB.
        have_kib: u64,
        /// What is needed in KiB.
        need_kib: u64,
    },
    /// A verbs call failed.
    #[error("RDMA: {what}: {source}")]
    Verbs {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl RdmaError {
    pub(crate) fn verbs(what: impl Into<String>, source: impl Into<std::io::Error>) -> RdmaError {
        RdmaError::Verbs { what: what.into(), source: source.into() }
    }

    /// An `ibv_reg_mr` failure: ENOMEM/EPERM/EAGAIN almost always mean the memlock limit.
    pub(crate) fn registration(what: &str, e: std::io::Error, bytes: usize) -> RdmaError {
        match e.raw_os_error() {
            Some(libc::ENOMEM) | Some(libc::EPERM) | Some(libc::EAGAIN) if !can_lock_unlimited() => {
                RdmaError::Memlock { have_kib: memlock_limit() / 1024, need_kib: (bytes as u64).div_ceil(1024) }
            }
            _ => RdmaError::verbs(what, e),
        }
    }
}

/// The soft RLIMIT_MEMLOCK in bytes (`u64::MAX`: unlimited).
pub fn memlock_limit() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into `r`.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        return u64::MAX;
    }
    r.rlim_cur
}

/// True if this process may lock memory beyond RLIMIT_MEMLOCK (CAP_IPC_LOCK in its effective set).
pub fn can_lock_unlimited() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Fails with [`RdmaError::Memlock`] if `bytes` cannot be locked under the current limit.
pub fn check_memlock(bytes: usize) -> Result<(), RdmaError> {
    let limit = memlock_limit();
    if limit != u64::MAX && (bytes as u64) > limit && !can_lock_unlimited() {
        return Err(RdmaError::Memlock { have_kib: limit / 1024, need_kib: (bytes as u64).div_ceil(1024) });
    }
    Ok(())
}

/// An opened port, ready to create queue pairs on.
pub struct Port {
    pub(crate) ctx: Arc<DeviceContext>,
    pub(crate) device: String,
    pub(crate) port: u8,
    pub(crate) gid: Gid,
    pub(crate) gid_index: u32,
    pub(crate) lid: u16,
    pub(crate) mtu: Mtu,
    pub(crate) ethernet: bool,
    pub(crate) max_rd_atomic: u8,
    pub(crate) busy_peers: usize,
    /// The heap is registered with on-demand paging ([`OnDemand`]).
    pub(crate) on_demand: bool,
}

impl Port {
    /// Whether the heap is registered with on-demand paging ([`OnDemand`]).
    pub fn on_demand(&self) -> bool {
        self.on_demand
    }

    /// One line for the start-up message: device, port, GID index and MTU.
    pub fn describe(&self) -> String {
        let mtu = 128u32 << (self.mtu as u32);
        let heap = if self.on_demand { "heap on-demand paging" } else { "heap pinned" };
        if self.ethernet {
            format!("{} port {} GID index {} ({}) MTU {mtu}, {heap}", self.device, self.port, self.gid_index, self.gid)
        } else {
            format!("{} port {} LID {} MTU {mtu}, {heap}", self.device, self.port, self.lid)
        }
    }
}

/// Checks that libibverbs can be loaded; the error is dlerror's text (the verbs shim's own loader
/// reports only success or failure).
fn load_library() -> Result<(), String> {
    // SAFETY: dlopen/dlerror with a valid C string; the handle is closed at once (the verbs shim
    // opens the library again and keeps it).
    unsafe {
        let h = libc::dlopen(c"libibverbs.so.1".as_ptr(), libc::RTLD_LAZY);
        if h.is_null() {
            let e = libc::dlerror();
            return Err(if e.is_null() {
                "dlopen failed".into()
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            });
        }
        libc::dlclose(h);
    }
    Ok(())
}

fn state_name(s: PortState) -> String {
    match s {
        PortState::Active => "ACTIVE".into(),
        PortState::Down => "DOWN".into(),
        PortState::Initializing => "INIT".into(),
        PortState::Armed => "ARMED".into(),
        other => format!("{other:?}").to_uppercase(),
    }
}

/// Opens the configured device and port and picks the GID.
pub fn open(cfg: &RdmaConfig) -> Result<Port, RdmaError> {
    load_library().map_err(RdmaError::NoLibrary)?;
    // The verbs shim resolves libibverbs' entry points here, once, on the thread that starts the
    // transport (the patched rdma-mummy-sys has no load-time constructor: transport/vendor/).
    if !rdma_mummy_sys::load_ibverbs() {
        return Err(RdmaError::IncompleteLibrary(
            "the verbs shim could not open it and resolve its entry points".into(),
        ));
    }
    // Before any verbs object exists: on a kernel that does not copy pinned pages at fork time,
    // this makes libibverbs keep its providers' queue memory out of children (MADV_DONTFORK);
    // on one that does (Linux 5.13 and later) it does nothing. It fails only if verbs objects
    // already exist in this process (a program that uses verbs itself): gallocy's own registered
    // memory is fork-safe regardless, so that is not an error.
    // SAFETY: no arguments; libibverbs is loaded.
    let _ = unsafe { rdma_mummy_sys::ibv_fork_init() };
    let list = DeviceList::new().map_err(|e| match e.0 {
        sideway::ibverbs::device::GetDeviceListErrorKind::Ibverbs(io) if io.raw_os_error() == Some(libc::ENOSYS) => {
            RdmaError::NoDevice
        }
        sideway::ibverbs::device::GetDeviceListErrorKind::Ibverbs(io)
            if io.raw_os_error() == Some(libc::EOPNOTSUPP) =>
        {
            // The shim's answer for an entry point the library does not have.
            RdmaError::IncompleteLibrary("it has no ibv_get_device_list".into())
        }
        sideway::ibverbs::device::GetDeviceListErrorKind::Ibverbs(io) => RdmaError::verbs("ibv_get_device_list", io),
        other => RdmaError::verbs("ibv_get_device_list", std::io::Error::other(other.to_string())),
    })?;
    let names: Vec<String> = list.iter().map(|d| d.name()).collect();
    if names.is_empty() {
        return Err(RdmaError::NoDevice);
    }
    let port = cfg.port.unwrap_or(1);
    let candidates: Vec<usize> = match &cfg.device {
        Some(want) => match names.iter().position(|n| n == want) {
            Some(i) => vec![i],
            None => return Err(RdmaError::NoSuchDevice { wanted: want.clone(), have: names.join(", ") }),
        },
        None => (0..names.len()).collect(),
    };
    let mut refusals = Vec::new();
    for i in candidates {
        let dev = list.get(i).expect("index from the list");
        let ctx =
            dev.open().map_err(|e| RdmaError::verbs(format!("opening {}", names[i]), std::io::Error::other(e)))?;
        let attr = match ctx.query_port(port) {
            Ok(a) => a,
            Err(e) => {
                let err = RdmaError::PortDown { device: names[i].clone(), port, state: format!("not present ({e})") };
                if cfg.device.is_some() {
                    return Err(err);
                }
                refusals.push(err.to_string());
                continue;
            }
        };
        if attr.port_state() != PortState::Active {
            let err = RdmaError::PortDown { device: names[i].clone(), port, state: state_name(attr.port_state()) };
            if cfg.device.is_some() {
                return Err(err);
            }
            refusals.push(err.to_string());
            continue;
        }
        let ethernet = attr.link_layer() == LinkLayer::Ethernet;
        let (gid_index, gid) = pick_gid(&ctx, &names[i], port, attr.gid_tbl_len(), ethernet, cfg.gid_index)?;
        let dev_attr =
            ctx.query_device().map_err(|e| RdmaError::verbs("ibv_query_device", std::io::Error::other(e)))?;
        let max_rd_atomic = dev_attr.max_qp_rd_atom().clamp(1, 16) as u8;
        let mtu_bytes = 128u32 << (attr.active_mtu() as u32);
        // Soft-RoCE copies on-demand memory from the start of the page whatever the packet's
        // offset in it (`__rxe_odp_mr_copy`): only packets of whole pages come out right.
        let soft_roce_mtu_too_small = dev_attr.vendor_id() == SOFT_ROCE_VENDOR_ID && mtu_bytes < 4096;
        let on_demand = match cfg.on_demand {
            OnDemand::Off => false,
            OnDemand::Auto => serves_on_demand_reads(&dev_attr) && !soft_roce_mtu_too_small,
            OnDemand::Required if !serves_on_demand_reads(&dev_attr) => {
                return Err(RdmaError::NoOnDemandPaging { device: names[i].clone() })
            }
            OnDemand::Required if soft_roce_mtu_too_small => {
                return Err(RdmaError::SoftRoceOnDemandMtu { device: names[i].clone(), mtu: mtu_bytes })
            }
            OnDemand::Required => true,
        };
        return Ok(Port {
            on_demand,
            busy_peers: cfg.busy_peers.unwrap_or(super::BUSY_PEERS),
            device: names[i].clone(),
            port,
            gid,
            gid_index,
            lid: attr.lid(),
            mtu: attr.active_mtu(),
            ethernet,
            max_rd_atomic,
            ctx,
        });
    }
    Err(RdmaError::NoActivePort(refusals.join("; ")))
}

/// The vendor id Soft-RoCE (`rdma_rxe`) reports.
const SOFT_ROCE_VENDOR_ID: u32 = 0xFF_FFFF;

/// Whether the device serves RDMA READs of on-demand-paging memory on reliable connections.
fn serves_on_demand_reads(attr: &sideway::ibverbs::device_context::DeviceAttr) -> bool {
    let odp = &attr.attr.odp_caps;
    let general = u64::from(rdma_mummy_sys::ibv_odp_general_caps::IBV_ODP_SUPPORT.0);
    let read = rdma_mummy_sys::ibv_odp_transport_cap_bits::IBV_ODP_SUPPORT_READ.0;
    odp.general_caps & general != 0 && odp.per_transport_caps.rc_odp_caps & read != 0
}

/// Picks the GID: the index asked for (checked), else the IPv4-mapped RoCE v2 GID, else any RoCE v2
/// GID, else index 0.
fn pick_gid(
    ctx: &Arc<DeviceContext>,
    device: &str,
    port: u8,
    table_len: i32,
    ethernet: bool,
    wanted: Option<u32>,
) -> Result<(u32, Gid), RdmaError> {
    let mut valid = Vec::new();
    for index in 0..table_len.max(0) as u32 {
        let Ok(entry) = ctx.query_gid_ex(port, index) else { continue };
        let gid = entry.gid();
        if gid.is_zero() {
            continue;
        }
        let v2 = entry.gid_type() == GidType::RoceV2;
        let ipv4 = gid.raw[..10].iter().all(|b| *b == 0) && gid.raw[10] == 0xff && gid.raw[11] == 0xff;
        valid.push((index, gid, v2, ipv4));
    }
    if let Some(index) = wanted {
        return match valid.iter().find(|v| v.0 == index) {
            Some(v) => Ok((v.0, v.1)),
            None => Err(RdmaError::BadGidIndex {
                device: device.into(),
                port,
                index,
                valid: if valid.is_empty() {
                    "none".into()
                } else {
                    valid.iter().map(|v| v.0.to_string()).collect::<Vec<_>>().join(", ")
                },
            }),
        };
    }
    let best = if ethernet {
        valid.iter().find(|v| v.2 && v.3).or_else(|| valid.iter().find(|v| v.2)).or_else(|| valid.first())
    } else {
        valid.first()
    };
    match best {
        Some(v) => Ok((v.0, v.1)),
        None if !ethernet => Ok((0, Gid { raw: [0; 16] })),
        None => Err(RdmaError::BadGidIndex { device: device.into(), port, index: 0, valid: "none".into() }),
    }
}
