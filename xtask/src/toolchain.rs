//! The eBPF toolchain weir-proxy's build script needs: a nightly with `rust-src` (to build
//! `core` for the BPF target; and clippy, to lint the programs for that target) and bpf-linker 0.10.4 (needs no system LLVM). Installed when
//! missing, as `.ci/run` does, so the README's commands work on a fresh machine.

use anyhow::{bail, Result};
use std::process::Command;

fn ok(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    if !cmd.status()?.success() {
        bail!("{what} failed");
    }
    Ok(())
}

/// Installs what is missing of the eBPF toolchain; quick when everything is there.
pub fn ensure_ebpf() -> Result<()> {
    if !ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        crate::terminal::say("installing the nightly toolchain with rust-src (eBPF programs)");
        run(
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]),
            "rustup toolchain install nightly",
        )?;
    }
    run(
        Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "clippy",
            "--toolchain",
            "nightly",
        ]),
        "rustup component add rust-src clippy",
    )?;
    if !ok(Command::new("bpf-linker").arg("--version")) {
        crate::terminal::say("installing bpf-linker 0.10.4 (2-3 minutes)");
        run(
            Command::new("cargo").args(["install", "bpf-linker@0.10.4", "--locked"]),
            "cargo install bpf-linker",
        )?;
    }
    Ok(())
}

/// The Debian packages the test tiers use, installed when missing (as `.ci/run` does), so
/// `cargo xtask test` alone works on a fresh machine:
/// nftables, iproute2, conntrack, procps: the netns tiers; containernetworking-plugins
/// (portmap, tuning, loopback chained after weir-cni; the cluster's containerd loads
/// loopback and portmap from it), iputils-ping; openssl (the API and cluster tiers'
/// certificates); podman, runc, busybox-static (podman as a CNI client; runc is also the
/// cluster's runtime; busybox is the agnhost image's shell and tools), curl (in the agnhost
/// image), debootstrap and debian-archive-keyring (weir's image base); qemu-system-x86,
/// xz-utils (the IPVS guest); iptables (the benchmark reference); util-linux (nsenter,
/// unshare: the cluster's nodes; iptables is also kube-proxy's in its iptables mode);
/// libc6-dev (the static pause program); netcat-openbsd, socat, bind9-dnsutils (the agnhost
/// image's nc, socat, dig and nslookup, as upstream's image has them), wget (its wget:
/// busybox-static's crashes).
pub const TEST_PACKAGES: [&str; 22] = [
    "nftables",
    "iproute2",
    "conntrack",
    "procps",
    "containernetworking-plugins",
    "iputils-ping",
    "openssl",
    "podman",
    "runc",
    "busybox-static",
    "curl",
    "debootstrap",
    "debian-archive-keyring",
    "qemu-system-x86",
    "xz-utils",
    "iptables",
    "util-linux",
    "libc6-dev",
    "netcat-openbsd",
    "socat",
    "bind9-dnsutils",
    "wget",
];

/// Installs what is missing of [`TEST_PACKAGES`].
pub fn ensure_test_packages() -> Result<()> {
    crate::image::apt_install(&TEST_PACKAGES)
}
