//! `cargo xtask demo`: api-shield in a throwaway two-namespace sandbox, on its built-in
//! default config, with a legitimate client, a flooder and a blocklisted source.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::IpAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use api_shield_tests::{
    daemon::{Daemon, DaemonDirs, binary, last_counters},
    netns::{SERVER_V4, Sandbox},
    require_root,
    traffic::{Receiver, SERVER_PORT, send_udp},
};

const LEGIT: &str = "198.18.0.10";
const FLOODER: &str = "198.18.0.66";
const BLOCKED: &str = "192.0.2.66"; // TEST-NET-1: in the default blocklist

fn main() -> Result<()> {
    require_root();
    println!("== api-shield demo ==");
    // The server side is named eth0, the interface the default config protects; it lives
    // only inside the sandbox's namespace, never on the host.
    let sb = Sandbox::new("eth0").context("creating the sandbox")?;
    println!(
        "sandbox: namespaces {} (server, eth0 {SERVER_V4}) and {} (client)",
        sb.server.name(),
        sb.client.name()
    );
    for addr in [LEGIT, FLOODER, BLOCKED] {
        sb.add_client_address(addr)?;
    }
    let dirs = DaemonDirs::new()?;
    let daemon =
        Daemon::start_with(&sb.server, None, 1, dirs.clone()).context("starting api-shield")?;
    for line in daemon
        .log()
        .lines()
        .filter(|l| l.contains("loaded:") || l.contains("attached to"))
    {
        println!("daemon: {}", line.split("] ").nth(1).unwrap_or(line));
    }
    println!("\n$ api-shield status");
    print!("{}", dirs.cli_ok(&["status"]));
    let rx = Receiver::start(&sb.server, &format!("[::]:{SERVER_PORT}"))?;
    let dest = format!("{SERVER_V4}:{SERVER_PORT}");
    println!(
        "\nsending for ~3 s: legit client 300 pps; flooder 50,000 packets at full speed; blocked source 5,000 packets"
    );
    let (legit, flood, blocked) = std::thread::scope(|s| {
        let legit = s.spawn(|| send_udp(&sb.client, LEGIT, &dest, 900, 300, 200));
        let flood = s.spawn(|| send_udp(&sb.client, FLOODER, &dest, 50_000, 0, 64));
        let blocked = s.spawn(|| send_udp(&sb.client, BLOCKED, &dest, 5_000, 2_000, 64));
        (legit.join(), flood.join(), blocked.join())
    });
    let (legit, flood, blocked) = (
        legit.expect("legit sender")?,
        flood.expect("flood sender")?,
        blocked.expect("blocked sender")?,
    );
    std::thread::sleep(Duration::from_millis(200));
    let got = rx.finish();
    for args in [
        ["explain", BLOCKED, "--proto", "udp", "--port", "5201"],
        ["explain", FLOODER, "--proto", "udp", "--port", "5201"],
    ] {
        println!("\n$ api-shield {}", args.join(" "));
        print!("{}", dirs.cli_ok(&args));
    }
    println!("\n$ api-shield trace {LEGIT} --max 3   (while the client sends 5 packets)");
    print!("{}", trace_while_sending(&sb, &dirs, LEGIT, &dest)?);
    let log = daemon.stop()?;
    let received = |a: &str| {
        got.get(&a.parse::<IpAddr>().expect("address"))
            .copied()
            .unwrap_or(0)
    };

    println!(
        "\n{:<28} {:>10} {:>10} {:>10}",
        "source", "sent", "received", "dropped"
    );
    for (name, addr, sent) in [
        ("legitimate client", LEGIT, legit.packets),
        ("flooder (limit 1000 pps)", FLOODER, flood.packets),
        ("blocklisted (192.0.2.0/24)", BLOCKED, blocked.packets),
    ] {
        let r = received(addr);
        println!(
            "{:<28} {:>10} {:>10} {:>10}",
            format!("{name}"),
            sent,
            r,
            sent - r.min(sent)
        );
        let _ = addr;
    }
    let counters = last_counters(&log)?;
    println!("\nshield counters (packets / bytes) per reason:");
    for (reason, (packets, bytes)) in &counters {
        println!("  {reason:<24} {packets:>10} {bytes:>12}");
    }
    let ok = received(LEGIT) == legit.packets
        && received(BLOCKED) == 0
        && received(FLOODER) < flood.packets / 2;
    println!(
        "\n{}",
        if ok {
            "result: the legitimate client got every packet through; the flood was throttled; the blocklisted source was dropped."
        } else {
            "result: UNEXPECTED - see the table above"
        }
    );
    println!("\napi-shield stopped; its program stays attached until `api-shield detach`:");
    print!(
        "{}",
        dirs.cli_ok(&["detach", "--pin-dir", &dirs.pin_dir().display().to_string()])
    );
    println!("sandbox removed.");
    anyhow::ensure!(ok, "the demo did not show the expected verdicts");
    Ok(())
}

/// Runs `api-shield trace SOURCE --max 3` while SOURCE sends 5 packets: its output.
fn trace_while_sending(
    sb: &Sandbox,
    dirs: &DaemonDirs,
    source: &str,
    dest: &str,
) -> Result<String> {
    let mut child = Command::new(binary())
        .arg("--socket")
        .arg(dirs.socket())
        .args(["trace", source, "--for", "10s", "--max", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting api-shield trace")?;
    let mut err = BufReader::new(child.stderr.take().context("trace stderr")?);
    let mut started = String::new();
    err.read_line(&mut started)?;
    send_udp(&sb.client, source, dest, 5, 100, 200)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.wait();
    let mut out = String::new();
    child
        .stdout
        .take()
        .context("trace stdout")?
        .read_to_string(&mut out)?;
    let mut ended = String::new();
    err.read_to_string(&mut ended)?;
    Ok(format!("{started}{out}{ended}"))
}
