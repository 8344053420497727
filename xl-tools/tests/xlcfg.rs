//! xl.cfg parser, vtpm spec strings and writer.

use std::collections::BTreeMap;

use uuid::Uuid;
use xl_tools::xlcfg::{ParseError, ParseErrorKind, TpmModel, Value, VtpmSpec, VtpmSpecError, XlConfig};

const GUEST1: &str = include_str!("data/xlcfg/guest1.cfg");
const TEMPLATE: &str = include_str!("data/xlcfg/vtpm-domain.cfg.in");

fn err(src: &str) -> ParseError {
    XlConfig::parse(src).expect_err("must not parse")
}

#[test]
fn parses_a_realistic_guest_config() {
    let c = XlConfig::parse(GUEST1).unwrap();
    assert_eq!(c.name(), Some("guest1"));
    assert_eq!(
        c.uuid(),
        Some(Uuid::parse_str("5a3e4c2b-1f0d-4e8a-9b7c-6d5e4f3a2b1c").unwrap())
    );
    assert_eq!(
        c.get_str("ramdisk"),
        Some("/var/lib/xvtpm/images/initrd.img")
    );
    assert_eq!(
        c.get_str("extra"),
        Some("console=hvc0 root=/dev/xvda1 ro quiet \"tpm=on\"")
    );
    assert_eq!(c.get_int("memory"), Some(512));
    assert_eq!(
        c.get_int("maxmem"),
        Some(1024),
        "0x prefix is hex as in strtol(…, 0)"
    );
    assert_eq!(
        c.get_list("disk").unwrap().len(),
        2,
        "trailing comma, list over two lines"
    );
    assert_eq!(
        c.get_list("vif").unwrap(),
        &[Value::from("bridge=xenbr0,mac=00:16:3e:00:00:01")]
    );
    assert_eq!(
        c.get_str("on_reboot"),
        Some("restart"),
        "`;` separates statements"
    );
    assert_eq!(
        c.get_list("vnuma").unwrap()[1].as_list().unwrap().len(),
        4,
        "nested lists"
    );
    assert_eq!(
        c.get_str("cmdline"),
        Some("console=hvc0 quiet"),
        "`+=` appends"
    );
    assert_eq!(
        c.vtpms(),
        vec![VtpmSpec {
            backend: "vtpm-guest1".into(),
            uuid: Some(Uuid::parse_str("ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839").unwrap()),
            model: None,
        }]
    );
    let keys: Vec<&str> = c.keys().collect();
    assert_eq!(
        keys,
        [
            "name",
            "uuid",
            "type",
            "kernel",
            "ramdisk",
            "extra",
            "memory",
            "maxmem",
            "vcpus",
            "disk",
            "vif",
            "vtpm",
            "on_poweroff",
            "on_reboot",
            "on_crash",
            "vnuma",
            "cmdline"
        ],
        "file order is kept"
    );
    let e = c.entry("memory").unwrap();
    assert_eq!(
        (e.line, e.col, e.trailing.as_deref()),
        (8, 1, Some("# MiB"))
    );
    assert_eq!(
        c.entry("disk").unwrap().leading,
        vec!["".to_string(), "# Disks and network".to_string()]
    );
}

