#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Keeps the Grafana dashboards in `deploy/grafana/` honest.
//!
//! - Both dashboards parse, have unique panel ids, a target on every panel
//!   and datasources that point at their import inputs.
//! - Operations: every `tollgate_*` metric a PromQL expression names is one a
//!   service registers (`counter!`/`gauge!`/`histogram!` in
//!   gateway/meter/billing sources, names resolved through `const`s), every
//!   label in a `by (...)` or `{...}` selector is a label that metric is
//!   recorded with, `_bucket` is only read from histograms the service
//!   exports with buckets and `quantile` only from those it exports as
//!   summaries.
//! - Finance: every panel query and template-variable query runs on a real
//!   ClickHouse (18.16 here) with the migrations applied, after the Grafana
//!   ClickHouse plugin's macros are expanded twice: as the plugin does
//!   (grafana/clickhouse-datasource `pkg/macros/macros.go`: `toDateTime(<unix>)`
//!   bounds, `$__timeInterval` → `toStartOfInterval`, which 18.16 lacks) and
//!   in plain forms (string DateTimes, `toStartOfHour`); for one tenant, two
//!   and All. A failure names the panel and quotes ClickHouse. The figures
//!   of a few panels are checked against seeded rows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tollgate_tests::harness::TestEnv;

const OPERATIONS: &str = "tollgate-operations.json";
const FINANCE: &str = "tollgate-finance.json";
const CH_PLUGIN: &str = "grafana-clickhouse-datasource";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load(name: &str) -> Value {
    let path = repo_root().join("deploy/grafana").join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not valid JSON: {e}"))
}

