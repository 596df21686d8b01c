//! The benchmark's outputs: `bench.json` (everything measured), `bench.md` (the tables and the
//! targets, met or missed by how much) and PNG plots of rate and p99 latency against the number
//! of Services, per path and dataplane, drawn with plotters.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::prelude::*;
use serde_json::{Value, json};

/// DejaVu Sans from Debian's fonts-dejavu-core (scripts/install-deps.sh installs it): plotters'
/// `ab_glyph` backend needs a font file and does not look for system fonts.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The plots: file, which load, which figure, axis label.
const PLOTS: [(&str, &str, &str, &str); 4] = [
    (
        "rate_short.png",
        "short",
        "rate",
        "short connections per second",
    ),
    (
        "p99_short.png",
        "short",
        "p99_us",
        "short connection p99 latency (us)",
    ),
    (
        "rate_keepalive.png",
        "keepalive",
        "rate",
        "kept-alive requests per second",
    ),
    (
        "p99_keepalive.png",
        "keepalive",
        "p99_us",
        "kept-alive request p99 latency (us)",
    ),
];

pub fn write_all(out: &Path, results: &Value) -> Result<()> {
    std::fs::write(
        out.join("bench.json"),
        serde_json::to_string_pretty(results)? + "\n",
    )?;
    std::fs::write(out.join("bench.md"), markdown(results))?;
    plots(out, results)
}

fn rows(results: &Value) -> Vec<&Value> {
    results["rows"]
        .as_array()
        .map(|r| r.iter().collect())
        .unwrap_or_default()
}

fn row<'a>(results: &'a Value, n: u64, mode: &str) -> Option<&'a Value> {
    rows(results)
        .into_iter()
        .find(|r| r["services"].as_u64() == Some(n) && r["mode"] == mode)
}

