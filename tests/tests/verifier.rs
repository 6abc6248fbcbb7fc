//! The verifier's budget: each program must verify well inside the kernel's limit of one
//! million processed instructions, on every kernel we claim (this test runs in the 6.1 VM
//! too), so that the next feature has room. A program over budget is refused at load,
//! which every other test would also show, but only this one says by how much.

use api_shield::{config::Config, shield::Shield};
use api_shield_common::names;
use api_shield_tests::require_root;

/// Half the kernel's BPF_COMPLEXITY_LIMIT_INSNS (1,000,000).
const BUDGET: u32 = 500_000;

#[test]
fn every_program_verifies_within_half_the_kernels_limit() {
    require_root();
    let config = Config::parse(
        "interfaces: [{name: unused0}]\nlimits:\n  rules:\n    - {name: web, match: {protocol: tcp, dst_ports: [443]}, pps: 10, key: source/24}\nblocklist: [192.0.2.0/24]\n",
    )
    .unwrap();
    let mut shield = Shield::from_config(&config).expect("loading the programs");
    let mut report = Vec::new();
    for name in [
        names::PROGRAM_XDP,
        names::PROGRAM_TC,
        names::PROGRAM_TRACE_XDP,
        names::PROGRAM_TRACE_TC,
    ] {
        let program = shield
            .ebpf_mut()
            .program(name)
            .unwrap_or_else(|| panic!("no program {name}"));
        let info = program.info().expect("program info");
        let verified = info
            .verified_instruction_count()
            .expect("the kernel reports verified instructions (Linux >= 5.16)");
        report.push(format!("{name}: {verified}"));
        assert!(
            verified <= BUDGET,
            "{name} took {verified} instructions to verify, over the budget of {BUDGET}"
        );
    }
    api_shield_tests::figure(&format!(
        "verifier: instructions processed per program on Linux {}: {}",
        api_shield::shield::kernel::release(),
        report.join(", ")
    ));
}
