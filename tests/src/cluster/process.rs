//! The cluster's long-running processes: started detached (own process group, output to a
//! log file) so they outlive `cargo xtask cluster up`, each with a pid file that `down`
//! reads to stop exactly the processes it started.

use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A started process: its name (the pid file's and the log's), pid and log.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// e.g. `kube-apiserver`, `node1-kubelet`.
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

/// The directory of pid files under the cluster's state directory.
pub fn pid_dir(state: &Path) -> PathBuf {
    state.join("pids")
}

/// The log of the process `name`.
pub fn log_path(state: &Path, name: &str) -> PathBuf {
    state.join("logs").join(format!("{name}.log"))
}

/// Starts `cmd` detached as `name`: stdin from /dev/null, output appended to its log, its
/// own process group (a terminal's Ctrl-C does not reach it), its pid recorded.
pub fn spawn(state: &Path, name: &str, cmd: &mut Command) -> Result<Daemon> {
    let log = log_path(state, name);
    fs::create_dir_all(log.parent().context("log dir")?)?;
    fs::create_dir_all(pid_dir(state))?;
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
    let pid = child.id();
    // Not waited for: it outlives us; `down` stops it by pid.
    std::mem::forget(child);
    // The start time beside the pid: a pid file outliving a reboot never names a stranger.
    let started = start_time(pid).unwrap_or_default();
    fs::write(
        pid_dir(state).join(format!("{name}.pid")),
        format!("{pid} {started}\n"),
    )?;
    Ok(Daemon {
        name: name.to_owned(),
        pid,
        log,
    })
}

/// The start time of `pid` (field 22 of /proc/PID/stat, clock ticks since boot).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    // After the command: state is field 3, so start time (22) is the 20th word.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The pid a pid file names, if that process still runs (same start time).
pub fn read_pid_file(path: &Path) -> Option<u32> {
    let text = fs::read_to_string(path).ok()?;
    let mut words = text.split_whitespace();
    let pid: u32 = words.next()?.parse().ok()?;
    let started: Option<u64> = words.next().and_then(|w| w.parse().ok());
    (alive(pid) && (started.is_none() || started == start_time(pid))).then_some(pid)
}

/// Whether `pid` is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state is the field after the parenthesised command name.
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    crate::k8s::tail(path, n)
}

/// Fails with the log tail of `d` if it has exited.
pub fn check_running(d: &Daemon) -> Result<()> {
    if alive(d.pid) {
        return Ok(());
    }
    bail!(
        "{} (pid {}) exited; {} ends:\n{}",
        d.name,
        d.pid,
        d.log.display(),
        tail(&d.log, 40)
    )
}

/// Stops every process with a pid file under `state` (SIGTERM, then SIGKILL after
/// `grace`), in reverse start order, and removes the pid files. A pid whose process is
/// gone is skipped.
pub fn stop_all(state: &Path, grace: Duration) -> Result<Vec<String>> {
    let dir = pid_dir(state);
    let Ok(rd) = fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut entries: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .map(|e| {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, e.path())
        })
        .collect();
    entries.sort();
    entries.reverse();
    let mut stopped = Vec::new();
    let mut pids = Vec::new();
    for (_, path) in &entries {
        if let Some(pid) = read_pid_file(path) {
            signal(pid, "TERM");
            pids.push(pid);
            stopped.push(
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
    }
    let deadline = Instant::now() + grace;
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in pids.iter().filter(|p| alive(**p)) {
        signal(*p, "KILL");
    }
    for (_, path) in entries {
        let _ = fs::remove_file(path);
    }
    Ok(stopped)
}

/// Sends a signal to one process (by pid, with kill(1)).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Runs a command to completion; its stdout, or its stderr in the error.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?}: {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
