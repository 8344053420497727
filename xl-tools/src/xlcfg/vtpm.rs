//! `vtpm=` spec strings: [`VtpmSpec`] parses and prints xl's `backend=…,uuid=…` device string
//! exactly as xl reads it, and the checks a config's `vtpm=` list must pass when it is read.

use std::fmt;

use uuid::Uuid;

use super::{ParseErrorKind, Value};

/// One `vtpm=[…]` device: xl's `KEY=VALUE,KEY=VALUE` spec string.
///
/// xl (`tools/xl/xl_parse.c`) accepts exactly two keys, and so does this type:
/// `backend=` (required: the domain name or domid serving the device — for a guest, its vTPM
/// domain; for a vTPM domain, the manager) and `uuid=` (the vTPM's identity; libxl makes up a
/// random one on *every* create if it is missing, which is why xl-vtpm always writes it).
/// There is no `devid=` (xl numbers devices by list position) and no `backendtype=` (unlike
/// disks); both are refused with that explanation rather than passed to xl, which would exit.
///
/// One key is xl-vtpm's own and never reaches xl: `model=` asks for a TPM that an HVM guest's
/// device model (QEMU) emulates instead of a tpmif device (docs/hvm.md). `xl-vtpm create`
/// removes such a spec from the config it hands to xl and adds QEMU's arguments instead.
/// With `model=`, `backend=` may be left out and can only be dom0 (where QEMU runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VtpmSpec {
    /// `backend=`: domain name or numeric domid (`"0"` when only `model=` was given).
    pub backend: String,
    /// `uuid=`.
    pub uuid: Option<Uuid>,
    /// `model=`: the TPM interface the guest's device model emulates (HVM guests only).
    pub model: Option<TpmModel>,
}

/// The TPM interface an HVM guest's device model emulates (`model=` in a vtpm spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpmModel {
    /// TPM Interface Specification at 0xFED40000 (QEMU `tpm-tis`); hvmloader describes it in
    /// ACPI (TCPA table and a `PNP0C31` device), so SeaBIOS, OVMF and Linux find it.
    Tis,
    /// Command Response Buffer at 0xFED40000 (QEMU `tpm-crb`), the interface Windows prefers;
    /// hvmloader 4.17 cannot describe it, so `xl-vtpm create` hands it a `TPM2` table and a
    /// `MSFT0101` device through `acpi_firmware` (`crate::hvm_acpi`).
    Crb,
}

impl TpmModel {
    /// The spelling in a vtpm spec (`model=tis`).
    pub fn as_str(self) -> &'static str {
        match self {
            TpmModel::Tis => "tis",
            TpmModel::Crb => "crb",
        }
    }

    /// QEMU's device for this model (`-device tpm-tis`).
    pub fn qemu_device(self) -> &'static str {
        match self {
            TpmModel::Tis => "tpm-tis",
            TpmModel::Crb => "tpm-crb",
        }
    }
}

/// What is wrong with a vtpm spec string; every variant names the key and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VtpmSpecError {
    /// No `backend=`.
    #[error(
        "missing `backend=`: name the domain that serves this vTPM, \
         e.g. \"backend=vtpm-guest1,uuid=…\""
    )]
    MissingBackend,
    /// `backend=` with nothing after it, or containing characters xl would keep literally.
    #[error(
        "`backend={0}` is not a domain name or domid: give the vTPM domain's name, e.g. backend=vtpm-guest1"
    )]
    BadBackend(String),
    /// A key xl does not accept in a vtpm spec.
    #[error("unknown key `{key}` in vtpm spec: {hint}")]
    UnknownKey {
        /// The key as written.
        key: String,
        /// What to do instead.
        hint: &'static str,
    },
    /// A key given twice.
    #[error("duplicate key `{0}` in vtpm spec: give it once")]
    DuplicateKey(String),
    /// A malformed `uuid=`.
    #[error(
        "bad UUID `{0}` for key `uuid`: write 8-4-4-4-12 hex digits, \
         e.g. uuid=ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839"
    )]
    BadUuid(String),
    /// `uuid=00000000-0000-0000-0000-000000000000`: libxl reads the nil UUID as "none given".
    #[error(
        "`uuid={0}` is the nil UUID, which names no vTPM (libxl takes it as \"no UUID\"): \
         give the vTPM's UUID (`xl-vtpm vtpm list`), or leave uuid= out to get a new vTPM"
    )]
    NilUuid(String),
    /// An item without `=`.
    #[error(
        "`{0}` is not KEY=VALUE: vtpm specs are comma-separated KEY=VALUE pairs (backend=…,uuid=…)"
    )]
    NotKeyValue(String),
    /// `model=` with a value that names no TPM interface.
    #[error("unknown TPM model `{0}`: use model=tis or model=crb (the TPM interface an HVM guest's device model emulates)")]
    BadModel(String),
    /// `model=` with a backend other than dom0.
    #[error(
        "`model=` with `backend={0}`: an emulated TPM is served to the guest's device model \
         (QEMU in dom0) by a vTPM process in dom0; leave backend= out (or write backend=0)"
    )]
    ModelNeedsDom0(String),
}

