//! Drop events from the data plane's ring buffer, written to standard output one per line
//! (text or JSON), apart from the diagnostic log on standard error.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use api_shield_common::{
    counters::{COUNTER_SLOTS, Reason},
    events::{DropEvent, EVENT_SOURCE_KNOWN, EVENT_SOURCE_V6, EVENT_WOULD_DROP},
};
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::config::EventFormat;

/// Events delivered to userspace, per reason slot (for metrics).
pub type Delivered = Arc<Vec<AtomicU64>>;

/// The names of the limit slots (`default`, then the rules), kept current across reloads.
pub type SlotNames = Arc<std::sync::RwLock<Vec<String>>>;

pub fn new_delivered() -> Delivered {
    Arc::new((0..COUNTER_SLOTS).map(|_| AtomicU64::new(0)).collect())
}

/// Reads `ring` until the task is aborted, writing each event as a line.
pub async fn read(
    interface: String,
    ring: RingBuf<MapData>,
    format: EventFormat,
    delivered: Delivered,
    slot_names: SlotNames,
) {
    // SAFETY: the ring buffer owns its map fd, which stays open and the same for as long
    // as the AsyncFd owns the ring.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("{interface}: cannot poll the events ring buffer: {e}");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        let mut out = std::io::stdout().lock();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<DropEvent>() {
                continue;
            }
            // SAFETY: the data plane writes exactly a DropEvent; read_unaligned copes with
            // the ring's 8-byte alignment of records.
            let event: DropEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            if let Some(n) = delivered.get(event.reason as usize) {
                n.fetch_add(1, Ordering::Relaxed);
            }
            let rule = slot_names
                .read()
                .ok()
                .and_then(|n| n.get(event.rule as usize).cloned())
                .unwrap_or_else(|| format!("slot-{}", event.rule));
            let _ = writeln!(
                out,
                "{}",
                format_event(
                    &interface,
                    &event,
                    &rule,
                    wall_time_ns(event.timestamp_ns),
                    format
                )
            );
        }
        let _ = out.flush();
        guard.clear_ready();
    }
}

/// The kernel stamps events with CLOCK_MONOTONIC; this maps such a stamp to wall time.
pub(crate) fn wall_time_ns(monotonic_ns: u64) -> u128 {
    let now = |clock| {
        // SAFETY: clock_gettime into a zeroed timespec we own.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    let offset = now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC);
    (offset + i128::from(monotonic_ns)).max(0) as u128
}

/// The reason an event names: what it was (or would have been) dropped for.
fn reason_name(reason: u32) -> &'static str {
    Reason::from_slot(reason).map_or("unknown", |r| r.base().name())
}

pub(crate) fn protocol_name(protocol: u8, known: bool) -> String {
    match protocol {
        _ if !known => "-".into(),
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        p => p.to_string(),
    }
}

fn source(event: &DropEvent) -> Option<IpAddr> {
    if event.flags & EVENT_SOURCE_KNOWN == 0 {
        return None;
    }
    Some(if event.flags & EVENT_SOURCE_V6 != 0 {
        IpAddr::V6(Ipv6Addr::from(event.source))
    } else {
        IpAddr::V4(Ipv4Addr::new(
            event.source[12],
            event.source[13],
            event.source[14],
            event.source[15],
        ))
    })
}

pub fn format_event(
    interface: &str,
    event: &DropEvent,
    rule: &str,
    wall_ns: u128,
    format: EventFormat,
) -> String {
    let time = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(wall_ns as u64),
    );
    let src = source(event);
    // A dry run's events say what would have happened, apart from real drops.
    let kind = if event.flags & EVENT_WOULD_DROP != 0 {
        "would_drop"
    } else {
        "drop"
    };
    let protocol = protocol_name(event.protocol, src.is_some());
    match format {
        EventFormat::Text => format!(
            "{kind} time={time} interface={interface} source={} dst_port={} protocol={protocol} reason={} rule={rule}",
            src.map_or("-".into(), |s| s.to_string()),
            event.dst_port,
            reason_name(event.reason),
        ),
        EventFormat::Json => serde_json::json!({
                        "event": kind,
            "time": time.to_string(),
            "interface": interface,
            "source": src.map(|s| s.to_string()),
            "dst_port": event.dst_port,
            "protocol": protocol,
            "reason": reason_name(event.reason),
            "rule": rule,
        })
        .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_format_as_text_and_json() {
        let mut source = [0u8; 16];
        source[10] = 0xff;
        source[11] = 0xff;
        source[12..].copy_from_slice(&[192, 0, 2, 40]);
        let e = DropEvent {
            timestamp_ns: 0,
            source,
            ifindex: 2,
            reason: Reason::Blocklisted as u32,
            rule: 0,
            dst_port: 443,
            protocol: 6,
            flags: EVENT_SOURCE_KNOWN,
        };
        let wall = 1_795_400_000_123_000_000;
        assert_eq!(
            format_event("eth0", &e, "default", wall, EventFormat::Text),
            "drop time=2026-11-23T02:13:20.123Z interface=eth0 source=192.0.2.40 dst_port=443 protocol=tcp reason=blocklisted rule=default"
        );
        let j: serde_json::Value = serde_json::from_str(&format_event(
            "eth0",
            &e,
            "default",
            wall,
            EventFormat::Json,
        ))
        .unwrap();
        assert_eq!(j["source"], "192.0.2.40");
        assert_eq!(j["reason"], "blocklisted");
        let v6 = DropEvent {
            source: "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets(),
            flags: EVENT_SOURCE_KNOWN | EVENT_SOURCE_V6,
            protocol: 17,
            ..e
        };
        assert!(
            format_event("eth0", &v6, "default", wall, EventFormat::Text)
                .contains("source=2001:db8::1 dst_port=443 protocol=udp")
        );
        let unknown = DropEvent {
            flags: 0,
            reason: Reason::Malformed as u32,
            ..e
        };
        assert!(
            format_event("eth0", &unknown, "default", wall, EventFormat::Text)
                .contains("source=- dst_port=443 protocol=- reason=malformed")
        );
        let dry = DropEvent {
            reason: Reason::WouldDropRateLimited as u32,
            flags: EVENT_SOURCE_KNOWN | EVENT_WOULD_DROP,
            rule: 2,
            ..e
        };
        let line = format_event("eth0", &dry, "ssh-syn", wall, EventFormat::Text);
        assert!(
            line.starts_with("would_drop ") && line.ends_with("reason=rate_limited rule=ssh-syn"),
            "{line}"
        );
        let j: serde_json::Value = serde_json::from_str(&format_event(
            "eth0",
            &dry,
            "ssh-syn",
            wall,
            EventFormat::Json,
        ))
        .unwrap();
        assert_eq!(
            (j["event"].as_str(), j["rule"].as_str()),
            (Some("would_drop"), Some("ssh-syn"))
        );
    }
}
