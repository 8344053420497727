//! An HVM guest's TPM emulated by its device model (docs/hvm.md).
//!
//! Windows and OVMF have no tpmif driver, so an HVM guest gets its TPM the way a QEMU/KVM guest
//! does: the device model (QEMU in dom0) emulates a TIS TPM and forwards every command over
//! swtpm's socket protocol to the guest's `vtpm-domain` (`-tpmdev emulator`). `vtpm = [
//! "model=tis" ]` in the guest's config asks for it; `xl-vtpm create` then
//!
//! 1. checks the config ([`check`]): an HVM guest, a device model that runs in dom0 and is
//!    QEMU upstream, no TPM of the user's own in its arguments, and the uid libxl runs QEMU as
//!    ([`dm_uid`]);
//! 2. starts the vTPM on xl-vtpm's default sockets (`<run-dir>/vtpms/<uuid>/tpm.sock{,.ctrl}`,
//!    the directory owned by that uid, which is also the one uid besides root the vTPM serves);
//! 3. replaces the `vtpm=` line with QEMU's arguments ([`apply`]), appended to the user's own
//!    `device_model_args_hvm`, and hands that config to xl.
//!
//! A reboot of the guest is a platform reset: libxl ends the device model (QEMU sends
//! `CMD_SHUTDOWN`; the vTPM powers its TPM off and keeps serving) and starts a new one on the
//! same control socket, whose start-up `CMD_INIT` powers the TPM on with PCRs reset.

use std::path::Path;

use crate::xlcfg::{TpmModel, Value, XlConfig};

/// Whether the config describes an HVM guest (`type = "hvm"`, or the older `builder = "hvm"`
/// when `type` is not set), as xl decides.
pub fn is_hvm(cfg: &XlConfig) -> bool {
    match cfg.get_str("type") {
        Some(t) => t == "hvm",
        None => cfg.get_str("builder") == Some("hvm"),
    }
}

/// The user libxl names for a device model with these settings (`libxl_dm.c`,
/// `libxl__domain_get_device_model_uid`), resolved to its uid; `None`: QEMU runs as root.
///
/// * `device_model_user = "NAME"`: that user (libxl passes `-runas NAME`);
/// * otherwise, without `dm_restrict = 1`: root;
/// * `dm_restrict = 1`: `xen-qemuuser-range-base` + the domid if that user exists (a uid that
///   is known only once xl has made the domain: refused, name one with `device_model_user`),
///   else `xen-qemuuser-shared` (libxl refuses to start the guest if neither exists).
pub fn dm_uid(cfg: &XlConfig, lookup: &dyn Fn(&str) -> Option<u32>) -> Result<Option<u32>, String> {
    if let Some(user) = cfg.get_str("device_model_user") {
        return lookup(user).map(Some).ok_or_else(|| {
            format!("device_model_user = {user:?} is no user on this host (libxl would refuse it too); create the user or fix the name")
        });
    }
    if cfg.get_int("dm_restrict").unwrap_or(0) == 0 {
        return Ok(None);
    }
    if lookup("xen-qemuuser-range-base").is_some() {
        return Err("dm_restrict = 1 with the user xen-qemuuser-range-base present: libxl runs each device model as \
                    that uid + the guest's domid, which is known only after the domain is made, so the vTPM's sockets \
                    cannot be given to it beforehand; name the device model's user with device_model_user = \"…\""
            .into());
    }
    lookup("xen-qemuuser-shared").map(Some).ok_or_else(|| {
        "dm_restrict = 1 but neither xen-qemuuser-range-base nor xen-qemuuser-shared exists, so libxl would not start \
         the device model; create one of them or set device_model_user"
            .to_string()
    })
}

/// The uid of user `name` on this host.
pub fn lookup_user(name: &str) -> Option<u32> {
    nix::unistd::User::from_name(name).ok().flatten().map(|u| u.uid.as_raw())
}