/// Every panel, rows included, with the panels of collapsed rows.
fn all_panels(d: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a [Value], out: &mut Vec<&'a Value>) {
        for p in list {
            out.push(p);
            if let Some(inner) = p["panels"].as_array() {
                walk(inner, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        d["panels"].as_array().expect("dashboard has panels"),
        &mut out,
    );
    out
}

/// The panels that query something (everything but rows).
fn query_panels(d: &Value) -> Vec<&Value> {
    all_panels(d)
        .into_iter()
        .filter(|p| p["type"] != "row")
        .collect()
}

fn title(p: &Value) -> &str {
    p["title"].as_str().unwrap_or("<untitled>")
}

fn variables(d: &Value) -> Vec<&Value> {
    d["templating"]["list"]
        .as_array()
        .map(|l| l.iter().collect())
        .unwrap_or_default()
}

/// Structure shared by both dashboards. `uids` are the datasource uids a
/// panel or target may use; `plugin` the datasource type they must have.
fn check_structure(d: &Value, name: &str, input: &str, plugin: &str, uids: &[&str]) {
    let mut errors = Vec::new();
    let schema = d["schemaVersion"].as_u64().unwrap_or(0);
    if schema < 39 {
        errors.push(format!("schemaVersion {schema} < 39"));
    }
    for key in ["uid", "title"] {
        if d[key].as_str().is_none_or(str::is_empty) {
            errors.push(format!("no {key}"));
        }
    }
    if !d["id"].is_null() {
        errors.push("id must be null for import".to_owned());
    }
    let inputs = d["__inputs"].as_array().cloned().unwrap_or_default();
    if !inputs
        .iter()
        .any(|i| i["name"] == input && i["type"] == "datasource" && i["pluginId"] == plugin)
    {
        errors.push(format!(
            "__inputs has no datasource input {input} of plugin {plugin}"
        ));
    }
    let mut ids = BTreeSet::new();
    for p in all_panels(d) {
        match p["id"].as_u64() {
            Some(id) if ids.insert(id) => {}
            Some(id) => errors.push(format!("panel id {id} ({}) is not unique", title(p))),
            None => errors.push(format!("panel {:?} has no numeric id", title(p))),
        }
        let g = &p["gridPos"];
        let (x, w, h) = (g["x"].as_u64(), g["w"].as_u64(), g["h"].as_u64());
        match (x, w, h, g["y"].as_u64()) {
            (Some(x), Some(w), Some(h), Some(_)) if x + w <= 24 && w > 0 && h > 0 => {}
            _ => errors.push(format!("panel {:?}: bad gridPos {g}", title(p))),
        }
    }
    let ds_ok =
        |ds: &Value| ds["type"] == plugin && ds["uid"].as_str().is_some_and(|u| uids.contains(&u));
    for p in query_panels(d) {
        let t = title(p);
        if p["title"].as_str().is_none_or(str::is_empty) {
            errors.push(format!("panel {} has no title", p["id"]));
        }
        if !p["datasource"].is_null() && !ds_ok(&p["datasource"]) {
            errors.push(format!(
                "panel {t:?}: datasource {} is not one of {uids:?} of type {plugin}",
                p["datasource"]
            ));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            errors.push(format!("panel {t:?} has no target"));
        }
        let mut refs = BTreeSet::new();
        for target in &targets {
            if !ds_ok(&target["datasource"]) {
                errors.push(format!(
                    "panel {t:?}: target datasource {} is not one of {uids:?} of type {plugin}",
                    target["datasource"]
                ));
            }
            let r = target["refId"].as_str().unwrap_or_default();
            if r.is_empty() || !refs.insert(r.to_owned()) {
                errors.push(format!("panel {t:?}: refId {r:?} missing or repeated"));
            }
            let query = target["expr"].as_str().or(target["rawSql"].as_str());
            if query.is_none_or(|q| q.trim().is_empty()) {
                errors.push(format!("panel {t:?}: target {r} has no query"));
            }
        }
    }
    let mut names = BTreeSet::new();
    for v in variables(d) {
        let n = v["name"].as_str().unwrap_or_default();
        if n.is_empty() || !names.insert(n) {
            errors.push(format!(
                "template variable {n:?} missing a name or repeated"
            ));
        }
        if v["type"] == "query" && !ds_ok(&v["datasource"]) {
            errors.push(format!(
                "variable {n}: datasource {} is not one of {uids:?}",
                v["datasource"]
            ));
        }
    }
    assert!(errors.is_empty(), "{name}:\n  {}", errors.join("\n  "));
}

// ---------------------------------------------------------------- sources

#[derive(Debug, Default)]
struct MetricDef {
    /// `counter`, `gauge` or `histogram`.
    kind: String,
    /// Every label key recorded with it, over all call sites.
    labels: BTreeSet<String>,
    /// A histogram the exporter renders with `_bucket` series (else a
    /// summary with `quantile`).
    bucketed: bool,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The string literals of `text` with their byte ranges (escapes kept;
/// enough for metric and label names).
fn string_literals(text: &str) -> Vec<(usize, usize, &str)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'\'' => {
                // A char literal ('"', '\'') or a lifetime; skip a char literal.
                if b.get(i + 2) == Some(&b'\'') {
                    i += 3;
                    continue;
                }
                if b.get(i + 1) == Some(&b'\\') && b.get(i + 3) == Some(&b'\'') {
                    i += 4;
                    continue;
                }
                i += 1;
            }
            b'"' => {
                let start = i;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                out.push((start, i + 1, &text[start + 1..i.min(text.len())]));
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The text of a macro call's arguments: from `open` (just after `(`) to the
/// matching `)`, skipping string literals.
fn call_args(text: &str, open: usize) -> &str {
    let b = text.as_bytes();
    let mut depth = 1;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return &text[open..i];
                }
            }
            _ => {}
        }
        i += 1;
    }
    &text[open..]
}

fn is_metric_name(s: &str) -> bool {
    s.starts_with("tollgate_") && s.bytes().all(|c| c.is_ascii_lowercase() || c == b'_')
}

/// Resolves a macro's or matcher's first argument: a literal or a path to a
/// `const` whose value is a literal.
fn resolve_name(arg: &str, consts: &BTreeMap<String, String>) -> Option<String> {
    let arg = arg.trim().trim_end_matches(".into()").trim();
    if let Some(lit) = arg.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        return Some(lit.to_owned());
    }
    let last = arg.rsplit("::").next()?.trim();
    consts.get(last).cloned()
}

