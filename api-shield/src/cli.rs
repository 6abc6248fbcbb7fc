//! The command line: argument parsing (clap) and the client side of every admin verb.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::{
    api::{self, Request},
    config::{Config, DEFAULT_SOCKET},
    explain::{Probe, ProbeProtocol},
    lists::{ListKind, unix_now},
    prefix::parse_prefix,
    shield::detach_pinned,
};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Kernel-level (XDP) rate limiter and firewall for API hosts"
)]
pub struct Cli {
    /// The daemon's admin socket [default: /run/api-shield/api.sock; for `run`: the config's].
    #[arg(long, global = true, env = "API_SHIELD_SOCKET")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// A clap error as one line (exit 1, like every other error; clap's own is several lines,
/// exit 2): its message with what it names on the following lines (the missing
/// arguments), without the usage that follows.
pub fn argument_error(e: &clap::Error) -> String {
    let text = e.to_string();
    let message: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = message.join(" ");
    let message = message.trim_start_matches("error: ");
    if message.is_empty() {
        "invalid arguments (see api-shield --help)".to_owned()
    } else {
        format!("{message} (see api-shield --help)")
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: load, attach and enforce the config (SIGHUP reloads it; on
    /// SIGINT/SIGTERM it exits and the program stays attached, enforcing).
    Run {
        /// YAML config file; without it, the built-in default config (see the README).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override the config's state_dir.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Override the config's pin_dir.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Validate a config file without loading anything.
    CheckConfig {
        /// YAML config file.
        path: PathBuf,
    },
    /// Blocklist entries added by operators.
    #[command(subcommand)]
    Block(ListCommand),
    /// Allowlist entries added by operators.
    #[command(subcommand)]
    Allow(ListCommand),
    /// Counters per reason (packets, bytes) and rates since the previous `stats`.
    Stats {
        #[arg(long)]
        json: bool,
        /// A live view: the table again every second, with the rates of that second.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        /// With --watch: stop after this many screens (default: until interrupted).
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
    /// The sources sending the most packets right now (measured over one second), from
    /// the limiter's own state: packets/s, bytes/s, drops, and the limit that applies.
    Top {
        /// How many sources.
        #[arg(short = 'n', default_value_t = 20)]
        n: usize,
        #[arg(long)]
        json: bool,
    },
    /// The verdict a packet from ADDRESS would get now, and why: the list entries that
    /// cover it (origins, reasons, expiry), the rule that matches, its bucket's tokens,
    /// penalty state and dry run, read from the live maps.
    Explain {
        /// IPv4 or IPv6 address.
        address: String,
        /// The packet's protocol.
        #[arg(long, default_value = "tcp", value_parser = parse_protocol)]
        proto: ProbeProtocol,
        /// Destination port (tcp, udp).
        #[arg(long)]
        port: Option<u16>,
        /// A TCP SYN (a connection attempt) rather than any other TCP segment.
        #[arg(long)]
        syn: bool,
        #[arg(long)]
        json: bool,
    },
    /// A live trace of packets from ADDRESS or CIDR only: time, interface, protocol,
    /// ports, verdict, reason, rule, tokens left. Ends after --for or --max packets, or
    /// on Ctrl-C; the data plane reports at most 200 packets a second for all traces.
    Trace {
        /// An address or CIDR, IPv4 or IPv6.
        target: String,
        /// How long to trace (e.g. 30s, 5m; at most 1h).
        #[arg(long = "for", value_name = "DURATION", default_value = "30s", value_parser = parse_trace_time)]
        duration: Duration,
        /// Stop after this many packets (1 to 100000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        max: u64,
        /// One JSON object per packet.
        #[arg(long)]
        json: bool,
    },
    /// Interfaces, XDP mode, program id, uptime and map fill.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Reputation feeds: entries in force, last success and error, next refresh, rejected lines.
    Feeds {
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<FeedsAction>,
    },
    /// Re-read the daemon's config file (like SIGHUP); refused with its errors if invalid.
    Reload,
    /// With the daemon stopped: remove the program from every interface and delete the pins.
    Detach {
        /// Config whose pin_dir to clear (default: the built-in default's).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The pin directory to clear (overrides --config).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum FeedsAction {
    /// Fetch now (every feed, or NAME) and wait for the result.
    Refresh {
        /// The feed to fetch (default: all).
        name: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ListCommand {
    /// Add a CIDR or address.
    Add(AddArgs),
    /// Remove what the CLI added (config and feed entries stay).
    Del {
        /// CIDR or address.
        cidr: String,
    },
    /// Every entry, with its origins, reasons and expiry.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct AddArgs {
    /// CIDR or address, IPv4 or IPv6.
    pub cidr: String,
    /// Remove the entry after this long (e.g. 90s, 10m, 2h, 7d).
    #[arg(long, value_parser = parse_ttl)]
    pub ttl: Option<Duration>,
    /// Why (shown in `list`).
    #[arg(long)]
    pub reason: Option<String>,
}

fn parse_trace_time(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration `{s}`: {e} (write it like 30s or 5m)"))?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(crate::trace::MAX_TRACE_SECS) {
        return Err(format!("invalid duration `{s}`: 1s to 1h"));
    }
    Ok(d)
}

fn parse_protocol(s: &str) -> Result<ProbeProtocol, String> {
    s.parse()
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("invalid TTL `{s}`: {e} (write it like 90s, 10m, 2h or 7d)"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("invalid TTL `{s}`: at least 1s"));
    }
    Ok(d)
}

/// Runs a client verb against the daemon.
pub fn execute_client(socket: Option<PathBuf>, command: Command) -> Result<()> {
    let socket = &socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    match command {
        Command::Block(cmd) => list_command(socket, ListKind::Block, cmd),
        Command::Allow(cmd) => list_command(socket, ListKind::Allow, cmd),
        Command::Stats {
            watch: true, count, ..
        } => watch_stats(socket, count),
        Command::Top { n, json } => show(socket, &Request::Top { n }, json, print_top),
        Command::Stats { json, .. } => show(socket, &Request::Stats {}, json, print_stats),
        Command::Status { json } => show(socket, &Request::Status {}, json, print_status),
        Command::Trace {
            target,
            duration,
            max,
            json,
        } => {
            parse_prefix(&target)?;
            trace(socket, target, duration, max, json)
        }
        Command::Explain {
            address,
            proto,
            port,
            syn,
            json,
        } => {
            // Checked here too, so that a typo is refused without a daemon.
            address.parse::<std::net::IpAddr>().map_err(|_| {
                anyhow::anyhow!("invalid address `{address}`: expected an IPv4 or IPv6 address")
            })?;
            let probe = Probe {
                protocol: proto,
                port,
                syn,
            };
            probe.check().map_err(anyhow::Error::msg)?;
            let req = Request::Explain {
                address,
                protocol: proto,
                port,
                syn,
            };
            show(socket, &req, json, print_explain)
        }
        Command::Feeds {
            action: Some(FeedsAction::Refresh { name }),
            ..
        } => {
            let v = request(socket, &Request::FeedsRefresh { name })?;
            for line in v.as_array().into_iter().flatten() {
                println!("{}", line.as_str().unwrap_or_default());
            }
            Ok(())
        }
        Command::Feeds { json, action: None } => {
            show(socket, &Request::Feeds {}, json, print_feeds)
        }
        Command::Reload => {
            request(socket, &Request::Reload {})?;
            println!("reloaded");
            Ok(())
        }
        Command::Detach { config, pin_dir } => detach(socket, config, pin_dir),
        Command::Run { .. } | Command::CheckConfig { .. } => unreachable!("handled by main"),
    }
}

/// Sends a request; the daemon's refusal becomes this command's error.
fn request(socket: &PathBuf, req: &Request) -> Result<Value> {
    let resp = api::call(socket, req)?;
    if !resp.ok {
        bail!(
            "{}",
            resp.error
                .unwrap_or_else(|| "the daemon refused without a reason".into())
        );
    }
    Ok(resp.result.unwrap_or(Value::Null))
}

fn list_command(socket: &PathBuf, list: ListKind, cmd: ListCommand) -> Result<()> {
    match cmd {
        ListCommand::Add(args) => {
            // Checked here too, so a typo never even reaches the daemon.
            parse_prefix(&args.cidr)?;
            let v = request(
                socket,
                &Request::Add {
                    list,
                    cidr: args.cidr,
                    ttl_secs: args.ttl.map(|d| d.as_secs()),
                    reason: args.reason,
                },
            )?;
            let expiry = v["expires_at"]
                .as_u64()
                .map(|t| format!(", expires in {}", human_secs(t.saturating_sub(unix_now()))))
                .unwrap_or_default();
            println!(
                "{} {} added{expiry}",
                list.name(),
                v["cidr"].as_str().unwrap_or_default()
            );
            for key in ["note", "warning"] {
                if let Some(s) = v[key].as_str() {
                    println!("{key}: {s}");
                }
            }
            Ok(())
        }
        ListCommand::Del { cidr } => {
            parse_prefix(&cidr)?;
            let v = request(socket, &Request::Del { list, cidr })?;
            let still: Vec<&str> = v["still_listed_by"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if still.is_empty() {
                println!(
                    "{} {} removed",
                    list.name(),
                    v["cidr"].as_str().unwrap_or_default()
                );
            } else {
                println!(
                    "{} {}: the cli entry was removed; still listed by {}",
                    list.name(),
                    v["cidr"].as_str().unwrap_or_default(),
                    still.join(", ")
                );
            }
            Ok(())
        }
        ListCommand::List { json } => show(socket, &Request::List { list }, json, print_list),
    }
}

/// Asks the daemon and prints its answer: as JSON with `--json`, else with `print`.
fn show(socket: &PathBuf, req: &Request, json: bool, print: fn(&Value)) -> Result<()> {
    let v = request(socket, req)?;
    if json {
        println!("{v}");
    } else {
        print(&v);
    }
    Ok(())
}

fn human_secs(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs))
        .to_string()
        .replace(' ', "")
}

fn print_list(v: &Value) {
    println!("{:<44} {:<24} {:<24} EXPIRES", "CIDR", "ORIGINS", "REASON");
    let now = unix_now();
    for entry in v.as_array().into_iter().flatten() {
        let claims = entry["claims"].as_array().cloned().unwrap_or_default();
        let origins: Vec<&str> = claims.iter().filter_map(|c| c["origin"].as_str()).collect();
        let reasons: Vec<&str> = claims.iter().filter_map(|c| c["reason"].as_str()).collect();
        // The entry lasts as long as its longest-lived claim.
        let expiry = if claims.iter().any(|c| c["expires_at"].is_null()) {
            "never".to_owned()
        } else {
            let t = claims
                .iter()
                .filter_map(|c| c["expires_at"].as_u64())
                .max()
                .unwrap_or(now);
            format!("in {}", human_secs(t.saturating_sub(now)))
        };
        let reason = if reasons.is_empty() {
            "-".to_owned()
        } else {
            reasons.join("; ")
        };
        println!(
            "{:<44} {:<24} {:<24} {expiry}",
            entry["cidr"].as_str().unwrap_or_default(),
            origins.join(","),
            reason
        );
    }
}

fn print_feeds(v: &Value) {
    let now = unix_now();
    println!(
        "{:<20} {:>9} {:<16} {:<10} {:>8} {:>11} {:>8}  LAST ERROR",
        "FEED", "ENTRIES", "LAST SUCCESS", "NEXT", "REJECTED", "ALLOWLISTED", "REFUSED"
    );
    for f in v.as_array().into_iter().flatten() {
        let ago = |t: Option<u64>| {
            t.map_or("never".to_owned(), |t| {
                format!("{} ago", human_secs(now.saturating_sub(t)))
            })
        };
        println!(
            "{:<20} {:>9} {:<16} {:<10} {:>8} {:>11} {:>8}  {}",
            f["name"].as_str().unwrap_or_default(),
            f["entries"].as_u64().unwrap_or(0),
            ago(f["last_success"].as_u64()),
            format!(
                "in {}",
                human_secs(f["next_refresh_in_secs"].as_u64().unwrap_or(0))
            ),
            f["rejected_lines"].as_u64().unwrap_or(0),
            f["allowlisted"].as_u64().unwrap_or(0),
            f["refused_map_full"].as_u64().unwrap_or(0),
            f["last_error"].as_str().unwrap_or("-"),
        );
        for example in f["rejected_examples"].as_array().into_iter().flatten() {
            println!(
                "{:<20} rejected {}",
                "",
                example.as_str().unwrap_or_default()
            );
        }
    }
}

fn print_top(v: &Value) {
    println!(
        "{:<40} {:<16} {:>12} {:>14} {:>12} {:>12}  RULE",
        "SOURCE", "INTERFACE", "PKT/S", "BYTES/S", "DROPS/S", "DROPS"
    );
    for e in v.as_array().into_iter().flatten() {
        println!(
            "{:<40} {:<16} {:>12.1} {:>14.1} {:>12.1} {:>12}  {}",
            e["source"].as_str().unwrap_or_default(),
            e["interface"].as_str().unwrap_or_default(),
            e["pps"].as_f64().unwrap_or(0.0),
            e["bytes_per_sec"].as_f64().unwrap_or(0.0),
            e["drops_per_sec"].as_f64().unwrap_or(0.0),
            e["drops"].as_u64().unwrap_or(0),
            e["rule"].as_str().unwrap_or_default(),
        );
    }
}

/// `stats --watch`: rates computed here between this view's own polls, so that several
/// watchers (or a `stats` in between) do not disturb each other.
fn watch_stats(socket: &PathBuf, count: Option<u64>) -> Result<()> {
    use std::io::Write as _;
    let totals = |v: &Value| -> Vec<(String, u64, u64)> {
        v["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    r["reason"].as_str().unwrap_or_default().to_owned(),
                    r["packets"].as_u64().unwrap_or(0),
                    r["bytes"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let mut previous = totals(&request(socket, &Request::Stats {})?);
    let mut at = std::time::Instant::now();
    let mut shown = 0;
    while count.is_none_or(|c| shown < c) {
        std::thread::sleep(Duration::from_secs(1));
        let now = totals(&request(socket, &Request::Stats {})?);
        let secs = at.elapsed().as_secs_f64();
        at = std::time::Instant::now();
        let mut out = std::io::stdout().lock();
        // Clear the screen and go home, then one table.
        write!(out, "\x1b[2J\x1b[H")?;
        writeln!(
            out,
            "api-shield: live view, every second (Ctrl-C to leave)\n"
        )?;
        writeln!(
            out,
            "{:<14} {:>12} {:>14} {:>16} {:>16}",
            "REASON", "PKT/S", "MBIT/S", "PACKETS", "BYTES"
        )?;
        let (mut pass_pps, mut drop_pps) = (0.0, 0.0);
        for ((reason, packets, bytes), (_, p0, b0)) in now.iter().zip(previous.iter()) {
            let pps = packets.saturating_sub(*p0) as f64 / secs;
            let mbit = bytes.saturating_sub(*b0) as f64 * 8.0 / secs / 1e6;
            if matches!(reason.as_str(), "blocklisted" | "rate_limited") {
                drop_pps += pps;
            } else {
                pass_pps += pps;
            }
            writeln!(
                out,
                "{reason:<14} {pps:>12.1} {mbit:>14.3} {packets:>16} {bytes:>16}"
            )?;
        }
        writeln!(
            out,
            "\npassing {pass_pps:.1} pkt/s, dropping {drop_pps:.1} pkt/s"
        )?;
        out.flush()?;
        previous = now;
        shown += 1;
    }
    Ok(())
}

fn print_stats(v: &Value) {
    println!(
        "{:<14} {:>14} {:>16} {:>12} {:>14}",
        "REASON", "PACKETS", "BYTES", "PKT/S", "BYTES/S"
    );
    for r in v["reasons"].as_array().into_iter().flatten() {
        println!(
            "{:<14} {:>14} {:>16} {:>12.1} {:>14.1}",
            r["reason"].as_str().unwrap_or_default(),
            r["packets"].as_u64().unwrap_or(0),
            r["bytes"].as_u64().unwrap_or(0),
            r["pps"].as_f64().unwrap_or(0.0),
            r["bytes_per_sec"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "(rates over the {:.1} s since the previous `stats`)",
        v["interval_secs"].as_f64().unwrap_or(0.0)
    );
}

/// `trace`: prints each packet as the daemon streams it, then how the trace ended.
fn trace(socket: &PathBuf, cidr: String, duration: Duration, max: u64, json: bool) -> Result<()> {
    use std::io::Write as _;
    let request = Request::Trace {
        cidr,
        secs: duration.as_secs(),
        max,
    };
    let mut first = true;
    api::stream(socket, &request, |line| {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("the daemon's answer is not valid: {line}"))?;
        if let Some(record) = v.get("trace") {
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{record}")?;
            } else {
                let record: crate::trace::TraceRecord = serde_json::from_value(record.clone())
                    .with_context(|| format!("the daemon's trace record is not valid: {line}"))?;
                writeln!(out, "{}", record.line())?;
            }
            out.flush()?;
            return Ok(true);
        }
        if v["ok"] != Value::Bool(true) {
            bail!(
                "{}",
                v["error"]
                    .as_str()
                    .unwrap_or("the daemon refused without a reason")
            );
        }
        let result = &v["result"];
        if first {
            first = false;
            eprintln!(
                "tracing {} for {}s (at most {} packets; Ctrl-C ends it)",
                result["cidr"].as_str().unwrap_or_default(),
                result["secs"],
                result["max"]
            );
            return Ok(true);
        }
        let why = match result["done"].as_str().unwrap_or_default() {
            "time" => "its time is up",
            "count" => "it showed --max packets",
            "daemon stopping" => "the daemon is stopping",
            other => other,
        };
        eprintln!(
            "trace ended: {why}; {} packets shown, {} not shown (over the trace rate)",
            result["shown"], result["missed"]
        );
        Ok(false)
    })
}

fn print_claims(v: &Value) -> String {
    let now = unix_now();
    let claims: Vec<String> = v["claims"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let mut s = c["origin"].as_str().unwrap_or_default().to_owned();
            if let Some(r) = c["reason"].as_str() {
                s.push_str(&format!(" ({r})"));
            }
            if let Some(t) = c["expires_at"].as_u64() {
                s.push_str(&format!(
                    ", expires in {}",
                    human_secs(t.saturating_sub(now))
                ));
            }
            s
        })
        .collect();
    format!(
        "{}: {}",
        v["cidr"].as_str().unwrap_or_default(),
        claims.join("; ")
    )
}

fn print_explain(v: &Value) {
    let packet = &v["packet"];
    let mut what = packet["protocol"].as_str().unwrap_or_default().to_owned();
    if packet["syn"].as_bool() == Some(true) {
        what.push_str(" SYN");
    }
    if let Some(p) = packet["port"].as_u64() {
        what.push_str(&format!(" to port {p}"));
    }
    println!("{} ({what}):", v["address"].as_str().unwrap_or_default());
    for (list, key) in [("allowlist", "allowlist"), ("blocklist", "blocklist")] {
        let entries = v[key].as_array().cloned().unwrap_or_default();
        if entries.is_empty() {
            println!("  {list}: no entry covers it");
        }
        for e in &entries {
            println!("  {list}: {}", print_claims(e));
        }
    }
    for i in v["interfaces"].as_array().into_iter().flatten() {
        let dry = if i["dry_run"].as_bool() == Some(true) {
            " (dry run)"
        } else {
            ""
        };
        println!(
            "  {}: {} as {}{dry}",
            i["interface"].as_str().unwrap_or_default(),
            i["verdict"].as_str().unwrap_or_default().to_uppercase(),
            i["reason"].as_str().unwrap_or_default(),
        );
        match i["listed"].as_str() {
            Some(list) => println!("    the {list}list decides before any rule"),
            None => println!("    listed nowhere: the limiter decides"),
        }
        let rule = &i["rule"];
        if rule.is_null() {
            continue;
        }
        let rule_dry = if rule["dry_run"].as_bool() == Some(true) {
            ", dry run"
        } else {
            ""
        };
        println!(
            "    rule {} (slot {}{rule_dry}), bucket {}",
            rule["name"].as_str().unwrap_or_default(),
            rule["slot"],
            rule["bucket"].as_str().unwrap_or_default()
        );
        if rule["unlimited"].as_bool() == Some(true) {
            println!("    no limit");
            continue;
        }
        let tracked = if rule["tracked"].as_bool() == Some(true) {
            "tracked"
        } else {
            "not tracked yet: a full bucket"
        };
        if let Some(left) = rule["packets_left"].as_u64() {
            println!(
                "    packets: {left} of {} left, refilling at {}/s ({tracked})",
                rule["packets_burst"],
                rule["packets_per_sec"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some(left) = rule["bytes_left"].as_u64() {
            println!(
                "    bytes: {left} of {} left, refilling at {}/s (read for a {}-byte frame)",
                rule["bytes_burst"],
                rule["bytes_per_sec"].as_f64().unwrap_or(0.0),
                rule["frame_bytes"]
            );
        }
        let p = &rule["penalty"];
        if !p.is_null() {
            println!(
                "    penalty: {} drops in the window of {} that box the prefix{}",
                p["window_drops"],
                p["after"],
                if p["boxed"].as_bool() == Some(true) {
                    "; boxed now"
                } else {
                    ""
                }
            );
        }
    }
}

fn print_status(v: &Value) {
    println!(
        "api-shield {} up {}",
        v["version"].as_str().unwrap_or_default(),
        human_secs(v["uptime_secs"].as_u64().unwrap_or(0))
    );
    println!(
        "config: {}",
        v["config"].as_str().unwrap_or("(built-in default)")
    );
    println!(
        "pins: {}   state: {}",
        v["pin_dir"].as_str().unwrap_or_default(),
        v["state_dir"].as_str().unwrap_or_default()
    );
    for i in v["interfaces"].as_array().into_iter().flatten() {
        let mode = match i["xdp_mode"].as_str().unwrap_or_default() {
            "tc" => "TC ingress".to_owned(),
            m => format!("{m} XDP"),
        };
        println!(
            "interface {}: {mode}, program id {}",
            i["name"].as_str().unwrap_or_default(),
            i["program_id"]
        );
    }
    println!(
        "{:<16} {:<10} {:>10} {:>12} {:>7}",
        "INTERFACE", "MAP", "ENTRIES", "CAPACITY", "FILL"
    );
    for m in v["maps"].as_array().into_iter().flatten() {
        let (e, c) = (
            m["entries"].as_u64().unwrap_or(0),
            m["capacity"].as_u64().unwrap_or(1).max(1),
        );
        println!(
            "{:<16} {:<10} {:>10} {:>12} {:>6.1}%",
            m["interface"].as_str().unwrap_or_default(),
            m["map"].as_str().unwrap_or_default(),
            e,
            c,
            e as f64 * 100.0 / c as f64
        );
    }
    if let Some(counts) = v["list_entries"].as_object() {
        let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!(
            "list entries: {}",
            if parts.is_empty() {
                "none".into()
            } else {
                parts.join(", ")
            }
        );
    }
}

fn detach(socket: &PathBuf, config: Option<PathBuf>, pin_dir: Option<PathBuf>) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!(
            "a daemon is running (it answers on {}): stop it first, then detach",
            socket.display()
        );
    }
    let pin_dir = match (pin_dir, config) {
        (Some(p), _) => p,
        (None, Some(path)) => {
            Config::from_file(&path)
                .with_context(|| format!("invalid config {}", path.display()))?
                .pin_dir
        }
        (None, None) => Config::parse(crate::config::DEFAULT_CONFIG)?.pin_dir,
    };
    if !pin_dir.exists() {
        println!("nothing pinned under {}", pin_dir.display());
        return Ok(());
    }
    for entry in
        std::fs::read_dir(&pin_dir).with_context(|| format!("reading {}", pin_dir.display()))?
    {
        let dir = entry?.path();
        if dir.is_dir() {
            let removed = detach_pinned(&dir)?;
            println!("{}: removed {}", dir.display(), removed.join(", "));
        }
    }
    std::fs::remove_dir(&pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    println!("detached; {} removed", pin_dir.display());
    Ok(())
}
