//! PNG plots of a `bench compare` report, drawn with plotters' bitmap backend. Text uses
//! DejaVu Sans from Debian's fonts-dejavu-core, read at run time (never committed).

use crate::bench::report::{series, Report, Row};
use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The dataplanes drawn, with their colours and labels.
const LINES: [(&str, RGBColor, &str); 8] = [
    ("weir-nftables", RGBColor(0x1f, 0x77, 0xb4), "weir nftables"),
    ("weir-ebpf", RGBColor(0x2c, 0xa0, 0x2c), "weir eBPF"),
    ("weir-ipvs", RGBColor(0x94, 0x67, 0xbd), "weir IPVS"),
    (
        "shape-iptables",
        RGBColor(0xd6, 0x27, 0x28),
        "kube-proxy's iptables shape (generated here)",
    ),
    (
        "shape-nftables",
        RGBColor(0xff, 0x7f, 0x0e),
        "kube-proxy's nftables shape (generated here)",
    ),
    ("direct", RGBColor(0x55, 0x55, 0x55), "pod IP, no rules"),
    // `bench api`'s real kube-proxy (the release is in the caption).
    (
        "kube-proxy-iptables",
        RGBColor(0xd6, 0x27, 0x28),
        "kube-proxy iptables",
    ),
    (
        "kube-proxy-nftables",
        RGBColor(0xff, 0x7f, 0x0e),
        "kube-proxy nftables",
    ),
];

fn register_font() -> Result<()> {
    let bytes = std::fs::read(FONT)
        .with_context(|| format!("reading {FONT} (apt-get install fonts-dejavu-core)"))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{FONT} is not a font plotters can read"))
}

type Value = fn(&Row) -> Option<f64>;

/// One panel: a value per dataplane against the service count, log-log.
fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    report: &Report,
    title: &str,
    y_label: &str,
    modes: &[&str],
    value: Value,
) -> Result<()> {
    let lines: Vec<_> = LINES
        .iter()
        // A dataplane the report has no row of gets no legend entry.
        .filter(|(m, _, _)| modes.contains(m) && report.rows.iter().any(|r| r.mode == *m))
        .map(|(m, c, label)| {
            // A reference cut off at the time limit says so in its legend.
            let cut = report
                .rows
                .iter()
                .find(|r| r.mode == *m && r.status.starts_with('>'))
                .map(|r| format!(" ({} from {})", r.status, r.services))
                .unwrap_or_default();
            (series(report, m, value), *c, format!("{label}{cut}"))
        })
        .collect();
    let sizes = report.sizes();
    let (x0, x1) = (
        *sizes.first().unwrap_or(&1) as f64 / 1.4,
        *sizes.last().unwrap_or(&1) as f64 * 1.4,
    );
    let ys: Vec<f64> = lines
        .iter()
        .flat_map(|(p, _, _)| p.iter().map(|(_, y)| *y))
        .filter(|y| *y > 0.0)
        .collect();
    let y0 = ys.iter().copied().fold(f64::INFINITY, f64::min);
    let y1 = ys.iter().copied().fold(0.0, f64::max);
    let (y0, y1) = if ys.is_empty() {
        (0.1, 10.0)
    } else {
        (y0 / 2.0, y1 * 2.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("services (× 10 endpoints)")
        .y_desc(y_label)
        .x_labels(8)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            if *y >= 100.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.3}")
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_owned()
            }
        })
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (points, color, label) in lines {
        let style = ShapeStyle::from(color).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(|e| anyhow!("{e}"))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, ShapeStyle::from(color).filled())),
            )
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn figure(path: &Path, report: &Report, panels: &[(&str, &str, &[&str], Value)]) -> Result<()> {
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (top, body) = root.split_vertically(30);
    top.draw_text(
        &report.caption(),
        &("sans-serif", 15).into_text_style(&top),
        (12, 8),
    )
    .map_err(|e| anyhow!("{e}"))?;
    let areas = body.split_evenly((2, 2));
    for (area, (title, y, modes, value)) in areas.iter().zip(panels) {
        panel(area, report, title, y, modes, *value)?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

const CONTROL: &[&str] = &[
    "weir-nftables",
    "weir-ebpf",
    "weir-ipvs",
    "shape-iptables",
    "shape-nftables",
];
const DATA: &[&str] = &[
    "weir-nftables",
    "weir-ebpf",
    "weir-ipvs",
    "shape-iptables",
    "shape-nftables",
    "direct",
];
const NODEPORT: &[&str] = &[
    "weir-nftables",
    "weir-ebpf",
    "weir-ipvs",
    "shape-iptables",
    "shape-nftables",
];

/// Writes `<prefix>control-plane.png` and `<prefix>data-path.png` into `out`.
pub fn plots(report: &Report, out: &Path, prefix: &str) -> Result<()> {
    register_font()?;
    figure(
        &out.join(format!("{prefix}control-plane.png")),
        report,
        &[
            ("Full sync", "seconds", CONTROL, |r| r.full_sync_s),
            ("One endpoint removed", "milliseconds", CONTROL, |r| {
                r.change_ms
            }),
            (
                "Peak RSS of the process that programs the rules",
                "MiB",
                CONTROL,
                |r| r.peak_rss_mib,
            ),
            (
                "CPU time up to the first full sync done",
                "seconds",
                CONTROL,
                |r| r.cpu_s,
            ),
        ],
    )?;
    figure(
        &out.join(format!("{prefix}data-path.png")),
        report,
        &[
            (
                "First packet: TCP connect to the last-added ClusterIP, p50",
                "µs",
                DATA,
                |r| r.clusterip.as_ref().map(|t| t.connect_p50_us),
            ),
            (
                "ClusterIP: connect + request + response, p50",
                "µs",
                DATA,
                |r| r.clusterip.as_ref().map(|t| t.p50_us),
            ),
            ("ClusterIP: requests/s (4 clients)", "req/s", DATA, |r| {
                r.clusterip.as_ref().map(|t| t.rps)
            }),
            (
                "NodePort from outside: connect + request, p50",
                "µs",
                NODEPORT,
                |r| r.nodeport.as_ref().map(|t| t.p50_us),
            ),
        ],
    )?;
    Ok(())
}

const API: &[&str] = &crate::bench::api::PROGRAMS;

/// Writes `api-control-plane.png` into `out`: a `bench api` run of the real programs,
/// drawn through the same panels (the rows carry `bench api`'s values: time to live,
/// change p99, peak RSS, CPU to live).
pub fn api_plots(report: &Report, out: &Path) -> Result<()> {
    register_font()?;
    figure(
        &out.join("api-control-plane.png"),
        report,
        &[
            (
                "Start to the last Service answering (objects already in the API server)",
                "seconds",
                API,
                |r| r.full_sync_s,
            ),
            (
                "One endpoint change: PATCH to traffic following, p99",
                "milliseconds",
                API,
                |r| r.change_ms,
            ),
            ("Peak RSS", "MiB", API, |r| r.peak_rss_mib),
            ("CPU time up to live", "seconds", API, |r| r.cpu_s),
        ],
    )
}
