//! The product crates' module graphs have no import circle: inside each crate, imports between
//! modules go one way (ARCHITECTURE.md's code map names the direction per crate). A module's
//! imports are the `crate::NAME` and `super::NAME` paths in its code (comments, string literals
//! and its `#[cfg(test)] mod tests` are not imports).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace holds tests/").to_path_buf()
}

/// Module (a `src/*.rs` file, or a `src/NAME/` directory as one module) → its source files.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let p = e.path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            let mut files = vec![];
            let mut stack = vec![p.clone()];
            while let Some(d) = stack.pop() {
                for f in std::fs::read_dir(&d).unwrap().flatten().map(|f| f.path()) {
                    if f.is_dir() {
                        stack.push(f);
                    } else if f.extension().is_some_and(|x| x == "rs") {
                        files.push(f);
                    }
                }
            }
            out.entry(name).or_default().extend(files);
        } else if p.extension().is_some_and(|x| x == "rs") && name != "lib" && name != "main" {
            out.entry(name).or_default().push(p);
        }
    }
    out
}

/// The code of a file without comments, string literals and the unit-test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        let mut in_str = false;
        let mut esc = false;
        for c in line.chars() {
            if in_str {
                match (esc, c) {
                    (true, _) => esc = false,
                    (false, '\\') => esc = true,
                    (false, '"') => in_str = false,
                    _ => {}
                }
                continue;
            }
            if c == '"' {
                in_str = true;
            }
            out.push(c);
        }
        out.push('\n');
    }
    out
}

/// The names `text` imports through `crate::` (and, in a top-level file, `super::`) paths,
/// including `use crate::{a, b::c}`.
fn imported(text: &str, top_level: bool) -> BTreeSet<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut names = BTreeSet::new();
    let prefixes: &[&str] = if top_level { &["crate::", "super::"] } else { &["crate::"] };
    for prefix in prefixes {
        for (i, _) in text.match_indices(prefix) {
            let before = text[..i].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let rest = &text[i + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                for item in group.split(',') {
                    names.insert(ident(item.trim()));
                }
            } else {
                names.insert(ident(rest));
            }
        }
    }
    names
}

fn graph(krate: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = workspace().join(krate).join("src");
    let mods = modules(&src);
    mods.iter()
        .map(|(m, files)| {
            let deps = files
                .iter()
                .flat_map(|f| imported(&code(&std::fs::read_to_string(f).unwrap()), f.parent() == Some(src.as_path())))
                .filter(|d| d != m && mods.contains_key(d))
                .collect();
            (m.clone(), deps)
        })
        .collect()
}

/// One circle of `g`, if it has any (depth-first search for a back edge).
fn circle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(g: &BTreeMap<String, BTreeSet<String>>, m: &str, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut c = path[i..].to_vec();
            c.push(m.to_string());
            return Some(c);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in &g[m] {
            if let Some(c) = visit(g, d, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|m| visit(g, m, &mut vec![], &mut done))
}

#[test]
fn the_parser_sees_imports_and_circles() {
    let t = code("use crate::{a, b::X};\n// crate::c\nlet s = \"crate::d\";\nfn f() { crate::e::g(); super::h::i() }\n");
    assert_eq!(imported(&t, true), ["a", "b", "e", "h"].map(String::from).into_iter().collect());
    let g: BTreeMap<String, BTreeSet<String>> =
        [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"])].map(|(m, d)| (m.to_string(), d.into_iter().map(String::from).collect())).into();
    assert!(circle(&g).is_some());
}

#[test]
fn no_import_circle_inside_a_product_crate() {
    for krate in ["vtpmmgr", "vtpm-domain", "xl-tools", "vtpm-proto", "vtpm-engine", "xen-platform"] {
        let g = graph(krate);
        assert!(g.len() > 1, "{krate}: no modules found");
        if let Some(c) = circle(&g) {
            panic!("{krate}: import circle {}; the graph: {g:#?}", c.join(" → "));
        }
    }
}
