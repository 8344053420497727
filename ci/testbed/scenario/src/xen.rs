//! dom0 helpers: xl, xenstore, guest consoles, kernel modules, the log dump, JSON fields.

use std::fs;

use serde_json::Value;

use crate::cmd::Cmd;
use crate::runner::{Cx, Errs};

/// `NAME=value` from dom0's kernel command line (the last one wins).
pub fn cmdline_arg(name: &str) -> Option<String> {
    let line = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    line.split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .map(str::to_string)
}

/// `xl domid NAME`.
pub fn domid(name: &str) -> Option<String> {
    let o = Cmd::new(&["xl", "domid", name])
        .split()
        .run_for(std::time::Duration::from_secs(30));
    if o.ok() {
        let d = o.stdout.trim().to_string();
        if !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()) {
            return Some(d);
        }
    }
    None
}

/// Xen's `Triple fault` lines in its console ring (`xl dmesg`): an HVM guest's vCPU faulted while
/// raising a double fault, and Xen reset the domain (its on_reboot). Each names its domain, and
/// domids are not reused, so a line not seen before is a new fault.
pub fn triple_faults() -> Vec<String> {
    let o = Cmd::new(&["xl", "dmesg"]).split().run_for(std::time::Duration::from_secs(30));
    o.stdout.lines().filter(|l| l.contains("Triple fault")).map(|l| l.trim().to_string()).collect()
}

pub fn domain_gone(name: &str) -> bool {
    domid(name).is_none()
}

/// `xl destroy NAME` (capped by the phase).
pub fn xl_destroy(cx: &Cx, name: &str, secs: u64) -> crate::cmd::Output {
    Cmd::new(&["xl", "destroy", name]).secs(secs).run(cx)
}

/// `xl destroy NAME` if it runs (cleanup; no verdict).
pub fn destroy_if_running(cx: &Cx, name: &str) {
    if domid(name).is_some() {
        xl_destroy(cx, name, 60);
    }
}

/// A guest that powers itself off at the end: gone within 60 s, else `guest-did-not-power-off`
/// and `xl destroy`.
pub fn poweroff_or_destroy(cx: &Cx, name: &str, e: &mut Errs) {
    if !cx.wait_until(60, || domain_gone(name)) {
        e.add("guest-did-not-power-off");
        xl_destroy(cx, name, 60);
    }
}

/// CHECK `check`: domain NAME gone within 30 s (`gone`: the detail then; else its `xl list` row).
pub fn gone_check(cx: &Cx, e: &mut Errs, check: &str, name: &str, gone: impl FnOnce() -> String) {
    let ok = cx.wait_until(30, || domain_gone(name));
    e.check(
        check,
        ok,
        if ok {
            gone()
        } else {
            format!(
                "{name} still there: {}",
                Cmd::new(&["xl", "list", name]).run(cx).tail(1)
            )
        },
    );
}

/// `xl destroy NAME` and the domain gone within 30 s (`xl-destroy-rc=N`, `guest-still-there`).
pub fn destroy_and_wait(cx: &Cx, name: &str, e: &mut Errs) {
    let o = xl_destroy(cx, name, 60);
    if !o.ok() {
        e.add(format!("xl-destroy-rc={}", o.rc));
    }
    if !cx.wait_until(30, || domain_gone(name)) {
        e.add("guest-still-there");
    }
}

pub fn xs_read(path: &str) -> Option<String> {
    let o = Cmd::new(&["xenstore-read", path])
        .split()
        .run_for(std::time::Duration::from_secs(30));
    o.ok().then(|| o.stdout.trim_end_matches('\n').to_string())
}

/// `xenstore-ls -f PATH` lines (empty when it fails).
pub fn xs_ls(path: &str) -> Vec<String> {
    let o = Cmd::new(&["xenstore-ls", "-f", path])
        .split()
        .run_for(std::time::Duration::from_secs(30));
    o.stdout.lines().map(str::to_string).collect()
}

pub fn xs_write(path: &str, val: &str) -> bool {
    Cmd::new(&["xenstore-write", path, val])
        .run_for(std::time::Duration::from_secs(30))
        .ok()
}