/// The metrics the services register, from their sources.
fn registered_metrics() -> BTreeMap<String, MetricDef> {
    let root = repo_root();
    let mut crates: Vec<(String, String)> = Vec::new();
    for krate in ["gateway", "meter", "billing"] {
        let mut files = Vec::new();
        rust_files(&root.join(krate).join("src"), &mut files);
        files.sort();
        let text: String = files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap() + "\n")
            .collect();
        crates.push((krate.to_owned(), text));
    }
    // `const NAME: &str = "tollgate_...";` anywhere (meter/src/metrics.rs).
    let mut consts = BTreeMap::new();
    for (_, text) in &crates {
        for line in text.lines() {
            let line = line.trim();
            let Some(rest) = line
                .strip_prefix("pub const ")
                .or_else(|| line.strip_prefix("const "))
            else {
                continue;
            };
            let Some((name, value)) = rest.split_once(": &str =") else {
                continue;
            };
            let value = value.trim().trim_end_matches(';').trim().trim_matches('"');
            if is_metric_name(value) {
                consts.insert(name.trim().to_owned(), value.to_owned());
            }
        }
    }
    let mut defs: BTreeMap<String, MetricDef> = BTreeMap::new();
    for (krate, text) in &crates {
        let bucket_all = text.contains(".set_buckets(");
        let mut bucket_for = BTreeSet::new();
        for (i, _) in text.match_indices("Matcher::Full(") {
            let args = call_args(text, i + "Matcher::Full(".len());
            if let Some(n) = resolve_name(args, &consts) {
                bucket_for.insert(n);
            }
        }
        for kind in ["counter", "gauge", "histogram"] {
            let pat = format!("{kind}!(");
            for (i, _) in text.match_indices(&pat) {
                // `describe_counter!(...)` names no labels; skip it.
                if text[..i].ends_with('_') {
                    continue;
                }
                let args = call_args(text, i + pat.len());
                let first = args.split(',').next().unwrap_or_default();
                let Some(name) = resolve_name(first, &consts) else {
                    panic!(
                        "{krate}: cannot resolve the metric name of `{kind}!({})`",
                        args.chars().take(80).collect::<String>()
                    );
                };
                if !is_metric_name(&name) {
                    continue;
                }
                let def = defs.entry(name.clone()).or_default();
                if !def.kind.is_empty() && def.kind != kind {
                    panic!("{name} is recorded both as {} and {kind}", def.kind);
                }
                def.kind = kind.to_owned();
                def.bucketed |= kind == "histogram" && (bucket_all || bucket_for.contains(&name));
                // Label keys: a literal followed by `=>`.
                for (_, end, lit) in string_literals(args) {
                    if args[end..].trim_start().starts_with("=>") {
                        def.labels.insert(lit.to_owned());
                    }
                }
            }
        }
    }
    // The brief's cross-check: every metric-like literal in the sources is
    // one of the registered names (a name used outside a macro would be a
    // metric this scan missed).
    for (krate, text) in &crates {
        for (_, _, lit) in string_literals(text) {
            if is_metric_name(lit) && !defs.contains_key(lit) {
                panic!("{krate}: {lit:?} looks like a metric but no metrics macro records it");
            }
        }
    }
    defs
}

// ---------------------------------------------------------------- PromQL

/// One reference to a metric in an expression.
#[derive(Debug)]
struct MetricRef {
    name: String,
    /// Label names in its `{...}` selector.
    selector: Vec<String>,
}

#[derive(Debug, Default)]
struct Parsed {
    metrics: Vec<MetricRef>,
    /// Labels of `by`, `without`, `on`, `ignoring`, `group_left/right`.
    grouping: Vec<String>,
}

fn ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// Just enough PromQL: identifiers outside strings and ranges, selectors
/// and grouping clauses.
fn parse_promql(expr: &str) -> Parsed {
    let b = expr.as_bytes();
    let mut out = Parsed::default();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let read_ident = |mut i: usize| {
        let s = i;
        while i < b.len() && ident_char(b[i]) {
            i += 1;
        }
        (i, &expr[s..i])
    };
    let read_list = |i: usize| {
        // `( a, b )` → names, index after `)`.
        let mut names = Vec::new();
        let mut j = skip_ws(i);
        if b.get(j) != Some(&b'(') {
            return (names, i);
        }
        j += 1;
        loop {
            j = skip_ws(j);
            if j >= b.len() || b[j] == b')' {
                return (names, j + 1);
            }
            let (k, name) = read_ident(j);
            if !name.is_empty() {
                names.push(name.to_owned());
            }
            j = skip_ws(k);
            // Past a comma, or past a stray character (always progress).
            if b.get(j) == Some(&b',') || name.is_empty() {
                j += 1;
            }
        }
    };
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' {
            i += 1;
            while i < b.len() && b[i] != c {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c == b'[' {
            while i < b.len() && b[i] != b']' {
                i += 1;
            }
            i += 1;
        } else if c == b'$' {
            let (j, _) = read_ident(i + 1);
            i = j.max(i + 1);
        } else if ident_char(c) && !c.is_ascii_digit() {
            let (j, word) = read_ident(i);
            match word {
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right" => {
                    let (names, k) = read_list(j);
                    out.grouping.extend(names);
                    i = k.max(j);
                }
                w if w.starts_with("tollgate_") => {
                    let mut selector = Vec::new();
                    let mut k = skip_ws(j);
                    if b.get(k) == Some(&b'{') {
                        k += 1;
                        loop {
                            k = skip_ws(k);
                            if k >= b.len() || b[k] == b'}' {
                                k += 1;
                                break;
                            }
                            let (e, label) = read_ident(k);
                            selector.push(label.to_owned());
                            k = skip_ws(e);
                            while k < b.len() && matches!(b[k], b'=' | b'!' | b'~') {
                                k += 1;
                            }
                            k = skip_ws(k);
                            if let Some(&q) = b.get(k).filter(|q| **q == b'"' || **q == b'\'') {
                                k += 1;
                                while k < b.len() && b[k] != q {
                                    if b[k] == b'\\' {
                                        k += 1;
                                    }
                                    k += 1;
                                }
                                k += 1;
                            }
                            k = skip_ws(k);
                            if b.get(k) == Some(&b',') || label.is_empty() {
                                k += 1;
                            }
                        }
                        i = k;
                    } else {
                        i = j;
                    }
                    out.metrics.push(MetricRef {
                        name: w.to_owned(),
                        selector,
                    });
                }
                _ => i = j,
            }
        } else {
            i += 1;
        }
    }
    out
}

