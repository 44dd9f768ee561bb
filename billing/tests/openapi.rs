#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Keeps `billing/openapi.json` (served at `/openapi.json`) honest against
//! the routes the service answers (`admin::routes()`, read off the tables the
//! router is built from): same operations in both
//! directions, each with a unique operationId and at least one response,
//! path parameters declared, and every `$ref` resolving inside the document.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use tollgate_billing::admin::{OPENAPI, routes};

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn doc() -> Value {
    serde_json::from_str(OPENAPI).expect("billing/openapi.json is not valid JSON")
}

/// Follows `$ref`s (document-local only) to the object they point at.
fn deref<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    for _ in 0..16 {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r
                    .strip_prefix('#')
                    .unwrap_or_else(|| panic!("$ref {r} is not local to the document"));
                v = doc
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("$ref {r} does not resolve"));
            }
            None => return v,
        }
    }
    panic!("$ref chain too long (a cycle?)")
}

/// (method, path) → operation, for every operation under `paths`.
fn operations(doc: &Value) -> BTreeMap<(String, String), &Value> {
    let paths = doc["paths"].as_object().expect("`paths` is an object");
    let mut out = BTreeMap::new();
    for (path, item) in paths {
        let item = item
            .as_object()
            .unwrap_or_else(|| panic!("path item {path} is not an object"));
        for (method, operation) in item {
            if METHODS.contains(&method.as_str()) {
                out.insert((method.clone(), path.clone()), operation);
            }
        }
    }
    out
}

#[test]
fn is_openapi_3_1() {
    let doc = doc();
    let version = doc["openapi"].as_str().expect("`openapi` is a string");
    assert!(
        version.starts_with("3.1"),
        "openapi is {version}, want 3.1.x"
    );
    assert!(doc["info"]["title"].is_string());
    assert!(doc["info"]["version"].is_string());
}

#[test]
fn routes_and_paths_match_both_ways() {
    let doc = doc();
    let documented: BTreeSet<(String, String)> = operations(&doc).into_keys().collect();
    let routes = routes();
    let served: BTreeSet<(String, String)> = routes
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(
        served.len(),
        routes.len(),
        "the router lists an operation twice"
    );
    assert!(
        served.len() >= 30,
        "the router lists only {} operations",
        served.len()
    );
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in openapi.json: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "in openapi.json but not served by admin::router: {unserved:?}"
    );
}

#[test]
fn every_operation_has_a_unique_id_and_a_response() {
    let doc = doc();
    let mut ops: Vec<(String, &Value)> = operations(&doc)
        .into_iter()
        .map(|((m, p), op)| (format!("{m} {p}"), op))
        .collect();
    // Webhook operations share the operationId namespace.
    if let Some(webhooks) = doc.get("webhooks").and_then(Value::as_object) {
        for (name, item) in webhooks {
            for method in METHODS {
                if let Some(op) = item.get(method) {
                    ops.push((format!("webhook {name} {method}"), op));
                }
            }
        }
    }
    let mut ids = BTreeMap::new();
    for (what, op) in ops {
        let id = op["operationId"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| panic!("{what} has no operationId"));
        if let Some(other) = ids.insert(id.to_owned(), what.clone()) {
            panic!("operationId {id} is used by both {other} and {what}");
        }
        let responses = op["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{what} has no responses"));
        assert!(!responses.is_empty(), "{what} has no responses");
        for (code, response) in responses {
            let response = deref(&doc, response);
            assert!(
                response["description"].is_string(),
                "{what} response {code} has no description"
            );
        }
    }
}

#[test]
fn path_parameters_are_declared() {
    let doc = doc();
    for ((method, path), op) in operations(&doc) {
        let templated: BTreeSet<&str> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        let mut declared = BTreeSet::new();
        let shared = doc["paths"][&path].get("parameters");
        for list in [shared, op.get("parameters")].into_iter().flatten() {
            for p in list.as_array().expect("parameters is an array") {
                let p = deref(&doc, p);
                if p["in"] == "path" {
                    assert_eq!(
                        p["required"], true,
                        "{method} {path}: path parameter {} must be required",
                        p["name"]
                    );
                    declared.insert(p["name"].as_str().expect("parameter name").to_owned());
                }
            }
        }
        let templated: BTreeSet<String> = templated.into_iter().map(str::to_owned).collect();
        assert_eq!(
            templated, declared,
            "{method} {path}: path template and declared path parameters differ"
        );
    }
}

#[test]
fn every_ref_resolves() {
    fn walk(doc: &Value, v: &Value, at: &str, seen: &mut usize) {
        match v {
            Value::Object(map) => {
                if let Some(r) = map.get("$ref") {
                    let r = r
                        .as_str()
                        .unwrap_or_else(|| panic!("$ref at {at} is not a string"));
                    let pointer = r
                        .strip_prefix('#')
                        .unwrap_or_else(|| panic!("$ref {r} at {at} is not local to the document"));
                    assert!(
                        doc.pointer(pointer).is_some(),
                        "$ref {r} at {at} does not resolve"
                    );
                    *seen += 1;
                }
                for (k, child) in map {
                    walk(doc, child, &format!("{at}/{k}"), seen);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    walk(doc, child, &format!("{at}/{i}"), seen);
                }
            }
            _ => {}
        }
    }
    let doc = doc();
    let mut seen = 0;
    walk(&doc, &doc, "#", &mut seen);
    assert!(seen > 0, "the document uses no $ref (components expected)");
}

#[test]
fn security_schemes_used_are_defined() {
    let doc = doc();
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("components.securitySchemes");
    for ((method, path), op) in operations(&doc) {
        let security = op
            .get("security")
            .or_else(|| doc.get("security"))
            .and_then(Value::as_array);
        let names: Vec<&String> = security
            .into_iter()
            .flatten()
            .flat_map(|req| req.as_object().expect("security requirement").keys())
            .collect();
        for name in &names {
            assert!(
                schemes.contains_key(*name),
                "{method} {path} uses undefined security scheme {name}"
            );
        }
        let open = matches!(path.as_str(), "/openapi.json" | "/healthz" | "/metrics");
        if open {
            assert!(names.is_empty(), "{method} {path} must be unauthenticated");
        } else {
            assert!(
                !names.is_empty(),
                "{method} {path} has no security requirement"
            );
        }
        if path.starts_with("/admin/") {
            assert!(
                names.iter().any(|n| *n == "adminKey"),
                "{method} {path} must take the master key"
            );
        }
        if path.starts_with("/v1/billing/") {
            assert!(
                names.iter().any(|n| *n == "tenantKey"),
                "{method} {path} must take a tenant key"
            );
        }
    }
}
