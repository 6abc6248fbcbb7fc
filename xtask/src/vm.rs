//! The kernel-level tests on other kernels: each boots in a VM (virtme-ng on QEMU) on this
//! machine's root filesystem, read-only with writable overlays, and runs the test binaries
//! built on the host. Kernels are Debian's (`6.1` takes the newest 6.1 image apt knows)
//! or an image given by path.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::util::{command_output, run};

/// What `cargo xtask test` runs in VMs when no `--kernel` is given: the oldest kernel the
/// README claims (the host's own kernel is the other end).
pub(crate) const DEFAULT_MATRIX: &[&str] = &["6.1"];

/// The test targets (of api-shield-tests) that exercise the kernel, each with the tests to
/// run (none named: all): verdicts through BPF_PROG_TEST_RUN, the fuzzer, and the
/// namespace tests (attach and its fallbacks, reload, restart over pins, TC mode).
pub(crate) const VM_TESTS: &[(&str, &[&str])] = &[
    ("verifier", &[]),
    ("verdicts", &[]),
    ("fuzz", &[]),
    ("attach", &[]),
    ("pins", &[]),
    ("netns", &[]),
    ("reload", &[]),
    (
        "admin",
        &["sigkill_keeps_enforcing_and_a_restart_continues_state_and_counters"],
    ),
    (
        "trace",
        &["a_trace_shows_each_packet_of_its_sources_with_what_the_program_did"],
    ),
];

/// Frames per fuzz test inside a VM: emulation runs them about 20x slower than the host.
pub(crate) const VM_FUZZ_FRAMES: u64 = 250_000;

/// The pinned virtme-ng, installed into a venv of our own.
const VIRTME_NG: &str = "virtme-ng==1.42";

/// The whole VM run's limit: past it the guest is killed and the run fails.
const VM_TIMEOUT: Duration = Duration::from_secs(20 * 60);

fn data_dir() -> Result<PathBuf> {
    let home = env::var_os("HOME").context("HOME is not set")?;
    Ok(Path::new(&home).join(".local/share/api-shield"))
}

fn vng() -> Result<PathBuf> {
    Ok(data_dir()?.join("virtme-ng/bin/vng"))
}

/// A command running vng, with its venv first on PATH (vng runs its sibling virtme-run).
fn vng_command(timeout: Duration) -> Result<Command> {
    let vng = vng()?;
    let bin = vng.parent().context("vng lies in a venv's bin")?;
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bin.to_path_buf()];
    paths.extend(env::split_paths(&path));
    let mut cmd = Command::new("timeout");
    cmd.args(["-s", "KILL", &timeout.as_secs().to_string()])
        .arg(vng)
        .env("PATH", env::join_paths(paths)?);
    Ok(cmd)
}

pub(crate) fn virtme_ng_installed() -> bool {
    vng().is_ok_and(|v| {
        Command::new(v)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Installs virtme-ng from PyPI into its own venv (Debian's QEMU runs the guest).
pub(crate) fn install_virtme_ng() -> Result<()> {
    if virtme_ng_installed() {
        println!("setup: virtme-ng: already installed");
        return Ok(());
    }
    let venv = data_dir()?.join("virtme-ng");
    println!(
        "setup: virtme-ng: installing {VIRTME_NG} into {}",
        venv.display()
    );
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        .context("creating a Python venv (python3 -m venv)")?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", VIRTME_NG]))?;
    if !virtme_ng_installed() {
        bail!("virtme-ng was installed but `vng --version` fails");
    }
    Ok(())
}

/// A kernel to boot: its image and release (`uname -r` inside).
pub(crate) struct Kernel {
    pub(crate) label: String,
    pub(crate) image: PathBuf,
    pub(crate) release: String,
}

/// `6.1` (a Debian kernel series, fetched once into the cache) or a path to an image.
pub(crate) fn resolve(spec: &str) -> Result<Kernel> {
    let path = Path::new(spec);
    if path.is_file() {
        let release = image_release(path)?;
        if !Path::new("/lib/modules").join(&release).is_dir() {
            println!(
                "vm: warning: no /lib/modules/{release}: the guest can load no modules (veth, clsact)"
            );
        }
        return Ok(Kernel {
            label: release.clone(),
            image: path.to_path_buf(),
            release,
        });
    }
    if !spec
        .split('.')
        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        bail!("--kernel {spec}: neither a kernel image file nor a version such as 6.1");
    }
    if let Some(kernel) = newest_cached(spec) {
        return install_modules(kernel);
    }
    let mut candidates = debian_images(spec)?;
    if candidates.is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        candidates = debian_images(spec)?;
    }
    if candidates.is_empty() {
        bail!("apt knows no Debian kernel image linux-image-{spec}.*-amd64");
    }
    let mut last_error = None;
    // Newest first; an image the mirror no longer serves gives way to the next.
    for package in candidates.iter().rev() {
        match fetch_debian_image(package) {
            Ok(kernel) => return Ok(kernel),
            Err(e) => {
                println!("vm: {package}: {e:#}");
                last_error = Some(e);
            }
        }
    }
    Err(last_error.expect("at least one candidate"))
        .context(format!("no kernel {spec} could be fetched"))
}

/// The newest kernel of Debian series `series` in the cache.
fn newest_cached(series: &str) -> Option<Kernel> {
    let dir = data_dir().ok()?.join("kernels");
    let prefix = format!("linux-image-{series}.");
    let mut found: Vec<Kernel> = fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let release = name.strip_prefix("linux-image-")?.to_owned();
            let image = e
                .path()
                .join("root/boot")
                .join(format!("vmlinuz-{release}"));
            (name.starts_with(&prefix) && image.is_file()).then(|| Kernel {
                label: release.clone(),
                image,
                release,
            })
        })
        .collect();
    found.sort_by_key(|k| version_key(&k.release));
    found.pop()
}

