//! The IPVS suite. It runs only inside the VM that `cargo xtask vm-test ipvs` boots
//! (`WEIR_IN_VM=1`; the host kernel has no IPVS); elsewhere each test returns at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use weir_e2e::*;

/// Whether this process runs inside the IPVS VM.
fn in_vm() -> bool {
    if std::env::var("WEIR_IN_VM").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("skipped: runs inside `cargo xtask vm-test ipvs` only");
    false
}

#[test]
fn guest_kernel_has_ipvs_and_namespaces() {
    if !in_vm() {
        return;
    }
    let ns = Netns::new("probe").expect("netns");
    let out = ns
        .exec(&["cat", "/proc/net/ip_vs"])
        .expect("/proc/net/ip_vs");
    assert!(String::from_utf8_lossy(&out.stdout).contains("IP Virtual Server"));
    ns.exec(&["nft", "add", "table", "ip", "t"]).expect("nft");
}
