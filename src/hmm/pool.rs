// SPDX-License-Identifier: GPL-2.0

//! Device memory pools: the [`Pagemap`]s of each device. Device-private
//! pools grow on demand; a device-coherent pool is its one fixed range.

use super::{
    pagemap::{DevicePage, MemoryKind, Pagemap, PagemapOps},
    Owner,
};
use core::sync::atomic::{AtomicU8, Ordering};
use kernel::{prelude::*, sync::Arc};

/// The most pools (devices) there can be.
pub const MAX_POOLS: usize = 4;

/// The pagemaps of every pool, while [`PoolsRegistration`] lives.
struct Pools {
    chunks: [KVec<Arc<Pagemap>>; MAX_POOLS],
    /// Pagemaps taken out of their pool whose pages were still in use:
    /// removed at the next [`DevicePool::remove_chunks`] that finds them
    /// unused, or when the registration goes.
    retiring: KVec<Arc<Pagemap>>,
    /// Whether the registration lives. Checked under the lock, so that
    /// nothing adds a pagemap after the registration took them all.
    open: bool,
}

kernel::sync::global_lock! {
    // SAFETY: `PoolsRegistration::new` initializes it once, before any
    // use: every use goes through `pools()`, which checks that it was.
    unsafe(uninit) static POOLS: Mutex<Pools> = Pools {
        chunks: [KVec::new(), KVec::new(), KVec::new(), KVec::new()],
        retiring: KVec::new(),
        open: false,
    };
}

const UNINIT: u8 = 0;
const INITIALIZING: u8 = 1;
const READY: u8 = 2;
static POOLS_STATE: AtomicU8 = AtomicU8::new(UNINIT);

/// The device memory pools of this module, usable while this lives. The
/// module keeps it: its drop removes every pagemap, so that none outlives
/// the module whose code its ops point at. Its drop waits for every
/// device page: a [`DevicePage`] leaked with `mem::forget` makes it wait
/// for ever (a hang, not undefined behaviour).
#[must_use = "the pools are removed when this is dropped"]
pub struct PoolsRegistration(());

impl PoolsRegistration {
    /// Sets up the pools, once per module load (`EBUSY` after that).
    pub fn new() -> Result<Self> {
        POOLS_STATE
            .compare_exchange(UNINIT, INITIALIZING, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| EBUSY)?;
        // SAFETY: The state machine lets exactly one caller get here, and
        // nobody uses the lock before `READY` is published below.
        unsafe { POOLS.init() };
        POOLS.lock().open = true;
        POOLS_STATE.store(READY, Ordering::Release);
        Ok(Self(()))
    }
}

impl Drop for PoolsRegistration {
    /// Removes every pagemap. Each waits until its pages are freed: at
    /// module exit no file is open, so no migration holds one, and pages
    /// that processes map are evicted.
    fn drop(&mut self) {
        let (chunks, retiring) = {
            let mut pools = POOLS.lock();
            pools.open = false;
            (
                core::mem::take(&mut pools.chunks),
                core::mem::take(&mut pools.retiring),
            )
        };
        // Without the lock: a pagemap waits here until its pages are
        // freed, and whoever holds one may need the lock to get on.
        drop(chunks);
        drop(retiring);
    }
}

/// Whether a pool with these pagemaps is fixed: it maps memory that is
/// there (coherent memory), never grows and is never removed before the
/// registration goes. Its RELEASE only evicts.
fn is_fixed(chunks: &[Arc<Pagemap>]) -> bool {
    chunks.iter().any(|p| p.kind() == MemoryKind::Coherent)
}

fn pools() -> Result<kernel::sync::GlobalGuard<POOLS>> {
    if POOLS_STATE.load(Ordering::Acquire) != READY {
        return Err(EINVAL);
    }
    let pools = POOLS.lock();
    if !pools.open {
        return Err(EINVAL);
    }
    Ok(pools)
}

/// The device memory of one device: [`Pagemap`]s of
/// [`CHUNK_SIZE`](super::CHUNK_SIZE) bytes, all with the device's owner.
/// Device-private ones are added when the ones there are full (C's
/// `devmem_chunks`); device-coherent memory is one fixed pagemap.
#[derive(Clone, Copy)]
pub struct DevicePool {
    id: usize,
    owner: Owner,
    ops: &'static dyn PagemapOps,
}

impl DevicePool {
    /// The pool number `id`, whose pagemaps belong to `owner` and send
    /// their faults to `ops`. Its methods fail with `EINVAL` unless a
    /// [`PoolsRegistration`] lives.
    pub fn new(id: usize, owner: Owner, ops: &'static dyn PagemapOps) -> Result<Self> {
        if id >= MAX_POOLS {
            return Err(EINVAL);
        }
        Ok(Self { id, owner, ops })
    }

