//! The side effects of an IPVS sync: the dummy interface [`DUMMY_INTERFACE`] with the
//! Service addresses (rtnetlink), IPVS sysctls and timeouts, and the virtual/real servers (generic
//! netlink through [`KernelIpvs`]). Each sync applies only the difference ([`diff::plan`]);
//! full syncs, syncs after a failure and syncs while real servers drain read the kernel
//! back first ([`super::program`]), so drift is repaired and a restart adopts what is
//! there, while an idle sync sends nothing and reads nothing.

use super::diff;
use super::netlink::KernelIpvs;
use super::program::{Ownership, Programmer};
use super::render::{IpvsConfig, Rendered};
use super::{IpvsBackend, IpvsError, Op, Timeouts, DUMMY_INTERFACE};
use crate::model::{DesiredState, ServiceDelta};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::{AddressMessageBuilder, LinkDummy};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};
use tracing::info;

/// How long a removed real server may drain before it is deleted anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Sysctls IPVS mode needs (as kube-proxy sets them): conntrack for IPVS connections (so
/// nftables masquerades them), and dropping connections to deleted real servers.
const SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/vs/conntrack", "1"),
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
    ("net/ipv4/ip_forward", "1"),
];

/// `--ipvs-strict-arp` (kube-proxy's `strictARP`): answer ARP only for addresses on the
/// interface asked (not for Service addresses on the dummy interface), and announce only
/// an address of the outgoing interface.
const STRICT_ARP_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/conf/all/arp_ignore", "1"),
    ("net/ipv4/conf/all/arp_announce", "2"),
];

/// Node-level IPVS settings applied once at start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpvsOptions {
    /// `--ipvs-strict-arp`.
    pub strict_arp: bool,
    /// `--ipvs-tcp-timeout`, `--ipvs-tcpfin-timeout`, `--ipvs-udp-timeout`.
    pub timeouts: Timeouts,
}

