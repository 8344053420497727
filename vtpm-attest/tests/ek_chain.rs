//! `credential::verify_ek_chain` against certificates made by openssl: a vendor root, an issuing
//! intermediate and EK certificates, each check refused with its own message.

use std::path::Path;
use std::process::Command;

use vtpm_attest::credential::{verify_ek_chain, CredError};
use vtpm_proto::ekcert::Certificate;

fn sh(dir: &Path, script: &str) {
    let out = Command::new("bash")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("run bash/openssl");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cert(dir: &Path, f: &str) -> Certificate {
    Certificate::from_pem_or_der(&std::fs::read(dir.join(f)).unwrap()).unwrap()
}

/// Signs `name`.csr with `ca` and the extensions `ext`.
fn issue(dir: &Path, name: &str, subject: &str, key: &str, ca: &str, ext: &str) {
    sh(
        dir,
        &format!(
            "openssl req -new -key {key}.key -out {name}.csr -subj /CN={subject}
             printf '{ext}' > {name}.ext
             openssl x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -set_serial 0x{serial:x} -out {name}.pem -days 3650 -sha256 -extfile {name}.ext 2>/dev/null",
            serial = name.len() * 7919 + name.as_bytes()[0] as usize
        ),
    );
}

#[test]
fn each_chain_check_refuses_with_its_own_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        d,
        "for k in root ica ek other; do openssl genrsa -out $k.key 2048 2>/dev/null; done
         openssl req -x509 -new -key root.key -out root.pem -subj /CN=vendor-root -days 3650 -sha256 \
           -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign
         openssl req -x509 -new -key other.key -out other.pem -subj /CN=vendor-root -days 3650 -sha256 \
           -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign",
    );
    let ca_ext = "basicConstraints=critical,CA:TRUE\\nkeyUsage=critical,keyCertSign\\n";
    issue(d, "ica", "vendor-ica", "ica", "root", ca_ext);
    issue(
        d,
        "ica_not_ca",
        "vendor-ica",
        "ica",
        "root",
        "basicConstraints=critical,CA:FALSE\\n",
    );
    let ek_ext = "basicConstraints=critical,CA:FALSE\\nkeyUsage=critical,keyEncipherment\\n";
    issue(d, "ek", "ek", "ek", "ica", ek_ext);
    issue(d, "ek_is_ca", "ek", "ek", "ica", ca_ext);
    issue(
        d,
        "ek_signing",
        "ek",
        "ek",
        "ica",
        "basicConstraints=critical,CA:FALSE\\nkeyUsage=critical,digitalSignature\\n",
    );
    issue(d, "ek_odd_ext", "ek", "ek", "ica", "basicConstraints=critical,CA:FALSE\\nkeyUsage=critical,keyEncipherment\\nnameConstraints=critical,permitted;DNS:x\\n");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (root, ica, ek) = (cert(d, "root.pem"), cert(d, "ica.pem"), cert(d, "ek.pem"));
    let msg = |r: Result<_, CredError>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => {
            assert!(matches!(e, CredError::EkChain(_)), "{e:?}");
            e.to_string()
        }
    };

    let ok = verify_ek_chain(
        &ek,
        std::slice::from_ref(&ica),
        std::slice::from_ref(&root),
        now,
    )
    .unwrap();
    assert_eq!(ok.depth, 2);
    assert_eq!(ok.ek_spki, ek.spki);

    let m = msg(verify_ek_chain(&ek, &[], std::slice::from_ref(&root), now));
    assert!(m.contains("does not chain"), "{m}");
    let m = msg(verify_ek_chain(
        &ek,
        std::slice::from_ref(&ica),
        &[cert(d, "other.pem")],
        now,
    ));
    assert!(m.contains("signature does not verify"), "{m}");
    let m = msg(verify_ek_chain(
        &ek,
        &[cert(d, "ica_not_ca.pem")],
        std::slice::from_ref(&root),
        now,
    ));
    assert!(m.contains("cA is not TRUE"), "{m}");
    let m = msg(verify_ek_chain(
        &cert(d, "ek_is_ca.pem"),
        std::slice::from_ref(&ica),
        std::slice::from_ref(&root),
        now,
    ));
    assert!(m.contains("claims to be a CA"), "{m}");
    let m = msg(verify_ek_chain(
        &cert(d, "ek_signing.pem"),
        std::slice::from_ref(&ica),
        std::slice::from_ref(&root),
        now,
    ));
    assert!(m.contains("keyEncipherment"), "{m}");
    let m = msg(verify_ek_chain(
        &cert(d, "ek_odd_ext.pem"),
        std::slice::from_ref(&ica),
        std::slice::from_ref(&root),
        now,
    ));
    assert!(m.contains("unknown critical extension"), "{m}");
    let m = msg(verify_ek_chain(
        &ek,
        std::slice::from_ref(&ica),
        std::slice::from_ref(&root),
        now + 20 * 365 * 86400,
    ));
    assert!(m.contains("not valid at"), "{m}");
    let m = msg(verify_ek_chain(&ek, std::slice::from_ref(&ica), &[], now));
    assert!(m.contains("no trusted root"), "{m}");
}