#[derive(Debug, PartialEq)]
enum Series {
    Plain,
    Bucket,
    SumOrCount,
}

/// Labels every Prometheus scrape adds.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// Checks one expression; returns the problems and the labels its result
/// can carry (for the legend).
fn check_expr(expr: &str, defs: &BTreeMap<String, MetricDef>) -> (Vec<String>, BTreeSet<String>) {
    let parsed = parse_promql(expr);
    let mut errors = Vec::new();
    if parsed.metrics.is_empty() {
        errors.push("names no tollgate_ metric".to_owned());
    }
    // The labels each resolved metric can carry, with its name.
    let mut per_metric: Vec<(&str, BTreeSet<String>)> = Vec::new();
    for m in &parsed.metrics {
        let (base, series) = if defs.contains_key(&m.name) {
            (m.name.as_str(), Series::Plain)
        } else if let Some(b) = m.name.strip_suffix("_bucket") {
            (b, Series::Bucket)
        } else if let Some(b) = m
            .name
            .strip_suffix("_sum")
            .or_else(|| m.name.strip_suffix("_count"))
        {
            (b, Series::SumOrCount)
        } else {
            (m.name.as_str(), Series::Plain)
        };
        let Some(def) = defs.get(base) else {
            errors.push(format!(
                "metric {} is not registered by gateway, meter or billing",
                m.name
            ));
            continue;
        };
        let mut available: BTreeSet<String> = def.labels.clone();
        available.extend(TARGET_LABELS.iter().map(|s| (*s).to_owned()));
        match (def.kind.as_str(), &series, def.bucketed) {
            ("histogram", Series::Bucket, true) => {
                available.insert("le".to_owned());
            }
            ("histogram", Series::Bucket, false) => errors.push(format!(
                "{} is exported as a summary (no buckets configured): no {} series",
                base, m.name
            )),
            ("histogram", Series::Plain, true) => errors.push(format!(
                "{base} is a histogram with buckets: read {base}_bucket, _sum or _count"
            )),
            ("histogram", Series::Plain, false) => {
                available.insert("quantile".to_owned());
            }
            ("histogram", Series::SumOrCount, _) => {}
            (kind, Series::Plain, _) => {
                if kind == "counter" && !expr.contains("rate(") && !expr.contains("increase(") {
                    errors.push(format!(
                        "counter {base} is read without rate() or increase()"
                    ));
                }
            }
            (kind, _, _) => errors.push(format!("{} is a {kind}, not a histogram", m.name)),
        }
        for l in &m.selector {
            if !available.contains(l) {
                errors.push(format!(
                    "label {l:?} in the selector of {} is not recorded with it (labels: {:?})",
                    m.name, def.labels
                ));
            }
        }
        per_metric.push((m.name.as_str(), available));
    }
    for l in &parsed.grouping {
        for (name, available) in &per_metric {
            if !available.contains(l) {
                errors.push(format!(
                    "grouping label {l:?} is not a label of {name} (labels: {available:?})"
                ));
            }
        }
    }
    let result_labels: BTreeSet<String> = if parsed.grouping.is_empty() {
        if expr.contains("sum(") || expr.contains("max(") || expr.contains("min(") {
            BTreeSet::new()
        } else {
            per_metric.into_iter().flat_map(|(_, l)| l).collect()
        }
    } else {
        parsed.grouping.iter().cloned().collect()
    };
    (errors, result_labels)
}

/// `{{label}}` names in a legend format.
fn legend_labels(legend: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = legend;
    while let Some(s) = rest.find("{{") {
        let Some(e) = rest[s..].find("}}") else { break };
        out.push(rest[s + 2..s + e].trim().to_owned());
        rest = &rest[s + e + 2..];
    }
    out
}

#[test]
fn operations_dashboard_structure() {
    let d = load(OPERATIONS);
    check_structure(
        &d,
        OPERATIONS,
        "DS_PROMETHEUS",
        "prometheus",
        &["${datasource}", "${DS_PROMETHEUS}"],
    );
    let vars = variables(&d);
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a `datasource` template variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    assert_eq!(ds["current"]["value"], "${DS_PROMETHEUS}");
    let rows: Vec<&str> = all_panels(&d)
        .into_iter()
        .filter(|p| p["type"] == "row")
        .map(title)
        .collect();
    assert_eq!(rows, ["Gateway", "Event pipeline", "Meter", "Billing"]);
}

