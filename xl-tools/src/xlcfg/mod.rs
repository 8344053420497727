//! xl domain configuration files (xl.cfg(5)): parser, `vtpm=` spec strings, writer.
//!
//! `xl-vtpm create guest.cfg` takes the same file `xl create` takes, so it must read it
//! exactly as xl does and refuse what xl would silently misread. The syntax is xl's own
//! (libxlutil's flex/bison grammar, `tools/libs/util/libxlu_cfg_[ly].[ly]` in Xen):
//!
//! * statements `key = value` or `key += value`, ended by a newline or `;`;
//! * keys `[a-z][a-z0-9._]*`;
//! * values: strings in `"…"` or `'…'` (C escapes `\n \t \\ \" \' \xHH …`, no raw newline),
//!   numbers (`[0-9][0-9a-fx]*`, read as C's `strtol(…, 0)`: `0x` hex, leading `0` octal),
//!   and lists `[ v, v, ]` which may span lines, nest, and end in a trailing comma;
//! * `#` starts a comment that runs to the end of the line.
//!
//! Where xl is lenient in a way that hides mistakes, this parser is strict, and every
//! error carries `line:column` and names the key and the fix:
//!
//! * **unknown keys are rejected** (xl ignores them silently, so `vtmp=[…]` would start a
//!   guest without a TPM); the hint suggests the nearest known key;
//! * **duplicate keys are rejected** naming both lines (xl lets the last one win);
//!   `key += value` after `key = value` still appends, as in xl;
//! * `vtpm=` entries are checked when the file is read ([`VtpmSpec`]): `backend=` required,
//!   `uuid=` must be a hyphenated UUID, any other key is an error (xl exits on those too,
//!   but only after it has started building the domain);
//! * octal escapes in strings are refused: xl parses `\101` as *decimal*, so the byte a
//!   reader expects is not the byte xl uses.
//!
//! The writer ([`XlConfig::render`]) produces text xl reads back to the same values, keeping
//! the comments that precede each line, so configs generated from the templates in
//! `xen-configs/` stay self-explaining. [`XlConfig::substitute`] fills `@NAME@`
//! placeholders of a template *inside parsed string values*, so a substituted value can never
//! break out of its quotes and inject a key.
//!
//! Why this matters for the vTPM (see docs/xen-placement.md): xl gives a backend
//! 10 s to reach InitWait, so the vTPM domain must be created and ready *before* the
//! guest config — with its `vtpm=["backend=<vtpm domain>,uuid=<vTPM uuid>"]` line resolved
//! by us — is handed to xl.

//!
//! Layout: this file holds the model ([`XlConfig`], [`Value`], the errors), the writer and
//! template substitution; `parser` is the lexer and parser, `vtpm` the `vtpm=` spec strings.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

mod parser;
mod vtpm;

pub use vtpm::{TpmModel, VtpmSpec, VtpmSpecError, parse_xl_uuid};

use parser::Parser;
use vtpm::validate_vtpm_value;

