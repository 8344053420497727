//! `xl-vtpm`: the dom0 tool of xvtpm. See the crate docs and README.md.

#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vtpm_proto::mgr::{AdminReply, AdminRequest, GroupInfo, StatusInfo};
use xl_tools::admin::Admin;
use xl_tools::exit::{self, CliError};
use xl_tools::guest;
use xl_tools::xenlife;
use xl_tools::local::{self, Local, Row};

const EXIT_CODES: &str = "Exit codes: 0 ok, 1 failure, 2 bad usage, 3 manager unreachable, \
4 manager not provisioned, 5 no such vTPM or group, 6 refused (confirmation needed, exists, not permitted), \
7 evidence, an EK certificate or an enrollment did not verify, \
8 verify: evidence verified but the host state was not checked (no --host-pcrs-policy FILE), \
9 libvirt-handoff: the vTPM left and its move did not complete (`xl-vtpm migrate GUEST HOST --finish`).";

/// Create, run and destroy vTPMs; administer vtpmmgr.
#[derive(Parser, Debug)]
#[command(name = "xl-vtpm", version, about, after_help = EXIT_CODES)]
struct Args {
    /// vtpmmgr's runtime directory (admin socket).
    #[arg(long, env = "XVTPM_RUN_DIR", default_value = "/run/xvtpm", global = true)]
    run_dir: PathBuf,
    /// Persistent state directory of local vTPMs.
    #[arg(long, env = "XVTPM_STATE_DIR", default_value = "/var/lib/xvtpm", global = true)]
    state_dir: PathBuf,
    /// The guest ⇄ vTPM registry: a SQLite file (PATH or sqlite:PATH; default
    /// STATE_DIR/registry.sqlite) or a PostgreSQL database shared by hosts
    /// (postgres://USER@HOST/DB, postgres://USER@%2Frun%2Fpostgresql/DB, or host=DIR dbname=DB).
    #[arg(long, env = "XVTPM_REGISTRY", global = true, value_name = "LOCATION")]
    registry: Option<String>,
    /// This host's name in the registry (activation records, per-host checks; default: the hostname).
    #[arg(long, env = "XVTPM_HOST", global = true, value_name = "NAME")]
    host: Option<String>,
    /// The vtpm-domain binary (default: next to xl-vtpm, then $PATH).
    #[arg(long, env = "XVTPM_VTPM_DOMAIN", global = true)]
    vtpm_domain: Option<PathBuf>,
    /// Debugging only: run vTPM processes as root, without no-new-privileges or seccomp.
    #[arg(long, env = "XVTPM_NO_SANDBOX", global = true, action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::FalseyValueParser::new())]
    no_sandbox: bool,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Administer the manager.
    #[command(subcommand)]
    Mgr(MgrCmd),
    /// Local vTPMs (processes on this host speaking swtpm's protocol).
    #[command(subcommand)]
    Vtpm(VtpmCmd),
    /// Create a Xen guest and its vTPM together from an ordinary xl.cfg (with or
    /// without a vtpm= line); rolls back on any failure. An HVM guest with
    /// vtpm = [ "model=tis" ] gets a TIS TPM emulated by its device model (docs/hvm.md).
    Create {
        /// The guest's xl.cfg.
        config: PathBuf,
        /// Manager group for a new vTPM.
        #[arg(long)]
        group: Option<String>,
        /// Check the config, the registry and Xen, say what would be done, and create nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Destroy a guest (like `xl destroy`), then stop its vTPM (its state is kept).
    Destroy {
        /// Guest name.
        name: String,
    },
    /// Shut a guest down (waits), then stop its vTPM.
    Shutdown {
        /// Guest name.
        name: String,
    },
    /// Reboot a guest; its vTPM keeps running.
    Reboot {
        /// Guest name.
        name: String,
    },
    /// Move a running guest with its vTPM: to a new domain on this host (`localhost`), or to
    /// another host with its vTPM's identity sealed to that host's TPM (an HVM guest whose device
    /// model emulates its TPM: with --non-live); the guest keeps its EK, keys, NV and PCRs
    /// (docs/migration.md, "Moving the guest with its vTPM", "To another host").
    Migrate {
        /// Guest name.
        name: String,
        /// Destination: localhost (this host; the vTPM stays with this manager), or another
        /// host, reached with `--ssh` (its manager is checked with --ek-ca and
        /// --host-pcrs-policy before anything moves). (Not `host`: that id is the global
        /// `--host`, this host's name in the registry.)
        #[arg(value_name = "HOST")]
        destination: Option<String>,
        /// The transport (`xl migrate -s CMD`; to another host also the receiver's: `CMD HOST
        /// RECEIVER`). Default: `ssh`; for localhost the receiver runs directly, no ssh.
        #[arg(long, value_name = "CMD")]
        ssh: Option<String>,
        /// Complete an `xl-vtpm migrate` that was cut short: on this host (no HOST), the steps
        /// after `xl migrate` (the incoming domain exists, paused); to another host (HOST, with
        /// the move's --ssh, --receiver and checks), the steps from where it stopped.
        #[arg(long)]
        finish: bool,
        /// Move without log-dirty mode (a Xen that refuses it for PV guests): `xl save` to a
        /// root-only file, `xl restore -p` (on the other host: the file is sent to its
        /// receiver); the guest is stopped for the whole copy.
        #[arg(long)]
        non_live: bool,
        /// To another host: the command the transport runs there.
        #[arg(long, value_name = "CMD", default_value = "xl-vtpm migrate-receive")]
        receiver: String,
        /// To another host: trusted TPM vendor root certificate (repeatable).
        #[arg(long = "ek-ca")]
        ek_ca: Vec<PathBuf>,
        /// To another host: an intermediate certificate of its EK certificate (repeatable).
        #[arg(long)]
        ek_intermediate: Vec<PathBuf>,
        /// To another host: the SHA-256 host PCR values it must have (`xl-vtpm verify`'s format).
        #[arg(long)]
        host_pcrs_policy: Option<PathBuf>,
        /// To another host: the group the vTPM joins there (default: its default group).
        #[arg(long)]
        group: Option<String>,
    },
    /// The destination's end of `xl-vtpm migrate GUEST HOST` (the source runs it through its
    /// transport; it speaks on stdin/stdout). Not for interactive use.
    #[command(hide = true)]
    MigrateReceive,
    /// The source's part of a libvirt migration that takes the guest's vTPM along: run by the
    /// destination's libvirt hook through the transport, with this host's own checks from
    /// /etc/xvtpm/libvirt-migrate.json (docs/libvirt.md). Not for interactive use.
    #[command(hide = true)]
    LibvirtHandoff {
        /// Guest name (libvirt suspended it here).
        name: String,
        /// The destination's registry host name, reached with the configuration's transport.
        #[arg(value_name = "HOST")]
        destination: String,
        /// The guest's domain there (paused until libvirt's Finish): move the vTPM.
        #[arg(long, required_unless_present = "prepare", conflicts_with = "prepare")]
        domid: Option<u32>,
        /// Only check the destination and make its offer, while the guest still runs here
        /// (libvirt's `migrate begin` on the destination); the move reuses the offer.
        #[arg(long)]
        prepare: bool,
    },
    /// Guests with their vTPMs (registry and what runs now).
    List,
    /// Attach to a guest's console (`xl console`).
    Console {
        /// Guest name.
        name: String,
    },
    /// Couple lifetimes: stop a guest's vTPM when the guest goes away (watches @releaseDomain).
    Watch {
        /// Safety-net poll interval in seconds.
        #[arg(long, default_value_t = 5)]
        poll_secs: u64,
    },
    /// The guest ⇄ vTPM registry.
    #[command(subcommand)]
    Registry(RegistryCmd),
    /// Tenants of the attestation service (xvtpm-attestd) and the vTPMs each may ask about.
    #[command(subcommand)]
    Tenant(xl_tools::tenant::TenantCmd),
    /// libvirt `/etc/libvirt/hooks/libxl` mode: `xl-vtpm libvirt-hook <domain> <op> <subop> <extra>`,
    /// domain XML on stdin.
    LibvirtHook {
        /// The hook's arguments as libvirt passes them.
        #[arg(num_args = 0.., allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// vTPMs of libvirt/QEMU domains (made by the swtpm entry points, docs/libvirt.md).
    #[command(subcommand)]
    Libvirt(LibvirtCmd),
    /// Commands run inside a guest (or against any vTPM).
    #[command(subcommand)]
    Guest(GuestCmd),
    /// Verify a deep-quote evidence bundle offline under an enrolled AK (exit 0 only if every
    /// check passed and the host PCR policy was checked; 8 without --host-pcrs-policy FILE).
    Verify(xl_tools::attest::VerifyArgs),
    /// Attest one of your vTPMs through the provider's attestation service (xvtpm-attestd):
    /// enroll the host if it is not pinned yet, fetch its event log, get a deep quote with a
    /// fresh nonce and verify it; exit codes as `verify`.
    Attest(Box<xl_tools::attest_client::AttestArgs>),
    /// Enroll a host: verify its EK certificate chain to the TPM vendor's root, prove each group
    /// AK lives in that TPM by credential activation, pin the AKs in a trust store.
    Enroll(xl_tools::attest::EnrollArgs),
    /// The host's measured-boot event log: export it (provider), show it, write a policy from a
    /// known-good host (tenant); `verify --event-log` replays it against a deep quote.
    #[command(subcommand)]
    Eventlog(xl_tools::eventlog::EventlogCmd),
    /// Verify a vTPM's EK certificate (read with `tpm2_nvread 0x1c00002` or `0x1c0000a`, DER or
    /// PEM) against its group's EK CA (`xl-vtpm mgr group ca-cert`); exit 0 only if it verified.
    VerifyEkcert {
        /// The EK certificate.
        cert: PathBuf,
        /// The group's CA certificate (PEM or DER).
        #[arg(long)]
        ca: PathBuf,
        /// Also require the certified key to be this EK (`tpm2_readpublic -c 0x81010001 -o FILE`).
        #[arg(long)]
        ek: Option<PathBuf>,
        /// Also verify the CA's certification by the group AK (`ca-cert --certify FILE`).
        #[arg(long, requires = "ak")]
        certify: Option<PathBuf>,
        /// The group's AK (TPMT_PUBLIC, raw or hex; `xl-vtpm mgr group ak`), for --certify.
        #[arg(long, requires = "certify")]
        ak: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum LibvirtCmd {
    /// Destroy the vTPMs of libvirt domains that are undefined and whose TPM state directory
    /// libvirt removed (`virsh undefine` without `--keep-tpm` or `persistent_state='yes'`).
    Sweep {
        /// libvirt URI for virsh (default: virsh's, e.g. $LIBVIRT_DEFAULT_URI or qemu:///system).
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
        /// Keep sweeping every SECS seconds.
        #[arg(long, value_name = "SECS")]
        watch: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum RegistryCmd {
    /// Reconcile the registry with the running domains and report drift.
    Check {
        /// Also repair what can be repaired (this host's pairs only).
        #[arg(long)]
        repair: bool,
        /// Also report other hosts' pairs (interrupted operations, activation records).
        #[arg(long)]
        all_hosts: bool,
    },
    /// Forget a stopped guest ⇄ vTPM pair (the vTPM identity stays in the manager;
    /// delete it with `xl-vtpm mgr vtpm del`).
    Remove {
        /// Guest name.
        name: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum MgrVtpmCmd {
    /// vTPM identities known to the manager.
    List,
    /// Bind a vTPM to the Xen domain that runs it (vTPM-domain mode): the manager then
    /// serves that domain's tpmif link, and no other.
    AttachDomain {
        /// vTPM UUID.
        uuid: String,
        /// Domain id of the vTPM domain.
        domid: u32,
    },
    /// Delete a vTPM identity in the manager (its state becomes undecryptable).
    Del {
        /// vTPM UUID.
        uuid: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum GuestCmd {
    /// Ask the vTPM for a deep quote and write the evidence bundle.
    DeepQuote {
        /// Fresh nonce from the verifier, hex (≤ 64 bytes).
        #[arg(long)]
        nonce: String,
        /// vPCRs to include (SHA-256 bank).
        #[arg(long, default_value = "0-7")]
        vpcrs: String,
        /// Host PCRs the physical quote covers (SHA-256 bank).
        #[arg(long, default_value = "0-7")]
        host_pcrs: String,
        /// Flags bound into the evidence.
        #[arg(long, default_value_t = 0)]
        flags: u32,
        /// The vTPM: swtpm:host=H,port=P, device:/dev/tpm0 or a device path.
        #[arg(long, env = "TPM2TOOLS_TCTI", default_value = "device:/dev/tpm0")]
        tcti: String,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum MgrCmd {
    /// Provision the manager: storage key, default group AK, master secret
    /// sealed to the host's current PCR values.
    Provision {
        /// SHA-256 PCRs to seal to, e.g. 0,2,4,7 or 0-7.
        #[arg(long, default_value = "0,2,4,7")]
        pcrs: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Manager status.
    Status,
    /// Write this host's enrollment material for tenants: the physical TPM's EK certificate,
    /// every group's AK public area, the host id (docs/enrollment.md).
    Enrollment {
        /// Output file (JSON).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// FILE: an intermediate CA certificate of the EK chain to include (PEM or DER);
        /// repeatable.
        #[arg(long = "ek-intermediate", value_name = "FILE")]
        ek_intermediate: Vec<PathBuf>,
    },
    /// Groups (each has its own attestation key).
    #[command(subcommand)]
    Group(GroupCmd),
    /// vTPM identities in the manager.
    #[command(subcommand)]
    Vtpm(MgrVtpmCmd),
}

#[derive(Subcommand, Debug)]
enum GroupCmd {
    /// Add a group.
    Add {
        /// Unique name ([A-Za-z0-9._-], ≤ 64).
        name: String,
    },
    /// List groups.
    List,
    /// Write a group's attestation key (TPMT_PUBLIC). Tenants do not take it on trust: they
    /// enroll the host (`mgr enrollment`, then `xl-vtpm enroll`).
    Ak {
        /// Name or UUID.
        group: String,
        /// Output file (raw TPMT_PUBLIC bytes).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a group's EK CA certificate (for Keylime's tpm_cert_store and other verifiers)
    /// and, with --certify, the evidence that its key lives in the physical TPM (the group AK's
    /// TPM2_Certify of it).
    CaCert {
        /// Name or UUID.
        group: String,
        /// Output file (PEM; DER with --der).
        #[arg(long)]
        out: PathBuf,
        /// Write DER instead of PEM.
        #[arg(long)]
        der: bool,
        /// Also write the certification evidence (JSON) here.
        #[arg(long)]
        certify: Option<PathBuf>,
    },
    /// Delete an empty group.
    Del {
        /// Name or UUID.
        group: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per run; its size does not matter
enum VtpmCmd {
    /// Create a vTPM (identity, EK, sealed state) and start it.
    Create {
        /// Group name or UUID (default group if omitted).
        #[arg(long)]
        group: Option<String>,
        /// Use this UUID (e.g. the one in a guest's vtpm= line).
        #[arg(long)]
        uuid: Option<String>,
        /// Listener (repeatable; recorded for `vtpm start`). Default: Unix sockets
        /// <run-dir>/vtpms/<uuid>/tpm.sock and tpm.sock.ctrl (TCTI swtpm:path=…, QEMU's
        /// chardev path=…ctrl). tcp:127.0.0.1:PORT (data PORT, control PORT+1; 0 picks) for
        /// clients that speak TCP only; data:PATH, ctrl:PATH; xen:DIR.
        #[arg(long)]
        listen: Vec<String>,
        /// The user that uses this vTPM besides root (e.g. the QEMU user): name or uid.
        /// Its sockets are made theirs; connections from any other uid are refused.
        /// Recorded for `vtpm start`.
        #[arg(long)]
        consumer: Option<String>,
        /// A name for stable endpoints: <run-dir>/NAME and NAME.ctrl link to its data and control
        /// sockets (TCTI swtpm:path=<run-dir>/NAME); commands take it instead of the UUID.
        #[arg(long)]
        name: Option<String>,
        /// A TPM 1.2 instead of TPM 2.0.
        #[arg(long)]
        tpm12: bool,
        /// Endorsement key: rsa (RSA-2048 at 0x81010001, default) or ecc (P-256 at 0x81010002, faster).
        #[arg(long, default_value = "rsa", value_parser = ["rsa", "ecc"])]
        ek: String,
        /// Manufacture a new vTPM even if the pool has one of this group and EK (`vtpm pool
        /// fill`). Without it a create without --uuid claims a pooled vTPM when there is one
        /// (its UUID, group and EK certificate were made ahead of demand).
        #[arg(long)]
        no_pool: bool,
        #[command(flatten)]
        dom: DomainArgs,
    },
    /// vTPMs made ahead of demand, which `vtpm create` claims (docs/pool.md).
    #[command(subcommand)]
    Pool(PoolCmd),
    /// List vTPMs.
    List,
    /// Show one vTPM.
    Show {
        /// vTPM UUID.
        uuid: String,
    },
    /// Start a stopped vTPM (a process, or its own domain if created with --domain).
    Start {
        /// vTPM UUID.
        uuid: String,
        /// Listener(s) for this run, as for create (default: those recorded at create).
        #[arg(long)]
        listen: Vec<String>,
        /// Seconds to wait for a vTPM domain to be ready.
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
    /// Stop a running vTPM (its state stays).
    Stop {
        /// vTPM UUID.
        uuid: String,
        /// Keep the running TPM: its volatile state (PCRs, loaded objects, sessions) is saved
        /// into its state file, and the next start (here, or on the host its identity is
        /// transferred to) resumes it once. A dom0-process vTPM only.
        #[arg(long)]
        suspend: bool,
    },
    /// Stop a vTPM and delete its identity and state. Irreversible.
    Destroy {
        /// vTPM UUID.
        uuid: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Accept the older state the manager refused at the vTPM's last start (a restored backup,
    /// or a disk that lost writes): every change made after it is lost. Then start the vTPM.
    AcceptState {
        /// vTPM UUID.
        uuid: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Move a vTPM to another manager step by step, each step on its own host
    /// (docs/migration.md).
    #[command(subcommand)]
    Transfer(xl_tools::transfer::TransferCmd),
    /// Move a stopped vTPM to another manager whose admin socket and state directory are
    /// reachable from here: every transfer step, then the source copy is retired.
    Migrate(xl_tools::transfer::MigrateArgs),
}

#[derive(Subcommand, Debug)]
enum PoolCmd {
    /// Make complete vTPMs ahead of demand (libtpms manufactured, EK and EK certificate made,
    /// state sealed, identity durable); each becomes claimable only once complete. First
    /// destroys what a killed fill or claim left.
    Fill {
        /// Group name or UUID (default group if omitted).
        #[arg(long)]
        group: Option<String>,
        /// Make this many more.
        #[arg(long, required_unless_present_any = ["min", "background"], conflicts_with = "min")]
        count: Option<usize>,
        /// Make as many as it takes to have this many ready (for a timer that keeps the pool topped up).
        #[arg(long)]
        min: Option<usize>,
        /// Endorsement key of the vTPMs made: rsa (default) or ecc.
        #[arg(long, default_value = "rsa", value_parser = ["rsa", "ecc"])]
        ek: String,
        /// The refill `vtpm create` and `pool size` start: nice 19, one at a time, up to the
        /// pool size set with `vtpm pool size`.
        #[arg(long, hide = true, conflicts_with_all = ["count", "min"])]
        background: bool,
    },
    /// Keep N ready vTPMs of a group and EK kind: after each `vtpm create` of them a background
    /// fill at the lowest CPU priority tops the pool up to N. 0 (the default) turns the
    /// automatic refill off; ready vTPMs stay until claimed or drained.
    Size {
        /// Ready vTPMs to keep (0 to 1024).
        size: usize,
        /// Group name or UUID (default group if omitted).
        #[arg(long)]
        group: Option<String>,
        /// Endorsement key of the vTPMs: rsa (default) or ecc.
        #[arg(long, default_value = "rsa", value_parser = ["rsa", "ecc"])]
        ek: String,
    },
    /// Ready vTPMs per group and EK, fills and claims under way, and what killed ones left.
    Status,
    /// Destroy every ready vTPM (of --group, if given) and what killed fills or claims left.
    Drain {
        /// Only this group's.
        #[arg(long)]
        group: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

const DEFAULT_VTPMDOM_KERNEL: &str = "/usr/lib/xvtpm/vtpmdom/vmlinuz";
const DEFAULT_VTPMDOM_RAMDISK: &str = "/usr/lib/xvtpm/vtpmdom/initrd";

fn losetup_path() -> PathBuf {
    std::env::var_os("XVTPM_LOSETUP").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("losetup"))
}

/// `vtpm create --domain`: the vTPM as the only program of its own Xen domain.
#[derive(clap::Args, Debug)]
struct DomainArgs {
    /// Run the vTPM in its own Xen domain with this name (guests then say
    /// `vtpm = [ "backend=NAME,uuid=UUID" ]`) instead of as a process here.
    #[arg(long, value_name = "NAME")]
    domain: Option<String>,
    /// The vTPM domain's PV kernel.
    #[arg(long, env = "XVTPM_VTPMDOM_KERNEL", default_value = DEFAULT_VTPMDOM_KERNEL)]
    kernel: PathBuf,
    /// The vTPM domain's initramfs (/init = vtpm-domain).
    #[arg(long, env = "XVTPM_VTPMDOM_RAMDISK", default_value = DEFAULT_VTPMDOM_RAMDISK)]
    ramdisk: PathBuf,
    /// The vTPM domain's memory in MiB [default: XVTPM_VTPMDOM_MEMORY, else the number in the
    /// file memory-mib beside the ramdisk (scripts/build-vtpmdom.sh writes it: 32 with the
    /// project's own kernel), else 128]
    #[arg(long, requires = "domain")]
    memory: Option<u32>,
    /// A block device for the vTPM's state (default: a 4 MiB image file on a loop device).
    #[arg(long, requires = "domain")]
    disk: Option<PathBuf>,
    /// Seconds to wait for the vTPM domain to be ready.
    #[arg(long, default_value_t = 120, requires = "domain")]
    wait: u64,
}

fn main() {
    xvtpm_clidoc::intercept("xl-vtpm", <Args as clap::CommandFactory>::command);
    let args = Args::parse();
    let json = args.json;
    match run(args) {
        Ok(()) => {}
        Err(e) => {
            if json {
                let mut v = serde_json::json!({"error": e.text(), "exit_code": e.code});
                if e.code == guest::NOT_VERIFIED {
                    v["verified"] = false.into();
                }
                println!("{v}");
            } else {
                eprintln!("xl-vtpm: error: {}", e.text());
            }
            std::process::exit(e.code);
        }
    }
}

fn confirm(yes: bool, what: &str) -> Result<(), CliError> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(CliError::new(exit::REFUSED, format!("{what}: pass --yes to confirm (no terminal to ask)")));
    }
    eprint!("{what}. Continue? [y/N] ");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).ok();
    if matches!(line.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(CliError::new(exit::REFUSED, format!("{what}: not confirmed")))
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}

/// `schema` of the manager status object (docs/json.md).
const STATUS_SCHEMA: &str = "xvtpm.mgr-status/1";
/// `schema` of a group object (docs/json.md).
const GROUP_SCHEMA: &str = "xvtpm.group/1";
/// `schema` of a manager vTPM identity object (docs/json.md).
const IDENTITY_SCHEMA: &str = "xvtpm.vtpm-identity/1";

/// `v`'s JSON object with `"schema": schema` added.
fn versioned<T: serde::Serialize>(schema: &str, v: &T) -> serde_json::Value {
    let mut j = serde_json::to_value(v).expect("serialisable");
    if let Some(o) = j.as_object_mut() {
        o.insert("schema".into(), schema.into());
    }
    j
}

/// The status object: TPM handles as hex strings, as in the text output.
fn status_json(s: &StatusInfo) -> serde_json::Value {
    let mut j = versioned(STATUS_SCHEMA, s);
    j["xen_domain"] = s.xen_domain.into();
    if let Some(c) = &s.store_counter {
        j["store_counter"]["nv_index"] = format!("{:#010x}", c.nv_index).into();
    }
    j
}

fn print_status(s: &StatusInfo, json: bool) {
    if json {
        return print_json(&status_json(s));
    }
    println!("provisioned:  {}", s.provisioned);
    println!("physical TPM: {}{}", s.tcti, if s.software_tpm { " (SOFTWARE TPM — insecure, tests only)" } else { "" });
    println!("sealed PCRs:  {:?} (sha256)", s.sealed_pcrs);
    println!("groups:       {}", s.groups);
    println!("vTPMs:        {}", s.vtpms);
    if let Some(d) = s.xen_domain {
        println!("runs in:      Xen domain {d} (the manager domain; vTPM domains attach to backend={d})");
    }
    if let Some(c) = &s.store_counter {
        let tpm = match c.tpm_value {
            Some(v) if v == c.store_value => "matches the TPM".to_string(),
            Some(v) => format!("the TPM reads {v}: MISMATCH, see the manager's log"),
            None => "the TPM's value could not be read: see the manager's log".to_string(),
        };
        println!("store counter: NV {:#010x} = {} ({tpm})", c.nv_index, c.store_value);
    }
    println!("version:      {}", s.version);
}

fn print_groups(gs: &[GroupInfo], json: bool) {
    if json {
        return print_json(&gs.iter().map(|g| versioned(GROUP_SCHEMA, g)).collect::<Vec<_>>());
    }
    println!("{:<36}  {:<16}  {:<9}  {:>5}", "UUID", "NAME", "AK", "VTPMS");
    for g in gs {
        println!("{:<36}  {:<16}  {:<9}  {:>5}", g.uuid, g.name, g.ak_alg, g.vtpms);
    }
}

/// Fills in the domain of domain-mode vTPMs (running = its domain exists).
fn with_domains(domains: &xl_tools::vtpmdom::Domains, mut rows: Vec<Row>) -> Vec<Row> {
    for r in &mut rows {
        if let Ok(Some(spec)) = domains.spec(&r.info.uuid) {
            r.domain = domains.runtime(&r.info.uuid);
            r.state = if r.domain.is_some() { "running" } else { "stopped" }.into();
            r.domain_name = Some(spec.name);
        }
    }
    rows
}

fn print_rows(rows: &[Row], json: bool) {
    if json {
        return print_json(&rows);
    }
    println!("{:<36}  {:<36}  {:<8}  {:>7}  TCTI / DOMAIN", "UUID", "GROUP", "STATE", "PID");
    for r in rows {
        if let Some(name) = &r.domain_name {
            let id = r.domain.as_ref().map(|d| format!("dom{}", d.domid)).unwrap_or_else(|| "-".into());
            println!("{:<36}  {:<36}  {:<8}  {:>7}  domain {name}", r.info.uuid, r.info.group, r.state, id);
            continue;
        }
        let pid = r.runtime.as_ref().map(|x| x.pid.to_string()).unwrap_or_else(|| "-".into());
        println!("{:<36}  {:<36}  {:<8}  {:>7}  {}", r.info.uuid, r.info.group, r.state, pid, r.tcti.as_deref().unwrap_or("-"));
    }
}

fn vtpm_domain_path(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    if let Some(sibling) = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("vtpm-domain")))
        && sibling.exists() {
            return sibling;
        }
    PathBuf::from("vtpm-domain")
}

/// How to reach a local vTPM: the TCTI for tpm2-tools and, on Unix sockets, QEMU's options.
fn print_endpoints(row: &Row) {
    if let Some(t) = &row.tcti {
        println!("TPM2TOOLS_TCTI={t}");
    }
    if let Some(sock) = row.runtime.as_ref().and_then(|r| r.socket.as_ref()) {
        let who = match row.runtime.as_ref().and_then(|r| r.consumer_uid) {
            Some(uid) => format!("root and uid {uid}"),
            None => "root only (see --consumer)".into(),
        };
        println!("usable by: {who}");
        println!(
            "QEMU: -chardev socket,id=chrtpm,path={}.ctrl -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-tis,tpmdev=tpm0",
            sock.display()
        );
    }
}

fn run(args: Args) -> Result<(), CliError> {
    let json = args.json;
    let local = Local {
        state_dir: args.state_dir.clone(),
        run_dir: args.run_dir.clone(),
        vtpm_domain: vtpm_domain_path(args.vtpm_domain.clone()),
        sandbox: !args.no_sandbox,
    };
    let domains = xl_tools::vtpmdom::Domains {
        local: &local,
        xl: xl_path(),
        losetup: losetup_path(),
    };
    let cmd = match args.cmd {
        Cmd::Guest(g) => return run_guest(g, json),
        Cmd::Verify(v) => return xl_tools::attest::run_verify(&v, json),
        Cmd::Enroll(e) => return xl_tools::attest::run_enroll(&e, &args.run_dir, json),
        Cmd::Attest(a) => return xl_tools::attest_client::run(&a, json),
        Cmd::Eventlog(c) => return xl_tools::eventlog::run(&c, json),
        Cmd::VerifyEkcert { cert, ca, ek, certify, ak } => return run_verify_ekcert(cert, ca, ek, certify, ak, json),
        Cmd::Console { name } => return run_console(name),
        other => other,
    };
    let xen = xen_for(&local, args.registry.as_deref(), args.host.clone())?;
    let cmd = match cmd {
        Cmd::Reboot { name } => return xen.reboot(&name),
        Cmd::MigrateReceive => return xl_tools::crosshost::receive(&xen),
        Cmd::LibvirtHook { args: hook_args } => return run_libvirt_hook(&xen, &hook_args),
        Cmd::Tenant(t) => return xl_tools::tenant::run(t, &xen, json),
        other => other,
    };
    // Checks that need no manager come first: a command that is going to fail refuses
    // before it creates anything.
    if let Cmd::Vtpm(v) = &cmd {
        check_vtpm_args(v)?;
    }
    let mut admin = Admin::connect(&args.run_dir)?;
    match cmd {
        Cmd::Guest(_) | Cmd::Verify(_) | Cmd::Enroll(_) | Cmd::Attest(_) | Cmd::Eventlog(_) | Cmd::VerifyEkcert { .. } | Cmd::Console { .. } | Cmd::Reboot { .. } | Cmd::Tenant(_) | Cmd::LibvirtHook { .. } => {
            unreachable!("handled above")
        }
        Cmd::Create { config, group, dry_run } => run_create(&xen, admin, config, group, dry_run, json),
        Cmd::Destroy { name } => xen.stop_pair(&mut admin, &name, xenlife::Stop::Destroy),
        Cmd::Shutdown { name } => xen.stop_pair(&mut admin, &name, xenlife::Stop::Shutdown),
        Cmd::List => run_list(&xen, json),
        Cmd::MigrateReceive => unreachable!("handled above"),
        Cmd::LibvirtHandoff { name, destination, domid, prepare: _ } => {
            let path = xl_tools::libvirt_migrate::MigrateConfig::path();
            let cfg = xl_tools::libvirt_migrate::MigrateConfig::load()?.ok_or_else(|| {
                CliError::new(exit::REFUSED, format!("this host lets no vTPM leave with a libvirt migration: {} does not exist (docs/libvirt.md); nothing moved", path.display()))
            })?;
            let checks = xl_tools::crosshost::Checks::of_libvirt(&cfg)?;
            match xen.handoff_to(&mut admin, &name, &destination, domid, &cfg.ssh, &cfg.receiver, &checks)? {
                xl_tools::crosshost::Handoff::Prepared { to_host, offer_id, prepare_ms } => {
                    print_json(&serde_json::json!({"guest_name": name, "to_host": to_host, "offer_id": offer_id, "prepare_ms": prepare_ms}));
                }
                xl_tools::crosshost::Handoff::Moved(m, x) => {
                    let mut v = serde_json::to_value(&m).map_err(|e| CliError::caused(1, "", e))?;
                    if let (Some(o), Ok(serde_json::Value::Object(x))) = (v.as_object_mut(), serde_json::to_value(&x)) {
                        o.extend(x);
                    }
                    print_json(&v);
                }
            }
            Ok(())
        }
        Cmd::Migrate { name, destination: host, ssh, finish, non_live, receiver, ek_ca, ek_intermediate, host_pcrs_policy, group } => {
            if let Some(h) = host.as_deref().filter(|h| !xl_tools::guestmig::is_local(h)) {
                let policy = host_pcrs_policy.ok_or_else(|| CliError::new(exit::USAGE, format!("xl-vtpm migrate {name} {h}: to another host, give --host-pcrs-policy FILE (the host PCRs it must have)")))?;
                if ek_ca.is_empty() {
                    return Err(CliError::new(exit::USAGE, format!("xl-vtpm migrate {name} {h}: to another host, give --ek-ca PEM (the TPM vendor roots its EK certificate must chain to)")));
                }
                let checks = xl_tools::crosshost::Checks {
                    roots: xl_tools::transfer::read_certs(&ek_ca, "--ek-ca")?,
                    intermediates: xl_tools::transfer::read_certs(&ek_intermediate, "--ek-intermediate")?,
                    policy: xl_tools::transfer::read_policy(&policy)?,
                    group,
                };
                let (m, x) = if finish {
                    xen.finish_move_to(&mut admin, &name, h, ssh.as_deref(), &receiver, &checks)?
                } else {
                    xen.migrate_guest_to(&mut admin, &name, h, ssh.as_deref(), &receiver, non_live, &checks)?
                };
                if json {
                    let mut v = serde_json::to_value(&m).map_err(|e| CliError::caused(1, "", e))?;
                    if let (Some(o), Ok(serde_json::Value::Object(x))) = (v.as_object_mut(), serde_json::to_value(&x)) {
                        o.extend(x);
                    }
                    print_json(&v);
                } else {
                    println!(
                        "{}: moved to {} (domain {} there) with vTPM {}{}; identity moved in {} ms (prepared in {} ms while it ran), {} ms in all",
                        m.guest_name,
                        x.to_host,
                        m.to_domid,
                        m.vtpm_uuid,
                        if x.tpm_kept { ", TPM kept (PCRs as they were)" } else { ", TPM restarted (PCRs reset)" },
                        x.transfer_ms,
                        x.prepare_ms,
                        m.total_ms
                    );
                }
                return Ok(());
            }
            if (non_live || finish) && ssh.is_some() {
                return Err(CliError::new(exit::USAGE, "--ssh: a --non-live move or a --finish on this host runs no transport"));
            }
            if finish && host.is_some() {
                return Err(CliError::new(exit::USAGE, "--finish on this host takes no HOST (localhost): `xl-vtpm migrate GUEST --finish`"));
            }
            let m = xen.migrate_guest(&mut admin, &name, host.as_deref(), ssh.as_deref(), finish, non_live)?;
            if json {
                print_json(&m);
            } else {
                println!(
                    "{}: domain {} -> {}; vTPM {} ({}{}) serves it{}; {}, {} ms in all",
                    m.guest_name,
                    m.from_domid,
                    m.to_domid,
                    m.vtpm_uuid,
                    m.vtpm_domain.as_ref().map_or(format!("process {}", m.vtpm_pid), |d| format!("its domain {d}")),
                    if m.vtpm_restarted { ", started again: its PCRs were reset" } else { ", kept running: state kept" },
                    if m.hvm {
                        m.source_device_model_ended_ms.map_or(", through the new device model (the old one had not ended yet)".to_string(), |d| {
                            format!(", through the new device model (the old one ended {d} ms after the move)")
                        })
                    } else {
                        m.reconnect_ms.map_or(", its frontend not reconnected yet".to_string(), |r| format!(", reconnected {r} ms after the unpause"))
                    },
                    if m.non_live { format!("xl save {} ms, xl restore {} ms", m.xl_save_ms, m.xl_restore_ms) } else { format!("xl migrate {} ms", m.xl_migrate_ms) },
                    m.total_ms
                );
            }
            Ok(())
        }
        Cmd::Watch { poll_secs } => xen.watch(&args.run_dir, Duration::from_secs(poll_secs.max(1))),
        Cmd::Registry(r) => run_registry(r, &xen, admin, json),
        Cmd::Libvirt(l) => run_libvirt(l, &local, json),
        Cmd::Mgr(m) => run_mgr(m, admin, json),
        Cmd::Vtpm(v) => run_vtpm(v, &local, &xen, domains, admin, json),
    }
}

/// The Xen side: guests and their vTPMs, the registry.
fn xen_for(local: &Local, registry: Option<&str>, host: Option<String>) -> Result<xenlife::Xen, CliError> {
    Ok(xenlife::Xen {
        local: local.clone(),
        xl: xl_path(),
        losetup: losetup_path(),
        vtpmdom: xenlife::VtpmDomDefaults {
            kernel: std::env::var_os("XVTPM_VTPMDOM_KERNEL").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_VTPMDOM_KERNEL)),
            ramdisk: std::env::var_os("XVTPM_VTPMDOM_RAMDISK").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_VTPMDOM_RAMDISK)),
            memory_mib: std::env::var("XVTPM_VTPMDOM_MEMORY").ok(),
        },
        registry: registry.map(xl_tools::registry::Location::parse).transpose().map_err(|e| CliError::caused(exit::USAGE, "", e))?,
        host: host.unwrap_or_else(xl_tools::registry::this_host),
    })
}

/// `xl-vtpm mgr …`.
fn run_mgr(cmd: MgrCmd, mut admin: Admin, json: bool) -> Result<(), CliError> {
    match cmd {
        MgrCmd::Vtpm(v) => return run_mgr_vtpm(v, admin, json),
        MgrCmd::Group(g) => return run_group(g, admin, json),
        MgrCmd::Provision { pcrs, yes } => {
            let pcrs = guest::parse_pcr_list(&pcrs, "--pcrs")?;
            confirm(yes, &format!("Provision the manager, sealing its master secret to the current values of PCRs {pcrs:?}"))?;
            if let AdminReply::Status(s) = admin.call(&AdminRequest::Provision { pcrs })? {
                print_status(&s, json);
            }
        }
        MgrCmd::Enrollment { out, ek_intermediate } => {
            let m = xl_tools::attest::write_material(&mut admin, &out, &ek_intermediate)?;
            if json {
                print_json(&serde_json::json!({"host_id": m.host_id, "groups": m.groups.len(), "out": out}));
            } else {
                println!("wrote enrollment material of host {} ({} group(s)) to {}", m.host_id, m.groups.len(), out.display());
            }
        }
        MgrCmd::Status => {
            if let AdminReply::Status(s) = admin.call(&AdminRequest::Status)? {
                print_status(&s, json);
            }
        }
    }
    Ok(())
}

/// `xl-vtpm mgr vtpm …`.
fn run_mgr_vtpm(cmd: MgrVtpmCmd, mut admin: Admin, json: bool) -> Result<(), CliError> {
    match cmd {
        MgrVtpmCmd::List => {
            {
                let vtpms = admin.list_vtpms()?;
                if json {
                    print_json(&vtpms.iter().map(|v| versioned(IDENTITY_SCHEMA, v)).collect::<Vec<_>>());
                } else {
                    println!("{:<36}  {:<36}  {:>7}", "UUID", "GROUP", "PID");
                    for v in vtpms {
                        println!("{:<36}  {:<36}  {:>7}", v.uuid, v.group, v.attached_pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()));
                    }
                }
            }
        }
        MgrVtpmCmd::AttachDomain { uuid, domid } => {
            let uuid = local::parse_uuid(&uuid, "UUID")?;
            admin.call(&AdminRequest::VtpmAttachDomain { uuid, domid })?;
        }
        MgrVtpmCmd::Del { uuid, yes } => {
            let uuid = local::parse_uuid(&uuid, "UUID")?;
            confirm(yes, &format!("Delete vTPM identity {uuid} in the manager: its state can never be opened again"))?;
            admin.call(&AdminRequest::VtpmDel { uuid })?;
        }
    }
    Ok(())
}

/// `xl-vtpm mgr group …`.
fn run_group(cmd: GroupCmd, mut admin: Admin, json: bool) -> Result<(), CliError> {
    match cmd {
        GroupCmd::Add { name } => {
            if let AdminReply::Group(g) = admin.call(&AdminRequest::GroupAdd { name })? {
                if json {
                    print_json(&versioned(GROUP_SCHEMA, &g));
                } else {
                    print_groups(&[g], false);
                }
            }
        }
        GroupCmd::List => {
            if let AdminReply::Groups { groups } = admin.call(&AdminRequest::GroupList)? {
                print_groups(&groups, json);
            }
        }
        GroupCmd::Ak { group, out } => {
            let AdminReply::Groups { groups } = admin.call(&AdminRequest::GroupList)? else {
                return Err(CliError::new(exit::FAILURE, "unexpected reply"));
            };
            let g = groups
                .iter()
                .find(|g| g.name == group || g.uuid.to_string() == group)
                .ok_or_else(|| CliError::new(exit::NOT_FOUND, format!("no group {group:?}; see `xl-vtpm mgr group list`")))?;
            let bytes = guest::parse_hex(&g.ak_public, "ak_public")?;
            std::fs::write(&out, &bytes).map_err(|e| CliError::caused(exit::FAILURE, format!("--out {}", out.display()), e))?;
            if json {
                print_json(&serde_json::json!({"group": g.uuid, "ak_public": g.ak_public, "out": out}));
            }
        }
        GroupCmd::CaCert { group, out, der, certify } => {
            let AdminReply::GroupCa(info) = admin.call(&AdminRequest::GroupCa { group })? else {
                return Err(CliError::new(exit::FAILURE, "unexpected reply"));
            };
            xl_tools::ekcert::write_ca(&info, &out, der, certify.as_deref())?;
            if json {
                print_json(&serde_json::json!({"group": info.group, "name": info.name, "out": out, "certify": certify}));
            } else {
                println!("wrote the EK CA certificate of group {} ({}) to {}", info.name, info.group, out.display());
            }
        }
        GroupCmd::Del { group, yes } => {
            // Ask to confirm only what can be done.
            if let AdminReply::Groups { groups } = admin.call(&AdminRequest::GroupList)?
                && !groups.iter().any(|g| g.name == group || g.uuid.to_string() == group)
            {
                return Err(CliError::new(exit::NOT_FOUND, format!("no such group {group:?}; see `xl-vtpm mgr group list`")));
            }
            confirm(yes, &format!("Delete group {group:?} and its attestation key"))?;
            admin.call(&AdminRequest::GroupDel { group })?;
        }
    }
    Ok(())
}

/// Checks of `xl-vtpm vtpm …` that need no manager (made before connecting to it).
fn check_vtpm_args(cmd: &VtpmCmd) -> Result<(), CliError> {
    if let VtpmCmd::Create { uuid: Some(u), .. } = cmd
        && local::parse_uuid(u, "--uuid")?.is_nil()
    {
        return Err(CliError::new(exit::USAGE, "--uuid 00000000-0000-0000-0000-000000000000: the nil UUID names no vTPM; leave --uuid out to get a new one"));
    }
    match cmd {
        VtpmCmd::Create { dom: DomainArgs { domain: Some(_), memory: Some(m), .. }, .. } if !xl_tools::vtpmdom::MEMORY_RANGE.contains(m) => {
            let r = xl_tools::vtpmdom::MEMORY_RANGE;
            return Err(CliError::new(
                exit::USAGE,
                format!("--memory {m}: a vTPM domain's memory is {}..={} MiB (32 fits the project's own kernel); give a size in that range", r.start(), r.end()),
            ));
        }
        VtpmCmd::Create { tpm12: true, ek, .. } if ek == "ecc" => {
            return Err(CliError::new(exit::USAGE, "--tpm12 with --ek ecc: a TPM 1.2 has an RSA-2048 endorsement key only; drop --ek ecc (or --tpm12)"));
        }
        VtpmCmd::Create { listen, dom: DomainArgs { domain: None, .. }, .. } | VtpmCmd::Start { listen, .. } => {
            local::check_listen(listen)?;
        }
        _ => {}
    }
    Ok(())
}

/// `xl-vtpm vtpm …`: local vTPMs, as processes or in their own domains.
fn run_vtpm(cmd: VtpmCmd, local: &Local, xen: &xenlife::Xen, domains: xl_tools::vtpmdom::Domains, mut admin: Admin, json: bool) -> Result<(), CliError> {
    match cmd {
        VtpmCmd::Create { group, uuid, listen: _, consumer: _, name: _, tpm12, ek, no_pool: _, dom: DomainArgs { domain: Some(name), kernel, ramdisk, memory, disk, wait } } => {
            let uuid = uuid.map(|u| local::parse_uuid(&u, "--uuid")).transpose()?;
            let mut create_args = vec!["--ek".to_string(), ek];
            if tpm12 {
                create_args.push("--tpm12".into());
            }
            let memory_mib = match memory {
                Some(m) => m,
                None => xl_tools::vtpmdom::default_memory_mib(xen.vtpmdom.memory_mib.as_deref(), &ramdisk)?,
            };
            let opts = xl_tools::vtpmdom::DomainOpts { name, kernel, ramdisk, memory_mib, disk, ready_wait: Duration::from_secs(wait) };
            let rt = domains.create(&mut admin, group, uuid, &opts, create_args)?;
            if json {
                print_json(&with_domains(&domains, vec![local.show(&mut admin, &rt.uuid)?]).remove(0));
            } else {
                println!("created vTPM {} in domain {} (domid {})", rt.uuid, rt.name, rt.domid);
                println!("guest config: vtpm = [ \"backend={},uuid={}\" ]", rt.name, rt.uuid);
            }
        }
        VtpmCmd::Create { group, uuid, listen, consumer, name, tpm12, ek, no_pool, dom: _ } => {
            let uuid = uuid.map(|u| local::parse_uuid(&u, "--uuid")).transpose()?;
            let consumer_uid = consumer.as_deref().map(local::parse_user).transpose()?;
            let opts = local::CreateOpts { tpm12, ek_ecc: ek == "ecc", consumer_uid, name, pool: !no_pool };
            let (rt, from) = local.create_or_claim(&mut admin, group, uuid, &listen, &opts)?;
            let mut row = local.show(&mut admin, &rt.uuid)?;
            row.created_from = Some(from);
            if json {
                print_json(&row);
            } else {
                match from {
                    local::pool::CreatePath::Pool => println!("created vTPM {} (pid {}) from the pool (made ahead of demand)", rt.uuid, rt.pid),
                    local::pool::CreatePath::New => println!("created vTPM {} (pid {})", rt.uuid, rt.pid),
                }
                print_endpoints(&row);
            }
        }
        VtpmCmd::Pool(p) => run_pool(p, local, admin, json)?,
        VtpmCmd::List => print_rows(&with_domains(&domains, local.list(&mut admin)?), json),
        VtpmCmd::Show { uuid } => {
            let uuid = local.resolve(&uuid)?;
            let row = with_domains(&domains, vec![local.show(&mut admin, &uuid)?]).remove(0);
            if json {
                print_json(&row);
            } else {
                print_rows(&[row], false);
            }
        }
        VtpmCmd::Start { uuid, listen: _, wait } if is_domain(&domains, &uuid) => {
            let uuid = local::parse_uuid(&uuid, "UUID")?;
            local.show(&mut admin, &uuid)?;
            let rt = domains.start(&mut admin, &uuid, Duration::from_secs(wait))?;
            if json {
                print_json(&with_domains(&domains, vec![local.show(&mut admin, &rt.uuid)?]).remove(0));
            } else {
                println!("started vTPM {} in domain {} (domid {})", rt.uuid, rt.name, rt.domid);
            }
        }
        VtpmCmd::Start { uuid, listen, wait: _ } => {
            let uuid = local.resolve(&uuid)?;
            let rt = local.start(&mut admin, &uuid, &listen)?;
            let row = local.show(&mut admin, &rt.uuid)?;
            if json {
                print_json(&row);
            } else {
                println!("started vTPM {} (pid {})", rt.uuid, rt.pid);
                print_endpoints(&row);
            }
        }
        VtpmCmd::Stop { uuid, suspend } => {
            let uuid = local.resolve(&uuid)?;
            let was = if suspend {
                if domains.spec(&uuid)?.is_some() {
                    return Err(CliError::new(exit::USAGE, format!("vTPM {uuid} runs in its own domain: --suspend is for a dom0-process vTPM")));
                }
                local.suspend(&mut admin, &uuid, Duration::from_secs(10))?;
                true
            } else if domains.spec(&uuid)?.is_some() {
                local.show(&mut admin, &uuid)?;
                domains.stop(&mut admin, &uuid, xl_tools::vtpmdom::SHUTDOWN_GRACE)?
            } else {
                local.stop(&mut admin, &uuid, Duration::from_secs(5))?
            };
            if json {
                print_json(&serde_json::json!({"uuid": uuid, "was_running": was, "suspended": suspend}));
            } else if suspend {
                println!("suspended vTPM {uuid}: its next start resumes the TPM as it was");
            } else if was {
                println!("stopped vTPM {uuid}");
            } else {
                println!("vTPM {uuid} was not running");
            }
        }
        VtpmCmd::Transfer(t) => {
            let v = xl_tools::transfer::run(t, &mut admin, local, xen)?;
            if json {
                print_json(&v);
            } else {
                println!("{v}");
            }
        }
        VtpmCmd::Migrate(m) => {
            let done = xl_tools::transfer::run_migrate(m, &mut admin, local, xen)?;
            if json {
                print_json(&done);
            } else {
                let reg = done.registry_host.as_ref().map(|h| format!("; the registry names host {h}")).unwrap_or_default();
                println!("vTPM {} moved to host {} (transfer generation {}){reg}; start it there", done.uuid, done.dest_host, done.generation);
            }
        }
        VtpmCmd::AcceptState { uuid, yes } => {
            let uuid = local::parse_uuid(&uuid, "UUID")?;
            confirm(yes, &format!("Accept the older state of vTPM {uuid} that the manager refused: every change made after it is lost"))?;
            admin.call(&AdminRequest::VtpmAcceptState { uuid })?;
            if json {
                print_json(&serde_json::json!({"uuid": uuid, "accepted": true}));
            } else {
                println!("accepted the refused state of vTPM {uuid}; start it with `xl-vtpm vtpm start {uuid}`");
            }
        }
        VtpmCmd::Destroy { uuid, yes } => {
            let uuid = local.resolve(&uuid)?;
            local.show(&mut admin, &uuid)?;
            confirm(yes, &format!("Destroy vTPM {uuid}: its keys, NV and EK are gone for good"))?;
            if domains.spec(&uuid)?.is_some() {
                domains.stop(&mut admin, &uuid, xl_tools::vtpmdom::SHUTDOWN_GRACE)?;
            }
            local.destroy(&mut admin, &uuid)?;
            if json {
                print_json(&serde_json::json!({"uuid": uuid, "destroyed": true}));
            } else {
                println!("destroyed vTPM {uuid}");
            }
        }
    }
    Ok(())
}

/// `xl-vtpm create`: a guest and its vTPM together (or, with --dry-run, the plan).
fn run_create(xen: &xenlife::Xen, mut admin: Admin, config: PathBuf, group: Option<String>, dry_run: bool, json: bool) -> Result<(), CliError> {
    match xen.create(&mut admin, &config, group, dry_run)? {
        xenlife::Created::Done(row) if json => print_json(&row),
        xenlife::Created::Done(row) => {
            println!("guest {} (domid {}) created with vTPM {}", row.guest_name, row.guest_domid.unwrap_or(0), row.vtpm_uuid)
        }
        xenlife::Created::Plan(p) if json => print_json(&serde_json::json!({"dry_run": true, "plan": p})),
        xenlife::Created::Plan(p) => {
            let placement = if p.vtpm_backend == "0" { "as a process in dom0".to_string() } else { format!("in its own domain {}", p.vtpm_backend) };
            let vtpm = if p.vtpm_exists {
                format!("start the existing vTPM {} {placement}", p.vtpm_uuid)
            } else {
                format!("create vTPM {} in group {} and start it {placement}", p.vtpm_uuid, p.group.as_deref().unwrap_or("default"))
            };
            match p.emulated_tpm {
                Some(model) => println!(
                    "dry run, nothing created. xl-vtpm create would: {vtpm}; then create guest {} (uuid {}) with its device model emulating a {model} TPM on it (device_model_args_hvm)",
                    p.guest_name, p.guest_uuid
                ),
                None => println!("dry run, nothing created. xl-vtpm create would: {vtpm}; then create guest {} (uuid {}) with vtpm = [ \"backend={},uuid={}\" ]", p.guest_name, p.guest_uuid, p.vtpm_backend, p.vtpm_uuid),
            }
        }
    }
    Ok(())
}

/// `xl-vtpm list`: guests with their vTPMs.
fn run_list(xen: &xenlife::Xen, json: bool) -> Result<(), CliError> {
        let rows = xen.list()?;
        if json {
            print_json(&rows);
        } else {
            println!("{:<20}  {:>6}  {:<36}  {:<10}  {:>7}", "GUEST", "DOMID", "VTPM", "STATE", "VTPM-PID");
            for r in &rows {
                let opt = |v: &serde_json::Value| v.as_u64().map(|x| x.to_string()).unwrap_or_else(|| "-".into());
                println!(
                    "{:<20}  {:>6}  {:<36}  {:<10}  {:>7}",
                    r["guest_name"].as_str().unwrap_or("?"),
                    opt(&r["guest_running_domid"]),
                    r["vtpm_uuid"].as_str().unwrap_or("?"),
                    r["state"].as_str().unwrap_or("?"),
                    opt(&r["vtpm_pid"])
                );
            }
        }
    Ok(())
}

/// `xl-vtpm vtpm pool …`.
fn run_pool(cmd: PoolCmd, local: &Local, mut admin: Admin, json: bool) -> Result<(), CliError> {
    match cmd {
        PoolCmd::Fill { group, count, min, ek, background } => {
            let made = if background {
                local.pool_fill_background(&mut admin, group.as_deref(), ek == "ecc")?
            } else {
                local.pool_fill(&mut admin, group.as_deref(), ek == "ecc", count, min)?
            };
            let status = local.pool_status(&mut admin)?;
            if json {
                print_json(&serde_json::json!({ "made": made, "status": status }));
            } else {
                println!("made {} vTPM(s) for the pool", made.len());
                print_pool(&status);
            }
        }
        PoolCmd::Size { size, group, ek } => {
            let g = local.pool_set_size(&mut admin, group.as_deref(), ek == "ecc", size)?;
            let status = local.pool_status(&mut admin)?;
            if json {
                print_json(&status);
            } else {
                match size {
                    0 => println!("group {}, EK {ek}: no automatic refill", g.name),
                    n => println!("group {}, EK {ek}: {n} ready vTPMs kept, refilled in the background", g.name),
                }
                print_pool(&status);
            }
        }
        PoolCmd::Status => {
            let status = local.pool_status(&mut admin)?;
            if json {
                print_json(&status);
            } else {
                print_pool(&status);
            }
        }
        PoolCmd::Drain { group, yes } => {
            confirm(yes, "Destroy the pool's unclaimed vTPMs")?;
            let n = local.pool_drain(&mut admin, group.as_deref())?;
            if json {
                print_json(&serde_json::json!({ "destroyed": n }));
            } else {
                println!("destroyed {n} pooled vTPM(s)");
            }
        }
    }
    Ok(())
}

fn print_pool(s: &local::pool::PoolStatus) {
    for c in &s.ready {
        let size = if c.size > 0 { format!(" of {} kept", c.size) } else { String::new() };
        println!("group {} ({}), EK {}: {} ready{size}", c.group_name.as_deref().unwrap_or("?"), c.group, c.ek, c.ready);
    }
    if s.ready.is_empty() {
        println!("no ready vTPMs");
    }
    println!("being made: {}, being claimed: {}, left by a killed fill or claim: {}", s.making, s.claiming, s.abandoned);
}

/// `xl-vtpm registry …`.
fn run_registry(cmd: RegistryCmd, xen: &xenlife::Xen, mut admin: Admin, json: bool) -> Result<(), CliError> {
    match cmd {
        RegistryCmd::Check { repair, all_hosts } => {
            let report = xen.check(&mut admin, repair, all_hosts)?;
            if json {
                print_json(&report);
            } else if report.is_empty() {
                println!("registry matches what runs");
            } else {
                report.iter().for_each(|l| println!("{l}"));
            }
        }
        RegistryCmd::Remove { name, yes } => {
            confirm(yes, &format!("Forget guest {name}'s binding to its vTPM"))?;
            xen.forget(&name)?;
        }
    }
    Ok(())
}

/// `xl-vtpm libvirt …`: vTPMs of libvirt/QEMU domains.
fn run_libvirt(cmd: LibvirtCmd, local: &Local, json: bool) -> Result<(), CliError> {
    match cmd {
        LibvirtCmd::Sweep { connect, watch } => {
            let virsh = std::env::var_os("XVTPM_VIRSH").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("virsh"));
            loop {
                let pass = xl_tools::swtpm_compat::defined_domains(&virsh, connect.as_deref()).and_then(|defined| {
                    // A fresh connection per pass: a watcher outlives manager restarts.
                    let mut admin = Admin::connect(&local.run_dir)?;
                    xl_tools::swtpm_compat::sweep(local, &mut admin, &defined)
                });
                match pass {
                    Ok(swept) => {
                        if json {
                            print_json(&swept);
                        } else {
                            for s in &swept {
                                println!("{} {} (libvirt domain {})", s.action, s.vtpm, s.vm_uuid);
                            }
                        }
                        if watch.is_none() && swept.iter().any(|s| s.action.starts_with("failed")) {
                            return Err(CliError::new(exit::FAILURE, "some vTPMs of undefined libvirt domains could not be destroyed (listed above)"));
                        }
                    }
                    Err(e) if watch.is_some() => eprintln!("xl-vtpm libvirt sweep: {}", e.text()),
                    Err(e) => return Err(e),
                }
                let _ = std::io::stdout().flush();
                match watch {
                    Some(secs) => std::thread::sleep(Duration::from_secs(secs.max(1))),
                    None => return Ok(()),
                }
            }
        }
    }
}

/// `xl-vtpm verify-ekcert`.
fn run_verify_ekcert(cert: PathBuf, ca: PathBuf, ek: Option<PathBuf>, certify: Option<PathBuf>, ak: Option<PathBuf>, json: bool) -> Result<(), CliError> {
    let checks = xl_tools::ekcert::Checks { ek_public: ek.as_deref(), certify: certify.as_deref().zip(ak.as_deref()) };
    let info = xl_tools::ekcert::verify(&cert, &ca, &checks)?;
    if json {
        print_json(&serde_json::json!({
            "verified": true,
            "ek_type": info.ek_type.to_string(),
            "serial": info.serial,
            "tpm_manufacturer": info.manufacturer,
            "tpm_model": info.model,
            "tpm_version": info.version,
            "ek_checked": ek.is_some(),
            "ca_certify_checked": certify.is_some(),
        }));
    } else {
        println!(
            "verified: {} EK certificate, serial {}, issued by the CA{}{}",
            info.ek_type,
            info.serial,
            if ek.is_some() { "; it certifies the given EK" } else { "" },
            if certify.is_some() { "; the CA key is certified by the given AK" } else { "" }
        );
    }
    Ok(())
}

/// `xl-vtpm console`: becomes `xl console NAME`.
fn run_console(name: String) -> Result<(), CliError> {
    use std::os::unix::process::CommandExt;
    let e = std::process::Command::new(xl_path()).arg("console").arg(&name).exec();
    Err(CliError::caused(exit::FAILURE, "cannot run xl console", e))
}



fn xl_path() -> PathBuf {
    std::env::var_os("XVTPM_XL").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("xl"))
}

/// libvirt hook mode: decide from argv + the domain XML, then act. Exit codes
/// follow libvirt's rules (non-zero from prepare aborts the guest's start). The manager is
/// reached only by an action that needs it: a guest without a vTPM starts, stops and migrates
/// whether vtpmmgr runs or not.
fn run_libvirt_hook(xen: &xenlife::Xen, args: &[String]) -> Result<(), CliError> {
    use std::io::Read;
    use xl_tools::libvirt_hook as hook;
    let inv = hook::Invocation::from_args(args).map_err(|e| CliError::caused(exit::USAGE, "", e))?;
    let mut xml = String::new();
    std::io::stdin().read_to_string(&mut xml).map_err(|e| CliError::caused(exit::USAGE, "reading the domain XML from stdin", e))?;
    let decision = match hook::decide(&inv, &xml) {
        Ok(d) => d,
        Err(e) => return Err(CliError::caused(hook::exit_code_for_error(Some(&inv.operation)), "", e)),
    };
    let mut ok = true;
    let mut admin: Option<Admin> = None;
    for a in &decision.actions {
        if let Err(e) = xen.run_hook_action(&mut admin, a) {
            eprintln!("xl-vtpm libvirt-hook: {}", e.text());
            ok = false;
            break;
        }
    }
    match decision.exit_code(ok) {
        0 => Ok(()),
        code => Err(CliError::new(code, "libvirt hook action failed".to_string())),
    }
}

fn run_guest(cmd: GuestCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        GuestCmd::DeepQuote { nonce, vpcrs, host_pcrs, flags, tcti, out } => {
            let nonce = guest::parse_hex(&nonce, "--nonce")?;
            if nonce.len() > 64 {
                return Err(CliError::new(exit::USAGE, format!("--nonce: {} bytes; at most 64", nonce.len())));
            }
            let cmd = vtpm_proto::deepquote_cmd::DeepQuoteCommand {
                nonce,
                vpcr_alg: vtpm_proto::evidence::TPM_ALG_SHA256,
                vpcrs: guest::parse_pcr_list(&vpcrs, "--vpcrs")?,
                host_pcrs: guest::parse_pcr_list(&host_pcrs, "--host-pcrs")?,
                flags,
            };
            let target = guest::Target::parse(&tcti)?;
            let bundle = guest::deep_quote(&target, &cmd)?;
            std::fs::write(&out, &bundle).map_err(|e| CliError::caused(exit::FAILURE, format!("--out {}", out.display()), e))?;
            if json {
                print_json(&serde_json::json!({"out": out, "bytes": bundle.len()}));
            } else {
                println!("wrote {} bytes of evidence to {}", bundle.len(), out.display());
            }
            Ok(())
        }
    }
}

/// Whether a vTPM argument names a domain-mode vTPM.
fn is_domain(domains: &xl_tools::vtpmdom::Domains, uuid: &str) -> bool {
    local::parse_uuid(uuid, "UUID").ok().and_then(|u| domains.spec(&u).ok().flatten()).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `migrate`'s destination is its own argument: it once shared the id `host` with the
    /// global `--host` (this host's registry name), and clap gave the destination's value to both.
    #[test]
    fn the_migrate_destination_does_not_overwrite_this_hosts_name() {
        let a = Args::try_parse_from(["xl-vtpm", "--host", "host-a", "migrate", "g1", "host-b"]).unwrap();
        assert_eq!(a.host.as_deref(), Some("host-a"));
        match a.cmd {
            Cmd::Migrate { destination, .. } => assert_eq!(destination.as_deref(), Some("host-b")),
            other => panic!("{other:?}"),
        }
        let a = Args::try_parse_from(["xl-vtpm", "migrate", "g1", "localhost"]).unwrap();
        assert_eq!(a.host, None, "a destination is not this host's name");
    }
}
