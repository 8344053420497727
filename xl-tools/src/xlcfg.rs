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

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

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

// ---------------------------------------------------------------------------------------------
// vtpm= spec strings

/// One `vtpm=[…]` device: xl's `KEY=VALUE,KEY=VALUE` spec string.
///
/// xl (`tools/xl/xl_parse.c`) accepts exactly two keys, and so does this type:
/// `backend=` (required: the domain name or domid serving the device — for a guest, its vTPM
/// domain; for a vTPM domain, the manager) and `uuid=` (the vTPM's identity; libxl makes up a
/// random one on *every* create if it is missing, which is why xl-vtpm always writes it).
/// There is no `devid=` (xl numbers devices by list position) and no `backendtype=` (unlike
/// disks); both are refused with that explanation rather than passed to xl, which would exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VtpmSpec {
    /// `backend=`: domain name or numeric domid.
    pub backend: String,
    /// `uuid=`.
    pub uuid: Option<Uuid>,
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
}

impl std::str::FromStr for VtpmSpec {
    type Err = VtpmSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut backend = None;
        let mut uuid = None;
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
                        hint: "xl accepts only `backend=` and `uuid=` in a vtpm spec",
                    });
                }
            }
        }
        Ok(VtpmSpec {
            backend: backend.ok_or(VtpmSpecError::MissingBackend)?,
            uuid,
        })
    }
}

impl fmt::Display for VtpmSpec {
    /// The spec string as xl reads it: `backend=X` or `backend=X,uuid=U`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend={}", self.backend)?;
        if let Some(u) = &self.uuid {
            write!(f, ",uuid={}", u.hyphenated())?;
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

fn validate_vtpm_value(v: &Value) -> Result<(), ParseErrorKind> {
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

// ---------------------------------------------------------------------------------------------
// Lexer + parser

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Number(String),
    Str(String),
    LBracket,
    RBracket,
    Comma,
    Eq,
    PlusEq,
    Semi,
    /// End of line; carries a comment that ended the line, verbatim.
    Newline(Option<String>),
    Eof,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("word `{s}`"),
            Tok::Number(s) => format!("number `{s}`"),
            Tok::Str(_) => "string".into(),
            Tok::LBracket => "`[`".into(),
            Tok::RBracket => "`]`".into(),
            Tok::Comma => "`,`".into(),
            Tok::Eq => "`=`".into(),
            Tok::PlusEq => "`+=`".into(),
            Tok::Semi => "`;`".into(),
            Tok::Newline(_) => "end of line".into(),
            Tok::Eof => "end of file".into(),
        }
    }
}

/// A value with the position of its first token (for error messages).
enum PValue {
    Atom(Value, u32, u32),
    List(Vec<PValue>),
}

impl PValue {
    fn into_value(self) -> Value {
        match self {
            PValue::Atom(v, ..) => v,
            PValue::List(items) => Value::List(items.into_iter().map(PValue::into_value).collect()),
        }
    }
}