#[test]
fn operations_dashboard_uses_only_registered_metrics_and_labels() {
    let defs = registered_metrics();
    // The scan itself works: a few metrics with known labels.
    for (name, labels) in [
        (
            "tollgate_gateway_requests_total",
            &["route", "model", "status"][..],
        ),
        ("tollgate_gateway_tokens_total", &["model", "kind"]),
        ("tollgate_meter_insert_duration_seconds", &["table"]),
        ("tollgate_meter_dead_letters_total", &["reason"]),
        ("tollgate_billing_quota_state", &["scope", "state"]),
    ] {
        let def = defs
            .get(name)
            .unwrap_or_else(|| panic!("source scan missed {name}: {defs:?}"));
        for l in labels {
            assert!(
                def.labels.contains(*l),
                "{name}: label {l} not found: {def:?}"
            );
        }
    }
    assert!(defs["tollgate_meter_insert_duration_seconds"].bucketed);
    assert!(defs["tollgate_gateway_overhead_seconds"].bucketed);

    let d = load(OPERATIONS);
    let mut errors = Vec::new();
    let mut used = BTreeSet::new();
    for p in query_panels(&d) {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap_or_default();
            let (problems, result_labels) = check_expr(expr, &defs);
            for problem in problems {
                errors.push(format!("panel {:?}: {problem}\n    expr: {expr}", title(p)));
            }
            for l in legend_labels(t["legendFormat"].as_str().unwrap_or_default()) {
                if !result_labels.contains(&l) {
                    errors.push(format!(
                        "panel {:?}: legend label {l:?} is not a label of the result {result_labels:?}\n    expr: {expr}",
                        title(p)
                    ));
                }
            }
            for m in parse_promql(expr).metrics {
                used.insert(m.name);
            }
        }
    }
    assert!(
        errors.is_empty(),
        "{OPERATIONS}:\n  {}",
        errors.join("\n  ")
    );
    let unused: Vec<&String> = defs
        .keys()
        .filter(|n| !used.iter().any(|u| u.starts_with(n.as_str())))
        .collect();
    if !unused.is_empty() {
        eprintln!("note: metrics without a panel in {OPERATIONS}: {unused:?}");
    }
}

/// The checker itself rejects what it should.
#[test]
fn promql_checker_catches_mistakes() {
    let defs = registered_metrics();
    let bad = [
        "sum(rate(tollgate_gateway_requests_invented_total[5m]))",
        "sum by (tenant) (rate(tollgate_gateway_requests_total[5m]))",
        "sum(rate(tollgate_gateway_requests_total{code=\"500\"}[5m]))",
        "histogram_quantile(0.99, sum by (le) (rate(tollgate_billing_webhook_attempt_duration_seconds_bucket[5m])))",
        "tollgate_gateway_overhead_seconds{quantile=\"0.99\"}",
        "sum by (le, table) (rate(tollgate_gateway_publish_seconds_bucket[5m]))",
        "sum(tollgate_gateway_requests_total)",
    ];
    for expr in bad {
        assert!(!check_expr(expr, &defs).0.is_empty(), "accepted: {expr}");
    }
    let good = [
        "histogram_quantile(0.99, sum by (le, route) (rate(tollgate_gateway_overhead_seconds_bucket[$__rate_interval])))",
        "max by (quantile) (tollgate_billing_webhook_attempt_duration_seconds{quantile=~\"0.5|0.99\"})",
        "sum by (table) (rate(tollgate_meter_insert_failures_total[5m]))",
    ];
    for expr in good {
        let (errors, _) = check_expr(expr, &defs);
        assert!(errors.is_empty(), "rejected {expr}: {errors:?}");
    }
}

// ---------------------------------------------------------------- finance

