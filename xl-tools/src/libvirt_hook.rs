//! libvirt's libxl hook: the same guest ⇄ vTPM coupling for libvirt- (and OpenStack
//! Nova-) managed Xen guests.
//!
//! libvirt runs `/etc/libvirt/hooks/libxl <domain> <operation> <sub-operation> <extra>`
//! synchronously at fixed points of a domain's life, with the full domain XML on stdin
//! (libvirt `docs/hooks.rst`, `src/util/virhook.c`, `src/libxl/libxl_domain.c`). This module
//! parses such an invocation and decides what to do; it performs nothing itself. The decision
//! ([`Decision`]) lists [`Action`]s for the binary to execute and says which exit code to use
//! when they fail, because the exit code is the whole protocol:
//!
//! | operation (libxl driver order) | when | non-zero exit means | our action |
//! |---|---|---|---|
//! | `prepare begin -` | before anything is set up | **guest is not started** | ensure the vTPM exists and its domain runs with its backend in InitWait; for a guest arriving with its vTPM (see `migrate`), nothing |
//! | `start begin -` | libxl config built, domain not yet created | guest is not started | none |
//! | `started begin -` | domain created and (unless `--paused`) unpaused | libvirt **destroys** the guest | attach the vTPM device to the guest; for a guest arriving with its vTPM, pull the identity from its holder (crate::libvirt_migrate), which attaches it |
//! | `stopped end -` | domain gone | logged, ignored | none (`release` follows) |
//! | `release end -` | all resources released; also after a failed start | logged, ignored | stop the vTPM domain, unless another host holds the pair (the guest moved there) |
//! | `migrate begin -` | incoming migration (XML filter) | migration cancelled | a guest with a vTPM: refuse, unless the shared registry has its vTPM running on another host and this host has the migration configuration (crate::libvirt_migrate), then let it in with its vTPM; without XML (libvirt 9.x's libxl driver sends none), judged by the guest's name in the registry |
//! | `reconnect begin -` | libvirtd restarted and found the domain | libvirt **kills the running guest** | verify only; always exit 0 |
//! | anything else (`restore`, `attach` are QEMU-only) | — | — | none, exit 0 |
//!
//! # Why these choices
//!
//! * **prepare, not start or started, creates the vTPM.** libxl gives a frontend's backend
//!   10 s to reach InitWait; a vTPM domain must boot and connect to the manager first. At
//!   `prepare` a failure still cleanly prevents the guest from starting (libvirt aborts
//!   the start on a non-zero exit), so no guest ever runs without the TPM it expects.
//! * **started attaches.** libvirt's libxl driver has no vTPM device in its domain XML, so the
//!   guest's config cannot carry `vtpm=`; the device is hot-plugged (`xl vtpm-attach`) at
//!   `started`. Linux's `xen-tpmfront` probes hot-plugged devices, but early-boot users
//!   (IMA, measured boot) run before it: start such guests with `virsh start --paused` so the
//!   device exists before the first instruction, or use `xl-vtpm create`. If the attach fails,
//!   the non-zero exit makes libvirt destroy the guest (then `release` stops the vTPM): fail
//!   closed.
//! * **release stops, never deletes.** A libvirt reboot runs `stopped`, `release`, `prepare`,
//!   `start` and `started`, so stopping at `release` and starting at `prepare` keeps the
//!   vTPM's persistent state (keys, NV) across guest reboots while PCRs reset as on real
//!   hardware. libvirt has no hook for *undefine*, so the hook never destroys a vTPM identity;
//!   that is `xl-vtpm mgr vtpm del`, explicitly. Stopping (instead of leaving the vTPM domain
//!   in InitWait) is what closes the reattachment trap: a running, unattached vTPM domain is
//!   one any guest could connect to.
//! * **reconnect never fails**: a non-zero exit there makes libvirt kill running guests.
//! * **migrate lets a vTPM follow only through the shared registry**: the vTPM's state is sealed
//!   to its host's physical TPM, so it can follow the guest only as `xl-vtpm migrate` moves it
//!   (sealed to the destination's TPM after the source checked it), which needs the hosts'
//!   configuration (`/etc/xvtpm/libvirt-migrate.json`, crate::libvirt_migrate); without it a guest
//!   with a vTPM is refused. libvirt 9.0's libxl driver formats the XML it
//!   hands this hook with flags its formatter refuses (`VIR_DOMAIN_XML_*` where
//!   `VIR_DOMAIN_DEF_FORMAT_*` belong), so the hook gets an **empty stdin** — seen on two real Xen
//!   hosts in the testbed (`libvirt-2host`). Failing closed on that refused every incoming
//!   migration, of guests without a vTPM too. Without XML the guest is judged by its name: a
//!   registry pair for that name refuses, none lets the migration in. This is only as good as the
//!   registry: hosts that migrate guests between them share one (`--registry postgres://…`); with
//!   a registry of its own the destination cannot know the guest has a vTPM, and its `prepare`
//!   would then make the guest a new one. `migrate` is the only point where a refusal is fully clean:
//!   libvirt runs it in Prepare, before the source's guest is suspended (libvirt resumes no
//!   guest whose Perform failed).
//! * A start that fails *before* `start` (e.g. the lock manager refuses after `prepare`)
//!   gets no `release` from libvirt; the vTPM domain then runs without a guest, and
//!   `xl-vtpm registry check` reports and removes it (orphaned vTPM domain).
//!
//! # Which guests get a vTPM
//!
//! A guest opts in with an element in its `<metadata>` (preferred, since libvirt keeps
//! foreign-namespace metadata verbatim):
//!
//! ```xml
//! <metadata>
//!   <xvtpm:vtpm xmlns:xvtpm="https://xvtpm.invalid/xmlns/1"
//!               uuid="ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839" group="tenant-a" version="2.0"/>
//! </metadata>
//! ```
//!
//! (all attributes optional: without `uuid` the registry's vTPM for this guest is used, or a
//! new one allocated), or with a `<tpm>` device whose backend is `emulator`. Guests with
//! neither are not touched at all.