    /// Adds a device-private pagemap for small pages to the pool.
    pub fn add_chunk(&self) -> Result {
        let mut pools = pools()?;
        if is_fixed(&pools.chunks[self.id]) {
            return Err(EINVAL);
        }
        self.add_locked(&mut pools.chunks[self.id], false)
            .map(|_| ())
    }

    /// Makes the pool the device-coherent memory at physical address
    /// `start` (see [`Pagemap`]): one pagemap, mapped once, for pages of
    /// both sizes. The pool must be empty (`EINVAL`), none of its old
    /// pagemaps still in use (`EBUSY`), and it stays fixed.
    pub fn add_coherent_chunk(&self, start: u64) -> Result {
        let mut pools = pools()?;
        let pools = &mut *pools;
        if !pools.chunks[self.id].is_empty() {
            return Err(EINVAL);
        }
        // A fixed pool's RELEASE does not look at the pagemaps set aside.
        if pools.retiring.iter().any(|p| p.owner() == self.owner) {
            return Err(EBUSY);
        }
        pools.chunks[self.id].reserve(1, GFP_KERNEL)?;
        let pagemap = Pagemap::new_coherent(start, self.owner, self.ops)?;
        pr_info!(
            "added {} MB of coherent memory at {:#x}\n",
            super::CHUNK_SIZE >> 20,
            start
        );
        pools.chunks[self.id].push(pagemap, GFP_KERNEL)?;
        Ok(())
    }

    fn add_locked<'a>(
        &self,
        chunks: &'a mut KVec<Arc<Pagemap>>,
        large_folios: bool,
    ) -> Result<&'a Arc<Pagemap>> {
        chunks.reserve(1, GFP_KERNEL)?;
        let pagemap = Pagemap::new_private(self.owner, self.ops, large_folios)?;
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
    /// does when a file is released. It invalidates: not with a mirror's
    /// lock held.
    pub fn evict(&self) {
        let Ok(pools) = pools() else {
            return;
        };
        for chunk in pools.chunks[self.id].iter() {
            chunk.evict();
        }
    }

    /// Removes every pagemap of the pool: evicts its pages, unmaps it and
    /// releases its address range (C's `dmirror_device_remove_chunks`).
    /// Later allocations add new ones. A fixed (coherent) pool only evicts:
    /// its memory stays mapped, as it never grows back.
    ///
    /// A pagemap whose pages are still in use after eviction (a migration
    /// or a [`DevicePage`] holds one, maybe the caller's) is set aside, not
    /// waited for: the next call removes it once it is unused, and the
    /// [`PoolsRegistration`] at the latest. So this never waits for a page,
    /// and may hold the pools' lock throughout, as C holds its own.
    pub fn remove_chunks(&self) -> Result {
        let mut pools = pools()?;
        if is_fixed(&pools.chunks[self.id]) {
            drop(pools);
            self.evict();
            return Ok(());
        }
        let pools = &mut *pools;
        let count = pools.chunks[self.id].len() + pools.retiring.len();
        let mut chunks = KVec::with_capacity(count, GFP_KERNEL)?;
        // Room to set every one aside again: none is dropped in use.
        pools.retiring.reserve(count, GFP_KERNEL)?;
        while let Some(chunk) = pools.chunks[self.id].pop() {
            let _ = chunks.push_within_capacity(chunk);
        }
        while let Some(chunk) = pools.retiring.pop() {
            let _ = chunks.push_within_capacity(chunk);
        }
        for chunk in chunks {
            // `migrate_device_range()` only trylocks the pages, so this
            // does not wait for a migration that holds one.
            chunk.evict();
            if chunk.allocated() != 0 {
                let _ = pools.retiring.push_within_capacity(chunk);
            }
            // Else dropped here: unmapped, with no page left to wait for.
            // Only the pools allocate from a pagemap, and this one is out.
        }
        Ok(())
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
        let chunks = &mut self.pools.chunks[self.pool.id];
        // `ENOSPC`: that pagemap is full, try the next one. Any other
        // error (no memory for the backing pages) would be the same with
        // a new pagemap.
        for chunk in chunks.iter() {
            match alloc(chunk) {
                Err(e) if e == ENOSPC => {}
                result => return result,
            }
        }
        if is_fixed(chunks) {
            return Err(ENOMEM);
        }
        alloc(self.pool.add_locked(chunks, large)?)
            .map_err(|e| if e == ENOSPC { ENOMEM } else { e })
    }
}
