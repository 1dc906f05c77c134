// SPDX-License-Identifier: GPL-2.0

//! Exclusive device access to anonymous pages (`make_device_exclusive`).
//!
//! C header: [`include/linux/rmap.h`](srctree/include/linux/rmap.h).

use super::{MmapReadGuard, Owner};
use core::{marker::PhantomData, ptr::NonNull};
use kernel::{bindings, ffi::c_ulong, prelude::*};

/// A page the device has exclusive access to: the CPU page table holds a
/// device-exclusive entry for it, and a CPU access takes it back (with an
/// invalidation). Locked and referenced until dropped; program the device
/// (map the page) before dropping it.
///
/// # Invariants
///
/// `folio` is locked by us and we own a reference to it; `page` is a page
/// of `folio`. The mmap read lock of the address space is held for `'a`.
pub struct ExclusivePage<'a> {
    page: NonNull<bindings::page>,
    folio: NonNull<bindings::folio>,
    _lock: PhantomData<&'a MmapReadGuard<'a>>,
}

impl<'a> ExclusivePage<'a> {
    /// Makes the anonymous page at `addr` of `lock`'s address space
    /// exclusive to the device (`make_device_exclusive()`), faulting it in
    /// writable first. `owner` is given to the `MMU_NOTIFY_EXCLUSIVE`
    /// invalidation this starts.
    pub fn make(lock: &'a MmapReadGuard<'_>, addr: usize, owner: Option<Owner>) -> Result<Self> {
        let mut folio: *mut bindings::folio = core::ptr::null_mut();
        // SAFETY: The mmap read lock of `mm` is held (`lock`); `folio` is a
        // valid place for the result.
        let page = unsafe {
            bindings::make_device_exclusive(
                lock.mm().as_raw(),
                addr as c_ulong,
                owner.map_or(core::ptr::null_mut(), Owner::as_ptr),
                &mut folio,
            )
        };
        let page = kernel::error::from_err_ptr(page)?;
        let (Some(page), Some(folio)) = (NonNull::new(page), NonNull::new(folio)) else {
            return Err(EFAULT);
        };
        // INVARIANT: On success the folio is locked and referenced for us.
        Ok(Self {
            page,
            folio,
            _lock: PhantomData,
        })
    }

    pub(super) fn page(&self) -> NonNull<bindings::page> {
        self.page
    }
}

impl Drop for ExclusivePage<'_> {
    fn drop(&mut self) {
        // SAFETY: By the type invariant we hold the folio lock and a
        // reference; both are given up here.
        unsafe {
            bindings::folio_unlock(self.folio.as_ptr());
            bindings::put_page(self.page.as_ptr());
        }
    }
}
