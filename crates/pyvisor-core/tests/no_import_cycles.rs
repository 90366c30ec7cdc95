//! The crate's modules form layers: no module imports (through `crate::` or `super::` paths in
//! code, doc links aside) a module that imports it back, directly or through others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`dispatch::slot`, `""` for lib.rs) → its source without comment lines.
fn modules(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("src is readable").filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if p.is_dir() {
            modules(&p, &join(prefix, &name), out);
        } else if let Some(stem) = name.strip_suffix(".rs") {
            let module = match stem {
                "lib" | "mod" => prefix.to_string(),
                s => join(prefix, s),
            };
            let text = std::fs::read_to_string(&p).expect("source is readable");
            let code: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect();
            out.insert(module, code.join("\n"));
        }
    }
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}::{b}")
    }
}

/// The longest known module that `path` starts with.
fn resolve(path: &str, known: &BTreeMap<String, String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    (1..=parts.len()).rev().map(|i| parts[..i].join("::")).find(|c| known.contains_key(c))
}

/// Paths after `marker` (`crate::`, `super::`) in `code`.
fn references<'a>(code: &'a str, marker: &str) -> Vec<&'a str> {
    code.match_indices(marker)
        .map(|(i, _)| {
            let rest = &code[i + marker.len()..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
            rest[..end].trim_end_matches(':')
        })
        .collect()
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut mods = BTreeMap::new();
    modules(&src, "", &mut mods);
    assert!(mods.len() > 20, "found the crate's modules: {:?}", mods.keys());
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, code) in &mods {
        // Unit-test modules may reach anywhere.
        let code = code.split("#[cfg(test)]").next().unwrap_or("");
        let parent = m.rsplit_once("::").map_or("", |(p, _)| p);
        let mut targets: Vec<String> = references(code, "crate::").into_iter().filter_map(|r| resolve(r, &mods)).collect();
        targets.extend(references(code, "super::").into_iter().filter_map(|r| resolve(&join(parent, r), &mods)));
        let e = edges.entry(m.clone()).or_default();
        e.extend(targets.into_iter().filter(|t| !t.is_empty() && t != m && !m.starts_with(&format!("{t}::"))));
    }
    // A cycle is a back edge in a depth-first search.
    fn visit(n: &str, edges: &BTreeMap<String, BTreeSet<String>>, stack: &mut Vec<String>, done: &mut BTreeSet<String>, found: &mut Vec<String>) {
        stack.push(n.to_string());
        for t in edges.get(n).into_iter().flatten() {
            if let Some(i) = stack.iter().position(|s| s == t) {
                found.push(format!("{} -> {t}", stack[i..].join(" -> ")));
            } else if !done.contains(t) {
                visit(t, edges, stack, done, found);
            }
        }
        stack.pop();
        done.insert(n.to_string());
    }
    let (mut done, mut found) = (BTreeSet::new(), Vec::new());
    for m in mods.keys() {
        if !done.contains(m) {
            visit(m, &edges, &mut Vec::new(), &mut done, &mut found);
        }
    }
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}
