// SPDX-License-Identifier: GPL-2.0

//! Device memory pools: the [`Pagemap`]s of each device, allocated on
//! demand.

use super::{
    pagemap::{DevicePage, Pagemap, PagemapOps},
    Owner,
};
use core::sync::atomic::{AtomicU8, Ordering};
use kernel::{prelude::*, sync::Arc};

/// The most pools (devices) there can be.
pub const MAX_POOLS: usize = 4;

kernel::sync::global_lock! {
    // SAFETY: `init_pools` initializes it once, before any use: every use
    // goes through `pools()`, which checks that it was initialized.
    unsafe(uninit) static POOLS: Mutex<[KVec<Arc<Pagemap>>; MAX_POOLS]> =
        [KVec::new(), KVec::new(), KVec::new(), KVec::new()];
}

const UNINIT: u8 = 0;
const INITIALIZING: u8 = 1;
const READY: u8 = 2;
static POOLS_STATE: AtomicU8 = AtomicU8::new(UNINIT);

/// Sets up the pools of this module. Call it once from module init; later
/// calls do nothing.
pub fn init_pools() {
    if POOLS_STATE
        .compare_exchange(UNINIT, INITIALIZING, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        // SAFETY: The state machine lets exactly one caller get here, and
        // nobody uses the lock before `READY` is published below.
        unsafe { POOLS.init() };
        POOLS_STATE.store(READY, Ordering::Release);
    }
}

fn pools() -> Result<kernel::sync::GlobalGuard<POOLS>> {
    if POOLS_STATE.load(Ordering::Acquire) != READY {
        return Err(EINVAL);
    }
    Ok(POOLS.lock())
}

/// The device-private memory of one device: [`Pagemap`]s of
/// [`CHUNK_SIZE`](super::CHUNK_SIZE) bytes, all with the device's owner,
/// added when the ones there are full (C's `devmem_chunks`).
#[derive(Clone, Copy)]
pub struct DevicePool {
    id: usize,
    owner: Owner,
    ops: &'static dyn PagemapOps,
}

impl DevicePool {
    /// The pool number `id`, whose pagemaps belong to `owner` and send
    /// their faults to `ops`. [`init_pools`] must have run.
    pub fn new(id: usize, owner: Owner, ops: &'static dyn PagemapOps) -> Result<Self> {
        if id >= MAX_POOLS {
            return Err(EINVAL);
        }
        Ok(Self { id, owner, ops })
    }

    /// Adds a pagemap for small pages to the pool.
    pub fn add_chunk(&self) -> Result {
        let mut pools = pools()?;
        self.add_locked(&mut pools[self.id], false).map(|_| ())
    }

    fn add_locked<'a>(
        &self,
        chunks: &'a mut KVec<Arc<Pagemap>>,
        large_folios: bool,
    ) -> Result<&'a Arc<Pagemap>> {
        chunks.reserve(1, GFP_KERNEL)?;
        let pagemap = Pagemap::new(self.owner, self.ops, large_folios)?;
        let count = chunks.len() + 1;
        pr_info!(
            "added new {} MB chunk (total {} chunks, {} MB)\n",
            super::CHUNK_SIZE >> 20,
            count,
            count * (super::CHUNK_SIZE >> 20)
        );
        chunks.push(pagemap, GFP_KERNEL)?;
        chunks.last().ok_or(ENOMEM)
    }

    /// The pool's allocator, with the pools' lock held until it is
    /// dropped: a migration takes it once per window, not once per page.
    pub fn allocator(&self) -> Result<PoolAllocator<'_>> {
        Ok(PoolAllocator {
            pool: self,
            pools: pools()?,
        })
    }

    /// Migrates every device page of the pool back to system memory, as C
    /// does when a file is released.
    pub fn evict(&self) {
        let Ok(pools) = pools() else {
            return;
        };
        for chunk in pools[self.id].iter() {
            chunk.evict();
        }
    }

    /// Removes every pagemap of the pool: evicts its pages, unmaps it and
    /// releases its address range (C's `dmirror_device_remove_chunks`).
    /// Later allocations add new ones.
    pub fn remove_chunks(&self) {
        let chunks = match pools() {
            Ok(mut pools) => core::mem::take(&mut pools[self.id]),
            Err(_) => return,
        };
        // Dropped without the lock: an allocation that holds a page of one
        // of them, and waits for the lock, must be able to go on, or the
        // pagemap would wait for that page for ever.
        drop(chunks);
    }
}

/// Allocations from a [`DevicePool`], with the lock of all pools held.
pub struct PoolAllocator<'a> {
    pool: &'a DevicePool,
    pools: kernel::sync::GlobalGuard<POOLS>,
}

impl PoolAllocator<'_> {
    /// Allocates a device page, adding a pagemap when all are full.
    pub fn alloc_page(&mut self) -> Result<DevicePage> {
        self.alloc(false)
    }

    /// Allocates a large (PMD-sized) device folio, adding a pagemap when
    /// all are full.
    pub fn alloc_folio(&mut self) -> Result<DevicePage> {
        self.alloc(true)
    }

    fn alloc(&mut self, large: bool) -> Result<DevicePage> {
        let alloc = |chunk: &Pagemap| {
            if large {
                chunk.alloc_folio()
            } else {
                chunk.alloc_page()
            }
        };
        let chunks = &mut self.pools[self.pool.id];
        // `ENOSPC`: that pagemap is full, try the next one. Any other
        // error (no memory for the backing pages) would be the same with
        // a new pagemap.
        for chunk in chunks.iter() {
            match alloc(chunk) {
                Err(e) if e == ENOSPC => {}
                result => return result,
            }
        }
        alloc(self.pool.add_locked(chunks, large)?)
            .map_err(|e| if e == ENOSPC { ENOMEM } else { e })
    }
}