#[test]
fn finance_dashboard_structure() {
    let d = load(FINANCE);
    check_structure(
        &d,
        FINANCE,
        "DS_CLICKHOUSE",
        CH_PLUGIN,
        &["${DS_CLICKHOUSE}"],
    );
    let tenant = variables(&d)
        .into_iter()
        .find(|v| v["name"] == "tenant")
        .expect("a `tenant` template variable");
    assert_eq!(tenant["type"], "query");
    assert!(
        variable_query(tenant).contains("SELECT DISTINCT tenant_id FROM tollgate.ledger"),
        "{tenant}"
    );
    for p in query_panels(&d) {
        for t in p["targets"].as_array().unwrap() {
            let sql = t["rawSql"].as_str().unwrap_or_default();
            assert_eq!(t["editorType"], "sql", "panel {:?}", title(p));
            // The plugin reads `format` 0 as time series, 1 as table.
            let series = p["type"] == "timeseries";
            assert_eq!(
                t["format"],
                if series { 0 } else { 1 },
                "panel {:?}",
                title(p)
            );
            if series {
                assert!(
                    sql.contains(" AS time") && sql.contains("ORDER BY time"),
                    "panel {:?}: a time series needs a `time` column in order",
                    title(p)
                );
            }
            for forbidden in [" FINAL", "WITH FILL", " OVER ", "OVER(", "Nullable("] {
                assert!(
                    !sql.contains(forbidden),
                    "panel {:?}: {forbidden:?} is not portable to 18.16 or not needed",
                    title(p)
                );
            }
            // The plugin expands it to toStartOfInterval(), which 18.16 does
            // not have; bucket with $__interval_s instead.
            assert!(
                !sql.contains("$__timeInterval"),
                "panel {:?}: $__timeInterval becomes toStartOfInterval(), unknown to ClickHouse 18.16; use toDateTime(intDiv(toUInt32(col), $__interval_s) * $__interval_s)",
                title(p)
            );
            assert!(
                sql.contains("$__timeFilter(")
                    || sql.contains("$__dateFilter(")
                    || sql.contains("$__fromTime"),
                "panel {:?} is not filtered by the time range",
                title(p)
            );
        }
    }
}

fn variable_query(v: &Value) -> String {
    match &v["query"] {
        Value::String(s) => s.clone(),
        q => q["rawSql"].as_str().unwrap_or_default().to_owned(),
    }
}

const FROM: i64 = 1_767_225_600; // 2026-01-01 00:00:00 UTC
const TO: i64 = 1_798_675_200; // 2026-12-31 00:00:00 UTC

#[derive(Clone, Copy, Debug)]
enum Expansion {
    /// What the plugin sends (grafana/clickhouse-datasource pkg/macros).
    Plugin,
    /// Plain forms: string DateTimes and `toStartOfHour`.
    Plain,
}

/// Replaces `$__name(arg)` by `f(arg)`.
fn replace_macro(sql: &str, name: &str, f: impl Fn(&str) -> String) -> String {
    let pat = format!("$__{name}(");
    let mut out = String::new();
    let mut rest = sql;
    while let Some(i) = rest.find(&pat) {
        out.push_str(&rest[..i]);
        let args = call_args(rest, i + pat.len());
        out.push_str(&f(args.trim()));
        rest = &rest[i + pat.len() + args.len() + 1..];
    }
    out.push_str(rest);
    out
}

fn expand(sql: &str, how: Expansion, tenant: &str, db: &str) -> String {
    let (from, to) = match how {
        Expansion::Plugin => (format!("toDateTime({FROM})"), format!("toDateTime({TO})")),
        Expansion::Plain => (
            "toDateTime('2026-01-01 00:00:00', 'UTC')".to_owned(),
            "toDateTime('2026-12-31 00:00:00', 'UTC')".to_owned(),
        ),
    };
    let mut s = replace_macro(sql, "timeFilter", |c| match how {
        Expansion::Plugin => format!("{c} >= {from} AND {c} <= {to}"),
        Expansion::Plain => format!("{c} >= {from} AND {c} < {to}"),
    });
    s = replace_macro(&s, "dateFilter", |c| {
        format!("{c} >= toDate('2026-01-01') AND {c} <= toDate('2026-12-31')")
    });
    s = replace_macro(&s, "timeInterval", |c| match how {
        Expansion::Plugin => format!("toStartOfInterval(toDateTime({c}), INTERVAL 3600 second)"),
        Expansion::Plain => format!("toStartOfHour({c})"),
    });
    s = s
        .replace("$__fromTime", &from)
        .replace("$__toTime", &to)
        .replace(
            "$__interval_s",
            match how {
                Expansion::Plugin => "3600",
                Expansion::Plain => "86400",
            },
        );
    for form in ["${tenant:singlequote}", "${tenant:sqlstring}", "${tenant}"] {
        s = s.replace(form, tenant);
    }
    s.replace("tollgate.", &format!("{db}."))
}

