//! The store's rollback counter: an NV counter index in the owner's range, authorised by a value
//! derived from the master secret. Defining, probing and incrementing it; the per-write
//! increment reuses one open handle and SRK-salted session (`CounterLink`).

use tss_esapi::{
    Context,
    attributes::{NvIndexAttributes, NvIndexAttributesBuilder, SessionAttributesBuilder},
    constants::{CapabilityType, NvIndexType, SessionType, response_code::Tss2ResponseCodeKind},
    handles::{NvIndexHandle, NvIndexTpmHandle, ObjectHandle, TpmHandle},
    interface_types::{
        algorithm::HashingAlgorithm,
        resource_handles::{NvAuth, Provision},
        session_handles::AuthSession,
    },
    structures::{Auth, CapabilityData, Digest, NvPublic, NvPublicBuilder},
};
use zeroize::Zeroizing;

use super::{CounterLink, HwTpm, HwTpmError, Result};

/// First handle of the range the manager defines its store counter in. `0x0180_0000..=0x01BF_FFFF`
/// is the owner's range in the TCG handle registry; `0x56` is "V".
pub const STORE_COUNTER_FIRST: u32 = 0x0180_5600;
/// How many handles from [`STORE_COUNTER_FIRST`] the manager may use (it takes the first free
/// one at provisioning; an earlier provisioning's index or another application's is skipped).
pub const STORE_COUNTER_SLOTS: u32 = 64;

/// What [`HwTpm::counter_probe`] found at a handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterProbe {
    /// No NV index is defined there.
    Missing,
    /// An NV index is defined there, but it is not a store counter of this manager: its public
    /// area differs from [`HwTpm::store_counter_public`], or it refuses the manager's
    /// authorisation value. The string says which.
    Foreign(String),
    /// The manager's counter, defined but never incremented (it has no value yet).
    Unwritten,
    /// The manager's counter and its value.
    Value(u64),
}

fn counter_value(b: &[u8]) -> Result<u64> {
    let b: [u8; 8] = b.try_into().map_err(|_| {
        HwTpmError::Unexpected(format!(
            "NV_Read of the store counter returned {} bytes",
            b.len()
        ))
    })?;
    Ok(u64::from_be_bytes(b))
}

fn is_kind(e: &tss_esapi::Error, kind: Tss2ResponseCodeKind) -> bool {
    matches!(e, tss_esapi::Error::Tss2Error(rc) if rc.kind() == Some(kind))
}

/// Attribute bits compared by [`HwTpm::counter_probe`]: everything but TPMA_NV_WRITTEN (and the
/// lock bits, which are state too; none is ever set on this index because it has no lock
/// attributes).
fn counter_attr_bits(a: NvIndexAttributes) -> Result<u32> {
    const WRITTEN: u32 = 1 << 29;
    const WRITELOCKED: u32 = 1 << 11;
    const READLOCKED: u32 = 1 << 28;
    let raw =
        tss_esapi::tss2_esys::TPMA_NV::try_from(a).map_err(HwTpmError::tpm("NV attributes"))?;
    Ok(raw & !(WRITTEN | WRITELOCKED | READLOCKED))
}