#[test]
fn round_trip() {
    for src in [
        GUEST1,
        TEMPLATE,
        "",
        "# only a comment\n",
        "name='a'",
        "vif = [ ]\n",
    ] {
        let parse = if src == TEMPLATE {
            XlConfig::parse_template
        } else {
            XlConfig::parse
        };
        let a = parse(src).unwrap();
        let text = a.render();
        let b =
            parse(&text).unwrap_or_else(|e| panic!("rendered text does not parse: {e}\n{text}"));
        let values = |c: &XlConfig| {
            c.entries()
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(values(&a), values(&b), "{text}");
        // Rendering is a fixed point after one pass, comments included.
        assert_eq!(b.render(), text);
    }
    let text = XlConfig::parse(GUEST1).unwrap().render();
    assert!(text.contains("# guest1: a PV guest"), "{text}");
    assert!(text.contains("memory = 512 # MiB"), "{text}");
    assert!(
        text.contains("extra = \"console=hvc0 root=/dev/xvda1 ro quiet \\\"tpm=on\\\"\""),
        "{text}"
    );
}

#[test]
fn writer_escapes_everything_xl_cannot_hold_raw() {
    let mut c = XlConfig::default();
    let nasty = "a\"b'c\\d\ne\tf\x01g # not a comment ]";
    c.set("extra", nasty).unwrap();
    c.set("memory", 8).unwrap();
    let back = XlConfig::parse(&c.render()).unwrap();
    assert_eq!(back.get_str("extra"), Some(nasty));
    assert_eq!(back.keys().collect::<Vec<_>>(), ["extra", "memory"]);
}

#[test]
fn writes_the_guest_config_with_the_resolved_vtpm_line() {
    let mut c = XlConfig::parse(GUEST1).unwrap();
    let vtpm = Uuid::parse_str("0e2f4b8a-2c3d-4e5f-8a9b-0c1d2e3f4a5b").unwrap();
    c.set_vtpms(&[VtpmSpec {
        backend: "vtpm-guest1".into(),
        uuid: Some(vtpm),
        model: None,
    }]);
    let text = c.render();
    assert!(
        text.contains(
            "vtpm = [ \"backend=vtpm-guest1,uuid=0e2f4b8a-2c3d-4e5f-8a9b-0c1d2e3f4a5b\" ]"
        ),
        "{text}"
    );
    // The line stays where it was.
    let keys: Vec<String> = XlConfig::parse(&text)
        .unwrap()
        .keys()
        .map(String::from)
        .collect();
    assert_eq!(keys[11], "vtpm");
    c.set_vtpms(&[]);
    assert!(c.get("vtpm").is_none());
}

#[test]
fn template_substitution() {
    let mut t = XlConfig::parse_template(TEMPLATE).unwrap();
    let vtpm = "ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839";
    let vars = BTreeMap::from([
        ("GUEST_NAME".to_string(), "guest1".to_string()),
        ("VTPM_DOMAIN".to_string(), "vtpm-guest1".to_string()),
        ("VTPM_UUID".to_string(), vtpm.to_string()),
    ]);
    t.substitute(&vars).unwrap();
    assert_eq!(t.name(), Some("vtpm-guest1"));
    assert_eq!(
        t.get_str("extra"),
        Some("uuid=ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839 loglevel=info")
    );
    assert_eq!(
        t.vtpms()[0].to_string(),
        format!("backend=vtpmmgr,uuid={vtpm}")
    );
    let rendered = t.render();
    assert!(
        rendered.starts_with("# vTPM domain for guest @GUEST_NAME@"),
        "comments are not substituted"
    );
    XlConfig::parse(&rendered).unwrap();

    // A missing value names the placeholder and the key.
    let mut t = XlConfig::parse_template(TEMPLATE).unwrap();
    let e = t
        .substitute(&BTreeMap::from([(
            "VTPM_DOMAIN".to_string(),
            "x".to_string(),
        )]))
        .unwrap_err();
    assert!(
        e.to_string().contains("@VTPM_UUID@") && e.to_string().contains("`extra`"),
        "{e}"
    );
    assert_eq!(e.line, 5);

    // A substituted value cannot break out of its string.
    let mut t = XlConfig::parse_template("name = \"@N@\"\n").unwrap();
    t.substitute(&BTreeMap::from([(
        "N".to_string(),
        "x\"\nmemory = 99999\n#".to_string(),
    )]))
    .unwrap();
    let back = XlConfig::parse(&t.render()).unwrap();
    assert_eq!(back.keys().collect::<Vec<_>>(), ["name"]);

    // A bad vTPM UUID from substitution is caught.
    let mut t = XlConfig::parse_template(TEMPLATE).unwrap();
    let mut bad = vars.clone();
    bad.insert("VTPM_UUID".into(), "not-a-uuid".into());
    let e = t.substitute(&bad).unwrap_err();
    assert!(
        matches!(
            e.kind,
            ParseErrorKind::Vtpm {
                error: VtpmSpecError::BadUuid(_),
                ..
            }
        ),
        "{e}"
    );
    // A template is not a config: its vtpm line does not parse as one.
    assert!(XlConfig::parse(TEMPLATE).is_err());
}

#[test]
fn unknown_keys_are_named_with_a_hint() {
    let e = err("name = \"g\"\nvtmp = [ \"backend=v\" ]\n");
    assert_eq!((e.line, e.col), (2, 1));
    assert!(matches!(&e.kind, ParseErrorKind::UnknownKey { key, .. } if key == "vtmp"));
    assert!(e.to_string().contains("did you mean `vtpm`"), "{e}");

    let e = err("  Memory = 5\n");
    assert_eq!((e.line, e.col), (1, 3));
    assert!(e.to_string().contains("write `memory`"), "{e}");

    let e = err("autoballoon = 0\n");
    assert!(e.to_string().contains("xl.conf"), "{e}");

    let e = err("p2m_mode = 1\n");
    assert!(
        e.to_string().contains("`p2m_mode`") && e.to_string().contains("hap"),
        "{e}"
    );

    let e = err("frobnicator = 1\n");
    assert!(e.to_string().contains("unknown key `frobnicator`"), "{e}");

    // Every key named in the issue and the common ones parse.
    for k in [
        "name",
        "uuid",
        "type",
        "builder",
        "kernel",
        "ramdisk",
        "cmdline",
        "extra",
        "root",
        "memory",
        "maxmem",
        "vcpus",
        "maxvcpus",
        "disk",
        "vif",
        "vtpm",
        "on_poweroff",
        "on_reboot",
        "on_crash",
        "on_watchdog",
        "serial",
        "vfb",
        "vnc",
        "sdl",
        "pci",
        "bootloader",
        "bootloader_args",
        "device_model_version",
        "firmware",
        "seclabel",
        "cpuid",
        "tsc_mode",
        "localtime",
        "usb",
        "usbdevice",
        "max_grant_frames",
        "max_maptrack_frames",
        "driver_domain",
        "iomem",
        "ioports",
        "irqs",
        "xen_platform_pci",
        "on_soft_reset",
        "viridian",
        "hap",
        "pvshim",
        "vuart",
        "channel",
    ] {
        let v = if k == "vtpm" {
            "[ \"backend=v\" ]"
        } else {
            "[ ]"
        };
        XlConfig::parse(&format!("{k} = {v}\n")).unwrap_or_else(|e| panic!("{k}: {e}"));
    }
}

#[test]
fn duplicate_keys_name_both_lines() {
    let e = err("name = \"a\"\nmemory = 8\n\nmemory = 16\n");
    assert_eq!(
        e.kind,
        ParseErrorKind::DuplicateKey {
            key: "memory".into(),
            first_line: 2,
            second_line: 4
        }
    );
    assert_eq!((e.line, e.col), (4, 1));
    assert!(
        e.to_string()
            .starts_with("4:1: duplicate key `memory`: set on line 2 and again on line 4"),
        "{e}"
    );
    // Same line with `;`.
    let e = err("memory = 8; memory = 9");
    assert_eq!((e.line, e.col), (1, 13));
}

#[test]
fn syntax_errors_carry_line_and_column() {
    let cases: &[(&str, (u32, u32), &str)] = &[
        ("name = \"abc\n", (1, 8), "unterminated string"),
        ("name = guest1\n", (1, 8), "quote strings"),
        ("memory = 08\n", (1, 10), "octal"),
        ("memory = 12k\n", (1, 10), "bad number"),
        ("memory = -1\n", (1, 10), "negative"),
        ("name = \"a\" \"b\"\n", (1, 12), "end of line"),
        ("disk = [ \"a\" \"b\" ]\n", (1, 14), "`,` or `]`"),
        ("disk = [ \"a\",\n  \"b\"\n", (3, 1), "end of file"),
        ("memory 8\n", (1, 8), "`=` after a key"),
        ("= 8\n", (1, 1), "a key"),
        ("name = \"a\\101\"\n", (1, 10), "decimal, not octal"),
        ("name = \"a\\q\"\n", (1, 10), "not an escape"),
        ("memory = 1 + 2\n", (1, 12), "`+=`"),
        (
            "cmdline = \"a\"\ncmdline += 3\n",
            (2, 1),
            "cannot use += with numbers",
        ),
        (
            "disk = [ ]\ndisk += \"x\"\n",
            (2, 1),
            "append a list to a list",
        ),
        ("name = 'x' $\n", (1, 12), "character `$`"),
    ];
    for (src, pos, needle) in cases {
        let e = err(src);
        assert_eq!((e.line, e.col), *pos, "{src:?}: {e}");
        assert!(
            e.to_string().contains(needle),
            "{src:?}: `{e}` lacks `{needle}`"
        );
    }
}

#[test]
fn vtpm_spec_strings() {
    let u = "ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839";
    let ok: VtpmSpec = format!("backend=vtpm-a,uuid={u}").parse().unwrap();
    assert_eq!(ok.backend, "vtpm-a");
    assert_eq!(ok.to_string(), format!("backend=vtpm-a,uuid={u}"));
    let ok: VtpmSpec = " backend=0 ,".parse().unwrap();
    assert_eq!((ok.backend.as_str(), ok.uuid), ("0", None));

    let bad = |s: &str| s.parse::<VtpmSpec>().unwrap_err();
    assert_eq!(bad(&format!("uuid={u}")), VtpmSpecError::MissingBackend);
    assert!(bad("uuid=x").to_string().contains("`uuid`"));
    assert_eq!(
        bad("backend=a,backend=b"),
        VtpmSpecError::DuplicateKey("backend".into())
    );
    assert_eq!(
        bad(&format!("backend=a,uuid={u},uuid={u}")),
        VtpmSpecError::DuplicateKey("uuid".into())
    );
    for b in [
        "backend=a,uuid=ac0a5b9ecbe24c07b43b1d69e46fb839",
        "backend=a,uuid={ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839}",
        "backend=a,uuid=zc0a5b9e-cbe2-4c07-b43b-1d69e46fb839",
    ] {
        let e = bad(b);
        assert!(matches!(e, VtpmSpecError::BadUuid(_)), "{b}: {e}");
        assert!(e.to_string().contains("8-4-4-4-12"), "{e}");
    }
    let e = bad("backend=a,devid=1");
    assert!(matches!(&e, VtpmSpecError::UnknownKey { key, .. } if key == "devid"));
    assert!(e.to_string().contains("position in the list"), "{e}");
    let e = bad("backend=a,backendtype=phy");
    assert!(e.to_string().contains("unknown key `backendtype`"), "{e}");
    let e = bad("backend=a,locality=2");
    assert!(e.to_string().contains("only `backend=` and `uuid=`"), "{e}");
    assert!(matches!(bad("backend"), VtpmSpecError::NotKeyValue(_)));
    assert!(matches!(bad("backend="), VtpmSpecError::BadBackend(_)));
    assert!(matches!(bad("backend=a b"), VtpmSpecError::BadBackend(_)));
}

#[test]
fn vtpm_errors_in_a_file_point_at_the_entry() {
    let e = err(
        "name = \"g\"\nvtpm = [ \"backend=v\",\n         \"uuid=ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839\" ]\n",
    );
    assert_eq!((e.line, e.col), (3, 10));
    assert_eq!(
        e.kind,
        ParseErrorKind::Vtpm {
            index: 1,
            error: VtpmSpecError::MissingBackend
        }
    );
    assert!(
        e.to_string().contains("vtpm entry 1: missing `backend=`"),
        "{e}"
    );

    let e = err("vtpm = \"backend=v\"\n");
    assert!(e.to_string().contains("`vtpm` must be a list"), "{e}");
    let e = err("vtpm = [ \"backend=v,devid=0\" ]\n");
    assert!(e.to_string().contains("unknown key `devid`"), "{e}");
    let e = err("vtpm = [ \"backend=v,uuid=1234\" ]\n");
    assert!(
        e.to_string().contains("bad UUID `1234` for key `uuid`"),
        "{e}"
    );

    // `set` validates too.
    let mut c = XlConfig::default();
    assert!(c.set("vtpm", Value::List(vec!["uuid=x".into()])).is_err());
    assert!(c.set("vtmp", 1).is_err());
}

#[test]
fn parse_file_prefixes_the_path() {
    let dir = std::env::temp_dir().join(format!("xlcfg-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("bad.cfg");
    std::fs::write(&p, "name = \"a\"\nvtpm = [ \"backend=x,uuid=nope\" ]\n").unwrap();
    let e = XlConfig::parse_file(&p).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}:2:10: vtpm entry 0: bad UUID `nope`",
            p.display()
        )),
        "{e}"
    );
    let e = XlConfig::parse_file(&dir.join("missing.cfg"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot read"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The nil UUID names no vTPM (libxl reads it as "no UUID given"): refused, naming it.
#[test]
fn nil_vtpm_uuid_is_refused() {
    let e = "backend=0,uuid=00000000-0000-0000-0000-000000000000"
        .parse::<VtpmSpec>()
        .expect_err("the nil UUID must be refused");
    assert!(e.to_string().contains("nil UUID"), "{e}");
    let cfg = "name = \"g\"\nvtpm = [ \"backend=0,uuid=00000000-0000-0000-0000-000000000000\" ]\n";
    assert!(
        XlConfig::parse(cfg).is_err(),
        "a config with a nil vTPM UUID parses"
    );
}

#[test]
fn emulated_tpm_model_specs() {
    let u = "ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839";
    // `model=` alone: an HVM guest's emulated TPM, served from dom0.
    let s: VtpmSpec = "model=tis".parse().unwrap();
    assert_eq!((s.backend.as_str(), s.uuid, s.model), ("0", None, Some(TpmModel::Tis)));
    let s: VtpmSpec = format!("backend=0,uuid={u},model=tis").parse().unwrap();
    assert_eq!(s.to_string(), format!("backend=0,uuid={u},model=tis"));
    assert_eq!(s.to_string().parse::<VtpmSpec>().unwrap(), s);
    assert!("backend=Domain-0, model=tis".parse::<VtpmSpec>().is_ok());
    let bad = |spec: &str| spec.parse::<VtpmSpec>().unwrap_err();
    // CRB: QEMU's tpm-crb, described to the guest by xl-vtpm's own ACPI tables.
    let s: VtpmSpec = "model=crb".parse().unwrap();
    assert_eq!((s.model, s.model.unwrap().qemu_device()), (Some(TpmModel::Crb), "tpm-crb"));
    assert_eq!(s.to_string().parse::<VtpmSpec>().unwrap(), s);
    assert_eq!(bad("model=TIS"), VtpmSpecError::BadModel("TIS".into()));
    assert_eq!(bad("model="), VtpmSpecError::BadModel("".into()));
    assert_eq!(bad("model=tis,model=tis"), VtpmSpecError::DuplicateKey("model".into()));
    assert_eq!(bad("backend=vtpm-g,model=tis"), VtpmSpecError::ModelNeedsDom0("vtpm-g".into()));
    // Without model= nothing changed: backend= is still required.
    assert_eq!(bad(&format!("uuid={u}")), VtpmSpecError::MissingBackend);
    // In a file, the error points at the entry.
    let e = err("name = \"g\"\ntype = \"hvm\"\nvtpm = [ \"model=ctb\" ]\n");
    assert!(e.to_string().contains("vtpm entry 0: unknown TPM model `ctb`"), "{e}");
}

#[test]
fn the_hvm_example_config_is_accepted() {
    let c = XlConfig::parse(include_str!("../../xen-configs/hvm-guest.cfg")).unwrap();
    assert_eq!(c.vtpms()[0].model, Some(TpmModel::Tis));
    assert_eq!(xl_tools::hvm::check(&c, &|_| None), Ok(None));
    let mut c = c;
    xl_tools::hvm::apply(&mut c, std::path::Path::new("/run/xvtpm/vtpms/u/tpm.sock.ctrl"), TpmModel::Tis, None).unwrap();
    assert_eq!(c.get_list("device_model_args_hvm").unwrap().len(), 6);
    assert!(c.get("vtpm").is_none());
}