/// Runs `sql`; the body as TSV with names, or ClickHouse's error.
async fn run(env: &TestEnv, sql: &str) -> Result<String, String> {
    let mut cursor = env
        .ch()
        .query(sql)
        .fetch_bytes("TabSeparatedWithNames")
        .map_err(|e| e.to_string())?;
    let bytes = cursor.collect().await.map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A few rows in the storage tables under the finance views: two tenants,
/// debits, a grant, usage and a finalized invoice with a line.
async fn seed(env: &TestEnv) {
    let db = &env.database;
    let statements = [
        format!(
            "INSERT INTO {db}.ledger_entries (entry_id, tenant_id, kind, amount, occurred_at, key_id, model, input_tokens, output_tokens, version) VALUES
             ('d1', 'acme', 'debit', -1.5, '2026-03-01 10:15:00', 'k1', 'gpt', 100, 10, 1),
             ('d2', 'acme', 'debit', -0.25, '2026-03-01 11:20:00', 'k2', 'claude', 50, 5, 1),
             ('d3', 'beta', 'debit', -2, '2026-03-02 09:00:00', 'k3', 'gpt', 10, 1, 1),
             ('d0', 'acme', 'debit', -7, '2025-12-31 23:59:59', 'k1', 'gpt', 1, 1, 1),
             ('g1', 'acme', 'grant', 10, '2026-02-01 00:00:00', '', '', 0, 0, 1)"
        ),
        format!(
            "INSERT INTO {db}.usage_events (event_id, occurred_at, tenant_id, key_id, model, requested_model, input_tokens, output_tokens, cost) VALUES
             ('u1', '2026-03-01 10:15:00', 'acme', 'k1', 'gpt', 'gpt', 100, 10, 1.5),
             ('u2', '2026-03-01 11:20:00', 'acme', 'k2', 'claude', 'claude', 50, 5, 0.25)"
        ),
        format!(
            "INSERT INTO {db}.invoices_store (invoice_id, tenant_id, period_start, period_end, status, currency, subtotal, credits_applied, total, version) VALUES
             ('inv1', 'acme', '2026-03-01 00:00:00', '2026-04-01 00:00:00', 'finalized', 'USD', 1.75, 0, 1.75, 1)"
        ),
        format!(
            "INSERT INTO {db}.invoice_lines_v2 (invoice_id, tenant_id, line_no, model, token_kind, quantity, unit_price, amount, price_version, version) VALUES
             ('inv1', 'acme', 1, 'gpt', 'input', 100, 0.015, 1.5, 1, 1)"
        ),
    ];
    for sql in statements {
        env.ch()
            .query(&sql)
            .execute()
            .await
            .unwrap_or_else(|e| panic!("seed failed: {e}\n{sql}"));
    }
}

fn panel_sql<'a>(d: &'a Value, panel_title: &str) -> &'a str {
    query_panels(d)
        .into_iter()
        .find(|p| title(p) == panel_title)
        .and_then(|p| p["targets"][0]["rawSql"].as_str())
        .unwrap_or_else(|| panic!("no panel {panel_title:?} in {FINANCE}"))
}

