//! Folding the allowlist and blocklist into the one trie per family the data plane reads.
//!
//! The data plane does one longest-prefix lookup per packet. That gives the verdict of
//! both lists with "allowlist wins" if no block entry lies inside (or equals) an allowed
//! prefix: then whenever an address matches an allowed prefix, its longest match is an
//! allowed prefix too. Such shadowed block entries are left out (and reported).

use std::collections::{BTreeMap, HashSet};

use api_shield_common::lists::{LIST_ALLOW, LIST_BLOCK, ListVerdict};
use ipnet::IpNet;

/// What the list tries should hold: prefix -> verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListTable {
    pub entries: BTreeMap<IpNet, ListVerdict>,
}

/// The result of folding: the table and the block entries the allowlist overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Folded {
    pub table: ListTable,
    pub shadowed: Vec<IpNet>,
}

/// Folds the lists; see the module comment for why block entries inside allowed prefixes go.
pub fn fold<'a>(
    allow: impl IntoIterator<Item = &'a IpNet>,
    block: impl IntoIterator<Item = &'a IpNet>,
) -> Folded {
    let allowed: HashSet<IpNet> = allow.into_iter().map(IpNet::trunc).collect();
    let mut folded = Folded::default();
    for net in block {
        let net = net.trunc();
        if covered_by(&allowed, net) {
            folded.shadowed.push(net);
        } else {
            folded.table.entries.insert(net, LIST_BLOCK);
        }
    }
    for net in allowed {
        folded.table.entries.insert(net, LIST_ALLOW);
    }
    folded
}

/// Whether `net` equals or lies inside one of `set`: one lookup per shorter length.
fn covered_by(set: &HashSet<IpNet>, net: IpNet) -> bool {
    (0..=net.prefix_len()).any(|len| {
        IpNet::new(net.addr(), len)
            .map(|n| set.contains(&n.trunc()))
            .unwrap_or(false)
    })
}

/// Changes that take the tries from one table to another without a gap: every entry
/// that is in both tables stays present throughout, because upserts run before removals
/// and an update of an existing key replaces its value atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListDiff {
    pub upserts: Vec<(IpNet, ListVerdict)>,
    pub removals: Vec<IpNet>,
}

impl ListTable {
    pub fn diff_to(&self, next: &ListTable) -> ListDiff {
        let upserts = next
            .entries
            .iter()
            .filter(|(net, verdict)| self.entries.get(net) != Some(verdict))
            .map(|(net, verdict)| (*net, *verdict))
            .collect();
        let removals = self
            .entries
            .keys()
            .filter(|net| !next.entries.contains_key(net))
            .copied()
            .collect();
        ListDiff { upserts, removals }
    }

    /// Entries per address family: (IPv4, IPv6).
    pub fn counts(&self) -> (usize, usize) {
        let v4 = self
            .entries
            .keys()
            .filter(|n| matches!(n, IpNet::V4(_)))
            .count();
        (v4, self.entries.len() - v4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// The verdict one longest-prefix lookup gives, as the data plane does it.
    fn lookup(table: &ListTable, addr: &str) -> Option<ListVerdict> {
        let addr: std::net::IpAddr = addr.parse().unwrap();
        table
            .entries
            .iter()
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, v)| *v)
    }

    /// The verdict the lists mean: allowed if any allow entry matches, else blocked if any block entry does.
    fn meaning(allow: &[IpNet], block: &[IpNet], addr: &str) -> Option<ListVerdict> {
        let addr: std::net::IpAddr = addr.parse().unwrap();
        if allow.iter().any(|n| n.contains(&addr)) {
            Some(LIST_ALLOW)
        } else if block.iter().any(|n| n.contains(&addr)) {
            Some(LIST_BLOCK)
        } else {
            None
        }
    }

    #[test]
    fn one_lookup_gives_allowlist_wins() {
        let allow = nets(&["10.0.0.0/8", "192.0.2.128/25", "2001:db8:1::/48"]);
        let block = nets(&[
            "10.1.0.0/16",  // inside an allowed prefix: shadowed
            "10.0.0.0/8",   // equal to an allowed prefix: shadowed
            "192.0.2.0/24", // contains an allowed prefix: kept, the allow entry is longer
            "0.0.0.0/0",    // everything else
            "2001:db8::/32",
            "2001:db8:1:5::/64", // inside allowed: shadowed
        ]);
        let folded = fold(&allow, &block);
        assert_eq!(
            folded.shadowed,
            nets(&["10.1.0.0/16", "10.0.0.0/8", "2001:db8:1:5::/64"])
        );
        for addr in [
            "10.1.2.3",
            "10.255.0.1",
            "192.0.2.1",
            "192.0.2.200",
            "8.8.8.8",
            "2001:db8::1",
            "2001:db8:1:5::9",
            "2001:db8:1::1",
            "2001:db9::1",
        ] {
            assert_eq!(
                lookup(&folded.table, addr),
                meaning(&allow, &block, addr),
                "{addr}"
            );
        }
    }

    #[test]
    fn diff_upserts_before_it_removes_and_keeps_common_entries_untouched() {
        let old = fold(&nets(&[]), &nets(&["192.0.2.0/24", "198.51.100.0/24"])).table;
        let new = fold(
            &nets(&["198.51.100.0/24"]),
            &nets(&["192.0.2.0/24", "203.0.113.0/24"]),
        )
        .table;
        let diff = old.diff_to(&new);
        assert_eq!(
            diff.upserts,
            vec![
                ("198.51.100.0/24".parse().unwrap(), LIST_ALLOW),
                ("203.0.113.0/24".parse().unwrap(), LIST_BLOCK),
            ]
        );
        assert!(
            diff.removals.is_empty(),
            "198.51.100.0/24 changes verdict in place: {diff:?}"
        );
        assert!(
            !diff
                .upserts
                .iter()
                .any(|(n, _)| n.to_string() == "192.0.2.0/24")
        );
        let back = new.diff_to(&old);
        assert_eq!(back.removals, nets(&["203.0.113.0/24"]));
    }

    #[test]
    fn counts_per_family() {
        let t = fold(
            &nets(&["10.0.0.0/8"]),
            &nets(&["2001:db8::/32", "192.0.2.0/24"]),
        )
        .table;
        assert_eq!(t.counts(), (2, 1));
    }
}
