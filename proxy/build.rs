//! Builds weir's eBPF programs (`ebpf/weir-ebpf`) for the BPF target with aya-build (a
//! nightly toolchain with `rust-src`, and `bpf-linker`); `src/dataplane/ebpf` embeds the
//! object with `include_bytes_aligned!`.

fn main() -> anyhow::Result<()> {
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf = manifest.join("../ebpf/weir-ebpf");
    let common = manifest.join("../ebpf/weir-ebpf-common");
    println!("cargo:rerun-if-changed={}", common.display());
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