/// Top-level keys of xl.cfg(5), as read by `tools/xl/xl_parse.c` (Xen 4.20-era tree).
///
/// Keys of `xl.conf` (the global xl settings, e.g. `autoballoon`) are not domain keys and
/// are not accepted here.
#[rustfmt::skip]
pub const KNOWN_KEYS: &[&str] = &[
    "acpi", "acpi_firmware", "acpi_laptop_slate", "acpi_s3", "acpi_s4", "altp2m",
    "altp2m_count", "altp2mhvm", "apic", "arm_sci", "bios", "bios_path_override", "boot",
    "bootloader", "bootloader_args", "bootloader_restrict", "bootloader_user", "builder", "cap",
    "channel", "cmdline", "cpu_weight", "cpuid", "cpus", "cpus_soft", "device_model",
    "device_model_args", "device_model_args_hvm", "device_model_args_pv",
    "device_model_override", "device_model_stubdomain_override",
    "device_model_stubdomain_seclabel", "device_model_user", "device_model_version",
    "device_tree", "disk", "display", "dm_restrict", "driver_domain", "dtdev", "e820_host",
    "extra", "extratime", "firmware", "firmware_override", "gfx_passthru", "gic_version", "hap",
    "hdtype", "hpet", "hvm_pirq", "init_seclabel", "iomem", "ioports", "irqs", "kernel",
    "keymap", "latency", "llc_colors", "localtime", "max_event_channels", "max_grant_frames",
    "max_grant_version", "max_maptrack_frames", "maxmem", "maxvcpus", "mca_caps", "memory",
    "mmio_hole", "ms_vm_genid", "msr_relaxed", "name", "nestedhvm", "nographic", "nomigrate",
    "nr_spis", "nx", "on_crash", "on_poweroff", "on_reboot", "on_soft_reset", "on_watchdog",
    "oos", "opengl", "p9", "pae", "passthrough", "pci", "pci_msitranslate", "pci_permissive",
    "pci_power_mgmt", "pci_seize", "period", "pool", "pvcalls", "pvshim", "pvshim_cmdline",
    "pvshim_extra", "pvshim_path", "ramdisk", "rdm", "rdm_mem_boundary", "root",
    "rtc_timeoffset", "sdl", "seclabel", "serial", "shadow_memory", "slice", "smbios",
    "smbios_firmware", "soundhw", "spice", "spice_clipboard_sharing", "spice_image_compression",
    "spice_streaming_video", "spiceagent_mouse", "spicedisable_ticketing", "spicehost",
    "spicepasswd", "spiceport", "spicetls_port", "spiceusbredirection", "spicevdagent",
    "stdvga", "stubdomain_cmdline", "stubdomain_kernel", "stubdomain_memory",
    "stubdomain_ramdisk", "sve", "tee", "timer_mode", "trap_unmapped_accesses", "tsc_mode",
    "type", "usb", "usbctrl", "usbdev", "usbdevice", "usbversion", "uuid", "vcpus", "vdispl",
    "vendor_device", "vfb", "vga", "videoram", "vif", "vif2", "viridian", "virtio", "vkb",
    "vkb_device", "vmtrace_buf_kb", "vnc", "vncdisplay", "vnclisten", "vncpasswd",
    "vncunused", "vncviewer", "vnuma", "vpmu", "vpt_align", "vsnd", "vtpm", "vuart",
    "xauthority", "xen_platform_pci", "xen_platform_pci_bar_uc", "xend_suspend_evtchn_compat",
    "xenstore_feature_mask", "xenstore_quota",
];

/// Keys of `/etc/xen/xl.conf`, which people sometimes paste into a domain config.
#[rustfmt::skip]
const XL_CONF_KEYS: &[&str] = &[
    "autoballoon", "blkdev_start", "claim_mode", "defaultbridge", "domid_policy", "lockfile",
    "output_format", "run_hotplug_scripts", "vifscript", "vif.default.script",
    "vif.default.bridge", "vif.default.backend", "vif.default.gatewaydev",
    "remus.default.netbufscript", "colo.default.proxyscript",
];

/// Whether `key` is a top-level xl.cfg(5) key.
pub fn is_known_key(key: &str) -> bool {
    KNOWN_KEYS.binary_search(&key).is_ok()
}

/// A value of an xl.cfg setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A quoted string, escapes resolved.
    Str(String),
    /// A number (xl reads it with `strtol(…, 0)`).
    Int(i64),
    /// A list `[ … ]`; items may themselves be lists (e.g. `vnuma`).
    List(Vec<Value>),
}

impl Value {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The number, if this is one or a string xl would read as one (`memory = "512"`).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Str(s) => parse_c_long(s),
            Value::List(_) => None,
        }
    }

    /// The list items, if this is a list.
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(l) => Some(l),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "string",
            Value::Int(_) => "number",
            Value::List(_) => "list",
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl fmt::Display for Value {
    /// Renders the value in xl syntax, on one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => f.write_str(&quote(s)),
            Value::Int(i) => write!(f, "{i}"),
            Value::List(items) if items.is_empty() => f.write_str("[ ]"),
            Value::List(items) => {
                f.write_str("[ ")?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str(" ]")
            }
        }
    }
}