/// Checks that the guest's device model can emulate the TPM and serve it from a dom0 vTPM;
/// returns the device model's uid (`None`: root). Every refusal names the setting and the fix.
pub fn check(cfg: &XlConfig, lookup: &dyn Fn(&str) -> Option<u32>) -> Result<Option<u32>, String> {
    if !is_hvm(cfg) {
        let ty = cfg.get_str("type").unwrap_or("pv");
        return Err(format!(
            "vtpm= model=: an emulated TPM comes from an HVM guest's device model, and this guest is type = {ty:?} (no device \
             model); use type = \"hvm\", or drop model= for a tpmif vTPM (xen-tpmfront in the guest)"
        ));
    }
    if cfg.get_str("device_model_version") == Some("qemu-xen-traditional") {
        return Err("vtpm= model=: device_model_version = \"qemu-xen-traditional\" has no TPM emulation; \
                    use the default device model (qemu-xen)"
            .into());
    }
    if cfg.get_int("device_model_stubdomain_override").unwrap_or(0) != 0 {
        return Err("vtpm= model=: device_model_stubdomain_override = 1 runs the device model in a stub domain, \
                    which cannot reach the vTPM's Unix socket in dom0; run the device model in dom0"
            .into());
    }
    for key in ["device_model_args", "device_model_args_hvm"] {
        if let Some(items) = cfg.get(key) {
            let list = items.as_list().ok_or_else(|| format!("`{key}` must be a list of strings, e.g. {key} = [ \"-no-hpet\" ]"))?;
            for v in list {
                let s = v.as_str().ok_or_else(|| format!("`{key}` must be a list of strings, not one holding a {v}"))?;
                if s == "-tpmdev" || s.starts_with("tpm-") || s.contains("tpmdev=") {
                    return Err(format!(
                        "vtpm= model=: `{key}` already gives the device model a TPM ({s:?}); a guest has one TPM: \
                         remove it there or drop the vtpm= line"
                    ));
                }
            }
        }
    }
    dm_uid(cfg, lookup)
}

/// QEMU's arguments for a `model` TPM served on the control socket `ctrl` (the chardev QEMU
/// connects to; the data channel is passed over it with `CMD_SET_DATAFD`).
pub fn qemu_args(ctrl: &Path, model: TpmModel) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=xvtpm-chr,path={}", ctrl.display()),
        "-tpmdev".into(),
        "emulator,id=xvtpm-tpm,chardev=xvtpm-chr".into(),
        "-device".into(),
        format!("{},tpmdev=xvtpm-tpm", model.qemu_device()),
    ]
}

/// Whether QEMU's `-chardev socket,path=…` can name `ctrl` (checked before anything is made).
pub fn check_socket_path(ctrl: &Path) -> Result<(), String> {
    if ctrl.to_str().is_none_or(|p| p.contains(',')) {
        // QEMU's option syntax would split the path at a comma.
        return Err(format!("{}: the vTPM's control socket path must be UTF-8 without commas (QEMU -chardev); use another --run-dir", ctrl.display()));
    }
    Ok(())
}

/// The largest `acpi_firmware` file of the user's that is read (hvmloader's own limit on extra
/// tables is far below it).
pub const MAX_ACPI_FIRMWARE: u64 = 1 << 20;

/// The `acpi_firmware` contents the guest needs for `model` (checked before anything is made):
/// none for TIS, which hvmloader describes itself; for CRB the tables of
/// [`crate::hvm_acpi::crb_tables`], after the user's own `acpi_firmware` tables if the config
/// names a file (each table is self-describing, so hvmloader takes them all).
pub fn acpi_firmware(cfg: &XlConfig, model: TpmModel) -> Result<Option<Vec<u8>>, String> {
    if model != TpmModel::Crb {
        return Ok(None);
    }
    if cfg.get_int("acpi") == Some(0) {
        return Err("vtpm= model=crb: acpi = 0 gives the guest no ACPI, and a CRB TPM is found only through ACPI (a TPM2 \
                    table and an MSFT0101 device); remove acpi = 0"
            .into());
    }
    let mut out = Vec::new();
    if let Some(v) = cfg.get("acpi_firmware") {
        let path = v.as_str().ok_or_else(|| format!("acpi_firmware must be a file name in quotes, not {v}"))?;
        let bytes = crate::guest::read_capped(Path::new(path), MAX_ACPI_FIRMWARE, "acpi_firmware =").map_err(|e| e.text())?;
        let sigs = crate::hvm_acpi::table_signatures(&bytes).map_err(|e| format!("acpi_firmware = {path:?}: {e}"))?;
        if sigs.contains(b"TPM2") {
            return Err(format!(
                "acpi_firmware = {path:?} already has a TPM2 table, and model=crb adds the vTPM's: a guest has one TPM; \
                 remove that table or drop model="
            ));
        }
        out = bytes;
    }
    out.extend(crate::hvm_acpi::crb_tables());
    Ok(Some(out))
}