/// The guest console log of domain NAME (xenconsoled).
pub fn clog(name: &str) -> String {
    format!("/var/log/xen/console/guest-{name}.log")
}

/// The whole console of NAME, without CRs.
pub fn console(name: &str) -> String {
    read_text(&clog(name))
}

/// The console after its first `off` lines (this boot only).
pub fn console_from(name: &str, off: usize) -> String {
    console(name)
        .lines()
        .skip(off)
        .map(|l| format!("{l}\n"))
        .collect()
}

pub fn lines_of(path: &str) -> usize {
    read_text(path).lines().count()
}

pub fn read_text(path: &str) -> String {
    String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).replace('\r', "")
}

/// The value of `key` in `/etc/xvtpm-testbed.env` (build-images.sh writes it: one `key=value`
/// per line), trimmed; None if the key is absent.
pub fn testbed_env(key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    read_text("/etc/xvtpm-testbed.env")
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()).map(|v| v.trim().to_string()))
}

/// A line of `text` that contains `a` and, after it, `b` (`grep -E 'a.*b'`).
pub fn has_seq(text: &str, a: &str, b: &str) -> bool {
    text.lines()
        .any(|l| l.find(a).is_some_and(|i| l[i + a.len()..].contains(b)))
}

/// The first line starting with `prefix`, the rest of it.
pub fn after_prefix(text: &str, prefix: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(str::to_string)
}

/// `key=value` token from a line.
pub fn token(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

/// The console of NAME, guest lines prefixed `[NAME] `, blank ones dropped, last `n`.
pub fn show_console(name: &str, n: usize, filter: impl Fn(&str) -> bool) {
    let c = console(name);
    let lines: Vec<&str> = c
        .lines()
        .filter(|l| !l.trim().is_empty() && filter(l))
        .collect();
    for l in &lines[lines.len().saturating_sub(n)..] {
        println!("[{name}] {l}");
    }
}

/// `src` (a domain config) with every line that starts with one of the prefixes replaced by
/// its line.
pub fn cfg_from(src: &str, set: &[(&str, String)]) -> String {
    src.lines()
        .map(|l| match set.iter().find(|(p, _)| l.starts_with(p)) {
            Some((_, new)) => format!("{new}\n"),
            None => format!("{l}\n"),
        })
        .collect()
}

/// The lines of a config that start with one of `keys`, printed as `[prefix] line`.
pub fn show_cfg(prefix: &str, text: &str, keys: &[&str]) {
    for l in text
        .lines()
        .filter(|l| keys.iter().any(|k| l.starts_with(k)))
    {
        println!("[{prefix}] {l}");
    }
}

/// The names in a directory (empty when it cannot be read).
pub fn dir_names(dir: &str) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Loads a module and its dependencies (build-time `.deps` order).
pub fn modload(m: &str) -> bool {
    let deps =
        fs::read_to_string(format!("/lib/modules/{m}.deps")).unwrap_or_else(|_| m.to_string());
    let loaded = fs::read_to_string("/proc/modules").unwrap_or_default();
    for d in deps.split_whitespace() {
        let key = format!("{} ", d.replace('-', "_"));
        if loaded.lines().any(|l| l.starts_with(&key)) {
            continue;
        }
        let ko = format!("/lib/modules/{d}.ko");
        if !Cmd::new(&["insmod", &ko])
            .run_for(std::time::Duration::from_secs(60))
            .ok()
        {
            return false;
        }
    }
    true
}

/// A log file onto the serial console; run.sh saves it as `dom0/NAME.log`.
pub fn dump_log(name: &str, file: &str, lines: usize) {
    if !std::path::Path::new(file).is_file() {
        return;
    }
    println!("LOGDUMP-BEGIN {name} {file} (last {lines} lines)");
    let t = read_text(file);
    for l in crate::cmd::tail_lines(&t, lines).lines() {
        println!("| {l}");
    }
    println!("LOGDUMP-END {name}");
}

/// 32 random bytes as hex (a nonce).
pub fn nonce(n: usize) -> String {
    let mut b = vec![0u8; n];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    hex::encode(b)
}

/// A JSON value as the CHECK lines print it: strings bare, null as `null`,
/// missing as empty. The key is looked up at the top level first, then in nested objects
/// (`vtpm create --domain --json` has the domid in `domain`).
pub fn jf(v: &Value, key: &str) -> String {
    match find_key(v, key) {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) => "null".into(),
        Some(x) => x.to_string(),
    }
}

