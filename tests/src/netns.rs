//! Throwaway network sandboxes: two namespaces joined by a veth pair, created by the test
//! and always removed (Drop, also on panic). Nothing touches the host's own interfaces:
//! each veth end is created directly inside its namespace.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use anyhow::{Context as _, Result, bail};

/// Every namespace we create starts with this, followed by our PID.
pub const NETNS_PREFIX: &str = "apsh-";

/// Runs `ip` with `args`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A named network namespace, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `apsh-<pid>-<n>-<role>`, after removing namespaces left by dead test runs.
    pub fn new(role: &str) -> Result<NetNs> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_stale_namespaces();
        let name = format!(
            "{NETNS_PREFIX}{}-{}-{role}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        // Interfaces made here send no router solicitations and no duplicate address
        // probes: frames the tests did not send would land in the shield's counters.
        for key in ["router_solicitations=0", "dad_transmits=0"] {
            ns.exec(&["sysctl", "-qw", &format!("net.ipv6.conf.default.{key}")])?;
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .with_context(|| format!("running {cmd:?} in {}", self.name))?;
        if !out.status.success() {
            bail!(
                "{cmd:?} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a thread that has entered the namespace (setns is per thread).
    /// Sockets created by `f` stay in the namespace wherever they are used later.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        let handle = thread::spawn(move || {
            enter_netns(&file).expect("setns into the test namespace");
            f()
        });
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also destroys the veth end inside it (and its peer).
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: removing namespace {}: {e:#}", self.name);
        }
    }
}

/// Moves the calling thread into the network namespace open as `file`.
pub fn enter_netns(file: &File) -> std::io::Result<()> {
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Deletes `apsh-<pid>-...` namespaces whose test process no longer exists.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// A server and a client namespace joined by a veth pair, with addresses from the
/// benchmarking range 198.18.0.0/15 and 2001:db8:ffff::/64.
pub struct Sandbox {
    // Field order: namespaces go last, after anything that lives in them.
    pub server_if: String,
    pub client_if: String,
    pub server: NetNs,
    pub client: NetNs,
}

pub const SERVER_V4: &str = "198.18.0.1";
pub const SERVER_V6: &str = "2001:db8:ffff::1";

impl Sandbox {
    /// Creates the pair; `server_if` names the server's end (the demo uses `eth0`, the
    /// default config's interface, which is safe inside the namespace).
    pub fn new(server_if: &str) -> Result<Sandbox> {
        let server = NetNs::new("srv")?;
        let client = NetNs::new("cli")?;
        let client_if = "veth-client";
        ip(&[
            "link",
            "add",
            client_if,
            "netns",
            client.name(),
            "type",
            "veth",
            "peer",
            "name",
            server_if,
            "netns",
            server.name(),
        ])?;
        let sb = Sandbox {
            server_if: server_if.to_owned(),
            client_if: client_if.to_owned(),
            server,
            client,
        };
        sb.server.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{SERVER_V4}/24"),
            "dev",
            server_if,
        ])?;
        sb.server.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{SERVER_V6}/64"),
            "dev",
            server_if,
            "nodad",
        ])?;
        sb.server.exec(&["ip", "link", "set", server_if, "up"])?;
        sb.client.exec(&["ip", "link", "set", client_if, "up"])?;
        sb.client
            .exec(&["ip", "addr", "add", "198.18.0.2/24", "dev", client_if])?;
        sb.client.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "2001:db8:ffff::2/64",
            "dev",
            client_if,
            "nodad",
        ])?;
        // Sources outside the link's subnet (blocklisted ones, say) are routed back over the
        // veth, so the server's reverse-path filter never drops them before a socket sees them.
        sb.server
            .exec(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"])?;
        sb.server.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{server_if}.rp_filter=0"),
        ])?;
        sb.server
            .exec(&["ip", "route", "add", "default", "dev", server_if])?;
        sb.server
            .exec(&["ip", "-6", "route", "add", "default", "dev", server_if])?;
        // Static neighbours on the client: resolution from a blocked source address would
        // be dropped by the shield (rightly), leaving its datagrams stuck in the client.
        let mac = sb
            .server
            .exec(&["cat", &format!("/sys/class/net/{server_if}/address")])?;
        for addr in [SERVER_V4, SERVER_V6] {
            sb.client.exec(&[
                "ip",
                "neigh",
                "replace",
                addr,
                "lladdr",
                mac.trim(),
                "dev",
                client_if,
                "nud",
                "permanent",
            ])?;
        }
        Ok(sb)
    }

    /// The server end's MAC address (see [`mac_address`]).
    pub fn server_mac(&self) -> Result<[u8; 6]> {
        mac_address(&self.server, &self.server_if)
    }

    /// Gives the client an extra source address (IPv4 /32 or IPv6 /128).
    pub fn add_client_address(&self, addr: &str) -> Result<()> {
        let (family, cidr) = if addr.contains(':') {
            ("-6", format!("{addr}/128"))
        } else {
            ("-4", format!("{addr}/32"))
        };
        let mut args = vec![
            "ip",
            family,
            "addr",
            "add",
            cidr.as_str(),
            "dev",
            self.client_if.as_str(),
        ];
        if family == "-6" {
            args.push("nodad");
        }
        self.client.exec(&args)?;
        Ok(())
    }
}

/// The MAC address of `ifname` in `netns`: crafted frames need it as their destination, or
/// the receiving stack discards them as meant for another host.
pub fn mac_address(netns: &NetNs, ifname: &str) -> Result<[u8; 6]> {
    let text = netns.exec(&["cat", &format!("/sys/class/net/{ifname}/address")])?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing MAC {text:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC {text:?} is not 6 bytes"))
}
