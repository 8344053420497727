//! Safe wrapper around [libtpms]: one software TPM 2.0 (or 1.2) per process.
//!
//! libtpms keeps all of its state in process globals, is not thread-safe and talks to its
//! embedder through C callbacks without a context argument. This crate turns that into a
//! single owned value:
//!
//! * [`Engine::start`] starts **the one TPM this process may hold**. A second call while an
//!   [`Engine`] is alive returns [`EngineError::AlreadyRunning`] (process-global
//!   `AtomicBool`). [`Engine`] is `!Send + !Sync`, so all libtpms calls stay on the thread
//!   that started it. Dropping it calls `TPMLIB_Terminate` and frees the slot, so a new
//!   engine (e.g. a restart from saved state) can be started afterwards.
//! * `permanent: None` manufactures a new TPM; `permanent: Some(blob)` resumes one and
//!   **never silently manufactures**: the blob is checked with `TPMLIB_ValidateState` and
//!   `TPMLIB_SetState`, and while resuming the NVRAM callback answers a missing `permall`
//!   with `TPM_FAIL` instead of `TPM_RETRY`, so libtpms cannot take its "no state →
//!   manufacture" path. A rejected blob is an [`EngineError::StateRejected`].
//!   **libtpms blobs carry no checksum or MAC**: it rejects damaged magic numbers, versions
//!   and lengths, but a flipped bit in, say, the endorsement seed is accepted and silently
//!   yields a different EK. Callers must authenticate blobs (AEAD) before handing them in.
//! * [`Engine::process`] never panics and always returns a well-formed response: on any
//!   failure outside the TPM (bad length, libtpms error, malformed libtpms output) it
//!   answers `TPM_RC_FAILURE` (tag `0x8001`, rc `0x101`) for TPM 2.0 and `TPM_FAIL`
//!   (tag `0x00C4`, rc `9`) for TPM 1.2.
//! * NVRAM lives in memory. libtpms writes its permanent state (`permall`) through the
//!   callbacks; [`Engine::take_dirty_permanent`] hands out the newest copy after each change,
//!   so the caller can seal and persist it. [`Engine::permanent_state`] and
//!   [`Engine::volatile_state`] snapshot the running TPM (`TPMLIB_GetState`).
//! * Every state blob handed out is wrapped in [`Zeroizing`]; internal copies are zeroized
//!   too. This crate never logs, and it points libtpms' own diagnostics at `/dev/null`
//!   because libtpms dumps command bytes to stderr when it enters failure mode.
//!
//! [`provision_ek`] and [`read_ek_public`] create and read the TCG default RSA-2048 EK at
//! persistent handle 0x81010001; [`write_ek_cert`] and [`read_ek_cert`] keep an EK certificate at
//! its TCG NV index. The TPM wire vocabulary (headers, codes, command builders) is `tpm-wire`'s;
//! this crate keeps what is specific to libtpms.
//!
//! ```no_run
//! use vtpm_engine::{Engine, TpmVersion, provision_ek};
//! let mut engine = Engine::start(TpmVersion::Tpm2, None, None)?;
//! let _ek = provision_ek(&mut engine)?;            // Startup(CLEAR) + EK at 0x81010001
//! let _resp = engine.process(&tpm_wire::tpm2_shutdown(tpm_wire::TPM2_SU_CLEAR));
//! let blob = engine.permanent_state()?;           // seal and store this
//! drop(engine);
//! let mut engine = Engine::start(TpmVersion::Tpm2, Some(&blob), None)?;
//! # Ok::<(), vtpm_engine::EngineError>(())
//! ```
//!
//! [libtpms]: https://github.com/stefanberger/libtpms
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
// FFI: this module and `callbacks` call libtpms (`unsafe` is denied workspace-wide);
// `ek` is plain Rust and forbids it.
#![allow(unsafe_code)]

mod callbacks;
mod ek;

