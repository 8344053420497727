//! Build script: locate libxenevtchn and libxengnttab with pkg-config and
//! generate bindings for them with bindgen (into `OUT_DIR`, never committed,
//! because the headers are version-stable `.so.1` ABIs shipped by libxen-dev).

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=build.rs");

    let mut include_paths = Vec::new();
    for lib in ["xenevtchn", "xengnttab"] {
        match pkg_config::Config::new().probe(lib) {
            Ok(found) => include_paths.extend(found.include_paths),
            Err(e) => panic!("{lib} not found via pkg-config (install libxen-dev): {e}"),
        }
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR not set by cargo"));
    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_args(include_paths.iter().map(|p| format!("-I{}", p.display())))
        .allowlist_function("xenevtchn_.*|xengnttab_.*|xengntshr_.*")
        .allowlist_type("xenevtchn_.*|xengnttab_.*|xengntshr_.*|evtchn_port_t")
        .wrap_unsafe_ops(true)
        .layout_tests(true)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .expect("bindgen failed to generate Xen evtchn/gnttab bindings");
    bindings
        .write_to_file(out_dir.join("xen_bindings.rs"))
        .expect("could not write Xen bindings");
}