impl HwTpm {
    /// The public area of the manager's store counter at `handle`:
    ///
    /// * `TPM_NT_COUNTER`: the TPM only ever increments it, and a counter defined anew starts
    ///   above the largest value any counter of this TPM ever had, so deleting and re-creating
    ///   it never takes it backwards;
    /// * `AUTHWRITE`: only the holder of its authorisation value may increment it. That value is
    ///   derived from the master secret (`crate::store::StoreKeys`), so only a manager that
    ///   unsealed the master secret (a host in an approved state) can move it — the owner
    ///   cannot; anyone else incrementing it could only make the manager refuse to start;
    /// * `AUTHREAD` + `OWNERREAD`: the manager reads it with its authorisation value (which also
    ///   proves the index is its own); an administrator may read it with owner authorisation
    ///   (`tpm2_nvread -C o 0x…`) to cross-check `xl-vtpm mgr status`. The value is not secret;
    /// * `NO_DA`: the authorisation value is 256 random bits, so dictionary-attack protection
    ///   adds nothing, and a lockout caused by someone else must not stop the manager;
    /// * not `ORDERLY`: every increment reaches the TPM's NV at once. An orderly counter may
    ///   jump ahead after an unorderly shutdown, which would read as a rolled-back store;
    /// * nameAlg SHA-256, no policy, 8 bytes.
    ///
    /// The owner (with owner authorisation) can still delete it; the manager then refuses to
    /// start rather than trust an unprotected store.
    pub fn store_counter_public(handle: u32) -> Result<NvPublic> {
        let attrs = NvIndexAttributesBuilder::new()
            .with_nv_index_type(NvIndexType::Counter)
            .with_auth_write(true)
            .with_auth_read(true)
            .with_owner_read(true)
            .with_no_da(true)
            .build()
            .map_err(HwTpmError::tpm("NV counter attributes"))?;
        NvPublicBuilder::new()
            .with_nv_index(NvIndexTpmHandle::new(handle).map_err(|_| {
                HwTpmError::InvalidArgument(format!("{handle:#010x} is not an NV index handle"))
            })?)
            .with_index_name_algorithm(HashingAlgorithm::Sha256)
            .with_index_attributes(attrs)
            .with_index_auth_policy(Digest::default())
            .with_data_area_size(8)
            .build()
            .map_err(HwTpmError::tpm("NV counter template"))
    }