use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use libtpms_sys as sys;
use zeroize::Zeroize;
pub use zeroize::Zeroizing;

pub use ek::{
    EK_ATTRIBUTES, EK_AUTH_POLICY, EK_CERT_NV_ATTRIBUTES, EK_CERT_NV_ECC_P256, EK_CERT_NV_RSA2048, EK_ECC_HANDLE,
    EK_RSA_HANDLE, EkKind, MAX_EK_CERT_LEN, TpmProperties, ek_ecc_p256_template, ek_rsa2048_template, nv_size, provision_ek,
    provision_ek_kind, read_ek, read_ek_cert, read_ek_public, tpm_properties, write_ek_cert,
};

use tpm_wire::HEADER_LEN;

/// Set while an [`Engine`] is alive in this process.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Which TPM family libtpms emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TpmVersion {
    /// TPM 2.0 (the default for xvtpm).
    Tpm2,
    /// TPM 1.2.
    Tpm12,
}

/// Errors from starting or querying the engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// Another [`Engine`] is alive in this process (libtpms holds one TPM per process).
    #[error("a TPM engine is already running in this process")]
    AlreadyRunning,
    /// An argument was unusable (empty blob, volatile state without permanent state, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// libtpms refused a state blob; the TPM was not started (and not manufactured).
    #[error("libtpms rejected the {what} state blob (rc {rc:#x})")]
    StateRejected {
        /// Which blob / stage: "permanent", "volatile", "permanent (MainInit)".
        what: &'static str,
        /// The libtpms result code.
        rc: u32,
    },
    /// A libtpms library call failed.
    #[error("libtpms {op} failed (rc {rc:#x})")]
    Libtpms {
        /// The failing `TPMLIB_*` operation.
        op: &'static str,
        /// The libtpms result code.
        rc: u32,
    },
    /// A TPM command answered with a non-success response code.
    #[error("TPM command {command} failed with response code {rc:#x}")]
    Tpm {
        /// The command name.
        command: &'static str,
        /// The TPM response code.
        rc: u32,
    },
    /// A TPM response could not be parsed.
    #[error("malformed TPM response to {0}")]
    MalformedResponse(&'static str),
    /// The operation is not available for this TPM family.
    #[error("operation not supported for {0:?}")]
    Unsupported(TpmVersion),
}

/// Result of [`Engine::set_buffer_size`]: the size now in effect and the supported range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSize {
    /// Buffer size in effect (the request clamped to `min..=max`).
    pub size: u32,
    /// Smallest supported buffer size.
    pub min: u32,
    /// Largest supported buffer size.
    pub max: u32,
}

