//! `xvtpm-swtpm`: libvirt's `swtpm`, `swtpm_setup` and `swtpm_ioctl` for xvtpm vTPMs. Installed
//! under those three names (links) in a directory put first in libvirtd's `PATH`; the name it
//! is run as picks the tool (`xvtpm-swtpm TOOL ARGS…` also works). See
//! `xl_tools::swtpm_compat` and docs/libvirt.md.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use xl_tools::local::Local;
use xl_tools::swtpm_compat::{self, Tool};

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    let argv0 = args.first().cloned().unwrap_or_default();
    let name = std::path::Path::new(&argv0).file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
    let tool = match Tool::from_name(&name) {
        Some(t) if name != "xvtpm-swtpm" => {
            args.remove(0);
            t
        }
        _ => {
            // `xvtpm-swtpm TOOL ARGS…`
            match args.get(1).and_then(|t| Tool::from_name(t)) {
                Some(t) => {
                    args.drain(..2);
                    t
                }
                None => {
                    eprintln!(
                        "xvtpm-swtpm: run it as swtpm, swtpm_setup or swtpm_ioctl (links in a directory first in libvirtd's PATH), \
                         or as `xvtpm-swtpm swtpm|swtpm_setup|swtpm_ioctl ARGS…`; see docs/libvirt.md"
                    );
                    std::process::exit(2);
                }
            }
        }
    };
    let env_path = |k: &str, d: &str| std::env::var_os(k).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(d));
    let vtpm_domain = std::env::var_os("XVTPM_VTPM_DOMAIN").map(PathBuf::from).unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("vtpm-domain")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("vtpm-domain"))
    });
    let sandbox = !matches!(std::env::var("XVTPM_NO_SANDBOX").as_deref(), Ok("1" | "true" | "yes"));
    let local = Local {
        state_dir: env_path("XVTPM_STATE_DIR", "/var/lib/xvtpm"),
        run_dir: env_path("XVTPM_RUN_DIR", "/run/xvtpm"),
        vtpm_domain,
        sandbox,
    };
    std::process::exit(swtpm_compat::main(tool, &local, &args));
}
