//! `cargo xtask image`: builds weir's container image from deploy/Containerfile with podman,
//! with no registry: the `debian:bookworm-slim` base is made locally with debootstrap from
//! Debian's mirror (cached under /var/cache/weir/image-base), storage is private to the run
//! (nothing touches the machine's podman store), and the image is smoke-tested: weir-proxy
//! removes its (absent) tables with only NET_ADMIN and weir-cni answers VERSION. Optionally
//! saves it as an archive for `kind load image-archive`.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `cargo xtask image` options.
#[derive(clap::Args)]
pub struct ImageArgs {
    /// Also write the image to this archive (for `kind load image-archive`).
    #[arg(long)]
    pub save: Option<PathBuf>,
}

const BASE_CACHE: &str = "/var/cache/weir/image-base/bookworm.tar";
const TAG: &str = "localhost/weir:dev";
/// podman's storage for weir's image builds.
const STORE: &str = "/var/cache/weir/image-store";
/// podman's run root for that storage.
const RUN_ROOT: &str = "/dev/shm/weir-image-store-run";

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the Debian packages of `pkgs` that are missing (apt-get update once if the
/// first try fails).
pub(crate) fn apt_install(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg")
                .args(["-s", p])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("==> installing {}", missing.join(" "));
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(&missing);
    if run(Command::new("apt-get").args(&args), "apt-get install").is_err() {
        run(Command::new("apt-get").arg("update"), "apt-get update")?;
        run(Command::new("apt-get").args(&args), "apt-get install")?;
    }
    Ok(())
}

/// A rootfs tarball of Debian bookworm (minbase), made once with debootstrap.
fn base_tarball() -> Result<PathBuf> {
    let tar = PathBuf::from(BASE_CACHE);
    if tar.exists() {
        return Ok(tar);
    }
    let dir = tar.parent().context("cache path")?;
    std::fs::create_dir_all(dir)?;
    let root = dir.join("rootfs.tmp");
    let _ = std::fs::remove_dir_all(&root);
    eprintln!("==> debootstrap --variant=minbase bookworm (the image's base, cached)");
    run(
        Command::new("debootstrap").args([
            "--variant=minbase",
            "bookworm",
            &root.display().to_string(),
            "http://deb.debian.org/debian",
        ]),
        "debootstrap",
    )?;
    let part = dir.join("bookworm.tar.part");
    run(
        Command::new("tar").args([
            "-C",
            &root.display().to_string(),
            "-cf",
            &part.display().to_string(),
            ".",
        ]),
        "tar",
    )?;
    std::fs::rename(&part, &tar)?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(tar)
}

/// Builds, smoke-tests and optionally saves the image.
pub fn image(args: ImageArgs, root: &Path) -> Result<()> {
    apt_install(&["podman", "runc", "debootstrap"])?;
    let base = base_tarball()?;
    eprintln!("==> cargo build --release -p weir-proxy -p weir-cni");
    run(
        Command::new("cargo").current_dir(root).args([
            "build",
            "--release",
            "-p",
            "weir-proxy",
            "-p",
            "weir-cni",
        ]),
        "cargo build --release",
    )?;
    // The image ships stripped binaries (weir-proxy as built carries its line tables: 130
    // MB against about 20 stripped), staged where deploy/Containerfile copies them from.
    let stage = root.join("target/image");
    std::fs::create_dir_all(&stage)?;
    for bin in ["weir-proxy", "weir-cni"] {
        run(
            Command::new("strip")
                .arg("-o")
                .arg(stage.join(bin))
                .arg(root.join("target/release").join(bin)),
            "strip",
        )?;
    }
    // Private to weir (never the machine's podman store) but kept between runs, so the
    // base and the apt-get layer are built once and a rebuild only copies the binaries.
    let store = PathBuf::from(STORE);
    std::fs::create_dir_all(&store)?;
    // Its run root must stay the same path (podman records it); tmpfs, so a reboot clears it.
    let run_root = PathBuf::from(RUN_ROOT);
    let podman = |extra: &[&str]| {
        let mut c = Command::new("podman");
        c.current_dir(root)
            .arg("--root")
            .arg(store.join("root"))
            .arg("--runroot")
            .arg(&run_root)
            .args(["--cgroup-manager=cgroupfs", "--events-backend=file"])
            .args(extra);
        c
    };
    let have_base = podman(&["image", "exists", "docker.io/library/debian:bookworm-slim"])
        .status()
        .is_ok_and(|s| s.success());
    if !have_base {
        eprintln!("==> podman import of the local base as docker.io/library/debian:bookworm-slim");
        run(
            &mut podman(&[
                "import",
                &base.display().to_string(),
                "docker.io/library/debian:bookworm-slim",
            ]),
            "podman import",
        )?;
    }
    eprintln!("==> podman build -f deploy/Containerfile -t {TAG}");
    // The build's RUN step reaches only Debian's mirror (apt-get), on the host's network.
    run(
        &mut podman(&[
            "build",
            "--network=host",
            "--pull=never",
            "-f",
            "deploy/Containerfile",
            "-t",
            TAG,
            ".",
        ]),
        "podman build",
    )?;
    // runc needs the rlimits it sets to be within the caller's hard limits.
    let nofile = run(Command::new("sh").args(["-c", "ulimit -Hn"]), "ulimit -Hn")?;
    let nofile = format!("nofile={0}:{0}", nofile.trim());
    let limits = ["--ulimit", &nofile, "--ulimit", "nproc=1024:1024"];
    eprintln!("==> smoke test: weir-proxy --cleanup with only NET_ADMIN, weir-cni VERSION");
    let mut cleanup = vec![
        "run",
        "--rm",
        "--net=none",
        "--cap-drop=ALL",
        "--cap-add=NET_ADMIN",
    ];
    cleanup.extend(limits);
    cleanup.extend([TAG, "--cleanup"]);
    run(&mut podman(&cleanup), "weir-proxy --cleanup in the image")?;
    let mut version = vec![
        "run",
        "--rm",
        "--net=none",
        "-e",
        "CNI_COMMAND=VERSION",
        "--entrypoint",
        "/usr/local/bin/weir-cni",
    ];
    version.extend(limits);
    version.push(TAG);
    let out = run(
        podman(&version).stdin(Stdio::null()),
        "weir-cni VERSION in the image",
    )?;
    if !out.contains("\"1.1.0\"") {
        bail!("weir-cni VERSION in the image answered {out:?}");
    }
    if let Some(path) = args.save {
        let _ = std::fs::remove_file(&path);
        run(
            &mut podman(&["save", "-o", &path.display().to_string(), TAG]),
            "podman save",
        )?;
        eprintln!("==> saved {TAG} to {}", path.display());
    }
    // Only dangling images (earlier builds' binaries) go; the base and layers stay cached.
    let _ = podman(&["image", "prune", "-f"])
        .stdout(Stdio::null())
        .status();
    eprintln!("==> image {TAG} built and smoke-tested");
    Ok(())
}
