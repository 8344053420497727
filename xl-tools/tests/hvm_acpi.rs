//! The ACPI tables `xl-vtpm create` gives an HVM guest with a CRB TPM (`model=crb`), checked by
//! the ACPI reference disassembler (ACPICA's `iasl -d`, Debian's acpica-tools): what a guest's
//! ACPI interpreter reads must be a TPM2 table with the CRB start method and control area, and a
//! `MSFT0101` device over QEMU's tpm-crb registers.

use std::process::Command;

use xl_tools::hvm_acpi;

fn disassemble(name: &str, bytes: &[u8]) -> String {
    let d = testkit::tempdir();
    let f = d.path().join(format!("{name}.dat"));
    std::fs::write(&f, bytes).unwrap();
    let out = Command::new("iasl")
        .arg("-d")
        .arg(&f)
        .current_dir(d.path())
        .output()
        .expect("iasl (Debian package acpica-tools; `make deps` installs it)");
    assert!(out.status.success(), "iasl -d {name}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(d.path().join(format!("{name}.dsl"))).unwrap()
}

/// The disassembly without comments and with whitespace collapsed.
fn flat(dsl: &str) -> String {
    dsl.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .filter(|l| !l.trim_start().starts_with('*') && !l.trim_start().starts_with("/*"))
        .collect::<Vec<_>>()
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn the_tpm2_table_names_the_crb_control_area() {
    let dsl = disassemble("tpm2", &hvm_acpi::tpm2_table());
    for want in [
        "Signature : \"TPM2\"",
        "Revision : 04",
        "Platform Class : 0000",
        "Control Address : 00000000FED40040",
        "Start Method : 07 [Command Response Buffer]",
    ] {
        assert!(flat(&dsl).contains(want), "{want:?} not in\n{dsl}");
    }
    assert!(!dsl.contains("Invalid") && !dsl.contains("Warning"), "{dsl}");
}

#[test]
fn the_ssdt_declares_a_tpm2_device_over_the_crb_registers() {
    let dsl = disassemble("ssdt", &hvm_acpi::ssdt());
    let f = flat(&dsl);
    for want in [
        "DefinitionBlock (\"\", \"SSDT\", 2, \"XVTPM \", \"XVTPMCRB\", 0x00000001)",
        "Scope (\\_SB) { Device (VTPM) { Name (_HID, \"MSFT0101\" /* TPM 2.0 Security Device */)",
        "Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, 0xFED40000, 0x00001000, ) }) } }",
    ] {
        assert!(f.contains(want), "{want:?} not in\n{f}\n\n{dsl}");
    }
}

#[test]
fn the_acpi_firmware_file_is_both_tables_back_to_back() {
    let all = hvm_acpi::crb_tables();
    assert_eq!(hvm_acpi::table_signatures(&all).unwrap(), vec![*b"TPM2", *b"SSDT"]);
    let tpm2 = hvm_acpi::tpm2_table();
    assert_eq!(&all[..tpm2.len()], &tpm2[..]);
    assert_eq!(&all[tpm2.len()..], &hvm_acpi::ssdt()[..]);
}
