// SPDX-License-Identifier: GPL-2.0

//! The pseudo devices: which one a file was opened on, its kind, and its
//! device memory.

use crate::hmm::{
    Collected, CpuFault, Destination, DevicePool, FaultError, Migration, Owner, Pagemap,
    PagemapOps, Source, SystemPage, FOLIO_PAGES,
};
use core::sync::atomic::{AtomicU64, Ordering};
use kernel::{miscdevice::MiscDeviceRegistration, page::PAGE_SIZE, prelude::*};

/// The number of devices, as in C.
pub(crate) const MAX_DEVICES: usize = 4;

/// `HMM_DMIRROR_FLAG_FAIL_ALLOC`: the next device page allocation fails.
pub(crate) const FLAG_FAIL_ALLOC: u64 = crate::uapi::HMM_DMIRROR_FLAG_FAIL_ALLOC;

/// Consumes a pending `FLAG_FAIL_ALLOC` in `flags`: whether this
/// allocation is to fail. Asked once per page, so it reads before it
/// writes.
pub(crate) fn take_fail_alloc(flags: &AtomicU64) -> bool {
    flags.load(Ordering::Relaxed) & FLAG_FAIL_ALLOC != 0
        && flags.fetch_and(!FLAG_FAIL_ALLOC, Ordering::Relaxed) & FLAG_FAIL_ALLOC != 0
}

/// The kind of device memory a device has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeviceKind {
    /// Devices 0 and 1.
    Private,
    /// Devices 2 and 3.
    Coherent,
}

impl DeviceKind {
    /// The kind of device `id`, as `lib/test_hmm.c` assigns it.
    pub(crate) fn of(id: usize) -> Self {
        if id < 2 {
            DeviceKind::Private
        } else {
            DeviceKind::Coherent
        }
    }
}

/// One static per device: its address is the device's identity as the
/// owner of its pages, of its faults and of its migrations back to system
/// memory. Migrations to the device are owned by the mirror that starts
/// them (`Migration::to_device`).
struct OwnerTag(#[allow(dead_code)] u8);
static OWNER_TAGS: [OwnerTag; MAX_DEVICES] = [OwnerTag(0), OwnerTag(1), OwnerTag(2), OwnerTag(3)];
/// A device, as a file opened on it sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Device {
    id: usize,
}

impl Device {
    /// The device `misc` registers. Devices are told apart by the number
    /// their name ends with, as C names them `hmm_dmirror%u`.
    pub(crate) fn of<T: kernel::miscdevice::MiscDevice>(
        misc: &MiscDeviceRegistration<T>,
    ) -> Result<Self> {
        let name = misc.device().name().to_bytes();
        let id = match name.last() {
            Some(digit @ b'0'..=b'9') => usize::from(digit - b'0'),
            _ => return Err(ENODEV),
        };
        Self::by_id(id)
    }

    /// Device number `id`.
    pub(crate) fn by_id(id: usize) -> Result<Self> {
        if id >= MAX_DEVICES {
            return Err(ENODEV);
        }
        Ok(Self { id })
    }

    /// The owner of this device's pages and of its migrations back to
    /// system memory.
    pub(crate) fn owner(&self) -> Owner {
        Owner::of(&OWNER_TAGS[self.id])
    }

    /// The device memory of this device.
    pub(crate) fn pool(&self) -> Result<DevicePool> {
        DevicePool::new(self.id, self.owner(), &DEVMEM_OPS)
    }
}

/// What the devices do for their device pages.
struct DevmemOps;
static DEVMEM_OPS: DevmemOps = DevmemOps;

impl PagemapOps for DevmemOps {
    /// A CPU fault on a device page: migrate that page back to system
    /// memory (C's `dmirror_devmem_fault`). The invalidation this starts
    /// drops the page from every mirror that maps it.
    fn migrate_to_ram(&self, pagemap: &Pagemap, fault: &CpuFault<'_>) -> Result<(), FaultError> {
        // A large folio mapped by a PMD moves back whole; once mapped by
        // PTEs it may be partly split already: just the page.
        let order = if fault.is_pte() {
            0
        } else {
            fault.folio_order()
        };
        let size = PAGE_SIZE << order;
        let start = fault.address() & !(size - 1);
        let mut migration =
            Migration::setup_fault(fault, start, start + size, order > 0, pagemap.owner())
                .map_err(|_| FaultError::Sigbus)?;
        copy_to_system(&mut migration, None).map_err(|_| FaultError::Oom)?;
        migration.pages().finalize();
        Ok(())
    }
}

/// Gives every device folio collected by `migration` new system memory
/// with its data (C's `dmirror_devmem_fault_alloc_and_copy`): a large
/// folio for a large one, or small pages when there is none, which splits
/// the device folio. A one-shot `FLAG_FAIL_ALLOC` in `flags` fails the
/// first allocation: a large one falls back to small pages, a small one
/// fails the migration with `ENOMEM`.
pub(crate) fn copy_to_system(migration: &mut Collected<'_>, flags: Option<&AtomicU64>) -> Result {
    for index in 0..migration.len() {
        let writable = migration.is_writable(index);
        let compound = migration.is_compound(index);
        let Source::Device(device) = migration.source(index) else {
            continue;
        };
        let failed = flags.is_some_and(take_fail_alloc);
        if failed && !compound {
            return Err(ENOMEM);
        }
        let large = if compound && !failed {
            migration.alloc_system_folio(index).ok()
        } else {
            None
        };
        // One page or folio, the common case, without a vector: `device`
        // borrows `migration` only until the copy.
        let single = match large {
            Some(mut folio) => {
                folio.copy_from_device(&device);
                Some(folio)
            }
            None if !compound => Some(SystemPage::alloc_copy_of(&device, 0)?),
            None => None,
        };
        if let Some(page) = single {
            migration.set_destination(index, Destination::System(page), writable)?;
            continue;
        }
        let nr = FOLIO_PAGES.min(migration.len() - index);
        let mut pages = KVec::with_capacity(nr, GFP_KERNEL)?;
        for i in 0..nr {
            pages.push(SystemPage::alloc_copy_of(&device, i)?, GFP_KERNEL)?;
        }
        for (i, page) in pages.into_iter().enumerate() {
            migration.set_destination(index + i, Destination::System(page), writable)?;
        }
    }
    Ok(())
}
