//! `config/grafana-dashboard.json`: every panel's query, and the interface variable's,
//! names only metrics the daemon exports and labels those metrics carry, checked against a
//! live scrape of a daemon with rules, a penalty box, a feed and drops; legends name only
//! labels the query keeps.

use std::collections::{BTreeMap, BTreeSet};

use api_shield_tests::{
    daemon::{Daemon, tempdir::TempDir},
    http,
    netns::{SERVER_V4, Sandbox},
    require_root,
    traffic::{SERVER_PORT, send_udp},
};
use promql_parser::parser::{self, Expr, LabelModifier, VectorMatchCardinality};
use serde_json::Value;

/// Family -> the label names its samples carry.
type Families = BTreeMap<String, BTreeSet<String>>;

fn families(body: &str) -> Families {
    let mut out = Families::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let set = out.entry(name.to_owned()).or_default();
        for pair in labels
            .trim_end_matches('}')
            .split(',')
            .filter(|p| !p.is_empty())
        {
            set.insert(pair.split_once('=').map_or(pair, |(k, _)| k).to_owned());
        }
    }
    out
}

/// The labels a query's result carries, or what in it names a metric or label the scrape
/// does not have.
fn labels_of(expr: &Expr, families: &Families, errors: &mut Vec<String>) -> BTreeSet<String> {
    let check =
        |labels: &[String], have: &BTreeSet<String>, what: &str, errors: &mut Vec<String>| {
            for l in labels {
                if !have.contains(l) {
                    errors.push(format!("{what}: no label `{l}` (has {have:?})"));
                }
            }
        };
    match expr {
        Expr::VectorSelector(vs) => {
            let Some(name) = &vs.name else {
                errors.push("a selector without a metric name".into());
                return BTreeSet::new();
            };
            let Some(have) = families.get(name) else {
                errors.push(format!("no metric `{name}` in the scrape"));
                return BTreeSet::new();
            };
            let named: Vec<String> = vs
                .matchers
                .matchers
                .iter()
                .map(|m| m.name.clone())
                .collect();
            check(&named, have, name, errors);
            have.clone()
        }
        Expr::MatrixSelector(ms) => {
            labels_of(&Expr::VectorSelector(ms.vs.clone()), families, errors)
        }
        Expr::Aggregate(a) => {
            let inner = labels_of(&a.expr, families, errors);
            match &a.modifier {
                Some(LabelModifier::Include(l)) => {
                    check(&l.labels, &inner, "by (...)", errors);
                    l.labels.iter().cloned().collect()
                }
                Some(LabelModifier::Exclude(l)) => {
                    check(&l.labels, &inner, "without (...)", errors);
                    inner
                        .difference(&l.labels.iter().cloned().collect())
                        .cloned()
                        .collect()
                }
                None => BTreeSet::new(),
            }
        }
        Expr::Binary(b) => {
            let left = labels_of(&b.lhs, families, errors);
            let right = labels_of(&b.rhs, families, errors);
            if let Some(m) = &b.modifier {
                if let Some(LabelModifier::Include(on)) = &m.matching {
                    check(&on.labels, &left, "on (...) left", errors);
                    check(&on.labels, &right, "on (...) right", errors);
                }
                if let VectorMatchCardinality::ManyToOne(l) | VectorMatchCardinality::OneToMany(l) =
                    &m.card
                {
                    check(
                        &l.labels,
                        &right.union(&left).cloned().collect(),
                        "group_*",
                        errors,
                    );
                }
            }
            // A vector and a scalar: the vector's labels; two vectors: the left's.
            if left.is_empty() { right } else { left }
        }
        Expr::Paren(p) => labels_of(&p.expr, families, errors),
        Expr::Unary(u) => labels_of(&u.expr, families, errors),
        Expr::Subquery(s) => labels_of(&s.expr, families, errors),
        Expr::Call(c) => {
            let mut out = BTreeSet::new();
            for arg in &c.args.args {
                out.extend(labels_of(arg, families, errors));
            }
            out
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => BTreeSet::new(),
    }
}

/// Checks one query and its legend: what is wrong, if anything.
fn check_query(expr: &str, legend: &str, families: &Families) -> Vec<String> {
    // Grafana's variables, as Grafana fills them in.
    let text = expr
        .replace("$__rate_interval", "1m")
        .replace("$interface", ".*");
    let parsed = match parser::parse(&text) {
        Ok(e) => e,
        Err(e) => return vec![format!("not PromQL: {e}")],
    };
    let mut errors = Vec::new();
    let labels = labels_of(&parsed, families, &mut errors);
    for part in legend.split("{{").skip(1) {
        let label = part.split("}}").next().unwrap_or_default().trim();
        if !labels.contains(label) {
            errors.push(format!(
                "legend names `{label}`, which the result has not ({labels:?})"
            ));
        }
    }
    errors.into_iter().map(|e| format!("{expr}: {e}")).collect()
}

fn dashboard() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/grafana-dashboard.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard"))
        .expect("the dashboard is JSON")
}

