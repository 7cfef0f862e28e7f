//! IP address management: [`Allocations`] (pure: which address belongs to which
//! attachment, and how the next one is chosen) and [`store`] (the same, on disk under the
//! network's lock).
//!
//! Every attachment `(containerID, ifname)` owns at most one address per configured family.
//! The next address is the first free one after the last one handed out in that CIDR
//! (wrapping), so a released address is reused as late as possible. IPv4 CIDRs up to /30
//! never hand out their network and broadcast addresses, IPv6 CIDRs up to /126 never
//! hand out the subnet-router anycast address (the network address).

pub mod store;

use crate::spec::PodCidrs;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

/// IPAM failures.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// No free address is left in a pod CIDR.
    #[error("no free address left in {0}")]
    Exhausted(IpNetwork),
    /// The state file could not be read or written.
    #[error(transparent)]
    Store(#[from] crate::statedir::StateDirError),
    /// The state file is not what weir-cni writes.
    #[error("{path}: not a weir-cni IPAM database: {msg}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The decoding error.
        msg: String,
    },
}

/// The attachment an address belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Owner {
    /// `CNI_CONTAINERID`.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

impl Owner {
    /// The owner of `(container_id, ifname)`.
    pub fn new(container_id: &str, ifname: &str) -> Owner {
        Owner {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
        }
    }
}

/// Every allocated address of one network, and where each CIDR's search continues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocations {
    owners: BTreeMap<IpAddr, Owner>,
    last: BTreeMap<IpNetwork, IpAddr>,
}

/// The first and last address a CIDR hands out, as integers.
fn usable_range(net: IpNetwork) -> (u128, u128) {
    let (bits, base) = match net {
        IpNetwork::V4(n) => (32u32, u128::from(u32::from(n.network()))),
        IpNetwork::V6(n) => (128u32, u128::from(n.network())),
    };
    let host_bits = bits - u32::from(net.prefix());
    let hostmask = if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    let last = base | hostmask;
    match net {
        IpNetwork::V4(_) if host_bits >= 2 => (base + 1, last - 1),
        IpNetwork::V6(_) if host_bits >= 2 => (base + 1, last),
        _ => (base, last),
    }
}

