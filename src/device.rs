// SPDX-License-Identifier: GPL-2.0

//! The pseudo devices: which one a file was opened on, and its kind.

use crate::hmm::Owner;
use kernel::{miscdevice::MiscDeviceRegistration, prelude::*};

/// The number of devices, as in C.
pub(crate) const MAX_DEVICES: usize = 4;

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
/// owner of its pages and of its migrations.
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
        if id >= MAX_DEVICES {
            return Err(ENODEV);
        }
        Ok(Self { id })
    }

    /// The owner of this device's pages and migrations.
    pub(crate) fn owner(&self) -> Owner {
        Owner::of(&OWNER_TAGS[self.id])
    }
}