/// Every (panel title, query, legend), rows' nested panels included.
fn queries(dash: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = dash["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        stack.extend(p["panels"].as_array().into_iter().flatten());
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap_or_default().to_owned(),
                t["expr"].as_str().unwrap_or_default().to_owned(),
                t["legendFormat"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    out
}

#[test]
fn every_dashboard_query_names_metrics_and_labels_of_a_live_scrape() {
    require_root();
    let sb = Sandbox::new("veth-server").unwrap();
    let files = TempDir::new().unwrap();
    let feed = files.path().join("feed.txt");
    std::fs::write(&feed, "203.0.113.0/24\nnot a prefix\n").unwrap();
    let yaml = format!(
        "interfaces:\n  - name: {}\n    mode: native\nlimits:\n  default: {{pps: 50, burst_packets: 50}}\n  rules:\n    - {{name: dns, match: {{protocol: udp, dst_ports: [53]}}, pps: 10, dry_run: true}}\n  penalty: {{after_violations: 10, window: 10s, block_for: 1m}}\nblocklist: [192.0.2.0/24]\nevents: {{rate: 5}}\nfeeds:\n  - name: local\n    path: {}\n",
        sb.server_if,
        feed.display()
    );
    sb.add_client_address("198.18.0.30").unwrap();
    let daemon = Daemon::start(&sb.server, &yaml, 1).unwrap();
    daemon.dirs.cli_ok(&["feeds", "refresh", "local"]);
    // A flood over the default limit: drops, events (some suppressed), a penalty box.
    send_udp(
        &sb.client,
        "198.18.0.30",
        &format!("{SERVER_V4}:{SERVER_PORT}"),
        500,
        0,
        32,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !daemon.dirs.cli_ok(&["block", "list"]).contains("penalty") {
        assert!(
            std::time::Instant::now() < deadline,
            "the flooder was never boxed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (status, body) = http::get(&sb.server, "127.0.0.1:9477", "/metrics").unwrap();
    assert!(status.contains("200"), "{status}");
    let families = families(&body);

    let dash = dashboard();
    let all = queries(&dash);
    assert!(all.len() >= 20, "{} queries", all.len());
    let errors: Vec<String> = all
        .iter()
        .flat_map(|(title, expr, legend)| {
            check_query(expr, legend, &families)
                .into_iter()
                .map(move |e| format!("panel `{title}`: {e}"))
        })
        .collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    // The interface variable: label_values(METRIC, LABEL).
    for var in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap();
            let (metric, label) = inner.split_once(", ").unwrap();
            assert!(
                families.get(metric).is_some_and(|l| l.contains(label)),
                "variable query {q}"
            );
        }
    }
    // What the dashboard is for: each of these families is shown.
    for family in [
        "api_shield_packets_total",
        "api_shield_rule_packets_total",
        "api_shield_feed_entries",
        "api_shield_feed_last_success_timestamp_seconds",
        "api_shield_feed_fetch_failures_total",
        "api_shield_map_entries",
        "api_shield_map_capacity",
        "api_shield_events_suppressed_total",
        "api_shield_penalties_total",
    ] {
        assert!(
            all.iter().any(|(_, e, _)| e.contains(family)),
            "no panel shows {family}"
        );
    }
    // The check can fail: a misspelt metric, label or legend is reported.
    for (expr, legend) in [
        ("rate(api_shield_packets_totl[1m])", ""),
        ("sum by (reasn) (rate(api_shield_packets_total[1m]))", ""),
        ("api_shield_feed_entries{rule=\"x\"}", ""),
        (
            "sum by (rule) (api_shield_rule_packets_total)",
            "{{action}}",
        ),
        (
            "api_shield_map_entries / on (map, feed) api_shield_map_capacity",
            "",
        ),
    ] {
        assert!(
            !check_query(expr, legend, &families).is_empty(),
            "{expr} {legend} passed"
        );
    }
    daemon.stop().unwrap();
}