/// The process's single libtpms TPM. See the [crate documentation](crate).
pub struct Engine {
    version: TpmVersion,
    /// Response buffer owned by us but (re)allocated by libtpms with malloc/realloc.
    resp_buf: *mut u8,
    resp_buf_size: u32,
    /// Scratch copy of the command (libtpms wants a mutable pointer); zeroized after use.
    cmd_buf: Vec<u8>,
    /// libtpms is process-global and not thread-safe: keep the engine on one thread.
    _not_send_sync: PhantomData<*const ()>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Points libtpms' diagnostics (which may include command bytes) at /dev/null, once.
fn silence_libtpms() {
    static DEV_NULL: OnceLock<Option<std::fs::File>> = OnceLock::new();
    let file = DEV_NULL.get_or_init(|| {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .ok()
    });
    if let Some(f) = file {
        // SAFETY: the descriptor stays open for the life of the process (held in a static);
        // libtpms only writes to it.
        unsafe { sys::TPMLIB_SetDebugFD(f.as_raw_fd()) };
    }
}

fn sys_version(v: TpmVersion) -> sys::TPMLIB_TPMVersion {
    match v {
        TpmVersion::Tpm2 => sys::TPMLIB_TPMVersion::TPMLIB_TPM_VERSION_2,
        TpmVersion::Tpm12 => sys::TPMLIB_TPMVersion::TPMLIB_TPM_VERSION_1_2,
    }
}

/// Selects `version` and drops any state blobs cached inside libtpms.
///
/// `TPMLIB_SetState(type, NULL, 0)` does **not** clear a cached blob: it installs an
/// "empty" marker that hides the state, which makes the next load report "no state" (and
/// so would lead libtpms to manufacture). The only real clear is `ClearAllCachedState`,
/// which libtpms runs when `TPMLIB_ChooseTPMVersion` switches versions, so we switch to
/// the other version and back. Fails (TPM_FAIL) if a TPM is running.
fn choose_version_clean(version: TpmVersion) -> u32 {
    let other = match version {
        TpmVersion::Tpm2 => TpmVersion::Tpm12,
        TpmVersion::Tpm12 => TpmVersion::Tpm2,
    };
    // SAFETY: plain calls without pointers; they only fail while a TPM is running.
    unsafe {
        let rc = sys::TPMLIB_ChooseTPMVersion(sys_version(other));
        if rc != sys::TPM_SUCCESS {
            return rc;
        }
        sys::TPMLIB_ChooseTPMVersion(sys_version(version))
    }
}

/// Undoes a (partial) start: terminate if MainInit ran, clear caches and NV, free the slot.
fn abort_start(version: TpmVersion, main_init_ran: bool) {
    if main_init_ran {
        // SAFETY: MainInit was called (successfully or not); Terminate frees its resources
        // and unlocks the version choice. We hold the RUNNING slot, so no one else uses it.
        unsafe { sys::TPMLIB_Terminate() };
    }
    // Free any blob still cached for the next MainInit (it holds TPM secrets).
    let _ = choose_version_clean(version);
    callbacks::nv().reset(false);
    callbacks::LOCALITY.store(0, Ordering::Relaxed);
    RUNNING.store(false, Ordering::Release);
}

fn check_blob(blob: Option<&[u8]>, what: &'static str) -> Result<(), EngineError> {
    match blob {
        Some([]) => Err(EngineError::InvalidArgument(what)),
        Some(b) if u32::try_from(b.len()).is_err() => Err(EngineError::InvalidArgument(what)),
        _ => Ok(()),
    }
}

/// Copies a libtpms-allocated state buffer into a zeroizing Vec, then wipes and frees it.
///
/// # Safety
/// `buf` must be NULL or a malloc'ed buffer of at least `len` bytes that we now own.
unsafe fn take_c_buffer(buf: *mut u8, len: u32) -> Zeroizing<Vec<u8>> {
    if buf.is_null() {
        return Zeroizing::new(Vec::new());
    }
    let len = len as usize;
    // SAFETY: per the contract `buf` is valid for `len` bytes and exclusively ours.
    let out = Zeroizing::new(unsafe { std::slice::from_raw_parts(buf, len) }.to_vec());
    // SAFETY: same buffer; wipe it, then release it with the allocator libtpms used.
    unsafe {
        ptr::write_bytes(buf, 0, len);
        libc::free(buf.cast());
    }
    out
}

impl Engine {
    /// Starts the one TPM this process may hold.
    ///
    /// * `permanent = None` manufactures a new TPM (the resulting `permall` is reported by
    ///   [`Engine::take_dirty_permanent`]).
    /// * `permanent = Some(blob)` resumes a TPM from its permanent state and never
    ///   manufactures; a blob libtpms does not accept yields [`EngineError::StateRejected`].
    ///   The dirty flag is cleared after a successful resume.
    /// * `volatile` (requires `permanent`) restores the running state saved with
    ///   [`Engine::volatile_state`]; the TPM then continues without a new `TPM2_Startup`.
    ///
    /// The libtpms buffer size is reset to its maximum on every start.
    ///
    /// Errors: [`EngineError::AlreadyRunning`] while another engine is alive,
    /// [`EngineError::InvalidArgument`] for empty blobs or volatile-without-permanent.
    pub fn start(
        version: TpmVersion,
        permanent: Option<&[u8]>,
        volatile: Option<&[u8]>,
    ) -> Result<Engine, EngineError> {
        check_blob(permanent, "empty or oversized permanent state")?;
        check_blob(volatile, "empty or oversized volatile state")?;
        if volatile.is_some() && permanent.is_none() {
            return Err(EngineError::InvalidArgument(
                "volatile state requires the permanent state",
            ));
        }
        RUNNING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| EngineError::AlreadyRunning)?;