/// The first value of `key` in `v`: the top level first, then depth-first.
pub fn find_key<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    if let Some(x) = v.get(key) {
        return Some(x);
    }
    match v {
        Value::Object(m) => m.values().find_map(|x| find_key(x, key)),
        Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

/// The object anywhere in `v` whose `key` is the string `val`.
pub fn find_obj<'a>(v: &'a Value, key: &str, val: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => {
            if m.get(key).and_then(Value::as_str) == Some(val) {
                return Some(v);
            }
            m.values().find_map(|x| find_obj(x, key, val))
        }
        Value::Array(a) => a.iter().find_map(|x| find_obj(x, key, val)),
        _ => None,
    }
}

/// Parses the first JSON value in `s` (output may have other lines after it).
pub fn parse_json(s: &str) -> Option<Value> {
    let start = s.find(['{', '['])?;
    let mut it = serde_json::Deserializer::from_str(&s[start..]).into_iter::<Value>();
    it.next().and_then(Result::ok)
}

/// Backing files of the loop devices whose image lies under `/vtpms/UUID/`.
pub fn vd_loop(uuid: &str) -> Vec<String> {
    if uuid.is_empty() {
        return Vec::new();
    }
    let mut v = Vec::new();
    if let Ok(rd) = fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if !n.starts_with("loop") {
                continue;
            }
            let bf = read_text(&format!("/sys/block/{n}/loop/backing_file"));
            if bf.contains(&format!("/vtpms/{uuid}/")) {
                v.push(format!("/dev/{n}"));
            }
        }
    }
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields_as_the_checks_print_them() {
        let v = parse_json("note\n[{\"guest_name\":\"life-a\",\"vtpm_pid\":null,\"guest_domid\":7,\"state\":\"running\"}]\n").unwrap();
        let row = find_obj(&v, "guest_name", "life-a").unwrap();
        assert_eq!(jf(row, "vtpm_pid"), "null");
        assert_eq!(jf(row, "guest_domid"), "7");
        assert_eq!(jf(row, "state"), "running");
        assert_eq!(jf(row, "nope"), "");
        assert!(find_obj(&v, "guest_name", "life-b").is_none());
        // vtpm create --domain --json: the domid is in "domain", the uuid at the top
        let c =
            parse_json(r#"{"uuid":"u1","runtime":null,"domain":{"uuid":"u1","domid":8}}"#).unwrap();
        assert_eq!(
            (jf(&c, "uuid"), jf(&c, "domid"), jf(&c, "runtime")),
            ("u1".into(), "8".into(), "null".into())
        );
    }

    #[test]
    fn a_config_from_another_replaces_whole_lines_by_prefix() {
        let src =
            "name = \"life-a\"\n# uuid = \"x\"\nvtpm = [ \"backend=0\" ]\nextra = \"role=life\"\n";
        let t = cfg_from(
            src,
            &[
                ("name = ", "name = \"life-b\"".into()),
                ("vtpm = ", "vtpm = [ \"backend=0,uuid=U\" ]".into()),
            ],
        );
        assert_eq!(
            t,
            "name = \"life-b\"\n# uuid = \"x\"\nvtpm = [ \"backend=0,uuid=U\" ]\nextra = \"role=life\"\n"
        );
    }

    #[test]
    fn console_patterns() {
        let c = "GUEST-UP role=plain boot=1 wall=12.5 up=3.25 kernel=x\nGUEST-DONE role=plain boot=1 result=ok up=9\n";
        assert!(has_seq(c, "GUEST-DONE role=plain ", "result=ok"));
        assert!(!has_seq(c, "GUEST-UP ", "result=ok"));
        let up = after_prefix(c, "GUEST-UP ").unwrap();
        assert_eq!(token(&up, "wall").as_deref(), Some("12.5"));
        assert_eq!(token(&up, "up").as_deref(), Some("3.25"));
    }
}
