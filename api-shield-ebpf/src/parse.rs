//! Frame parsing shared by every hook: bounds-checked, loop-bounded, never panics.
//!
//! Parsing is split in two so the list lookup can come before anything protocol-specific:
//! [`parse_l3`] reads only up to the fixed IP header (enough for the source address);
//! [`parse_l4_v4`] and [`parse_l4_v6`] then read the transport header (walking IPv6's
//! extension headers), which must lie inside the datagram the IP length fields give.

use core::mem;

use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

/// Start and end of the frame's bytes, as the hook gives them.
#[derive(Clone, Copy)]
pub struct Frame {
    /// The bytes the program can read directly: [start, end).
    pub start: usize,
    pub end: usize,
    /// The whole frame's length on the wire. Under XDP, end - start; under TC, the skb's
    /// length, of which only the (pulled) linear part lies in [start, end).
    pub wire_len: usize,
    /// The interface the frame arrived on (for drop events).
    pub ifindex: u32,
}

impl Frame {
    #[inline(always)]
    pub(crate) fn len(&self) -> usize {
        self.wire_len
    }

    /// A pointer to a `T` at `offset`, only if all of it lies inside the frame.
    #[inline(always)]
    pub(crate) fn ptr_at<T>(&self, offset: usize) -> Option<*const T> {
        let at = self.start + offset;
        if at + mem::size_of::<T>() > self.end {
            return None;
        }
        Some(at as *const T)
    }

    /// As [`Frame::ptr_at`], and only if all of it lies before `limit` (the end of the IP
    /// datagram, as an offset): bytes past it are padding, not the datagram's.
    #[inline(always)]
    pub(crate) fn ptr_within<T>(&self, offset: usize, limit: usize) -> Option<*const T> {
        // The frame's bound first: the verifier must see it on the pointer it returns.
        let at = self.ptr_at::<T>(offset)?;
        if offset + mem::size_of::<T>() > limit {
            return None;
        }
        Some(at)
    }
}

/// At most this many VLAN tags (802.1Q, 802.1ad) are skipped; more is malformed.
const MAX_VLAN_TAGS: usize = 2;
/// At most this many IPv6 extension headers are skipped; more is malformed.
const MAX_IPV6_EXT_HEADERS: usize = 8;

/// Hop-by-hop, routing and destination options give their length in 8-octet units not
/// counting the first (RFC 8200); a mutation test's build forgets that first unit.
#[cfg(not(feature = "mutant-ext-len"))]
const OPTIONS_LEN_BIAS: usize = 1;
#[cfg(feature = "mutant-ext-len")]
const OPTIONS_LEN_BIAS: usize = 0;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// IPv4 header fields that parsing needs further on.
#[derive(Clone, Copy)]
pub(crate) struct Ipv4Info {
    pub(crate) l4_offset: usize,
    /// Where the datagram ends (its total length), as an offset in the frame.
    pub(crate) end: usize,
    pub(crate) protocol: u8,
    pub(crate) non_first_fragment: bool,
}

/// What the fixed part of the frame says.
pub(crate) enum L3 {
    /// IPv4; `src` is the source address in network order, `offset` where the IPv4
    /// header starts.
    V4 {
        src: [u8; 4],
        info: Ipv4Info,
        offset: usize,
    },
    /// IPv6; `offset` is where the IPv6 header starts.
    V6 { src: [u8; 16], offset: usize },
    /// Not IP (ARP, LLDP, ...).
    NonIp,
    /// Truncated or invalid up to and including the fixed IP header.
    Malformed,
}

/// The transport layer as far as the verdict needs it.
#[derive(Clone, Copy)]
pub(crate) struct L4 {
    pub(crate) protocol: u8,
    /// A fragment other than the first: it carries no transport header.
    pub(crate) non_first_fragment: bool,
    /// Destination port in host order (TCP/UDP), else 0.
    pub(crate) dst_port: u16,
    /// Source port in host order (TCP/UDP), else 0: read only by a trace.
    pub(crate) src_port: u16,
    /// TCP with SYN set and ACK clear: a connection attempt.
    pub(crate) tcp_syn: bool,
    /// False: the transport header (or the IPv6 chain before it) is truncated or invalid.
    pub(crate) complete: bool,
}