/// Failures of an IPVS sync.
#[derive(Debug, thiserror::Error)]
pub enum IpvsSyncError {
    /// An IPVS operation failed.
    #[error(transparent)]
    Ipvs(#[from] IpvsError),
    /// The rtnetlink connection could not be opened.
    #[error("opening an rtnetlink socket: {0}")]
    Rtnetlink(#[source] std::io::Error),
    /// Creating or listing the dummy interface or its addresses failed.
    #[error("{op} on {DUMMY_INTERFACE}: {source}")]
    Link {
        /// What was attempted.
        op: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// A sync of changed Service ports without the state of a previous sync (a bug:
    /// such syncs are full ones).
    #[error("no previous IPVS state to apply Service port changes to")]
    Stale,
    /// A sysctl could not be written.
    #[error("setting {key}: {source}")]
    Sysctl {
        /// `/proc/sys` path below `/proc/sys/`.
        key: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The dummy interface and its addresses, through rtnetlink.
struct Link {
    handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Link {
    fn open() -> Result<Link, IpvsSyncError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(IpvsSyncError::Rtnetlink)?;
        let task = tokio::spawn(conn);
        Ok(Link { handle, task })
    }

    async fn index(&self) -> Result<Option<u32>, IpvsSyncError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(DUMMY_INTERFACE.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(Some(l.header.index)),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.code.is_some_and(|c| -c.get() == libc::ENODEV) =>
            {
                Ok(None)
            }
            Err(source) => Err(IpvsSyncError::Link {
                op: "looking up the link".into(),
                source,
            }),
        }
    }

    /// The interface's index, creating it (up) when missing.
    async fn ensure(&self) -> Result<u32, IpvsSyncError> {
        if let Some(i) = self.index().await? {
            return Ok(i);
        }
        self.handle
            .link()
            .add(LinkDummy::new(DUMMY_INTERFACE).up().build())
            .execute()
            .await
            .map_err(|source| IpvsSyncError::Link {
                op: "creating the dummy link".into(),
                source,
            })?;
        self.index().await?.ok_or_else(|| IpvsSyncError::Link {
            op: "finding the created link".into(),
            source: rtnetlink::Error::RequestFailed,
        })
    }

    /// The addresses of the interface with this index, or of every interface (`None`).
    async fn addresses(
        &self,
        index: Option<u32>,
    ) -> Result<Vec<(IpAddr, rtnetlink::packet_route::address::AddressMessage)>, IpvsSyncError>
    {
        let mut have = Vec::new();
        let mut req = self.handle.address().get();
        if let Some(i) = index {
            req = req.set_link_index_filter(i);
        }
        let mut stream = req.execute();
        while let Some(m) = stream
            .try_next()
            .await
            .map_err(|source| IpvsSyncError::Link {
                op: "listing addresses".into(),
                source,
            })?
        {
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = ip {
                have.push((ip, m));
            }
        }
        Ok(have)
    }

    /// Makes the interface hold exactly `want` (as /32 and /128 addresses).
    async fn sync_addresses(
        &self,
        index: u32,
        want: &BTreeSet<IpAddr>,
    ) -> Result<(), IpvsSyncError> {
        let have = self.addresses(Some(index)).await?;
        for (ip, m) in have {
            if !want.contains(&ip) {
                self.handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .map_err(|source| IpvsSyncError::Link {
                        op: format!("deleting address {ip}"),
                        source,
                    })?;
            }
        }
        // Re-list what is left to add only what is missing.
        let mut present = BTreeSet::new();
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(m) = stream
            .try_next()
            .await
            .map_err(|source| IpvsSyncError::Link {
                op: "listing addresses".into(),
                source,
            })?
        {
            for a in &m.attributes {
                if let AddressAttribute::Address(ip) = a {
                    present.insert(*ip);
                }
            }
        }
        for ip in want.difference(&present) {
            self.add_address(index, *ip).await?;
        }
        Ok(())
    }

    /// Removes `unbind` from the interface and adds `bind`, without listing its addresses.
    async fn change_addresses(
        &self,
        index: u32,
        unbind: impl IntoIterator<Item = IpAddr>,
        bind: impl IntoIterator<Item = IpAddr>,
    ) -> Result<(), IpvsSyncError> {
        for ip in unbind {
            let m = match ip {
                IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
                    .index(index)
                    .address(a, 32)
                    .build(),
                IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
                    .index(index)
                    .address(a, 128)
                    .build(),
            };
            self.handle
                .address()
                .del(m)
                .execute()
                .await
                .map_err(|source| IpvsSyncError::Link {
                    op: format!("deleting address {ip}"),
                    source,
                })?;
        }
        for ip in bind {
            self.add_address(index, ip).await?;
        }
        Ok(())
    }

    async fn add_address(&self, index: u32, ip: IpAddr) -> Result<(), IpvsSyncError> {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        self.handle
            .address()
            .add(index, ip, len)
            .execute()
            .await
            .map_err(|source| IpvsSyncError::Link {
                op: format!("adding address {ip}"),
                source,
            })
    }

    async fn delete(&self) -> Result<bool, IpvsSyncError> {
        let Some(index) = self.index().await? else {
            return Ok(false);
        };
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|source| IpvsSyncError::Link {
                op: "deleting the link".into(),
                source,
            })?;
        Ok(true)
    }
}

/// Writes the sysctls IPVS mode needs (and the strict ARP ones when asked).
pub fn set_sysctls(strict_arp: bool) -> Result<(), IpvsSyncError> {
    let arp = if strict_arp { STRICT_ARP_SYSCTLS } else { &[] };
    for (key, value) in SYSCTLS.iter().chain(arp) {
        std::fs::write(format!("/proc/sys/{key}"), value)
            .map_err(|source| IpvsSyncError::Sysctl { key, source })?;
    }
    Ok(())
}

pub use super::program::SyncReport;

/// IPVS programming for the sync runner (inside a tokio runtime).
pub struct IpvsSync {
    kernel: KernelIpvs,
    link: Link,
    cfg: IpvsConfig,
    program: Programmer,
    /// Every node address NodePorts were served on since start: a virtual server on one of
    /// them in the NodePort range is weir's.
    node_ips: BTreeSet<IpAddr>,
    /// The dummy interface's index, as of the last sync that succeeded.
    index: Option<u32>,
    /// The addresses on the dummy interface after the last sync that succeeded (`None`:
    /// read them from the kernel next time).
    bound: Option<BTreeSet<IpAddr>>,
    /// The desired state as of the last sync that succeeded (`None`: render it all next
    /// time).
    rendered: Option<Rendered>,
}

impl std::fmt::Debug for IpvsSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpvsSync").field("cfg", &self.cfg).finish()
    }
}

impl IpvsSync {
    /// Opens IPVS and rtnetlink, sets the sysctls and the connection timeouts.
    pub fn new(cfg: IpvsConfig, opts: IpvsOptions) -> Result<IpvsSync, IpvsSyncError> {
        let mut kernel = KernelIpvs::open()?;
        set_sysctls(opts.strict_arp)?;
        kernel.set_timeouts(&opts.timeouts)?;
        Ok(IpvsSync {
            kernel,
            link: Link::open()?,
            cfg,
            program: Programmer::new(DRAIN_TIMEOUT),
            node_ips: BTreeSet::new(),
            index: None,
            bound: None,
            rendered: None,
        })
    }