fn to_int(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_int(net: IpNetwork, n: u128) -> IpAddr {
    match net {
        // The value came from the IPv4 range, so it fits.
        IpNetwork::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or_default())),
        IpNetwork::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// How many addresses `net` hands out.
pub fn usable_count(net: IpNetwork) -> u128 {
    let (first, last) = usable_range(net);
    (last - first).saturating_add(1)
}

impl Allocations {
    /// The addresses `owner` holds, sorted (IPv4 first).
    pub fn owned_by(&self, owner: &Owner) -> Vec<IpAddr> {
        self.owners
            .iter()
            .filter(|(_, o)| *o == owner)
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// Every allocation.
    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &Owner)> {
        self.owners.iter()
    }

    /// How many addresses are allocated.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    /// Whether nothing is allocated.
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// How many addresses of `net` are allocated.
    pub fn used_in(&self, net: IpNetwork) -> usize {
        self.owners.keys().filter(|ip| net.contains(**ip)).count()
    }

    /// Gives `owner` one address in each CIDR, keeping the ones it already holds there.
    /// All or nothing: when one CIDR is exhausted nothing changes.
    pub fn allocate(&mut self, owner: &Owner, cidrs: &PodCidrs) -> Result<Vec<IpAddr>, IpamError> {
        let before = self.clone();
        let mut out = Vec::new();
        for net in cidrs.iter() {
            let held = self
                .owners
                .iter()
                .find(|(ip, o)| *o == owner && net.contains(**ip))
                .map(|(ip, _)| *ip);
            let ip = match held {
                Some(ip) => ip,
                None => match self.next_free(net) {
                    Some(ip) => {
                        self.owners.insert(ip, owner.clone());
                        self.last.insert(net, ip);
                        ip
                    }
                    None => {
                        *self = before;
                        return Err(IpamError::Exhausted(net));
                    }
                },
            };
            out.push(ip);
        }
        Ok(out)
    }

    fn next_free(&self, net: IpNetwork) -> Option<IpAddr> {
        let (first, last) = usable_range(net);
        let start = match self.last.get(&net).map(|ip| to_int(*ip)) {
            Some(l) if l >= first && l < last => l + 1,
            _ => first,
        };
        // Among used + 1 consecutive candidates at least one is free, unless the CIDR is full.
        let tries = (self.used_in(net) as u128 + 1).min(last - first + 1);
        let mut n = start;
        for _ in 0..tries {
            let ip = from_int(net, n);
            if !self.owners.contains_key(&ip) {
                return Some(ip);
            }
            n = if n == last { first } else { n + 1 };
        }
        None
    }

    /// Releases everything `owner` holds; returns the released addresses.
    pub fn release(&mut self, owner: &Owner) -> Vec<IpAddr> {
        let ips = self.owned_by(owner);
        for ip in &ips {
            self.owners.remove(ip);
        }
        ips
    }

    /// Releases every allocation whose owner `keep` rejects; returns what was released.
    pub fn retain(&mut self, keep: impl Fn(&Owner) -> bool) -> Vec<(IpAddr, Owner)> {
        let gone: Vec<(IpAddr, Owner)> = self
            .owners
            .iter()
            .filter(|(_, o)| !keep(o))
            .map(|(ip, o)| (*ip, o.clone()))
            .collect();
        for (ip, _) in &gone {
            self.owners.remove(ip);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    fn cidrs(v4: &str, v6: &str) -> PodCidrs {
        PodCidrs {
            v4: Some(v4.parse().unwrap()),
            v6: Some(v6.parse().unwrap()),
        }
    }

    fn owner(i: usize) -> Owner {
        Owner::new(&format!("c{i}"), "eth0")
    }

    #[test]
    fn the_network_broadcast_and_anycast_addresses_are_never_handed_out() {
        let pools = cidrs("10.244.1.0/30", "fd00::/126");
        let mut a = Allocations::default();
        let one = a.allocate(&owner(1), &pools).unwrap();
        let two = a.allocate(&owner(2), &pools).unwrap();
        assert_eq!(
            one,
            [
                "10.244.1.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(
            two,
            [
                "10.244.1.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
        assert!(
            matches!(a.allocate(&owner(3), &pools), Err(IpamError::Exhausted(n)) if n.to_string() == "10.244.1.0/30")
        );
        assert_eq!(usable_count("10.0.0.0/24".parse().unwrap()), 254);
        assert_eq!(usable_count("10.0.0.0/31".parse().unwrap()), 2);
        assert_eq!(usable_count("10.0.0.7/32".parse().unwrap()), 1);
        assert_eq!(
            usable_count("fd00::/64".parse().unwrap()),
            (1u128 << 64) - 1
        );
        assert_eq!(usable_count("::/0".parse().unwrap()), u128::MAX);
    }

    #[test]
    fn exhaustion_in_one_family_changes_nothing() {
        let pools = cidrs("10.244.1.0/24", "fd00::/127");
        let mut a = Allocations::default();
        a.allocate(&owner(1), &pools).unwrap();
        a.allocate(&owner(2), &pools).unwrap();
        let before = a.clone();
        assert!(a.allocate(&owner(3), &pools).is_err());
        assert_eq!(a, before);
    }

    #[test]
    fn a_released_address_is_reused_last() {
        let pools = PodCidrs {
            v4: Some("10.0.0.0/29".parse().unwrap()),
            v6: None,
        };
        let mut a = Allocations::default();
        let first = a.allocate(&owner(1), &pools).unwrap();
        a.release(&owner(1));
        let mut seen = Vec::new();
        for i in 2..8 {
            seen.extend(a.allocate(&owner(i), &pools).unwrap());
        }
        assert_eq!(seen.last(), first.first(), "{seen:?}");
        assert!(a.allocate(&owner(9), &pools).is_err());
    }

    #[test]
    fn allocating_again_for_the_same_attachment_returns_its_addresses() {
        let pools = cidrs("10.244.1.0/24", "fd00::/64");
        let mut a = Allocations::default();
        let one = a.allocate(&owner(1), &pools).unwrap();
        assert_eq!(a.allocate(&owner(1), &pools).unwrap(), one);
        assert_eq!(a.len(), 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(usize),
        Del(usize),
        Gc(Vec<bool>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..24usize).prop_map(Op::Add),
            3 => (0..24usize).prop_map(Op::Del),
            1 => proptest::collection::vec(any::<bool>(), 24).prop_map(Op::Gc),
        ]
    }

    proptest! {
        /// Whatever the sequence of ADD, DEL and GC: no address has two owners, every owner
        /// holds exactly one usable address per family or none, and an ADD fails only
        /// when a family has no free address.
        #[test]
        fn an_address_is_never_handed_out_twice(ops in proptest::collection::vec(op(), 1..200)) {
            let pools = cidrs("10.9.0.0/28", "fd00:9::/125");
            let nets: Vec<IpNetwork> = pools.iter().collect();
            let mut a = Allocations::default();
            let mut model: HashMap<usize, Vec<IpAddr>> = HashMap::new();
            for op in ops {
                match op {
                    Op::Add(i) => {
                        let full = nets.iter().any(|n| {
                            model.get(&i).is_none_or(|ips| !ips.iter().any(|ip| n.contains(*ip)))
                                && a.used_in(*n) as u128 == usable_count(*n)
                        });
                        match a.allocate(&owner(i), &pools) {
                            Ok(ips) => {
                                prop_assert!(!full);
                                if let Some(old) = model.get(&i) {
                                    prop_assert_eq!(old, &ips);
                                }
                                model.insert(i, ips);
                            }
                            Err(_) => prop_assert!(full),
                        }
                    }
                    Op::Del(i) => {
                        let released = a.release(&owner(i));
                        prop_assert_eq!(released, model.remove(&i).unwrap_or_default());
                    }
                    Op::Gc(keep) => {
                        a.retain(|o| keep[o.container_id[1..].parse::<usize>().unwrap()]);
                        model.retain(|i, _| keep[*i]);
                    }
                }
                let mut seen = BTreeSet::new();
                for (i, ips) in &model {
                    prop_assert_eq!(a.owned_by(&owner(*i)), ips.clone());
                    prop_assert_eq!(ips.len(), nets.len());
                    for (ip, net) in ips.iter().zip(&nets) {
                        prop_assert!(net.contains(*ip));
                        prop_assert!(*ip != net.network());
                        if let IpNetwork::V4(n) = net {
                            prop_assert!(*ip != IpAddr::V4(n.broadcast()));
                        }
                        prop_assert!(seen.insert(*ip), "{} handed out twice", ip);
                    }
                }
                prop_assert_eq!(seen.len(), a.len());
            }
        }
    }
}
