//! Runs the real `api-shield` binary inside a test namespace and stops it by its PID.

use std::{
    fs::{self, File},
    io::Read as _,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::{NetNs, enter_netns};

/// The api-shield binary: `$API_SHIELD_BIN`, or the one next to the test executable's
/// target directory (`cargo xtask test` builds it first).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("API_SHIELD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // Tests run from target/<profile>/deps/, the demo from target/<profile>/.
    let dir = exe.parent().expect("executable directory");
    let bin = [dir, dir.parent().unwrap_or(dir)]
        .iter()
        .map(|d| d.join("api-shield"))
        .find(|b| b.is_file())
        .unwrap_or_else(|| dir.join("api-shield"));
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p api-shield`) or set API_SHIELD_BIN",
        bin.display()
    );
    bin
}

/// A daemon's own socket, state directory and pin directory, shared by successive daemons
/// of one test (restarts). On drop, `api-shield detach` removes the pins, then the files go.
pub struct DaemonDirs {
    tmp: tempdir::TempDir,
    pin_dir: PathBuf,
}

impl DaemonDirs {
    pub fn new() -> Result<std::sync::Arc<DaemonDirs>> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tmp = tempdir::TempDir::new()?;
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/{}{}-{}",
            crate::netns::NETNS_PREFIX,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        Ok(std::sync::Arc::new(DaemonDirs { tmp, pin_dir }))
    }

    pub fn socket(&self) -> PathBuf {
        self.tmp.path().join("run/api.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pin_dir
    }

    /// Runs `api-shield --socket <ours> ARGS` and returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(binary())
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("running the api-shield CLI");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// As [`DaemonDirs::cli`], inside `netns` (as an operator on that host would run it):
    /// what the CLI does by netlink, such as removing a TC filter, needs the interface's
    /// namespace. Fails the test unless it exits 0; returns stdout.
    pub fn cli_ok_in(&self, netns: &NetNs, args: &[&str]) -> String {
        let ns = File::open(netns.path()).expect("opening the namespace");
        let mut cmd = Command::new(binary());
        cmd.arg("--socket").arg(self.socket()).args(args);
        // SAFETY: only async-signal-safe work (setns) between fork and exec.
        unsafe {
            cmd.pre_exec(move || enter_netns(&ns));
        }
        let out = cmd.output().expect("running the api-shield CLI");
        assert!(
            out.status.success(),
            "api-shield {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// As [`DaemonDirs::cli`], but fails the test unless it exits 0; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.cli(args);
        assert_eq!(code, 0, "api-shield {args:?} failed: {err}");
        out
    }
}

impl Drop for DaemonDirs {
    fn drop(&mut self) {
        if self.pin_dir.exists() {
            let (code, _, err) =
                self.cli(&["detach", "--pin-dir", &self.pin_dir.display().to_string()]);
            if code != 0 {
                eprintln!("warning: detach {}: {err}", self.pin_dir.display());
            }
        }
    }
}

/// A running daemon; SIGTERM then wait on drop (SIGKILL if it does not exit).
pub struct Daemon {
    child: Option<Child>,
    log_path: PathBuf,
    config_path: Option<PathBuf>,
    pub dirs: std::sync::Arc<DaemonDirs>,
    _dir: tempdir::TempDir,
}

impl Daemon {
    /// Starts `api-shield run --config <yaml>` in `netns` (only the network namespace is
    /// entered, as under systemd) and waits until it has attached to every interface.
    pub fn start(netns: &NetNs, config_yaml: &str, expect_attached: usize) -> Result<Daemon> {
        Daemon::start_with(
            netns,
            Some(config_yaml),
            expect_attached,
            DaemonDirs::new()?,
        )
    }

    /// Starts the daemon without waiting for anything; `None` runs the built-in default
    /// config (no `--config`); `dirs` lets a restarted daemon find its predecessor's state
    /// and pins.
    pub fn spawn_with(
        netns: &NetNs,
        config_yaml: Option<&str>,
        dirs: std::sync::Arc<DaemonDirs>,
    ) -> Result<Daemon> {
        let dir = tempdir::TempDir::new()?;
        let log_path = dir.path().join("daemon.log");
        let log = File::create(&log_path)?;
        let ns = File::open(netns.path())?;
        let mut cmd = Command::new(binary());
        cmd.arg("--socket").arg(dirs.socket()).arg("run");
        cmd.arg("--state-dir")
            .arg(dirs.state_dir())
            .arg("--pin-dir")
            .arg(dirs.pin_dir());
        let mut config_path = None;
        if let Some(yaml) = config_yaml {
            let config = dir.path().join("config.yaml");
            fs::write(&config, yaml)?;
            cmd.arg("--config").arg(&config);
            config_path = Some(config);
        }
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: only async-signal-safe work (setns) between fork and exec.
        unsafe {
            cmd.pre_exec(move || enter_netns(&ns));
        }
        let child = cmd.spawn().context("starting api-shield")?;
        Ok(Daemon {
            child: Some(child),
            log_path,
            config_path,
            dirs,
            _dir: dir,
        })
    }

    /// As [`Daemon::spawn_with`], then waits until it has attached to every interface and
    /// is ready for the CLI.
    pub fn start_with(
        netns: &NetNs,
        config_yaml: Option<&str>,
        expect_attached: usize,
        dirs: std::sync::Arc<DaemonDirs>,
    ) -> Result<Daemon> {
        let mut daemon = Daemon::spawn_with(netns, config_yaml, dirs)?;
        daemon.wait_for_log("attached to", expect_attached, Duration::from_secs(30))?;
        // Fully started (signal handlers, socket): what the tests act on next.
        daemon.wait_for_log("ready: admin socket", 1, Duration::from_secs(30))?;
        Ok(daemon)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Replaces the config file the daemon was started with (it reads it on SIGHUP).
    pub fn write_config(&self, yaml: &str) -> Result<()> {
        let path = self
            .config_path
            .as_ref()
            .context("started without --config")?;
        fs::write(path, yaml)?;
        Ok(())
    }

    /// Sends `signal` to the daemon, by its PID.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let child = self.child.as_ref().context("daemon stopped")?;
        // SAFETY: signalling the child we started, by its PID.
        if unsafe { libc::kill(child.id() as i32, signal) } != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Polls the log until `needle` appears `count` times; fails early if the daemon exits.
    pub fn wait_for_log(&mut self, needle: &str, count: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= count {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "api-shield exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "api-shield did not log {needle:?} within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a daemon expected to fail its start to exit by itself; returns its exit
    /// status and log. Killed, and an error, if it is still running at `timeout`.
    pub fn wait_exit(mut self, timeout: Duration) -> Result<(std::process::ExitStatus, String)> {
        let mut child = self.child.take().context("daemon already stopped")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, self.log()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("api-shield still ran after {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the daemon dies without any cleanup (the program stays attached).
    pub fn kill(mut self) -> Result<String> {
        let mut child = self.child.take().context("daemon already stopped")?;
        child.kill()?;
        child.wait()?;
        Ok(self.log())
    }

    /// SIGTERM, wait for a clean exit, and return the whole log.
    pub fn stop(mut self) -> Result<String> {
        let status = self.terminate()?;
        let log = self.log();
        if !status.success() {
            bail!("api-shield exited with {status}:\n{log}");
        }
        Ok(log)
    }

    fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("daemon already stopped")?;
        // SAFETY: signalling the child we started, by its PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let status = child.wait()?;
                bail!("api-shield ignored SIGTERM for 10 s; killed ({status})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.terminate();
        }
    }
}

/// The counters of the daemon's last "counters:" log line: reason -> (packets, bytes).
pub fn last_counters(log: &str) -> Result<std::collections::BTreeMap<String, (u64, u64)>> {
    let line = log
        .lines()
        .rev()
        .find_map(|l| l.split_once("counters: ").map(|(_, rest)| rest))
        .context("no counters line in the daemon log")?;
    let mut out = std::collections::BTreeMap::new();
    for part in line.split(", ") {
        // "<reason> <packets> pkts <bytes> B (<rate> pps)"
        let fields: Vec<&str> = part.split_whitespace().collect();
        if fields.len() < 5 || fields[2] != "pkts" || fields[4] != "B" {
            bail!("unexpected counters entry {part:?}");
        }
        out.insert(
            fields[0].to_owned(),
            (fields[1].parse()?, fields[3].parse()?),
        );
    }
    Ok(out)
}

/// A temporary directory removed on drop (no extra crate for it).
pub mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> std::io::Result<TempDir> {
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "api-shield-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path)?;
            Ok(TempDir(path))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The XDP program attached to `iface` in native mode by the daemon whose pins are under
/// `pin_dir`, found through its pinned link: the very program that judges the interface's
/// frames, for BPF_PROG_TEST_RUN.
pub fn pinned_xdp_program(pin_dir: &std::path::Path, iface: &str) -> Result<aya::programs::Xdp> {
    use aya::programs::{Xdp, links::FdLink, links::PinnedLink, loaded_programs};
    let path = pin_dir.join(iface).join("xdp_link_native");
    let link: FdLink = PinnedLink::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?
        .into();
    let id = link.info()?.program_id();
    let info = loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == id)
        .with_context(|| format!("program {id} of link {} not loaded", path.display()))?;
    Ok(Xdp::from_program_info(
        info,
        "probe".into(),
        aya_obj::programs::XdpAttachType::Interface,
    )?)
}
