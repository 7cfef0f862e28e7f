//! The NetworkPolicy table on the real kernel: a rendered scenario (named ports, port
//! ranges, ipBlocks with except, both families) applied in a scratch network namespace
//! dumps exactly what the fake dumps; then one pod's labels change, the diff plan (set
//! elements only) is applied, and the dumps agree again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{json, Value};
use weir_proxy::dataplane::nft::diff::plan;
use weir_proxy::dataplane::nft::fake::FakeNft;
use weir_proxy::dataplane::nft::kernel::KernelNft;
use weir_proxy::dataplane::nft::plan::Op;
use weir_proxy::dataplane::nft::policy::{render, POLICY_TABLE};
use weir_proxy::dataplane::nft::{DumpedTable, Family};
use weir_proxy::policy::PolicySet;
use weir_proxy::testing::ScratchNetns;

fn pod(ns: &str, name: &str, labels: Value, n: u8) -> Pod {
    let ports = json!([{"name": "http", "containerPort": 8080},
                       {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                       {"name": "sig", "containerPort": 9000, "protocol": "SCTP"}]);
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "ports": ports}]},
        "status": {"podIP": format!("10.244.1.{n}"),
                   "podIPs": [{"ip": format!("10.244.1.{n}")}, {"ip": format!("fd00:10:244:1::{n}")}]},
    }))
    .unwrap()
}

fn pods(db_app: &str) -> Vec<Pod> {
    vec![
        pod("shop", "web", json!({"app": "web"}), 10),
        pod("shop", "db", json!({"app": db_app}), 11),
        pod("ops", "mon", json!({"app": "prometheus"}), 12),
        pod("ops", "dns", json!({"app": "dns"}), 13),
    ]
}

fn namespaces() -> Vec<Namespace> {
    ["shop", "ops"]
        .iter()
        .map(|n| {
            serde_json::from_value(json!({"metadata": {"name": n, "labels": {"team": n}}})).unwrap()
        })
        .collect()
}

fn policies() -> Vec<NetworkPolicy> {
    let p = |ns: &str, name: &str, spec: Value| -> NetworkPolicy {
        serde_json::from_value(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}))
            .unwrap()
    };
    vec![
        p(
            "shop",
            "db-from-web",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}},
                                      {"namespaceSelector": {"matchLabels": {"team": "ops"}}}],
                             "ports": [{"port": 5432, "endPort": 5439}, {"port": "http"}]}]}),
        ),
        p(
            "shop",
            "web-ingress",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25", "198.51.100.7/32"]}},
                                      {"ipBlock": {"cidr": "2001:db8::/32", "except": ["2001:db8:1::/48"]}}],
                             "ports": [{"port": 80}, {"port": 443}, {"protocol": "UDP"}]},
                            {"from": [{"namespaceSelector": {}}]}]}),
        ),
        p(
            "shop",
            "egress",
            json!({"podSelector": {}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "ops"}},
                                    "podSelector": {"matchLabels": {"app": "dns"}}}],
                            "ports": [{"port": "dns", "protocol": "UDP"}, {"port": 53}]},
                           {"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]},
                           {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                            "ports": [{"port": "sig", "protocol": "SCTP"}, {"port": 1000, "endPort": 2000, "protocol": "SCTP"}]}]}),
        ),
        p(
            "ops",
            "broken",
            json!({"podSelector": {"matchLabels": {"app": "dns"}},
                "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
        ),
    ]
}

#[test]
fn policy_table_in_the_kernel_dumps_like_the_fake_before_and_after_a_label_change() {
    let Some(ns) = ScratchNetns::new("polgolden", "p") else {
        return;
    };
    let nft = KernelNft::in_netns(ns.name()).for_table(POLICY_TABLE);
    let (set, errors) = PolicySet::build(&policies(), &pods("db"), &namespaces());
    assert_eq!(errors.len(), 1, "only the broken policy: {errors:?}");
    let (after, _) = PolicySet::build(&policies(), &pods("web"), &namespaces());
    for family in [Family::Ip, Family::Ip6] {
        assert_eq!(nft.dump(family).unwrap(), None);
        let want = render(&set, None, family);
        let p = plan(&want, &DumpedTable::empty(family));
        let mut fake = FakeNft::default();
        fake.apply(&p).unwrap();
        nft.apply(&p)
            .unwrap_or_else(|e| panic!("{e}\nscript:\n{}", p.to_script_in(POLICY_TABLE)));
        let got = nft.dump(family).unwrap().unwrap();
        let text = fake.dump(family).unwrap().to_text_named(POLICY_TABLE);
        assert_eq!(got.to_text_named(POLICY_TABLE), text);
        assert!(text.contains(" . 5432-5439"), "{text}");
        assert!(plan(&want, &got).is_empty(), "{:?}", plan(&want, &got));

        // shop/db becomes an `app: web`: only set elements change.
        let want2 = render(&after, None, family);
        let p2 = plan(&want2, &got);
        assert!(p2.element_changes() > 0);
        assert!(
            p2.ops.iter().all(|op| matches!(
                op,
                Op::AddTable | Op::AddElements { .. } | Op::DeleteElements { .. }
            )),
            "{}",
            p2.to_script_in(POLICY_TABLE)
        );
        fake.apply(&p2).unwrap();
        nft.apply(&p2)
            .unwrap_or_else(|e| panic!("{e}\nscript:\n{}", p2.to_script_in(POLICY_TABLE)));
        let got2 = nft.dump(family).unwrap().unwrap();
        assert_eq!(
            got2.to_text_named(POLICY_TABLE),
            fake.dump(family).unwrap().to_text_named(POLICY_TABLE)
        );
        assert_eq!(
            got2.to_text_named(POLICY_TABLE),
            want2.to_dump().to_text_named(POLICY_TABLE)
        );
        assert!(plan(&want2, &got2).is_empty());
    }
    // weir's own table is untouched by all this.
    assert_eq!(
        KernelNft::in_netns(ns.name()).dump(Family::Ip).unwrap(),
        None
    );
}