use std::fmt;

use uuid::Uuid;

/// XML namespace of the `<vtpm>` metadata element.
pub const XMLNS: &str = "https://xvtpm.invalid/xmlns/1";

/// The hook operation (second argument).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// Before anything is set up for the domain.
    Prepare,
    /// Just before the domain is created.
    Start,
    /// The domain has been created.
    Started,
    /// The domain has stopped.
    Stopped,
    /// The domain's resources have been released.
    Release,
    /// Incoming migration (the hook is an XML filter).
    Migrate,
    /// Restore from a saved image (QEMU driver only).
    Restore,
    /// libvirtd restarted and reconnected to the running domain.
    Reconnect,
    /// Attach to an externally started process (QEMU driver only).
    Attach,
    /// An operation this version does not know.
    Other(String),
}

impl Operation {
    fn parse(s: &str) -> Operation {
        match s {
            "prepare" => Operation::Prepare,
            "start" => Operation::Start,
            "started" => Operation::Started,
            "stopped" => Operation::Stopped,
            "release" => Operation::Release,
            "migrate" => Operation::Migrate,
            "restore" => Operation::Restore,
            "reconnect" => Operation::Reconnect,
            "attach" => Operation::Attach,
            other => Operation::Other(other.to_owned()),
        }
    }

    /// The operation as libvirt spells it.
    pub fn as_str(&self) -> &str {
        match self {
            Operation::Prepare => "prepare",
            Operation::Start => "start",
            Operation::Started => "started",
            Operation::Stopped => "stopped",
            Operation::Release => "release",
            Operation::Migrate => "migrate",
            Operation::Restore => "restore",
            Operation::Reconnect => "reconnect",
            Operation::Attach => "attach",
            Operation::Other(s) => s,
        }
    }