impl L4 {
    /// Every field is defined, even for a frame we could not read: an `Option<L4>` left
    /// its bytes undefined on `None`, and LLVM filled them from a packet-pointer register,
    /// which the verifier refuses to do arithmetic on.
    pub(crate) const INCOMPLETE: L4 = L4 {
        protocol: 0,
        non_first_fragment: false,
        dst_port: 0,
        src_port: 0,
        tcp_syn: false,
        complete: false,
    };
}

/// Skips Ethernet and up to two VLAN tags, then checks the fixed IP header.
#[inline(always)]
pub(crate) fn parse_l3(frame: &Frame) -> L3 {
    let Some(eth) = frame.ptr_at::<EthHdr>(0) else {
        return L3::Malformed;
    };
    // SAFETY: ptr_at checked the header lies inside the frame.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut offset = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if !is_vlan(ether_type) {
            break;
        }
        let Some(vlan) = frame.ptr_at::<VlanHdr>(offset) else {
            return L3::Malformed;
        };
        // SAFETY: bounds checked above.
        ether_type = unsafe { (*vlan).ether_type };
        offset += VlanHdr::LEN;
    }
    if ether_type == EtherType::Ipv4 as u16 {
        parse_ipv4(frame, offset)
    } else if ether_type == EtherType::Ipv6 as u16 {
        parse_ipv6(frame, offset)
    } else if is_vlan(ether_type) {
        // A third tag: more than we skip, and a way to hide an IP packet from us.
        L3::Malformed
    } else {
        L3::NonIp
    }
}

#[inline(always)]
fn is_vlan(ether_type: u16) -> bool {
    ether_type == EtherType::Ieee8021q as u16 || ether_type == EtherType::Ieee8021ad as u16
}