    /// The NV index handles defined in `first..first + count`.
    pub fn nv_indices_in(&mut self, first: u32, count: u32) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let end = u64::from(first) + u64::from(count);
        let mut next = first;
        loop {
            let (data, more) = self
                .ctx
                .execute_without_session(|ctx| {
                    ctx.get_capability(CapabilityType::Handles, next, count)
                })
                .map_err(HwTpmError::tpm("GetCapability(NV handles)"))?;
            let CapabilityData::Handles(list) = data else {
                return Err(HwTpmError::Unexpected(
                    "GetCapability(handles) returned other data".into(),
                ));
            };
            let handles: Vec<u32> = list.into_inner().into_iter().map(u32::from).collect();
            let Some(&last) = handles.last() else { break };
            out.extend(
                handles
                    .into_iter()
                    .filter(|h| u64::from(*h) >= u64::from(first) && u64::from(*h) < end),
            );
            if !more || u64::from(last) + 1 >= end {
                break;
            }
            next = last + 1;
        }
        Ok(out)
    }

    /// ESYS handle of the NV index at `handle` with `auth` set as its authorisation value.
    fn open_nv(&mut self, handle: u32, auth: &[u8]) -> Result<NvIndexHandle> {
        // ESYS keeps one object per TPM handle: TR_FromTPMPublic would return the kept link's
        // object, and closing it afterwards would leave the link dangling. Drop the link first
        // (the next `counter_bump` opens a new one).
        if self.counter_link.as_ref().is_some_and(|l| l.handle == handle) {
            self.drop_counter_link();
        }
        let tpm_handle = NvIndexTpmHandle::new(handle).map_err(|_| {
            HwTpmError::InvalidArgument(format!("{handle:#010x} is not an NV index handle"))
        })?;
        let obj = self
            .ctx
            .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::NvIndex(tpm_handle)))
            .map_err(HwTpmError::tpm("TR_FromTPMPublic(NV counter)"))?;
        let auth = Auth::try_from(auth.to_vec()).map_err(HwTpmError::tpm("NV counter auth"))?;
        if let Err(e) = self.ctx.tr_set_auth(obj, auth) {
            self.close_nv(obj.into());
            return Err(HwTpmError::Tpm {
                op: "TR_SetAuth(NV counter)",
                source: e,
            });
        }
        Ok(obj.into())
    }

    fn close_nv(&mut self, h: NvIndexHandle) {
        let mut obj: ObjectHandle = h.into();
        if let Err(e) = self.ctx.tr_close(&mut obj) {
            xvtpm_log::guest_warn!(error = %e, "failed to close an NV index handle");
        }
    }

    /// Runs `f` with the NV index at `handle` opened with `auth`, in an SRK-salted HMAC session
    /// (the authorisation value never crosses the TPM bus in the clear). The outer error is a
    /// failure to set up; the inner result is the command's own.
    fn with_nv_session<T>(
        &mut self,
        handle: u32,
        auth: &[u8],
        f: impl FnOnce(&mut Context, NvIndexHandle) -> tss_esapi::Result<T>,
    ) -> Result<tss_esapi::Result<T>> {
        let nv = self.open_nv(handle, auth)?;
        let sess = match self.start_salted_session(SessionType::Hmac) {
            Ok(s) => s,
            Err(e) => {
                self.close_nv(nv);
                return Err(e);
            }
        };
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .build();
        let res = match self.ctx.tr_sess_set_attributes(sess, attrs, mask) {
            Ok(()) => Ok(self.ctx.execute_with_session(Some(sess), |ctx| f(ctx, nv))),
            Err(e) => Err(HwTpmError::Tpm {
                op: "TRSess_SetAttributes",
                source: e,
            }),
        };
        self.flush_session(sess);
        self.close_nv(nv);
        res
    }

    /// Defines the manager's store counter at `handle` (owner authorisation; see
    /// [`HwTpm::store_counter_public`]) with authorisation value `auth` (≤ 32 bytes). The counter
    /// has no value until its first [`HwTpm::counter_increment`].
    pub fn counter_define(&mut self, handle: u32, auth: &[u8]) -> Result<()> {
        let public = Self::store_counter_public(handle)?;
        let auth = Auth::try_from(auth.to_vec()).map_err(HwTpmError::tpm("NV counter auth"))?;
        // The authorisation value is a command parameter: send it encrypted.
        let sess = self.start_salted_session(SessionType::Hmac)?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_continue_session(true)
            .build();
        let res = self
            .ctx
            .tr_sess_set_attributes(sess, attrs, mask)
            .map_err(HwTpmError::tpm("TRSess_SetAttributes"))
            .and_then(|()| {
                self.ctx
                    .execute_with_session(Some(sess), |ctx| {
                        ctx.nv_define_space(Provision::Owner, Some(auth), public)
                    })
                    .map_err(HwTpmError::tpm("NV_DefineSpace(store counter)"))
            });
        self.flush_session(sess);
        let nv = res?;
        self.close_nv(nv);
        Ok(())
    }

    /// Removes the NV index at `handle` (owner authorisation).
    pub fn counter_undefine(&mut self, handle: u32) -> Result<()> {
        let nv = self.open_nv(handle, &[])?;
        let res = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.nv_undefine_space(Provision::Owner, nv)
            })
            .map_err(HwTpmError::tpm("NV_UndefineSpace(store counter)"));
        if res.is_err() {
            self.close_nv(nv);
        }
        res
    }

    /// Increments the manager's counter at `handle` and returns its new value (read back in the
    /// same session).
    pub fn counter_increment(&mut self, handle: u32, auth: &[u8]) -> Result<u64> {
        let buf = self
            .with_nv_session(handle, auth, |ctx, nv| {
                ctx.nv_increment(NvAuth::NvIndex(nv), nv)?;
                ctx.nv_read(NvAuth::NvIndex(nv), nv, 8, 0)
            })?
            .map_err(HwTpmError::tpm("NV_Increment + NV_Read(store counter)"))?;
        counter_value(buf.value())
    }

    /// Flushes the kept counter session and closes the kept counter handle, if any.
    pub(super) fn drop_counter_link(&mut self) {
        if let Some(l) = self.counter_link.take() {
            self.flush_session(l.sess);
            self.close_nv(l.nv);
        }
    }

    /// Increments the manager's counter at `handle` — one `TPM2_NV_Increment`, in an SRK-salted
    /// HMAC session that stays open between calls (the authorisation value never crosses the
    /// TPM bus in the clear, as with [`HwTpm::counter_increment`]). It does not read the value
    /// back: the caller knows it (only the holder of `auth`, the manager under its instance
    /// lock, moves this counter; should anyone else, the store and the counter disagree and the
    /// next start refuses the store). On an error the session and handle are dropped, so the
    /// next call starts afresh; whether the increment happened is then unknown, and the caller
    /// must look ([`HwTpm::counter_probe`]).
    pub fn counter_bump(&mut self, handle: u32, auth: &[u8]) -> Result<()> {
        if self.counter_link.as_ref().is_some_and(|l| l.handle != handle || l.auth[..] != *auth) {
            self.drop_counter_link();
        }
        if self.counter_link.is_none() {
            let nv = self.open_nv(handle, auth)?;
            let sess = match self.hmac_session() {
                Ok(s) => s,
                Err(e) => {
                    self.close_nv(nv);
                    return Err(e);
                }
            };
            self.counter_link = Some(CounterLink { handle, auth: Zeroizing::new(auth.to_vec()), nv, sess });
        }
        let (nv, sess) = {
            let l = self.counter_link.as_ref().expect("set above");
            (l.nv, l.sess)
        };
        let res = self.ctx.execute_with_session(Some(sess), |ctx| ctx.nv_increment(NvAuth::NvIndex(nv), nv));
        if let Err(e) = res {
            self.drop_counter_link();
            return Err(HwTpmError::Tpm { op: "NV_Increment(store counter)", source: e });
        }
        Ok(())
    }

    /// Does the NV index at `handle` (which must exist) have the public area of
    /// [`HwTpm::store_counter_public`]? `Some(why)` if not.
    pub fn counter_template_mismatch(&mut self, handle: u32) -> Result<Option<String>> {
        let want = Self::store_counter_public(handle)?;
        let nv = self.open_nv(handle, &[])?;
        let public = self
            .ctx
            .execute_without_session(|ctx| ctx.nv_read_public(nv))
            .map_err(HwTpmError::tpm("NV_ReadPublic(store counter)"));
        self.close_nv(nv);
        let (public, _name) = public?;
        if public.name_algorithm() != want.name_algorithm()
            || counter_attr_bits(public.attributes())? != counter_attr_bits(want.attributes())?
            || !public.authorization_policy().value().is_empty()
            || public.data_size() != 8
        {
            return Ok(Some(format!(
                "its public area is not the manager's counter template (nameAlg {:?}, attributes {:#010x}, policy of {} bytes, {} bytes of data)",
                public.name_algorithm(),
                tss_esapi::tss2_esys::TPMA_NV::try_from(public.attributes()).unwrap_or(0),
                public.authorization_policy().value().len(),
                public.data_size()
            )));
        }
        Ok(None)
    }

    /// Looks at `handle`: is it the manager's counter (the public area of
    /// [`HwTpm::store_counter_public`] and authorisation value `auth`), and what is its value?
    pub fn counter_probe(&mut self, handle: u32, auth: &[u8]) -> Result<CounterProbe> {
        if !self.nv_indices_in(handle, 1)?.contains(&handle) {
            return Ok(CounterProbe::Missing);
        }
        if let Some(why) = self.counter_template_mismatch(handle)? {
            return Ok(CounterProbe::Foreign(why));
        }
        match self.with_nv_session(handle, auth, |ctx, nv| {
            ctx.nv_read(NvAuth::NvIndex(nv), nv, 8, 0)
        })? {
            Ok(buf) => Ok(CounterProbe::Value(counter_value(buf.value())?)),
            // Authorisation is checked before the written state, so this is the manager's own.
            Err(e) if is_kind(&e, Tss2ResponseCodeKind::NvUninitialized) => {
                Ok(CounterProbe::Unwritten)
            }
            Err(e)
                if is_kind(&e, Tss2ResponseCodeKind::AuthFail)
                    || is_kind(&e, Tss2ResponseCodeKind::BadAuth) =>
            {
                Ok(CounterProbe::Foreign(
                    "it does not accept the manager's authorisation value".into(),
                ))
            }
            Err(e) => Err(HwTpmError::Tpm {
                op: "NV_Read(store counter)",
                source: e,
            }),
        }
    }
}