/// Rewrites the config for xl: the `vtpm=` line goes (xl would make it a tpmif device),
/// [`qemu_args`] are appended to `device_model_args_hvm` after the user's own, and
/// `acpi_firmware` names `acpi_file` if the model needs tables ([`acpi_firmware`], written there
/// by the caller).
pub fn apply(cfg: &mut XlConfig, ctrl: &Path, model: TpmModel, acpi_file: Option<&Path>) -> Result<(), crate::exit::Cause> {
    check_socket_path(ctrl)?;
    let mut args: Vec<Value> = cfg.get_list("device_model_args_hvm").map(<[Value]>::to_vec).unwrap_or_default();
    args.extend(qemu_args(ctrl, model).into_iter().map(Value::Str));
    cfg.remove("vtpm");
    cfg.set("device_model_args_hvm", Value::List(args))?;
    if let Some(f) = acpi_file {
        let f = f.to_str().ok_or_else(|| format!("{}: not UTF-8, which xl.cfg cannot name", f.display()))?;
        cfg.set("acpi_firmware", Value::Str(f.into()))?;
    }
    Ok(())
}

/// The TPM model of `cfg`'s device model if [`apply`] gave it the vTPM on control socket `ctrl`
/// (the [`qemu_args`] at the end of `device_model_args_hvm`), else `None`.
pub fn serves(cfg: &XlConfig, ctrl: &Path) -> Option<TpmModel> {
    model_at_end(&dm_args(cfg), ctrl)
}

/// `device_model_args_hvm`'s strings.
fn dm_args(cfg: &XlConfig) -> Vec<String> {
    cfg.get_list("device_model_args_hvm").unwrap_or_default().iter().filter_map(|v| v.as_str().map(str::to_string)).collect()
}

/// The model whose [`qemu_args`] for `ctrl` end `args`.
fn model_at_end(args: &[String], ctrl: &Path) -> Option<TpmModel> {
    [TpmModel::Tis, TpmModel::Crb].into_iter().find(|m| args.ends_with(&qemu_args(ctrl, *m)))
}

