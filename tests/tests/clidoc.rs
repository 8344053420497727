//! The man pages and shell completions generated from the binaries' clap definitions
//! (`BIN __generate man|completions DIR`, what the Debian package ships) cover every
//! subcommand the binaries' own `--help` lists, at every depth.

use std::path::Path;
use std::process::Command;

use testkit::bin_path;

/// The subcommands `BIN PATH... --help` lists (its "Commands:" section, without `help`).
fn subcommands(bin: &str, path: &[String]) -> Vec<String> {
    let out = Command::new(bin_path(bin))
        .args(path)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{bin} {path:?} --help: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(
        !help.contains("__generate"),
        "the generator shows in {bin} {path:?} --help"
    );
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l.starts_with("   ")) // a wrapped description
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

/// Every subcommand path under `path`, depth first.
fn walk(bin: &str, path: Vec<String>, all: &mut Vec<Vec<String>>) {
    for c in subcommands(bin, &path) {
        let mut p = path.clone();
        p.push(c);
        all.push(p.clone());
        walk(bin, p, all);
    }
}

fn generate(bin: &str, what: &str, dir: &Path) {
    let out = Command::new(bin_path(bin))
        .args(["__generate", what])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{bin} __generate {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_subcommand_has_a_man_page_its_parent_names_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let (man, comp) = (dir.path().join("man"), dir.path().join("completions"));
    let mut seen = 0;
    for bin in ["vtpmmgr", "vtpm-domain", "xl-vtpm"] {
        generate(bin, "man", &man);
        generate(bin, "completions", &comp);
        let page = |path: &[String]| {
            std::iter::once(bin.to_string())
                .chain(path.iter().cloned())
                .collect::<Vec<_>>()
                .join("-")
        };
        let read = |name: &str| {
            std::fs::read_to_string(man.join(format!("{name}.1")))
                .unwrap_or_else(|e| panic!("{name}.1: {e}"))
        };
        let top = read(bin);
        assert!(top.contains(".TH"), "{bin}.1 is not a man page");
        let mut all = vec![];
        walk(bin, vec![], &mut all);
        for path in &all {
            let own = read(&page(path));
            assert!(own.contains(".TH"), "{}.1", page(path));
            let parent = read(&page(&path[..path.len() - 1]));
            let mention = format!("{}(1)", page(path).replace('-', "\\-"));
            assert!(
                parent.contains(&mention),
                "{}.1 does not name {mention}",
                page(&path[..path.len() - 1])
            );
            for f in [
                format!("{bin}.bash"),
                format!("_{bin}"),
                format!("{bin}.fish"),
            ] {
                let text = std::fs::read_to_string(comp.join(&f)).unwrap();
                assert!(
                    text.contains(path.last().unwrap().as_str()),
                    "{f} lacks {path:?}"
                );
            }
        }
        seen += all.len();
    }
    // vtpmmgr's three and xl-vtpm's nested ones (vtpm-domain has none).
    assert!(
        seen >= 30,
        "only {seen} subcommands found: is the --help parsing right?"
    );
}