    /// Whether this operation needs the domain XML at all.
    fn is_relevant(&self) -> bool {
        matches!(
            self,
            Operation::Prepare
                | Operation::Started
                | Operation::Release
                | Operation::Migrate
                | Operation::Reconnect
        )
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A hook invocation: `libxl <domain> <operation> <sub-operation> <extra>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// Domain name (first argument).
    pub domain: String,
    /// Operation (second argument).
    pub operation: Operation,
    /// Sub-operation (`begin`/`end`); `None` for libvirt's `-`.
    pub sub_operation: Option<String>,
    /// Extra argument (a shutoff reason in newer libvirt); `None` for `-`.
    pub extra: Option<String>,
}

/// Errors of the hook; the binary prints them on stderr (libvirt logs that on failure).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// Wrong number of arguments.
    #[error(
        "libvirt hook: expected 4 arguments `<domain> <operation> <sub-operation> <extra>`, got {0}; \
         install xl-vtpm as /etc/libvirt/hooks/libxl (or call `xl-vtpm libvirt-hook` from it)"
    )]
    Usage(usize),
    /// The domain XML does not parse.
    #[error("libvirt hook: domain XML on stdin is not well-formed: {0}")]
    BadXml(String),
    /// The XML is well-formed but not what libvirt sends, or contradicts the invocation.
    #[error("libvirt hook: domain XML: {0}")]
    BadDomain(String),
    /// Our metadata element is malformed.
    #[error("libvirt hook: <vtpm xmlns=\"{XMLNS}\">: {0}")]
    BadMetadata(String),
}

impl Invocation {
    /// Parses the arguments after the program name.
    pub fn from_args<I, S>(args: I) -> Result<Invocation, HookError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let args: Vec<String> = args.into_iter().map(|s| s.as_ref().to_owned()).collect();
        if args.len() != 4 {
            return Err(HookError::Usage(args.len()));
        }
        let dash = |s: &str| (s != "-").then(|| s.to_owned());
        Ok(Invocation {
            domain: args[0].clone(),
            operation: Operation::parse(&args[1]),
            sub_operation: dash(&args[2]),
            extra: dash(&args[3]),
        })
    }
}

/// TPM version requested for a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpmVersion {
    /// TPM 2.0 (the default).
    V2,
    /// TPM 1.2.
    V1_2,
}

/// Where a guest's vTPM request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestSource {
    /// Our `<metadata>` element.
    Metadata,
    /// A `<tpm>` device with an `emulator` backend.
    TpmDevice,
}

/// What a guest's XML asks of us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VtpmRequest {
    /// A specific vTPM identity, if given.
    pub uuid: Option<Uuid>,
    /// Manager group, if given.
    pub group: Option<String>,
    /// TPM version.
    pub version: TpmVersion,
    /// Where the request came from.
    pub source: RequestSource,
}

/// The parts of the domain XML the hook needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`.
    pub uuid: Uuid,
    /// `<domain id=…>` when the domain exists (absent or -1 otherwise).
    pub domid: Option<u32>,
    /// The vTPM request, if the guest has one.
    pub vtpm: Option<VtpmRequest>,
}

/// Parses the domain XML libvirt passes on stdin.
pub fn parse_domain_xml(xml: &str) -> Result<DomainInfo, HookError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| HookError::BadXml(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
        return Err(HookError::BadDomain(format!(
            "root element is <{}>, expected <domain>",
            root.tag_name().name()
        )));
    }
    let child = |name: &str| {
        root.children()
            .find(|n| n.is_element() && n.has_tag_name(name))
    };
    let text = |name: &str| -> Result<String, HookError> {
        let n = child(name).ok_or_else(|| HookError::BadDomain(format!("no <{name}> element")))?;
        Ok(n.text().unwrap_or("").trim().to_owned())
    };
    let name = text("name")?;
    if name.is_empty() {
        return Err(HookError::BadDomain("<name> is empty".into()));
    }
    let uuid_s = text("uuid")?;
    let uuid = Uuid::parse_str(&uuid_s)
        .map_err(|_| HookError::BadDomain(format!("<uuid> `{uuid_s}` is not a UUID")))?;
    let domid = match root.attribute("id") {
        None => None,
        Some(s) => match s.parse::<i64>() {
            Ok(-1) => None,
            Ok(n) if (0..0x7ff0).contains(&n) => Some(n as u32),
            _ => {
                return Err(HookError::BadDomain(format!(
                    "<domain id='{s}'> is not a domid"
                )));
            }
        },
    };