/// The row's "not programmed within the limit" note, for a cell the agents did not finish.
fn not_programmed(r: &Value) -> Option<String> {
    r["programming_timeout_s"]
        .as_f64()
        .map(|limit| format!("not programmed within {limit:.0} s (timeout; no traffic measured)"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The failures of some loads, with their kinds: `0`, or `12 (timeout 12)`.
fn failure_kinds(loads: &[&Value]) -> String {
    let mut kinds = std::collections::BTreeMap::<String, u64>::new();
    for load in loads {
        for (kind, n) in load["failures"].as_object().into_iter().flatten() {
            *kinds.entry(kind.clone()).or_default() += n.as_u64().unwrap_or(0);
        }
    }
    let total: u64 = kinds.values().sum();
    if total == 0 {
        return "0".into();
    }
    let detail: Vec<String> = kinds
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    format!("{total} ({})", detail.join(", "))
}

fn failures(load: &Value) -> u64 {
    load["failures"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

/// One path's figures from its rounds (the load generator's reports): rate, p50, p90 and p99 are
/// the medians over the rounds, requests, seconds and failures (by kind) and answers per backend
/// the sums, max the maximum; `round_rates` lists each round's rate and `rate_spread` is
/// (max - min) / median of those.
pub fn combine_rounds(rounds: &[Value]) -> Value {
    let median = |field: &str| {
        let v: Vec<f64> = rounds.iter().filter_map(|r| r[field].as_f64()).collect();
        percentile(&v, 0.5)
    };
    let sum = |field: &str| rounds.iter().filter_map(|r| r[field].as_f64()).sum::<f64>();
    let mut failures = serde_json::Map::new();
    let mut backends = serde_json::Map::new();
    for r in rounds {
        for (into, field) in [(&mut failures, "failures"), (&mut backends, "backends")] {
            for (k, v) in r[field].as_object().into_iter().flatten() {
                let total =
                    into.get(k).and_then(Value::as_u64).unwrap_or(0) + v.as_u64().unwrap_or(0);
                into.insert(k.clone(), json!(total));
            }
        }
    }
    let rates: Vec<f64> = rounds.iter().filter_map(|r| r["rate"].as_f64()).collect();
    let spread = (rates.iter().copied().fold(f64::NAN, f64::max)
        - rates.iter().copied().fold(f64::NAN, f64::min))
        / percentile(&rates, 0.5);
    json!({
        "mode": rounds.first().map_or(Value::Null, |r| r["mode"].clone()),
        "target": rounds.first().map_or(Value::Null, |r| r["target"].clone()),
        "connections": rounds.first().map_or(Value::Null, |r| r["connections"].clone()),
        "rounds": rounds.len(),
        "seconds": sum("seconds"),
        "requests": sum("requests") as u64,
        "failures": failures,
        "rate": median("rate"),
        "round_rates": rates,
        "rate_spread": if spread.is_finite() { json!(spread) } else { Value::Null },
        "p50_us": median("p50_us"),
        "p90_us": median("p90_us"),
        "p99_us": median("p99_us"),
        "max_us": rounds.iter().filter_map(|r| r["max_us"].as_f64()).fold(0.0, f64::max),
        "backends": backends,
    })
}

/// Nearest-rank percentile of a small sample.
pub fn percentile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn changes(r: &Value) -> Vec<f64> {
    r["endpoint_change_ms"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

fn mib(bytes: f64) -> String {
    if bytes.is_nan() {
        "-".into()
    } else {
        format!("{:.1}", bytes / 1024.0 / 1024.0)
    }
}

pub fn markdown(results: &Value) -> String {
    let mut md = String::new();
    let m = &results["machine"];
    let _ = writeln!(
        md,
        "Run of {} ({}), {} CPUs ({}), kernel {}, {} build; load average {} before, {} after \
         (other developers' builds and tests share the machine: figures are noisy). \
         Short connections: {} rounds of {} s per path, the paths interleaved, medians of the \
         rounds; kept-alive requests: {} s per load; {} connections; iptables backend {}; \
         backend srv-a on node-2, the client pod on node-1, the external client through \
         node-1.\n",
        results["date"].as_str().unwrap_or("?"),
        if results["quick"] == true {
            "margay-lab bench --quick"
        } else {
            "margay-lab bench"
        },
        m["cpus"],
        m["cpu"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["build"].as_str().unwrap_or("?"),
        m["loadavg_before"].as_str().unwrap_or("?"),
        m["loadavg_after"].as_str().unwrap_or("?"),
        results["plan"]["short_rounds"],
        results["plan"]["short_round_seconds"],
        results["plan"]["load_seconds"],
        results["plan"]["connections"],
        results["plan"]["iptables_backend"].as_str().unwrap_or("?"),
    );
    md.push_str("### Pod -> pod on another node: by pod IP and through a ClusterIP\n\n");
    md.push_str(
        "| Services | dataplane | short: pod IP /s | short: ClusterIP /s | ratio | ClusterIP p50 / p99 us | kept-alive: pod IP /s | ClusterIP /s | ratio | ClusterIP p50 / p99 us | failures |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows(results) {
        if let Some(note) = not_programmed(r) {
            let _ = writeln!(
                md,
                "| {} | {} | {note} | | | | | | | | |",
                r["services"],
                r["mode"].as_str().unwrap_or("?")
            );
            continue;
        }
        let l = &r["load"];
        let (ps, cs, pk, ck) = (
            &l["pod_ip_short"],
            &l["cluster_ip_short"],
            &l["pod_ip_keepalive"],
            &l["cluster_ip_keepalive"],
        );
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.0} / {:.0} | {:.0} | {:.0} | {:.2} | {:.0} / {:.0} | {} |",
            r["services"],
            r["mode"].as_str().unwrap_or("?"),
            f(&ps["rate"]),
            f(&cs["rate"]),
            f(&cs["rate"]) / f(&ps["rate"]),
            f(&cs["p50_us"]),
            f(&cs["p99_us"]),
            f(&pk["rate"]),
            f(&ck["rate"]),
            f(&ck["rate"]) / f(&pk["rate"]),
            f(&ck["p50_us"]),
            f(&ck["p99_us"]),
            failure_kinds(&[ps, cs, pk, ck]),
        );
    }
    md.push_str("\n### External client (203.0.113.10) -> node-1 -> backend on node-2, short connections\n\n");
    md.push_str("| Services | dataplane | NodePort /s | p50 / p99 us | LoadBalancer IP /s | p50 / p99 us | failures |\n|---:|---|---:|---:|---:|---:|---:|\n");
    for r in rows(results) {
        if let Some(note) = not_programmed(r) {
            let _ = writeln!(
                md,
                "| {} | {} | {note} | | | | |",
                r["services"],
                r["mode"].as_str().unwrap_or("?")
            );
            continue;
        }
        let (np, lb) = (&r["load"]["nodeport_short"], &r["load"]["lb_short"]);
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} / {:.0} | {:.0} | {:.0} / {:.0} | {} |",
            r["services"],
            r["mode"].as_str().unwrap_or("?"),
            f(&np["rate"]),
            f(&np["p50_us"]),
            f(&np["p99_us"]),
            f(&lb["rate"]),
            f(&lb["p50_us"]),
            f(&lb["p99_us"]),
            failure_kinds(&[np, lb]),
        );
    }
    md.push_str("\n### Programming, endpoint changes, memory\n\n");
    md.push_str("Programming: from the start of the bulk write of N Services (each with 2 endpoints) to every agent reporting that revision programmed. Endpoint change: from the datastore write of one EndpointSlice returning to the first answer from the new backend seen by a client connecting in a loop.\n\n");
    md.push_str("| Services | dataplane | datastore write s | programmed s | endpoint change p50 / p99 / max ms (samples) | agent RSS MiB (node-1, 2, 3) | node-1 BPF maps MiB |\n|---:|---|---:|---:|---:|---:|---:|\n");
    for r in rows(results) {
        let c = changes(r);
        let rss: Vec<String> = r["memory"]["agent_rss_kib"]
            .as_object()
            .map(|m| {
                m.values()
                    .map(|v| format!("{:.0}", f(v) / 1024.0))
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {} | {:.1} / {:.1} / {:.1} ({}) | {} | {} |",
            r["services"],
            r["mode"].as_str().unwrap_or("?"),
            f(&r["write_s"]),
            match r["programming_timeout_s"].as_f64() {
                Some(limit) => format!("> {limit:.0} (timeout)"),
                None => format!("{:.2}", f(&r["programming_s"])),
            },
            percentile(&c, 0.5),
            percentile(&c, 0.99),
            percentile(&c, 1.0),
            c.len(),
            rss.join(", "),
            mib(f(&r["memory"]["node1_bpf_map_bytes"])),
        );
    }
    md.push_str("\n### Single-stream throughput, pod -> pod on another node\n\n| dataplane | pod IP Gbit/s | ClusterIP Gbit/s |\n|---|---:|---:|\n");
    for t in results["throughput"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {:.2} | {:.2} |",
            t["mode"].as_str().unwrap_or("?"),
            f(&t["pod_ip"]["gbit_per_s"]),
            f(&t["cluster_ip"]["gbit_per_s"]),
        );
    }
    let s = &results["switch"];
    let _ = writeln!(
        md,
        "\n### Switch Iptables -> BPF -> Iptables under load (ClusterIP, 2 + 2 connections)\n\n\
         | load | completed | failed requests | broken connections |\n|---|---:|---:|---:|\n\
         | short connections | {} | {} | - |\n| kept-alive requests | {} | {} | {} |\n\n\
         Switch times (patch to every agent active): to BPF {:.2} s, back to Iptables {:.2} s.\n",
        s["short"]["requests"],
        failures(&s["short"]),
        s["keepalive"]["requests"],
        failures(&s["keepalive"]) - s["keepalive"]["failures"]["broken"].as_u64().unwrap_or(0),
        s["keepalive"]["failures"]["broken"].as_u64().unwrap_or(0),
        f(&s["to_bpf_s"]),
        f(&s["to_iptables_s"]),
    );
    md.push_str("### BPF per-packet cost (BPF_PROG_TEST_RUN, margay-bpf's bench example)\n\n");
    match results["per_packet"]["rows"].as_array() {
        Some(rows) => {
            md.push_str("| path | median ns | mean ns |\n|---|---:|---:|\n");
            for r in rows {
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {:.0} |",
                    r["path"].as_str().unwrap_or("?"),
                    f(&r["median_ns"]),
                    f(&r["mean_ns"])
                );
            }
        }
        None => {
            let _ = writeln!(
                md,
                "Not measured: {}",
                results["per_packet"]["skipped"].as_str().unwrap_or("?")
            );
        }
    }
    md.push_str("\n### Targets\n\n");
    md.push_str(&targets(results));
    md
}

/// The three targets, each met or missed by how much, for the Ns this run measured.
fn targets(results: &Value) -> String {
    let mut md = String::new();
    let ns: Vec<u64> = results["plan"]["services"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    md.push_str("| target | Services | figure | verdict |\n|---|---:|---:|---|\n");
    for &n in &ns {
        if let Some(r) = row(results, n, "BPF") {
            for (kind, pod, svc) in [
                ("short", "pod_ip_short", "cluster_ip_short"),
                ("kept-alive", "pod_ip_keepalive", "cluster_ip_keepalive"),
            ] {
                let ratio = f(&r["load"][svc]["rate"]) / f(&r["load"][pod]["rate"]);
                let _ = writeln!(
                    md,
                    "| ClusterIP in BPF >= 0.97 x pod-IP rate ({kind}) | {n} | {ratio:.2} x | {} |",
                    verdict(ratio, 0.97, true)
                );
            }
        }
    }
    let big = 10_000;
    match (row(results, big, "BPF"), row(results, big, "Iptables")) {
        (Some(b), Some(i)) => {
            let ratio = f(&b["load"]["cluster_ip_short"]["rate"])
                / f(&i["load"]["cluster_ip_short"]["rate"]);
            let _ = writeln!(
                md,
                "| BPF >= 2 x Iptables new-connection rate | {big} | {ratio:.2} x | {} |",
                verdict(ratio, 2.0, true)
            );
        }
        _ => {
            let _ = writeln!(
                md,
                "| BPF >= 2 x Iptables new-connection rate | {big} | not measured in this run | - |"
            );
        }
    }
    match row(results, big, "BPF") {
        Some(b) => {
            let p99 = percentile(&changes(b), 0.99);
            let _ = writeln!(
                md,
                "| one endpoint change live within 10 ms at p99 (BPF) | {big} | {p99:.1} ms | {} |",
                verdict(p99, 10.0, false)
            );
        }
        None => {
            let _ = writeln!(
                md,
                "| one endpoint change live within 10 ms at p99 (BPF) | {big} | not measured in this run | - |"
            );
        }
    }
    md
}

/// "met" or "missed by X%" (`higher`: the figure must be at least `target`, else at most).
fn verdict(figure: f64, target: f64, higher: bool) -> String {
    if figure.is_nan() {
        return "no figure".into();
    }
    let met = if higher {
        figure >= target
    } else {
        figure <= target
    };
    if met {
        "met".into()
    } else if higher {
        format!("missed by {:.0}%", (target - figure) / target * 100.0)
    } else {
        format!("missed: {:.1}x the target", figure / target)
    }
}

fn plots(out: &Path, results: &Value) -> Result<()> {
    let font = std::fs::read(FONT).with_context(|| {
        format!("cannot read the plots' font {FONT} (apt-get install fonts-dejavu-core)")
    })?;
    // plotters keeps registered fonts for the life of the process.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("{FONT} is not a font plotters can use"))?;
    for (file, load, figure, label) in PLOTS {
        plot(&out.join(file), results, load, figure, label)
            .with_context(|| format!("cannot draw {file}"))?;
    }
    Ok(())
}

type Series = (String, RGBColor, Vec<(f64, f64)>);

fn plot(path: &Path, results: &Value, load: &str, figure: &str, label: &str) -> Result<()> {
    let mut series: Vec<Series> = Vec::new();
    for (mode, color_pod, color_svc) in [
        ("Iptables", RGBColor(150, 150, 150), RGBColor(200, 60, 40)),
        ("BPF", RGBColor(90, 90, 200), RGBColor(20, 140, 60)),
    ] {
        for (what, key, color) in [
            ("pod IP", format!("pod_ip_{load}"), color_pod),
            ("ClusterIP", format!("cluster_ip_{load}"), color_svc),
        ] {
            let points: Vec<(f64, f64)> = rows(results)
                .into_iter()
                .filter(|r| r["mode"] == mode)
                .filter_map(|r| {
                    let y = r["load"][&key][figure].as_f64()?;
                    Some((r["services"].as_f64()?, y))
                })
                .collect();
            series.push((format!("{what}, {mode} mode"), color, points));
        }
    }
    let max_x = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.0))
        .fold(10.0, f64::max);
    let max_y = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "{label} vs Services ({})",
        results["date"].as_str().unwrap_or("")
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0..max_x * 1.5).log_scale(), 0.0..max_y * 1.15)?;
    chart
        .configure_mesh()
        .x_desc("Services programmed (log scale)")
        .y_desc(label)
        .label_style(("sans-serif", 14))
        .draw()?;
    for (name, color, points) in series {
        let style = ShapeStyle::from(&color).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.clone(), style))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The rows of `margay-bpf`'s bench example's tables: a path name followed by figures
