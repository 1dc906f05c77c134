// SPDX-License-Identifier: GPL-2.0

//! Exclusive device access to anonymous pages (`make_device_exclusive`).
//!
//! C header: [`include/linux/rmap.h`](srctree/include/linux/rmap.h).

use super::{Mirror, MmapReadGuard};
use core::{marker::PhantomData, ptr::NonNull};
use kernel::{
    bindings,
    ffi::c_ulong,
    page::{PAGE_SHIFT, PAGE_SIZE},
    prelude::*, //
};

/// A page the device has exclusive access to, for a [`Mirror`]: the CPU
/// page table holds a device-exclusive entry for it, and a CPU access
/// takes it back (with an invalidation). Locked and referenced until
/// dropped; map it with
/// [`MirrorGuard::store_exclusive`](super::MirrorGuard::store_exclusive)
/// before dropping it.
///
/// # Invariants
///
/// `folio` is locked by us and we own a reference to it; `page` is a page
/// of `folio`, the one mapped at `index` (address >> `PAGE_SHIFT`) of
/// `mirror`'s address space, inside its interval. The mmap read lock of
/// the address space is held for `'a`.
pub struct ExclusivePage<'a> {
    page: NonNull<bindings::page>,
    folio: NonNull<bindings::folio>,
    mirror: &'a Mirror,
    index: usize,
    _lock: PhantomData<&'a MmapReadGuard<'a>>,
}

impl<'a> ExclusivePage<'a> {
    /// Makes the anonymous page at `addr` of `mirror`'s address space,
    /// whose mmap read lock `lock` is, exclusive to the device
    /// (`make_device_exclusive()`), faulting it in writable first. The
    /// `MMU_NOTIFY_EXCLUSIVE` invalidation this starts is the mirror's
    /// own: [`MirrorGuard::store_exclusive`](super::MirrorGuard::store_exclusive)
    /// checks that nothing else came after it. Not with the mirror's lock
    /// held, which that invalidation takes.
    pub fn make(lock: &'a MmapReadGuard<'_>, mirror: &'a Mirror, addr: usize) -> Result<Self> {
        if addr % PAGE_SIZE != 0
            || addr
                .checked_add(PAGE_SIZE)
                .is_none_or(|end| !mirror.covers(addr, end))
            || !mirror.mirrors(lock.mm())
        {
            return Err(EINVAL);
        }
        let mut folio: *mut bindings::folio = core::ptr::null_mut();
        // SAFETY: The mmap read lock of `mm` is held (`lock`); `folio` is a
        // valid place for the result. The owner is only compared.
        let page = unsafe {
            bindings::make_device_exclusive(
                lock.mm().as_raw(),
                addr as c_ulong,
                mirror.migration_owner().as_ptr(),
                &mut folio,
            )
        };
        let page = kernel::error::from_err_ptr(page)?;
        let (Some(page), Some(folio)) = (NonNull::new(page), NonNull::new(folio)) else {
            return Err(EFAULT);
        };
        // INVARIANT: On success the folio is locked and referenced for us,
        // and `page` is the page at `addr`, checked to lie in the mirror's
        // interval of the locked mm.
        Ok(Self {
            page,
            folio,
            mirror,
            index: addr >> PAGE_SHIFT,
            _lock: PhantomData,
        })
    }

    pub(super) fn page(&self) -> NonNull<bindings::page> {
        self.page
    }

    pub(super) fn mirror(&self) -> &Mirror {
        self.mirror
    }

    pub(super) fn index(&self) -> usize {
        self.index
    }
}

impl Drop for ExclusivePage<'_> {
    fn drop(&mut self) {
        // SAFETY: By the type invariant we hold the folio lock; given up here.
        unsafe { bindings::folio_unlock(self.folio.as_ptr()) };
        // SAFETY: By the type invariant we own a reference; given up here.
        unsafe { bindings::folio_put(self.folio.as_ptr()) };
    }
}
