//! Builds weir's eBPF programs (`ebpf/weir-ebpf`) for the BPF target with aya-build (a
//! nightly toolchain with `rust-src`, and `bpf-linker`); `src/dataplane/ebpf` embeds the
//! object with `include_bytes_aligned!`.
//!
//! Without that toolchain (a fresh machine before `cargo xtask test` or `demo` installed
//! it) the crate is built with an empty object and a warning, so xtask itself can build
//! and install the toolchain; `--proxy-mode ebpf` then refuses to start. Under `CI=true` a
//! missing toolchain is an error.

use std::path::PathBuf;
use std::process::Command;

/// Why the eBPF toolchain cannot be used, if it cannot.
fn missing_toolchain() -> Option<String> {
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else {
        return Some("no nightly toolchain (rustup toolchain install nightly)".into());
    };
    if !sysroot.join("lib/rustlib/src/rust/library").is_dir() {
        return Some(
            "nightly has no rust-src (rustup component add rust-src --toolchain nightly)".into(),
        );
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|o| o.status.success()) {
        return Some("no bpf-linker (cargo install bpf-linker@0.10.4 --locked)".into());
    }
    None
}

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf = manifest.join("../ebpf/weir-ebpf");
    let common = manifest.join("../ebpf/weir-ebpf-common");
    println!("cargo:rerun-if-changed={}", common.display());
    println!("cargo:rerun-if-env-changed=CI");
    // Installing bpf-linker later makes this script run again (a missing file always does).
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_default();
    println!(
        "cargo:rerun-if-changed={}",
        cargo_home.join("bin/bpf-linker").display()
    );
    if let Some(why) = missing_toolchain() {
        if std::env::var("CI").as_deref() == Ok("true") {
            anyhow::bail!("the eBPF toolchain is missing: {why}");
        }
        println!(
            "cargo:warning=building without eBPF programs: {why}; `cargo xtask test` and \
             `cargo xtask demo` install it; --proxy-mode ebpf refuses to start until then"
        );
        let out = PathBuf::from(std::env::var("OUT_DIR")?);
        std::fs::write(out.join("weir-ebpf"), [])?;
        return Ok(());
    }
    let root_dir = ebpf.to_string_lossy().into_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "weir-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
