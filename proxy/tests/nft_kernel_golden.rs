//! The same plan applied to the fake and to the real kernel (in a scratch network
//! namespace) dumps the same table; re-planning against the kernel's dump is empty.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;
use weir_proxy::dataplane::nft::kernel::KernelNft;
use weir_proxy::dataplane::nft::render::{desired_table, plan, RenderConfig};
use weir_proxy::dataplane::nft::{DumpedTable, Family};
use weir_proxy::model::{
    DesiredState, Endpoint, Protocol, ServiceInfo, ServicePortName, ServicePortState,
};

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Option<Netns> {
        let name = format!("weir-golden-{}-{tag}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "this test needs root and network namespaces (CI=true forbids skipping)"
            );
            eprintln!("skipped: needs root and network namespaces");
            return None;
        }
        Some(Netns(name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn svc(
    name: &str,
    ip: &str,
    port: u16,
    proto: Protocol,
    np: Option<u16>,
    eps: &[&str],
) -> (ServicePortName, ServicePortState) {
    let n = ServicePortName {
        namespace: "demo".into(),
        name: name.into(),
        port: String::new(),
        protocol: proto,
    };
    let endpoints = eps
        .iter()
        .map(|e| Endpoint {
            ip: e.parse::<IpAddr>().unwrap(),
            port: 8080,
            is_local: true,
        })
        .collect();
    let info = ServiceInfo {
        name: n.clone(),
        cluster_ips: vec![ip.parse().unwrap()],
        port,
        node_port: np,
    };
    (n, ServicePortState { info, endpoints })
}

fn state(eps_web: &[&str]) -> DesiredState {
    DesiredState {
        services: BTreeMap::from([
            svc("web", "10.96.0.10", 80, Protocol::Tcp, Some(30080), eps_web),
            svc(
                "dns",
                "10.96.0.53",
                53,
                Protocol::Udp,
                None,
                &["10.244.1.11", "10.244.1.12"],
            ),
            svc(
                "sctp",
                "10.96.0.60",
                9000,
                Protocol::Sctp,
                Some(30900),
                &["10.244.1.13"],
            ),
            svc("empty", "10.96.0.20", 80, Protocol::Tcp, Some(30081), &[]),
        ]),
        node_ips: vec!["192.168.77.10".parse().unwrap()],
    }
}

fn cfg() -> RenderConfig {
    RenderConfig {
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        masquerade_all: false,
    }
}

#[test]
fn kernel_dump_equals_rendered_table_and_replanning_is_empty() {
    let Some(ns) = Netns::new("a") else { return };
    let nft = KernelNft::in_netns(&ns.0);
    assert_eq!(nft.dump(Family::Ip).unwrap(), None);
    let want = desired_table(
        &state(&["10.244.1.11", "10.244.1.12", "10.244.1.13"]),
        &cfg(),
        Family::Ip,
    );
    let p = plan(&want, &DumpedTable::empty(Family::Ip));
    nft.apply(&p)
        .unwrap_or_else(|e| panic!("{e}\nscript:\n{}", p.to_script()));
    let got = nft.dump(Family::Ip).unwrap().unwrap();
    assert_eq!(got.to_text(), want.to_dump().to_text());
    assert!(plan(&want, &got).is_empty(), "{:?}", plan(&want, &got));

    // One endpoint removed: only the changed elements move, in one transaction.
    let want2 = desired_table(&state(&["10.244.1.11", "10.244.1.12"]), &cfg(), Family::Ip);
    let p2 = plan(&want2, &got);
    assert!(p2.element_changes() <= 8, "{}", p2.to_script());
    nft.apply(&p2)
        .unwrap_or_else(|e| panic!("{e}\nscript:\n{}", p2.to_script()));
    let got2 = nft.dump(Family::Ip).unwrap().unwrap();
    assert_eq!(got2.to_text(), want2.to_dump().to_text());
    assert!(plan(&want2, &got2).is_empty());
}
