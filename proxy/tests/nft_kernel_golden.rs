//! Golden tests: YAML -> compute -> render -> plan, applied to the fake nftables and, in a
//! scratch network namespace, to the real kernel. Both dump the same table, which equals the
//! committed golden file (regenerate with `UPDATE_GOLDEN=1`), and re-planning against the
//! kernel's dump is empty. Then one endpoint goes away: only changed elements move.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use weir_proxy::dataplane::nft::diff::plan;
use weir_proxy::dataplane::nft::fake::FakeNft;
use weir_proxy::dataplane::nft::kernel::KernelNft;
use weir_proxy::dataplane::nft::{DumpedTable, Family, Table};
use weir_proxy::testing::{self, ScratchNetns};

fn render_fixture(yaml: &str) -> Table {
    render_family(yaml, Family::Ip)
}

fn render_family(yaml: &str, family: Family) -> Table {
    testing::rendered(
        yaml,
        &testing::model_config(),
        &testing::render_config(),
        family,
    )
}

fn fixture() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/basic.yaml"))
        .unwrap()
}

#[test]
fn fixture_renders_to_the_golden_table_in_the_fake() {
    let want = render_fixture(&fixture());
    let mut fake = FakeNft::default();
    fake.apply(&plan(&want, &DumpedTable::empty(Family::Ip)))
        .unwrap();
    let text = fake.dump(Family::Ip).unwrap().to_text();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/basic.nft");
    if std::env::var("UPDATE_GOLDEN").is_ok() {
        std::fs::write(&golden, &text).unwrap();
    }
    assert_eq!(text, std::fs::read_to_string(&golden).unwrap());
}

#[test]
fn kernel_dump_equals_fake_dump_and_replanning_is_empty() {
    let Some(ns) = ScratchNetns::new("golden", "a") else {
        return;
    };
    let nft = KernelNft::in_netns(ns.name());
    assert_eq!(nft.dump(Family::Ip).unwrap(), None);
    let want = render_fixture(&fixture());
    let p = plan(&want, &DumpedTable::empty(Family::Ip));
    let mut fake = FakeNft::default();
    fake.apply(&p).unwrap();
    nft.apply(&p)
        .unwrap_or_else(|e| panic!("{e}\nscript:\n{}", p.to_script()));
    let got = nft.dump(Family::Ip).unwrap().unwrap();
    assert_eq!(got.to_text(), fake.dump(Family::Ip).unwrap().to_text());
    assert!(plan(&want, &got).is_empty(), "{:?}", plan(&want, &got));

    // One endpoint removed: a handful of element changes in one transaction, same on both.
    let want2 =
        render_fixture(&fixture().replace("- {addresses: [10.244.2.10], nodeName: node2}\n", ""));
    let p2 = plan(&want2, &got);
    assert!(
        p2.element_changes() > 0 && p2.element_changes() <= 12,
        "{}",
        p2.to_script()
    );
    fake.apply(&p2).unwrap();
    nft.apply(&p2)
        .unwrap_or_else(|e| panic!("{e}\nscript:\n{}", p2.to_script()));
    let got2 = nft.dump(Family::Ip).unwrap().unwrap();
    assert_eq!(got2.to_text(), fake.dump(Family::Ip).unwrap().to_text());
    assert_eq!(got2.to_text(), want2.to_dump().to_text());
    assert!(plan(&want2, &got2).is_empty());
}

#[test]
fn ipv6_half_renders_to_its_golden_table_and_the_kernel_agrees() {
    let want = render_family(&fixture(), Family::Ip6);
    let p = plan(&want, &DumpedTable::empty(Family::Ip6));
    let mut fake = FakeNft::default();
    fake.apply(&p).unwrap();
    let text = fake.dump(Family::Ip6).unwrap().to_text();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/basic6.nft");
    if std::env::var("UPDATE_GOLDEN").is_ok() {
        std::fs::write(&golden, &text).unwrap();
    }
    assert_eq!(text, std::fs::read_to_string(&golden).unwrap());
    let Some(ns) = ScratchNetns::new("golden", "v6") else {
        return;
    };
    let nft = KernelNft::in_netns(ns.name());
    nft.apply(&p)
        .unwrap_or_else(|e| panic!("{e}\nscript:\n{}", p.to_script()));
    let got = nft.dump(Family::Ip6).unwrap().unwrap();
    assert_eq!(got.to_text(), text);
    assert!(plan(&want, &got).is_empty(), "{:?}", plan(&want, &got));
}

/// The full plan of the fixture with its plain maps' elements written through nfnetlink
/// instead of nft: the kernel holds the same table (both families); writing the same
/// elements again changes nothing, and an element of a map that does not exist is refused
/// naming the map.
#[test]
fn elements_written_through_netlink_dump_as_through_nft() {
    for (family, tag) in [(Family::Ip, "nl4"), (Family::Ip6, "nl6")] {
        let Some(ns) = ScratchNetns::new("golden", tag) else {
            return;
        };
        let nft = KernelNft::in_netns(ns.name());
        let want = render_family(&fixture(), family);
        let p = plan(&want, &DumpedTable::empty(family));
        let plain: Vec<String> = p.plain_maps().map(str::to_owned).collect();
        let (rest, elements) = p.split_elements(|m| plain.iter().any(|n| n == m));
        assert!(
            elements.element_changes() > 5,
            "{family}: {} elements through netlink",
            elements.element_changes()
        );
        nft.apply(&rest)
            .unwrap_or_else(|e| panic!("{e}\nscript:\n{}", rest.to_script()));
        nft.add_elements(&elements)
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        let got = nft.dump(family).unwrap().unwrap();
        assert_eq!(got.to_text(), want.to_dump().to_text(), "{family}");
        nft.add_elements(&elements)
            .unwrap_or_else(|e| panic!("{family}, again: {e}"));
        assert_eq!(nft.dump(family).unwrap().unwrap(), got, "{family}");

        let mut wrong = elements.clone();
        wrong.ops.truncate(1);
        if let weir_proxy::dataplane::nft::Op::AddElements { map, .. } = &mut wrong.ops[0] {
            *map = "no_such_map".into();
        }
        let e = nft.add_elements(&wrong).unwrap_err().to_string();
        assert!(
            e.contains("no_such_map") && e.contains("No such file"),
            "{e}"
        );
    }
}