        silence_libtpms();
        {
            let mut nv = callbacks::nv();
            nv.reset(permanent.is_some());
            if let Some(p) = permanent {
                nv.set_permanent(p);
            }
        }
        callbacks::LOCALITY.store(0, Ordering::Relaxed);

        // We hold the RUNNING slot, so no TPM of ours is running; this fails only if
        // someone else's TPM is running in this process.
        let rc = choose_version_clean(version);
        if rc != sys::TPM_SUCCESS {
            abort_start(version, false);
            return Err(EngineError::Libtpms {
                op: "ChooseTPMVersion",
                rc,
            });
        }
        let mut cbs = callbacks::table();
        // SAFETY: `cbs` is a fully initialised table with a correct sizeOfStruct; libtpms
        // copies it, and all callbacks are 'static functions.
        let rc = unsafe { sys::TPMLIB_RegisterCallbacks(&mut cbs) };
        if rc != sys::TPM_SUCCESS {
            abort_start(version, false);
            return Err(EngineError::Libtpms {
                op: "RegisterCallbacks",
                rc,
            });
        }
        let (mut min, mut max) = (0u32, 0u32);
        // SAFETY: out-pointers are valid locals; called before MainInit as documented.
        unsafe {
            sys::TPMLIB_SetBufferSize(0, &mut min, &mut max);
            sys::TPMLIB_SetBufferSize(max, ptr::null_mut(), ptr::null_mut());
        }

        if let Some(p) = permanent {
            // SAFETY: validation reads the blob through our loaddata callback; no pointers
            // are passed.
            let rc = unsafe {
                sys::TPMLIB_ValidateState(sys::TPMLIB_StateType_TPMLIB_STATE_PERMANENT, 0)
            };
            if rc != sys::TPM_SUCCESS {
                abort_start(version, false);
                return Err(EngineError::StateRejected {
                    what: "permanent",
                    rc,
                });
            }
            // SAFETY: `p` is a valid slice whose length fits in u32 (checked above); libtpms
            // copies it.
            let rc = unsafe {
                sys::TPMLIB_SetState(
                    sys::TPMLIB_StateType_TPMLIB_STATE_PERMANENT,
                    p.as_ptr(),
                    p.len() as u32,
                )
            };
            if rc != sys::TPM_SUCCESS {
                abort_start(version, false);
                return Err(EngineError::StateRejected {
                    what: "permanent",
                    rc,
                });
            }
        }
        if let Some(v) = volatile {
            // SAFETY: as above; the permanent blob was set first, as libtpms requires.
            let rc = unsafe {
                sys::TPMLIB_SetState(
                    sys::TPMLIB_StateType_TPMLIB_STATE_VOLATILE,
                    v.as_ptr(),
                    v.len() as u32,
                )
            };
            if rc != sys::TPM_SUCCESS {
                abort_start(version, false);
                return Err(EngineError::StateRejected {
                    what: "volatile",
                    rc,
                });
            }
        }

        // SAFETY: version chosen, callbacks registered, state (if any) set; single thread.
        let rc = unsafe { sys::TPMLIB_MainInit() };
        if rc != sys::TPM_SUCCESS {
            abort_start(version, true);
            return Err(match permanent {
                Some(_) => EngineError::StateRejected {
                    what: "permanent (MainInit)",
                    rc,
                },
                None => EngineError::Libtpms { op: "MainInit", rc },
            });
        }
        if permanent.is_some() {
            callbacks::nv().clear_dirty();
        }
        Ok(Engine {
            version,
            resp_buf: ptr::null_mut(),
            resp_buf_size: 0,
            cmd_buf: Vec::new(),
            _not_send_sync: PhantomData,
        })
    }

