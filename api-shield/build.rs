//! Builds the eBPF crate with aya-build and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let common = metadata
        .packages
        .iter()
        .find(|p| p.name == "api-shield-common")
        .ok_or_else(|| anyhow!("api-shield-common package not found in the workspace"))?;
    // aya-build watches the eBPF crate's folder only; the object also holds the shared map
    // types, and a layout change there must rebuild it, or kernel and controller disagree.
    if let Some(dir) = common.manifest_path.parent() {
        println!("cargo:rerun-if-changed={dir}");
    }
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name == "api-shield-ebpf")
        .ok_or_else(|| anyhow!("api-shield-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("api-shield-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
