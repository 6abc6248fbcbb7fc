//! What the running kernel offers the data plane: the features it needs (refused at start,
//! naming the kernel that brought each, where one is missing) and a readable account of a
//! program the verifier refused.

use std::{fmt, fs, io, path::Path};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported},
};

/// The oldest kernel the test suite passes on (in a VM, `cargo xtask test --kernel 6.1`).
pub const OLDEST_TESTED: (u32, u32) = (6, 1);

/// The running kernel's release string (`uname -r`).
pub fn release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The (major, minor) of a release string such as "6.1.0-47-amd64".
pub fn version_of(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release.split(|c: char| !c.is_ascii_digit());
    let major = numbers.next()?.parse().ok()?;
    let minor = numbers.next()?.parse().ok()?;
    Some((major, minor))
}

/// A kernel feature the data plane cannot do without.
#[derive(Debug, Clone, Copy)]
pub struct Feature {
    pub what: &'static str,
    /// The release that brought it.
    pub since: (u32, u32),
    probe: Probe,
}

#[derive(Debug, Clone, Copy)]
enum Probe {
    Map(MapType),
    Helper(BpfHelper),
    /// No cheap probe: the release decides.
    Version,
}

/// What the data plane uses, with the release that brought each.
pub const REQUIRED: &[Feature] = &[
    Feature {
        what: "LPM trie maps (the CIDR lists)",
        since: (4, 11),
        probe: Probe::Map(MapType::LpmTrie),
    },
    Feature {
        what: "memory-mapped arrays, BPF_F_MMAPABLE (list summaries, limiter table)",
        since: (5, 5),
        probe: Probe::Version,
    },
    Feature {
        what: "the bpf_jiffies64 helper (the limiter's tick clock)",
        since: (5, 5),
        probe: Probe::Helper(BpfHelper::BPF_FUNC_jiffies64),
    },
    Feature {
        what: "BPF ring buffers (drop events, penalties)",
        since: (5, 8),
        probe: Probe::Map(MapType::RingBuf),
    },
    Feature {
        what: "BPF links for XDP (a restart takes the link over without a gap)",
        since: (5, 9),
        probe: Probe::Version,
    },
    Feature {
        what: "BPF atomic compare-and-exchange (the limiter's buckets)",
        since: (5, 12),
        probe: Probe::Version,
    },
];

/// The features in [`REQUIRED`] that `present` says are missing; `version` decides those
/// without a probe.
fn missing_with(
    version: (u32, u32),
    mut present: impl FnMut(Probe) -> bool,
) -> Vec<&'static Feature> {
    REQUIRED
        .iter()
        .filter(|f| match f.probe {
            Probe::Version => version < f.since,
            probe => !present(probe),
        })
        .collect()
}

/// The required features this kernel lacks, probed where aya can.
fn missing_features() -> Vec<&'static Feature> {
    let Some(version) = version_of(&release()) else {
        return Vec::new();
    };
    missing_with(version, |probe| match probe {
        Probe::Map(map) => is_map_supported(map).unwrap_or(false),
        Probe::Helper(helper) => is_helper_supported(ProgramType::Xdp, helper).unwrap_or(false),
        Probe::Version => true,
    })
}

/// The kernel lacks features the data plane needs: one line per feature, naming the
/// release that brought it.
#[derive(Debug, thiserror::Error)]
pub struct MissingFeatures {
    pub kernel: String,
    pub missing: Vec<&'static Feature>,
}

impl fmt::Display for MissingFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "this kernel ({}) lacks what api-shield's data plane needs:",
            self.kernel
        )?;
        for feature in &self.missing {
            write!(
                f,
                "\n  - {} needs Linux {}.{} or later",
                feature.what, feature.since.0, feature.since.1
            )?;
        }
        Ok(())
    }
}

/// Refuses a kernel that lacks a feature the data plane needs, before anything is loaded.
pub fn check_features() -> Result<(), MissingFeatures> {
    let missing = missing_features();
    if missing.is_empty() {
        return Ok(());
    }
    Err(MissingFeatures {
        kernel: release(),
        missing,
    })
}

/// Whether an error is one of this module's, which keep their line breaks when printed.
pub fn is_kernel_error(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.is::<ProgramRefused>() || c.is::<MissingFeatures>())
}

/// The verifier refused a program: its last lines and the instruction it stopped at,
/// rather than a log of tens of kilobytes; the whole log goes to a file (see [`save`]).
///
/// [`save`]: ProgramRefused::save
#[derive(Debug, thiserror::Error)]
pub struct ProgramRefused {
    pub program: &'static str,
    pub kernel: String,
    pub error: io::Error,
    pub log: String,
    /// Where [`ProgramRefused::save`] wrote the whole log.
    pub saved_to: Option<String>,
}

/// How many of the verifier's last lines a refusal shows.
const TAIL_LINES: usize = 6;

impl ProgramRefused {
    /// The last instruction the verifier printed: where it stopped.
    pub fn stopped_at(&self) -> Option<&str> {
        self.log
            .lines()
            .map(str::trim)
            .rev()
            .find(|l| is_instruction(l))
    }

    fn tail(&self) -> Vec<&str> {
        let lines: Vec<&str> = self
            .log
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].to_vec()
    }

    /// Writes the whole log to `dir`, and names the file in the message from then on.
    pub fn save(&mut self, dir: &Path) -> io::Result<()> {
        let path = dir.join(format!("verifier-{}.log", self.program));
        fs::write(&path, &self.log)?;
        self.saved_to = Some(path.display().to_string());
        Ok(())
    }
}