/// One setting of a config file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// Its value (after any `+=` appends).
    pub value: Value,
    /// Line of the key (1-based; 0 for settings added with [`XlConfig::set`]).
    pub line: u32,
    /// Column of the key (1-based, in characters; 0 for added settings).
    pub col: u32,
    /// Comment and blank lines directly above the setting, verbatim (`""` is a blank line).
    pub leading: Vec<String>,
    /// A `# comment` on the same line after the value, verbatim.
    pub trailing: Option<String>,
}

/// A parsed xl domain config: an ordered map of typed values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XlConfig {
    entries: Vec<Entry>,
    /// Comment and blank lines after the last setting.
    tail: Vec<String>,
}

/// Where and what went wrong in a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{col}: {kind}")]
pub struct ParseError {
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub col: u32,
    /// What went wrong.
    pub kind: ParseErrorKind,
}

/// The kinds of [`ParseError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    /// A key xl.cfg(5) does not define.
    #[error("unknown key `{key}`: {hint}")]
    UnknownKey {
        /// The key as written.
        key: String,
        /// What to do instead.
        hint: String,
    },
    /// A key set twice with `=`.
    #[error(
        "duplicate key `{key}`: set on line {first_line} and again on line {second_line}; \
         keep one (xl would silently use the last), or use `{key} += …` to append"
    )]
    DuplicateKey {
        /// The key.
        key: String,
        /// Line of the first setting.
        first_line: u32,
        /// Line of the second setting.
        second_line: u32,
    },
    /// `+=` used with a number, or mixing a string with a list.
    #[error("`{key} += …` cannot append a {add} to a {have}: {hint}")]
    BadAppend {
        /// The key.
        key: String,
        /// Kind of the existing value.
        have: &'static str,
        /// Kind of the appended value.
        add: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
    /// A string without its closing quote on the same line.
    #[error(
        "unterminated string: close it with {0} on the same line (xl strings cannot span lines)"
    )]
    UnterminatedString(char),
    /// A backslash escape xl does not read as written.
    #[error("bad escape in string: {0}")]
    BadEscape(String),
    /// A malformed number.
    #[error("bad number `{text}`: {hint}")]
    BadNumber {
        /// The text as written.
        text: String,
        /// What is wrong with it.
        hint: &'static str,
    },
    /// A token out of place.
    #[error("unexpected {found}, expected {expected}")]
    Unexpected {
        /// What was found.
        found: String,
        /// What the grammar allows here.
        expected: &'static str,
    },
    /// A key with the wrong kind of value (only checked where xl's meaning depends on it).
    #[error("`{key}` must be {expected}, not a {found}")]
    WrongType {
        /// The key.
        key: String,
        /// What xl expects.
        expected: &'static str,
        /// What was written.
        found: &'static str,
    },
    /// A bad `vtpm=[…]` entry.
    #[error("vtpm entry {index}: {error}")]
    Vtpm {
        /// 0-based position in the list (which is also the devid xl gives it).
        index: usize,
        /// What is wrong.
        error: VtpmSpecError,
    },
}

/// A [`ParseError`] together with the file it came from; displays as `path:line:col: …`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not parse.
    #[error("{}:{source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and what.
        source: ParseError,
    },
}

impl XlConfig {
    /// Parses xl.cfg text.
    pub fn parse(src: &str) -> Result<XlConfig, ParseError> {
        Parser::new(src, true).file()
    }

    /// Parses a template: like [`XlConfig::parse`], but `vtpm=` entries (which hold
    /// placeholders such as `uuid=@VTPM_UUID@`) are validated by [`XlConfig::substitute`]
    /// instead.
    pub fn parse_template(src: &str) -> Result<XlConfig, ParseError> {
        Parser::new(src, false).file()
    }

    /// Reads and parses a config file.
    pub fn parse_file(path: &Path) -> Result<XlConfig, ConfigFileError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        XlConfig::parse(&src).map_err(|source| ConfigFileError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// The settings, in file order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The keys, in file order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.key.as_str())
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entry(key).map(|e| &e.value)
    }

    /// The setting of `key`, with its position.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// The string value of `key` (`None` if unset or not a string).
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// The numeric value of `key`, as xl reads it.
    pub fn get_int(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(Value::as_int)
    }

    /// The list value of `key`.
    pub fn get_list(&self, key: &str) -> Option<&[Value]> {
        self.get(key).and_then(Value::as_list)
    }

