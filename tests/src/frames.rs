//! Crafted frames: Ethernet (with VLAN tags), IPv4 (with options, fragments), IPv6 (with
//! extension headers), UDP and TCP. Each builder returns the bytes of its layer and all
//! the layers it was given, so tests compose them outside-in.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_LLDP: u16 = 0x88cc;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_NONE: u8 = 59;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// Ethernet header with `vlan_tpids.len()` tags (outermost first), then `payload`.
pub fn eth(vlan_tpids: &[u16], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 4 * vlan_tpids.len() + payload.len());
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // destination
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // source
    for (i, tpid) in vlan_tpids.iter().enumerate() {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(100 + i as u16).to_be_bytes()); // TCI: VLAN id
    }
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// IPv4 fragmentation fields: more-fragments flag and offset in 8-byte units.
#[derive(Clone, Copy, Default)]
pub struct Frag {
    pub more: bool,
    pub offset: u16,
}

/// IPv4 header (with `options`, padded to 4 bytes) and `payload`, valid checksum.
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    options: &[u8],
    frag: Frag,
    payload: &[u8],
) -> Vec<u8> {
    let mut opts = options.to_vec();
    while !opts.len().is_multiple_of(4) {
        opts.push(0); // end of options list
    }
    let header_len = 20 + opts.len();
    assert!(header_len <= 60, "IPv4 options too long");
    let total = header_len + payload.len();
    let mut h = vec![0u8; header_len];
    h[0] = 0x40 | (header_len / 4) as u8;
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    let frags = (u16::from(frag.more) << 13) | (frag.offset & 0x1fff);
    h[6..8].copy_from_slice(&frags.to_be_bytes());
    h[8] = 64;
    h[9] = protocol;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h[20..].copy_from_slice(&opts);
    let sum = checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One IPv6 extension header to put in a chain.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
    /// Fragment header with this offset (8-byte units) and more-fragments flag.
    Fragment {
        offset: u16,
        more: bool,
    },
    Auth,
}

impl Ext {
    pub fn protocol(self) -> u8 {
        match self {
            Ext::HopByHop => IPPROTO_HOPOPTS,
            Ext::Routing => IPPROTO_ROUTING,
            Ext::DestOpts => IPPROTO_DSTOPTS,
            Ext::Fragment { .. } => IPPROTO_FRAGMENT,
            Ext::Auth => IPPROTO_AH,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            // 16 bytes: hdr ext len 1 (units of 8 beyond the first 8), PadN filling.
            Ext::HopByHop | Ext::DestOpts => {
                let mut b = vec![next, 1, 1, 12];
                b.resize(16, 0);
                b
            }
            // Type 0 routing header with segments left 0, 8 bytes.
            Ext::Routing => vec![next, 0, 0, 0, 0, 0, 0, 0],
            Ext::Fragment { offset, more } => {
                let field = (offset << 3) | u16::from(more);
                let f = field.to_be_bytes();
                vec![next, 0, f[0], f[1], 0, 0, 0, 7]
            }
            // AH length is in 4-byte units minus 2: 4 -> 24 bytes (12 bytes of ICV).
            Ext::Auth => {
                let mut b = vec![next, 4, 0, 0];
                b.resize(24, 0);
                b
            }
        }
    }
}

/// IPv6 header, the extension header chain, then the transport `payload` of `protocol`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, exts: &[Ext], protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, ext) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(protocol, |e| e.protocol());
        chain.extend_from_slice(&ext.bytes(next));
    }
    chain.extend_from_slice(payload);
    let first = exts.first().map_or(protocol, |e| e.protocol());
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(chain.len() as u16).to_be_bytes());
    h[6] = first;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h.extend_from_slice(&chain);
    h
}

/// UDP header (checksum 0: not checked by the data plane) and `payload_len` bytes.
pub fn udp(src_port: u16, dst_port: u16, payload_len: usize) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload_len);
    u.extend_from_slice(&src_port.to_be_bytes());
    u.extend_from_slice(&dst_port.to_be_bytes());
    u.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.resize(8 + payload_len, 0xab);
    u
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// A 20-byte TCP header with `flags`.
pub fn tcp(src_port: u16, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&src_port.to_be_bytes());
    t[2..4].copy_from_slice(&dst_port.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t
}

/// A UDP over IPv4 over Ethernet frame: the most common test frame.
pub fn udp4(src: Ipv4Addr, payload_len: usize) -> Vec<u8> {
    eth(
        &[],
        ETH_P_IP,
        &ipv4(
            src,
            Ipv4Addr::new(198, 18, 0, 1),
            IPPROTO_UDP,
            &[],
            Frag::default(),
            &udp(40000, 9000, payload_len),
        ),
    )
}

/// A UDP over IPv6 over Ethernet frame.
pub fn udp6(src: Ipv6Addr, payload_len: usize) -> Vec<u8> {
    eth(
        &[],
        ETH_P_IPV6,
        &ipv6(
            src,
            "2001:db8:ffff::1".parse().unwrap(),
            &[],
            IPPROTO_UDP,
            &udp(40000, 9000, payload_len),
        ),
    )
}

/// An IPv4 frame from `src` to 198.18.0.1 carrying `payload` of `protocol`.
pub fn ip4(src: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    eth(
        &[],
        ETH_P_IP,
        &ipv4(
            src,
            Ipv4Addr::new(198, 18, 0, 1),
            protocol,
            &[],
            Frag::default(),
            payload,
        ),
    )
}

/// An IPv6 frame from `src` to 2001:db8:ffff::1 carrying `payload` of `protocol`.
pub fn ip6(src: Ipv6Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    eth(
        &[],
        ETH_P_IPV6,
        &ipv6(
            src,
            "2001:db8:ffff::1".parse().unwrap(),
            &[],
            protocol,
            payload,
        ),
    )
}

/// An ICMP (or ICMPv6) echo request header and 8 bytes of data.
pub fn echo(icmp_type: u8) -> Vec<u8> {
    let mut e = vec![icmp_type, 0, 0, 0, 0, 1, 0, 1];
    e.extend_from_slice(&[0x5a; 8]);
    e
}

/// An ARP request: a non-IP frame.
pub fn arp() -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 198, 18, 0, 10]);
    a.extend_from_slice(&[0, 0, 0, 0, 0, 0, 198, 18, 0, 1]);
    eth(&[], ETH_P_ARP, &a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_checksum_verifies() {
        let p = ipv4(
            Ipv4Addr::new(1, 2, 3, 4),
            Ipv4Addr::new(5, 6, 7, 8),
            IPPROTO_UDP,
            &[1, 1, 1],
            Frag::default(),
            &[],
        );
        assert_eq!(p[0], 0x46);
        assert_eq!(checksum(&p[..24]), 0);
    }

    #[test]
    fn ipv6_chain_links_next_headers() {
        let p = ipv6(
            Ipv6Addr::LOCALHOST,
            Ipv6Addr::LOCALHOST,
            &[
                Ext::HopByHop,
                Ext::Fragment {
                    offset: 0,
                    more: true,
                },
            ],
            IPPROTO_UDP,
            &udp(1, 2, 0),
        );
        assert_eq!(p[6], IPPROTO_HOPOPTS);
        assert_eq!(p[40], IPPROTO_FRAGMENT);
        assert_eq!(p[56], IPPROTO_UDP);
        assert_eq!(u16::from_be_bytes([p[4], p[5]]) as usize, p.len() - 40);
    }
}