impl std::str::FromStr for VtpmSpec {
    type Err = VtpmSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut backend = None;
        let mut uuid = None;
        let mut model = None;
        // xl splits with strtok(",") (so empty items vanish) and skips leading blanks.
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((k, v)) = item.split_once('=') else {
                return Err(VtpmSpecError::NotKeyValue(item.to_owned()));
            };
            let (k, v) = (k.trim(), v.trim());
            match k {
                "backend" => {
                    if backend.is_some() {
                        return Err(VtpmSpecError::DuplicateKey(k.into()));
                    }
                    if v.is_empty()
                        || !v
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
                    {
                        return Err(VtpmSpecError::BadBackend(v.into()));
                    }
                    backend = Some(v.to_owned());
                }
                "uuid" => {
                    if uuid.is_some() {
                        return Err(VtpmSpecError::DuplicateKey(k.into()));
                    }
                    let u = parse_xl_uuid(v).map_err(|_| VtpmSpecError::BadUuid(v.into()))?;
                    if u.is_nil() {
                        return Err(VtpmSpecError::NilUuid(v.into()));
                    }
                    uuid = Some(u);
                }
                "model" => {
                    if model.is_some() {
                        return Err(VtpmSpecError::DuplicateKey(k.into()));
                    }
                    model = Some(match v {
                        "tis" => TpmModel::Tis,
                        "crb" => TpmModel::Crb,
                        other => return Err(VtpmSpecError::BadModel(other.into())),
                    });
                }
                "devid" => {
                    return Err(VtpmSpecError::UnknownKey {
                        key: k.into(),
                        hint: "xl numbers vtpm devices by their position in the list \
                               (the first is devid 0); remove `devid=`",
                    });
                }
                "backendtype" => {
                    return Err(VtpmSpecError::UnknownKey {
                        key: k.into(),
                        hint: "vtpm devices have no backend type in xl (unlike disks); remove it",
                    });
                }
                _ => {
                    return Err(VtpmSpecError::UnknownKey {
                        key: k.into(),
                        hint: "xl accepts only `backend=` and `uuid=` in a vtpm spec \
                               (and xl-vtpm `model=tis` for an HVM guest's emulated TPM)",
                    });
                }
            }
        }
        let backend = match (backend, model) {
            (Some(b), Some(_)) if !matches!(b.as_str(), "0" | "Domain-0") => {
                return Err(VtpmSpecError::ModelNeedsDom0(b));
            }
            (Some(b), _) => b,
            (None, Some(_)) => "0".to_owned(),
            (None, None) => return Err(VtpmSpecError::MissingBackend),
        };
        Ok(VtpmSpec {
            backend,
            uuid,
            model,
        })
    }
}

impl fmt::Display for VtpmSpec {
    /// The spec string as xl reads it: `backend=X` or `backend=X,uuid=U` (and `,model=M`,
    /// xl-vtpm's own key, which is never handed to xl).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend={}", self.backend)?;
        if let Some(u) = &self.uuid {
            write!(f, ",uuid={}", u.hyphenated())?;
        }
        if let Some(m) = self.model {
            write!(f, ",model={}", m.as_str())?;
        }
        Ok(())
    }
}

/// Parses a UUID the way libxl does: exactly 36 characters, 8-4-4-4-12 hex digits.
pub fn parse_xl_uuid(s: &str) -> Result<Uuid, VtpmSpecError> {
    let ok_shape = s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if !ok_shape {
        return Err(VtpmSpecError::BadUuid(s.to_owned()));
    }
    Uuid::parse_str(s).map_err(|_| VtpmSpecError::BadUuid(s.to_owned()))
}

pub(super) fn validate_vtpm_value(v: &Value) -> Result<(), ParseErrorKind> {
    let items = v.as_list().ok_or_else(|| ParseErrorKind::WrongType {
        key: "vtpm".into(),
        expected: "a list of spec strings, e.g. vtpm = [ \"backend=vtpm-guest1\" ]",
        found: v.kind(),
    })?;
    for (index, item) in items.iter().enumerate() {
        let s = item.as_str().ok_or_else(|| ParseErrorKind::WrongType {
            key: "vtpm".into(),
            expected: "a list of spec strings, e.g. vtpm = [ \"backend=vtpm-guest1\" ]",
            found: item.kind(),
        })?;
        s.parse::<VtpmSpec>()
            .map_err(|error| ParseErrorKind::Vtpm { index, error })?;
    }
    Ok(())
}