    /// The TPM family this engine emulates.
    pub fn version(&self) -> TpmVersion {
        self.version
    }

    /// The engine's own error response: `TPM_RC_FAILURE` (TPM 2.0) or `TPM_FAIL` (TPM 1.2).
    pub fn error_response(&self) -> Vec<u8> {
        let family = match self.version {
            TpmVersion::Tpm2 => tpm_wire::Family::Tpm2,
            TpmVersion::Tpm12 => tpm_wire::Family::Tpm12,
        };
        tpm_wire::error_response(family, family.failure_code()).to_vec()
    }

    /// Runs one command and returns the response.
    ///
    /// Framing is expected to be validated by the caller; the engine still checks that
    /// `10 <= cmd.len() <= buffer_size()` and that libtpms' answer is a well-formed
    /// response whose size field matches, and otherwise returns
    /// [`Engine::error_response`]. Never panics.
    pub fn process(&mut self, cmd: &[u8]) -> Vec<u8> {
        let Ok(len) = u32::try_from(cmd.len()) else {
            return self.error_response();
        };
        if cmd.len() < HEADER_LEN || len > self.buffer_size() {
            return self.error_response();
        }
        self.cmd_buf.clear();
        self.cmd_buf.extend_from_slice(cmd);
        let mut resp_size = 0u32;
        // SAFETY: `resp_buf`/`resp_buf_size` are NULL/0 or a buffer libtpms (re)allocated
        // and described in an earlier call; `cmd_buf` holds `len` initialised bytes that
        // libtpms may read (and scribble on) during the call. Single thread (Engine is !Send).
        let rc = unsafe {
            sys::TPMLIB_Process(
                &mut self.resp_buf,
                &mut resp_size,
                &mut self.resp_buf_size,
                self.cmd_buf.as_mut_ptr(),
                len,
            )
        };
        self.cmd_buf.zeroize();
        if rc != sys::TPM_SUCCESS
            || self.resp_buf.is_null()
            || (resp_size as usize) < HEADER_LEN
            || resp_size > self.resp_buf_size
        {
            return self.error_response();
        }
        // SAFETY: non-NULL buffer of `resp_buf_size` bytes, of which libtpms wrote the
        // first `resp_size` (checked to be within the buffer above).
        let resp = unsafe { std::slice::from_raw_parts(self.resp_buf, resp_size as usize) };
        if tpm_wire::be_u32(resp, 2) != Some(resp_size) {
            return self.error_response();
        }
        resp.to_vec()
    }

    /// If libtpms stored new permanent state (`permall`) since the last call, returns the
    /// newest blob. Persist it to survive a restart; the manufacture done by
    /// `start(_, None, _)` counts as a change.
    pub fn take_dirty_permanent(&mut self) -> Option<Zeroizing<Vec<u8>>> {
        callbacks::nv().take_dirty_permanent()
    }

    fn get_state(
        &mut self,
        st: sys::TPMLIB_StateType,
        op: &'static str,
    ) -> Result<Zeroizing<Vec<u8>>, EngineError> {
        let mut buf: *mut u8 = ptr::null_mut();
        let mut len = 0u32;
        // SAFETY: valid out-pointers; the TPM is running on this thread.
        let rc = unsafe { sys::TPMLIB_GetState(st, &mut buf, &mut len) };
        // SAFETY: on return `buf` is NULL or a malloc'ed buffer of `len` bytes that the
        // caller owns (TPMLIB_GetState contract); on error libtpms leaves it NULL or owned.
        let out = unsafe { take_c_buffer(buf, len) };
        if rc != sys::TPM_SUCCESS {
            return Err(EngineError::Libtpms { op, rc });
        }
        Ok(out)
    }