    let from_metadata = match child("metadata") {
        None => None,
        Some(md) => {
            let mut ours = md
                .children()
                .filter(|n| n.is_element() && n.tag_name().namespace() == Some(XMLNS));
            match (ours.next(), ours.next()) {
                (None, _) => None,
                (Some(_), Some(_)) => {
                    return Err(HookError::BadMetadata(
                        "more than one element in our namespace; keep exactly one <vtpm>".into(),
                    ));
                }
                (Some(el), None) => Some(parse_metadata(el)?),
            }
        }
    };
    let from_device = match child("devices") {
        None => None,
        Some(devs) => {
            let mut tpms = devs
                .children()
                .filter(|n| n.is_element() && n.has_tag_name("tpm"));
            match (tpms.next(), tpms.next()) {
                (None, _) => None,
                (Some(_), Some(_)) => {
                    return Err(HookError::BadDomain(
                        "more than one <tpm> device; a guest gets one vTPM".into(),
                    ));
                }
                (Some(t), None) => Some(parse_tpm_device(t)?),
            }
        }
    };
    let vtpm = match (from_metadata, from_device) {
        (Some(m), Some(d)) if m.version != d.version => {
            return Err(HookError::BadDomain(format!(
                "<tpm> asks for TPM {} but the xvtpm metadata for TPM {}; make them agree",
                version_str(d.version),
                version_str(m.version)
            )));
        }
        (Some(m), _) => Some(m),
        (None, d) => d,
    };
    Ok(DomainInfo {
        name,
        uuid,
        domid,
        vtpm,
    })
}

fn version_str(v: TpmVersion) -> &'static str {
    match v {
        TpmVersion::V2 => "2.0",
        TpmVersion::V1_2 => "1.2",
    }
}

fn parse_version(s: &str, what: &str) -> Result<TpmVersion, String> {
    match s {
        "2.0" | "2" => Ok(TpmVersion::V2),
        "1.2" => Ok(TpmVersion::V1_2),
        other => Err(format!(
            "{what} `{other}` is not a TPM version; use \"2.0\" or \"1.2\""
        )),
    }
}

fn parse_metadata(el: roxmltree::Node<'_, '_>) -> Result<VtpmRequest, HookError> {
    if el.tag_name().name() != "vtpm" {
        return Err(HookError::BadMetadata(format!(
            "element <{}> is not ours; the element is <vtpm>",
            el.tag_name().name()
        )));
    }
    let mut req = VtpmRequest {
        uuid: None,
        group: None,
        version: TpmVersion::V2,
        source: RequestSource::Metadata,
    };
    for a in el.attributes() {
        if a.namespace().is_some_and(|ns| ns != XMLNS) {
            continue;
        }
        match a.name() {
            "uuid" => {
                req.uuid = Some(crate::xlcfg::parse_xl_uuid(a.value().trim()).map_err(|_| {
                    HookError::BadMetadata(format!(
                        "uuid=\"{}\" is not a UUID; write 8-4-4-4-12 hex digits",
                        a.value()
                    ))
                })?)
            }
            "group" => {
                let g = a.value().trim();
                if g.is_empty() {
                    return Err(HookError::BadMetadata(
                        "group=\"\" is empty; name the manager group or drop the attribute".into(),
                    ));
                }
                req.group = Some(g.to_owned());
            }
            "version" => {
                req.version =
                    parse_version(a.value().trim(), "version").map_err(HookError::BadMetadata)?
            }
            other => {
                return Err(HookError::BadMetadata(format!(
                    "unknown attribute `{other}`; the attributes are uuid, group and version"
                )));
            }
        }
    }
    Ok(req)
}

