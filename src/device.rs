// SPDX-License-Identifier: GPL-2.0

//! The pseudo devices: which one a file was opened on, its kind, and its
//! device-private memory.

use crate::hmm::{
    Collected, CpuFault, Destination, DevicePool, FaultError, Migration, Owner, Pagemap,
    PagemapOps, Source, SystemPage,
};
use core::sync::atomic::{AtomicU64, Ordering};
use kernel::{miscdevice::MiscDeviceRegistration, page::PAGE_SIZE, prelude::*};

/// The number of devices, as in C.
pub(crate) const MAX_DEVICES: usize = 4;

/// `HMM_DMIRROR_FLAG_FAIL_ALLOC`: the next device page allocation fails.
pub(crate) const FLAG_FAIL_ALLOC: u64 = crate::uapi::HMM_DMIRROR_FLAG_FAIL_ALLOC;

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
/// memory. Migrations to the device are owned by the file that starts
/// them (see `FileMirrorOps`).
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

    /// The kind of this device.
    pub(crate) fn kind(&self) -> DeviceKind {
        DeviceKind::of(self.id)
    }

    /// The owner of this device's pages and of its migrations back to
    /// system memory.
    pub(crate) fn owner(&self) -> Owner {
        Owner::of(&OWNER_TAGS[self.id])
    }

    /// The device-private memory of this device; `EOPNOTSUPP` for the
    /// device-coherent devices, which this port does not support yet.
    pub(crate) fn pool(&self) -> Result<DevicePool> {
        if self.kind() != DeviceKind::Private {
            return Err(EOPNOTSUPP);
        }
        DevicePool::new(self.id, self.owner(), &DEVMEM_OPS)
    }
}

/// What the devices do for their device-private pages.
struct DevmemOps;
static DEVMEM_OPS: DevmemOps = DevmemOps;

impl PagemapOps for DevmemOps {
    /// A CPU fault on a device page: migrate that page back to system
    /// memory (C's `dmirror_devmem_fault`). The invalidation this starts
    /// drops the page from every mirror that maps it.
    fn migrate_to_ram(&self, pagemap: &Pagemap, fault: &CpuFault<'_>) -> Result<(), FaultError> {
        let start = fault.address() & !(PAGE_SIZE - 1);
        let mut migration =
            Migration::setup_fault(fault, start, start + PAGE_SIZE, pagemap.owner())
                .map_err(|_| FaultError::Sigbus)?;
        copy_to_system(&mut migration, None).map_err(|_| FaultError::Oom)?;
        migration.pages().finalize();
        Ok(())
    }
}

/// Gives every device page collected by `migration` a new system page with
/// its data (C's `dmirror_devmem_fault_alloc_and_copy`, small pages only).
/// A one-shot `FLAG_FAIL_ALLOC` in `flags` fails the first allocation.
pub(crate) fn copy_to_system(migration: &mut Collected<'_>, flags: Option<&AtomicU64>) -> Result {
    for index in 0..migration.len() {
        let writable = migration.is_writable(index);
        let page = match migration.source(index) {
            Source::Device(device) => {
                if let Some(flags) = flags {
                    if flags.fetch_and(!FLAG_FAIL_ALLOC, Ordering::Relaxed) & FLAG_FAIL_ALLOC != 0 {
                        return Err(ENOMEM);
                    }
                }
                let mut page = SystemPage::alloc()?;
                page.copy_from_device(&device);
                page
            }
            _ => continue,
        };
        migration.set_destination(index, Destination::System(page), writable)?;
    }
    Ok(())
}
