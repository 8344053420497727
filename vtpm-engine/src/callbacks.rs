//! libtpms callbacks and the process-global state they operate on.
//!
//! libtpms callbacks are plain C function pointers without a user-data argument, so the
//! NVRAM contents and the current locality live in process globals. Every callback body
//! runs inside [`guarded`], which turns a Rust panic into `TPM_FAIL` instead of unwinding
//! across the FFI boundary, and every lock recovers from poisoning.

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_uchar};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use libtpms_sys::{
    TPM_BOOL, TPM_FAIL, TPM_MODIFIER_INDICATOR, TPM_PERMANENT_ALL_NAME, TPM_RESULT, TPM_RETRY,
    TPM_SUCCESS, libtpms_callbacks,
};
use zeroize::Zeroizing;

/// In-memory NVRAM served to libtpms through the `tpm_nvram_*` callbacks.
pub(crate) struct NvStore {
    /// Blobs by libtpms name (`permall`, `volatilestate`, `savestate`), without the NUL.
    blobs: BTreeMap<Vec<u8>, Zeroizing<Vec<u8>>>,
    /// Set whenever libtpms stores `permall`; cleared by [`NvStore::take_dirty_permanent`].
    permanent_dirty: bool,
    /// When set, a missing `permall` is reported as `TPM_FAIL` instead of `TPM_RETRY`, so
    /// libtpms can never take its "no state yet → manufacture" path.
    forbid_manufacture: bool,
}

impl NvStore {
    /// Drops (and zeroizes) everything and sets the manufacture policy.
    pub(crate) fn reset(&mut self, forbid_manufacture: bool) {
        self.blobs.clear();
        self.permanent_dirty = false;
        self.forbid_manufacture = forbid_manufacture;
    }

    /// Seeds the permanent-state blob that `tpm_nvram_loaddata("permall")` hands out.
    pub(crate) fn set_permanent(&mut self, blob: &[u8]) {
        self.blobs
            .insert(permall().to_vec(), Zeroizing::new(blob.to_vec()));
    }

    /// Clears the dirty flag without returning the blob.
    pub(crate) fn clear_dirty(&mut self) {
        self.permanent_dirty = false;
    }

    /// Returns a copy of `permall` if libtpms stored it since the last call.
    pub(crate) fn take_dirty_permanent(&mut self) -> Option<Zeroizing<Vec<u8>>> {
        if !std::mem::take(&mut self.permanent_dirty) {
            return None;
        }
        self.blobs
            .get(permall())
            .map(|b| Zeroizing::new(b.as_slice().to_vec()))
    }
}

static NV: Mutex<NvStore> = Mutex::new(NvStore {
    blobs: BTreeMap::new(),
    permanent_dirty: false,
    forbid_manufacture: false,
});

/// Locality reported through `tpm_io_getlocality`.
pub(crate) static LOCALITY: AtomicU8 = AtomicU8::new(0);

/// Locks the NV store, recovering from a poisoned mutex (the data is still consistent:
/// every mutation is a single map or flag operation).
pub(crate) fn nv() -> MutexGuard<'static, NvStore> {
    NV.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `permall` without its terminating NUL.
fn permall() -> &'static [u8] {
    let name: &'static [u8] = TPM_PERMANENT_ALL_NAME;
    &name[..name.len() - 1]
}

/// Runs a callback body, mapping a panic to `TPM_FAIL`.
fn guarded(f: impl FnOnce() -> TPM_RESULT) -> TPM_RESULT {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(TPM_FAIL)
}

/// Reads the callback's `name` argument.
///
/// # Safety
/// `name` must be NULL or point to a NUL-terminated string valid for the call.
unsafe fn name_bytes<'a>(name: *const c_char) -> Option<&'a [u8]> {
    if name.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's contract (libtpms passes one of
    // its static TPM_*_NAME strings).
    Some(unsafe { CStr::from_ptr(name) }.to_bytes())
}

unsafe extern "C" fn nvram_init() -> TPM_RESULT {
    TPM_SUCCESS
}

