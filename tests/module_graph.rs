//! The import graph of `src/`: no cycle between files or between top-level
//! modules, and the data walks one way (amqp → stage → router → ws).
//!
//! Read from the source text, the way a newcomer reads it: every
//! `crate::…` path (in `use` trees and inline) and every `super::…` path
//! outside comments and the `#[cfg(test)]` module at a file's end.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// Module path (`ws::session`) → its source, test module cut off.
fn modules() -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    collect(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src").as_path(),
        "",
        &mut found,
    );
    found
}

fn collect(dir: &Path, prefix: &str, found: &mut BTreeMap<String, String>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        if path.is_dir() {
            collect(&path, &format!("{prefix}{stem}::"), found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let name = match stem.as_str() {
                "lib" | "main" => continue,
                "mod" => prefix.trim_end_matches("::").to_string(),
                _ => format!("{prefix}{stem}"),
            };
            found.insert(name, code_of(&fs::read_to_string(&path).unwrap()));
        }
    }
}

/// The text without comments and without the trailing test module.
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod ").next().unwrap();
    text.lines()
        .map(|line| line.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path a file names: `use crate::{a::{b, c}, d}` gives `a::b`,
/// `a::c`, `d`; an inline `crate::x::y` gives `x::y`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let end = if rest.starts_with('{') {
            group_end(rest)
        } else {
            rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':' || c == '{'))
                .unwrap_or(rest.len())
        };
        let tree = &rest[..end];
        let tree = match tree.find('{') {
            Some(open) => &rest[..open + group_end(&rest[open..])],
            None => tree,
        };
        expand("", tree, &mut paths);
    }
    paths
}

/// The length of the `{…}` group at the start of `text`, braces included.
fn group_end(text: &str) -> usize {
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 1 => return i + 1,
            '}' => depth -= 1,
            _ => {}
        }
    }
    text.len()
}

fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        out.push(format!("{prefix}{tree}"));
        return;
    };
    let head = format!("{prefix}{}", &tree[..open]);
    let body = &tree[open + 1..tree.len() - 1];
    let (mut depth, mut start) = (0, 0);
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                expand(&head, &body[start..i], out);
                start = i + 1;
            }
            _ => {}
        }
    }
    expand(&head, &body[start..], out);
}

/// File-level edges: module → the modules it names (never itself, its
/// parent or its own children: a `mod.rs` declares those).
fn edges(modules: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges = BTreeMap::new();
    for (name, code) in modules {
        let parent = name.rsplit_once("::").map_or("", |(p, _)| p);
        let mut named: Vec<String> = crate_paths(code);
        named.extend(code.match_indices("super::").map(|(at, _)| {
            let rest = &code[at + "super::".len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if parent.is_empty() {
                rest[..end].to_string()
            } else {
                format!("{parent}::{}", &rest[..end])
            }
        }));
        let targets = named
            .iter()
            .filter_map(|path| longest_module(modules, path));
        let targets = targets.filter(|t| {
            t != name
                && !name.starts_with(&format!("{t}::"))
                && !t.starts_with(&format!("{name}::"))
        });
        edges.insert(name.clone(), targets.collect());
    }
    edges
}

fn longest_module(modules: &BTreeMap<String, String>, path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    (1..=parts.len())
        .rev()
        .map(|k| parts[..k].join("::"))
        .find(|m| modules.contains_key(m))
}

fn top(module: &str) -> String {
    module.split("::").next().unwrap().to_string()
}

/// A cycle through `from`, as the modules along it, if there is one.
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![from.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        for next in graph.get(path.last().unwrap()).into_iter().flatten() {
            if next == from {
                return Some([path.clone(), vec![next.clone()]].concat());
            }
            if seen.insert(next.clone()) {
                stack.push([path.clone(), vec![next.clone()]].concat());
            }
        }
    }
    None
}

fn top_level(edges: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, targets) in edges {
        for to in targets.iter().filter(|t| top(t) != top(from)) {
            graph.entry(top(from)).or_default().insert(top(to));
        }
    }
    graph
}

#[test]
fn the_parser_reads_use_trees_and_inline_paths() {
    let code = "use crate::{a::{b, c::D}, e};\nfn f() { crate::g::h(1); }";
    assert_eq!(crate_paths(code), ["a::b", "a::c::D", "e", "g::h"]);
}

#[test]
fn no_file_imports_itself_through_others() {
    let edges = edges(&modules());
    assert!(edges.contains_key("ws::session") && edges["ws::session"].contains("router"));
    let cycles: Vec<_> = edges
        .keys()
        .filter_map(|m| cycle_through(&edges, m))
        .collect();
    assert!(cycles.is_empty(), "import cycles between files: {cycles:?}");
}

#[test]
fn no_top_level_module_imports_itself_through_others() {
    let graph = top_level(&edges(&modules()));
    let cycles: Vec<_> = graph
        .keys()
        .filter_map(|m| cycle_through(&graph, m))
        .collect();
    assert!(
        cycles.is_empty(),
        "import cycles between modules: {cycles:?}"
    );
}

#[test]
fn the_data_walks_one_way() {
    let graph = top_level(&edges(&modules()));
    for (from, upstream) in [
        ("router", "amqp"),
        ("router", "ws"),
        ("router", "stage"),
        ("ws", "amqp"),
        ("stage", "amqp"),
        ("stage", "cluster"),
        ("inbox", "stage"),
        ("inbox", "router"),
    ] {
        let imports = graph.get(from).cloned().unwrap_or_default();
        assert!(!imports.contains(upstream), "{from} imports {upstream}");
    }
}
