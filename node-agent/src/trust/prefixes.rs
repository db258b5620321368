//! A set of prefixes with the lookups ownership checks make: the prefixes
//! that contain an address, and the prefixes that overlap a prefix.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Prefixes (stored truncated) with a value each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Prefixes<V> {
    map: BTreeMap<IpNet, V>,
    /// Prefix lengths present, per family (`false`: IPv4).
    lens: BTreeSet<(bool, u8)>,
}

impl<V> Default for Prefixes<V> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
            lens: BTreeSet::new(),
        }
    }
}

fn family(ip: IpAddr) -> bool {
    ip.is_ipv6()
}

fn with_len(ip: IpAddr, len: u8) -> Option<IpNet> {
    IpNet::new(ip, len).ok().map(|n| n.trunc())
}

impl<V> Prefixes<V> {
    pub(super) fn insert(&mut self, prefix: IpNet, value: V) {
        let prefix = prefix.trunc();
        self.lens
            .insert((family(prefix.addr()), prefix.prefix_len()));
        self.map.insert(prefix, value);
    }

    /// The value of `prefix`, inserted as the default if absent.
    pub(super) fn get_or_default(&mut self, prefix: IpNet) -> &mut V
    where
        V: Default,
    {
        let prefix = prefix.trunc();
        self.lens
            .insert((family(prefix.addr()), prefix.prefix_len()));
        self.map.entry(prefix).or_default()
    }

    /// Every prefix that contains `ip`.
    pub(super) fn containing(&self, ip: IpAddr) -> impl Iterator<Item = (&IpNet, &V)> + '_ {
        let v6 = family(ip);
        self.lens
            .iter()
            .filter(move |(f, _)| *f == v6)
            .filter_map(move |(_, len)| self.map.get_key_value(&with_len(ip, *len)?))
    }

    /// Whether some prefix contains `ip`.
    pub(super) fn contains(&self, ip: IpAddr) -> bool {
        self.containing(ip).next().is_some()
    }

    /// Every prefix that overlaps `prefix` (contains it, or lies inside it).
    pub(super) fn overlapping(&self, prefix: IpNet) -> impl Iterator<Item = (&IpNet, &V)> + '_ {
        let prefix = prefix.trunc();
        let supernets = self
            .containing(prefix.addr())
            .filter(move |(p, _)| p.prefix_len() <= prefix.prefix_len());
        let (first, last) = match prefix {
            IpNet::V4(p) => (
                IpNet::V4(Ipv4Net::new(p.network(), 0).unwrap_or_default()),
                IpNet::V4(Ipv4Net::new(p.broadcast(), 32).unwrap_or_default()),
            ),
            IpNet::V6(p) => (
                IpNet::V6(Ipv6Net::new(p.network(), 0).unwrap_or_default()),
                IpNet::V6(Ipv6Net::new(p.broadcast(), 128).unwrap_or_default()),
            ),
        };
        let subnets = self
            .map
            .range(first..=last)
            .filter(move |(q, _)| q.prefix_len() > prefix.prefix_len() && prefix.contains(*q));
        supernets.chain(subnets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn containing_and_overlapping() {
        let mut p = Prefixes::default();
        for (s, v) in [
            ("10.1.0.0/16", 1),
            ("10.1.2.0/24", 2),
            ("10.2.0.0/16", 3),
            ("fd00::/64", 4),
        ] {
            p.insert(net(s), v);
        }
        let within: Vec<i32> = p
            .containing("10.1.2.3".parse().unwrap())
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(within, [1, 2]);
        assert!(!p.contains("10.3.0.1".parse().unwrap()));
        assert!(p.contains("fd00::9".parse().unwrap()));
        let mut over: Vec<i32> = p.overlapping(net("10.0.0.0/8")).map(|(_, v)| *v).collect();
        over.sort_unstable();
        assert_eq!(over, [1, 2, 3]);
        let over: Vec<i32> = p
            .overlapping(net("10.1.2.128/25"))
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(over, [1, 2]);
        assert_eq!(p.overlapping(net("10.3.0.0/16")).count(), 0);
        assert_eq!(p.overlapping(net("0.0.0.0/0")).count(), 3, "IPv4 only");
        assert_eq!(p.overlapping(net("::/0")).count(), 1);
    }
}