/// (`median mean [repeat-N mean]`), in the section (the line above the table's header) it is in.
pub fn parse_bench_rows(text: &str) -> Value {
    let mut rows = Vec::new();
    let mut section = String::new();
    let mut previous = "";
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"path") {
            section = previous.trim().to_owned();
            continue;
        }
        previous = line;
        let numbers: Vec<f64> = words
            .iter()
            .rev()
            .take_while(|w| w.parse::<f64>().is_ok() || **w == "-")
            .filter_map(|w| w.parse::<f64>().ok())
            .collect();
        let trailing = words
            .iter()
            .rev()
            .take_while(|w| w.parse::<f64>().is_ok() || **w == "-")
            .count();
        if numbers.len() < 2 || trailing >= words.len() {
            continue;
        }
        let path = words[..words.len() - trailing].join(" ");
        // numbers are in reverse order: [.., mean, median]
        let median = numbers[numbers.len() - 1];
        let mean = numbers[numbers.len() - 2];
        let name = if section.starts_with("tunnel") {
            format!("tunnel: {path}")
        } else {
            path
        };
        rows.push(json!({"path": name, "median_ns": median, "mean_ns": mean}));
    }
    Value::Array(rows)
}

/// The table `margay-lab bench --endpoint-changes-only` prints: per N and dataplane, the
/// endpoint-change latency's p50 / p99 / max over the run's samples, and every sample.
pub fn endpoint_change_table(results: &Value) -> String {
    let mut md = String::new();
    let m = &results["machine"];
    let _ = writeln!(
        md,
        "Endpoint changes of {} ({} build, load average {} before, {} after), {} samples per cell: \
         ms from the EndpointSlice write returning to the first answer from the new backend.\n",
        results["date"].as_str().unwrap_or("?"),
        m["build"].as_str().unwrap_or("?"),
        m["loadavg_before"].as_str().unwrap_or("?"),
        m["loadavg_after"].as_str().unwrap_or("?"),
        results["endpoint_changes"],
    );
    md.push_str(
        "| Services | dataplane | programming s | p50 ms | p99 ms | max ms | samples ms |\n",
    );
    md.push_str("|---:|---|---:|---:|---:|---:|---|\n");
    for r in rows(results) {
        let c = changes(r);
        let max = c.iter().copied().fold(f64::NAN, f64::max);
        let all: Vec<String> = c.iter().map(|v| format!("{v:.1}")).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            r["services"],
            r["mode"].as_str().unwrap_or("?"),
            f(&r["programming_s"]),
            percentile(&c, 0.5),
            percentile(&c, 0.99),
            max,
            all.join(" ")
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_rows_are_read_from_both_tables() {
        let text = "margay TC program, ns per packet (BPF_PROG_TEST_RUN, kernel-measured, 20 packets per path)\n\
path                                             median       mean  repeat=N mean\n\
new flow (CT miss, LPM hit, 2 CT inserts)               512        530              -\n\
no match (CT miss, LPM miss)                            100        110             90\n\
repeat=1 measurement overhead (no match, repeat=1 mean - repeat=N mean): 20 ns\n\
\n\
tunnel mode (20 flows; client -> NodePort on A, backend on B)\n\
path                                                             median       mean\n\
A: client SYN -> NodePort, encapsulated to B                       900        950\n";
        let rows = parse_bench_rows(text);
        let rows = rows.as_array().unwrap();
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert_eq!(rows[0]["path"], "new flow (CT miss, LPM hit, 2 CT inserts)");
        assert_eq!(rows[0]["median_ns"], 512.0);
        assert_eq!(rows[0]["mean_ns"], 530.0);
        assert_eq!(rows[1]["mean_ns"], 110.0);
        assert!(
            rows[2]["path"]
                .as_str()
                .unwrap()
                .starts_with("tunnel: A: client SYN")
        );
    }

    #[test]
    fn rounds_combine_into_medians_and_sums() {
        let round = |rate: f64, p99: f64, ok: u64, refused: u64| {
            json!({"mode": "short", "target": "10.0.0.1:80", "connections": 4, "seconds": 1.0,
                   "requests": ok, "failures": {"refused": refused}, "rate": rate,
                   "p50_us": 100.0, "p90_us": 200.0, "p99_us": p99, "max_us": p99 * 2.0,
                   "backends": {"srv-a": ok}})
        };
        let c = combine_rounds(&[
            round(5000.0, 900.0, 5000, 0),
            round(600.0, 9000.0, 600, 2),
            round(4800.0, 1000.0, 4800, 1),
        ]);
        assert_eq!(c["rate"], 4800.0);
        assert_eq!(c["p99_us"], 1000.0);
        assert_eq!(c["requests"], 10400);
        assert_eq!(c["failures"]["refused"], 3);
        assert_eq!(c["backends"]["srv-a"], 10400);
        assert_eq!(c["max_us"], 18000.0);
        assert_eq!(c["rounds"], 3);
        let spread = c["rate_spread"].as_f64().unwrap();
        assert!((spread - 4400.0 / 4800.0).abs() < 1e-9, "{spread}");
    }

    #[test]
    fn failures_are_shown_by_kind() {
        let a = json!({"failures": {"timeout": 10, "refused": 0}});
        let b = json!({"failures": {"timeout": 2, "refused": 1}});
        assert_eq!(failure_kinds(&[&a, &b]), "13 (refused 1, timeout 12)");
        assert_eq!(failure_kinds(&[&json!({"failures": {}})]), "0");
    }

    #[test]
    fn percentiles_and_verdicts() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.99), 5.0);
        assert!(percentile(&[], 0.5).is_nan());
        assert_eq!(verdict(0.98, 0.97, true), "met");
        assert_eq!(verdict(0.485, 0.97, true), "missed by 50%");
        assert_eq!(verdict(25.0, 10.0, false), "missed: 2.5x the target");
    }
}
