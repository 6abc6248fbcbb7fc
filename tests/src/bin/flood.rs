//! `cargo xtask flood`: the end-to-end flood against api-shield, the XDP_DROP floor,
//! nftables and iptables, in a throwaway network sandbox; prints a Markdown table.

use anyhow::Result;
use api_shield_tests::require_root;

fn main() -> Result<()> {
    require_root();
    let quick = std::env::args().any(|a| a == "--quick");
    let mut report = String::new();
    api_shield_tests::flood::end_to_end(
        &mut report,
        if quick { 500_000 } else { 3_000_000 },
        if quick { 1 } else { 3 },
    )?;
    println!("{report}");
    Ok(())
}
