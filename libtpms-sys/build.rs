//! Build script: locate libtpms with pkg-config and generate bindings with bindgen.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=build.rs");

    let lib = match pkg_config::Config::new()
        .atleast_version("0.9")
        .probe("libtpms")
    {
        Ok(lib) => lib,
        Err(e) => {
            panic!("libtpms >= 0.9 not found via pkg-config (install libtpms-dev): {e}");
        }
    };

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR not set by cargo"));
    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_args(lib.include_paths.iter().map(|p| format!("-I{}", p.display())))
        .allowlist_function("TPMLIB_.*|TPM_Malloc|TPM_Free")
        .allowlist_type("libtpms_callbacks|TPMLIB_.*|TPM_RESULT|TPM_BOOL|TPM_MODIFIER_INDICATOR")
        .allowlist_var(
            "TPM_SUCCESS|TPM_FAIL|TPM_RETRY|TPM_BAD_PARAMETER|TPM_SIZE|TPM_.*_NAME|TPM_LIBRARY_VER_.*|TPMLIB_INITSTATE_.*",
        )
        .rustified_enum("TPMLIB_TPMVersion")
        .wrap_unsafe_ops(true)
        .layout_tests(true)
        .derive_default(true)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .expect("bindgen failed to generate libtpms bindings");
    bindings
        .write_to_file(out_dir.join("libtpms.rs"))
        .expect("could not write libtpms bindings");
}
