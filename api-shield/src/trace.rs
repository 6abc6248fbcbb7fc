//! `api-shield trace`: the filter the data plane follows while a trace runs, and its
//! records, which come through aya-log as text, parsed back into fields.

use std::{
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
};

use api_shield_common::{
    counters::Reason,
    trace::{NO_TOKENS, RECORD_KEYS, TRACE_NETS, TraceFilter, TraceNet},
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Records per second the data plane sends for all traces together (bursts of one
/// second's worth); matching packets past it are counted as missed.
pub const TRACE_RATE: u64 = 200;
/// The longest `--for` accepted.
pub const MAX_TRACE_SECS: u64 = 3600;
/// The largest `--max` accepted.
pub const MAX_TRACE_RECORDS: u64 = 100_000;
/// How long past a session's end the data plane keeps following its filter should the
/// controller not clear it (it died): then it stops by itself.
pub const KERNEL_GRACE_SECS: u64 = 5;
/// aya-log's target for the data plane's trace records.
pub const TRACE_TARGET: &str = "api_shield_trace";

/// The data plane's form of a traced prefix.
pub fn trace_net(net: IpNet) -> TraceNet {
    let net = net.trunc();
    let (addr, bits, family) = match net {
        IpNet::V4(n) => (
            n.network().to_ipv6_mapped().octets(),
            96 + u32::from(n.prefix_len()),
            4,
        ),
        IpNet::V6(n) => (n.network().octets(), u32::from(n.prefix_len()), 6),
    };
    let mask = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits)
    };
    TraceNet {
        addr,
        mask: mask.to_be_bytes(),
        family,
        _pad: 0,
    }
}

/// The filter for the traced prefixes `nets` (a session each), until `until_ns` on the
/// kernel's monotonic clock.
pub fn filter(nets: &[Option<IpNet>; TRACE_NETS], until_ns: u64) -> TraceFilter {
    let cost = 1_000_000_000 / TRACE_RATE;
    let mut f = TraceFilter {
        until_ns,
        cost_ns: cost,
        capacity_ns: cost * TRACE_RATE,
        ..TraceFilter::default()
    };
    for (i, net) in nets.iter().enumerate() {
        if let Some(net) = net {
            f.active |= 1 << i;
            f.nets[i] = trace_net(*net);
        }
    }
    f
}

/// One trace record as the data plane sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRecord {
    /// The filter's net (session) it matched.
    pub net: u32,
    /// bpf_ktime_get_ns() when judged.
    pub time_ns: u64,
    pub ifindex: u32,
    pub source: IpAddr,
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// Whether the program dropped the packet.
    pub dropped: bool,
    /// The counter slot (a reason, or a would-drop reason).
    pub reason: u32,
    /// The limit slot.
    pub rule: u32,
    /// Packets left in the bucket after this packet; None: no bucket.
    pub tokens: Option<u64>,
}

/// Parses a record's message: `key=value` pairs in [`RECORD_KEYS`]' order.
pub fn parse_record(message: &str) -> Result<RawRecord, String> {
    let mut values = Vec::with_capacity(RECORD_KEYS.len());
    let mut parts = message.split(' ');
    for key in RECORD_KEYS {
        let part = parts
            .next()
            .ok_or_else(|| format!("no `{key}` in `{message}`"))?;
        let value = part
            .strip_prefix(key)
            .and_then(|p| p.strip_prefix('='))
            .ok_or_else(|| format!("expected `{key}=` in `{message}`"))?;
        values.push(value);
    }
    if parts.next().is_some() {
        return Err(format!(
            "more than {} fields in `{message}`",
            RECORD_KEYS.len()
        ));
    }
    fn number<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
        v.parse()
            .map_err(|_| format!("`{key}={v}` is not a number"))
    }
    let source: Ipv6Addr = values[3]
        .parse()
        .map_err(|_| format!("`src={}` is not an address", values[3]))?;
    let tokens: u64 = number("tokens", values[10])?;
    let dropped = match values[7] {
        "0" => false,
        "1" => true,
        v => return Err(format!("`drop={v}` is neither 0 nor 1")),
    };
    Ok(RawRecord {
        net: number("net", values[0])?,
        time_ns: number("time", values[1])?,
        ifindex: number("if", values[2])?,
        // The data plane keeps IPv4 sources as ::ffff:a.b.c.d.
        source: source
            .to_ipv4_mapped()
            .map_or(IpAddr::V6(source), IpAddr::V4),
        protocol: number("proto", values[4])?,
        src_port: number("sport", values[5])?,
        dst_port: number("dport", values[6])?,
        dropped,
        reason: number("reason", values[8])?,
        rule: number("rule", values[9])?,
        tokens: (tokens != NO_TOKENS).then_some(tokens),
    })
}

/// A trace record as `api-shield trace` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRecord {
    pub time: String,
    pub interface: String,
    pub source: IpAddr,
    pub protocol: String,
    pub src_port: u16,
    pub dst_port: u16,
    /// `pass` or `drop`.
    pub verdict: String,
    /// The counter the packet landed in (`would_drop_*` under a dry run).
    pub reason: String,
    /// The limit whose bucket it met (`default`), none where the lists decided.
    pub rule: Option<String>,
    /// Packets left in that bucket after this packet; none without a bucket.
    pub tokens: Option<u64>,
}

