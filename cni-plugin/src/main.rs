//! weir-cni: the CNI plugin binary. Reads `CNI_*` from the environment and the
//! configuration from stdin, prints the result or the error on stdout.

use anyhow::Context;
use std::io::{IsTerminal, Read, Write};

fn main() -> anyhow::Result<()> {
    let mut stdin = std::io::stdin();
    let input = if stdin.is_terminal() {
        eprintln!(
            "weir-cni: a CNI plugin, run by container runtimes (CNI_COMMAND=ADD|DEL|CHECK|GC|STATUS|VERSION, configuration on stdin); CNI protocol versions supported: {}",
            weir_cni::spec::version::supported_list()
        );
        Ok(Vec::new())
    } else {
        let mut buf = Vec::new();
        stdin.read_to_end(&mut buf).map(|_| buf)
    };
    let out = weir_cni::cmd::run(|k| std::env::var(k).ok(), input);
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.stdout.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing the result to stdout")?;
    drop(stdout);
    std::process::exit(out.exit_code)
}