/// Whether a kernel of Debian series `series` is in the cache, with its modules in place.
pub(crate) fn cached(series: &str) -> bool {
    newest_cached(series).is_some_and(|k| Path::new("/lib/modules").join(&k.release).is_dir())
}

/// Debian's signed generic images of series `series`, oldest first.
fn debian_images(series: &str) -> Result<Vec<String>> {
    let out = command_output(Command::new("apt-cache").args([
        "search",
        "--names-only",
        &format!("^linux-image-{}\\.", series.replace('.', "\\.")),
    ]))?;
    let mut names: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| {
            n.ends_with("-amd64")
                && !["-cloud-", "-rt-", "-dbg", "-unsigned", "template"]
                    .iter()
                    .any(|x| n.contains(x))
        })
        .map(str::to_owned)
        .collect();
    names.sort_by_key(|n| version_key(n));
    Ok(names)
}

/// The numbers in a package name, for ordering "6.1.0-9" before "6.1.0-47".
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Downloads and unpacks a Debian kernel package into the cache (once), and puts its
/// modules where the guest looks for them.
fn fetch_debian_image(package: &str) -> Result<Kernel> {
    let dir = data_dir()?.join("kernels").join(package);
    let root = dir.join("root");
    let release = package
        .strip_prefix("linux-image-")
        .context("not a kernel image package")?
        .to_owned();
    let image = root.join(format!("boot/vmlinuz-{release}"));
    if !image.is_file() {
        println!("vm: fetching {package} (once; cached in {})", dir.display());
        fs::create_dir_all(&dir)?;
        run(Command::new("apt-get")
            .args(["download", "-qq", package])
            .current_dir(&dir))?;
        let deb = fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        let unpacked = dir.join("root.partial");
        let _ = fs::remove_dir_all(&unpacked);
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
        fs::rename(&unpacked, &root)?;
        fs::remove_file(&deb)?;
    }
    install_modules(Kernel {
        label: release.clone(),
        image,
        release,
    })
}

/// Puts a cached kernel's modules where the guest looks for them: /lib/modules/RELEASE.
fn install_modules(kernel: Kernel) -> Result<Kernel> {
    let modules = Path::new("/lib/modules").join(&kernel.release);
    if !modules.is_dir() {
        // The image is root/boot/vmlinuz-RELEASE; the modules are root/lib/modules/RELEASE.
        let root = kernel
            .image
            .parent()
            .and_then(Path::parent)
            .context("a cached image lies in root/boot")?;
        println!(
            "vm: installing Linux {}'s modules in {}",
            kernel.release,
            modules.display()
        );
        run(Command::new("cp")
            .arg("-a")
            .arg(root.join("lib/modules").join(&kernel.release))
            .arg(&modules))?;
    }
    Ok(kernel)
}

/// The release string a bzImage carries (its header points at it).
fn image_release(image: &Path) -> Result<String> {
    let bytes = fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let header = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    if bytes.get(0x202..0x206) != Some(b"HdrS") {
        bail!("{} is not a bzImage", image.display());
    }
    let at = usize::from(header(0x20e).context("short image")?) + 0x200;
    let text = bytes.get(at..).context("short image")?;
    let end = text.iter().position(|&b| b == 0 || b == b' ').unwrap_or(0);
    Ok(String::from_utf8_lossy(&text[..end]).into_owned())
}