unsafe extern "C" fn nvram_loaddata(
    data: *mut *mut c_uchar,
    length: *mut u32,
    _tpm_number: u32,
    name: *const c_char,
) -> TPM_RESULT {
    guarded(|| {
        if data.is_null() || length.is_null() {
            return TPM_FAIL;
        }
        // SAFETY: libtpms passes a NUL-terminated name that outlives the call.
        let Some(name) = (unsafe { name_bytes(name) }) else {
            return TPM_FAIL;
        };
        let store = nv();
        let Some(blob) = store.blobs.get(name) else {
            return if name == permall() && store.forbid_manufacture {
                TPM_FAIL
            } else {
                TPM_RETRY
            };
        };
        let Ok(len) = u32::try_from(blob.len()) else {
            return TPM_FAIL;
        };
        // libtpms releases this buffer with free(), so it must come from malloc.
        // SAFETY: plain allocation; at least one byte so that NULL always means failure.
        let buf = unsafe { libc::malloc(blob.len().max(1)) }.cast::<u8>();
        if buf.is_null() {
            return TPM_FAIL;
        }
        // SAFETY: `buf` has room for `blob.len()` bytes and does not overlap `blob`;
        // `data` and `length` are non-NULL out-pointers provided by libtpms.
        unsafe {
            ptr::copy_nonoverlapping(blob.as_ptr(), buf, blob.len());
            *data = buf;
            *length = len;
        }
        TPM_SUCCESS
    })
}

unsafe extern "C" fn nvram_storedata(
    data: *const c_uchar,
    length: u32,
    _tpm_number: u32,
    name: *const c_char,
) -> TPM_RESULT {
    guarded(|| {
        // SAFETY: libtpms passes a NUL-terminated name that outlives the call.
        let Some(name) = (unsafe { name_bytes(name) }) else {
            return TPM_FAIL;
        };
        let blob = if length == 0 {
            Vec::new()
        } else if data.is_null() {
            return TPM_FAIL;
        } else {
            // SAFETY: libtpms guarantees `data` points to `length` readable bytes for the
            // duration of the call; we copy them and do not keep (or free) the pointer.
            unsafe { std::slice::from_raw_parts(data, length as usize) }.to_vec()
        };
        let mut store = nv();
        if name == permall() {
            store.permanent_dirty = true;
        }
        store.blobs.insert(name.to_vec(), Zeroizing::new(blob));
        TPM_SUCCESS
    })
}

unsafe extern "C" fn nvram_deletename(
    _tpm_number: u32,
    name: *const c_char,
    must_exist: TPM_BOOL,
) -> TPM_RESULT {
    guarded(|| {
        // SAFETY: libtpms passes a NUL-terminated name that outlives the call.
        let Some(name) = (unsafe { name_bytes(name) }) else {
            return TPM_FAIL;
        };
        match nv().blobs.remove(name) {
            None if must_exist != 0 => TPM_FAIL,
            _ => TPM_SUCCESS,
        }
    })
}

unsafe extern "C" fn io_init() -> TPM_RESULT {
    TPM_SUCCESS
}

unsafe extern "C" fn io_getlocality(
    locality: *mut TPM_MODIFIER_INDICATOR,
    _tpm_number: u32,
) -> TPM_RESULT {
    if locality.is_null() {
        return TPM_FAIL;
    }
    // SAFETY: non-NULL out-pointer provided by libtpms for the duration of the call.
    unsafe { *locality = TPM_MODIFIER_INDICATOR::from(LOCALITY.load(Ordering::Relaxed)) };
    TPM_SUCCESS
}

unsafe extern "C" fn io_getphysicalpresence(
    physical_presence: *mut TPM_BOOL,
    _tpm_number: u32,
) -> TPM_RESULT {
    if physical_presence.is_null() {
        return TPM_FAIL;
    }
    // SAFETY: non-NULL out-pointer provided by libtpms for the duration of the call.
    unsafe { *physical_presence = 0 };
    TPM_SUCCESS
}

/// The full callback table (libtpms copies it on registration).
pub(crate) fn table() -> libtpms_callbacks {
    libtpms_callbacks {
        sizeOfStruct: std::mem::size_of::<libtpms_callbacks>() as std::ffi::c_int,
        tpm_nvram_init: Some(nvram_init),
        tpm_nvram_loaddata: Some(nvram_loaddata),
        tpm_nvram_storedata: Some(nvram_storedata),
        tpm_nvram_deletename: Some(nvram_deletename),
        tpm_io_init: Some(io_init),
        tpm_io_getlocality: Some(io_getlocality),
        tpm_io_getphysicalpresence: Some(io_getphysicalpresence),
    }
}