impl TraceRecord {
    pub fn new(raw: &RawRecord, interface: &str, rule_name: &str, wall_ns: u128) -> TraceRecord {
        let reason = Reason::from_slot(raw.reason);
        let listed = matches!(
            reason.map(Reason::base),
            Some(Reason::Allowlisted | Reason::Blocklisted)
        );
        TraceRecord {
            time: humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_nanos(wall_ns as u64),
            )
            .to_string(),
            interface: interface.to_owned(),
            source: raw.source,
            protocol: crate::events::protocol_name(raw.protocol, true),
            src_port: raw.src_port,
            dst_port: raw.dst_port,
            verdict: if raw.dropped { "drop" } else { "pass" }.to_owned(),
            reason: reason.map_or("unknown", Reason::name).to_owned(),
            rule: (!listed).then(|| rule_name.to_owned()),
            tokens: raw.tokens,
        }
    }

    /// One line of `api-shield trace` output.
    pub fn line(&self) -> String {
        let ports = if self.src_port == 0 && self.dst_port == 0 {
            String::new()
        } else {
            format!(" {} -> {}", self.src_port, self.dst_port)
        };
        let mut s = format!(
            "{} {} {} {}{ports} {} {}",
            self.time,
            self.interface,
            self.source,
            self.protocol,
            self.verdict.to_uppercase(),
            self.reason
        );
        if let Some(rule) = &self.rule {
            s.push_str(&format!(" rule={rule}"));
        }
        if let Some(t) = self.tokens {
            s.push_str(&format!(" tokens={t}"));
        }
        s
    }
}

/// Where parsed records go: every running session subscribes (the interface's index).
pub type TraceHub = broadcast::Sender<(Arc<str>, RawRecord)>;

/// aya-log's logger for one interface's program: parses trace records and hands them to
/// the sessions; the data plane logs nothing else.
pub struct TraceLog {
    pub interface: Arc<str>,
    pub hub: TraceHub,
}

impl log::Log for TraceLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.target() == TRACE_TARGET
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.target() != TRACE_TARGET {
            return;
        }
        match parse_record(&record.args().to_string()) {
            // No session listening is no error: it just ended.
            Ok(raw) => {
                let _ = self.hub.send((self.interface.clone(), raw));
            }
            Err(e) => log::warn!("{}: unreadable trace record: {e}", self.interface),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_back_into_their_fields() {
        let r = parse_record(
            "net=2 time=123456789 if=7 src=::ffff:198.18.0.9 proto=17 sport=40000 dport=53 drop=1 reason=3 rule=2 tokens=0",
        )
        .unwrap();
        assert_eq!(r.net, 2);
        assert_eq!(r.time_ns, 123_456_789);
        assert_eq!(r.ifindex, 7);
        assert_eq!(r.source, "198.18.0.9".parse::<IpAddr>().unwrap());
        assert_eq!((r.protocol, r.src_port, r.dst_port), (17, 40000, 53));
        assert_eq!(
            (r.dropped, r.reason, r.rule, r.tokens),
            (true, 3, 2, Some(0))
        );
        let r = parse_record(&format!(
            "net=0 time=1 if=1 src=2001:db8::1 proto=58 sport=0 dport=0 drop=0 reason=2 rule=0 tokens={NO_TOKENS}"
        ))
        .unwrap();
        assert_eq!(r.source, "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!(r.tokens, None);
        for bad in [
            "",
            "net=0",
            "net=0 time=1 if=1 src=::1 proto=1 sport=0 dport=0 drop=2 reason=0 rule=0 tokens=0",
            "net=x time=1 if=1 src=::1 proto=1 sport=0 dport=0 drop=0 reason=0 rule=0 tokens=0",
            "net=0 time=1 if=1 src=nope proto=1 sport=0 dport=0 drop=0 reason=0 rule=0 tokens=0",
            "net=0 time=1 if=1 src=::1 proto=1 sport=0 dport=0 drop=0 reason=0 rule=0 tokens=0 x=1",
            "time=1 net=0 if=1 src=::1 proto=1 sport=0 dport=0 drop=0 reason=0 rule=0 tokens=0",
        ] {
            assert!(parse_record(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nets_match_as_the_data_plane_compares_them() {
        // The data plane's test: source & mask == addr, and the family.
        let matches = |net: &str, src: IpAddr| {
            let n = trace_net(net.parse().unwrap());
            let (bytes, family) = match src {
                IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), 4),
                IpAddr::V6(a) => (a.octets(), 6),
            };
            n.family == family && (0..16).all(|i| bytes[i] & n.mask[i] == n.addr[i])
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(matches("198.18.0.0/24", ip("198.18.0.77")));
        assert!(!matches("198.18.0.0/24", ip("198.18.1.77")));
        assert!(matches("198.18.0.9/32", ip("198.18.0.9")));
        assert!(matches("0.0.0.0/0", ip("203.0.113.1")));
        assert!(!matches("0.0.0.0/0", ip("2001:db8::1")));
        assert!(matches("::/0", ip("2001:db8::1")));
        assert!(
            !matches("::/0", ip("198.18.0.9")),
            "IPv6 nets never take IPv4 sources"
        );
        assert!(matches("2001:db8:ffff::/48", ip("2001:db8:ffff:7::1")));
        assert!(!matches("2001:db8:ffff::/48", ip("2001:db8:fffe::1")));
        // A host address given with its prefix is truncated, as the CLI's prefixes are.
        assert!(matches("198.18.0.77/24", ip("198.18.0.1")));
    }

    #[test]
    fn the_filter_marks_each_session_and_bounds_the_rate() {
        let f = filter(
            &[None, Some("198.18.0.0/24".parse().unwrap()), None, None],
            99,
        );
        assert_eq!(f.active, 0b10);
        assert_eq!(f.until_ns, 99);
        assert_eq!(f.cost_ns * TRACE_RATE, 1_000_000_000);
        assert_eq!(f.capacity_ns / f.cost_ns, TRACE_RATE);
        assert_eq!(f.nets[1].family, 4);
        assert_eq!(filter(&[None; TRACE_NETS], 0).active, 0);
    }
}
