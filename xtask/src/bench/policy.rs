//! `cargo xtask bench policy`: the NetworkPolicy table at scale. Generates a synthetic
//! cluster (`weir_proxy::policy::synth`), times `PolicySet::build` and `render`, counts the
//! nftables objects, loads the IPv4 table into the real kernel in a scratch namespace, then
//! relabels one local pod and times rebuild + render + diff and the element-only apply.

use anyhow::{bail, Context, Result};
use std::time::Instant;
use weir_e2e::Netns;
use weir_proxy::dataplane::nft::diff::plan;
use weir_proxy::dataplane::nft::kernel::KernelNft;
use weir_proxy::dataplane::nft::plan::Op;
use weir_proxy::dataplane::nft::policy::{render, POLICY_TABLE};
use weir_proxy::dataplane::nft::{DumpedTable, Family, Table};
use weir_proxy::policy::synth::{generate, relabel, Sizes};
use weir_proxy::policy::PolicySet;

/// Options of `bench policy`.
#[derive(clap::Args, Debug)]
pub struct PolicyArgs {
    /// Pods in the cluster.
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// NetworkPolicies.
    #[arg(long, default_value_t = 500)]
    policies: usize,
    /// Namespaces.
    #[arg(long, default_value_t = 20)]
    namespaces: usize,
    /// Pods on the measured node.
    #[arg(long, default_value_t = 30)]
    local: usize,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn counts(t: &Table) -> (usize, usize, usize, usize) {
    let rules = t.chains.values().map(|c| c.rules.len()).sum();
    let elements = t.maps.values().map(|m| m.elements.len()).sum();
    (t.chains.len(), rules, t.maps.len(), elements)
}

/// Runs the benchmark and prints its numbers.
pub fn policy(a: PolicyArgs) -> Result<()> {
    let sizes = Sizes {
        pods: a.pods,
        policies: a.policies,
        namespaces: a.namespaces,
        local: a.local,
    };
    let t = Instant::now();
    let mut cluster = generate(sizes)?;
    println!(
        "generated {} pods in {} namespaces, {} policies, {} local pods ({:.1} ms)",
        cluster.pods.len(),
        cluster.namespaces.len(),
        cluster.policies.len(),
        a.local,
        ms(t)
    );
    let t = Instant::now();
    let (set, errors) = PolicySet::build(&cluster.policies, &cluster.pods, &cluster.namespaces);
    println!("PolicySet::build: {:.1} ms", ms(t));
    if !errors.is_empty() {
        bail!("synthetic policies rejected: {errors:?}");
    }
    let family = Family::Ip;
    let t = Instant::now();
    let before = render(&set, Some(&cluster.local), family);
    println!("render (ip): {:.1} ms", ms(t));
    let (chains, rules, sets, elements) = counts(&before);
    println!(
        "nft objects: {} ({chains} chains, {rules} rules, {sets} sets, {elements} elements)",
        before.object_count()
    );
    let t6 = Instant::now();
    let v6 = render(&set, Some(&cluster.local), Family::Ip6);
    println!(
        "render (ip6): {:.1} ms, {} objects",
        ms(t6),
        v6.object_count()
    );

    let ns = Netns::new("bench-policy")?;
    let nft = KernelNft::in_netns(ns.name()).for_table(POLICY_TABLE);
    let full = plan(&before, &DumpedTable::empty(family));
    let t = Instant::now();
    nft.apply(&full).context("full apply")?;
    println!(
        "full apply to the kernel: {:.1} ms ({} ops)",
        ms(t),
        full.ops.len()
    );
    let t = Instant::now();
    let dumped = nft.dump(family)?.context("table missing after apply")?;
    println!("kernel dump + parse: {:.1} ms", ms(t));
    if dumped.to_text_named(POLICY_TABLE) != before.to_dump().to_text_named(POLICY_TABLE) {
        bail!("the kernel's dump differs from the rendered table");
    }
    println!("kernel dump equals the rendered table");

    // One local pod changes its app label.
    let step = (a.pods / a.local.max(1)).max(1);
    let index = step * (a.local / 2);
    relabel(&mut cluster, index, a.namespaces)?;
    let t = Instant::now();
    let (set2, _) = PolicySet::build(&cluster.policies, &cluster.pods, &cluster.namespaces);
    let build_ms = ms(t);
    let t = Instant::now();
    let after = render(&set2, Some(&cluster.local), family);
    let render_ms = ms(t);
    let t = Instant::now();
    let p = plan(&after, &before.to_dump());
    let diff_ms = ms(t);
    let structural = p
        .ops
        .iter()
        .filter(|op| {
            !matches!(
                op,
                Op::AddTable | Op::AddElements { .. } | Op::DeleteElements { .. }
            )
        })
        .count();
    println!(
        "label change of pod-{index}: rebuild {build_ms:.1} ms + render {render_ms:.1} ms + diff {diff_ms:.1} ms = {:.1} ms; plan: {} element changes, {structural} other ops",
        build_ms + render_ms + diff_ms,
        p.element_changes()
    );
    let t = Instant::now();
    nft.apply(&p).context("label change apply")?;
    println!("label change apply to the kernel: {:.1} ms", ms(t));
    let dumped = nft.dump(family)?.context("table missing")?;
    if dumped.to_text_named(POLICY_TABLE) != after.to_dump().to_text_named(POLICY_TABLE) {
        bail!("after the label change the kernel's dump differs from the rendered table");
    }
    println!("kernel dump equals the rendered table after the change");
    Ok(())
}