struct Parser<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: u32,
    col: u32,
    peeked: Option<(Tok, u32, u32)>,
    validate_vtpm: bool,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str, validate_vtpm: bool) -> Self {
        Parser {
            chars: src.chars().peekable(),
            line: 1,
            col: 1,
            peeked: None,
            validate_vtpm,
        }
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn err<T>(&self, line: u32, col: u32, kind: ParseErrorKind) -> Result<T, ParseError> {
        Err(ParseError { line, col, kind })
    }

    fn lex(&mut self) -> Result<(Tok, u32, u32), ParseError> {
        while matches!(self.chars.peek(), Some(' ' | '\t' | '\r')) {
            self.bump();
        }
        let (line, col) = (self.line, self.col);
        let Some(&c) = self.chars.peek() else {
            return Ok((Tok::Eof, line, col));
        };
        let tok = match c {
            '\n' => {
                self.bump();
                Tok::Newline(None)
            }
            '#' => {
                let mut text = String::new();
                while let Some(&c) = self.chars.peek() {
                    if c == '\n' {
                        break;
                    }
                    text.push(c);
                    self.bump();
                }
                self.bump();
                Tok::Newline(Some(text.trim_end().to_owned()))
            }
            '[' | ']' | ',' | '=' | ';' => {
                self.bump();
                match c {
                    '[' => Tok::LBracket,
                    ']' => Tok::RBracket,
                    ',' => Tok::Comma,
                    '=' => Tok::Eq,
                    _ => Tok::Semi,
                }
            }
            '+' => {
                self.bump();
                if self.chars.peek() == Some(&'=') {
                    self.bump();
                    Tok::PlusEq
                } else {
                    return self.err(line, col, ParseErrorKind::Unexpected {
                        found: "`+`".into(),
                        expected: "`+=` (xl.cfg has no arithmetic)",
                    });
                }
            }
            '"' | '\'' => Tok::Str(self.string(c, line, col)?),
            c if c.is_ascii_digit() => {
                let mut text = String::new();
                while let Some(&c) = self.chars.peek() {
                    if !c.is_ascii_alphanumeric() && c != '.' {
                        break;
                    }
                    text.push(c);
                    self.bump();
                }
                Tok::Number(text)
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut text = String::new();
                while let Some(&c) = self.chars.peek() {
                    if !c.is_ascii_alphanumeric() && c != '_' && c != '.' {
                        break;
                    }
                    text.push(c);
                    self.bump();
                }
                Tok::Ident(text)
            }
            '-' => {
                return self.err(line, col, ParseErrorKind::Unexpected {
                    found: "`-`".into(),
                    expected: "a value (xl.cfg numbers cannot be negative; quote strings)",
                })
            }
            other => {
                return self.err(line, col, ParseErrorKind::Unexpected {
                    found: format!("character `{}`", other.escape_default()),
                    expected: "a key, a value, `[`, `]`, `,`, `=` or `;` (is a string missing its quotes?)",
                })
            }
        };
        Ok((tok, line, col))
    }

    fn string(&mut self, q: char, line: u32, col: u32) -> Result<String, ParseError> {
        self.bump();
        let mut out = String::new();
        loop {
            let (el, ec) = (self.line, self.col);
            match self.bump() {
                None | Some('\n') => {
                    return self.err(line, col, ParseErrorKind::UnterminatedString(q));
                }
                Some(c) if c == q => return Ok(out),
                Some('\\') => {
                    let Some(e) = self.bump() else {
                        return self.err(line, col, ParseErrorKind::UnterminatedString(q));
                    };
                    match e {
                        '"' | '\'' | '\\' => out.push(e),
                        'a' => out.push('\x07'),
                        'b' => out.push('\x08'),
                        'f' => out.push('\x0c'),
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        't' => out.push('\t'),
                        'v' => out.push('\x0b'),
                        'x' => {
                            let mut h = String::new();
                            for _ in 0..2 {
                                match self.chars.peek() {
                                    Some(c) if c.is_ascii_hexdigit() => {
                                        h.push(*c);
                                        self.bump();
                                    }
                                    _ => break,
                                }
                            }
                            if h.len() != 2 {
                                return self.err(el, ec, ParseErrorKind::BadEscape(
                                    "`\\x` needs exactly two hex digits, e.g. \\x41".into(),
                                ));
                            }
                            let b = u8::from_str_radix(&h, 16).expect("two hex digits");
                            if b >= 0x80 || b == 0 {
                                return self.err(el, ec, ParseErrorKind::BadEscape(format!(
                                    "`\\x{h}` is not a printable ASCII byte; write the character itself"
                                )));
                            }
                            out.push(b as char);
                        }
                        '0'..='7' => {
                            return self.err(el, ec, ParseErrorKind::BadEscape(
                                "xl reads `\\NNN` digits as decimal, not octal; write `\\xHH` instead".into(),
                            ))
                        }
                        other => {
                            return self.err(el, ec, ParseErrorKind::BadEscape(format!(
                                "`\\{}` is not an escape xl knows; write `\\\\` for a backslash",
                                other.escape_default()
                            )))
                        }
                    }
                }
                Some(c) => out.push(c),
            }
        }
    }

    fn peek(&mut self) -> Result<&(Tok, u32, u32), ParseError> {
        if self.peeked.is_none() {
            self.peeked = Some(self.lex()?);
        }
        Ok(self.peeked.as_ref().expect("just filled"))
    }

    fn next(&mut self) -> Result<(Tok, u32, u32), ParseError> {
        self.peek()?;
        Ok(self.peeked.take().expect("just filled"))
    }

    fn skip_newlines(&mut self) -> Result<(), ParseError> {
        while matches!(self.peek()?.0, Tok::Newline(_)) {
            self.next()?;
        }
        Ok(())
    }

    fn file(mut self) -> Result<XlConfig, ParseError> {
        let mut cfg = XlConfig::default();
        let mut pending: Vec<String> = Vec::new();
        // Whether the current line already holds a statement (so a blank "\n" is its end).
        let mut line_has_stmt = false;
        // (key, line) of `=` settings seen, for duplicate detection.
        let mut seen: BTreeMap<String, u32> = BTreeMap::new();
        loop {
            let (tok, line, col) = self.next()?;
            match tok {
                Tok::Eof => break,
                Tok::Newline(c) => {
                    if !line_has_stmt {
                        pending.push(c.unwrap_or_default());
                    }
                    line_has_stmt = false;
                }
                Tok::Semi => {}
                Tok::Ident(key) => {
                    let (op, oline, ocol) = self.next()?;
                    let append = match op {
                        Tok::Eq => false,
                        Tok::PlusEq => true,
                        other => {
                            return self.err(
                                oline,
                                ocol,
                                ParseErrorKind::Unexpected {
                                    found: other.describe(),
                                    expected: "`=` after a key",
                                },
                            );
                        }
                    };
                    if !is_known_key(&key) {
                        return self.err(
                            line,
                            col,
                            ParseErrorKind::UnknownKey {
                                hint: unknown_key_hint(&key),
                                key,
                            },
                        );
                    }
                    let pv = self.value()?;
                    if key == "vtpm" && self.validate_vtpm {
                        check_vtpm_pvalue(&pv)?;
                    }
                    let value = pv.into_value();
                    // End of statement: newline (maybe with comment), `;` or end of file.
                    let (end, eline, ecol) = self.next()?;
                    line_has_stmt = matches!(end, Tok::Semi);
                    let trailing = match end {
                        Tok::Newline(c) => c,
                        Tok::Semi | Tok::Eof => None,
                        other => {
                            return self.err(eline, ecol, ParseErrorKind::Unexpected {
                                found: other.describe(),
                                expected: "end of line or `;` after a value (is a list missing its `[`?)",
                            })
                        }
                    };
                    if let Some(&first_line) = seen.get(&key) {
                        if !append {
                            return self.err(
                                line,
                                col,
                                ParseErrorKind::DuplicateKey {
                                    key,
                                    first_line,
                                    second_line: line,
                                },
                            );
                        }
                        let e = cfg.entries.iter_mut().find(|e| e.key == key).expect("seen");
                        append_value(&key, &mut e.value, value).map_err(|kind| ParseError {
                            line,
                            col,
                            kind,
                        })?;
                        if key == "vtpm" && self.validate_vtpm {
                            validate_vtpm_value(&e.value).map_err(|kind| ParseError {
                                line,
                                col,
                                kind,
                            })?;
                        }
                        pending.clear();
                        continue;
                    }
                    seen.insert(key.clone(), line);
                    cfg.entries.push(Entry {
                        key,
                        value,
                        line,
                        col,
                        leading: std::mem::take(&mut pending),
                        trailing,
                    });
                }
                other => {
                    return self.err(
                        line,
                        col,
                        ParseErrorKind::Unexpected {
                            found: other.describe(),
                            expected: "a key (`name = value`) at the start of a statement",
                        },
                    );
                }
            }
        }
        cfg.tail = pending;
        Ok(cfg)
    }

    fn value(&mut self) -> Result<PValue, ParseError> {
        let (tok, line, col) = self.next()?;
        match tok {
            Tok::Str(s) => Ok(PValue::Atom(Value::Str(s), line, col)),
            Tok::Number(text) => match parse_c_long(&text) {
                Some(i) => Ok(PValue::Atom(Value::Int(i), line, col)),
                None => self.err(
                    line,
                    col,
                    ParseErrorKind::BadNumber {
                        hint: if text.starts_with('0') && !text.starts_with("0x") && text.len() > 1
                        {
                            "a leading 0 makes xl read octal; drop the 0 or quote a string"
                        } else {
                            "write decimal digits or 0x-prefixed hex, or quote it as a string"
                        },
                        text,
                    },
                ),
            },
            Tok::LBracket => {
                let mut items = Vec::new();
                self.skip_newlines()?;
                loop {
                    if matches!(self.peek()?.0, Tok::RBracket) {
                        self.next()?;
                        return Ok(PValue::List(items));
                    }
                    items.push(self.value()?);
                    self.skip_newlines()?;
                    let (t, l, c) = self.next()?;
                    match t {
                        Tok::Comma => self.skip_newlines()?,
                        Tok::RBracket => return Ok(PValue::List(items)),
                        other => {
                            return self.err(
                                l,
                                c,
                                ParseErrorKind::Unexpected {
                                    found: other.describe(),
                                    expected: "`,` or `]` in a list",
                                },
                            );
                        }
                    }
                }
            }
            Tok::Ident(word) => self.err(
                line,
                col,
                ParseErrorKind::Unexpected {
                    found: format!("word `{word}`"),
                    expected: "a value: quote strings (\"…\"), e.g. \"destroy\"",
                },
            ),
            other => self.err(
                line,
                col,
                ParseErrorKind::Unexpected {
                    found: other.describe(),
                    expected: "a value: a \"string\", a number or a [ list ]",
                },
            ),
        }
    }
}