/// "360: (79) r2 = *(u64 *)(r10 -256)": an instruction number, a colon, an opcode.
fn is_instruction(line: &str) -> bool {
    let Some((number, rest)) = line.split_once(": (") else {
        return false;
    };
    !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) && rest.contains(')')
}

impl fmt::Display for ProgramRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the kernel ({}) refused the {} program: {}",
            self.kernel, self.program, self.error
        )?;
        if let Some(insn) = self.stopped_at() {
            write!(f, "\n  stopped at: {insn}")?;
        }
        write!(f, "\n  the verifier's last lines:")?;
        for line in self.tail() {
            write!(f, "\n    {line}")?;
        }
        match &self.saved_to {
            Some(path) => write!(f, "\n  the whole log ({} bytes): {path}", self.log.len())?,
            None => write!(f, "\n  the whole log: {} bytes", self.log.len())?,
        }
        if version_of(&self.kernel).is_some_and(|v| v < OLDEST_TESTED) {
            write!(
                f,
                "\n  this kernel is older than the oldest api-shield is tested on (Linux {}.{})",
                OLDEST_TESTED.0, OLDEST_TESTED.1
            )?;
        }
        Ok(())
    }
}

/// Turns aya's load error into a [`ProgramRefused`] where the verifier refused; other
/// errors pass through.
pub fn refused(program: &'static str, e: aya::programs::ProgramError) -> anyhow::Error {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => ProgramRefused {
            program,
            kernel: release(),
            error: io_error,
            log: verifier_log.to_string(),
            saved_to: None,
        }
        .into(),
        other => anyhow::Error::new(other).context(format!("loading the {program} program")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end of the log Debian 12's kernel printed when it refused the XDP program.
    const LOG_6_1: &str = "0: R1=ctx(off=0,imm=0) R10=fp0\n\
        ; ifindex: unsafe { (*ctx.ctx).ingress_ifindex },\n\
        0: (61) r2 = *(u32 *)(r1 +12)         ; R1=ctx(off=0,imm=0)\n\
        358: (79) r5 = *(u64 *)(r10 -240)     ; R5_w=pkt_end(off=0,imm=0) R10=fp0\n\
        359: (79) r7 = *(u64 *)(r10 -144)     ; R7_w=P0 R10=fp0\n\
        360: (79) r2 = *(u64 *)(r10 -256)\n\
        invalid read from stack R10 off=-256 size=8\n\
        verification time 5821324 usec\n\
        stack depth 304\n\
        processed 130294 insns (limit 1000000) max_states_per_insn 28 total_states 8322\n\n";

    fn refusal_6_1() -> ProgramRefused {
        ProgramRefused {
            program: "XDP",
            kernel: "6.1.0-47-amd64".to_owned(),
            error: io::Error::from_raw_os_error(libc::EACCES),
            log: LOG_6_1.to_owned(),
            saved_to: None,
        }
    }

    #[test]
    fn a_refusal_names_the_instruction_and_shows_only_the_last_lines() {
        let refused = refusal_6_1();
        assert_eq!(
            refused.stopped_at(),
            Some("360: (79) r2 = *(u64 *)(r10 -256)")
        );
        let text = refused.to_string();
        assert!(text.contains("the kernel (6.1.0-47-amd64) refused the XDP program"));
        assert!(text.contains("invalid read from stack R10 off=-256 size=8"));
        assert!(!text.contains("ingress_ifindex"), "{text}");
        // The refusal, the instruction, a heading, the tail, the log's size.
        assert!(text.lines().count() <= 3 + TAIL_LINES + 1, "{text}");
    }

    #[test]
    fn a_saved_refusal_names_its_file_which_holds_the_whole_log() {
        let dir = std::env::temp_dir().join(format!("api-shield-refused-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut refused = refusal_6_1();
        refused.save(&dir).unwrap();
        let path = dir.join("verifier-XDP.log");
        assert_eq!(fs::read_to_string(&path).unwrap(), LOG_6_1);
        assert!(refused.to_string().contains(&path.display().to_string()));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kernels_older_than_the_oldest_tested_are_named_so() {
        let mut refused = refusal_6_1();
        assert!(!refused.to_string().contains("older than"));
        refused.kernel = "5.15.0-91-generic".to_owned();
        assert!(refused.to_string().contains("tested on (Linux 6.1)"));
    }

    #[test]
    fn release_strings_give_their_version() {
        assert_eq!(version_of("6.1.0-47-amd64"), Some((6, 1)));
        assert_eq!(version_of("6.18.44-fc-v1300"), Some((6, 18)));
        assert_eq!(version_of("5.14.0-427.el9.x86_64"), Some((5, 14)));
        assert_eq!(version_of("garbage"), None);
    }

    #[test]
    fn missing_features_name_the_release_that_brought_them() {
        // Linux 5.4 as the kernel's changelogs describe it: no ring buffer (5.8), no
        // jiffies64 (5.5); what has no probe is decided by the release alone.
        let missing = missing_with((5, 4), |probe| {
            !matches!(
                probe,
                Probe::Map(MapType::RingBuf) | Probe::Helper(BpfHelper::BPF_FUNC_jiffies64)
            )
        });
        let since: Vec<(u32, u32)> = missing.iter().map(|f| f.since).collect();
        assert_eq!(since, [(5, 5), (5, 5), (5, 8), (5, 9), (5, 12)]);
        let text = MissingFeatures {
            kernel: "5.4.0-150-generic".to_owned(),
            missing,
        }
        .to_string();
        assert!(text.contains("BPF ring buffers (drop events, penalties) needs Linux 5.8"));
        assert!(text.contains("needs Linux 5.12 or later"));
        assert!(missing_with((6, 1), |_| true).is_empty());
    }
}