    /// `name=`.
    pub fn name(&self) -> Option<&str> {
        self.get_str("name")
    }

    /// `uuid=`, if set and well-formed.
    pub fn uuid(&self) -> Option<Uuid> {
        self.get_str("uuid").and_then(|s| parse_xl_uuid(s).ok())
    }

    /// Sets `key` (replacing its value in place, or appending a new setting at the end).
    /// Unknown keys are refused, as in a file; `vtpm` values are validated.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) -> Result<(), ParseError> {
        let value = value.into();
        let at = |kind| ParseError {
            line: 0,
            col: 0,
            kind,
        };
        if !is_known_key(key) {
            return Err(at(ParseErrorKind::UnknownKey {
                key: key.to_owned(),
                hint: unknown_key_hint(key),
            }));
        }
        if key == "vtpm" {
            validate_vtpm_value(&value).map_err(at)?;
        }
        match self.entries.iter_mut().find(|e| e.key == key) {
            Some(e) => e.value = value,
            None => self.entries.push(Entry {
                key: key.to_owned(),
                value,
                line: 0,
                col: 0,
                leading: Vec::new(),
                trailing: None,
            }),
        }
        Ok(())
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.entries.iter().position(|e| e.key == key)?;
        Some(self.entries.remove(i).value)
    }

    /// The parsed `vtpm=[…]` entries (empty if unset). Entry `i` is the device xl numbers
    /// `devid=i`.
    pub fn vtpms(&self) -> Vec<VtpmSpec> {
        // `parse`/`set` validated the list already, so this cannot fail.
        self.get_list("vtpm")
            .map(|l| {
                l.iter()
                    .filter_map(|v| v.as_str())
                    .filter_map(|s| s.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Replaces `vtpm=` with the given devices (removes it when `specs` is empty).
    pub fn set_vtpms(&mut self, specs: &[VtpmSpec]) {
        if specs.is_empty() {
            self.remove("vtpm");
            return;
        }
        let v = Value::List(specs.iter().map(|s| Value::Str(s.to_string())).collect());
        self.set("vtpm", v).expect("rendered vtpm specs are valid");
    }

    /// Replaces `@NAME@` placeholders in every string value (also inside lists) with
    /// `vars["NAME"]`. Placeholder names are `[A-Z0-9_]+`; a placeholder without a value is an
    /// error naming it and the key, so no template is ever half-filled. Substituted text stays
    /// inside its string (the writer escapes it), and a `vtpm=` result is re-validated.
    pub fn substitute(&mut self, vars: &BTreeMap<String, String>) -> Result<(), ParseError> {
        for e in &mut self.entries {
            let err = |kind| ParseError {
                line: e.line,
                col: e.col,
                kind,
            };
            let mut missing = None;
            subst_value(&mut e.value, vars, &mut missing);
            if let Some(name) = missing {
                return Err(err(ParseErrorKind::Unexpected {
                    found: format!("placeholder `@{name}@` in `{}` with no value", e.key),
                    expected: "a value for every placeholder of the template",
                }));
            }
            if e.key == "vtpm" {
                validate_vtpm_value(&e.value).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Renders the config as xl.cfg text that parses back to the same values (comments above
    /// settings are kept; comments inside multi-line lists are not).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for e in &self.entries {
            for l in &e.leading {
                out.push_str(l);
                out.push('\n');
            }
            out.push_str(&e.key);
            out.push_str(" = ");
            render_value(&e.value, 0, &mut out);
            if let Some(c) = &e.trailing {
                out.push(' ');
                out.push_str(c);
            }
            out.push('\n');
        }
        for l in &self.tail {
            out.push_str(l);
            out.push('\n');
        }
        out
    }
}

impl fmt::Display for XlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl std::str::FromStr for XlConfig {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        XlConfig::parse(s)
    }
}

fn subst_value(v: &mut Value, vars: &BTreeMap<String, String>, missing: &mut Option<String>) {
    match v {
        Value::Str(s) => {
            if let Some(new) = subst_str(s, vars, missing) {
                *s = new;
            }
        }
        Value::Int(_) => {}
        Value::List(items) => items.iter_mut().for_each(|i| subst_value(i, vars, missing)),
    }
}

fn subst_str(
    s: &str,
    vars: &BTreeMap<String, String>,
    missing: &mut Option<String>,
) -> Option<String> {
    if !s.contains('@') {
        return None;
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find('@') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let name_len = after
            .bytes()
            .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
            .count();
        if name_len > 0 && after.as_bytes().get(name_len) == Some(&b'@') {
            let name = &after[..name_len];
            match vars.get(name) {
                Some(val) => out.push_str(val),
                None => {
                    missing.get_or_insert_with(|| name.to_owned());
                    out.push_str(&rest[start..start + name_len + 2]);
                }
            }
            rest = &after[name_len + 1..];
        } else {
            out.push('@');
            rest = after;
        }
    }
    out.push_str(rest);
    Some(out)
}

fn render_value(v: &Value, indent: usize, out: &mut String) {
    let one_line = v.to_string();
    let Value::List(items) = v else {
        out.push_str(&one_line);
        return;
    };
    if one_line.len() + indent <= 72 || items.is_empty() {
        out.push_str(&one_line);
        return;
    }
    out.push_str("[\n");
    for item in items {
        out.push_str(&" ".repeat(indent + 4));
        render_value(item, indent + 4, out);
        out.push_str(",\n");
    }
    out.push_str(&" ".repeat(indent));
    out.push(']');
}

/// Quotes a string the way xl reads it back: `"…"` with `\\`, `\"` and control characters
/// escaped.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// C `strtol(s, &end, 0)` requiring the whole string to be consumed, as xl does.
fn parse_c_long(s: &str) -> Option<i64> {
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    i64::from_str_radix(digits, radix).ok()
}

fn unknown_key_hint(key: &str) -> String {
    let lower = key.to_ascii_lowercase();
    if lower != key && is_known_key(&lower) {
        return format!("xl keys are lower case; write `{lower}`");
    }
    if XL_CONF_KEYS.contains(&key) && !is_known_key(key) {
        return "this is a setting of /etc/xen/xl.conf (global), not of a domain config; move it there".into();
    }
    if key == "p2m_mode" {
        return "xl.cfg(5) has no such key; paging mode is chosen with `hap = 0|1` (and `altp2m`)"
            .into();
    }
    let best = KNOWN_KEYS
        .iter()
        .map(|k| (edit_distance(&lower, k), *k))
        .min()
        .filter(|(d, k)| *d <= 2.max(k.len() / 4));
    match best {
        Some((_, k)) => format!("did you mean `{k}`? (xl.cfg(5) lists the valid keys)"),
        None => {
            "not an xl.cfg(5) key; remove it or check the spelling (xl would silently ignore it)"
                .into()
        }
    }
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of
/// adjacent characters (the usual typo, `vtmp` for `vtpm`) cost 1.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_keys_sorted_and_unique() {
        assert!(
            KNOWN_KEYS.windows(2).all(|w| w[0] < w[1]),
            "KNOWN_KEYS must stay sorted for binary_search"
        );
    }

    #[test]
    fn edit_distance_works() {
        assert_eq!(edit_distance("vtmp", "vtpm"), 1);
        assert_eq!(edit_distance("memroy", "memory"), 1);
        assert_eq!(edit_distance("vtpm", "vpmu"), 2);
        assert_eq!(edit_distance("name", "name"), 0);
    }

    #[test]
    fn c_long() {
        assert_eq!(parse_c_long("0x10"), Some(16));
        assert_eq!(parse_c_long("010"), Some(8));
        assert_eq!(parse_c_long("0"), Some(0));
        assert_eq!(parse_c_long("08"), None);
        assert_eq!(parse_c_long("12a"), None);
    }

    #[test]
    fn subst_keeps_stray_at() {
        let vars = BTreeMap::from([("A".to_string(), "x".to_string())]);
        let mut missing = None;
        assert_eq!(
            subst_str("a@b.c @A@ @@ @a@", &vars, &mut missing).unwrap(),
            "a@b.c x @@ @a@"
        );
        assert!(missing.is_none());
        assert_eq!(subst_str("@B@", &vars, &mut missing).unwrap(), "@B@");
        assert_eq!(missing.as_deref(), Some("B"));
    }
}