fn parse_tpm_device(t: roxmltree::Node<'_, '_>) -> Result<VtpmRequest, HookError> {
    let backend = t
        .children()
        .find(|n| n.is_element() && n.has_tag_name("backend"))
        .ok_or_else(|| HookError::BadDomain("<tpm> has no <backend>".into()))?;
    match backend.attribute("type") {
        Some("emulator") => {}
        Some(other) => {
            return Err(HookError::BadDomain(format!(
                "<tpm> backend type '{other}' cannot be served on Xen; use type='emulator' (served by an xvtpm vTPM) \
                 or the xvtpm metadata element"
            )));
        }
        None => {
            return Err(HookError::BadDomain(
                "<tpm><backend> has no type; use type='emulator'".into(),
            ));
        }
    }
    let version = match backend.attribute("version") {
        None => TpmVersion::V2,
        Some(v) => parse_version(v, "<tpm><backend version>").map_err(HookError::BadDomain)?,
    };
    Ok(VtpmRequest {
        uuid: None,
        group: None,
        version,
        source: RequestSource::TpmDevice,
    })
}

/// Something the binary should do for the hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Make sure the guest's vTPM exists (look it up in the registry by guest UUID, or allocate
    /// it in the manager), refuse if it is bound to another guest, start its domain if it is
    /// not running and wait until its backend is in InitWait.
    EnsureVtpmRunning {
        /// Guest name.
        guest_name: String,
        /// Guest UUID.
        guest_uuid: Uuid,
        /// The request from the XML.
        request: VtpmRequest,
    },
    /// Attach the guest's vTPM to the now-existing guest (`xl vtpm-attach <domid>
    /// backend=<vTPM domain> uuid=<vTPM>`) and record the pair as running.
    AttachVtpm {
        /// Guest name.
        guest_name: String,
        /// Guest UUID.
        guest_uuid: Uuid,
        /// Guest domid (from `<domain id=…>`; look it up by name if absent).
        guest_domid: Option<u32>,
    },
    /// Stop the guest's vTPM domain (its state and its binding to this guest are kept).
    StopVtpm {
        /// Guest name.
        guest_name: String,
        /// Guest UUID.
        guest_uuid: Uuid,
    },
    /// Check that the guest's vTPM domain runs; report problems, change nothing.
    Verify {
        /// Guest name.
        guest_name: String,
        /// Guest UUID.
        guest_uuid: Uuid,
    },
    /// An incoming migration whose XML libvirt did not send: refuse it if the registry binds a
    /// vTPM to a guest of this name, let it in otherwise.
    CheckIncoming {
        /// Guest name (the hook's first argument).
        guest_name: String,
    },
    /// Refuse an incoming migration (exit non-zero with this reason on stderr).
    RefuseMigration {
        /// Guest name.
        guest_name: String,
        /// Why.
        reason: String,
    },
}

/// How a failed action maps to the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Exit 1: libvirt stops the operation (or logs it, for `release`).
    ExitNonZero,
    /// Print the error on stderr and exit 0: a non-zero exit would do harm (`reconnect` kills
    /// running guests).
    LogAndExitZero,
}

/// What to do for one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Actions, in order; empty for a no-op.
    pub actions: Vec<Action>,
    /// What a failure of an action means.
    pub on_failure: OnFailure,
}

impl Decision {
    fn noop() -> Decision {
        Decision {
            actions: Vec::new(),
            on_failure: OnFailure::LogAndExitZero,
        }
    }

    /// Whether nothing is to be done (exit 0, print nothing).
    pub fn is_noop(&self) -> bool {
        self.actions.is_empty()
    }