    /// Brings the dummy interface's addresses and IPVS to `state`, of which `changed` says
    /// what changed since the last call. Operations the kernel refuses are logged and
    /// counted; the rest proceed.
    ///
    /// The kernel is read back (the dummy interface, its addresses, every virtual and real
    /// server) only on a `full` sync and after a failure; while real servers drain, each
    /// sync reads only their virtual servers. Other syncs send only the changes: those of
    /// the changed Service ports when `changed` names them (nothing at all when nothing
    /// changed and nothing drains), else the difference between the whole rendered state
    /// and what the last successful sync left.
    pub async fn sync(
        &mut self,
        state: &DesiredState,
        full: bool,
        changed: Changed<'_>,
    ) -> Result<SyncReport, IpvsSyncError> {
        let read = self.program.needs_dump(full) || self.bound.is_none() || self.index.is_none();
        let r = match changed {
            Changed::Nothing if !read && !self.program.draining() => {
                return Ok(SyncReport::default())
            }
            // Nothing changed but real servers drain: look at those (and only those).
            Changed::Nothing if !read && self.rendered.is_some() => self.sync_ports(&[]).await,
            Changed::Ports(deltas) if !read && self.rendered.is_some() => {
                self.sync_ports(deltas).await
            }
            _ => self.sync_inner(state, full).await,
        };
        if !matches!(&r, Ok(report) if report.failed == 0) {
            self.index = None;
            self.bound = None;
            self.rendered = None;
            self.program.invalidate();
        }
        r
    }

    /// Whether the last sync left IPVS and the dummy interface known (the next sync can
    /// send only changes); false before the first sync and after a failure.
    pub fn trusted(&self) -> bool {
        !self.program.needs_dump(false)
            && self.bound.is_some()
            && self.index.is_some()
            && self.rendered.is_some()
    }