fn check_vtpm_pvalue(pv: &PValue) -> Result<(), ParseError> {
    let PValue::List(items) = pv else {
        let PValue::Atom(v, line, col) = pv else {
            unreachable!()
        };
        return Err(ParseError {
            line: *line,
            col: *col,
            kind: ParseErrorKind::WrongType {
                key: "vtpm".into(),
                expected: "a list of spec strings, e.g. vtpm = [ \"backend=vtpm-guest1\" ]",
                found: v.kind(),
            },
        });
    };
    for (index, item) in items.iter().enumerate() {
        match item {
            PValue::Atom(Value::Str(s), line, col) => {
                s.parse::<VtpmSpec>().map_err(|error| ParseError {
                    line: *line,
                    col: *col,
                    kind: ParseErrorKind::Vtpm { index, error },
                })?;
            }
            PValue::Atom(v, line, col) => {
                return Err(ParseError {
                    line: *line,
                    col: *col,
                    kind: ParseErrorKind::WrongType {
                        key: "vtpm".into(),
                        expected: "a list of spec strings",
                        found: v.kind(),
                    },
                });
            }
            PValue::List(_) => {
                return Err(ParseError {
                    line: 0,
                    col: 0,
                    kind: ParseErrorKind::WrongType {
                        key: "vtpm".into(),
                        expected: "a list of spec strings",
                        found: "list",
                    },
                });
            }
        }
    }
    Ok(())
}

fn append_value(key: &str, have: &mut Value, add: Value) -> Result<(), ParseErrorKind> {
    match (have, add) {
        (Value::Str(a), Value::Str(b)) => {
            a.push_str(&b);
            Ok(())
        }
        (Value::List(a), Value::List(b)) => {
            a.extend(b);
            Ok(())
        }
        (have, add) => Err(ParseErrorKind::BadAppend {
            key: key.to_owned(),
            have: have.kind(),
            add: add.kind(),
            hint: if matches!(have, Value::Int(_)) || matches!(add, Value::Int(_)) {
                "xl cannot use += with numbers; set the number once with `=`"
            } else {
                "append a list to a list, or a string to a string"
            },
        }),
    }
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
