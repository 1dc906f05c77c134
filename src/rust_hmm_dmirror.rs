// SPDX-License-Identifier: GPL-2.0

//! A Rust port of `lib/test_hmm.c`: a pseudo device that mirrors the
//! address space of the process that opens it through HMM, the way a GPU
//! driver would.
//!
//! `/dev/hmm_dmirror0` and `/dev/hmm_dmirror1` have device-private memory;
//! `/dev/hmm_dmirror2` and `/dev/hmm_dmirror3`, device-coherent memory, and
//! exist only when both `spm_addr_dev0` and `spm_addr_dev1` are given. The
//! ioctl ABI is upstream's (`uapi/hmm_dmirror_uapi.h`), so the upstream
//! `hmm-tests` drive this module as they drive `test_hmm.ko`.
//!
//! The driver reaches HMM only through the safe wrappers in [`hmm`].

use kernel::{
    c_str,
    miscdevice::{MiscDeviceOptions, MiscDeviceRegistration},
    prelude::*, //
};

pub mod hmm;
#[path = "../uapi/src/abi.rs"]
pub mod uapi;

mod device;
mod file;

use device::{Device, DeviceKind};

// The uapi crate encodes ioctl numbers by hand for userspace; check it
// against the kernel's own `_IOWR` for every command.
const _: () = {
    let mut nr = 0;
    while nr <= 9 {
        assert!(
            uapi::dmirror_iowr(nr) == kernel::ioctl::_IOWR::<uapi::HmmDmirrorCmd>(b'H' as u32, nr)
        );
        nr += 1;
    }
};
use file::DmirrorFile;

module! {
    type: DmirrorModule,
    name: "rust_hmm_dmirror",
    authors: ["Rust dmirror maintainers"],
    description: "HMM test driver (lib/test_hmm.c) in Rust",
    license: "GPL",
    params: {
        spm_addr_dev0: u64 {
            default: 0,
            description: "Start address of the special purpose memory of device 0. Setting it and spm_addr_dev1 adds the device-coherent devices 2 and 3.",
        },
        spm_addr_dev1: u64 {
            default: 0,
            description: "Start address of the special purpose memory of device 1. See spm_addr_dev0.",
        },
    },
}

const DEVICE_NAMES: [&CStr; device::MAX_DEVICES] = [
    c_str!("hmm_dmirror0"),
    c_str!("hmm_dmirror1"),
    c_str!("hmm_dmirror2"),
    c_str!("hmm_dmirror3"),
];

struct DmirrorModule {
    // Dropped first: no file can be opened once they are gone, and no file
    // is open while the module is being removed.
    _devices: KVec<Pin<KBox<MiscDeviceRegistration<DmirrorFile>>>>,
    _memory: DeviceMemory,
}

/// The device memory of every device, removed at module exit after the
/// devices (C's `dmirror_device_remove_chunks`).
struct DeviceMemory {
    _pools: hmm::PoolsRegistration,
}

impl DeviceMemory {
    /// Gives each device-private device its first chunk, as C does, and
    /// each device-coherent one its memory, if `coherent` gives the
    /// physical addresses of the two ranges.
    fn new(coherent: Option<[u64; 2]>) -> Result<Self> {
        // On failure, dropping the registration removes the chunks added.
        let memory = DeviceMemory {
            _pools: hmm::PoolsRegistration::new()?,
        };
        for id in 0..device::MAX_DEVICES {
            let pool = Device::by_id(id)?.pool()?;
            match (DeviceKind::of(id), coherent) {
                (DeviceKind::Private, _) => pool.add_chunk()?,
                // As C (lib/test_hmm.c, dmirror_allocate_chunk()), device 2
                // takes spm_addr_dev1 and device 3 spm_addr_dev0, the
                // reverse of their names; the upstream tests expect no
                // more than that the two differ.
                (DeviceKind::Coherent, Some(spm)) => {
                    pool.add_coherent_chunk(spm[3 - id]).inspect_err(|e| {
                        pr_err!(
                            "device {}: no coherent memory at {:#x}: {:?}\n",
                            id,
                            spm[3 - id],
                            e
                        )
                    })?
                }
                (DeviceKind::Coherent, None) => {}
            }
        }
        Ok(memory)
    }
}

impl kernel::Module for DmirrorModule {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let spm = [
            module_parameters::spm_addr_dev0.value(),
            module_parameters::spm_addr_dev1.value(),
        ];
        let coherent = spm[0] != 0 && spm[1] != 0;
        let memory = DeviceMemory::new(coherent.then_some(spm))?;
        let mut devices = KVec::new();
        for (id, name) in DEVICE_NAMES.iter().enumerate() {
            if DeviceKind::of(id) == DeviceKind::Coherent && !coherent {
                break;
            }
            let registration = KBox::pin_init(
                MiscDeviceRegistration::register(MiscDeviceOptions { name }),
                GFP_KERNEL,
            )?;
            devices.push(registration, GFP_KERNEL)?;
        }
        pr_info!("{} devices, coherent: {}\n", devices.len(), coherent);
        Ok(Self {
            _devices: devices,
            _memory: memory,
        })
    }
}