#[inline(always)]
pub(crate) fn parse_ipv4(frame: &Frame, offset: usize) -> L3 {
    let Some(ip) = frame.ptr_at::<Ipv4Hdr>(offset) else {
        return L3::Malformed;
    };
    // SAFETY: bounds checked above.
    let ip = unsafe { &*ip };
    let header_len = usize::from(ip.vihl & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if ip.vihl >> 4 != 4
        || header_len < Ipv4Hdr::LEN
        || total_len < header_len
        || offset + total_len > frame.len()
    {
        return L3::Malformed;
    }
    let frags = u16::from_be_bytes(ip.frags);
    L3::V4 {
        src: ip.src_addr,
        offset,
        info: Ipv4Info {
            l4_offset: offset + header_len,
            end: offset + total_len,
            protocol: ip.proto,
            non_first_fragment: frags & 0x1fff != 0,
        },
    }
}

#[inline(always)]
fn parse_ipv6(frame: &Frame, offset: usize) -> L3 {
    let Some(ip) = frame.ptr_at::<Ipv6Hdr>(offset) else {
        return L3::Malformed;
    };
    // SAFETY: bounds checked above.
    let ip = unsafe { &*ip };
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    // payload_len 0 is a jumbogram (hop-by-hop option) or empty: not truncation.
    if ip.vcf[0] >> 4 != 6 || offset + Ipv6Hdr::LEN + payload_len > frame.len() {
        return L3::Malformed;
    }
    L3::V6 {
        src: ip.src_addr,
        offset,
    }
}

/// IPv4 transport header: absent for non-first fragments; truncated is malformed.
#[inline(always)]
pub(crate) fn parse_l4_v4(frame: &Frame, info: &Ipv4Info) -> L4 {
    let mut l4 = L4 {
        protocol: info.protocol,
        non_first_fragment: info.non_first_fragment,
        dst_port: 0,
        src_port: 0,
        tcp_syn: false,
        complete: true,
    };
    if !info.non_first_fragment {
        match transport(frame, info.protocol, info.l4_offset, info.end) {
            Some((src_port, port, syn)) => {
                l4.src_port = src_port;
                l4.dst_port = port;
                l4.tcp_syn = syn;
            }
            None => l4.complete = false,
        }
    }
    l4
}

/// Walks up to [`MAX_IPV6_EXT_HEADERS`] extension headers to the transport header.
#[inline(always)]
pub(crate) fn parse_l4_v6(frame: &Frame, ip_offset: usize) -> L4 {
    walk_l4_v6(frame, ip_offset).unwrap_or(L4::INCOMPLETE)
}

#[inline(always)]
fn walk_l4_v6(frame: &Frame, ip_offset: usize) -> Option<L4> {
    let ip = frame.ptr_at::<Ipv6Hdr>(ip_offset)?;
    // SAFETY: bounds checked by ptr_at.
    let (mut next, payload_len) = unsafe { ((*ip).next_hdr, (*ip).payload_len) };
    let mut offset = ip_offset + Ipv6Hdr::LEN;
    let end = offset + usize::from(u16::from_be_bytes(payload_len));
    let mut l4 = L4 {
        complete: true,
        ..L4::INCOMPLETE
    };
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext = frame.ptr_within::<[u8; 2]>(offset, end)?;
                // SAFETY: bounds checked by ptr_at.
                let [nh, len] = unsafe { *ext };
                next = nh;
                offset += (usize::from(len) + OPTIONS_LEN_BIAS) * 8;
                // The whole header lies inside the datagram, or it is broken.
                if offset > end {
                    return None;
                }
            }
            IPPROTO_AH => {
                let ext = frame.ptr_within::<[u8; 2]>(offset, end)?;
                // SAFETY: bounds checked by ptr_at.
                let [nh, len] = unsafe { *ext };
                next = nh;
                offset += (usize::from(len) + 2) * 4;
                if offset > end {
                    return None;
                }
            }
            IPPROTO_FRAGMENT => {
                let ext = frame.ptr_within::<[u8; 8]>(offset, end)?;
                // SAFETY: bounds checked by ptr_at.
                let ext = unsafe { *ext };
                next = ext[0];
                offset += 8;
                if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                    l4.protocol = next;
                    l4.non_first_fragment = true;
                    return Some(l4);
                }
            }
            _ => break,
        }
    }
    if is_ipv6_extension(next) {
        // Still an extension header after the last one we skip: refuse to guess.
        return None;
    }
    l4.protocol = next;
    let (src_port, port, syn) = transport(frame, next, offset, end)?;
    l4.src_port = src_port;
    l4.dst_port = port;
    l4.tcp_syn = syn;
    Some(l4)
}

#[inline(always)]
fn is_ipv6_extension(protocol: u8) -> bool {
    matches!(
        protocol,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT | IPPROTO_AH
    )
}

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;

/// Source and destination ports of TCP/UDP in host order (0 for other protocols) and
/// whether it is a TCP SYN without ACK; None if the header does not fit before `end`, the
/// datagram's.
#[inline(always)]
fn transport(frame: &Frame, protocol: u8, offset: usize, end: usize) -> Option<(u16, u16, bool)> {
    match protocol {
        IPPROTO_TCP => {
            let tcp = frame.ptr_within::<TcpHdr>(offset, end)?;
            // SAFETY: bounds checked by ptr_at; the flags byte lies inside the header.
            let (source, dest, flags) = unsafe {
                (
                    (*tcp).source,
                    (*tcp).dest,
                    *tcp.cast::<u8>().add(TCP_FLAGS_OFFSET),
                )
            };
            let syn = flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
            Some((u16::from_be_bytes(source), u16::from_be_bytes(dest), syn))
        }
        IPPROTO_UDP => {
            let udp = frame.ptr_within::<UdpHdr>(offset, end)?;
            // SAFETY: bounds checked by ptr_at.
            let (source, dest) = unsafe { ((*udp).src, (*udp).dst) };
            Some((u16::from_be_bytes(source), u16::from_be_bytes(dest), false))
        }
        _ => Some((0, 0, false)),
    }
}
