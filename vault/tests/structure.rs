//! The architecture's rules, checked on the source: no import cycle among
//! the vault's top-level modules, no gRPC handler longer than 40 lines, no
//! function outside tests longer than 120 lines in any crate of the
//! workspace, and the CLI's `main.rs` under 100 lines. ARCHITECTURE.md
//! shows the module graph this test computes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_HANDLER_LINES: usize = 40;
const MAX_FN_LINES: usize = 120;
const MAX_MAIN_LINES: usize = 100;
/// Every crate's sources, from the vault's folder.
const CRATES: &[&str] = &[
    "src",
    "../cli/src",
    "../testkit/src",
    "../ledger/src",
    "../policies/src",
    "../sandbox/src",
    "../contracts/src",
    "../benches/src",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The file without its `#[cfg(test)]` module (kept last, by house style)
/// and without line comments.
fn code(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => l[..i].to_owned(),
            _ => l.to_owned(),
        })
        .collect()
}

fn crate_dir(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(rel)
        .canonicalize()
        .unwrap()
}

/// The top-level module a source file belongs to.
fn top_module(path: &Path) -> String {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// Top-level modules each module uses (`crate::x`, `crate::{x, ..}`).
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let m = top_module(&f);
        if m == "lib" {
            continue;
        }
        let text = code(&f).join("\n");
        let uses = graph.entry(m.clone()).or_default();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let names: Vec<&str> = if let Some(inner) = rest.strip_prefix('{') {
                let end = inner.find('}').unwrap_or(inner.len());
                inner[..end]
                    .split(',')
                    .map(|s| s.trim().split("::").next().unwrap_or(""))
                    .collect()
            } else {
                vec![rest
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or("")]
            };
            for n in names {
                let n = n.trim();
                if !n.is_empty() && n != m && n.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                {
                    uses.insert(n.to_owned());
                }
            }
        }
    }
    graph
}

/// Every cycle's members (strongly connected components of two or more).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(m) = todo.pop() {
            for n in graph.get(&m).into_iter().flatten() {
                if seen.insert(n.clone()) {
                    todo.push(n.clone());
                }
            }
        }
        seen
    };
    let mut out: Vec<BTreeSet<String>> = Vec::new();
    for m in graph.keys() {
        let r = reach(m);
        if !r.contains(m) {
            continue;
        }
        let comp: BTreeSet<String> = r.into_iter().filter(|n| reach(n).contains(m)).collect();
        if !out.contains(&comp) {
            out.push(comp);
        }
    }
    out
}

#[test]
fn the_vaults_modules_have_no_import_cycle() {
    let graph = module_graph();
    let found = cycles(&graph);
    let shown: Vec<String> = graph
        .iter()
        .map(|(m, uses)| {
            format!(
                "{m} -> {}",
                uses.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    assert!(
        found.is_empty(),
        "import cycles among {found:?}\nthe graph:\n{}",
        shown.join("\n")
    );
}

/// `(file, line, name, length)` of every function, and whether it is a
/// gRPC handler (a method of a `#[tonic::async_trait]` impl).
fn functions() -> Vec<(PathBuf, usize, String, usize, bool)> {
    let mut files = Vec::new();
    for c in CRATES {
        sources(&crate_dir(c), &mut files);
    }
    let mut out = Vec::new();
    for f in files {
        let lines = code(&f);
        let mut in_service = false;
        let mut i = 0;
        while i < lines.len() {
            let l = &lines[i];
            if l.starts_with("#[tonic::async_trait]") {
                in_service = true;
            } else if l.starts_with('}') {
                in_service = false;
            }
            let t = l.trim_start();
            let is_fn = [
                "fn ",
                "pub fn ",
                "pub(crate) fn ",
                "async fn ",
                "pub async fn ",
                "pub(crate) async fn ",
            ]
            .iter()
            .any(|p| t.starts_with(p));
            if is_fn {
                let indent = l.len() - t.len();
                let name = t
                    .split("fn ")
                    .nth(1)
                    .unwrap_or("")
                    .split(['(', '<'])
                    .next()
                    .unwrap_or("")
                    .to_owned();
                // The body ends at the first closing brace at the same
                // indentation (rustfmt's layout).
                let closing = format!("{}}}", " ".repeat(indent));
                let end = (i..lines.len()).find(|&j| {
                    lines[j] == closing
                        || (j == i && lines[j].trim_end().ends_with('}'))
                        || (lines[j].trim_end().ends_with(';') && j == i)
                });
                if let Some(end) = end {
                    out.push((f.clone(), i + 1, name, end - i + 1, in_service));
                }
            }
            i += 1;
        }
    }
    out
}

#[test]
fn handlers_and_functions_stay_short() {
    let mut long = Vec::new();
    for (file, line, name, len, handler) in functions() {
        let max = if handler {
            MAX_HANDLER_LINES
        } else {
            MAX_FN_LINES
        };
        if len > max {
            let rel = file
                .strip_prefix(crate_dir(".."))
                .unwrap_or(&file)
                .display()
                .to_string();
            long.push(format!(
                "{rel}:{line} `{name}` is {len} lines (at most {max} for a {})",
                if handler { "gRPC handler" } else { "function" }
            ));
        }
    }
    assert!(long.is_empty(), "split these:\n{}", long.join("\n"));
}

#[test]
fn the_cli_main_is_short() {
    let main = crate_dir("../cli/src/main.rs");
    let n = std::fs::read_to_string(&main).unwrap().lines().count();
    assert!(
        n < MAX_MAIN_LINES,
        "{} is {n} lines; at most {}",
        main.display(),
        MAX_MAIN_LINES - 1
    );
}