/// Whether KVM runs a guest here (on some hosts /dev/kvm exists and QEMU aborts or
/// hangs); otherwise QEMU emulates.
fn kvm_works(kernel: &Kernel) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let Ok(mut cmd) = vng_command(Duration::from_secs(60)) else {
        return false;
    };
    let out = cmd
        .arg("--run")
        .arg(&kernel.image)
        .args([
            "--force-9p",
            "--memory",
            "512M",
            "--",
            "echo api-shield-kvm-ok",
        ])
        .output();
    out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("api-shield-kvm-ok"))
}

/// One test binary's result inside the VM.
pub(crate) struct Outcome {
    pub(crate) name: String,
    pub(crate) output: String,
    pub(crate) exit_code: Option<i32>,
}

/// Boots `kernel` and runs `binaries` (name, path) one after the other inside, each with
/// `env`, from `cwd`; returns what each printed and its exit code.
pub(crate) fn run_tests(
    kernel: &Kernel,
    binaries: &[(String, PathBuf)],
    env: &[(String, String)],
    cwd: &Path,
    out_dir: &Path,
) -> Result<Vec<Outcome>> {
    let _ = fs::remove_dir_all(out_dir);
    fs::create_dir_all(out_dir)?;
    let kvm = kvm_works(kernel);
    println!(
        "vm: booting {} under QEMU ({}), 2 CPUs, 2 GiB, this machine's root filesystem read-only",
        kernel.release,
        if kvm {
            "KVM"
        } else {
            "emulation: no usable KVM here"
        }
    );
    let out = out_dir.display().to_string();
    let mut script = format!(
        "set -u\nmount -t bpf bpf /sys/fs/bpf\nmodprobe veth\ncd {}\nuname -r > {out}/uname",
        shell_quote(&cwd.display().to_string())
    );
    for (key, value) in env {
        script.push_str(&format!("\nexport {key}={}", shell_quote(value)));
    }
    for (name, path) in binaries {
        let filters: Vec<String> = VM_TESTS
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, tests)| tests.iter().map(|t| format!("{t} --exact")).collect())
            .unwrap_or_default();
        script.push_str(&format!(
            "\n{} --test-threads=1 {} > {out}/{name}.out 2>&1; echo $? > {out}/{name}.rc",
            shell_quote(&path.display().to_string()),
            filters.join(" ")
        ));
    }
    // The guest runs it from a file: passed inline, it rides on the kernel command line,
    // which overflows (and panics Linux 6.1 at boot) past 2 KiB.
    let script_path = out_dir.join("run.sh");
    fs::write(&script_path, script + "\n")?;
    let started = Instant::now();
    let mut cmd = vng_command(VM_TIMEOUT)?;
    cmd.arg("--run")
        .arg(&kernel.image)
        .args(["--force-9p", "--memory", "2G", "--cpus", "2"])
        .arg(format!("--rwdir={out}"));
    if !kvm {
        cmd.arg("--disable-kvm");
    }
    // The guest's console (kernel messages too) goes to a file, to read while it runs.
    let console = fs::File::create(out_dir.join("console.log"))?;
    // A guest kernel that panics powers off at once rather than hanging until the timeout.
    cmd.args(["--verbose", "--append", "panic=-1"])
        .arg("--")
        .arg(format!(
            "sh {}",
            shell_quote(&script_path.display().to_string())
        ))
        .stdin(std::process::Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console);
    cmd.status().context("running vng")?;
    let uname = fs::read_to_string(out_dir.join("uname")).unwrap_or_default();
    if uname.trim() != kernel.release {
        bail!(
            "the VM did not run the tests (it reported kernel {:?}, {:?} expected; {} elapsed); console: {}",
            uname.trim(),
            kernel.release,
            humanize(started.elapsed()),
            out_dir.join("console.log").display()
        );
    }
    println!(
        "vm: {} ran for {}",
        kernel.release,
        humanize(started.elapsed())
    );
    Ok(binaries
        .iter()
        .map(|(name, _)| Outcome {
            name: name.clone(),
            output: fs::read_to_string(out_dir.join(format!("{name}.out"))).unwrap_or_default(),
            exit_code: fs::read_to_string(out_dir.join(format!("{name}.rc")))
                .ok()
                .and_then(|s| s.trim().parse().ok()),
        })
        .collect())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn humanize(d: Duration) -> String {
    format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_packages_order_by_their_numbers() {
        let mut names = vec![
            "linux-image-6.1.0-47-amd64",
            "linux-image-6.1.0-9-amd64",
            "linux-image-6.1.0-50-amd64",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(
            names,
            [
                "linux-image-6.1.0-9-amd64",
                "linux-image-6.1.0-47-amd64",
                "linux-image-6.1.0-50-amd64"
            ]
        );
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
    }
}