    /// Applies the changes of some Service ports to the rendered state, the dummy
    /// interface and IPVS, touching nothing else.
    async fn sync_ports(&mut self, deltas: &[ServiceDelta]) -> Result<SyncReport, IpvsSyncError> {
        let (Some(rendered), Some(index), Some(mut bound)) =
            (self.rendered.as_mut(), self.index, self.bound.take())
        else {
            return Err(IpvsSyncError::Stale);
        };
        let touched = rendered.update(deltas, &self.cfg);
        self.link
            .change_addresses(
                index,
                touched.unbind.iter().copied(),
                touched.bind.iter().copied(),
            )
            .await?;
        for ip in &touched.unbind {
            bound.remove(ip);
        }
        bound.extend(touched.bind.iter().copied());
        let node_ips = &self.node_ips;
        let bound_ref = &bound;
        let report = self.program.sync_touched(
            &mut self.kernel,
            &rendered.servers,
            &touched.keys,
            || Ownership {
                bound: bound_ref.clone(),
                node_ips: node_ips.clone(),
            },
            Instant::now(),
        )?;
        self.bound = Some(bound);
        log_report(&report);
        Ok(report)
    }

    async fn sync_inner(
        &mut self,
        state: &DesiredState,
        full: bool,
    ) -> Result<SyncReport, IpvsSyncError> {
        self.node_ips.extend(state.node_ips.iter().copied());
        let rendered = Rendered::new(state, &self.cfg);
        let want_bound = rendered.bound();
        let read = self.program.needs_dump(full) || self.bound.is_none() || self.index.is_none();
        let mut owned = Ownership {
            bound: BTreeSet::new(),
            node_ips: self.node_ips.clone(),
        };
        match (read, self.index, self.bound.take()) {
            (false, Some(index), Some(last)) => {
                let unbind = last.difference(&want_bound).copied();
                let bind = want_bound.difference(&last).copied();
                self.link.change_addresses(index, unbind, bind).await?;
                owned.bound = last;
            }
            _ => {
                let index = self.link.ensure().await?;
                // What weir owns is decided before the addresses change: a Service address
                // still bound marks a virtual server left by a removed Service (or a
                // previous run).
                owned.bound = self
                    .link
                    .addresses(Some(index))
                    .await?
                    .into_iter()
                    .map(|(ip, _)| ip)
                    .collect();
                self.link.sync_addresses(index, &want_bound).await?;
                self.index = Some(index);
            }
        }
        owned.bound.extend(want_bound.iter().copied());
        self.bound = Some(want_bound);
        let want = rendered.servers.clone();
        self.rendered = Some(rendered);
        let report = self
            .program
            .sync(&mut self.kernel, want, read, &owned, Instant::now())?;
        log_report(&report);
        Ok(report)
    }
}

fn log_report(report: &SyncReport) {
    if report.ops > 0 {
        info!(
            ops = report.ops,
            failed = report.failed,
            draining = report.draining,
            dumped = report.dumped,
            "synced IPVS"
        );
    }
}

pub use crate::dataplane::Changed;

/// `--cleanup`: deletes weir's virtual servers (those on an address of the dummy
/// interface, and those in the NodePort range on another local address) and the dummy
/// interface; other virtual servers stay. Returns how many virtual servers were deleted (0
/// when IPVS is not available at all).
pub async fn cleanup() -> Result<usize, IpvsSyncError> {
    let link = Link::open()?;
    let index = link.index().await?;
    let mut bound = BTreeSet::new();
    if let Some(i) = index {
        bound.extend(link.addresses(Some(i)).await?.into_iter().map(|(ip, _)| ip));
    }
    let local: BTreeSet<IpAddr> = link
        .addresses(None)
        .await?
        .into_iter()
        .map(|(ip, _)| ip)
        .filter(|ip| !bound.contains(ip))
        .collect();
    let mut n = 0;
    match KernelIpvs::open() {
        Ok(mut k) => {
            for key in k.dump()?.keys() {
                if !diff::owned(key, &bound, &local) {
                    info!(virtual_server = %key, "not weir's; left alone");
                    continue;
                }
                k.apply(&Op::DelService(*key))?;
                n += 1;
            }
        }
        Err(IpvsError::NoFamily(e)) => info!(error = %e, "no IPVS here; nothing to remove"),
        Err(e) => return Err(e.into()),
    }
    if link.delete().await? {
        info!("removed {DUMMY_INTERFACE}");
    }
    Ok(n)
}