/// Runs every panel and template-variable query of the finance dashboard
/// `d`, under both macro expansions and three tenant selections (one, two,
/// All); returns one message per failure, naming the panel or variable and
/// quoting ClickHouse's error and the SQL it ran.
async fn check_finance_queries(env: &TestEnv, d: &Value) -> Vec<String> {
    let all = variables(d)
        .into_iter()
        .find(|v| v["name"] == "tenant")
        .and_then(|v| v["allValue"].as_str())
        .expect("the tenant variable has an allValue")
        .to_owned();

    let mut queries: Vec<(String, String)> = Vec::new();
    for p in query_panels(d) {
        for t in p["targets"].as_array().unwrap() {
            let sql = t["rawSql"].as_str().unwrap_or_default();
            queries.push((format!("panel {:?}", title(p)), sql.to_owned()));
        }
    }
    for v in variables(d) {
        if v["type"] == "query" {
            queries.push((format!("variable {}", v["name"]), variable_query(v)));
        }
    }
    assert!(queries.len() >= 8, "too few queries: {queries:?}");

    let mut errors = Vec::new();
    for (what, sql) in &queries {
        for how in [Expansion::Plugin, Expansion::Plain] {
            for tenant in ["'acme'", "'acme','beta'", all.as_str()] {
                let concrete = expand(sql, how, tenant, &env.database);
                if let Some(i) = concrete.find('$') {
                    errors.push(format!(
                        "{what}: unexpanded macro or variable at {:?}",
                        &concrete[i..concrete.len().min(i + 30)]
                    ));
                    break;
                }
                if let Err(e) = run(env, &concrete).await {
                    errors.push(format!(
                        "{what} ({how:?} macros, tenant {tenant}): ClickHouse refused it:\n    {e}\n    SQL: {concrete}"
                    ));
                }
            }
        }
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finance_queries_run_on_clickhouse() {
    let d = load(FINANCE);
    let env = TestEnv::new();
    env.migrate().await.unwrap();
    seed(&env).await;
    let errors = check_finance_queries(&env, &d).await;
    assert!(
        errors.is_empty(),
        "{FINANCE}: {} failing queries:\n  {}",
        errors.len(),
        errors.join("\n  ")
    );

    // The figures: spend is -sum of debits in the range, per tenant filter.
    let scalar = |title: &'static str, tenant: &'static str| {
        let sql = expand(
            panel_sql(&d, title),
            Expansion::Plugin,
            tenant,
            &env.database,
        );
        let env = &env;
        async move {
            let body = run(env, &sql).await.unwrap();
            body.lines().nth(1).unwrap_or_default().to_owned()
        }
    };
    let num = |s: String| {
        s.parse::<f64>()
            .unwrap_or_else(|_| panic!("not a number: {s:?}"))
    };
    assert_eq!(num(scalar("Spend in range", "'acme'").await), 1.75);
    assert_eq!(num(scalar("Spend in range", "'acme','beta'").await), 3.75);
    assert_eq!(num(scalar("Spend in range", "'__all__'").await), 3.75);
    assert_eq!(num(scalar("Priced requests", "'beta'").await), 1.0);
    assert_eq!(num(scalar("Credits granted", "'__all__'").await), 10.0);
    assert_eq!(num(scalar("Tenants with spend", "'__all__'").await), 2.0);
    assert_eq!(num(scalar("Invoiced (finalized)", "'acme'").await), 1.75);
    assert_eq!(num(scalar("Invoiced (finalized)", "'beta'").await), 0.0);

    let spend_by_tenant = expand(
        panel_sql(&d, "Spend by tenant"),
        Expansion::Plugin,
        "'__all__'",
        &env.database,
    );
    // Unix times, whatever the server's time zone.
    let body = run(
        &env,
        &format!("SELECT toUnixTimestamp(time), tenant_id, spend FROM ({spend_by_tenant})"),
    )
    .await
    .unwrap();
    let rows: Vec<Vec<&str>> = body
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect())
        .collect();
    assert_eq!(
        rows.iter()
            .map(|r| (r[0], r[1], num(r[2].to_owned())))
            .collect::<Vec<_>>(),
        [
            ("1772359200", "acme", 1.5),  // 2026-03-01 10:00 UTC
            ("1772362800", "acme", 0.25), // 2026-03-01 11:00 UTC
            ("1772442000", "beta", 2.0),  // 2026-03-02 09:00 UTC
        ],
        "{body}"
    );

    let top_keys = expand(
        panel_sql(&d, "Top keys by spend"),
        Expansion::Plain,
        "'acme'",
        &env.database,
    );
    let body = run(&env, &top_keys).await.unwrap();
    let first = body.lines().nth(1).unwrap_or_default();
    assert!(first.starts_with("acme\tk1\t1\t"), "{body}");

    let tokens = expand(
        panel_sql(&d, "Tokens by model (days in range)"),
        Expansion::Plugin,
        "'acme'",
        &env.database,
    );
    let body = run(&env, &tokens).await.unwrap();
    assert_eq!(body.lines().count(), 3, "{body}");
    assert!(
        body.lines()
            .nth(1)
            .unwrap()
            .starts_with("gpt\t1\t100\t10\t"),
        "{body}"
    );

    let lines = expand(
        panel_sql(&d, "Invoice lines"),
        Expansion::Plugin,
        "'acme'",
        &env.database,
    );
    let body = run(&env, &lines).await.unwrap();
    assert_eq!(body.lines().count(), 2, "{body}");

    let tenants = run(
        &env,
        &expand(
            "SELECT DISTINCT tenant_id FROM tollgate.ledger ORDER BY tenant_id",
            Expansion::Plugin,
            "",
            &env.database,
        ),
    )
    .await
    .unwrap();
    assert_eq!(tenants, "tenant_id\nacme\nbeta\n");
}

/// The finance check fails naming the panel and quoting ClickHouse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_finance_query_is_reported() {
    let env = TestEnv::new();
    env.migrate().await.unwrap();
    let mut d = load(FINANCE);
    let panel = d["panels"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["title"] == "Spend by model")
        .expect("panel Spend by model");
    let sql = panel["targets"][0]["rawSql"].as_str().unwrap().to_owned();
    panel["targets"][0]["rawSql"] = Value::String(sql.replace("-sum(amount)", "-sum(amout)"));
    let errors = check_finance_queries(&env, &d).await;
    assert_eq!(errors.len(), 6, "{errors:#?}");
    for e in &errors {
        assert!(e.starts_with("panel \"Spend by model\""), "{e}");
        assert!(e.contains("amout") && e.contains("DB::Exception"), "{e}");
    }
    // And the plugin's $__timeInterval is caught on 18.16-compatible SQL.
    let sql = expand(
        "SELECT $__timeInterval(occurred_at) AS time, count() FROM tollgate.ledger GROUP BY time ORDER BY time",
        Expansion::Plugin,
        "'acme'",
        &env.database,
    );
    let version = run(&env, "SELECT version()").await.unwrap();
    if version.lines().nth(1).is_some_and(|v| v.starts_with("18.")) {
        let err = run(&env, &sql)
            .await
            .expect_err("toStartOfInterval is unknown to 18.16");
        assert!(err.contains("toStartOfInterval"), "{err}");
    }
}