    /// Snapshot of the permanent state of the running TPM (`TPMLIB_GetState(PERMANENT)`).
    /// Suitable for `Engine::start(version, Some(blob), None)`.
    pub fn permanent_state(&mut self) -> Result<Zeroizing<Vec<u8>>, EngineError> {
        let blob = self.get_state(
            sys::TPMLIB_StateType_TPMLIB_STATE_PERMANENT,
            "GetState(PERMANENT)",
        )?;
        if blob.is_empty() {
            return Err(EngineError::Libtpms {
                op: "GetState(PERMANENT) returned nothing",
                rc: sys::TPM_FAIL,
            });
        }
        Ok(blob)
    }

    /// Snapshot of the volatile (running) state (`TPMLIB_GetState(VOLATILE)`): loaded
    /// sessions, objects, PCRs. May be empty if libtpms has none (NULL pointer, length 0).
    pub fn volatile_state(&mut self) -> Result<Zeroizing<Vec<u8>>, EngineError> {
        self.get_state(
            sys::TPMLIB_StateType_TPMLIB_STATE_VOLATILE,
            "GetState(VOLATILE)",
        )
    }

    /// Sets the locality reported to libtpms for subsequent commands (0..=4 for TPM 2.0).
    pub fn set_locality(&mut self, loc: u8) {
        callbacks::LOCALITY.store(loc, Ordering::Relaxed);
    }

    /// The locality currently reported to libtpms.
    pub fn locality(&self) -> u8 {
        callbacks::LOCALITY.load(Ordering::Relaxed)
    }

    /// Sets the I/O buffer size libtpms advertises and enforces (`TPMLIB_SetBufferSize`);
    /// `wanted = 0` only queries. The request is clamped to the supported range.
    ///
    /// libtpms documents this as a pre-`MainInit` setting; in 0.9 it is a plain variable
    /// read per command for both TPM families, so changing it on a running engine affects
    /// the following commands (and what `TPM2_GetCapability` reports). Prefer calling it
    /// right after [`Engine::start`], before the guest sends commands.
    pub fn set_buffer_size(&mut self, wanted: u32) -> BufferSize {
        let (mut min, mut max) = (0u32, 0u32);
        // SAFETY: valid out-pointers; single thread.
        let size = unsafe { sys::TPMLIB_SetBufferSize(wanted, &mut min, &mut max) };
        BufferSize { size, min, max }
    }

    /// The I/O buffer size currently in effect.
    pub fn buffer_size(&self) -> u32 {
        // SAFETY: wanted = 0 only queries; NULL out-pointers are allowed.
        unsafe { sys::TPMLIB_SetBufferSize(0, ptr::null_mut(), ptr::null_mut()) }
    }

    /// Asks libtpms to cancel the command in progress (`TPMLIB_CancelCommand`). Because
    /// [`Engine::process`] is synchronous on this thread, this only matters to commands
    /// that poll for cancellation; libtpms clears the flag when the next command starts.
    pub fn cancel(&mut self) {
        // SAFETY: no arguments; sets a flag inside libtpms.
        unsafe { sys::TPMLIB_CancelCommand() };
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // SAFETY: this engine owns the running TPM; after Terminate no libtpms code refers
        // to the response buffer, which libtpms allocated with malloc/realloc and handed
        // to us. We wipe it before freeing because responses may carry secrets.
        unsafe {
            sys::TPMLIB_Terminate();
            if !self.resp_buf.is_null() {
                ptr::write_bytes(self.resp_buf, 0, self.resp_buf_size as usize);
                libc::free(self.resp_buf.cast());
            }
        }
        self.resp_buf = ptr::null_mut();
        self.resp_buf_size = 0;
        self.cmd_buf.zeroize();
        callbacks::nv().reset(false);
        callbacks::LOCALITY.store(0, Ordering::Relaxed);
        RUNNING.store(false, Ordering::Release);
    }
}