    /// Exit code after executing the actions: 0 on success; on failure per [`OnFailure`].
    /// [`Action::RefuseMigration`] counts as a failure by design.
    pub fn exit_code(&self, succeeded: bool) -> i32 {
        let refused = self
            .actions
            .iter()
            .any(|a| matches!(a, Action::RefuseMigration { .. }));
        if succeeded && !refused {
            return 0;
        }
        match self.on_failure {
            OnFailure::ExitNonZero => 1,
            OnFailure::LogAndExitZero => 0,
        }
    }
}

/// Exit code for a [`HookError`] (bad arguments or XML) during `operation`: fail closed where
/// that is safe (`prepare`, `started`, `migrate`: the guest does not run without its TPM),
/// exit 0 where a failure would harm running guests (`reconnect`) or is ignored anyway.
pub fn exit_code_for_error(operation: Option<&Operation>) -> i32 {
    match operation {
        Some(Operation::Prepare | Operation::Started | Operation::Migrate | Operation::Release) => {
            1
        }
        Some(_) => 0,
        // Unparsable arguments: libvirt always passes four; whoever called us wrongly wants to know.
        None => 2,
    }
}

/// Decides what to do for `inv`, given the domain XML from stdin. The XML is parsed only for
/// operations that act (`prepare`, `started`, `release`, `migrate`, `reconnect`); every other
/// operation is a no-op that exits 0 whatever the XML is.
pub fn decide(inv: &Invocation, xml: &str) -> Result<Decision, HookError> {
    if !inv.operation.is_relevant() {
        return Ok(Decision::noop());
    }
    if inv.operation == Operation::Migrate && xml.trim().is_empty() {
        return Ok(Decision { actions: vec![Action::CheckIncoming { guest_name: inv.domain.clone() }], on_failure: OnFailure::ExitNonZero });
    }
    let dom = parse_domain_xml(xml)?;
    if dom.name != inv.domain {
        return Err(HookError::BadDomain(format!(
            "XML is for domain `{}` but the hook was called for `{}`",
            dom.name, inv.domain
        )));
    }
    let Some(request) = dom.vtpm else {
        return Ok(Decision::noop());
    };
    let (guest_name, guest_uuid) = (dom.name, dom.uuid);
    let one = |a: Action, on_failure| Decision {
        actions: vec![a],
        on_failure,
    };
    Ok(match inv.operation {
        Operation::Prepare => one(Action::EnsureVtpmRunning { guest_name, guest_uuid, request }, OnFailure::ExitNonZero),
        Operation::Started => one(
            Action::AttachVtpm { guest_name, guest_uuid, guest_domid: dom.domid },
            OnFailure::ExitNonZero,
        ),
        Operation::Release => one(Action::StopVtpm { guest_name, guest_uuid }, OnFailure::ExitNonZero),
        Operation::Reconnect => one(Action::Verify { guest_name, guest_uuid }, OnFailure::LogAndExitZero),
        Operation::Migrate => one(
            Action::RefuseMigration {
                guest_name,
                reason: "this guest has an xvtpm vTPM whose state is sealed to the source host's TPM; \
                         it cannot migrate with the guest. Shut the guest down and move it cold, or \
                         remove the vTPM from its definition"
                    .into(),
            },
            OnFailure::ExitNonZero,
        ),
        _ => Decision::noop(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args() {
        let i = Invocation::from_args(["g", "release", "end", "-"]).unwrap();
        assert_eq!(i.operation, Operation::Release);
        assert_eq!(i.sub_operation.as_deref(), Some("end"));
        assert_eq!(i.extra, None);
        assert_eq!(Invocation::from_args(["g", "x"]), Err(HookError::Usage(2)));
        assert_eq!(
            Invocation::from_args(["g", "frobnicate", "-", "-"])
                .unwrap()
                .operation,
            Operation::Other("frobnicate".into())
        );
    }
}
