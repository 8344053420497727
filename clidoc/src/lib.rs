//! Man pages and shell completions of the xvtpm binaries, generated from their clap
//! definitions, so they cannot drift from what the binaries accept.
//!
//! Each binary (`vtpmmgr`, `vtpm-domain`, `xl-vtpm`) calls [`intercept`] first thing in `main`;
//! `BIN __generate man DIR` then writes `BIN.1` and one page per subcommand
//! (`xl-vtpm-vtpm-create.1`, …) into DIR, and `BIN __generate completions DIR` writes
//! `BIN.bash`, `_BIN` (zsh) and `BIN.fish`. `__generate` is no valid first argument of any of
//! them, is not in their `--help`, and is what `scripts/build-deb.sh` runs to fill the package.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

/// The hidden first argument.
pub const GENERATE: &str = "__generate";

/// If the process was run as `BIN __generate man|completions DIR`, writes them for
/// `command()` named `bin` and exits (0, or 2 with a message); otherwise returns at once.
pub fn intercept(bin: &'static str, command: impl FnOnce() -> clap::Command) {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_none_or(|a| a != GENERATE) {
        return;
    }
    let cmd = command();
    let written = match (
        args.get(2).and_then(|a| a.to_str()),
        args.get(3),
        args.len(),
    ) {
        (Some("man"), Some(dir), 4) => man_pages(cmd, bin, Path::new(dir)),
        (Some("completions"), Some(dir), 4) => completions(cmd, bin, Path::new(dir)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("usage: {bin} {GENERATE} man|completions DIR"),
        )),
    };
    match written {
        Ok(files) => {
            files.iter().for_each(|f| println!("{}", f.display()));
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("{bin}: {GENERATE}: {e}");
            std::process::exit(2)
        }
    }
}

fn named(cmd: clap::Command, bin: &'static str) -> clap::Command {
    cmd.name(bin).bin_name(bin)
}

/// Writes `BIN.1` and a page per (non-hidden) subcommand, `BIN-SUB[-SUBSUB].1`, into `dir`.
pub fn man_pages(cmd: clap::Command, bin: &'static str, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(named(cmd, bin), dir)?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.ends_with(".1") && (n == format!("{bin}.1") || n.starts_with(&format!("{bin}-")))
        })
        .collect();
    pages.sort();
    Ok(pages)
}

/// Writes bash (`BIN.bash`), zsh (`_BIN`) and fish (`BIN.fish`) completions into `dir`.
pub fn completions(cmd: clap::Command, bin: &'static str, dir: &Path) -> io::Result<Vec<PathBuf>> {
    use clap_complete::Shell;
    std::fs::create_dir_all(dir)?;
    let mut cmd = named(cmd, bin);
    [Shell::Bash, Shell::Zsh, Shell::Fish]
        .into_iter()
        .map(|sh| clap_complete::generate_to(sh, &mut cmd, bin, dir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> clap::Command {
        clap::Command::new("some-crate-name")
            .about("A tool")
            .subcommand(
                clap::Command::new("mgr")
                    .about("Manager")
                    .subcommand(clap::Command::new("status").about("Show the status")),
            )
            .subcommand(clap::Command::new("list").about("List them"))
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn a_page_per_subcommand_under_the_binary_name_and_none_for_hidden_ones() {
        let dir = tempfile::tempdir().unwrap();
        let pages = man_pages(sample(), "tool", dir.path()).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["tool-list.1", "tool-mgr-status.1", "tool-mgr.1", "tool.1"]
        );
        let top = std::fs::read_to_string(dir.path().join("tool.1")).unwrap();
        assert!(
            top.contains("tool\\-mgr(1)") && top.contains("tool\\-list(1)"),
            "{top}"
        );
        assert!(
            std::fs::read_to_string(dir.path().join("tool-mgr-status.1"))
                .unwrap()
                .contains("Show the status")
        );
    }

    #[test]
    fn completions_for_bash_zsh_and_fish_know_the_subcommands() {
        let dir = tempfile::tempdir().unwrap();
        let files = completions(sample(), "tool", dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["tool.bash", "_tool", "tool.fish"]);
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(
                text.contains("status")
                    && text.contains("list")
                    && !text.contains("some-crate-name"),
                "{}",
                f.display()
            );
        }
    }
}