/// The TPM [`apply`] gave the device model, taken out of `cfg` again (a guest moving to another
/// host, whose vTPM serves on other sockets there): the [`qemu_args`] for control socket `ctrl`
/// at the end of `device_model_args_hvm`, and `acpi_firmware` if it names `acpi_file`. Returns
/// the model, or `None` (and `cfg` as it was) if `cfg` has no such TPM.
pub fn strip(cfg: &mut XlConfig, ctrl: &Path, acpi_file: &Path) -> Result<Option<TpmModel>, crate::exit::Cause> {
    let args = dm_args(cfg);
    let Some(model) = model_at_end(&args, ctrl) else {
        return Ok(None);
    };
    let kept = args.len() - qemu_args(ctrl, model).len();
    if kept == 0 {
        cfg.remove("device_model_args_hvm");
    } else {
        cfg.set("device_model_args_hvm", Value::List(args[..kept].iter().cloned().map(Value::Str).collect()))?;
    }
    if cfg.get_str("acpi_firmware").is_some_and(|f| Path::new(f) == acpi_file) {
        cfg.remove("acpi_firmware");
    }
    Ok(Some(model))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(name: &str) -> Option<u32> {
        match name {
            "qemu-dm" => Some(990),
            "xen-qemuuser-shared" => Some(991),
            _ => None,
        }
    }

    fn cfg(text: &str) -> XlConfig {
        XlConfig::parse(text).unwrap()
    }

    #[test]
    fn strip_takes_out_what_apply_put_in() {
        let (ctrl, acpi) = (Path::new("/run/a/tpm.sock.ctrl"), Path::new("/run/a/guests/g.acpi"));
        for model in [TpmModel::Tis, TpmModel::Crb] {
            let orig = "type = \"hvm\"\nname = \"g\"\ndevice_model_args_hvm = [ \"-no-hpet\" ]\nvtpm = [ \"model=tis\" ]\n";
            let mut c = cfg(orig);
            apply(&mut c, ctrl, model, (model == TpmModel::Crb).then_some(acpi)).unwrap();
            let mut moved = c.clone();
            assert_eq!(strip(&mut moved, Path::new("/run/b/tpm.sock.ctrl"), acpi).unwrap(), None, "another host's socket: not this TPM");
            assert_eq!(strip(&mut moved, ctrl, acpi).unwrap(), Some(model));
            assert_eq!(moved.get_list("device_model_args_hvm").map(|l| l.len()), Some(1), "the user's own argument stays");
            assert_eq!(moved.get_str("acpi_firmware"), None);
            // Applied again for the other host: its socket, nothing twice.
            let other = Path::new("/run/b/tpm.sock.ctrl");
            apply(&mut moved, other, model, None).unwrap();
            assert_eq!(strip(&mut moved, other, acpi).unwrap(), Some(model));
            assert_eq!(strip(&mut moved, other, acpi).unwrap(), None);
        }
        let mut alone = cfg("type = \"hvm\"\nvtpm = [ \"model=tis\" ]\n");
        apply(&mut alone, ctrl, TpmModel::Tis, None).unwrap();
        assert_eq!(strip(&mut alone, ctrl, acpi).unwrap(), Some(TpmModel::Tis));
        assert!(alone.get("device_model_args_hvm").is_none());
    }

    #[test]
    fn hvm_is_type_or_builder() {
        assert!(is_hvm(&cfg("type = \"hvm\"\n")));
        assert!(is_hvm(&cfg("builder = \"hvm\"\n")));
        assert!(!is_hvm(&cfg("type = \"pvh\"\nbuilder = \"hvm\"\n")));
        assert!(!is_hvm(&cfg("name = \"g\"\n")));
    }

    #[test]
    fn the_device_model_user_follows_libxl() {
        assert_eq!(check(&cfg("type = \"hvm\"\n"), &users), Ok(None));
        assert_eq!(check(&cfg("type = \"hvm\"\ndevice_model_user = \"qemu-dm\"\n"), &users), Ok(Some(990)));
        assert_eq!(check(&cfg("type = \"hvm\"\ndm_restrict = 1\n"), &users), Ok(Some(991)));
        let e = check(&cfg("type = \"hvm\"\ndevice_model_user = \"nobody-here\"\n"), &users).unwrap_err();
        assert!(e.contains("nobody-here"), "{e}");
        let range = |n: &str| if n == "xen-qemuuser-range-base" { Some(2000) } else { users(n) };
        let e = check(&cfg("type = \"hvm\"\ndm_restrict = 1\n"), &range).unwrap_err();
        assert!(e.contains("device_model_user"), "{e}");
        let none = |_: &str| None;
        let e = check(&cfg("type = \"hvm\"\ndm_restrict = 1\n"), &none).unwrap_err();
        assert!(e.contains("xen-qemuuser-shared"), "{e}");
    }

    #[test]
    fn configs_that_cannot_carry_an_emulated_tpm_are_refused() {
        for (text, needle) in [
            ("type = \"pv\"\n", "type = \"pv\""),
            ("name = \"g\"\n", "type = \"pv\""),
            ("type = \"pvh\"\n", "pvh"),
            ("type = \"hvm\"\ndevice_model_version = \"qemu-xen-traditional\"\n", "traditional"),
            ("type = \"hvm\"\ndevice_model_stubdomain_override = 1\n", "stub domain"),
            ("type = \"hvm\"\ndevice_model_args_hvm = [ \"-tpmdev\", \"emulator,id=t\" ]\n", "already gives"),
            ("type = \"hvm\"\ndevice_model_args = [ \"-device\", \"tpm-crb,tpmdev=t\" ]\n", "device_model_args"),
            ("type = \"hvm\"\ndevice_model_args_hvm = \"-no-hpet\"\n", "list of strings"),
        ] {
            let e = check(&cfg(text), &users).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn apply_appends_to_the_users_arguments_and_drops_the_vtpm_line() {
        let mut c = cfg("name = \"g\"\ntype = \"hvm\"\nvtpm = [ \"model=tis\" ]\ndevice_model_args_hvm = [ \"-no-hpet\" ]\n");
        apply(&mut c, Path::new("/run/xvtpm/vtpms/u/tpm.sock.ctrl"), TpmModel::Tis, None).unwrap();
        assert!(c.get("vtpm").is_none());
        let args: Vec<&str> = c.get_list("device_model_args_hvm").unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "-no-hpet",
                "-chardev",
                "socket,id=xvtpm-chr,path=/run/xvtpm/vtpms/u/tpm.sock.ctrl",
                "-tpmdev",
                "emulator,id=xvtpm-tpm,chardev=xvtpm-chr",
                "-device",
                "tpm-tis,tpmdev=xvtpm-tpm"
            ]
        );
        // What xl reads back is the same list.
        let back = XlConfig::parse(&c.render()).unwrap();
        assert_eq!(back.get("device_model_args_hvm"), c.get("device_model_args_hvm"));
        // Without arguments of the user's own, ours alone.
        let mut c = cfg("type = \"hvm\"\nvtpm = [ \"model=tis\" ]\n");
        apply(&mut c, Path::new("/r/c"), TpmModel::Tis, None).unwrap();
        assert_eq!(c.get_list("device_model_args_hvm").unwrap().len(), 6);
        let e = apply(&mut c, Path::new("/r,x/c"), TpmModel::Tis, None).unwrap_err();
        assert!(e.to_string().contains("commas"), "{e}");
        assert!(c.get("acpi_firmware").is_none());
    }

    #[test]
    fn a_crb_tpm_gets_its_acpi_tables_after_the_users_own() {
        // TIS: hvmloader describes it, nothing to add.
        assert_eq!(acpi_firmware(&cfg("type = \"hvm\"\n"), TpmModel::Tis), Ok(None));
        let ours = crate::hvm_acpi::crb_tables();
        assert_eq!(acpi_firmware(&cfg("type = \"hvm\"\n"), TpmModel::Crb), Ok(Some(ours.clone())));
        let d = testkit::tempdir();
        // The user's own tables come first, unchanged.
        let mine = d.path().join("mine.bin");
        std::fs::write(&mine, crate::hvm_acpi::ssdt()).unwrap();
        let c = cfg(&format!("type = \"hvm\"\nacpi_firmware = \"{}\"\n", mine.display()));
        let mut want = crate::hvm_acpi::ssdt();
        want.extend(&ours);
        assert_eq!(acpi_firmware(&c, TpmModel::Crb), Ok(Some(want)));
        // Refused: a second TPM2 table, a file that is not ACPI tables, a missing file, no ACPI.
        std::fs::write(&mine, crate::hvm_acpi::tpm2_table()).unwrap();
        assert!(acpi_firmware(&c, TpmModel::Crb).unwrap_err().contains("already has a TPM2 table"));
        std::fs::write(&mine, b"not tables").unwrap();
        assert!(acpi_firmware(&c, TpmModel::Crb).unwrap_err().contains("not an ACPI table"));
        std::fs::remove_file(&mine).unwrap();
        assert!(acpi_firmware(&c, TpmModel::Crb).unwrap_err().contains("mine.bin"));
        let e = acpi_firmware(&cfg("type = \"hvm\"\nacpi = 0\n"), TpmModel::Crb).unwrap_err();
        assert!(e.contains("acpi = 0"), "{e}");
        // apply names the file and puts tpm-crb on the device model.
        let mut c = cfg("type = \"hvm\"\nvtpm = [ \"model=crb\" ]\n");
        apply(&mut c, Path::new("/r/c"), TpmModel::Crb, Some(Path::new("/run/xvtpm/guests/g.acpi"))).unwrap();
        assert_eq!(c.get_str("acpi_firmware"), Some("/run/xvtpm/guests/g.acpi"));
        assert_eq!(c.get_list("device_model_args_hvm").unwrap().last().unwrap().as_str(), Some("tpm-crb,tpmdev=xvtpm-tpm"));
    }
}
